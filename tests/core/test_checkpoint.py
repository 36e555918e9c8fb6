"""Tests for groupvit_core.checkpoint: reference-written files, round trips, hostile and broken input.

Golden files come from tools/make_checkpoint_fixtures.py (transformers 4.57.6 / torch / tf-keras); that tool
also checks that transformers loads the files our writers produce.
"""

import os
import pickle
import struct
import subprocess
import sys
import zipfile

import h5py
import numpy as np
import pytest

from groupvit_core import checkpoint as ck

GOLDEN = os.path.join(os.path.dirname(os.path.dirname(__file__)), "golden", "ckpt_tiny")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def golden(name):
    path = os.path.join(GOLDEN, name)
    assert os.path.isfile(path), f"missing golden file {path}; run tools/make_checkpoint_fixtures.py"
    return path


def expected(name):
    with np.load(golden(name)) as data:
        return {k: data[k] for k in data.files}


def assert_bit_identical(actual, wanted):
    assert list(actual) == list(wanted) or set(actual) == set(wanted), sorted(set(actual) ^ set(wanted))
    for key, value in wanted.items():
        got = actual[key]
        assert isinstance(got, np.ndarray), key
        assert (got.dtype, got.shape) == (value.dtype, value.shape), (key, got.dtype, got.shape)
        assert np.ascontiguousarray(got).tobytes() == np.ascontiguousarray(value).tobytes(), key


def sample_tensors():
    rng = np.random.default_rng(0)
    return {
        "text_model.embeddings.token_embedding.weight": rng.standard_normal((7, 5)).astype(np.float32),
        "vision_model.encoder.stages.1.group_token": rng.standard_normal((1, 3, 5)).astype(np.float32),
        "f16": rng.standard_normal(4).astype(np.float16),
        "f64_big_endian": rng.standard_normal(3).astype(">f8"),
        "transposed_input": rng.standard_normal((4, 6)).astype(np.float32).T,
        "num_batches_tracked": np.array(123, dtype=np.int64),
        "i32": np.arange(-3, 3, dtype=np.int32),
        "u8": np.array([0, 255], dtype=np.uint8),
        "flags": np.array([True, False]),
        "empty": np.zeros((0, 3), np.float32),
        "specials": np.array([np.nan, np.inf, -np.inf, -0.0, 1e-45], np.float32),
    }


def listing(directory):
    return sorted(os.listdir(directory))


# ---------------------------------------------------------------------------------------- reference files


def test_reads_reference_safetensors_bit_identically():
    assert_bit_identical(ck.read_safetensors(golden("model.safetensors")), expected("expected_pt.npz"))


def test_reads_reference_pytorch_model_bin_bit_identically():
    state = ck.read_torch_bin(golden("pytorch_model.bin"))
    wanted = expected("expected_pt.npz")
    assert list(state) == list(wanted)
    assert_bit_identical(state, wanted)


def test_reads_reference_tf_model_h5_bit_identically():
    state = ck.read_h5(golden("tf_model.h5"))
    assert_bit_identical(state, expected("expected_h5.npz"))
    for key in ("logit_scale", "text_model/embeddings/token_embedding/weight",
                "visual_projection.1/moving_mean", "vision_model/encoder/stages_._1/group_token"):
        assert key in state
    assert state["logit_scale"].shape == (1,)


def test_reads_every_dtype_and_view_from_reference_files():
    wanted = expected("expected_dtypes.npz")
    from_bin = ck.read_torch_bin(golden("dtypes.bin"))
    assert_bit_identical(from_bin, wanted)
    assert from_bin["bf16"].dtype == np.float32  # bfloat16 widened
    assert from_bin["transposed"].flags.c_contiguous
    assert_bit_identical(ck.read_safetensors(golden("dtypes.safetensors")), wanted)


def test_nvlabs_checkpoint_gives_model_tensors_and_inert_placeholders():
    assert_bit_identical(ck.read_torch_bin(golden("nvlabs_like.pth")), expected("expected_nvlabs.npz"))
    whole = ck.read_torch_pickle(golden("nvlabs_like.pth"))
    assert whole["epoch"] == 29
    config = whole["config"]
    assert isinstance(config, ck.UnresolvedGlobal) and config.qualname == "argparse.Namespace"
    assert config.state["model"] == "GroupViT" and config.state["depths"] == [6, 3, 3]
    assert whole["max_metrics"].qualname == "collections.defaultdict"
    assert whole["max_metrics"].items == {"acc1": 52.3}
    lr = whole["optimizer"]["param_groups"][0]["lr"]
    assert isinstance(lr, ck.UnresolvedGlobal) and lr.qualname.startswith("numpy")
    assert isinstance(whole["optimizer"]["state"][0]["exp_avg"], np.ndarray)


def test_legacy_torch_file_is_refused_clearly():
    with pytest.raises(OSError, match="legacy.*not supported"):
        ck.read_torch_bin(golden("legacy.bin"))


def test_bfloat16_writing_rounds_like_torch(tmp_path):
    rounding = expected("bf16_rounding.npz")
    values, torch_bits = rounding["float32"], rounding["bfloat16_bits"]
    torch_widened = (torch_bits.astype(np.uint32) << 16).view(np.float32)
    nan = np.isnan(torch_widened)
    for writer, reader, name in ((ck.write_safetensors, ck.read_safetensors, "a.safetensors"),
                                 (ck.write_torch_bin, ck.read_torch_bin, "a.bin")):
        path = tmp_path / name
        writer(path, {"v": values, "count": np.array(3)}, dtype="bfloat16")
        back = reader(path)
        assert back["count"].dtype == np.int64
        assert back["v"].dtype == np.float32
        assert np.array_equal(np.isnan(back["v"]), nan)
        assert back["v"][~nan].tobytes() == torch_widened[~nan].tobytes()


# ---------------------------------------------------------------------------------------- round trips


def canonical(tensors):
    return {k: v.astype(v.dtype.newbyteorder("<"), order="C") for k, v in tensors.items()}


def test_safetensors_round_trip_and_library_compatibility(tmp_path):
    from safetensors import safe_open
    from safetensors.numpy import load_file

    tensors = sample_tensors()
    path = tmp_path / "model.safetensors"
    ck.write_safetensors(path, tensors)
    assert_bit_identical(ck.read_safetensors(path), canonical(tensors))
    assert_bit_identical(load_file(str(path)), canonical(tensors))
    with safe_open(str(path), "np") as handle:
        assert handle.metadata() == {"format": "pt"}


def test_h5_round_trip(tmp_path):
    tensors = {k.replace(".", "/"): v for k, v in sample_tensors().items()}
    tensors["visual_projection.1/moving_mean"] = np.arange(3, dtype=np.float32)
    tensors["scalar"] = np.array(2.5, np.float32)
    path = tmp_path / "tf_model.h5"
    ck.write_h5(path, tensors)
    assert_bit_identical(ck.read_h5(path), canonical(tensors))


def test_h5_written_with_reference_layout(tmp_path):
    path = tmp_path / "tf_model.h5"
    ck.write_h5(path, ck.read_h5(golden("tf_model.h5")))

    def describe(file_name):
        items = {}
        with h5py.File(file_name, "r") as handle:
            for group in [handle] + [handle[k] for k in handle]:
                for key in group.attrs:
                    kind = group.attrs.get_id(key).get_type()
                    vlen = kind.is_variable_str() if isinstance(kind, h5py.h5t.TypeStringID) else None
                    items[f"{group.name}@{key}"] = (kind.get_class(), vlen, repr(group.attrs[key]))

            def visit(name, obj):
                if isinstance(obj, h5py.Dataset):
                    items[name] = (obj.shape, obj.dtype.str, obj.id.get_create_plist().get_layout(), obj.compression)

            handle.visititems(visit)
        return items

    assert describe(str(path)) == describe(golden("tf_model.h5"))


def test_torch_bin_round_trip_and_torch_load(tmp_path):
    tensors = sample_tensors()
    path = tmp_path / "pytorch_model.bin"
    ck.write_torch_bin(path, tensors)
    assert_bit_identical(ck.read_torch_bin(path), canonical(tensors))
    try:
        import torch
    except ImportError:
        return  # only this assertion needs torch
    loaded = torch.load(str(path), weights_only=True)
    assert list(loaded) == list(tensors)
    for key, value in canonical(tensors).items():
        assert loaded[key].numpy().tobytes() == value.tobytes() and tuple(loaded[key].shape) == value.shape, key


def test_reference_files_survive_rewrite_in_every_format(tmp_path):
    pt = ck.read_torch_bin(golden("pytorch_model.bin"))
    for writer, reader, name in ((ck.write_safetensors, ck.read_safetensors, "m.safetensors"),
                                 (ck.write_torch_bin, ck.read_torch_bin, "m.bin")):
        writer(tmp_path / name, pt)
        assert_bit_identical(reader(tmp_path / name), pt)
    h5 = ck.read_h5(golden("tf_model.h5"))
    ck.write_h5(tmp_path / "m.h5", h5)
    assert_bit_identical(ck.read_h5(tmp_path / "m.h5"), h5)


def test_large_weight_name_lists_are_chunked_like_keras(tmp_path):
    # Keras splits a string-list attribute above 64512 bytes into weight_names0, weight_names1, ...
    tensors = {f"vision_model/encoder/stages_._0/layers_._{i}/long/name/{'x' * 120}": np.full(1, i, np.float32)
               for i in range(450)}
    path = tmp_path / "tf_model.h5"
    ck.write_h5(path, tensors)
    with h5py.File(path, "r") as handle:
        assert "weight_names" not in handle["groupvit"].attrs and "weight_names1" in handle["groupvit"].attrs
    assert_bit_identical(ck.read_h5(path), tensors)


def test_h5_weight_names_as_fixed_length_bytes_or_str(tmp_path):
    path = tmp_path / "w.h5"
    with h5py.File(path, "w") as handle:
        handle.attrs["layer_names"] = np.array([b"groupvit"])  # fixed-length bytes
        group = handle.create_group("groupvit")
        group.attrs["weight_names"] = ["m/groupvit/a/kernel:0", "m/groupvit/b:0"]  # vlen str
        group["m/groupvit/a/kernel:0"] = np.ones((2, 2), np.float32)
        group["m/groupvit/b:0"] = np.zeros(3, np.float32)
        handle.create_group("top_level_model_weights").attrs["weight_names"] = np.zeros((0,))
    state = ck.read_h5(path)
    assert list(state) == ["a/kernel", "b"]


# ---------------------------------------------------------------------------------------- hostile pickles


def _torch_zip(path, data_pkl, records=None):
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", data_pkl)
        archive.writestr("archive/byteorder", "little")
        for name, data in (records or {}).items():
            archive.writestr(f"archive/data/{name}", data)
        archive.writestr("archive/version", "3\n")


class _Evil:
    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


@pytest.mark.parametrize("make", [
    lambda f: _Evil(os.system, f"touch {f}"),
    lambda f: _Evil(eval, f"open({f!r}, 'w').close()"),
    lambda f: _Evil(exec, f"open({f!r}, 'w').close()"),
    lambda f: _Evil(subprocess.call, ["touch", f]),
    lambda f: {"w": _Evil(os.system, f"touch {f}")},
])
def test_malicious_pickle_is_neutralised(tmp_path, make):
    marker = str(tmp_path / "pwned")
    path = tmp_path / "evil.bin"
    _torch_zip(path, pickle.dumps(make(marker), protocol=2))
    try:
        loaded = ck.read_torch_pickle(path)
    except ValueError:
        loaded = None
    assert not os.path.exists(marker)
    if loaded is not None:
        evil = loaded["w"] if isinstance(loaded, dict) else loaded
        assert isinstance(evil, ck.UnresolvedGlobal)
    with pytest.raises(ValueError, match="evil.bin"):
        ck.read_torch_bin(path)
    assert not os.path.exists(marker)


# hand-assembled protocol-2 data.pkl: {'w': _rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict())}
def _pickle_int(value):
    data = value.to_bytes(value.bit_length() // 8 + 1, "little", signed=True)
    return pickle.LONG1 + bytes([len(data)]) + data


def _pickle_str(text):
    data = text.encode()
    return pickle.BINUNICODE + struct.pack("<I", len(data)) + data


def _pickle_tuple(values):
    return pickle.MARK + b"".join(_pickle_int(v) for v in values) + pickle.TUPLE


def _tensor_pickle(numel, offset, size, stride, storage="FloatStorage", key="0"):
    return (pickle.PROTO + b"\x02" + pickle.EMPTY_DICT + _pickle_str("w")
            + b"ctorch._utils\n_rebuild_tensor_v2\n" + pickle.MARK
            + pickle.MARK + _pickle_str("storage") + f"ctorch\n{storage}\n".encode() + _pickle_str(key)
            + _pickle_str("cpu") + _pickle_int(numel) + pickle.TUPLE + pickle.BINPERSID
            + _pickle_int(offset) + _pickle_tuple(size) + _pickle_tuple(stride) + pickle.NEWFALSE
            + b"ccollections\nOrderedDict\n" + pickle.EMPTY_TUPLE + pickle.REDUCE + pickle.TUPLE + pickle.REDUCE
            + pickle.SETITEM + pickle.STOP)


def test_hand_assembled_tensor_pickle_reads(tmp_path):
    path = tmp_path / "ok.bin"
    data = np.arange(12, dtype=np.float32)
    _torch_zip(path, _tensor_pickle(12, 2, (2, 3), (1, 2)), {"0": data.tobytes()})
    np.testing.assert_array_equal(ck.read_torch_bin(path)["w"], np.lib.stride_tricks.as_strided(
        data[2:], (2, 3), (4, 8)))


@pytest.mark.parametrize("numel,offset,size,stride,records,match", [
    (2**40, 0, (2**40,), (1,), {"0": b"\0" * 48}, "but the record has 48"),  # huge claim, no allocation
    (12, 0, (4, 4), (4, 1), {"0": b"\0" * 48}, "reads element"),  # view past the end of the storage
    (12, 11, (2,), (1,), {"0": b"\0" * 48}, "reads element"),
    (12, 0, (3,), (1,), {}, "missing"),
    (13, 0, (3,), (1,), {"0": b"\0" * 48}, "should hold 13"),
    (1, 0, (2**40,), (0,), {"0": b"\0" * 4}, "refusing to materialise"),  # expanded far beyond its storage
])
def test_inconsistent_tensor_records_are_rejected(tmp_path, numel, offset, size, stride, records, match):
    path = tmp_path / "bad.bin"
    _torch_zip(path, _tensor_pickle(numel, offset, size, stride), records)
    with pytest.raises(ValueError, match=match):
        ck.read_torch_bin(path)


def test_unknown_storage_type_is_not_loaded(tmp_path):
    path = tmp_path / "bad.bin"
    _torch_zip(path, _tensor_pickle(3, 0, (3,), (1,), storage="_load_from_bytes"), {"0": b"\0" * 12})
    with pytest.raises(ValueError, match="bad.bin"):
        ck.read_torch_bin(path)


# ---------------------------------------------------------------------------------------- broken files


def _truncations(data):
    return [0, 4, 8, len(data) // 3, len(data) // 2, len(data) - 100, len(data) - 1]


@pytest.mark.parametrize("source,reader", [
    ("model.safetensors", ck.read_safetensors),
    ("pytorch_model.bin", ck.read_torch_bin),
    ("tf_model.h5", ck.read_h5),
])
def test_truncated_files_raise_naming_the_file(tmp_path, source, reader):
    data = open(golden(source), "rb").read()
    for cut in _truncations(data):
        path = tmp_path / f"cut{cut}_{source}"
        path.write_bytes(data[:cut])
        with pytest.raises((OSError, ValueError), match=str(path.name)):
            reader(path)


@pytest.mark.parametrize("reader", [ck.read_safetensors, ck.read_torch_bin, ck.read_h5, ck.load_state])
def test_missing_file_raises_oserror(tmp_path, reader):
    with pytest.raises(OSError, match="nothing_here"):
        reader(tmp_path / "nothing_here")


def _safetensors_bytes(header, data):
    encoded = __import__("json").dumps(header).encode()
    return struct.pack("<Q", len(encoded)) + encoded + data


@pytest.mark.parametrize("content,error,match", [
    (struct.pack("<Q", 2**60) + b"{}", OSError, "header claims"),
    (_safetensors_bytes({"a": {"dtype": "F32", "shape": [10**12], "data_offsets": [0, 8]}}, b"\0" * 8),
     ValueError, "needs"),
    (_safetensors_bytes({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 10**12]}}, b"\0" * 8),
     OSError, "data section"),
    (_safetensors_bytes({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                         "b": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4),
     ValueError, "overlap"),
    (struct.pack("<Q", 46) + b'{"a":{"dtype":"F32","shape":[],"data_offsets":[0,4]},"a":1}'[:46] + b"\0" * 4,
     ValueError, "corrupt|duplicate"),
    (_safetensors_bytes({"a": {"dtype": "XX", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4),
     ValueError, "unsupported dtype"),
    (struct.pack("<Q", 5) + b"{nope" + b"\0" * 4, ValueError, "corrupt"),
])
def test_corrupt_safetensors_headers(tmp_path, content, error, match):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(error, match=match):
        ck.read_safetensors(path)


def test_duplicate_safetensors_keys(tmp_path):
    header = (b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
              b'"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}')
    path = tmp_path / "dup.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 8)
    with pytest.raises(ValueError, match="duplicate key 'a'"):
        ck.read_safetensors(path)


def test_h5_without_layer_names_or_not_h5(tmp_path):
    plain = tmp_path / "plain.h5"
    with h5py.File(plain, "w") as handle:
        handle["x"] = np.zeros(3)
    with pytest.raises(OSError, match="plain.h5.*layer_names"):
        ck.read_h5(plain)
    text = tmp_path / "text.h5"
    text.write_text("not hdf5")
    with pytest.raises(OSError, match="text.h5.*not an HDF5"):
        ck.read_h5(text)


def write_duplicate_key_h5(path):
    """A Keras h5 whose two weights both map to the key 'w' once their scopes are stripped."""
    with h5py.File(path, "w") as handle:
        handle.attrs["layer_names"] = [b"groupvit"]
        group = handle.create_group("groupvit")
        group.attrs["weight_names"] = [b"a/groupvit/w:0", b"b/groupvit/w:0"]
        group["a/groupvit/w:0"] = np.zeros(1, np.float32)
        group["b/groupvit/w:0"] = np.zeros(1, np.float32)


def test_h5_duplicate_keys_after_stripping(tmp_path):
    path = tmp_path / "dup.h5"
    write_duplicate_key_h5(path)
    with pytest.raises(ValueError, match="duplicate weight 'w'"):
        ck.read_h5(path)


def test_h5_dataset_claiming_more_than_the_file_holds(tmp_path):
    path = tmp_path / "huge.h5"
    with h5py.File(path, "w") as handle:
        handle.attrs["layer_names"] = [b"groupvit"]
        group = handle.create_group("groupvit")
        group.attrs["weight_names"] = [b"m/groupvit/w:0"]
        group.create_dataset("m/groupvit/w:0", shape=(2**20, 2**20), dtype=np.float32)  # never written
    with pytest.raises(OSError, match="not fully stored"):
        ck.read_h5(path)


def test_non_zip_non_pickle_bin(tmp_path):
    path = tmp_path / "junk.bin"
    path.write_bytes(b"hello world" * 10)
    with pytest.raises(OSError, match="junk.bin"):
        ck.read_torch_bin(path)


# ---------------------------------------------------------------------------------------- atomic writes


def test_atomic_write_keeps_old_file_when_writer_raises(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"old")

    def writer(tmp):
        with open(tmp, "wb") as handle:
            handle.write(b"partial")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        ck.atomic_write(path, writer)
    assert path.read_bytes() == b"old" and listing(tmp_path) == ["model.safetensors"]


@pytest.mark.parametrize("fmt", ["safetensors", "h5", "bin"])
def test_format_writers_fail_midway_without_damage(tmp_path, monkeypatch, fmt):
    path = tmp_path / f"model.{fmt}"
    path.write_bytes(b"old")
    calls = []

    def fail_on_second(original):
        def wrapper(*args, **kwargs):
            calls.append(1)
            if len(calls) == 2:
                raise RuntimeError("disk full")
            return original(*args, **kwargs)
        return wrapper

    if fmt == "bin":
        monkeypatch.setattr(ck, "_write_aligned_record", fail_on_second(ck._write_aligned_record))
        write = ck.write_torch_bin
    elif fmt == "h5":
        monkeypatch.setattr(h5py.Group, "create_dataset", fail_on_second(h5py.Group.create_dataset))
        write = ck.write_h5
    else:
        import safetensors.numpy

        def partial_save(tensors, filename, metadata=None):
            open(filename, "wb").write(b"12345678")
            raise RuntimeError("disk full")

        monkeypatch.setattr(safetensors.numpy, "save_file", partial_save)
        write = ck.write_safetensors
    with pytest.raises(RuntimeError, match="disk full"):
        write(path, {"a": np.ones(3, np.float32), "b": np.zeros(2, np.float32)})
    assert path.read_bytes() == b"old" and listing(tmp_path) == [path.name]


def test_writers_reject_bad_input_before_touching_disk(tmp_path):
    path = tmp_path / "x.bin"
    for writer in (ck.write_torch_bin, ck.write_safetensors, ck.write_h5):
        with pytest.raises(TypeError):
            writer(path, {"a": np.array(["text"])})
        with pytest.raises(TypeError):
            writer(path, [np.ones(2)])
    with pytest.raises(ValueError):
        ck.write_torch_bin(path, {"a": np.ones(2)}, dtype="int8")
    assert listing(tmp_path) == []


# ---------------------------------------------------------------------------------------- load_state


def test_load_state_prefers_safetensors_then_bin_then_h5(tmp_path):
    tensors = {"a": np.arange(3, dtype=np.float32)}
    ck.write_h5(tmp_path / "tf_model.h5", {"x": np.ones(2, np.float32)})
    assert ck.load_state(tmp_path)[1] == "h5"
    ck.write_torch_bin(tmp_path / "pytorch_model.bin", tensors)
    assert ck.load_state(tmp_path)[1] == "bin"
    ck.write_safetensors(tmp_path / "model.safetensors", tensors)
    state, fmt = ck.load_state(tmp_path)
    assert fmt == "safetensors"
    assert_bit_identical(state, tensors)
    assert ck.load_state(golden("nvlabs_like.pth"))[1] == "bin"
    assert ck.load_state(golden("tf_model.h5"))[1] == "h5"


def test_load_state_empty_directory_lists_what_it_looked_for(tmp_path):
    with pytest.raises(OSError, match="model.safetensors.*pytorch_model.bin.*tf_model.h5"):
        ck.load_state(tmp_path)


def test_load_state_sharded_safetensors(tmp_path):
    import json

    ck.write_safetensors(tmp_path / "model-00001-of-00002.safetensors", {"a": np.ones(2, np.float32)})
    ck.write_safetensors(tmp_path / "model-00002-of-00002.safetensors", {"b": np.zeros(3, np.int64)})
    index = {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors",
                                            "b": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    state, fmt = ck.load_state(tmp_path)
    assert fmt == "safetensors" and sorted(state) == ["a", "b"]
    index["weight_map"]["c"] = "model-00002-of-00002.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="missing from the shards"):
        ck.load_state(tmp_path)
    index["weight_map"]["b"] = "../elsewhere.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="same directory"):
        ck.load_state(tmp_path)


# ---------------------------------------------------------------------------------------- isolation


def test_import_and_use_leave_frameworks_unimported():
    code = (
        "import sys\n"
        "from groupvit_core import checkpoint as ck\n"
        f"ck.load_state({GOLDEN!r}); ck.read_h5({golden('tf_model.h5')!r})\n"
        f"ck.read_torch_bin({golden('pytorch_model.bin')!r}); ck.read_safetensors({golden('dtypes.safetensors')!r})\n"
        "bad = [m for m in ('torch', 'tensorflow', 'keras', 'tf_keras', 'jax') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
