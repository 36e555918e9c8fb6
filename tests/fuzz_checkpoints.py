"""Checkpoint cases shared by tests/pt/test_fuzz_pt.py and tests/tf/test_fuzz_tf.py (not collected itself).

Each framework's file subclasses ``CheckpointCases`` as ``TestCheckpoints`` with its model classes; the
module-level fixtures ``checkpoint`` (a small checkpoint directory) and ``model`` (loaded from it) come from that
file. Damaged, absurd, missing and hostile checkpoints end in a ValueError / TypeError / OSError naming the file;
an interrupted ``save_pretrained`` leaves the old weights intact. ``small_config`` and ``make_outcome`` are the
two files' common helpers.
"""

import contextlib
import json
import os
import zipfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from groupvit_core import loading
from groupvit_core.config import GroupViTConfig
from groupvit_core.testing import random_weights
from groupvit_core.weights import check_state

CLEAN_ERRORS = (ValueError, TypeError, OSError)
FUZZ = settings(max_examples=80, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def small_config(**text):
    return GroupViTConfig(
        text_config=dict(dict(vocab_size=30, hidden_size=6, num_attention_heads=2, intermediate_size=7,
                              num_hidden_layers=1, max_position_embeddings=5, bos_token_id=28, eos_token_id=29,
                              pad_token_id=1), **text),
        vision_config=dict(hidden_size=6, num_attention_heads=2, intermediate_size=7, patch_size=4, image_size=8,
                           depths=[1, 1], num_hidden_layers=2, num_group_tokens=[3, 0], num_output_groups=[3, 3]),
        projection_dim=5,
        projection_intermediate_dim=7,
    )


def make_outcome(context=contextlib.nullcontext):
    """An ``outcome(call, *names)``: call()'s result (run inside ``context()``), or the clean error it raised,
    whose message must contain one of ``names``."""

    def outcome(call, *names):
        try:
            with context():
                return call()
        except CLEAN_ERRORS as error:
            message = str(error)
            if names:
                assert any(name in message for name in names), (
                    f"{type(error).__name__} names none of {names}: {message}")
            return error

    return outcome


def _copy_checkpoint(source, target, weights_name=None, weights=None, config_text=None):
    os.makedirs(target, exist_ok=True)
    for name in os.listdir(target):
        os.remove(os.path.join(target, name))
    for name in os.listdir(source):
        with open(os.path.join(source, name), "rb") as handle:
            data = handle.read()
        if name == "config.json" and config_text is not None:
            data = config_text.encode()
        if weights is not None and name != "config.json":
            continue
        with open(os.path.join(target, name), "wb") as handle:
            handle.write(data)
    if weights is not None:
        with open(os.path.join(target, weights_name), "wb") as handle:
            handle.write(weights)


class Interrupt(Exception):
    pass


class CheckpointCases:
    """Subclass as ``TestCheckpoints`` with the framework's three model classes."""

    MODEL = TEXT_MODEL = VISION_MODEL = None
    DAMAGED_EXAMPLES = 40  # hypothesis examples of damaged weight files
    outcome = staticmethod(make_outcome())  # the PyTorch file runs its calls under torch.no_grad

    @pytest.fixture(scope="class")
    def weight_files(self, tmp_path_factory):
        config = small_config()
        state = random_weights(config, seed=5)
        files = {}
        for fmt, name in loading.WEIGHT_FILES.items():
            directory = tmp_path_factory.mktemp(f"weights_{fmt}")
            with open(loading.save_pretrained(directory, config, state, format=fmt), "rb") as handle:
                files[name] = handle.read()
        return files

    def test_damaged_checkpoints_load_or_name_the_file(self, checkpoint, weight_files, tmp_path):
        target = tmp_path / "damaged"

        @settings(FUZZ, max_examples=self.DAMAGED_EXAMPLES)
        @given(name=st.sampled_from(["model.safetensors", "pytorch_model.bin"]),
               how=st.sampled_from(["cut", "flip"]), where=st.floats(0, 1), bit=st.integers(0, 7))
        def run(name, how, where, bit):
            data = bytearray(weight_files[name])
            position = min(int(where * len(data)), len(data) - 1)
            if how == "cut":
                data = data[:position]
            else:
                data[position] ^= 1 << bit
            _copy_checkpoint(checkpoint, target, name, bytes(data))
            result = self.outcome(lambda: self.MODEL.from_pretrained(target), name)
            if not isinstance(result, Exception):  # a flip inside tensor data: the weights load, shapes intact
                check_state(result.canonical_state(), result.config)

        run()

    @pytest.mark.parametrize("name", ["model.safetensors", "pytorch_model.bin", "tf_model.h5"])
    def test_every_format_loads_into_every_model(self, checkpoint, weight_files, tmp_path, name):
        _copy_checkpoint(checkpoint, tmp_path, name, weight_files[name])
        for cls in (self.MODEL, self.TEXT_MODEL, self.VISION_MODEL):
            assert isinstance(cls.from_pretrained(tmp_path), cls)

    @pytest.mark.parametrize("text_config", [
        {"hidden_size": 10**12, "num_attention_heads": 1},
        {"vocab_size": 10**15},
        {"intermediate_size": 2**40},
    ])
    def test_absurd_config_sizes_fail_before_allocating(self, checkpoint, tmp_path, text_config):
        config = json.loads((checkpoint / "config.json").read_text())
        config["text_config"].update(text_config)
        _copy_checkpoint(checkpoint, tmp_path, config_text=json.dumps(config))
        for cls in (self.MODEL, self.TEXT_MODEL):
            error = self.outcome(lambda: cls.from_pretrained(tmp_path), "text_model")
            assert isinstance(error, ValueError), error

    def test_missing_and_wrong_paths_are_oserrors(self, tmp_path):
        for path in (tmp_path / "missing", tmp_path / "file.txt"):
            if path.name == "file.txt":
                path.write_text("not a checkpoint")
            error = self.outcome(lambda: self.MODEL.from_pretrained(path), path.name)
            assert isinstance(error, OSError), error
        error = self.outcome(lambda: self.MODEL.from_pretrained(tmp_path), "config.json")
        assert isinstance(error, OSError), error

    def test_malicious_pytorch_model_bin_runs_nothing(self, checkpoint, tmp_path):
        marker = tmp_path / "pwned"
        data = f"cos\nsystem\n(S'touch {marker}'\ntR.".encode()
        _copy_checkpoint(checkpoint, tmp_path / "ckpt", "pytorch_model.bin", b"")
        with zipfile.ZipFile(tmp_path / "ckpt" / "pytorch_model.bin", "w") as archive:
            archive.writestr("archive/data.pkl", data)
        error = self.outcome(lambda: self.MODEL.from_pretrained(tmp_path / "ckpt"), "pytorch_model.bin")
        assert isinstance(error, ValueError) and not marker.exists()

    @pytest.mark.parametrize("error", [Interrupt("disk full"), KeyboardInterrupt()],
                             ids=["exception", "KeyboardInterrupt"])
    @pytest.mark.parametrize("fmt", ["safetensors", "bin", "h5"])
    def test_model_save_interrupted_keeps_the_old_weights(self, model, tmp_path, monkeypatch, fmt, error):
        weights = model.save_pretrained(tmp_path, format=fmt)
        with open(weights, "rb") as handle:
            old = handle.read()
        names = sorted(os.listdir(tmp_path))
        original = os.replace

        def replace(source, target):
            if os.fspath(target) == weights:
                with open(source, "r+b") as handle:  # the new file is complete; the rename is what fails
                    handle.truncate(7)
                raise error
            return original(source, target)

        monkeypatch.setattr(os, "replace", replace)
        with pytest.raises(type(error)):
            model.save_pretrained(tmp_path, format=fmt)
        monkeypatch.undo()
        assert sorted(os.listdir(tmp_path)) == names, "temporary files were left behind"
        with open(weights, "rb") as handle:
            assert handle.read() == old
