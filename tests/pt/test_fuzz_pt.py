"""Fuzz tests for groupvit_pt: bad model inputs, damaged or hostile checkpoints, interrupted saves (PyTorch).

Twin of tests/tf/test_fuzz_tf.py. Every call ends in a result of the documented shapes or in a ValueError /
TypeError / OSError whose message names the offending input or file; no other exception type escapes. The model
is a very small GroupViT loaded with ``GroupViTModel.from_pretrained`` from a checkpoint written by
``groupvit_core.loading.save_pretrained``; hypothesis runs derandomized and bounded.

Tests marked ``xfail(strict=True)`` reproduce open bugs; the reason gives the reproduction and the proposed fix.
"""

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")

from groupvit_core import loading  # noqa: E402
from groupvit_core.testing import random_inputs, random_weights  # noqa: E402
from tests.fuzz_checkpoints import CLEAN_ERRORS, CheckpointCases, make_outcome, small_config  # noqa: E402
from groupvit_pt import GroupViTModel, GroupViTTextModel, GroupViTVisionModel  # noqa: E402

FUZZ = settings(max_examples=80, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
INPUT_NAMES = ("input_ids", "pixel_values", "attention_mask", "position_ids", "return_loss", "texts", "images",
               "interpolate_pos_encoding")


outcome = make_outcome(torch.no_grad)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("pt_fuzz_checkpoint")
    config = small_config()
    loading.save_pretrained(directory, config, random_weights(config, seed=5))
    return directory


@pytest.fixture(scope="module")
def model(checkpoint):
    return GroupViTModel.from_pretrained(checkpoint)


# ----------------------------------------------------------------------------------------------------------------
# Model inputs

_ID_DTYPES = ["int64", "int32", "int16", "int8", "uint8", "uint16", "uint32", "uint64", "float32", "bool",
              "complex64", "<U1", "object"]
_PIXEL_DTYPES = ["float32", "float64", "float16", "int32", "uint8", "bool", "complex64", "object"]
_TORCH_DTYPES = ("int64", "int32", "int16", "int8", "uint8", "float64", "float32", "float16", "bool", "complex64")


@st.composite
def arrays(draw, dtypes, ranks, dims, low, high, specials=()):
    rank = draw(st.sampled_from(ranks))
    shape = tuple(draw(st.sampled_from(dims)) for _ in range(rank))
    rng = np.random.RandomState(draw(st.integers(0, 2**16)))
    values = rng.randint(low, high, size=shape).astype(np.float64)
    if specials and values.size and draw(st.booleans()):
        values.reshape(-1)[rng.randint(values.size)] = draw(st.sampled_from(specials))
    dtype = draw(st.sampled_from(dtypes))
    with np.errstate(all="ignore"):
        array = values.astype(dtype) if dtype not in ("<U1", "object") else values.astype(np.int64).astype(dtype)
    if draw(st.integers(0, 3)) == 0 and array.dtype.name in _TORCH_DTYPES:
        return torch.from_numpy(np.ascontiguousarray(array))  # the same values as a torch tensor
    return array


def model_inputs(config):
    text, vision = config.text_config, config.vision_config
    ids = arrays(_ID_DTYPES, [2, 2, 2, 1, 3, 0], [0, 1, 2, 3, 5, 6], -2, text.vocab_size + 2,
                 specials=(2**40, -(2**40)))
    mask = st.one_of(st.none(), arrays(["int64", "float32", "bool", "uint8", "<U1"], [2, 2, 1], [0, 1, 2, 3, 5],
                                       0, 2, specials=(np.nan, 7)))
    positions = st.one_of(st.none(), st.none(), arrays(["int64", "int32", "float32"], [1, 2], [1, 2, 3, 5], -1, 6))
    pixels = arrays(_PIXEL_DTYPES, [4, 4, 4, 3, 5], [0, 1, 2, 3, 4, 8, 12], -3, 3,
                    specials=(np.nan, np.inf, -np.inf, 1e30))
    flags = {"return_loss": st.booleans(), "output_segmentation": st.booleans(),
             "interpolate_pos_encoding": st.booleans(), "output_attentions": st.booleans()}
    wild = st.fixed_dictionaries(dict(flags, input_ids=ids, pixel_values=pixels, attention_mask=mask,
                                      position_ids=positions))
    return st.one_of(wild, near_valid_inputs(config, flags))


_PERTURBATIONS = [None, None, "ids_dtype", "id_value", "ids_rank", "ids_length", "mask_shape", "mask_dtype",
                  "mask_values", "pixels_dtype", "pixels_value", "pixels_size", "pixels_channels", "positions",
                  "as_tensors", "as_lists"]


@st.composite
def near_valid_inputs(draw, config, flags):
    """Valid inputs (random_inputs) with at most one thing wrong, so the fuzzer also reaches the model's depth."""
    images, texts = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    inputs = random_inputs(config, batch_images=images, batch_texts=texts, seed=draw(st.integers(0, 999)))
    inputs.update({name: draw(strategy) for name, strategy in flags.items()})
    inputs["position_ids"] = None
    ids, mask, pixels = inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"]
    vocab, positions = config.text_config.vocab_size, config.text_config.max_position_embeddings
    change = draw(st.sampled_from(_PERTURBATIONS))
    if change == "ids_dtype":
        inputs["input_ids"] = ids.astype(draw(st.sampled_from(_ID_DTYPES)))
    elif change == "id_value":
        ids = ids.copy()
        ids.reshape(-1)[draw(st.integers(0, ids.size - 1))] = draw(st.sampled_from([-1, vocab, vocab + 100, 2**40]))
        inputs["input_ids"] = ids
    elif change == "ids_rank":
        inputs["input_ids"] = draw(st.sampled_from([ids[0], ids[None], ids[:, :, None], ids[0, 0]]))
    elif change == "ids_length":
        length = draw(st.sampled_from([0, positions + 1, positions + 7]))
        inputs["input_ids"] = np.resize(ids, (texts, length))
        inputs["attention_mask"] = np.resize(mask, (texts, length))
    elif change == "mask_shape":
        inputs["attention_mask"] = draw(st.sampled_from([mask[:, :-1], mask[:1], mask[None], mask.T]))
    elif change == "mask_dtype":
        inputs["attention_mask"] = mask.astype(draw(st.sampled_from(["bool", "float16", "uint8", "<U1", "object"])))
    elif change == "mask_values":
        with np.errstate(invalid="ignore"):  # 0 * inf
            inputs["attention_mask"] = mask * draw(st.sampled_from([2, -1, np.nan, np.inf]))
    elif change == "pixels_dtype":
        inputs["pixel_values"] = pixels.astype(draw(st.sampled_from(_PIXEL_DTYPES)))
    elif change == "pixels_value":
        pixels = pixels.copy()
        pixels.reshape(-1)[draw(st.integers(0, pixels.size - 1))] = draw(st.sampled_from([np.nan, np.inf, 1e38]))
        inputs["pixel_values"] = pixels
    elif change == "pixels_size":
        height, width = draw(st.sampled_from([(0, 0), (4, 4), (4, 12), (6, 8), (12, 12), (16, 4), (1, 8)]))
        inputs["pixel_values"] = np.resize(pixels, (images, 3, height, width))
    elif change == "pixels_channels":
        inputs["pixel_values"] = draw(st.sampled_from([pixels[:, :1], pixels.transpose(0, 2, 3, 1), pixels[0],
                                                       np.concatenate([pixels, pixels], axis=1)]))
    elif change == "positions":
        length = ids.shape[1]
        inputs["position_ids"] = draw(st.sampled_from([np.arange(length), np.arange(length)[None] + 1,
                                                       np.arange(length + 1), np.zeros((texts, length), np.int64),
                                                       -np.arange(length), np.arange(length).astype(np.float32)]))
    elif change == "as_tensors":
        inputs["input_ids"], inputs["pixel_values"] = torch.from_numpy(ids), torch.from_numpy(pixels)
        inputs["attention_mask"] = torch.from_numpy(mask)
    elif change == "as_lists":
        inputs["input_ids"], inputs["attention_mask"] = ids.tolist(), mask.tolist()
    return inputs


def check_output(output, inputs):
    texts, images = np.shape(inputs["input_ids"])[0], np.shape(inputs["pixel_values"])[0]
    assert tuple(output.logits_per_image.shape) == (images, texts)
    assert tuple(output.logits_per_text.shape) == (texts, images)
    if inputs["return_loss"]:
        assert output.loss is not None and output.loss.dim() == 0
    if inputs["output_segmentation"]:
        height, width = np.shape(inputs["pixel_values"])[2:]
        assert tuple(output.segmentation_logits.shape) == (images, texts, height, width)


def test_random_model_inputs_give_outputs_or_name_the_input(model):
    @FUZZ
    @given(inputs=model_inputs(model.config))
    def run(inputs):
        result = outcome(lambda: model(**inputs), *INPUT_NAMES, "output_segmentation")
        event("error" if isinstance(result, Exception) else "output")
        if not isinstance(result, Exception):
            check_output(result, inputs)

    run()


def test_towers_take_fuzzed_inputs(checkpoint):
    text_model = GroupViTTextModel.from_pretrained(checkpoint)
    vision_model = GroupViTVisionModel.from_pretrained(checkpoint)
    strategy = model_inputs(small_config())

    @settings(FUZZ, max_examples=25)
    @given(inputs=strategy)
    def run(inputs):
        text = outcome(lambda: text_model(inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                          position_ids=inputs["position_ids"]), *INPUT_NAMES)
        if not isinstance(text, Exception):
            assert text.pooler_output.shape[0] == np.shape(inputs["input_ids"])[0]
        vision = outcome(lambda: vision_model(inputs["pixel_values"],
                                              interpolate_pos_encoding=inputs["interpolate_pos_encoding"]),
                         *INPUT_NAMES)
        if not isinstance(vision, Exception):
            assert vision.pooler_output.shape[0] == np.shape(inputs["pixel_values"])[0]

    run()


def _good_inputs(config):
    return random_inputs(config, batch_images=2, batch_texts=3, seed=1)


@pytest.mark.parametrize("change,name", [
    (dict(input_ids=np.zeros((3,), np.int64), attention_mask=None), "input_ids"),  # wrong rank
    (dict(input_ids=np.zeros((1, 3, 2), np.int64), attention_mask=None), "input_ids"),
    (dict(input_ids=np.zeros((3, 4), np.float32), attention_mask=None), "input_ids"),  # wrong dtype
    (dict(input_ids=np.zeros((0, 4), np.int64), attention_mask=None), "input_ids"),  # empty batch
    (dict(input_ids=np.zeros((3, 0), np.int64), attention_mask=None), "input_ids"),  # no tokens
    (dict(input_ids=np.full((3, 4), 30, np.int64), attention_mask=None), "input_ids"),  # id == vocab_size
    (dict(input_ids=np.full((3, 4), -1, np.int64), attention_mask=None), "input_ids"),
    (dict(input_ids=np.full((3, 4), 2**62, np.int64), attention_mask=None), "input_ids"),
    (dict(input_ids=np.ones((3, 6), np.int64), attention_mask=None), "max_position_embeddings"),  # > table
    (dict(input_ids=[[1, 2], [3]], attention_mask=None), "input_ids"),  # ragged
    (dict(input_ids=None), "input_ids"),
    (dict(attention_mask=np.ones((3, 2), np.int64)), "attention_mask"),
    (dict(attention_mask=np.full((3, 5), "1")), "attention_mask"),
    (dict(position_ids=np.arange(5) + 1), "position_ids"),
    (dict(position_ids=np.arange(2)), "position_ids"),
    (dict(pixel_values=np.zeros((3, 8, 8), np.float32)), "pixel_values"),
    (dict(pixel_values=np.zeros((0, 3, 8, 8), np.float32)), "pixel_values"),
    (dict(pixel_values=np.zeros((2, 8, 8, 3), np.float32)), "pixel_values"),  # channels last
    (dict(pixel_values=np.zeros((2, 3, 12, 12), np.float32)), "pixel_values"),
    (dict(pixel_values=np.zeros((2, 3, 6, 6), np.float32), interpolate_pos_encoding=True),
     "interpolate_pos_encoding"),
    (dict(pixel_values=np.zeros((2, 3, 8, 8), bool)), "pixel_values"),
    (dict(pixel_values=None), "pixel_values"),
    (dict(return_loss=True), "return_loss"),  # 3 texts, 2 images
])
def test_bad_inputs_are_value_errors_naming_the_input(model, change, name):
    inputs = dict(_good_inputs(model.config), **change)
    inputs.setdefault("attention_mask", None)
    error = outcome(lambda: model(**inputs), name)
    assert isinstance(error, ValueError), error


def test_odd_but_valid_inputs_give_outputs(model):
    inputs = _good_inputs(model.config)
    ids, mask, pixels = inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"]
    for change in (dict(input_ids=ids.astype(np.int32)), dict(input_ids=ids.astype(np.uint8)),
                   dict(input_ids=ids.tolist()), dict(attention_mask=mask.astype(bool)),
                   dict(attention_mask=np.zeros_like(mask)), dict(pixel_values=pixels.astype(np.float64)),
                   dict(pixel_values=pixels.astype(np.float16)), dict(pixel_values=np.full_like(pixels, np.nan)),
                   dict(pixel_values=torch.from_numpy(pixels).to(torch.bfloat16)),
                   dict(pixel_values=np.zeros((1, 3, 4, 12), np.float32), interpolate_pos_encoding=True,
                        output_segmentation=True)):
        output = outcome(lambda: model(**dict(inputs, **change)))
        assert not isinstance(output, Exception), (change, output)


@pytest.mark.parametrize("make", [lambda pixels: torch.from_numpy(pixels).to_sparse(),
                                  lambda pixels: torch.empty(pixels.shape, device="meta")], ids=["sparse", "meta"])
def test_exotic_tensor_layouts_are_named(model, make):
    """Sparse and meta tensors are refused by name before they reach torch ops (was bug F20)."""
    inputs = _good_inputs(model.config)
    inputs["pixel_values"] = make(inputs["pixel_values"])
    error = outcome(lambda: model(**inputs), "pixel_values")
    assert isinstance(error, CLEAN_ERRORS), error


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints


class TestCheckpoints(CheckpointCases):
    """The shared checkpoint cases (tests/fuzz_checkpoints.py) with the PyTorch models."""

    MODEL, TEXT_MODEL, VISION_MODEL = GroupViTModel, GroupViTTextModel, GroupViTVisionModel
    DAMAGED_EXAMPLES = 40
    outcome = staticmethod(outcome)
