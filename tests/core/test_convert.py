"""groupvit_core.convert and ``groupvit convert``: lossless round trips, reference-written sources, dtypes, errors.

Reference-written checkpoints (transformers' save_pretrained, TF and PT) come from tools/make_checkpoint_fixtures.py
in tests/golden/ckpt_tiny/, with the reference model's own arrays in expected_pt.npz / expected_h5.npz.
"""

import json
import os
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest

from groupvit_core import checkpoint, convert
from groupvit_core.cli import main as cli_main
from groupvit_core.config import GroupViTConfig
from groupvit_core.convert import convert_checkpoint, format_summary
from groupvit_core.loading import load_pretrained
from groupvit_core.testing import random_weights, test_config
from groupvit_core.weights import spec_table, weight_specs

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GOLDEN = os.path.join(ROOT, "tests", "golden", "ckpt_tiny")


def golden(name):
    path = os.path.join(GOLDEN, name)
    assert os.path.isfile(path), f"missing golden file {path}; run tools/make_checkpoint_fixtures.py"
    return path


def expected(name):
    with np.load(golden(name)) as data:
        return {k: data[k] for k in data.files}


def assert_bit_identical(actual, wanted):
    assert set(actual) == set(wanted), sorted(set(actual) ^ set(wanted))
    for key, value in wanted.items():
        got = actual[key]
        assert (got.dtype, got.shape) == (value.dtype, value.shape), (key, got.dtype, got.shape, value.dtype)
        assert np.ascontiguousarray(got).tobytes() == np.ascontiguousarray(value).tobytes(), key


def safetensors_dtypes(path):
    """{name: safetensors dtype string} from the file's JSON header."""
    with open(path, "rb") as handle:
        (size,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(size))
    header.pop("__metadata__", None)
    return {name: info["dtype"] for name, info in header.items()}


def safetensors_raw(path, name):
    """Raw bytes of one tensor."""
    with open(path, "rb") as handle:
        (size,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(size))
        begin, end = header[name]["data_offsets"]
        handle.seek(8 + size + begin)
        return handle.read(end - begin)


def save_checkpoint(directory, config, state, format="safetensors"):
    """A source checkpoint written with groupvit_core.checkpoint's writers (the files convert reads)."""
    os.makedirs(directory, exist_ok=True)
    config.save_pretrained(directory)
    if format == "safetensors":
        checkpoint.write_safetensors(os.path.join(directory, "model.safetensors"), state)
    else:
        checkpoint.write_torch_bin(os.path.join(directory, "pytorch_model.bin"), state)


@pytest.fixture(scope="module")
def tiny():
    config = test_config("tiny_odd")
    return config, random_weights(config, seed=11)


@pytest.fixture
def st_dir(tiny, tmp_path):
    config, state = tiny
    directory = tmp_path / "src"
    save_checkpoint(directory, config, state)
    return directory


# ----------------------------------------------------------------------------------------------------------------
# Round trips
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("middle", ["h5", "bin"])
def test_round_trip_through_another_format_is_bit_identical(st_dir, tmp_path, tiny, middle):
    config, state = tiny
    convert_checkpoint(st_dir, tmp_path / "middle", format=middle)
    convert_checkpoint(tmp_path / "middle", tmp_path / "back", format="safetensors")
    original = checkpoint.read_safetensors(st_dir / "model.safetensors")
    back = checkpoint.read_safetensors(tmp_path / "back" / "model.safetensors")
    assert_bit_identical(back, original)
    assert_bit_identical(back, state)  # every key, dtype, shape and value, BatchNorm counters included
    assert any(name.endswith("num_batches_tracked") for name in back)
    assert (st_dir / "model.safetensors").read_bytes() == (tmp_path / "back" / "model.safetensors").read_bytes()
    assert GroupViTConfig.from_pretrained(tmp_path / "back") == config


def test_h5_holds_the_keras_layout_and_the_counters(st_dir, tmp_path, tiny):
    config, state = tiny
    convert_checkpoint(st_dir, tmp_path / "h5", format="h5")
    raw = checkpoint.read_h5(tmp_path / "h5" / "tf_model.h5")
    table = spec_table(config)
    assert set(raw) == {spec.h5_name for spec in table.values()}
    kernel = raw[table["text_model.encoder.layers.0.mlp.fc1.weight"].h5_name]
    assert np.array_equal(kernel, state["text_model.encoder.layers.0.mlp.fc1.weight"].T)
    counter = raw[table["visual_projection.1.num_batches_tracked"].h5_name]
    assert counter.dtype == np.int64 and counter == state["visual_projection.1.num_batches_tracked"]
    assert raw["logit_scale"].shape == (1,)


def test_h5_to_h5_and_bin_to_bin(st_dir, tmp_path, tiny):
    _, state = tiny
    convert_checkpoint(st_dir, tmp_path / "a", format="h5")
    convert_checkpoint(tmp_path / "a", tmp_path / "b", format="h5")
    assert_bit_identical(checkpoint.read_h5(tmp_path / "b" / "tf_model.h5"),
                         checkpoint.read_h5(tmp_path / "a" / "tf_model.h5"))
    convert_checkpoint(st_dir, tmp_path / "c", format="bin")
    convert_checkpoint(tmp_path / "c", tmp_path / "d", format="bin")
    assert_bit_identical(checkpoint.read_torch_bin(tmp_path / "d" / "pytorch_model.bin"), state)


# ----------------------------------------------------------------------------------------------------------------
# Reference-written sources
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("weights", ["model.safetensors", "pytorch_model.bin"])
def test_reference_pytorch_files_convert_exactly(weights, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(golden("config.json"), src)
    shutil.copy(golden(weights), src)
    for fmt in ("safetensors", "bin"):
        convert_checkpoint(src, tmp_path / fmt, format=fmt)
        _, state = load_pretrained(tmp_path / fmt)
        assert_bit_identical(state, expected("expected_pt.npz"))


def test_reference_tf_model_h5_converts_exactly(tmp_path):
    """The reference TF model's own weights, whichever way they travel; Keras keeps no BatchNorm counter."""
    summary = convert_checkpoint(golden("tf_model.h5"), tmp_path / "st")  # a weight file, config.json beside it
    assert summary["format_in"] == "h5"
    _, state = load_pretrained(tmp_path / "st")
    pt = expected("expected_pt.npz")
    for name, value in pt.items():
        if name.endswith("num_batches_tracked"):
            assert state[name].dtype == np.int64 and int(state[name]) == 0, name  # filled in, as noted
        else:
            assert np.array_equal(state[name], value), name
    assert any("num_batches_tracked" in note for note in summary["notes"])

    convert_checkpoint(tmp_path / "st", tmp_path / "h5", format="h5")
    raw = checkpoint.read_h5(tmp_path / "h5" / "tf_model.h5")
    h5_reference = expected("expected_h5.npz")
    for name, value in h5_reference.items():
        assert raw[name].dtype == value.dtype and np.array_equal(raw[name], value), name


@pytest.mark.parametrize("middle", ["h5", "bin"])
def test_reference_safetensors_round_trip_is_byte_identical(tmp_path, middle):
    convert_checkpoint(golden("model.safetensors"), tmp_path / "middle", format=middle)
    convert_checkpoint(tmp_path / "middle", tmp_path / "back")
    assert (tmp_path / "back" / "model.safetensors").read_bytes() == open(golden("model.safetensors"), "rb").read()


def test_reference_safetensors_to_h5_matches_the_reference_tf_weights(tmp_path):
    convert_checkpoint(golden("model.safetensors"), tmp_path / "h5", format="h5")
    raw = checkpoint.read_h5(tmp_path / "h5" / "tf_model.h5")
    reference = expected("expected_h5.npz")
    assert set(raw) - set(reference) == {"text_projection.1/num_batches_tracked",
                                         "visual_projection.1/num_batches_tracked"}
    for name, value in reference.items():
        assert raw[name].dtype == value.dtype and np.array_equal(raw[name], value), name


# ----------------------------------------------------------------------------------------------------------------
# dtype
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["safetensors", "bin", "h5"])
def test_float16_casts_floats_only(st_dir, tmp_path, tiny, fmt):
    config, state = tiny
    summary = convert_checkpoint(st_dir, tmp_path / "fp16", format=fmt, dtype="float16")
    assert summary["dtype_out"] == ["float16", "int64"]
    _, loaded = load_pretrained(tmp_path / "fp16")
    for name, value in state.items():
        if value.dtype == np.int64:
            assert loaded[name].dtype == np.int64 and loaded[name] == value, name
        else:
            assert loaded[name].dtype == np.float16, name
            assert np.array_equal(loaded[name], value.astype(np.float16)), name
    # float16 -> float32 widens exactly.
    convert_checkpoint(tmp_path / "fp16", tmp_path / "fp32", dtype="float32")
    _, widened = load_pretrained(tmp_path / "fp32")
    assert all(widened[n].dtype == (np.int64 if v.dtype == np.int64 else np.float32) for n, v in state.items())
    assert np.array_equal(widened["logit_scale"], state["logit_scale"].astype(np.float16).astype(np.float32))


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_bfloat16_rounds_like_torch(tiny, tmp_path, fmt):
    """Values planted in a tensor are rounded to the bits torch gives (golden, from torch); NaN stays NaN."""
    config, state = tiny
    rounding = expected("bf16_rounding.npz")
    values, torch_bits = rounding["float32"], rounding["bfloat16_bits"]
    state = dict(state)
    name = "text_model.embeddings.token_embedding.weight"
    table = state[name].copy().reshape(-1)
    assert table.size >= values.size
    table[:values.size] = values
    state[name] = table.reshape(state[name].shape)
    save_checkpoint(tmp_path / "src", config, state)
    convert_checkpoint(tmp_path / "src", tmp_path / "bf16", format=fmt, dtype="bfloat16")
    if fmt == "safetensors":
        path = tmp_path / "bf16" / "model.safetensors"
        dtypes = safetensors_dtypes(path)
        assert {dtypes[n] for n in state if not n.endswith("num_batches_tracked")} == {"BF16"}
        assert {dtypes[n] for n in state if n.endswith("num_batches_tracked")} == {"I64"}
        bits = np.frombuffer(safetensors_raw(path, name), dtype="<u2")[:values.size]
        nan = np.isnan(values)
        assert np.array_equal(bits[~nan], torch_bits[~nan])
        assert np.all((bits[nan] & 0x7F80) == 0x7F80) and np.all(bits[nan] & 0x7F)
    # Read back (widened to float32): exactly the bfloat16 values, i.e. float32 with the low 16 bits zero.
    loaded = convert.read_source(tmp_path / "bf16").state
    for key, value in state.items():
        if value.dtype == np.int64:
            assert loaded[key].dtype == np.int64 and loaded[key] == value
        else:
            assert loaded[key].dtype == np.float32
            assert not np.any(loaded[key].view(np.uint32) & 0xFFFF), key
            finite = np.isfinite(value) & (np.abs(value) < 1e38)
            assert np.allclose(loaded[key][finite], value[finite], rtol=2 ** -8, atol=1e-38), key


def test_bfloat16_h5_is_refused(st_dir, tmp_path):
    with pytest.raises(ValueError, match="bfloat16"):
        convert_checkpoint(st_dir, tmp_path / "x", format="h5", dtype="bfloat16")
    assert not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------------------------------------------
# Output directory: files, atomicity, overwrite
# ----------------------------------------------------------------------------------------------------------------


def test_output_has_config_weights_tokenizer_and_preprocessor(st_dir, tmp_path):
    summary = convert_checkpoint(st_dir, tmp_path / "out", format="h5")
    files = set(os.listdir(tmp_path / "out"))
    assert {"config.json", "tf_model.h5", "vocab.json", "merges.txt", "tokenizer_config.json",
            "special_tokens_map.json", "preprocessor_config.json"} <= files
    assert summary["files"] == sorted(files)
    # Not the owner-only modes of the temporary files and directory it was assembled in.
    mask = os.umask(0)
    os.umask(mask)
    assert os.stat(tmp_path / "out").st_mode & 0o777 == 0o777 & ~mask
    assert os.stat(tmp_path / "out" / "tf_model.h5").st_mode & 0o777 == 0o666 & ~mask
    with open(tmp_path / "out" / "preprocessor_config.json") as handle:
        assert json.load(handle)["image_mean"] == [0.48145466, 0.4578275, 0.40821073]  # CLIP defaults


def test_source_tokenizer_and_preprocessor_files_are_copied(st_dir, tmp_path):
    custom = {"crop_size": {"height": 20, "width": 20}, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
              "size": {"shortest_edge": 20}, "my_extra_key": 1}
    (st_dir / "preprocessor_config.json").write_text(json.dumps(custom))
    (st_dir / "tokenizer_config.json").write_text('{"model_max_length": 13, "tokenizer_class": "CLIPTokenizer"}')
    (st_dir / "vocab.json").write_text('{"a": 0}')
    (st_dir / "merges.txt").write_text("#version: 0.2\n")
    summary = convert_checkpoint(st_dir, tmp_path / "out", format="bin")
    for name in ("preprocessor_config.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
        assert (tmp_path / "out" / name).read_bytes() == (st_dir / name).read_bytes(), name
    assert not (tmp_path / "out" / "special_tokens_map.json").exists()
    assert any("copied" in note for note in summary["notes"])


def test_text_only_checkpoint(tiny, tmp_path):
    config, state = tiny
    text_config = config.text_config
    text_state = {k: v for k, v in state.items() if k.startswith("text_model.")}
    save_checkpoint(tmp_path / "text", text_config, text_state, format="bin")
    summary = convert_checkpoint(tmp_path / "text", tmp_path / "out", format="safetensors")
    assert summary["model_type"] == "groupvit_text_model"
    assert not (tmp_path / "out" / "preprocessor_config.json").exists()
    _, loaded = load_pretrained(tmp_path / "out")
    assert_bit_identical(loaded, text_state)


def test_existing_destination_needs_overwrite(st_dir, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old")
    with pytest.raises(FileExistsError, match="--overwrite"):
        convert_checkpoint(st_dir, tmp_path / "out")
    assert os.listdir(tmp_path / "out") == ["old.txt"]
    convert_checkpoint(st_dir, tmp_path / "out", overwrite=True)
    assert not (tmp_path / "out" / "old.txt").exists() and (tmp_path / "out" / "model.safetensors").is_file()
    assert sorted(os.listdir(tmp_path)) == ["out", "src"]  # no temporary or backup directory left
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not a directory"):
        convert_checkpoint(st_dir, tmp_path / "file", overwrite=True)


def test_failure_leaves_the_old_destination_intact(st_dir, tmp_path, monkeypatch):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old")

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(convert, "_write_processors", broken)
    with pytest.raises(OSError, match="disk full"):
        convert_checkpoint(st_dir, tmp_path / "out", overwrite=True)
    assert os.listdir(tmp_path / "out") == ["old.txt"]
    with pytest.raises(OSError, match="disk full"):
        convert_checkpoint(st_dir, tmp_path / "new")
    assert sorted(os.listdir(tmp_path)) == ["out", "src"]


def test_in_place_conversion_with_overwrite(st_dir, tiny):
    _, state = tiny
    convert_checkpoint(st_dir, st_dir, format="h5", overwrite=True)
    assert sorted(n for n in os.listdir(st_dir) if "model" in n) == ["tf_model.h5"]
    _, loaded = load_pretrained(st_dir)
    assert_bit_identical(loaded, state)


def test_source_inside_destination_is_refused(st_dir, tmp_path):
    with pytest.raises(ValueError, match="inside"):
        convert_checkpoint(st_dir / "model.safetensors", tmp_path, overwrite=True)


# ----------------------------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------------------------


def test_missing_source(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        convert_checkpoint(tmp_path / "nope", tmp_path / "out")


def test_unknown_layouts(tmp_path, tiny):
    config, _ = tiny
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="unknown checkpoint layout"):
        convert_checkpoint(empty, tmp_path / "out")
    (tmp_path / "junk.bin").write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="unknown checkpoint layout"):
        convert_checkpoint(tmp_path / "junk.bin", tmp_path / "out")
    other = tmp_path / "other"
    other.mkdir()
    config.save_pretrained(other)
    checkpoint.write_safetensors(other / "model.safetensors", {"encoder.weight": np.zeros((2, 2), np.float32)})
    with pytest.raises(ValueError, match="unknown checkpoint layout.*encoder.weight"):
        convert_checkpoint(other, tmp_path / "out")
    bare = tmp_path / "bare"
    bare.mkdir()
    checkpoint.write_safetensors(bare / "model.safetensors", {"logit_scale": np.zeros((), np.float32)})
    with pytest.raises(FileNotFoundError, match="config.json"):
        convert_checkpoint(bare, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_tensor_is_named(tiny, tmp_path):
    config, state = tiny
    save_checkpoint(tmp_path / "src", config, state)
    broken = {k: v for k, v in state.items() if k != "vision_model.encoder.stages.1.downsample.assign.q_proj.bias"}
    checkpoint.write_safetensors(tmp_path / "src" / "model.safetensors", broken)
    with pytest.raises(ValueError, match=r"missing 1 tensor\(s\): vision_model\.encoder\.stages\.1\.downsample"
                                         r"\.assign\.q_proj\.bias"):
        convert_checkpoint(tmp_path / "src", tmp_path / "out")


def test_shape_that_disagrees_with_the_config(st_dir, tmp_path):
    data = json.loads((st_dir / "config.json").read_text())
    data["projection_dim"] += 1
    (st_dir / "config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"wrong shape.*visual_projection\.3\.weight"):
        convert_checkpoint(st_dir, tmp_path / "out")


def test_shape_mismatch_in_h5(st_dir, tmp_path):
    convert_checkpoint(st_dir, tmp_path / "h5", format="h5")
    data = json.loads((tmp_path / "h5" / "config.json").read_text())
    data["text_config"]["intermediate_size"] += 1
    (tmp_path / "h5" / "config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="fc1/kernel has shape"):
        convert_checkpoint(tmp_path / "h5", tmp_path / "out")


def test_bad_arguments(st_dir, tmp_path):
    with pytest.raises(ValueError, match="unknown format"):
        convert_checkpoint(st_dir, tmp_path / "out", format="onnx")
    with pytest.raises(ValueError, match="unknown dtype"):
        convert_checkpoint(st_dir, tmp_path / "out", dtype="int8")


# ----------------------------------------------------------------------------------------------------------------
# Summary, progress, CLI
# ----------------------------------------------------------------------------------------------------------------


def test_summary(st_dir, tmp_path, tiny):
    config, state = tiny
    summary = convert_checkpoint(st_dir, tmp_path / "out", format="bin")
    specs = weight_specs(config)
    assert summary["format_in"] == "safetensors" and summary["format_out"] == "bin"
    assert summary["num_tensors"] == len(specs) == len(state)
    assert summary["num_parameters"] == sum(int(np.prod(s.shape)) for s in specs if not s.is_buffer)
    assert summary["num_elements"] == sum(int(np.prod(s.shape)) for s in specs)
    assert summary["bytes"] == os.path.getsize(tmp_path / "out" / "pytorch_model.bin")
    assert summary["dtype_in"] == summary["dtype_out"] == ["float32", "int64"]
    assert summary["config"] == config.to_dict()
    assert "depths [2, 1, 1]" in summary["config_summary"]
    text = format_summary(summary)
    assert "pytorch_model.bin" in text and f"{summary['num_parameters']:,} parameters" in text
    json.dumps(summary)  # plain data


def test_progress_bar_goes_to_stderr(st_dir, tmp_path, capsys):
    convert_checkpoint(st_dir, tmp_path / "a", progress=True)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err != ""
    convert_checkpoint(st_dir, tmp_path / "b", progress=False)
    assert capsys.readouterr().err == ""


def test_cli(st_dir, tmp_path, capsys):
    assert cli_main(["convert", str(st_dir), str(tmp_path / "out"), "--format", "h5"]) == 0
    captured = capsys.readouterr()
    assert "converted" in captured.out and "tf_model.h5" in captured.out
    assert captured.err == ""  # not a TTY: no progress bar
    assert cli_main(["convert", str(tmp_path / "out"), str(tmp_path / "q"), "--quiet", "--dtype", "float16"]) == 0
    assert capsys.readouterr() == ("", "")
    assert cli_main(["convert", str(tmp_path / "q"), str(tmp_path / "j"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["dtype_in"] == summary["dtype_out"] == ["float16", "int64"]
    assert cli_main(["convert", str(st_dir), str(tmp_path / "out")]) == 2
    assert "groupvit convert: error:" in capsys.readouterr().err
    assert cli_main(["convert", str(tmp_path / "missing"), str(tmp_path / "x")]) == 2
    assert "no such file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["convert", str(st_dir), str(tmp_path / "y"), "--format", "onnx"])


def test_conversion_imports_no_framework(tmp_path):
    code = (
        "import sys\n"
        "from groupvit_core.cli import main\n"
        f"assert main(['convert', {golden('tf_model.h5')!r}, {str(tmp_path / 'a')!r}, '-q']) == 0\n"
        f"assert main(['convert', {str(tmp_path / 'a')!r}, {str(tmp_path / 'b')!r}, '-q', '--format', 'bin',"
        " '--dtype', 'bfloat16']) == 0\n"
        "print(','.join(m for m in ('torch', 'tensorflow', 'keras', 'jax') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""
