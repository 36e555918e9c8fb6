"""Tests of groupvit_core.testing (the shared fixtures) and of the golden reference files made from them."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from groupvit_core.config import GroupViTConfig
from groupvit_core.testing import (
    GOLDEN_CONFIGS,
    TEST_CONFIGS,
    first_end_positions,
    random_inputs,
    random_weights,
    state_checksum,
    test_config as make_test_config,
    text_special_ids,
    tolerance_kind,
)
from groupvit_core.weights import weight_specs

GOLDEN_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "golden")

# Every golden file holds these keys (plus interp_* where an interpolation run was recorded).
PADDED_TEXT_KEYS = ("input_ids", "attention_mask", "text_last_hidden_state", "text_pooler_output", "text_attentions",
                    "text_features")
GOLDEN_KEYS = {
    "input_ids", "attention_mask", "pixel_values", "logits_per_image", "logits_per_text", "text_embeds",
    "image_embeds", "segmentation_logits", "text_last_hidden_state", "text_pooler_output", "text_hidden_states",
    "text_attentions", "vision_last_hidden_state", "vision_pooler_output", "vision_hidden_states_0",
    "assignment_0", "text_features", "image_features", "transformers_version", "torch_version", "config_json",
    "weights_seed", "input_seed", "weights_sha256", "weights_sum", "min_assignment_margin",
} | {prefix + key for prefix in ("padded_", "leftpad_") for key in PADDED_TEXT_KEYS}


@pytest.fixture(scope="module")
def tiny_state():
    return random_weights(make_test_config("tiny_odd"), seed=0)


def _sub_configs(config: GroupViTConfig):
    return [config, config.text_config, config.vision_config]


# ----- configs -----

def test_named_configs_build_and_have_the_promised_shapes():
    assert set(GOLDEN_CONFIGS) <= set(TEST_CONFIGS)
    assert {"default", "tiny_odd", "two_stage", "small"} <= set(TEST_CONFIGS)
    for name in TEST_CONFIGS:
        assert isinstance(make_test_config(name), GroupViTConfig)
    assert make_test_config("default") == GroupViTConfig()
    tiny = make_test_config("tiny_odd")
    assert (tiny.text_config.vocab_size, tiny.text_config.intermediate_size, tiny.vision_config.image_size) == (
        99, 37, 20)
    assert tiny.vision_config.num_group_tokens == [7, 3, 0]
    two = make_test_config("two_stage")
    assert two.text_config.legacy_eos_pooling and two.vision_config.depths == [2, 2]
    assert two.vision_config.assign_mlp_dims == (36, 36)
    assert make_test_config("small").text_config.vocab_size == 49408
    act = make_test_config("tiny_act")
    assert act.text_config.hidden_act != "quick_gelu" and act.vision_config.hidden_act != "gelu"


def test_unknown_config_name_raises():
    with pytest.raises(ValueError, match="unknown test config"):
        make_test_config("huge")


# ----- weights -----

@pytest.mark.parametrize("name", ["tiny_odd", "two_stage", "small", "tiny_act"])
def test_random_weights_cover_weight_specs_exactly(name):
    for config in _sub_configs(make_test_config(name)):
        specs = weight_specs(config)
        state = random_weights(config, seed=3)
        assert list(state) == [spec.name for spec in specs]
        for spec in specs:
            array = state[spec.name]
            assert isinstance(array, np.ndarray), spec.name
            assert array.shape == spec.shape, spec.name
            assert array.dtype == np.dtype(spec.dtype), spec.name


def test_default_weights_cover_specs_and_are_well_scaled():
    config = make_test_config("default")
    state = random_weights(config, seed=0)
    assert len(state) == 502
    assert {n: a.shape for n, a in state.items()} == {s.name: s.shape for s in weight_specs(config)}
    weight = state["vision_model.encoder.stages.0.layers.0.mlp.fc1.weight"]
    assert abs(weight.std() * np.sqrt(weight.shape[1]) - 1.0) < 0.01
    conv = state["vision_model.embeddings.patch_embeddings.projection.weight"]
    assert abs(conv.std() * np.sqrt(3 * 16 * 16) - 1.0) < 0.02


def test_random_weights_are_deterministic_and_seeded(tiny_state):
    config = make_test_config("tiny_odd")
    again = random_weights(config, seed=0)
    other = random_weights(config, seed=1)
    for name, array in tiny_state.items():
        assert np.array_equal(array, again[name]), name
        assert array.tobytes() == again[name].tobytes(), name
        if array.dtype.kind == "f":
            assert not np.array_equal(array, other[name]), name
    assert state_checksum(tiny_state) == state_checksum(again)
    assert state_checksum(tiny_state)["sha256"] != state_checksum(other)["sha256"]


def test_a_tower_gets_the_same_weights_alone_as_inside_the_full_model(tiny_state):
    config = make_test_config("tiny_odd")
    for part in (config.text_config, config.vision_config):
        for name, array in random_weights(part, seed=0).items():
            assert np.array_equal(array, tiny_state[name]), name


@pytest.mark.parametrize("name", ["tiny_odd", "two_stage"])
def test_every_tensor_is_perturbed_and_distinct(name):
    config = make_test_config(name)
    state = random_weights(config, seed=0)
    seen = {}
    for key, array in state.items():
        if key.endswith("num_batches_tracked"):
            assert array.dtype == np.int64 and array.shape == () and int(array) > 0, key
            continue
        assert array.dtype == np.float32, key
        assert np.all(np.isfinite(array)), key
        if array.size > 1:
            assert float(array.std()) > 0, f"{key} is constant"
        assert not np.all(array == 0), f"{key} is all zeros"
        if key.endswith(".weight") and array.ndim == 1:  # LayerNorm / BatchNorm gamma
            assert not np.allclose(array, 1.0), key
            assert 0.5 < float(array.mean()) < 1.5, key
        if key.endswith("running_var"):
            assert array.min() >= 0.5 and array.max() <= 1.5, key
        digest = array.tobytes()
        assert digest not in seen, f"{key} equals {seen.get(digest)}"
        seen[digest] = key
    assert float(state["logit_scale"]) != pytest.approx(config.logit_scale_init_value, abs=1e-6)
    assert abs(float(state["logit_scale"]) - config.logit_scale_init_value) < 0.3


def test_random_weights_reject_bad_seed():
    with pytest.raises(ValueError, match="seed"):
        random_weights(make_test_config("tiny_odd"), seed=-1)
    with pytest.raises(ValueError, match="seed"):
        random_weights(make_test_config("tiny_odd"), seed=1.5)


def test_state_checksum_sees_every_change(tiny_state):
    base = state_checksum(tiny_state)
    assert base["num_tensors"] == len(tiny_state)
    assert base["num_elements"] == sum(a.size for a in tiny_state.values())
    name = "text_model.final_layer_norm.weight"
    nudged = dict(tiny_state)
    nudged[name] = np.nextafter(tiny_state[name], np.float32(np.inf))
    assert state_checksum(nudged)["sha256"] != base["sha256"]
    renamed = dict(tiny_state)
    renamed["x"] = renamed.pop(name)
    assert state_checksum(renamed)["sha256"] != base["sha256"]
    recast = dict(tiny_state)
    recast[name] = tiny_state[name].astype(np.float64)
    assert state_checksum(recast)["sha256"] != base["sha256"]
    big_endian = dict(tiny_state)
    big_endian[name] = tiny_state[name].astype(">f4")
    assert state_checksum(big_endian)["sha256"] == base["sha256"]


# ----- inputs -----

def _check_texts(inputs, text_config, lengths=None):
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    assert ids.dtype == np.int64 and mask.dtype == np.int64 and ids.shape == mask.shape
    start, end, pad = text_special_ids(text_config)
    real = mask.sum(axis=1)
    if lengths is not None:
        assert real.tolist() == list(lengths)
    assert real.max() == ids.shape[1]  # no all-padding column
    for row in range(ids.shape[0]):
        n = int(real[row])
        assert mask[row, :n].all() and not mask[row, n:].any()  # right padding
        assert (ids[row, n:] == pad).all()
        if start is not None:
            assert ids[row, 0] == start
        assert ids[row, n - 1] == end
        body = ids[row, (start is not None):n - 1]
        assert not np.isin(body, [end] + ([start] if start is not None else [])).any()
    assert ((ids >= 0) & (ids < text_config.vocab_size)).all()
    # The reference pools at the last real token.
    assert first_end_positions(ids, text_config).tolist() == (real - 1).tolist()


@pytest.mark.parametrize("name", ["default", "tiny_odd", "two_stage", "small"])
def test_random_inputs_shapes_padding_and_end_tokens(name):
    config = make_test_config(name)
    inputs = random_inputs(config, batch_images=2, batch_texts=4, seed=5)
    assert set(inputs) == {"input_ids", "attention_mask", "pixel_values"}
    _check_texts(inputs, config.text_config)
    lengths = inputs["attention_mask"].sum(axis=1)
    assert len(set(lengths.tolist())) > 1  # mixed lengths
    assert inputs["input_ids"].shape[1] == min(config.text_config.max_position_embeddings, 16)
    size = config.vision_config.image_size
    assert inputs["pixel_values"].shape == (2, 3, size, size)
    assert inputs["pixel_values"].dtype == np.float32
    again = random_inputs(config, batch_images=2, batch_texts=4, seed=5)
    assert all(np.array_equal(inputs[k], again[k]) for k in inputs)


def test_random_inputs_legacy_ids_pool_at_the_largest_id():
    config = make_test_config("two_stage")
    text = config.text_config
    assert text_special_ids(text) == (text.vocab_size - 2, text.vocab_size - 1, text.vocab_size - 1)
    inputs = random_inputs(config, 1, 3, seed=0)
    ids = inputs["input_ids"]
    lengths = inputs["attention_mask"].sum(axis=1)
    assert np.argmax(ids, axis=1).tolist() == (lengths - 1).tolist()


def test_random_inputs_explicit_lengths_sizes_and_single_towers():
    config = make_test_config("tiny_odd")
    inputs = random_inputs(config, 1, 3, seed=0, text_lengths=[2, 13, 5], image_size=(24, 32))
    _check_texts(inputs, config.text_config, lengths=[2, 13, 5])
    assert inputs["pixel_values"].shape == (1, 3, 24, 32)
    assert set(random_inputs(config.text_config, 0, 2, seed=0)) == {"input_ids", "attention_mask"}
    assert set(random_inputs(config.vision_config, 2, 0, seed=0)) == {"pixel_values"}
    no_bos = config.text_config.copy(bos_token_id=None)
    _check_texts(random_inputs(no_bos, 0, 3, seed=1), no_bos)


@pytest.mark.parametrize("kwargs, match", [
    (dict(text_lengths=[2, 3]), "entries"),
    (dict(text_lengths=[1, 3, 3]), "at least"),
    (dict(text_lengths=[2, 3, 14]), "max_position_embeddings"),
    (dict(image_size=0), "image_size"),
    (dict(seed=-1), "seed"),
])
def test_random_inputs_reject_bad_arguments(kwargs, match):
    args = dict(batch_images=1, batch_texts=3, seed=0)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        random_inputs(make_test_config("tiny_odd"), **args)


def test_random_inputs_reject_a_missing_tower():
    config = make_test_config("tiny_odd")
    with pytest.raises(ValueError, match="no vision tower"):
        random_inputs(config.text_config, 1, 1, seed=0)
    with pytest.raises(ValueError, match="no text tower"):
        random_inputs(config.vision_config, 1, 1, seed=0)


# ----- golden files -----

def _load_golden(name):
    path = os.path.join(GOLDEN_DIR, f"model_{name}.npz")
    assert os.path.isfile(path), f"{path} is missing: run tools/make_model_golden.py with the reference venv"
    assert os.path.getsize(path) < 5 * 1024 * 1024, f"{path} is too large"
    with np.load(path, allow_pickle=False) as data:
        return {key: data[key] for key in data.files}


def test_tolerance_kind_ignores_the_golden_run_prefixes():
    assert tolerance_kind("text_attentions[3]") == tolerance_kind("padded_text_attentions[3]") == "attentions"
    assert tolerance_kind("leftpad_text_features") == tolerance_kind("text_features") == "features"
    assert tolerance_kind("interp_segmentation_logits") == "segmentation"
    assert tolerance_kind("padded_text_last_hidden_state") == "hidden"


@pytest.mark.parametrize("name", GOLDEN_CONFIGS)
def test_golden_file_matches_the_generators(name):
    golden = _load_golden(name)
    assert GOLDEN_KEYS <= set(golden), sorted(GOLDEN_KEYS - set(golden))
    assert str(golden["transformers_version"]) == "4.57.6"
    config = make_test_config(name)
    assert GroupViTConfig.from_dict(json.loads(str(golden["config_json"]))) == config
    # Weights: the generator must still give the arrays the reference ran with.
    state = random_weights(config, seed=int(golden["weights_seed"]))
    checksum = state_checksum(state)
    assert checksum["sha256"] == str(golden["weights_sha256"]), (
        f"random_weights drifted for {name}: sum {checksum['sum']!r} vs golden {float(golden['weights_sum'])!r}"
    )
    # Inputs: the generator must still give the stored inputs.
    images, texts = golden["pixel_values"].shape[0], golden["input_ids"].shape[0]
    inputs = random_inputs(config, images, texts, seed=int(golden["input_seed"]))
    for key in ("input_ids", "attention_mask", "pixel_values"):
        assert inputs[key].dtype == golden[key].dtype, key
        assert np.array_equal(inputs[key], golden[key]), f"random_inputs drifted for {name}: {key}"
    if "interp_pixel_values" in golden:
        size = golden["interp_pixel_values"].shape[2:]
        interp = random_inputs(config, images, texts, seed=int(golden["input_seed"]), image_size=tuple(size))
        assert np.array_equal(interp["pixel_values"], golden["interp_pixel_values"])
    _check_texts(inputs, config.text_config)


@pytest.mark.parametrize("name", GOLDEN_CONFIGS)
def test_golden_file_is_consistent_with_its_config(name):
    golden = _load_golden(name)
    config = make_test_config(name)
    text, vision = config.text_config, config.vision_config
    images, texts = golden["pixel_values"].shape[0], golden["input_ids"].shape[0]
    seq = golden["input_ids"].shape[1]
    assert golden["logits_per_image"].shape == (images, texts)
    np.testing.assert_array_equal(golden["logits_per_text"], golden["logits_per_image"].T)
    assert golden["text_hidden_states"].shape == (text.num_hidden_layers + 1, texts, seq, text.hidden_size)
    assert golden["text_attentions"].shape == (text.num_hidden_layers, texts, text.num_attention_heads, seq, seq)
    # The padded text runs: every text right-padded (the last key masked for all), then the first left-padded.
    padded, leftpad = golden["padded_attention_mask"], golden["leftpad_attention_mask"]
    assert padded.shape == leftpad.shape == golden["padded_input_ids"].shape
    assert not padded[:, -1].any() and padded[:, 0].all() and not leftpad[0, 0] and leftpad[1:, 0].all()
    for prefix in ("padded_", "leftpad_"):
        batch, length = golden[prefix + "input_ids"].shape
        assert golden[prefix + "text_attentions"].shape == (
            text.num_hidden_layers, batch, text.num_attention_heads, length, length)
        assert golden[prefix + "text_last_hidden_state"].shape == (batch, length, text.hidden_size)
    assert golden["segmentation_logits"].shape == (images, texts, vision.image_size, vision.image_size)
    stages = [s for s in vision.stages if s.has_downsample]
    for i, stage in enumerate(stages):
        soft = golden[f"assignment_{i}"]
        assert soft.shape[:2] == (images, stage.num_output_groups)
        np.testing.assert_allclose(soft.sum(axis=1), 1.0, atol=1e-5)  # softmax over groups
    assert f"assignment_{len(stages)}" not in golden
    assert f"vision_hidden_states_{len(vision.depths)}" in golden
    assert f"vision_hidden_states_{len(vision.depths) + 1}" not in golden
    assert float(golden["min_assignment_margin"]) >= 1e-3
    # Pooled text sits at the reference's pooling position of the last hidden state.
    positions = first_end_positions(golden["input_ids"], text)
    pooled = golden["text_last_hidden_state"][np.arange(texts), positions]
    np.testing.assert_array_equal(pooled, golden["text_pooler_output"])
    for key, value in golden.items():
        assert value.dtype.kind != "O", key
        if value.dtype.kind == "f":
            assert np.all(np.isfinite(value)), key
    if images == texts:
        assert "loss" in golden and golden["loss"].shape == ()
    # The joint outputs hang together as the spec describes (checks the recording, not any implementation).
    scale = np.exp(np.float64(random_weights(config, seed=int(golden["weights_seed"]))["logit_scale"]))
    text_embeds, image_embeds = golden["text_embeds"].astype(np.float64), golden["image_embeds"].astype(np.float64)
    np.testing.assert_allclose(np.linalg.norm(text_embeds, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(scale * text_embeds @ image_embeds.T, golden["logits_per_text"], rtol=1e-5, atol=1e-5)
    for embeds, features in ((text_embeds, "text_features"), (image_embeds, "image_features")):
        raw = golden[features].astype(np.float64)
        np.testing.assert_allclose(raw / np.linalg.norm(raw, axis=1, keepdims=True), embeds, atol=1e-5)
    np.testing.assert_allclose(golden["vision_pooler_output"], golden["vision_last_hidden_state"].mean(axis=1),
                               atol=1e-5)
