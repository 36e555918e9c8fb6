"""groupvit_pt against the reference: outputs of transformers 4.57.6 recorded in tests/golden/model_<name>.npz.

The golden files were written by tools/make_model_golden.py from ``random_weights(config, seed)`` and
``random_inputs``; here the same weights are regenerated (their checksum must equal the recorded one), written to
a checkpoint in each format with groupvit_core.loading.save_pretrained, loaded with ``GroupViTModel.from_pretrained``
and run on the recorded inputs. Tensors are compared in the order the model computes them, so a failure names the
first one that diverges.
"""

import json
import os
from typing import Dict, List, Tuple

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from groupvit_core import loading  # noqa: E402
from groupvit_core.config import GroupViTConfig  # noqa: E402
from groupvit_core.testing import GOLDEN_CONFIGS, compare_arrays, random_weights, state_checksum  # noqa: E402
from groupvit_core.testing import test_config as make_test_config  # noqa: E402
from groupvit_pt import GroupViTModel  # noqa: E402

GOLDEN_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "golden")
FORMATS = ("safetensors", "h5", "bin")
PADDED_TEXT_RUNS = ("padded_", "leftpad_")

def _golden_path(name: str) -> str:
    return os.path.join(GOLDEN_DIR, f"model_{name}.npz")


_CACHE: Dict[str, object] = {}


def _golden(name: str) -> Dict[str, np.ndarray]:
    key = f"golden:{name}"
    if key not in _CACHE:
        path = _golden_path(name)
        if not os.path.isfile(path):  # missing data fails loudly
            raise AssertionError(f"{path} is missing: run tools/make_model_golden.py --only {name}")
        with np.load(path, allow_pickle=False) as data:
            _CACHE[key] = {k: data[k] for k in data.files}
    return _CACHE[key]


def _config(name: str) -> GroupViTConfig:
    return GroupViTConfig.from_dict(json.loads(str(_golden(name)["config_json"])))


def _weights(name: str) -> Dict[str, np.ndarray]:
    key = f"weights:{name}"
    if key not in _CACHE:
        _CACHE[key] = random_weights(_config(name), int(_golden(name)["weights_seed"]))
    return _CACHE[key]


def _names():
    return [pytest.param(n, marks=pytest.mark.slow) if n == "default" else n for n in GOLDEN_CONFIGS]


@pytest.mark.parametrize("name", _names())
def test_golden_file_describes_the_test_config_and_its_weights(name):
    golden = _golden(name)
    assert _config(name).to_dict() == make_test_config(name).to_dict()
    checksum = state_checksum(_weights(name))
    assert checksum["sha256"] == str(golden["weights_sha256"]), (
        f"random_weights drifted from the golden file: sum {checksum['sum']} vs {float(golden['weights_sum'])}"
    )
    assert checksum["sum"] == pytest.approx(float(golden["weights_sum"]), rel=1e-12)
    assert str(golden["transformers_version"]) == "4.57.6"


def _joint(model, input_ids, attention_mask, pixel_values, prefix, interpolate) -> List[Tuple[str, torch.Tensor]]:
    """The golden file's tensors, in the order the model computes them."""
    with torch.no_grad():
        out = model(input_ids, pixel_values, attention_mask=attention_mask, output_attentions=True,
                    output_hidden_states=True, output_segmentation=True,
                    return_loss=input_ids.shape[0] == pixel_values.shape[0] and not prefix,
                    interpolate_pos_encoding=interpolate)
    text, vision = out.text_model_output, out.vision_model_output
    ordered: List[Tuple[str, torch.Tensor]] = []
    for i, hidden in enumerate(text.hidden_states):
        ordered.append((f"text_hidden_states[{i}]", hidden))
        if i < len(text.attentions):
            ordered.append((f"text_attentions[{i}]", text.attentions[i]))
    ordered += [("text_last_hidden_state", text.last_hidden_state), ("text_pooler_output", text.pooler_output)]
    for i, hidden in enumerate(vision.hidden_states):
        ordered.append((f"vision_hidden_states_{i}", hidden))
        if i < len(vision.attentions):
            ordered.append((f"assignment_{i}", vision.attentions[i]))
    ordered += [
        ("vision_last_hidden_state", vision.last_hidden_state),
        ("vision_pooler_output", vision.pooler_output),
        ("text_embeds", out.text_embeds),
        ("image_embeds", out.image_embeds),
        ("logits_per_text", out.logits_per_text),
        ("logits_per_image", out.logits_per_image),
        ("loss", out.loss),
        ("segmentation_logits", out.segmentation_logits),
    ]
    return [(prefix + key, value) for key, value in ordered]


def _expected(golden: Dict[str, np.ndarray], key: str) -> np.ndarray:
    if "[" in key:  # stacked in the file: text_hidden_states[i] -> text_hidden_states[i]
        base, index = key[:-1].split("[")
        return golden[base][int(index)]
    return golden[key]


def _compare(golden: Dict[str, np.ndarray], ordered: List[Tuple[str, torch.Tensor]]) -> List[str]:
    problems = []
    for key, value in ordered:
        base = key.split("[")[0]
        if base not in golden:
            if value is not None and not base.startswith("interp_text_"):  # the file drops repeated text outputs
                problems.append(f"{key}: not in the golden file")
            continue
        expected = _expected(golden, key)
        if value is None:
            problems.append(f"{key}: not computed")
            continue
        got = value.detach().cpu().numpy()
        if got.shape != expected.shape:
            problems.append(f"{key}: shape {got.shape}, reference {expected.shape}")
            continue
        problem = compare_arrays(key, got, expected)  # the project's one tolerance table
        if problem:
            problems.append(problem)
    return problems


def _padded_text(model: GroupViTModel, golden: Dict[str, np.ndarray], prefix: str
                 ) -> List[Tuple[str, torch.Tensor]]:
    """The text outputs of the forward on the golden file's ``prefix`` text batch (every text right-padded, or one
    left-padded) and its text features."""
    ids, mask = golden[prefix + "input_ids"], golden[prefix + "attention_mask"]
    with torch.no_grad():
        out = model(ids, golden["pixel_values"], attention_mask=mask, output_attentions=True).text_model_output
        features = model.get_text_features(ids, attention_mask=mask)
    ordered = [(f"{prefix}text_attentions[{i}]", weights) for i, weights in enumerate(out.attentions)]
    return ordered + [(prefix + "text_last_hidden_state", out.last_hidden_state),
                      (prefix + "text_pooler_output", out.pooler_output), (prefix + "text_features", features)]


def _check_model(model: GroupViTModel, name: str) -> None:
    golden = _golden(name)
    ids, mask, pixels = golden["input_ids"], golden["attention_mask"], golden["pixel_values"]
    ordered = _joint(model, ids, mask, pixels, "", False)
    if "interp_pixel_values" in golden:
        ordered += _joint(model, ids, mask, golden["interp_pixel_values"], "interp_", True)
    with torch.no_grad():
        ordered.append(("text_features", model.get_text_features(ids, attention_mask=mask)))
        ordered.append(("image_features", model.get_image_features(pixels)))
    for prefix in PADDED_TEXT_RUNS:
        ordered += _padded_text(model, golden, prefix)
    with torch.no_grad():
        if "loss_square" in golden:
            k = int(golden["loss_square_size"])
            out = model(ids[:k], pixels[:k], attention_mask=mask[:k], return_loss=True)
            ordered.append(("loss_square", out.loss))
    computed = {key.split("[")[0] for key, _ in ordered}
    inputs = {"input_ids", "attention_mask", "pixel_values", "interp_pixel_values"}
    inputs |= {prefix + key for prefix in PADDED_TEXT_RUNS for key in ("input_ids", "attention_mask")}
    recorded = {k for k in golden if k not in inputs
                and golden[k].dtype.kind == "f" and k not in ("weights_sum", "min_assignment_margin")}
    assert recorded <= computed, f"golden tensors this test does not check: {sorted(recorded - computed)}"
    problems = _compare(golden, ordered)
    assert not problems, f"{name}: first divergence: {problems[0]}" + "".join(f"\n  then {p}" for p in problems[1:])


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", _names())
def test_outputs_match_the_reference(name, fmt, tmp_path):
    config, weights = _config(name), _weights(name)
    loading.save_pretrained(tmp_path, config, weights, format=fmt)
    model = GroupViTModel.from_pretrained(tmp_path)
    state = model.canonical_state()
    different = [k for k in weights if not np.array_equal(state[k], weights[k])]
    assert not different, f"weights changed through {fmt}: {different[:5]}"
    if name == "default" and fmt != "safetensors":
        # Same code, bit-identical weights: the outputs are those checked for safetensors. Keeps the slow test short.
        return
    _check_model(model, name)
