"""Write the golden reference outputs tests/golden/model_<name>.npz (+ model_<name>.json) from transformers.

Maintainer script, run with the reference environment (transformers 4.57.6, torch):

    /work/refvenv/bin/python tools/make_model_golden.py [--only NAME ...] [--out-dir tests/golden]

For each named config of groupvit_core.testing.GOLDEN_CONFIGS it builds the reference ``transformers.GroupViTModel``
from our config's ``to_dict()`` (after checking that transformers reads every field back with the same value),
loads ``random_weights(config, seed=0)`` strictly, puts it in eval mode and records, on the inputs of
``random_inputs``:

* inputs: ``input_ids``, ``attention_mask`` (int64), ``pixel_values`` (float32);
* joint outputs: ``logits_per_image``, ``logits_per_text``, ``text_embeds``, ``image_embeds``,
  ``segmentation_logits`` and, where image and text batches are equal, ``loss`` (eval mode, no Gumbel noise);
  ``loss_square`` (+ ``loss_square_size`` k) is the loss on the first k images and the first k texts when the main
  batches differ (k = min of the two, only when k >= 2);
* text tower: ``text_last_hidden_state``, ``text_pooler_output``, ``text_hidden_states`` (stacked:
  num_layers + 1, B, L, C), ``text_attentions`` (stacked: num_layers, B, heads, L, L);
* vision tower: ``vision_last_hidden_state``, ``vision_pooler_output``, ``vision_hidden_states_<i>`` (the
  reference's tuple: each stage's input, then the last stage's output; shapes differ), ``assignment_<i>`` (the
  soft assignment maps, the vision "attentions", one per grouping stage);
* ``text_features`` / ``image_features``: ``get_text_features`` / ``get_image_features`` (unnormalised);
* text batches padded as the joint inputs are not (their first text is never padded): ``padded_*`` with every
  text right-padded, so that past the longest text every key is masked in every row, and ``leftpad_*`` with one
  text left-padded, whose first rows see only masked keys; each with its ``input_ids`` and ``attention_mask`` and
  the text tower's ``text_last_hidden_state``, ``text_pooler_output``, ``text_attentions`` (stacked) and
  ``text_features``;
* for some configs ``interp_*``: the same joint outputs for a differently sized image batch
  (``interp_pixel_values``) with interpolate_pos_encoding=True. The reference cannot reach position interpolation
  from its forward (a known bug), so the script sets the flag on the reference's own embeddings module; everything
  else, segmentation included, is the reference's forward;
* metadata: ``transformers_version``, ``torch_version``, ``config_json``, ``weights_seed``, ``input_seed``,
  ``weights_sha256`` / ``weights_sum`` (groupvit_core.testing.state_checksum, to catch generator drift),
  ``min_assignment_margin`` (smallest top-1 minus top-2 raw assignment score over every token of every map: hard
  assignment is an argmax, so the input seed is chosen to keep near-ties out of the golden data).

The .json next to each file repeats the metadata with every key's shape, for people reading diffs.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

# The reference is PyTorch's: keep transformers from importing TensorFlow (slow, noisy, not needed).
os.environ.setdefault("USE_TF", "0")
os.environ.setdefault("USE_TORCH", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from groupvit_core.io_utils import atomic_path, atomic_write_text  # noqa: E402
from groupvit_core.testing import (  # noqa: E402
    GOLDEN_CONFIGS,
    random_inputs,
    random_weights,
    state_checksum,
    test_config,
    text_special_ids,
)

WEIGHTS_SEED = 0
# Raw assignment scores of the golden data keep at least this gap between the best and second-best group,
# ~1000x the float32 disagreement between implementations, so no test can flip a hard assignment.
MIN_MARGIN = 1e-3
MAX_INPUT_SEEDS = 200

# name -> (batch_images, batch_texts, interpolation image size (H, W) or None)
PLANS: Dict[str, Tuple[int, int, Optional[Tuple[int, int]]]] = {
    "default": (2, 3, None),
    "tiny_odd": (3, 3, (24, 32)),  # non-square, grid 6x8 from a 5x5 table
    "two_stage": (1, 2, (64, 64)),  # square, grid 8x8 from a 6x6 table
    "tiny_act": (2, 2, None),
}
# Keep the default file small: text attentions of 12 layers are cheap at L=16, so they stay.
SIZE_LIMIT_BYTES = 5 * 1024 * 1024


def _np(tensor: Any) -> np.ndarray:
    return tensor.detach().cpu().numpy().copy()


def _compare_configs(ours: Dict[str, Any], theirs: Any, where: str) -> None:
    """Every field of our dict must read back from the transformers config with the same value."""
    for key, value in ours.items():
        if key in ("model_type", "text_config", "vision_config"):
            continue
        if not hasattr(theirs, key):
            raise AssertionError(f"transformers config {where} has no field {key!r}")
        got = getattr(theirs, key)
        norm = (lambda v: list(v) if isinstance(v, tuple) else v)
        if norm(got) != norm(value):
            raise AssertionError(f"transformers read {where}.{key} as {got!r}, ours is {value!r}")


def build_reference(config) -> Tuple[Any, Dict[str, np.ndarray]]:
    import torch
    import transformers

    data = config.to_dict()
    # from_dict mutates its argument (it adds attn_implementation): give it a copy.
    ref_config = transformers.GroupViTConfig.from_dict(json.loads(json.dumps(data)))
    _compare_configs(data, ref_config, "config")
    _compare_configs(data["text_config"], ref_config.text_config, "text_config")
    _compare_configs(data["vision_config"], ref_config.vision_config, "vision_config")
    model = transformers.GroupViTModel(ref_config)
    state = random_weights(config, seed=WEIGHTS_SEED)
    model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in state.items()}, strict=True)
    model.eval()
    return model, state


def _margins(assignments: List[np.ndarray]) -> float:
    """Smallest gap between the two best groups' raw scores, over all tokens of all maps (B, groups, tokens)."""
    smallest = np.inf
    for soft in assignments:
        # softmax over groups: log p1 - log p2 == raw1 - raw2
        logs = np.log(np.maximum(soft.astype(np.float64), 1e-300))
        top2 = np.sort(logs, axis=1)[:, -2:, :]
        smallest = min(smallest, float(np.min(top2[:, 1, :] - top2[:, 0, :])))
    return smallest


def _joint_outputs(model, inputs: Dict[str, np.ndarray], return_loss: bool, prefix: str = "") -> Dict[str, np.ndarray]:
    import torch

    with torch.no_grad():
        out = model(
            input_ids=torch.from_numpy(inputs["input_ids"]),
            attention_mask=torch.from_numpy(inputs["attention_mask"]),
            pixel_values=torch.from_numpy(inputs["pixel_values"]),
            return_loss=return_loss,
            output_attentions=True,
            output_hidden_states=True,
            output_segmentation=True,
            return_dict=True,
        )
    text, vision = out.text_model_output, out.vision_model_output
    result = {
        "logits_per_image": _np(out.logits_per_image),
        "logits_per_text": _np(out.logits_per_text),
        "text_embeds": _np(out.text_embeds),
        "image_embeds": _np(out.image_embeds),
        "segmentation_logits": _np(out.segmentation_logits),
        "text_last_hidden_state": _np(text.last_hidden_state),
        "text_pooler_output": _np(text.pooler_output),
        "text_hidden_states": np.stack([_np(h) for h in text.hidden_states]),
        "text_attentions": np.stack([_np(a) for a in text.attentions]),
        "vision_last_hidden_state": _np(vision.last_hidden_state),
        "vision_pooler_output": _np(vision.pooler_output),
    }
    if return_loss:
        result["loss"] = _np(out.loss).astype(np.float32)
    for i, hidden in enumerate(vision.hidden_states):
        result[f"vision_hidden_states_{i}"] = _np(hidden)
    for i, soft in enumerate(vision.attentions):
        result[f"assignment_{i}"] = _np(soft)
    return {prefix + key: value for key, value in result.items()}


def _padded_texts(config, seed: int) -> Dict[str, Dict[str, np.ndarray]]:
    """{prefix: inputs}: three texts all right-padded (``padded_``), and the same with the first text moved two
    positions right behind padding (``leftpad_``)."""
    text = config.text_config
    width = min(text.max_position_embeddings, 16)
    lengths = [width - 4, width - 6, min(3, width - 4)]
    texts = random_inputs(config, 0, len(lengths), seed=seed, text_lengths=lengths)
    pad = text_special_ids(text)[2]
    ids = np.full((len(lengths), width), pad, dtype=np.int64)
    mask = np.zeros((len(lengths), width), dtype=np.int64)
    ids[:, :texts["input_ids"].shape[1]] = texts["input_ids"]
    mask[:, :texts["attention_mask"].shape[1]] = texts["attention_mask"]
    left_ids, left_mask = ids.copy(), mask.copy()
    left_ids[0] = np.concatenate([np.full(2, pad), ids[0, :-2]])
    left_mask[0] = np.concatenate([np.zeros(2, dtype=np.int64), mask[0, :-2]])
    return {"padded_": {"input_ids": ids, "attention_mask": mask},
            "leftpad_": {"input_ids": left_ids, "attention_mask": left_mask}}


def _text_outputs(model, inputs: Dict[str, np.ndarray], prefix: str) -> Dict[str, np.ndarray]:
    import torch

    ids, mask = torch.from_numpy(inputs["input_ids"]), torch.from_numpy(inputs["attention_mask"])
    with torch.no_grad():
        out = model.text_model(input_ids=ids, attention_mask=mask, output_attentions=True, return_dict=True)
        features = model.get_text_features(input_ids=ids, attention_mask=mask)
    result = dict(inputs)
    result.update({
        "text_last_hidden_state": _np(out.last_hidden_state),
        "text_pooler_output": _np(out.pooler_output),
        "text_attentions": np.stack([_np(a) for a in out.attentions]),
        "text_features": _np(features),
    })
    return {prefix + key: value for key, value in result.items()}


def _assignments(outputs: Dict[str, np.ndarray], prefix: str = "") -> List[np.ndarray]:
    count = sum(1 for key in outputs if key.startswith(prefix + "assignment_"))
    return [outputs[f"{prefix}assignment_{i}"] for i in range(count)]


def _check_finite(name: str, outputs: Dict[str, np.ndarray]) -> None:
    for key, value in outputs.items():
        if value.dtype.kind == "f" and not np.all(np.isfinite(value)):
            raise AssertionError(f"{name}: reference output {key} is not finite")


def make_golden(name: str, out_dir: str) -> Dict[str, Any]:
    import torch
    import transformers

    torch.manual_seed(0)
    config = test_config(name)
    model, state = build_reference(config)
    batch_images, batch_texts, interp_size = PLANS[name]
    equal = batch_images == batch_texts

    chosen = None
    for input_seed in range(MAX_INPUT_SEEDS):
        inputs = random_inputs(config, batch_images, batch_texts, seed=input_seed)
        outputs = _joint_outputs(model, inputs, return_loss=equal)
        margin = _margins(_assignments(outputs))
        interp_inputs, interp_margin = None, np.inf
        if interp_size is not None:
            interp_inputs = random_inputs(config, batch_images, batch_texts, seed=input_seed, image_size=interp_size)
            embeddings = model.vision_model.embeddings
            original = embeddings.forward
            embeddings.forward = functools.partial(original, interpolate_pos_encoding=True)
            try:
                interp = _joint_outputs(model, interp_inputs, return_loss=False, prefix="interp_")
            finally:
                embeddings.forward = original
            interp_margin = _margins(_assignments(interp, "interp_"))
        if min(margin, interp_margin) >= MIN_MARGIN:
            chosen = input_seed
            break
    if chosen is None:
        raise AssertionError(f"{name}: no input seed below {MAX_INPUT_SEEDS} keeps assignment margins >= {MIN_MARGIN}")

    record: Dict[str, np.ndarray] = {
        "input_ids": inputs["input_ids"],
        "attention_mask": inputs["attention_mask"],
        "pixel_values": inputs["pixel_values"],
    }
    record.update(outputs)
    if interp_inputs is not None:
        record["interp_pixel_values"] = interp_inputs["pixel_values"]
        # The text tower does not see the images: its interp_ outputs would repeat the main run's.
        record.update({k: v for k, v in interp.items() if not k.startswith("interp_text_")})

    with torch.no_grad():
        record["text_features"] = _np(model.get_text_features(
            input_ids=torch.from_numpy(inputs["input_ids"]),
            attention_mask=torch.from_numpy(inputs["attention_mask"])))
        record["image_features"] = _np(model.get_image_features(pixel_values=torch.from_numpy(inputs["pixel_values"])))
        square = min(batch_images, batch_texts)
        if not equal and square >= 2:
            out = model(input_ids=torch.from_numpy(inputs["input_ids"][:square]),
                        attention_mask=torch.from_numpy(inputs["attention_mask"][:square]),
                        pixel_values=torch.from_numpy(inputs["pixel_values"][:square]),
                        return_loss=True, return_dict=True)
            record["loss_square"] = _np(out.loss).astype(np.float32)
            record["loss_square_size"] = np.asarray(square, dtype=np.int64)
    for prefix, text_inputs in _padded_texts(config, chosen).items():
        record.update(_text_outputs(model, text_inputs, prefix))
    _check_finite(name, record)

    checksum = state_checksum(state)
    meta = {
        "name": name,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "config": config.to_dict(),
        "weights_seed": WEIGHTS_SEED,
        "input_seed": chosen,
        "batch_images": batch_images,
        "batch_texts": batch_texts,
        "interp_image_size": list(interp_size) if interp_size else None,
        "weights_checksum": checksum,
        "min_assignment_margin": float(min(margin, interp_margin)),
        "hard_groups_used": [int(len(np.unique(np.argmax(a, axis=1)))) for a in _assignments(record)],
        "stats": {k: {"min": float(v.min()), "max": float(v.max()), "std": float(v.std())}
                  for k, v in record.items() if v.dtype.kind == "f" and v.size > 1},
    }
    record.update({
        "transformers_version": np.asarray(transformers.__version__),
        "torch_version": np.asarray(torch.__version__),
        "config_json": np.asarray(json.dumps(config.to_dict(), sort_keys=True)),
        "weights_seed": np.asarray(WEIGHTS_SEED, dtype=np.int64),
        "input_seed": np.asarray(chosen, dtype=np.int64),
        "weights_sha256": np.asarray(checksum["sha256"]),
        "weights_sum": np.asarray(checksum["sum"], dtype=np.float64),
        "min_assignment_margin": np.asarray(meta["min_assignment_margin"], dtype=np.float64),
    })
    for key, value in record.items():
        if value.dtype.kind == "O":
            raise AssertionError(f"{name}: {key} would need pickle")

    path = os.path.join(out_dir, f"model_{name}.npz")
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            np.savez_compressed(handle, **record)
    os.chmod(path, 0o644)  # mkstemp made it private; it is a committed fixture
    size = os.path.getsize(path)
    if size > SIZE_LIMIT_BYTES:
        raise AssertionError(f"{path} is {size} bytes, over the {SIZE_LIMIT_BYTES} limit")
    meta["keys"] = {k: {"shape": list(v.shape), "dtype": v.dtype.str} for k, v in record.items()}
    meta["file_bytes"] = size
    meta_path = os.path.join(out_dir, f"model_{name}.json")
    atomic_write_text(meta_path, json.dumps(meta, indent=1, sort_keys=True) + "\n")
    os.chmod(meta_path, 0o644)
    return meta


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", choices=GOLDEN_CONFIGS, help="configs to (re)make; default: all")
    parser.add_argument("--out-dir", default=os.path.join(ROOT, "tests", "golden"))
    args = parser.parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    for name in args.only or GOLDEN_CONFIGS:
        meta = make_golden(name, args.out_dir)
        print(f"model_{name}.npz: {meta['file_bytes']} bytes, input_seed {meta['input_seed']}, "
              f"min margin {meta['min_assignment_margin']:.3g}, groups used {meta['hard_groups_used']}, "
              f"logits range [{meta['stats']['logits_per_image']['min']:.3f}, "
              f"{meta['stats']['logits_per_image']['max']:.3f}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
