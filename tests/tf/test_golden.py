"""groupvit_tf against the reference: golden outputs of transformers 4.57.6's PyTorch GroupViT.

tests/golden/model_<name>.npz were written by tools/make_model_golden.py from the reference loaded with
groupvit_core.testing.random_weights(config, seed=0). Here the same weights are written to a checkpoint with
groupvit_core.loading.save_pretrained in each format (model.safetensors, tf_model.h5, pytorch_model.bin), loaded
with TFGroupViTModel.from_pretrained, and every recorded output is compared with one tolerance table, in model
order, so that a failure names the first output that diverges.
"""

import json
import os

import numpy as np
import pytest

pytest.importorskip("tensorflow")
pytest.importorskip("keras")

from groupvit_core import loading  # noqa: E402
from groupvit_core.config import GroupViTConfig  # noqa: E402
from groupvit_core.testing import GOLDEN_CONFIGS, compare_arrays, random_weights, state_checksum  # noqa: E402
from groupvit_tf import TFGroupViTModel  # noqa: E402

GOLDEN_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "golden")
FORMATS = ("safetensors", "h5", "bin")

METADATA = {"transformers_version", "torch_version", "config_json", "weights_seed", "input_seed", "weights_sha256",
            "weights_sum", "min_assignment_margin", "loss_square_size"}
PADDED_TEXT_RUNS = ("padded_", "leftpad_")
INPUTS = {"input_ids", "attention_mask", "pixel_values", "interp_pixel_values"}
INPUTS |= {prefix + key for prefix in PADDED_TEXT_RUNS for key in ("input_ids", "attention_mask")}


def _np(value):
    return np.asarray(value.numpy() if hasattr(value, "numpy") else value)


def _load_golden(name):
    path = os.path.join(GOLDEN_DIR, f"model_{name}.npz")
    if not os.path.exists(path):
        pytest.fail(f"missing golden file {path}: run tools/make_model_golden.py")
    with np.load(path, allow_pickle=False) as data:
        golden = {key: data[key] for key in data.files}
    config = GroupViTConfig.from_dict(json.loads(str(golden["config_json"])))
    state = random_weights(config, int(golden["weights_seed"]))
    # The fixture generator must still give the weights the reference saw.
    assert state_checksum(state)["sha256"] == str(golden["weights_sha256"])
    return config, state, golden


def _forward(model, golden, pixels, prefix, interpolate, with_loss):
    out = model(golden["input_ids"], pixels, attention_mask=golden["attention_mask"], return_loss=with_loss,
                output_attentions=True, output_hidden_states=True, output_segmentation=True,
                interpolate_pos_encoding=interpolate)
    text, vision = out.text_model_output, out.vision_model_output
    ordered = []  # model order: the first mismatch is the first divergence
    ordered += [("text_hidden_states", np.stack([_np(h) for h in text.hidden_states])),
                ("text_attentions", np.stack([_np(a) for a in text.attentions])),
                ("text_last_hidden_state", text.last_hidden_state), ("text_pooler_output", text.pooler_output)]
    for i, hidden in enumerate(vision.hidden_states):
        ordered.append((f"vision_hidden_states_{i}", hidden))
        if i < len(vision.attentions):
            ordered.append((f"assignment_{i}", vision.attentions[i]))
    ordered += [("vision_last_hidden_state", vision.last_hidden_state),
                ("vision_pooler_output", vision.pooler_output),
                ("text_embeds", out.text_embeds), ("image_embeds", out.image_embeds),
                ("logits_per_text", out.logits_per_text), ("logits_per_image", out.logits_per_image),
                ("segmentation_logits", out.segmentation_logits)]
    if with_loss:
        assert out.loss.shape == ()  # a scalar, not the reference TF's (1,)
        ordered.append(("loss", out.loss))
    return [(prefix + key, _np(value)) for key, value in ordered]


def _padded_text(model, golden, prefix):
    """The text outputs of the forward on the golden file's ``prefix`` text batch (every text right-padded, or one
    left-padded), from its first (eager) and second (traced) call, and its text features."""
    ids, mask = golden[prefix + "input_ids"], golden[prefix + "attention_mask"]
    ordered = []
    for _ in range(2):
        out = model(ids, golden["pixel_values"], attention_mask=mask, output_attentions=True).text_model_output
        ordered += [("text_attentions", np.stack([_np(a) for a in out.attentions])),
                    ("text_last_hidden_state", out.last_hidden_state), ("text_pooler_output", out.pooler_output)]
    ordered.append(("text_features", model.get_text_features(ids, attention_mask=mask)))
    return [(prefix + key, _np(value)) for key, value in ordered]


def _compare(name, golden, results):
    compared = set()
    for key, value in results:
        if key not in golden:
            continue  # e.g. interp_text_*: the text tower does not see the images
        problem = compare_arrays(key, value, golden[key])  # the project's one tolerance table
        assert problem is None, f"{name}: {problem}"
        compared.add(key)
    return compared


def _check_model(name, model, golden, full=True):
    """Compare every golden output (``full``) or the joint logits only."""
    with_loss = "loss" in golden
    if not full:
        out = model(golden["input_ids"], golden["pixel_values"], attention_mask=golden["attention_mask"])
        _compare(name, golden, [("logits_per_image", _np(out.logits_per_image))])
        return
    compared = _compare(name, golden, _forward(model, golden, golden["pixel_values"], "", False, with_loss))
    if "interp_pixel_values" in golden:
        compared |= _compare(name, golden, _forward(model, golden, golden["interp_pixel_values"], "interp_", True,
                                                    False))
    features = [("text_features", model.get_text_features(golden["input_ids"],
                                                          attention_mask=golden["attention_mask"])),
                ("image_features", model.get_image_features(golden["pixel_values"]))]
    compared |= _compare(name, golden, [(key, _np(value)) for key, value in features])
    for prefix in PADDED_TEXT_RUNS:
        compared |= _compare(name, golden, _padded_text(model, golden, prefix))
    if "loss_square" in golden:
        size = int(golden["loss_square_size"])
        out = model(golden["input_ids"][:size], golden["pixel_values"][:size],
                    attention_mask=golden["attention_mask"][:size], return_loss=True)
        compared |= _compare(name, golden, [("loss_square", _np(out.loss))])
    outputs = set(golden) - METADATA - INPUTS
    assert compared == outputs, f"{name}: golden outputs not compared: {sorted(outputs - compared)}"


TINY = [name for name in GOLDEN_CONFIGS if name != "default"]


def _check_formats(name, tmp_path):
    """Every golden output from model.safetensors; from tf_model.h5 and pytorch_model.bin the loaded weights
    must be bit-identical to the fixture (hence the same outputs) and the logits are checked again."""
    config, state, golden = _load_golden(name)
    for fmt in FORMATS:
        directory = tmp_path / fmt
        loading.save_pretrained(directory, config, state, format=fmt)
        model = TFGroupViTModel.from_pretrained(directory)
        loaded = model.canonical_state()
        assert list(loaded) == list(state)
        for key, array in state.items():
            np.testing.assert_array_equal(loaded[key], array, err_msg=f"{name}/{fmt}: {key}")
        _check_model(f"{name}/{fmt}", model, golden, full=fmt == FORMATS[0])
        del model
        for entry in os.listdir(directory):
            os.remove(directory / entry)  # the default size writes 220 MB per format


@pytest.mark.parametrize("name", TINY)
def test_tiny_configs_match_the_reference(name, tmp_path):
    _check_formats(name, tmp_path)


@pytest.mark.slow
def test_default_config_matches_the_reference(tmp_path):
    """Full size: the published architecture (224 pixels, 64 + 8 groups, 12 + 12 layers)."""
    _check_formats("default", tmp_path)
