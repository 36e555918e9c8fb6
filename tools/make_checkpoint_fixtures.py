"""Write the golden files for groupvit_core.checkpoint under tests/golden/ckpt_tiny/ from the reference.

Run with the reference environment (transformers 4.57.6, torch, tf-keras):

    /work/refvenv/bin/python tools/make_checkpoint_fixtures.py

Every checkpoint here is written by the reference libraries (transformers ``save_pretrained``, ``torch.save``,
``safetensors.torch``), and every expected array is taken from the in-memory reference model or tensors, never
from groupvit_core.  Files written:

* ``config.json``, ``model.safetensors``, ``pytorch_model.bin``: a tiny perturbed ``GroupViTModel``
  (``save_pretrained`` with and without safe serialization); ``expected_pt.npz`` is its ``state_dict``.
* ``tf_model.h5``: ``TFGroupViTModel.from_pretrained(..., from_pt=True).save_pretrained``; ``expected_h5.npz``
  maps the model's variable names (scope, ``groupvit/`` and ``:0`` stripped) to their values.
* ``dtypes.bin`` / ``dtypes.safetensors`` + ``expected_dtypes.npz``: every storage dtype, transposed and
  offset views, shared storage, 0-d, empty and expanded (stride 0) tensors; bfloat16 expected as float32.
* ``bf16_rounding.npz``: float32 values (ties, NaN, inf, subnormals, overflow) and torch's bfloat16 bits.
* ``nvlabs_like.pth`` + ``expected_nvlabs.npz``: ``{'model', 'optimizer', 'config', ...}`` as NVlabs saves,
  with argparse.Namespace, numpy scalars and defaultdict that the reader must not import.
* ``legacy.bin``: a pre-1.6 (non-zip) torch file, which the reader must refuse.

Afterwards the tool checks groupvit_core's writers against the reference readers: transformers loads our
``tf_model.h5`` (TF), ``pytorch_model.bin`` and ``model.safetensors`` (PT) bit-identically, our h5 has the
reference file's attribute and dataset layout, ``torch.load(weights_only=True)`` reads our bin, and our
bfloat16 rounding matches torch.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import sys
import tempfile

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import h5py  # noqa: E402
import numpy as np  # noqa: E402
import safetensors.torch  # noqa: E402
import torch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
OUT = os.path.join(ROOT, "tests", "golden", "ckpt_tiny")
SEED = 20240611


def tiny_config():
    from transformers import GroupViTConfig

    text = dict(hidden_size=12, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=16, vocab_size=49)
    vision = dict(hidden_size=16, intermediate_size=37, depths=[1, 1, 1], num_hidden_layers=3,
                  num_group_tokens=[8, 4, 0], num_output_groups=[8, 4, 4], num_attention_heads=2,
                  image_size=16, patch_size=4)
    return GroupViTConfig(text_config=text, vision_config=vision, projection_dim=8, projection_intermediate_dim=24)


def strip_tf_name(name: str) -> str:
    """'tf_group_vi_t_model/groupvit/a/b:0' -> 'a/b' (the key convention of read_h5)."""
    assert name.endswith(":0"), name
    parts = name[:-2].split("/")
    return "/".join(parts[parts.index("groupvit") + 1 :])


def perturbed_pt_model(cfg):
    from transformers import GroupViTModel

    torch.manual_seed(SEED)
    model = GroupViTModel(cfg).eval()
    rng = np.random.default_rng(SEED)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.dtype.is_floating_point:
                noise = torch.from_numpy(rng.standard_normal(tuple(tensor.shape)).astype(np.float32))
                value = tensor + 0.1 * noise
                if name.endswith("running_var"):
                    value = value.abs() + 0.5
                tensor.copy_(value)
            else:
                tensor.fill_(int(rng.integers(1, 1000)))
    return model


def save_pt(model, directory):
    model.save_pretrained(directory, safe_serialization=True)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, safe_serialization=False)
        shutil.copy(os.path.join(tmp, "pytorch_model.bin"), directory)
    expected = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    np.savez_compressed(os.path.join(directory, "expected_pt.npz"), **expected)
    return expected


def save_tf(directory, expected_pt):
    from transformers import TFGroupViTModel

    tf_model, info = TFGroupViTModel.from_pretrained(directory, from_pt=True, output_loading_info=True)
    assert not info["missing_keys"], info
    expected = {strip_tf_name(w.name): w.numpy() for w in tf_model.weights}
    assert len(expected) == len(tf_model.weights)
    # The PT->TF load must carry the BatchNorm statistics too, or the h5 would hold init values.
    for side in ("text", "visual"):
        np.testing.assert_array_equal(expected[f"{side}_projection.1/moving_mean"],
                                      expected_pt[f"{side}_projection.1.running_mean"])
        np.testing.assert_array_equal(expected[f"{side}_projection.1/moving_variance"],
                                      expected_pt[f"{side}_projection.1.running_var"])
    with tempfile.TemporaryDirectory() as tmp:
        tf_model.save_pretrained(tmp)
        shutil.copy(os.path.join(tmp, "tf_model.h5"), directory)
    np.savez_compressed(os.path.join(directory, "expected_h5.npz"), **expected)
    return tf_model, expected


def dtype_tensors():
    gen = torch.Generator().manual_seed(SEED)
    base = torch.randn(4, 3, generator=gen)
    tensors = collections.OrderedDict(
        f32=torch.randn(3, 4, generator=gen),
        f16=torch.randn(5, generator=gen).half(),
        bf16=torch.randn(2, 3, generator=gen).bfloat16(),
        bf16_special=torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e-40, -3.0e38]).bfloat16(),
        f64=torch.randn(3, generator=gen).double(),
        i64=torch.arange(-3, 4),
        i32=torch.arange(6, dtype=torch.int32).reshape(2, 3) * -7,
        i16=torch.tensor([-32768, 0, 32767], dtype=torch.int16),
        i8=torch.tensor([-128, 5, 127], dtype=torch.int8),
        u8=torch.tensor([0, 200, 255], dtype=torch.uint8),
        boolean=torch.tensor([True, False, True]),
        transposed=torch.randn(3, 5, generator=gen).t(),
        offset_view=torch.arange(20.0)[5:11].reshape(2, 3),
        shared_a=base,
        shared_b=base[1:3, ::2],
        scalar=torch.tensor(2.5),
        empty=torch.zeros(0, 3),
        expanded=torch.randn(3, 1, generator=gen).expand(3, 4),
        parameter=torch.nn.Parameter(torch.randn(2, generator=gen)),
    )
    expected = {k: (v.detach().float() if v.dtype == torch.bfloat16 else v.detach()).numpy().copy()
                for k, v in tensors.items()}
    return tensors, expected


def bf16_rounding():
    special = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, -np.nan, 1e-40, -1e-45, 3.4e38, -3.4e38,
                        1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8, 1.0 + 2.0**-8 + 2.0**-20, 65504.0, 1.0 / 3.0], np.float32)
    bits = np.array([0x3F808000, 0x3F818000, 0x7F800001, 0xFF800001, 0x7FFFFFFF, 0x7F7FFFFF, 0x00008000],
                    np.uint32).view(np.float32)
    rng = np.random.default_rng(SEED)
    scaled = rng.standard_normal(64) * 10.0 ** rng.integers(-30, 30, 64)
    with np.errstate(over="ignore"):  # a few overflow to +-inf on purpose
        values = np.concatenate([special, bits, scaled.astype(np.float32)])
    torch_bits = torch.from_numpy(values).bfloat16().view(torch.int16).numpy().view(np.uint16)
    return values, torch_bits


def nvlabs_like(tensors):
    model = collections.OrderedDict((f"module.{k}", torch.from_numpy(v.copy())) for k, v in tensors.items())
    first = next(iter(model.values()))
    return {
        "model": model,
        "optimizer": {
            "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.ones_like(first)}},
            "param_groups": [{"lr": np.float64(1e-3), "betas": (0.9, 0.999), "params": [0]}],
        },
        "lr_scheduler": {"t_initial": np.int64(30)},
        "config": argparse.Namespace(model="GroupViT", depths=[6, 3, 3], eps=np.float32(1.0)),
        "max_metrics": collections.defaultdict(float, {"acc1": 52.3}),
        "epoch": 29,
    }


def check_h5_layout(ours: str, reference: str) -> None:
    """Our write_h5 must reproduce the reference file's attributes, types and dataset layout."""

    def describe(path):
        items = {}

        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                plist = obj.id.get_create_plist()
                items[name] = ("dataset", obj.shape, obj.dtype.str, plist.get_layout(), obj.compression, obj.fillvalue)

        with h5py.File(path, "r") as handle:
            for group in [handle] + [handle[k] for k in handle]:
                for key in group.attrs:
                    attr = group.attrs.get_id(key)
                    kind = attr.get_type()
                    vlen = kind.is_variable_str() if isinstance(kind, h5py.h5t.TypeStringID) else None
                    items[f"{group.name}@{key}"] = (kind.get_class(), vlen, attr.shape, repr(group.attrs[key]))
            handle.visititems(visit)
        return items

    a, b = describe(ours), describe(reference)
    assert a == b, {k: (a.get(k), b.get(k)) for k in set(a) | set(b) if a.get(k) != b.get(k)}


def assert_same_bfloat16(tensor, expected_bits):
    """Equal bits, except that any NaN matches any NaN (torch's vectorised cast writes 0xFFFF, c10's 0x7FC0)."""
    bits = tensor.view(torch.int16).numpy().view(np.uint16)
    nan = (expected_bits & 0x7F80 == 0x7F80) & (expected_bits & 0x007F != 0)
    assert np.array_equal(bits & 0x7F80 == 0x7F80, expected_bits & 0x7F80 == 0x7F80)
    assert np.all((bits[nan] & 0x7F80 == 0x7F80) & (bits[nan] & 0x007F != 0))
    np.testing.assert_array_equal(bits[~nan], expected_bits[~nan])


def verify_writers(pt_expected, h5_expected, cfg_dir, values, torch_bits):
    """Reference readers on groupvit_core-written files."""
    from transformers import GroupViTModel, TFGroupViTModel

    from groupvit_core import checkpoint as ck

    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(os.path.join(cfg_dir, "config.json"), tmp)
        # tf_model.h5 written by us, read by transformers' TF loader
        ck.write_h5(os.path.join(tmp, "tf_model.h5"), ck.read_h5(os.path.join(cfg_dir, "tf_model.h5")))
        check_h5_layout(os.path.join(tmp, "tf_model.h5"), os.path.join(cfg_dir, "tf_model.h5"))
        tf_model, info = TFGroupViTModel.from_pretrained(tmp, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], info
        for w in tf_model.weights:
            np.testing.assert_array_equal(w.numpy(), h5_expected[strip_tf_name(w.name)], err_msg=w.name)
        os.remove(os.path.join(tmp, "tf_model.h5"))

        for writer, file_name, kwargs in ((ck.write_torch_bin, "pytorch_model.bin", {"use_safetensors": False}),
                                          (ck.write_safetensors, "model.safetensors", {"use_safetensors": True})):
            target = os.path.join(tmp, file_name)
            writer(target, pt_expected)
            model, info = GroupViTModel.from_pretrained(tmp, output_loading_info=True, **kwargs)
            assert not any(info.values()), info
            state = model.state_dict()
            assert set(state) == set(pt_expected)
            for key, value in state.items():
                np.testing.assert_array_equal(value.numpy(), pt_expected[key], err_msg=key)
            if file_name.endswith(".bin"):
                loaded = torch.load(target, weights_only=True)
                assert list(loaded) == list(pt_expected)
            os.remove(target)

        # bfloat16 writers against torch's rounding
        ck.write_torch_bin(os.path.join(tmp, "bf16.bin"), {"v": values, "n": np.array(7)}, dtype="bfloat16")
        loaded = torch.load(os.path.join(tmp, "bf16.bin"), weights_only=True)
        assert loaded["v"].dtype == torch.bfloat16 and loaded["n"].dtype == torch.int64
        assert_same_bfloat16(loaded["v"], torch_bits)
        ck.write_safetensors(os.path.join(tmp, "bf16.safetensors"), {"v": values, "n": np.array(7)}, dtype="bfloat16")
        loaded = safetensors.torch.load_file(os.path.join(tmp, "bf16.safetensors"))
        assert loaded["v"].dtype == torch.bfloat16 and loaded["n"].dtype == torch.int64
        assert_same_bfloat16(loaded["v"], torch_bits)


def main() -> None:
    os.makedirs(OUT, exist_ok=True)
    for name in os.listdir(OUT):
        os.remove(os.path.join(OUT, name))
    cfg = tiny_config()
    pt_model = perturbed_pt_model(cfg)
    pt_expected = save_pt(pt_model, OUT)
    _, h5_expected = save_tf(OUT, pt_expected)

    tensors, dtype_expected = dtype_tensors()
    torch.save(tensors, os.path.join(OUT, "dtypes.bin"))
    contiguous = {k: v.detach().contiguous().clone() for k, v in tensors.items()}
    safetensors.torch.save_file(contiguous, os.path.join(OUT, "dtypes.safetensors"), metadata={"format": "pt"})
    np.savez_compressed(os.path.join(OUT, "expected_dtypes.npz"), **dtype_expected)

    values, torch_bits = bf16_rounding()
    np.savez_compressed(os.path.join(OUT, "bf16_rounding.npz"), float32=values, bfloat16_bits=torch_bits)

    small = {k: v for k, v in pt_expected.items() if k.startswith("text_projection")}
    torch.save(nvlabs_like(small), os.path.join(OUT, "nvlabs_like.pth"))
    np.savez_compressed(os.path.join(OUT, "expected_nvlabs.npz"), **{f"module.{k}": v for k, v in small.items()})

    torch.save({"w": torch.arange(6.0).reshape(2, 3)}, os.path.join(OUT, "legacy.bin"),
               _use_new_zipfile_serialization=False)

    verify_writers(pt_expected, h5_expected, OUT, values, torch_bits)
    with open(os.path.join(OUT, "config.json")) as handle:
        json.load(handle)
    total = sum(os.path.getsize(os.path.join(OUT, n)) for n in os.listdir(OUT))
    print(f"wrote {len(os.listdir(OUT))} files, {total} bytes, to {OUT}; reference checks passed")
    assert total < 1_000_000, total


if __name__ == "__main__":
    main()
