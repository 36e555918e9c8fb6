"""groupvit_pt.modeling: checkpoints, inputs, interpolation, segmentation, training mode and input errors.

Numbers against the reference live in test_golden.py; the checks here compare the model with direct computations
in plain torch (F.interpolate, nn.BatchNorm1d, explicit softmax attention) or with itself across code paths.
"""

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from groupvit_core import checkpoint  # noqa: E402
from groupvit_core.config import GroupViTConfig  # noqa: E402
from groupvit_core.outputs import BaseModelOutputWithPooling, GroupViTModelOutput  # noqa: E402
from groupvit_core.testing import PADDING_CASES, random_inputs, random_weights, test_config  # noqa: E402
from groupvit_pt import GroupViTModel, GroupViTTextModel, GroupViTVisionModel  # noqa: E402
from groupvit_pt import modeling  # noqa: E402


def _model(name="tiny_odd", seed=0):
    config = test_config(name)
    model = GroupViTModel(config)
    model.load_canonical_state(random_weights(config, seed))
    return model.eval()


def _inputs(config, images=3, texts=3, seed=1, **kwargs):
    return random_inputs(config, images, texts, seed=seed, **kwargs)


def _run(model, inputs, **kwargs):
    with torch.no_grad():
        return model(inputs["input_ids"], inputs["pixel_values"], attention_mask=inputs["attention_mask"], **kwargs)


def _flatten(output, prefix=""):
    """{dotted name: tensor} of a (nested) model output, tuples expanded."""
    flat = {}
    for key, value in output.items():
        name = prefix + key
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "."))
        elif isinstance(value, tuple):
            flat.update({f"{name}.{i}": item for i, item in enumerate(value)})
        else:
            flat[name] = value
    return flat


@pytest.fixture(scope="module")
def tiny():
    return _model("tiny_odd")


# ----------------------------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------------------------


def test_output_field_names_and_shapes(tiny):
    config = tiny.config
    inputs = _inputs(config)
    plain = _run(tiny, inputs)
    assert isinstance(plain, GroupViTModelOutput)
    assert list(plain) == ["logits_per_image", "logits_per_text", "text_embeds", "image_embeds",
                           "text_model_output", "vision_model_output"]
    assert list(plain.text_model_output) == ["last_hidden_state", "pooler_output"]
    assert list(plain.vision_model_output) == ["last_hidden_state", "pooler_output"]
    assert plain.loss is None and plain.segmentation_logits is None

    full = _run(tiny, inputs, return_loss=True, output_attentions=True, output_hidden_states=True,
                output_segmentation=True)
    assert list(full) == list(GroupViTModelOutput.FIELDS)
    for tower in (full.text_model_output, full.vision_model_output):
        assert isinstance(tower, BaseModelOutputWithPooling)
        assert list(tower) == list(BaseModelOutputWithPooling.FIELDS)
    assert full.loss.shape == ()
    assert full.logits_per_image.shape == (3, 3)
    assert full.segmentation_logits.shape == (3, 3, 20, 20)
    assert full.text_embeds.shape == full.image_embeds.shape == (3, config.projection_dim)
    text = full.text_model_output
    assert len(text.hidden_states) == config.text_config.num_hidden_layers + 1
    assert len(text.attentions) == config.text_config.num_hidden_layers
    assert text.attentions[0].shape == (3, config.text_config.num_attention_heads) + inputs["input_ids"].shape[1:] * 2
    vision = full.vision_model_output
    # Each stage's input, then the final tokens; one soft assignment map per grouping stage.
    assert [tuple(h.shape) for h in vision.hidden_states] == [(3, 25, 30), (3, 7, 30), (3, 3, 30), (3, 3, 30)]
    assert [tuple(a.shape) for a in vision.attentions] == [(3, 7, 25), (3, 3, 7)]
    for a in vision.attentions:  # softmax over groups
        torch.testing.assert_close(a.sum(dim=1), torch.ones(a.shape[0], a.shape[2]))
    torch.testing.assert_close(full.logits_per_image, full.logits_per_text.t(), rtol=0, atol=0)
    # Same numbers whatever is asked for (text attentions take the explicit-softmax path: float rounding only).
    for key in ("logits_per_image", "text_embeds", "image_embeds"):
        torch.testing.assert_close(full[key], plain[key], rtol=1e-5, atol=1e-5)


def test_output_segmentation_implies_attentions_as_the_reference(tiny):
    out = _run(tiny, _inputs(tiny.config), output_segmentation=True)
    assert len(out.vision_model_output.attentions) == 2
    assert len(out.text_model_output.attentions) == tiny.config.text_config.num_hidden_layers


def test_features_are_unnormalised_projections(tiny):
    inputs = _inputs(tiny.config)
    out = _run(tiny, inputs)
    with torch.no_grad():
        text = tiny.get_text_features(inputs["input_ids"], attention_mask=inputs["attention_mask"])
        image = tiny.get_image_features(inputs["pixel_values"])
    torch.testing.assert_close(text / text.norm(dim=-1, keepdim=True), out.text_embeds)
    torch.testing.assert_close(image / image.norm(dim=-1, keepdim=True), out.image_embeds)
    assert not torch.allclose(text.norm(dim=-1), torch.ones(3))


def test_logits_formula(tiny):
    out = _run(tiny, _inputs(tiny.config))
    expected = tiny.logit_scale.exp() * out.text_embeds @ out.image_embeds.t()
    torch.testing.assert_close(out.logits_per_text, expected)
    expected_loss = (F.cross_entropy(out.logits_per_text, torch.arange(3))
                     + F.cross_entropy(out.logits_per_image, torch.arange(3))) / 2
    loss = _run(tiny, _inputs(tiny.config), return_loss=True).loss
    torch.testing.assert_close(loss, expected_loss)


def test_text_pooling_first_eos_and_legacy_argmax():
    model = _model("tiny_odd")
    eos = model.config.text_config.eos_token_id
    ids = np.array([[5, eos, 7, eos], [5, 6, 7, 8]])  # second text has no eos: the reference pools position 0
    with torch.no_grad():
        out = model.text_model(ids, output_hidden_states=True)
    torch.testing.assert_close(out.pooler_output, out.last_hidden_state[[0, 1], [1, 0]], rtol=0, atol=0)

    legacy = _model("two_stage")  # eos_token_id == 2: argmax(input_ids), first maximum
    assert legacy.config.text_config.legacy_eos_pooling
    ids = np.array([[0, 9, 2, 9], [3, 1, 1, 1]])
    with torch.no_grad():
        out = legacy.text_model(ids)
    torch.testing.assert_close(out.pooler_output, out.last_hidden_state[[0, 1], [1, 0]], rtol=0, atol=0)


def test_padding_mask_matches_explicit_attention(tiny):
    """The SDPA paths (is_causal, combined mask) equal the explicit-softmax path used for output_attentions."""
    inputs = _inputs(tiny.config)
    assert (inputs["attention_mask"] == 0).any()
    with torch.no_grad():
        fast = tiny.text_model(inputs["input_ids"], attention_mask=inputs["attention_mask"])
        slow = tiny.text_model(inputs["input_ids"], attention_mask=inputs["attention_mask"], output_attentions=True)
        unmasked = tiny.text_model(inputs["input_ids"])
        ones = tiny.text_model(inputs["input_ids"], attention_mask=np.ones_like(inputs["attention_mask"]),
                               output_attentions=True)
    torch.testing.assert_close(fast.last_hidden_state, slow.last_hidden_state, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(unmasked.last_hidden_state, ones.last_hidden_state, rtol=1e-5, atol=1e-5)
    # Padding changes the padded positions only; attention never reaches a masked key.
    real = inputs["attention_mask"].astype(bool)
    torch.testing.assert_close(fast.last_hidden_state[real], unmasked.last_hidden_state[real], rtol=1e-5,
                               atol=1e-5)
    assert not torch.allclose(fast.last_hidden_state[~real], unmasked.last_hidden_state[~real])
    for weights in slow.attentions:
        keys_masked = torch.from_numpy(~real)[:, None, None, :].expand_as(weights)
        assert float(weights[keys_masked].abs().max()) == 0.0
        assert float(weights.triu(1).abs().max()) == 0.0  # causal


def test_attention_module_matches_explicit_softmax():
    torch.manual_seed(0)
    attention = modeling.GroupViTAttention(hidden_size=12, num_heads=3).eval()
    query, key = torch.randn(2, 5, 12), torch.randn(2, 7, 12)
    mask = torch.rand(2, 1, 5, 7) > 0.3
    mask[..., 0] = True

    def explicit(q_in, k_in, additive):
        q = attention.q_proj(q_in).view(2, -1, 3, 4).transpose(1, 2)
        k = attention.k_proj(k_in).view(2, -1, 3, 4).transpose(1, 2)
        v = attention.v_proj(k_in).view(2, -1, 3, 4).transpose(1, 2)
        scores = (q * 4 ** -0.5) @ k.transpose(-1, -2) + additive
        context = scores.softmax(-1) @ v
        return attention.out_proj(context.transpose(1, 2).reshape(2, -1, 12))

    with torch.no_grad():
        additive = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
        for out_attn in (False, True):
            got = attention(query, encoder_hidden_states=key, attention_mask=mask, output_attentions=out_attn)[0]
            torch.testing.assert_close(got, explicit(query, key, additive))
            got = attention(query, encoder_hidden_states=key, attention_mask=additive, output_attentions=out_attn)[0]
            torch.testing.assert_close(got, explicit(query, key, additive))
            causal = torch.zeros(5, 5).masked_fill(torch.ones(5, 5, dtype=torch.bool).triu(1), -torch.inf)
            got = attention(query, causal=True, output_attentions=out_attn)[0]
            torch.testing.assert_close(got, explicit(query, query, causal))


@pytest.mark.parametrize("padding", sorted(PADDING_CASES))
def test_padded_text_leaves_out_keys_no_text_attends(tiny, padding):
    """The forward runs the text attention over the keys up to the last one any text attends to: as the
    reference's attention over all positions (the rest have zero weight), padded positions' outputs included;
    a text masked at its first position keeps them all (its first rows see only masked keys)."""
    mask, kept = PADDING_CASES[padding]
    mask = np.array(mask)
    ids = _inputs(tiny.config, images=0, texts=3, text_lengths=[9, 9, 9])["input_ids"]
    assert modeling._attended_keys(torch.from_numpy(mask) == 1) == kept
    text = tiny.text_model
    with torch.no_grad():
        out = text(ids, attention_mask=mask, output_attentions=True)
        fast = text(ids, attention_mask=mask)
        # every position as a key, through the same layers
        padding_mask = text._padding_mask(torch.from_numpy(mask).float())
        hidden = text.embeddings(torch.from_numpy(ids))
        last, _, weights = text.encoder(hidden, attention_mask=padding_mask, causal=False, output_attentions=True)
        last = text.final_layer_norm(last)
    torch.testing.assert_close(out.last_hidden_state, last, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fast.last_hidden_state, last, rtol=1e-5, atol=1e-5)
    for got, expected in zip(out.attentions, weights, strict=True):
        assert got.shape == expected.shape == (3, tiny.config.text_config.num_attention_heads, 9, 9)
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
        assert float(got[..., kept:].abs().sum()) == 0.0


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["safetensors", "h5", "bin"])
def test_save_load_round_trip_is_bit_identical(tiny, tmp_path, fmt):
    weights = random_weights(tiny.config, 0)
    path = tiny.save_pretrained(tmp_path, format=fmt)
    assert os.path.basename(path) == {"safetensors": "model.safetensors", "h5": "tf_model.h5",
                                      "bin": "pytorch_model.bin"}[fmt]
    assert os.path.isfile(tmp_path / "config.json")
    loaded = GroupViTModel.from_pretrained(tmp_path)
    assert not loaded.training
    assert loaded.config == tiny.config
    state = loaded.canonical_state()
    assert list(state) == list(weights)
    for name, array in weights.items():
        assert state[name].dtype == array.dtype and state[name].shape == array.shape, name
        assert np.array_equal(state[name], array), name
    assert all(p.requires_grad for p in loaded.parameters())
    inputs = _inputs(tiny.config)
    expected, got = _run(tiny, inputs, output_segmentation=True), _run(loaded, inputs, output_segmentation=True)
    for key in ("logits_per_image", "segmentation_logits"):
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0)


def test_canonical_state_is_a_copy(tiny):
    state = tiny.canonical_state()
    state["logit_scale"][...] = 123.0
    assert float(tiny.logit_scale.detach()) != 123.0


def test_submodels_load_from_a_full_checkpoint(tiny, tmp_path):
    tiny.save_pretrained(tmp_path)
    text = GroupViTTextModel.from_pretrained(tmp_path)
    vision = GroupViTVisionModel.from_pretrained(tmp_path)
    assert text.config == tiny.config.text_config and vision.config == tiny.config.vision_config
    full_state = tiny.canonical_state()
    for sub, prefix in ((text, "text_model."), (vision, "vision_model.")):
        state = sub.canonical_state()
        assert set(state) == {k for k in full_state if k.startswith(prefix)}
        assert all(np.array_equal(state[k], full_state[k]) for k in state)
    inputs = _inputs(tiny.config)
    out = _run(tiny, inputs, output_attentions=True)
    with torch.no_grad():
        text_out = text(inputs["input_ids"], attention_mask=inputs["attention_mask"], output_attentions=True)
        vision_out = vision(inputs["pixel_values"], output_attentions=True)
    torch.testing.assert_close(text_out.pooler_output, out.text_model_output.pooler_output, rtol=0, atol=0)
    torch.testing.assert_close(vision_out.pooler_output, out.vision_model_output.pooler_output, rtol=0, atol=0)
    # A sub-model writes a checkpoint of its own kind, which loads back.
    vision.save_pretrained(tmp_path / "vision", format="h5")
    again = GroupViTVisionModel.from_pretrained(tmp_path / "vision")
    assert all(np.array_equal(a, b) for a, b in zip(again.canonical_state().values(),
                                                     vision.canonical_state().values()))
    with pytest.raises(ValueError, match="GroupViTVisionConfig"):
        GroupViTModel.from_pretrained(tmp_path / "vision")


def _write_checkpoint(directory, config, state):
    os.makedirs(directory, exist_ok=True)
    config.save_pretrained(directory)
    checkpoint.write_safetensors(os.path.join(directory, "model.safetensors"), state, metadata={"format": "pt"})


def test_loading_is_strict(tiny, tmp_path):
    config, weights = tiny.config, random_weights(tiny.config, 0)
    broken = dict(weights)
    del broken["vision_model.encoder.stages.1.downsample.assign.proj.bias"]
    _write_checkpoint(tmp_path / "missing", config, broken)
    with pytest.raises(ValueError, match="missing 1 tensor.*assign.proj.bias"):
        GroupViTModel.from_pretrained(tmp_path / "missing")
    _write_checkpoint(tmp_path / "unexpected", config, dict(weights, extra=np.zeros(3, np.float32)))
    with pytest.raises(ValueError, match="unexpected 1 tensor.*extra"):
        GroupViTModel.from_pretrained(tmp_path / "unexpected")
    misshaped = dict(weights, logit_scale=np.zeros(2, np.float32))
    _write_checkpoint(tmp_path / "misshaped", config, misshaped)
    with pytest.raises(ValueError, match="logit_scale"):
        GroupViTModel.from_pretrained(tmp_path / "misshaped")
    with pytest.raises(OSError):
        GroupViTModel.from_pretrained(tmp_path / "nowhere")
    os.makedirs(tmp_path / "no_weights")
    config.save_pretrained(tmp_path / "no_weights")
    with pytest.raises(OSError):
        GroupViTModel.from_pretrained(tmp_path / "no_weights")


def test_load_canonical_state_is_strict_and_defaults_the_counter(tiny):
    model = GroupViTModel(tiny.config)
    weights = random_weights(tiny.config, 0)
    with pytest.raises(ValueError, match="missing"):
        model.load_canonical_state({k: v for k, v in weights.items() if k != "logit_scale"})
    with pytest.raises(ValueError, match="wrong shape"):
        model.load_canonical_state(dict(weights, logit_scale=np.zeros(1, np.float32)))
    without_counters = {k: v for k, v in weights.items() if not k.endswith("num_batches_tracked")}
    model.load_canonical_state(without_counters)
    assert int(model.visual_projection[1].num_batches_tracked) == 0
    assert np.array_equal(model.canonical_state()["logit_scale"], weights["logit_scale"])


def test_wrong_config_type():
    config = test_config("tiny_odd")
    with pytest.raises(TypeError):
        GroupViTModel(config.text_config)
    with pytest.raises(TypeError):
        GroupViTTextModel(config)


# ----------------------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------------------


def test_numpy_and_list_inputs(tiny):
    inputs = _inputs(tiny.config)
    as_torch = {k: torch.from_numpy(v) for k, v in inputs.items()}
    expected = _run(tiny, as_torch, output_segmentation=True)
    variants = [
        inputs,
        dict(inputs, input_ids=inputs["input_ids"].astype(np.int32), attention_mask=inputs["attention_mask"] == 1),
        dict(inputs, pixel_values=inputs["pixel_values"].astype(np.float64)),
        dict(inputs, input_ids=inputs["input_ids"].tolist()),
        dict(inputs, pixel_values=np.asfortranarray(inputs["pixel_values"])),
    ]
    readonly = inputs["pixel_values"].copy()
    readonly.setflags(write=False)
    variants.append(dict(inputs, pixel_values=readonly))
    for variant in variants:
        got = _run(tiny, variant, output_segmentation=True)
        assert isinstance(got.logits_per_image, torch.Tensor)
        for key in ("logits_per_image", "segmentation_logits"):
            torch.testing.assert_close(got[key], expected[key], rtol=1e-6, atol=1e-6)


def _bad(config, **changes):
    inputs = _inputs(config)
    inputs.update(changes)
    return inputs


@pytest.mark.parametrize("case, match", [
    ("id_too_large", "token id 99, outside the vocabulary"),
    ("id_negative", "token id -1, outside the vocabulary"),
    ("text_too_long", "14 tokens, more than max_position_embeddings"),
    ("ids_1d", "input_ids must be 2-D"),
    ("ids_float", "input_ids must hold integer"),
    ("ids_string", "input_ids must hold integer"),
    ("ids_empty_batch", "input_ids is an empty batch"),
    ("ids_no_tokens", "input_ids has no tokens"),
    ("mask_shape", "attention_mask has shape"),
    ("mask_string", "attention_mask must hold"),
    ("pixels_3d", "pixel_values must be 4-D"),
    ("pixels_channels", "pixel_values has 4 channels, the model expects 3"),
    ("pixels_size", "pixel_values are 24x20 but the model expects 20x20"),
    ("pixels_empty_batch", "pixel_values is an empty batch"),
    ("pixels_complex", "pixel_values must hold real numbers"),
    ("pixels_object", "pixel_values must hold real numbers"),
    ("pixels_bool", "pixel_values must hold real numbers"),
    ("interp_not_multiple", "positive multiple of the patch size 4, got 22x20"),
    ("loss_batch_mismatch", "return_loss needs as many texts as images, got 3 texts and 2 images"),
    ("position_ids_range", "position_ids must lie in"),
    ("position_ids_shape", "position_ids has shape"),
    ("pixels_none", "pixel_values is required"),
])
def test_bad_inputs_raise_value_error_naming_the_problem(tiny, case, match):
    config = tiny.config
    inputs = _inputs(config)
    ids, pixels = inputs["input_ids"], inputs["pixel_values"]
    kwargs = {}
    if case == "id_too_large":
        ids = ids.copy(); ids[1, 1] = 99
    elif case == "id_negative":
        ids = ids.copy(); ids[0, 0] = -1
    elif case == "text_too_long":
        ids = np.full((3, 14), 5); inputs["attention_mask"] = None
    elif case == "ids_1d":
        ids = ids[0]; inputs["attention_mask"] = None
    elif case == "ids_float":
        ids = ids.astype(np.float32)
    elif case == "ids_string":
        ids = np.array([["a", "b"]])
    elif case == "ids_empty_batch":
        ids = ids[:0]; inputs["attention_mask"] = None
    elif case == "ids_no_tokens":
        ids = ids[:, :0]; inputs["attention_mask"] = None
    elif case == "mask_shape":
        inputs["attention_mask"] = inputs["attention_mask"][:, :-1]
    elif case == "mask_string":
        inputs["attention_mask"] = np.full(ids.shape, "x")
    elif case == "pixels_3d":
        pixels = pixels[0]
    elif case == "pixels_channels":
        pixels = np.zeros((3, 4, 20, 20), np.float32)
    elif case == "pixels_size":
        pixels = np.zeros((3, 3, 24, 20), np.float32)
    elif case == "pixels_empty_batch":
        pixels = pixels[:0]
    elif case == "pixels_complex":
        pixels = pixels.astype(np.complex64)
    elif case == "pixels_object":
        pixels = np.empty((3, 3, 20, 20), dtype=object)
    elif case == "pixels_bool":
        pixels = torch.zeros(3, 3, 20, 20, dtype=torch.bool)
    elif case == "interp_not_multiple":
        pixels = np.zeros((3, 3, 22, 20), np.float32); kwargs["interpolate_pos_encoding"] = True
    elif case == "loss_batch_mismatch":
        pixels = pixels[:2]; kwargs["return_loss"] = True
    elif case == "position_ids_range":
        kwargs["position_ids"] = np.arange(ids.shape[1])[None] + 1
    elif case == "position_ids_shape":
        kwargs["position_ids"] = np.arange(ids.shape[1] - 1)[None]
    elif case == "pixels_none":
        pixels = None
    with pytest.raises(ValueError, match=match):
        tiny(ids, pixels, attention_mask=inputs["attention_mask"], **kwargs)


def test_tower_models_check_their_inputs_too():
    config = test_config("tiny_odd")
    text, vision = GroupViTTextModel(config.text_config), GroupViTVisionModel(config.vision_config)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        text(np.array([[0, 99]]))
    with pytest.raises(ValueError, match="expects 20x20"):
        vision(np.zeros((1, 3, 16, 16), np.float32))
    with pytest.raises(ValueError, match="must be 4-D"):
        vision(np.zeros((3, 20, 20), np.float32))


def test_loss_helpers():
    logits = torch.randn(3, 3)
    loss = modeling.groupvit_loss(logits)
    assert loss.shape == ()
    with pytest.raises(ValueError, match="as many texts as images"):
        modeling.groupvit_loss(torch.randn(2, 3))


def test_segmentation_needs_a_grouping_stage():
    config = GroupViTConfig(
        text_config=dict(vocab_size=20, hidden_size=8, num_attention_heads=2, intermediate_size=9, num_hidden_layers=1,
                         max_position_embeddings=6, bos_token_id=18, eos_token_id=19),
        vision_config=dict(hidden_size=8, num_attention_heads=2, intermediate_size=9, patch_size=4, image_size=8,
                           depths=[1], num_hidden_layers=1, num_group_tokens=[0], num_output_groups=[4]),
        projection_dim=5, projection_intermediate_dim=6)
    model = GroupViTModel(config).eval()
    inputs = random_inputs(config, 2, 2, seed=0)
    out = _run(model, inputs)  # runs without grouping
    assert out.vision_model_output.last_hidden_state.shape == (2, 4, 8)
    with pytest.raises(ValueError, match="at least one grouping stage"):
        _run(model, inputs, output_segmentation=True)


# ----------------------------------------------------------------------------------------------------------------
# Position interpolation and segmentation against direct computations
# ----------------------------------------------------------------------------------------------------------------


def _direct_embeddings(model, pixels):
    """Patch conv, LayerNorm, + the table resized with F.interpolate(bicubic), as the reference's helper does."""
    embeddings = model.vision_model.embeddings
    rows, cols = pixels.shape[2] // 4, pixels.shape[3] // 4
    table = embeddings.position_embeddings  # (1, 25, 30)
    grid = table.reshape(1, 5, 5, 30).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(rows, cols), mode="bicubic", align_corners=False)
    table = grid.permute(0, 2, 3, 1).reshape(1, rows * cols, 30)
    tokens = embeddings.patch_embeddings.projection(pixels).flatten(2).transpose(1, 2)
    return embeddings.layernorm(tokens) + table


@pytest.mark.parametrize("size", [(24, 32), (32, 16), (12, 12), (4, 8), (20, 20)])
def test_interpolated_position_table_matches_torch_bicubic(tiny, size):
    pixels = torch.from_numpy(_inputs(tiny.config, image_size=size)["pixel_values"])
    with torch.no_grad():
        got = tiny.vision_model.embeddings(pixels, interpolate_pos_encoding=True)
        expected = _direct_embeddings(tiny, pixels)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        if size == (20, 20):  # the table's own grid: used as is
            plain = tiny.vision_model.embeddings(pixels)
            torch.testing.assert_close(got, plain, rtol=0, atol=0)
            torch.testing.assert_close(expected, plain, rtol=1e-6, atol=1e-6)
        # The whole tower on top of the direct embeddings.
        out = tiny.vision_model(pixels, interpolate_pos_encoding=True)
        last = tiny.vision_model.layernorm(tiny.vision_model.encoder(expected)[0])
        torch.testing.assert_close(out.last_hidden_state, last, rtol=1e-4, atol=1e-4)


def test_interpolation_gradient_reaches_the_position_table(tiny):
    model = _model("tiny_odd")
    pixels = torch.from_numpy(_inputs(model.config, image_size=(24, 32))["pixel_values"])
    model.vision_model.embeddings(pixels, interpolate_pos_encoding=True).sum().backward()
    grad = model.vision_model.embeddings.position_embeddings.grad
    assert grad is not None and float(grad.abs().min()) > 0


@pytest.mark.parametrize("size", [(24, 32), (32, 16), (20, 20)])
def test_segmentation_matches_direct_computation(tiny, size):
    inputs = _inputs(tiny.config, images=2, texts=3, image_size=size)
    height, width = size
    out = _run(tiny, inputs, output_segmentation=True, interpolate_pos_encoding=size != (20, 20))
    assert out.segmentation_logits.shape == (2, 3, height, width)
    with torch.no_grad():
        first, second = out.vision_model_output.attentions  # (B, 7, N), (B, 3, 7)
        grouping = (first.transpose(1, 2) @ second.transpose(1, 2)).transpose(1, 2)  # (B, 3, N)
        rows, cols = height // 4, width // 4
        grouping = F.interpolate(grouping.reshape(2, 3, rows, cols), size=(height, width), mode="bilinear",
                                 align_corners=False)
        groups = out.vision_model_output.last_hidden_state.reshape(6, 30)
        group_embeds = tiny.visual_projection(groups)
        group_embeds = group_embeds / group_embeds.norm(dim=-1, keepdim=True)
        scale = tiny.logit_scale.exp()
        per_group = (group_embeds @ out.text_embeds.t() * scale).reshape(2, 3, 3).permute(0, 2, 1)
        expected = (per_group @ grouping.reshape(2, 3, -1) * scale).reshape(2, 3, height, width)
    torch.testing.assert_close(out.segmentation_logits, expected, rtol=1e-4, atol=2e-3)


def test_two_stage_segmentation_with_interpolation():
    model = _model("two_stage")
    inputs = random_inputs(model.config, 2, 2, seed=0, image_size=(40, 64))
    out = _run(model, inputs, output_segmentation=True, interpolate_pos_encoding=True)
    assert out.segmentation_logits.shape == (2, 2, 40, 64)
    assert [tuple(a.shape) for a in out.vision_model_output.attentions] == [(2, 12, 40), (2, 4, 12)]
    assert torch.isfinite(out.segmentation_logits).all()


# ----------------------------------------------------------------------------------------------------------------
# Training mode
# ----------------------------------------------------------------------------------------------------------------

# Parameters whose gradient is zero by construction of the reference architecture (float noise only):
# * k_proj.bias of every softmax attention: it shifts all scores of a query by the same amount, which the
#   softmax over keys cancels;
# * assign.q_proj.bias: the assignment softmax runs over GROUPS, and the query bias shifts all groups' scores of
#   a token equally (the hard map's gradient is the soft map's, straight-through);
# * visual_projection.0.bias / text_projection.0.bias: in training the BatchNorm that follows subtracts the batch
#   mean, which removes any bias;
# * mlp_inter.fc2.bias / group_projector.1.fc2.bias: token-axis MLPs, so fc2's bias adds one constant to all
#   channels of a token, and every consumer of those tokens starts with a LayerNorm, which removes it.
STRUCTURALLY_ZERO = (".self_attn.k_proj.bias", ".attn.k_proj.bias", ".assign.q_proj.bias", "projection.0.bias",
                     ".mlp_inter.fc2.bias", ".group_projector.1.fc2.bias")


@pytest.mark.parametrize("name", ["tiny_odd", "two_stage"])
def test_training_gradients_reach_every_parameter(name):
    model = _model(name).train()
    inputs = _inputs(model.config, images=4, texts=4, seed=3)
    torch.manual_seed(0)
    out = model(inputs["input_ids"], inputs["pixel_values"], attention_mask=inputs["attention_mask"],
                return_loss=True, output_segmentation=True, output_hidden_states=True)
    vision, text = out.vision_model_output, out.text_model_output
    objective = (out.loss + 1e-3 * out.segmentation_logits.square().mean()
                 + vision.last_hidden_state.square().mean() + text.last_hidden_state.square().mean()
                 + sum(h.square().mean() for h in vision.hidden_states))
    objective.backward()
    sizes = {n: float(p.grad.abs().max()) if p.grad is not None else 0.0 for n, p in model.named_parameters()}
    largest = max(sizes.values())
    zero = {n for n, size in sizes.items() if size <= 1e-5 * largest}
    expected_zero = {n for n in sizes if n.endswith(STRUCTURALLY_ZERO)}
    assert zero == expected_zero
    for n, size in sizes.items():
        if n not in expected_zero:
            assert size >= 1e-3 * largest, (n, size, largest)


def test_gumbel_switch_propagates_and_is_deterministic_when_off():
    model = _model("tiny_odd")
    assigns = [m for m in model.modules() if isinstance(m, modeling.GroupViTAssignAttention)]
    assert len(assigns) == 2 and model.gumbel
    pixels = _inputs(model.config)["pixel_values"]
    with torch.no_grad():
        evaluated = model.vision_model(pixels, output_attentions=True)
        model.train()
        torch.manual_seed(0)
        noisy = [model.vision_model(pixels).last_hidden_state for _ in range(4)]
        assert model.set_gumbel(False) is model and not model.gumbel
        assert not any(m._gumbel for m in assigns)
        quiet = model.vision_model(pixels, output_attentions=True)
    # Without noise, training mode computes exactly the eval forward (dropout is 0, BatchNorm is not in the tower).
    torch.testing.assert_close(quiet.last_hidden_state, evaluated.last_hidden_state, rtol=0, atol=0)
    # With noise, some hard assignment flips in at least one of the draws.
    assert any(not torch.allclose(n, evaluated.last_hidden_state) for n in noisy)
    model.gumbel = True
    assert all(m._gumbel for m in assigns)
    vision_only = GroupViTVisionModel(model.config.vision_config)
    vision_only.set_gumbel(False)
    assert not vision_only.gumbel


def test_gumbel_softmax_samples_the_softmax():
    """Gumbel-max: the hard sample's argmax is distributed as softmax(logits); the noise is seeded."""
    logits = torch.tensor([1.0, 0.0, -1.0, 0.5]).log_softmax(0)
    samples = modeling.gumbel_softmax(logits.expand(20000, 4), axis=-1, hard=True,
                                      generator=torch.Generator().manual_seed(0))
    assert set(samples.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(samples.sum(-1), torch.ones(20000))
    torch.testing.assert_close(samples.mean(0), logits.softmax(0), rtol=0, atol=0.015)
    again = modeling.gumbel_softmax(logits.expand(20000, 4), axis=-1, hard=True,
                                    generator=torch.Generator().manual_seed(0))
    assert torch.equal(samples, again)
    soft = modeling.gumbel_softmax(logits, axis=0, hard=False)
    torch.testing.assert_close(soft.sum(), torch.tensor(1.0))


def test_hard_softmax_ties_go_to_the_lowest_index_and_pass_the_soft_gradient():
    logits = torch.tensor([[1.0, 3.0, 3.0], [2.0, 2.0, 0.0]], requires_grad=True)
    hard = modeling.hard_softmax(logits, axis=-1)
    assert hard.argmax(-1).tolist() == [1, 0]
    assert torch.equal(hard.detach().round(), torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]))
    weights = torch.tensor([[0.3, -1.0, 2.0], [1.0, 0.5, -0.2]])
    (hard * weights).sum().backward()
    soft_logits = logits.detach().clone().requires_grad_(True)
    (soft_logits.softmax(-1) * weights).sum().backward()
    torch.testing.assert_close(logits.grad, soft_logits.grad)
    along_groups = modeling.hard_softmax(torch.tensor([[0.0, 5.0], [5.0, 5.0]]), axis=-2)
    assert along_groups.argmax(-2).tolist() == [1, 0]


def test_batchnorm_running_statistics_follow_torch_batchnorm1d():
    model = _model("tiny_odd").train()
    model.set_gumbel(False)
    captured = {}

    def capture(name):
        def hook(module, args, output):  # returns None: the output is left alone
            captured[name] = args[0].detach().clone()
        return hook

    for name in ("visual_projection", "text_projection"):
        getattr(model, name)[1].register_forward_hook(capture(name))
    before = {k: v.copy() for k, v in model.canonical_state().items() if ".1." in k and "projection" in k}
    inputs = _inputs(model.config, images=4, texts=4, seed=2)
    with torch.no_grad():
        model(inputs["input_ids"], inputs["pixel_values"], attention_mask=inputs["attention_mask"])
    after = model.canonical_state()
    for name in ("visual_projection", "text_projection"):
        features = captured[name].double()
        reference = torch.nn.BatchNorm1d(features.shape[1], eps=1e-5, momentum=0.1).double().train()
        reference.running_mean.copy_(torch.from_numpy(before[f"{name}.1.running_mean"]))
        reference.running_var.copy_(torch.from_numpy(before[f"{name}.1.running_var"]))
        reference.num_batches_tracked.fill_(int(before[f"{name}.1.num_batches_tracked"]))
        reference(features)
        # By hand: momentum 0.1 on the batch mean and the UNBIASED batch variance; the counter steps by one.
        mean = 0.9 * before[f"{name}.1.running_mean"] + 0.1 * features.mean(0).numpy()
        var = 0.9 * before[f"{name}.1.running_var"] + 0.1 * features.var(0, unbiased=True).numpy()
        np.testing.assert_allclose(after[f"{name}.1.running_mean"], mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(after[f"{name}.1.running_var"], var, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(after[f"{name}.1.running_mean"], reference.running_mean.numpy(), rtol=1e-5,
                                   atol=1e-6)
        np.testing.assert_allclose(after[f"{name}.1.running_var"], reference.running_var.numpy(), rtol=1e-5,
                                   atol=1e-6)
        assert after[f"{name}.1.num_batches_tracked"] == before[f"{name}.1.num_batches_tracked"] + 1
    # In eval mode the statistics are used, not updated.
    model.eval()
    with torch.no_grad():
        model(inputs["input_ids"], inputs["pixel_values"], attention_mask=inputs["attention_mask"])
    final = model.canonical_state()
    assert all(np.array_equal(final[k], after[k]) for k in before)


# ----------------------------------------------------------------------------------------------------------------
# Fresh initialisation
# ----------------------------------------------------------------------------------------------------------------


def test_fresh_model_runs_and_follows_the_reference_initialisation():
    config = test_config("small")
    torch.manual_seed(0)
    model = GroupViTModel(config).eval()
    inputs = random_inputs(config, 2, 2, seed=0)
    out = _run(model, inputs, return_loss=True, output_segmentation=True)
    assert all(torch.isfinite(v).all() for v in _flatten(out).values())
    state = model.state_dict()
    assert float(state["logit_scale"]) == pytest.approx(config.logit_scale_init_value)
    for name, tensor in state.items():
        if name.endswith(("position_embeddings", "group_token")):
            assert float(tensor.abs().max()) == 0.0, name  # zeros, as the reference leaves them
    for module in model.modules():
        if isinstance(module, (torch.nn.LayerNorm, torch.nn.BatchNorm1d)):
            assert torch.equal(module.weight, torch.ones_like(module.weight))
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.LayerNorm, torch.nn.BatchNorm1d)):
            assert float(module.bias.detach().abs().max()) == 0.0
    # Standard deviations of the reference's _init_weights (2 text layers, hidden 32; joint model: factor 1).
    text_layers = config.text_config.num_hidden_layers
    q = state["text_model.encoder.layers.0.self_attn.q_proj.weight"]
    assert float(q.std()) == pytest.approx(32 ** -0.5 * (2 * text_layers) ** -0.5, rel=0.15)
    out_proj = state["text_model.encoder.layers.0.self_attn.out_proj.weight"]
    assert float(out_proj.std()) == pytest.approx(32 ** -0.5, rel=0.15)
    fc1 = state["vision_model.encoder.stages.0.layers.0.mlp.fc1.weight"]
    assert float(fc1.std()) == pytest.approx((2 * 32) ** -0.5, rel=0.15)
    assign = state["vision_model.encoder.stages.0.downsample.assign.q_proj.weight"]
    assert float(assign.std()) == pytest.approx(0.02, rel=0.15)
    token = state["text_model.embeddings.token_embedding.weight"]
    assert float(token.std()) == pytest.approx(0.02, rel=0.05)
    bn = model.visual_projection[1]
    assert bn.eps == 1e-5 and bn.momentum == 0.1
    assert torch.equal(bn.running_var, torch.ones_like(bn.running_var))


def test_import_does_not_load_dynamo():
    # torch.compile's machinery (torch._dynamo: ~1 s and ~70 MB) is loaded only by a user who compiles
    import subprocess
    import sys

    code = "import sys, groupvit_pt; print('torch._dynamo' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_torch_compile_traces_the_forward_with_segmentation(tiny):
    # dynamo must trace the whole forward (the numpy-built resize matrices run eagerly, outside the graph);
    # backend="eager" checks the tracing without paying for code generation
    torch._dynamo.reset()
    inputs = {k: torch.from_numpy(v) for k, v in _inputs(tiny.config).items()}
    expected = _run(tiny, inputs, output_segmentation=True)
    compiled = torch.compile(tiny, backend="eager", fullgraph=False)
    got = _run(compiled, inputs, output_segmentation=True)
    for key in ("logits_per_image", "segmentation_logits"):
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-5)
    features = torch.compile(tiny.get_image_features, backend="eager")(inputs["pixel_values"])
    torch.testing.assert_close(features, tiny.get_image_features(inputs["pixel_values"]), rtol=1e-5, atol=1e-5)
