"""Interrupted writes leave the previous files intact and no temporary files behind.

Covers every writer of groupvit_core: config.json, ``loading.save_pretrained`` in each weight format,
``convert.convert_checkpoint``, the segmentation pictures of ``visualize``, and the tokenizer / preprocessor files.
Each save is interrupted at several points -- inside the format library mid-write, at the fsync, at the final
rename, with an ordinary exception and with KeyboardInterrupt -- and the directory is compared byte for byte with
its state before the save. The models' ``save_pretrained`` is covered in tests/pt/test_fuzz_pt.py and
tests/tf/test_fuzz_tf.py.

Tests marked ``xfail(strict=True)`` reproduce open bugs; the reason gives the reproduction and the proposed fix.
"""

import json
import os
import stat

import zipfile

import h5py
import numpy as np
import pytest
import safetensors.numpy

from groupvit_core import convert, io_utils, loading, visualize
from groupvit_core.config import GroupViTConfig
from groupvit_core.image import GroupViTImageProcessor
from groupvit_core.testing import random_weights


class Interrupt(Exception):
    """The simulated failure (disk full, a crash in a library)."""


def small_config(**vision):
    return GroupViTConfig(
        text_config=dict(vocab_size=30, hidden_size=6, num_attention_heads=2, intermediate_size=7,
                         num_hidden_layers=1, max_position_embeddings=5, bos_token_id=28, eos_token_id=29,
                         pad_token_id=1),
        vision_config=dict(dict(hidden_size=6, num_attention_heads=2, intermediate_size=7, patch_size=4,
                                image_size=8, depths=[1, 1], num_hidden_layers=2, num_group_tokens=[3, 0],
                                num_output_groups=[3, 3]), **vision),
        projection_dim=5,
        projection_intermediate_dim=7,
    )


def snapshot(directory):
    """{relative path: bytes} of every file under ``directory``, hidden files included."""
    files = {}
    for root, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as handle:
                files[os.path.relpath(path, directory)] = handle.read()
    return files


def fail_on_call(number, error=Interrupt("disk full"), partial=None):
    """A wrapper factory: the wrapped function raises ``error`` on its ``number``-th call (1-based).

    ``partial(args)`` is called first on that call, to leave half-written data behind as a real crash would.
    """
    def wrap(original):
        calls = []

        def wrapper(*args, **kwargs):
            calls.append(1)
            if len(calls) == number:
                if partial is not None:
                    partial(args)
                raise error
            return original(*args, **kwargs)
        return wrapper
    return wrap


INTERRUPTIONS = [pytest.param(Interrupt("disk full"), id="exception"),
                 pytest.param(KeyboardInterrupt(), id="KeyboardInterrupt")]


def raises(error):
    return pytest.raises(type(error))


# ----------------------------------------------------------------------------------------------------------------
# io_utils itself


@pytest.mark.parametrize("error", INTERRUPTIONS)
@pytest.mark.parametrize("where", ["write", "fsync", "replace"])
def test_atomic_write_bytes_interrupted_anywhere(tmp_path, monkeypatch, error, where):
    path = tmp_path / "file.txt"
    path.write_bytes(b"old")
    before = snapshot(tmp_path)
    if where == "write":
        def bad_open(*args, **kwargs):
            handle = open(*args, **kwargs)
            handle.write(b"partial")
            handle.close()
            raise error
        monkeypatch.setattr(io_utils, "open", bad_open, raising=False)
    elif where == "fsync":
        monkeypatch.setattr(os, "fsync", fail_on_call(1, error)(os.fsync))
    else:
        monkeypatch.setattr(os, "replace", fail_on_call(1, error)(os.replace))
    with raises(error):
        io_utils.atomic_write_bytes(path, b"new content")
    monkeypatch.undo()
    assert snapshot(tmp_path) == before


def test_atomic_write_gives_the_mode_an_ordinary_open_gives(tmp_path):
    io_utils.atomic_write_text(tmp_path / "a.txt", "x")
    with open(tmp_path / "b.txt", "w") as handle:
        handle.write("x")
    assert stat.S_IMODE(os.stat(tmp_path / "a.txt").st_mode) == stat.S_IMODE(os.stat(tmp_path / "b.txt").st_mode)


def test_atomic_write_into_a_missing_directory_is_an_oserror(tmp_path):
    with pytest.raises(OSError, match="does not exist"):
        io_utils.atomic_write_text(tmp_path / "missing" / "a.txt", "x")
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------------------------------------------
# config.json


@pytest.mark.parametrize("error", INTERRUPTIONS)
@pytest.mark.parametrize("where", ["fsync", "replace"])
def test_config_save_interrupted(tmp_path, monkeypatch, error, where):
    small_config().save_pretrained(tmp_path)
    before = snapshot(tmp_path)
    target = "fsync" if where == "fsync" else "replace"
    monkeypatch.setattr(os, target, fail_on_call(1, error)(getattr(os, target)))
    changed = small_config(hidden_act="relu")
    with raises(error):
        changed.save_pretrained(tmp_path)
    monkeypatch.undo()
    assert snapshot(tmp_path) == before
    assert GroupViTConfig.from_pretrained(tmp_path) == small_config()


# ----------------------------------------------------------------------------------------------------------------
# loading.save_pretrained: interrupted inside each format's writer


def _partial_file(args):
    """Leave a few bytes in the file being written (the path is the writer's last positional string)."""
    path = next((a for a in reversed(args) if isinstance(a, (str, os.PathLike))), None)
    if path is not None:
        with open(path, "wb") as handle:
            handle.write(b"\x00" * 17)


def interrupt_format_writer(monkeypatch, fmt, error):
    if fmt == "safetensors":
        monkeypatch.setattr(safetensors.numpy, "save_file", fail_on_call(1, error, _partial_file)(
            safetensors.numpy.save_file))
    elif fmt == "h5":
        monkeypatch.setattr(h5py.Group, "create_dataset", fail_on_call(20, error)(h5py.Group.create_dataset))
    else:
        monkeypatch.setattr(zipfile.ZipFile, "open", fail_on_call(6, error)(zipfile.ZipFile.open))


@pytest.mark.parametrize("error", INTERRUPTIONS)
@pytest.mark.parametrize("fmt", ["safetensors", "h5", "bin"])
def test_weight_save_interrupted_mid_write_keeps_the_old_weights(tmp_path, monkeypatch, fmt, error):
    config = small_config()
    weights = loading.save_pretrained(tmp_path, config, random_weights(config, seed=1), format=fmt)
    with open(weights, "rb") as handle:
        old_weights = handle.read()
    before = snapshot(tmp_path)
    interrupt_format_writer(monkeypatch, fmt, error)
    with raises(error):
        loading.save_pretrained(tmp_path, config, random_weights(config, seed=2), format=fmt)
    monkeypatch.undo()
    after = snapshot(tmp_path)
    assert sorted(after) == sorted(before), "temporary files were left behind"
    with open(weights, "rb") as handle:
        assert handle.read() == old_weights
    _, state = loading.load_pretrained(tmp_path)
    np.testing.assert_array_equal(state["logit_scale"], random_weights(config, seed=1)["logit_scale"])


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_interrupted_save_leaves_the_old_checkpoint_whole(tmp_path, monkeypatch, fmt):
    config = small_config()
    loading.save_pretrained(tmp_path, config, random_weights(config, seed=1), format=fmt)
    before = snapshot(tmp_path)
    interrupt_format_writer(monkeypatch, fmt, Interrupt("disk full"))
    changed = small_config(hidden_act="relu")
    with pytest.raises(Interrupt):
        loading.save_pretrained(tmp_path, changed, random_weights(changed, seed=2), format=fmt)
    monkeypatch.undo()
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("fmt", ["safetensors", "h5", "bin"])
def test_weight_save_interrupted_at_the_rename(tmp_path, monkeypatch, fmt):
    config = small_config()
    weights = loading.save_pretrained(tmp_path, config, random_weights(config, seed=1), format=fmt)
    with open(weights, "rb") as handle:
        old_weights = handle.read()
    names = sorted(os.listdir(tmp_path))
    original = os.replace

    def replace(source, target):
        if os.fspath(target) == weights:
            raise KeyboardInterrupt()
        return original(source, target)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        loading.save_pretrained(tmp_path, config, random_weights(config, seed=2), format=fmt)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == names
    with open(weights, "rb") as handle:
        assert handle.read() == old_weights


def test_bad_state_is_refused_before_anything_is_written(tmp_path):
    config = small_config()
    loading.save_pretrained(tmp_path, config, random_weights(config, seed=1))
    before = snapshot(tmp_path)
    state = random_weights(config, seed=2)
    del state["logit_scale"]
    with pytest.raises(ValueError, match="logit_scale"):
        loading.save_pretrained(tmp_path, config, state)
    with pytest.raises(ValueError, match="format"):
        loading.save_pretrained(tmp_path, config, random_weights(config, seed=2), format="pickle")
    assert snapshot(tmp_path) == before


# ----------------------------------------------------------------------------------------------------------------
# convert_checkpoint


@pytest.fixture
def convert_source(tmp_path):
    """A checkpoint directory with tiny tokenizer and preprocessor files (copied by convert, so it stays fast)."""
    source = tmp_path / "src"
    config = small_config()
    loading.save_pretrained(source, config, random_weights(config, seed=1), format="safetensors")
    (source / "vocab.json").write_text(json.dumps({"a": 0, "<|startoftext|>": 1, "<|endoftext|>": 2}))
    (source / "merges.txt").write_text("#version: 0.2\n")
    GroupViTImageProcessor().save_pretrained(source)
    return source


def _parent_listing(path):
    return sorted(os.listdir(os.path.dirname(os.path.abspath(path))))


def test_convert_works_here(convert_source, tmp_path):
    summary = convert.convert_checkpoint(convert_source, tmp_path / "out", format="bin")
    assert summary["format_out"] == "bin" and (tmp_path / "out" / "pytorch_model.bin").is_file()


@pytest.mark.parametrize("error", INTERRUPTIONS)
@pytest.mark.parametrize("fmt", ["safetensors", "h5", "bin"])
def test_convert_interrupted_while_writing_leaves_no_destination(convert_source, tmp_path, monkeypatch, fmt, error):
    destination = tmp_path / "out"
    listing = _parent_listing(destination)
    interrupt_format_writer(monkeypatch, fmt, error)
    with raises(error):
        convert.convert_checkpoint(convert_source, destination, format=fmt)
    monkeypatch.undo()
    assert not destination.exists()
    assert _parent_listing(destination) == listing, "staging directories were left behind"


@pytest.mark.parametrize("error", INTERRUPTIONS)
@pytest.mark.parametrize("where", ["weights", "processors", "publish"])
def test_convert_with_overwrite_interrupted_keeps_the_old_destination(convert_source, tmp_path, monkeypatch, where,
                                                                      error):
    destination = tmp_path / "out"
    convert.convert_checkpoint(convert_source, destination, format="bin")
    before = snapshot(destination)
    listing = _parent_listing(destination)
    if where == "weights":
        interrupt_format_writer(monkeypatch, "safetensors", error)
    elif where == "processors":
        import shutil

        monkeypatch.setattr(shutil, "copyfile", fail_on_call(2, error)(shutil.copyfile))
    else:
        original = os.rename

        def rename(source, target):
            # the second rename of _publish moves the finished staging directory onto the destination
            if os.fspath(target) == os.fspath(destination) and ".tmp" in os.path.basename(os.fspath(source)):
                raise error
            return original(source, target)

        monkeypatch.setattr(os, "rename", rename)
    with raises(error):
        convert.convert_checkpoint(convert_source, destination, format="safetensors", overwrite=True)
    monkeypatch.undo()
    assert snapshot(destination) == before
    assert _parent_listing(destination) == listing, "staging or backup directories were left behind"


def test_convert_refuses_an_existing_destination_without_touching_it(convert_source, tmp_path):
    destination = tmp_path / "out"
    destination.mkdir()
    (destination / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite"):
        convert.convert_checkpoint(convert_source, destination)
    assert snapshot(destination) == {"keep.txt": b"mine"}


# ----------------------------------------------------------------------------------------------------------------
# Segmentation pictures


def _labels():
    return np.array([[0, 1, 1], [2, 2, 0]], dtype=np.int64)


def _picture():
    return np.random.RandomState(0).randint(0, 256, size=(2, 3, 3)).astype(np.uint8)


SAVERS = {
    "labels": lambda path: visualize.save_label_png(path, _labels()),
    "overlay": lambda path: visualize.save_overlay_png(path, _picture(), _labels(), ["a", "b", "c"]),
    "groups": lambda path: visualize.save_groups_png(path, _picture(), _labels()),
}


@pytest.mark.parametrize("error", INTERRUPTIONS)
@pytest.mark.parametrize("kind", sorted(SAVERS))
def test_segmentation_pictures_interrupted_mid_write(tmp_path, monkeypatch, kind, error):
    from PIL import Image

    path = tmp_path / f"{kind}.png"
    path.write_bytes(b"old picture")
    before = snapshot(tmp_path)

    def partial(args):
        with open(args[1], "wb") as handle:
            handle.write(b"\x89PNG half")

    monkeypatch.setattr(Image.Image, "save", fail_on_call(1, error, partial)(Image.Image.save))
    with raises(error):
        SAVERS[kind](path)
    monkeypatch.undo()
    assert snapshot(tmp_path) == before
    SAVERS[kind](path)  # and an uninterrupted save replaces it with a complete PNG
    with Image.open(path) as saved:
        assert saved.format == "PNG" and saved.height >= 2


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer and preprocessor files


@pytest.mark.parametrize("error", INTERRUPTIONS)
def test_preprocessor_save_interrupted(tmp_path, monkeypatch, error):
    GroupViTImageProcessor().save_pretrained(tmp_path)
    before = snapshot(tmp_path)
    monkeypatch.setattr(os, "replace", fail_on_call(1, error)(os.replace))
    with raises(error):
        GroupViTImageProcessor.preset("imagenet").save_pretrained(tmp_path)
    monkeypatch.undo()
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("error", INTERRUPTIONS)
def test_tokenizer_save_interrupted_leaves_no_temporary_files(tmp_path, monkeypatch, error):
    from groupvit_core.tokenizer import GroupViTTokenizer

    tokenizer = GroupViTTokenizer(vocab={"a": 0, "<|startoftext|>": 1, "<|endoftext|>": 2}, merges=[])
    tokenizer.save_pretrained(tmp_path)
    before = snapshot(tmp_path)
    monkeypatch.setattr(os, "fsync", fail_on_call(1, error)(os.fsync))
    with raises(error):
        GroupViTTokenizer(vocab={"a": 0, "<|startoftext|>": 1, "<|endoftext|>": 2}, merges=[],
                          model_max_length=9).save_pretrained(tmp_path)
    monkeypatch.undo()
    assert snapshot(tmp_path) == before
