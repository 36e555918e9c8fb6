"""groupvit_tf's Keras models: weight mapping, checkpoints, graph modes, Keras serialisation, training, errors.

Numbers against the reference implementation live in test_golden.py; here every expected value comes from
groupvit_core (weight table, random weights, numpy resize matrices), from numpy formulas, or from the same
model run eagerly. Graph-mode tests use MICRO, a one-layer config, because TensorFlow traces and XLA compiles
slowly; models are shared per module.
"""

import os
import subprocess
import sys

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from groupvit_core import loading  # noqa: E402
from groupvit_core.config import GroupViTConfig  # noqa: E402
from groupvit_core.outputs import BaseModelOutputWithPooling, GroupViTModelOutput  # noqa: E402
from groupvit_core.resize import bilinear_matrix, resize_grid  # noqa: E402
from groupvit_core.testing import PADDING_CASES, random_inputs, random_weights, test_config  # noqa: E402
from groupvit_core.weights import weight_specs  # noqa: E402
from groupvit_tf import TFGroupViTModel, TFGroupViTTextModel, TFGroupViTVisionModel  # noqa: E402
from groupvit_tf import modeling  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# One text layer, two grouping stages of one layer each: the smallest model that still segments.
MICRO = dict(
    text_config=dict(vocab_size=50, hidden_size=16, num_attention_heads=2, intermediate_size=20, num_hidden_layers=1,
                     max_position_embeddings=9, bos_token_id=48, eos_token_id=49),
    vision_config=dict(hidden_size=16, num_attention_heads=2, intermediate_size=20, patch_size=4, image_size=16,
                       depths=[1, 1], num_hidden_layers=2, num_group_tokens=[4, 2], num_output_groups=[4, 2]),
    projection_dim=8,
    projection_intermediate_dim=12,
)


def _loaded(model_class, config, seed=0):
    model = model_class(config, initialize=False)
    model.load_canonical_state(random_weights(config, seed))
    return model


def _np(value):
    return np.asarray(value.numpy() if hasattr(value, "numpy") else value)


def _assert_states_identical(got, expected):
    assert list(got) == list(expected) or sorted(got) == sorted(expected)
    for name, array in expected.items():
        assert got[name].dtype == np.asarray(array).dtype, name
        assert got[name].shape == np.shape(array), name  # assert_array_equal would broadcast () against (1,)
        np.testing.assert_array_equal(got[name], array, err_msg=name)


@pytest.fixture(scope="module")
def tiny():
    config = test_config("tiny_odd")
    return config, _loaded(TFGroupViTModel, config)


@pytest.fixture(scope="module")
def tiny_inputs(tiny):
    return random_inputs(tiny[0], 3, 3, seed=1)


@pytest.fixture(scope="module")
def tiny_outputs(tiny, tiny_inputs):
    _, model = tiny
    return model(tiny_inputs["input_ids"], tiny_inputs["pixel_values"], attention_mask=tiny_inputs["attention_mask"],
                 output_segmentation=True, output_hidden_states=True)


@pytest.fixture(scope="module")
def micro():
    config = GroupViTConfig(**MICRO)
    return config, _loaded(TFGroupViTModel, config)


@pytest.fixture(scope="module")
def micro_inputs(micro):
    config = micro[0]
    return {
        "big": random_inputs(config, 3, 3, seed=2),
        "small": random_inputs(config, 2, 1, seed=3, text_lengths=[5]),
    }


def _run_eager(model, inputs, **kwargs):
    return model(inputs["input_ids"], inputs["pixel_values"], attention_mask=inputs["attention_mask"], **kwargs)


# ------------------------------------------------------------------------------------------------------------
# Weight mapping and checkpoints
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny_odd", "two_stage"])
def test_canonical_variables_are_a_bijection_with_the_weight_table(name, tiny):
    config = test_config(name)
    model = tiny[1] if name == "tiny_odd" else TFGroupViTModel(config, initialize=False)
    variables = model.canonical_variables()
    specs = weight_specs(config)
    assert list(variables) == [spec.name for spec in specs]
    for spec in specs:
        variable = variables[spec.name]
        assert tuple(variable.shape) == spec.keras_shape, spec.name
        assert keras.backend.standardize_dtype(variable.dtype) == spec.dtype, spec.name
        assert variable.trainable == (not spec.is_buffer), spec.name
    # Every Keras variable of the model is a canonical tensor, once.
    assert len({id(v) for v in variables.values()}) == len(variables) == len(model.weights)
    assert len(model.trainable_weights) == sum(not spec.is_buffer for spec in specs)


def test_tower_models_map_their_prefix():
    config = test_config("tiny_odd")
    text = TFGroupViTTextModel(config.text_config, initialize=False)
    vision = TFGroupViTVisionModel(config.vision_config, initialize=False)
    assert list(text.canonical_variables()) == [s.name for s in weight_specs(config.text_config)]
    assert list(vision.canonical_variables()) == [s.name for s in weight_specs(config.vision_config)]


def test_canonical_state_round_trip_is_bit_identical(micro):
    config = micro[0]
    model = TFGroupViTModel(config, initialize=False)
    state = random_weights(config, seed=7)
    model.load_canonical_state(state)
    _assert_states_identical(model.canonical_state(), state)
    assert model.canonical_state()["visual_projection.1.num_batches_tracked"].dtype == np.int64


def test_load_canonical_state_is_strict_and_atomic(micro):
    config = micro[0]
    model = TFGroupViTModel(config, initialize=False)
    state = random_weights(config, seed=1)
    model.load_canonical_state(state)
    before = model.canonical_state()
    bad = dict(random_weights(config, seed=2))
    del bad["text_model.final_layer_norm.weight"]
    with pytest.raises(ValueError, match="missing 1 tensor"):
        model.load_canonical_state(bad)
    bad = dict(random_weights(config, seed=2), extra_tensor=np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="unexpected 1 tensor"):
        model.load_canonical_state(bad)
    bad = dict(random_weights(config, seed=2))
    bad["visual_projection.0.weight"] = bad["visual_projection.0.weight"].T
    with pytest.raises(ValueError, match="wrong shape"):
        model.load_canonical_state(bad)
    bad = dict(random_weights(config, seed=2))
    bad["logit_scale"] = np.asarray("2.0")
    with pytest.raises(ValueError, match="non-numeric"):
        model.load_canonical_state(bad)
    _assert_states_identical(model.canonical_state(), before)  # failed loads changed nothing

    # BatchNorm counters may be absent (files written by Keras): they become 0.
    partial = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    model.load_canonical_state(partial)
    got = model.canonical_state()
    assert got["text_projection.1.num_batches_tracked"] == 0
    np.testing.assert_array_equal(got["text_projection.1.running_var"], state["text_projection.1.running_var"])


@pytest.mark.parametrize("fmt", ["safetensors", "h5", "bin"])
def test_save_and_from_pretrained_round_trip(fmt, tiny, tiny_inputs, tiny_outputs, tmp_path):
    config, model = tiny
    path = model.save_pretrained(tmp_path, format=fmt)
    assert os.path.basename(path) == loading.WEIGHT_FILES[fmt]
    assert sorted(os.listdir(tmp_path)) == sorted(["config.json", loading.WEIGHT_FILES[fmt]])
    loaded = TFGroupViTModel.from_pretrained(tmp_path)
    assert loaded.config == config
    _assert_states_identical(loaded.canonical_state(), random_weights(config, 0))
    out = _run_eager(loaded, tiny_inputs, output_segmentation=True)
    for key in ("logits_per_image", "segmentation_logits", "text_embeds", "image_embeds"):
        np.testing.assert_allclose(_np(out[key]), _np(tiny_outputs[key]), rtol=1e-6, atol=1e-6, err_msg=key)


def test_from_pretrained_creates_the_variables_from_the_file_or_assigns_them(tiny, tmp_path, monkeypatch):
    import contextlib

    import keras

    config, _ = tiny
    state = random_weights(config, 3)
    file_state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}  # absent -> 0
    loading.save_pretrained(tmp_path, config, file_state)
    expected = dict(state, **{k: np.zeros_like(v) for k, v in state.items() if k.endswith("num_batches_tracked")})
    made = []
    constant = modeling._constant
    monkeypatch.setattr(modeling, "_constant", lambda value: made.append(value) or constant(value))
    deferred = TFGroupViTModel.from_pretrained(tmp_path)
    # With this Keras every variable was created holding its value (no placeholder, no assign).
    assert len(made) == len(weight_specs(config))
    _assert_states_identical(deferred.canonical_state(), expected)
    # A Keras that creates variables at once (no deferral in the scope): assigned after the build instead.
    made.clear()
    monkeypatch.setattr(keras, "StatelessScope", contextlib.nullcontext)
    assigned = TFGroupViTModel.from_pretrained(tmp_path)
    assert made == []
    _assert_states_identical(assigned.canonical_state(), expected)
    inputs = random_inputs(config, 2, 2, seed=4)
    np.testing.assert_array_equal(_np(_run_eager(deferred, inputs).logits_per_image),
                                  _np(_run_eager(assigned, inputs).logits_per_image))


def test_from_pretrained_frees_the_file_arrays_before_building(tiny, tmp_path, monkeypatch):
    # Peak memory: the arrays read from the file that were re-laid out for Keras (transposed kernels) must be gone
    # when the variables are made, or both copies are alive at once (~70 MB more at the default size).
    import gc
    import weakref

    config, model = tiny
    model.save_pretrained(tmp_path)
    read = []
    load_pretrained, built_with_values = loading.load_pretrained, modeling._built_with_values

    def load_and_watch(*args, **kwargs):
        config, state = load_pretrained(*args, **kwargs)
        read.extend(weakref.ref(array) for array in state.values())
        return config, state

    def build_after_check(cls, config, values):
        gc.collect()
        kept = set()  # the values and the arrays they are views of (memory shared, not copied)
        for array in values.values():
            while isinstance(array, np.ndarray):
                kept.add(id(array))
                array = array.base
        alive = [ref for ref in read if ref() is not None and id(ref()) not in kept]
        assert not alive, f"{len(alive)} arrays read from the file are still alive while building"
        return built_with_values(cls, config, values)

    monkeypatch.setattr(loading, "load_pretrained", load_and_watch)
    monkeypatch.setattr(modeling, "_built_with_values", build_after_check)
    TFGroupViTModel.from_pretrained(tmp_path)
    assert read and any(ref() is None for ref in read)  # some were re-laid out, and those are freed


def test_tower_models_load_from_a_full_checkpoint(tiny, tiny_inputs, tiny_outputs, tmp_path):
    config, model = tiny
    model.save_pretrained(tmp_path)
    text = TFGroupViTTextModel.from_pretrained(tmp_path)
    vision = TFGroupViTVisionModel.from_pretrained(tmp_path)
    assert text.config == config.text_config and vision.config == config.vision_config
    full = random_weights(config, 0)
    _assert_states_identical(text.canonical_state(), {k: v for k, v in full.items() if k.startswith("text_model.")})
    text_out = text(tiny_inputs["input_ids"], attention_mask=tiny_inputs["attention_mask"])
    vision_out = vision(tiny_inputs["pixel_values"], output_attentions=True)
    assert isinstance(text_out, BaseModelOutputWithPooling)
    np.testing.assert_allclose(_np(text_out.pooler_output), _np(tiny_outputs.text_model_output.pooler_output),
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(_np(vision_out.last_hidden_state),
                               _np(tiny_outputs.vision_model_output.last_hidden_state), rtol=1e-6, atol=1e-6)
    for got, expected in zip(vision_out.attentions, tiny_outputs.vision_model_output.attentions):
        np.testing.assert_allclose(_np(got), _np(expected), rtol=1e-6, atol=1e-7)
    # A tower checkpoint cannot become a full model.
    text.save_pretrained(tmp_path / "text")
    with pytest.raises(ValueError, match="GroupViTTextConfig"):
        TFGroupViTModel.from_pretrained(tmp_path / "text")


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(OSError):
        TFGroupViTModel.from_pretrained(tmp_path / "absent")
    with pytest.raises(TypeError, match="GroupViTConfig"):
        TFGroupViTModel(GroupViTConfig(**MICRO).text_config)


def test_from_pretrained_never_imports_torch(tmp_path):
    config = GroupViTConfig(**MICRO)
    state = random_weights(config, 0)
    for fmt in ("safetensors", "h5", "bin"):
        loading.save_pretrained(tmp_path / fmt, config, state, format=fmt)
    code = (
        "import sys\n"
        "from groupvit_tf import TFGroupViTModel\n"
        f"for fmt in ('safetensors', 'h5', 'bin'):\n"
        f"    TFGroupViTModel.from_pretrained({str(tmp_path)!r} + '/' + fmt)\n"
        "print('torch' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "False"


def test_other_keras_backend_is_refused():
    env = dict(os.environ, KERAS_BACKEND="jax")
    result = subprocess.run([sys.executable, "-c", "import groupvit_tf"], capture_output=True, text=True, cwd=ROOT,
                            env=env, timeout=120)
    assert result.returncode != 0
    assert "ImportError" in result.stderr and "KERAS_BACKEND='jax'" in result.stderr


# ------------------------------------------------------------------------------------------------------------
# Keras conventions: config, .keras files, SavedModel export
# ------------------------------------------------------------------------------------------------------------


def test_get_config_and_from_config(micro):
    config, model = micro
    assert model.get_config() == config.to_dict()
    for model_class, model_config in ((TFGroupViTModel, config), (TFGroupViTTextModel, config.text_config),
                                      (TFGroupViTVisionModel, config.vision_config)):
        rebuilt = model_class.from_config(model_config.to_dict())
        assert type(rebuilt) is model_class and rebuilt.config == model_config
        assert rebuilt.get_config() == model_config.to_dict()


def test_keras_file_round_trip(micro, micro_inputs, tmp_path):
    config, model = micro
    path = str(tmp_path / "micro.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert type(loaded) is TFGroupViTModel and loaded.config == config
    _assert_states_identical(loaded.canonical_state(), model.canonical_state())
    inputs = micro_inputs["big"]
    np.testing.assert_array_equal(_np(_run_eager(loaded, inputs).logits_per_image),
                                  _np(_run_eager(model, inputs).logits_per_image))


def test_keras_predict_returns_the_output_mapping():
    config = GroupViTConfig(**MICRO).text_config
    model = _loaded(TFGroupViTTextModel, config)
    ids = random_inputs(config, 0, 5, seed=1)["input_ids"]
    predicted = model.predict(ids, batch_size=2, verbose=0)  # three batches, concatenated by Keras
    assert isinstance(predicted, BaseModelOutputWithPooling)
    np.testing.assert_allclose(predicted.pooler_output, _np(model(ids).pooler_output), rtol=1e-5, atol=1e-6)


def test_export_serves_logits_and_segmentation(micro, micro_inputs, tmp_path):
    _, model = micro
    model.export(str(tmp_path / "saved"))
    served = tf.saved_model.load(str(tmp_path / "saved"))
    for inputs in micro_inputs.values():  # two batch sizes and text lengths through one signature
        result = served.serve(input_ids=tf.constant(inputs["input_ids"]),
                              attention_mask=tf.constant(inputs["attention_mask"]),
                              pixel_values=tf.constant(inputs["pixel_values"]))
        expected = _run_eager(model, inputs, output_segmentation=True)
        assert set(result) == {"logits_per_image", "logits_per_text", "text_embeds", "image_embeds",
                               "segmentation_logits"}
        np.testing.assert_allclose(result["logits_per_image"].numpy(), _np(expected.logits_per_image),
                                   rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(result["segmentation_logits"].numpy(), _np(expected.segmentation_logits),
                                   rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="tf_saved_model"):
        model.export(str(tmp_path / "other"), format="onnx")


# ------------------------------------------------------------------------------------------------------------
# Graph modes
# ------------------------------------------------------------------------------------------------------------

SIGNATURE = [tf.TensorSpec([None, None], tf.int64), tf.TensorSpec([None, None], tf.int64),
             tf.TensorSpec([None, 3, 16, 16], tf.float32)]


@pytest.fixture(scope="module")
def traced(micro):
    _, model = micro

    @tf.function(input_signature=SIGNATURE)
    def run(input_ids, attention_mask, pixel_values):
        return model(input_ids, pixel_values, attention_mask=attention_mask, output_segmentation=True)

    return run


def test_tf_function_dynamic_batch_and_length(micro, micro_inputs, traced):
    _, model = micro
    for inputs in micro_inputs.values():
        out = traced(inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"])
        assert isinstance(out, GroupViTModelOutput)
        assert isinstance(out.vision_model_output, BaseModelOutputWithPooling)
        expected = _run_eager(model, inputs, output_segmentation=True)
        for key in ("logits_per_image", "logits_per_text", "text_embeds", "image_embeds"):
            np.testing.assert_allclose(_np(out[key]), _np(expected[key]), rtol=1e-5, atol=1e-5, err_msg=key)
        np.testing.assert_allclose(_np(out.segmentation_logits), _np(expected.segmentation_logits), rtol=1e-5,
                                   atol=1e-4)
        for got, want in zip(out.vision_model_output.attentions, expected.vision_model_output.attentions):
            np.testing.assert_allclose(_np(got), _np(want), atol=1e-6)
    assert traced.experimental_get_tracing_count() == 1


@pytest.fixture(scope="module")
def tiny_text(tiny):
    return _loaded(TFGroupViTTextModel, tiny[0].text_config)


@pytest.mark.parametrize("padding", sorted(PADDING_CASES))
def test_padded_text_leaves_out_keys_no_text_attends(tiny, tiny_text, padding):
    """The forward runs the text attention over the keys up to the last one any text attends to, eagerly and
    traced: as the reference's attention over all positions (the rest have zero weight), padded positions'
    outputs included; a text masked at its first position keeps them all (its first rows see only masked keys)."""
    mask, kept = PADDING_CASES[padding]
    ids = tf.constant(random_inputs(tiny[0], 0, 3, seed=1, text_lengths=[9, 9, 9])["input_ids"])
    mask = tf.constant(mask, dtype=tf.int64)
    text = tiny_text.text_model
    assert int(modeling._attended_keys(mask)) == kept
    eager = text(ids, attention_mask=mask, output_attentions=True)
    outputs = [tiny_text(ids, attention_mask=mask, output_attentions=True) for _ in range(2)]  # traced from the 2nd
    # every position as a key, through the same layers
    last, _, weights = text.encoder(text.embeddings(ids), attention_mask=text._additive_mask(ids, mask),
                                    output_attentions=True)
    last = text.final_layer_norm(last)
    for out, tolerance in zip([eager] + outputs, (1e-6, 1e-5, 1e-5)):
        np.testing.assert_allclose(_np(out.last_hidden_state), _np(last), rtol=tolerance, atol=tolerance)
        assert len(out.attentions) == len(weights)
        for got, expected in zip(out.attentions, weights):
            assert tuple(got.shape) == tuple(expected.shape) == (3, tiny[0].text_config.num_attention_heads, 9, 9)
            np.testing.assert_allclose(_np(got), _np(expected), rtol=tolerance, atol=tolerance)
            assert not np.any(_np(got)[..., kept:])
    assert any(tiny_text.__dict__["_graph_functions"].values()), "no call ran a traced graph"


def test_padded_text_leaves_out_keys_under_xla(tiny, tiny_text):
    """The kept key count is a run-time value: XLA compiles it as a bounded dynamic size."""
    mask = tf.constant(PADDING_CASES["right"][0], dtype=tf.int64)
    ids = tf.constant(random_inputs(tiny[0], 0, 3, seed=1, text_lengths=[9, 9, 9])["input_ids"])
    text = tiny_text.text_model

    @tf.function(jit_compile=True)
    def run(input_ids, attention_mask):
        return text(input_ids, attention_mask=attention_mask, output_attentions=True)

    out, expected = run(ids, mask), text(ids, attention_mask=mask, output_attentions=True)
    np.testing.assert_allclose(_np(out.last_hidden_state), _np(expected.last_hidden_state), rtol=1e-5, atol=1e-5)
    for got, want in zip(out.attentions, expected.attentions):
        np.testing.assert_allclose(_np(got), _np(want), rtol=1e-5, atol=1e-5)


def test_inference_calls_run_eagerly_once_then_reuse_one_traced_graph(micro, micro_inputs):
    config, _ = micro
    model = _loaded(TFGroupViTModel, config)  # a fresh model: no cached graph functions
    big, small = micro_inputs["big"]["pixel_values"], micro_inputs["small"]["pixel_values"]
    first = model.get_image_features(big)  # first call of this kind: eager, nothing traced
    functions = model.__dict__["_graph_functions"]
    assert list(functions.values()) == [None]
    second = model.get_image_features(big)  # second: traced
    third = model.get_image_features(small)  # another batch size: the same graph
    (function,) = functions.values()
    assert function.experimental_get_tracing_count() == 1
    np.testing.assert_allclose(_np(second), _np(first), rtol=1e-5, atol=1e-6)
    assert tuple(third.shape) == (small.shape[0], config.projection_dim)


@pytest.mark.parametrize("bad_id", [50, -1])
def test_tf_function_out_of_range_ids_raise(micro_inputs, traced, bad_id):
    inputs = micro_inputs["big"]
    ids = inputs["input_ids"].copy()
    ids[1, 2] = bad_id
    with pytest.raises(tf.errors.InvalidArgumentError, match="input_ids"):
        traced(ids, inputs["attention_mask"], inputs["pixel_values"])


def test_tf_function_mask_shape_mismatch_raises(micro_inputs, traced):
    inputs = micro_inputs["big"]
    with pytest.raises(tf.errors.InvalidArgumentError, match="attention_mask"):
        traced(inputs["input_ids"], inputs["attention_mask"][:, :-1], inputs["pixel_values"])


def test_tf_function_needs_static_image_size(micro):
    _, model = micro
    ids = tf.constant([[48, 3, 49]], tf.int64)

    @tf.function(input_signature=[tf.TensorSpec([None, 3, None, None], tf.float32)])
    def run(pixel_values):
        return model(ids, pixel_values).logits_per_image

    with pytest.raises(ValueError, match="static"):
        run.get_concrete_function()


def test_jit_compile(micro, micro_inputs):
    _, model = micro

    @tf.function(jit_compile=True)
    def run(input_ids, attention_mask, pixel_values):
        return model(input_ids, pixel_values, attention_mask=attention_mask, output_segmentation=True)

    inputs = micro_inputs["big"]
    out = run(tf.constant(inputs["input_ids"]), tf.constant(inputs["attention_mask"]),
              tf.constant(inputs["pixel_values"]))
    expected = _run_eager(model, inputs, output_segmentation=True)
    np.testing.assert_allclose(_np(out.logits_per_image), _np(expected.logits_per_image), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(_np(out.segmentation_logits), _np(expected.segmentation_logits), rtol=1e-5,
                               atol=1e-4)
    # XLA drops assertions: an out-of-range id then gives NaN for its text, never a plausible number.
    ids = inputs["input_ids"].copy()
    ids[1, 2] = 50
    out = run(tf.constant(ids), tf.constant(inputs["attention_mask"]), tf.constant(inputs["pixel_values"]))
    logits = _np(out.logits_per_text)
    assert np.isnan(logits[1]).all() and np.isfinite(logits[[0, 2]]).all()


# ------------------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------------------


def _structurally_gradient_free(name: str) -> bool:
    """Parameters whose gradient is zero by construction in training mode (the same holds in the reference).

    - attention k_proj biases: softmax over keys ignores a shift q.b_k common to all keys;
    - AssignAttention q_proj biases: softmax over GROUPS ignores b_q.k_j, common to all groups of token j, and
      the hard assignment passes gradient straight through to that softmax;
    - mlp_inter.fc2 / group_projector.1.fc2 biases: a per-token shift equal on all channels, removed by the
      LayerNorm that every later use of those tokens starts with;
    - projection .0 biases and the final LayerNorm biases of both towers: a shift common to the whole batch,
      removed by BatchNorm's batch mean in training.
    """
    attention_key_bias = name.endswith("k_proj.bias") and not name.endswith("assign.k_proj.bias")
    return (attention_key_bias
            or name.endswith(("assign.q_proj.bias", "mlp_inter.fc2.bias", "group_projector.1.fc2.bias",
                              "projection.0.bias"))
            or name in ("text_model.final_layer_norm.bias", "vision_model.layernorm.bias"))


def test_training_gradients_reach_every_parameter():
    config = test_config("tiny_odd")
    model = _loaded(TFGroupViTModel, config)
    model.set_gumbel(False)
    assert model.gumbel is False
    inputs = random_inputs(config, 3, 3, seed=5)
    variables = {n: v for n, v in model.canonical_variables().items() if v.trainable}
    with tf.GradientTape() as tape:
        out = _run_eager(model, inputs, return_loss=True, output_segmentation=True, training=True)
        total = out.loss + 1e-3 * tf.reduce_sum(out.segmentation_logits)
    grads = dict(zip(variables, tape.gradient(total, list(variables.values()))))
    assert out.loss.shape == ()
    free = sorted(n for n in grads if _structurally_gradient_free(n))
    assert free, "the structural list matched nothing"
    for name, grad in grads.items():
        assert grad is not None, f"no gradient path to {name}"
        size = float(np.max(np.abs(_np(tf.convert_to_tensor(grad)))))
        if name in free:
            assert size < 1e-4, f"{name} should be gradient-free by construction, got {size}"
        else:
            assert size > 1e-3, f"{name} gets no gradient ({size})"


def test_training_batch_norm_follows_torch_and_gumbel_noise_is_switchable():
    config = GroupViTConfig(**MICRO)
    model = _loaded(TFGroupViTModel, config)
    state = model.canonical_state()
    inputs = random_inputs(config, 3, 3, seed=4)
    eval_out = _run_eager(model, inputs)
    # The text head's BatchNorm input, computed by the model's own first Linear.
    bn_input = _np(model.text_projection[0](eval_out.text_model_output.pooler_output)).astype(np.float64)

    assert model.gumbel is True
    tf.random.set_seed(0)
    noisy = _run_eager(model, inputs, training=True)
    model.set_gumbel(False)
    assert model.gumbel is False
    quiet = _run_eager(model, inputs, return_loss=True, training=True)
    # Gumbel noise moves hard assignments: the image embeddings change. Without it training is deterministic.
    assert np.abs(_np(noisy.image_embeds) - _np(quiet.image_embeds)).max() > 1e-4
    np.testing.assert_allclose(_np(_run_eager(model, inputs, return_loss=True, training=True).loss),
                               _np(quiet.loss), rtol=1e-6)

    after = model.canonical_state()
    mean, var_unbiased = bn_input.mean(axis=0), bn_input.var(axis=0, ddof=1)
    expected_mean = state["text_projection.1.running_mean"].astype(np.float64)
    expected_var = state["text_projection.1.running_var"].astype(np.float64)
    for _ in range(3):  # torch: running = 0.9 * running + 0.1 * batch statistic (unbiased variance)
        expected_mean = 0.9 * expected_mean + 0.1 * mean
        expected_var = 0.9 * expected_var + 0.1 * var_unbiased
    np.testing.assert_allclose(after["text_projection.1.running_mean"], expected_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(after["text_projection.1.running_var"], expected_var, rtol=1e-5, atol=1e-6)
    assert after["text_projection.1.num_batches_tracked"] == state["text_projection.1.num_batches_tracked"] + 3
    # Without segmentation the visual head runs once per call.
    assert after["visual_projection.1.num_batches_tracked"] == state["visual_projection.1.num_batches_tracked"] + 3
    # Eval mode reads the running statistics and changes nothing.
    _run_eager(model, inputs)
    _assert_states_identical(model.canonical_state(), after)
    with pytest.raises(ValueError, match="more than 1 value"):
        _run_eager(model, random_inputs(config, 1, 1, seed=0), training=True)


# ------------------------------------------------------------------------------------------------------------
# Functions and layers against numpy
# ------------------------------------------------------------------------------------------------------------


def test_activations_match_their_formulas():
    from math import erf

    x = np.linspace(-4, 4, 41).astype(np.float32)
    expected = {
        "quick_gelu": x / (1 + np.exp(-1.702 * x)),
        "gelu": np.array([0.5 * v * (1 + erf(v / np.sqrt(2))) for v in x.astype(np.float64)]),
        "gelu_new": 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3))),
        "gelu_pytorch_tanh": 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3))),
        "relu": np.maximum(x, 0),
    }
    for name, want in expected.items():
        np.testing.assert_allclose(_np(modeling.activation(name)(tf.constant(x))), want, rtol=1e-5, atol=1e-6,
                                   err_msg=name)
    with pytest.raises(ValueError, match="swish"):
        modeling.activation("swish")


@pytest.mark.parametrize("shape, shift", [((7, 32), 0.0), ((3, 5, 32), 0.0), ((3, 5, 32), 100.0), ((2, 3, 4, 32), 1.0)])
def test_encoder_layer_norm_in_graphs_matches_float64(shape, shift, monkeypatch):
    rng = np.random.RandomState(len(shape))
    layer = modeling._layer_norm(32, 1e-5, "ln")
    layer.gamma.assign(rng.standard_normal(32).astype(np.float32))
    layer.beta.assign(rng.standard_normal(32).astype(np.float32))
    x = (rng.standard_normal(shape) * 3 + shift).astype(np.float32)
    x64 = x.astype(np.float64)
    centred = x64 - x64.mean(-1, keepdims=True)
    want = centred / np.sqrt((centred ** 2).mean(-1, keepdims=True) + 1e-5) * _np(layer.gamma) + _np(layer.beta)
    atol = 2e-6 * (1 + shift)
    signature = [tf.TensorSpec([None] * (len(shape) - 1) + [32], tf.float32)]
    for fused in (True, False):  # the batch-norm form (forced where TensorFlow lacks oneDNN) and Keras' layer
        monkeypatch.setattr(modeling, "_FUSED_LAYER_NORM", fused)
        graph = tf.function(lambda t: modeling._pre_norm(layer, t, training=False), input_signature=signature)
        np.testing.assert_allclose(_np(graph(x)), want, rtol=0, atol=atol, err_msg=f"fused={fused}")
        ops = {op.type for op in graph.get_concrete_function().graph.get_operations()}
        assert ("FusedBatchNormV3" in ops) == fused
        # gradients through it (an inference graph may still be differentiated, e.g. for saliency maps)
        with tf.GradientTape() as tape:
            t = tf.constant(x)
            tape.watch(t)
            loss = tf.reduce_sum(tf.sin(graph(t)))
        grad = _np(tape.gradient(loss, t))
        with tf.GradientTape() as tape:
            t = tf.constant(x)
            tape.watch(t)
            loss = tf.reduce_sum(tf.sin(layer(t)))
        np.testing.assert_allclose(grad, _np(tape.gradient(loss, t)), rtol=1e-4, atol=1e-4 * (1 + shift))
        # eagerly and in training Keras' layer runs as it is
        training = tf.function(lambda t: modeling._pre_norm(layer, t, training=True), input_signature=signature)
        assert "FusedBatchNormV3" not in {op.type for op in training.get_concrete_function().graph.get_operations()}
        np.testing.assert_array_equal(_np(modeling._pre_norm(layer, tf.constant(x), training=False)), _np(layer(x)))


def test_fused_layer_norm_only_on_a_onednn_cpu(monkeypatch):
    monkeypatch.setattr(modeling, "_FUSED_LAYER_NORM", None)
    monkeypatch.setattr(tf.config, "list_logical_devices", lambda kind=None: ["GPU:0"] if kind == "GPU" else [])
    assert modeling._fused_layer_norm_available() is False
    from tensorflow.python.util import _pywrap_util_port

    monkeypatch.setattr(modeling, "_FUSED_LAYER_NORM", None)
    monkeypatch.setattr(tf.config, "list_logical_devices", lambda kind=None: [])
    assert modeling._fused_layer_norm_available() is bool(_pywrap_util_port.IsMklEnabled())


def test_hard_softmax_ties_go_to_the_lowest_index_and_pass_gradients_through():
    logits = tf.constant([[1.0, 3.0, 3.0], [2.0, 0.0, 2.0], [0.5, 0.5, 0.5]])
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(logits)
        hard = modeling.hard_softmax(logits, axis=0)  # over rows, as AssignAttention's groups axis
        soft = tf.nn.softmax(logits, axis=0)
        weights = tf.constant([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
        hard_sum, soft_sum = tf.reduce_sum(hard * weights), tf.reduce_sum(soft * weights)
    np.testing.assert_allclose(_np(hard), [[0, 1, 1], [1, 0, 0], [0, 0, 0]], atol=1e-6)
    np.testing.assert_allclose(_np(tape.gradient(hard_sum, logits)), _np(tape.gradient(soft_sum, logits)),
                               rtol=1e-6)


def test_gumbel_softmax_is_a_straight_through_one_hot():
    tf.random.set_seed(1)
    logits = tf.random.normal([4, 7, 5])
    hard = _np(modeling.gumbel_softmax(logits, axis=-2, hard=True))
    np.testing.assert_allclose(hard.sum(axis=-2), 1.0, atol=1e-6)
    assert set(np.round(hard, 5).ravel()) <= {0.0, 1.0}
    soft = _np(modeling.gumbel_softmax(logits, axis=-1, hard=False))
    np.testing.assert_allclose(soft.sum(axis=-1), 1.0, atol=1e-6)
    assert np.isfinite(soft).all()
    draws = [np.argmax(_np(modeling.gumbel_softmax(logits, axis=-2, hard=True)), axis=-2) for _ in range(3)]
    assert any((d != np.argmax(_np(logits), axis=-2)).any() for d in draws)  # the noise does move argmaxes


def test_loss_is_a_scalar_cross_entropy():
    logits = np.array([[3.0, 0.5, -1.0], [0.1, 2.0, 0.3], [-0.5, 0.2, 1.5]], np.float32)

    def cross_entropy(rows):
        rows = rows - rows.max(axis=1, keepdims=True)
        log_probs = rows - np.log(np.exp(rows).sum(axis=1, keepdims=True))
        return -np.mean(np.diag(log_probs))

    loss = modeling.groupvit_loss(tf.constant(logits))
    assert loss.shape == ()
    np.testing.assert_allclose(_np(loss), (cross_entropy(logits) + cross_entropy(logits.T)) / 2, rtol=1e-6)
    with pytest.raises(ValueError, match="as many images as texts"):
        modeling.groupvit_loss(tf.constant(logits[:2]))

    @tf.function(input_signature=[tf.TensorSpec([None, None], tf.float32)])
    def dynamic(values):
        return modeling.groupvit_loss(values)

    np.testing.assert_allclose(_np(dynamic(logits)), _np(loss), rtol=1e-6)
    with pytest.raises(tf.errors.InvalidArgumentError, match="as many images as texts"):
        dynamic(logits[:2])


def test_position_table_interpolation_matches_numpy(tiny):
    _, model = tiny
    embeddings = model.vision_model.embeddings
    table = _np(embeddings.position_embeddings)[0]  # (25, hidden), a 5x5 grid
    grid = table.reshape(5, 5, -1).transpose(2, 0, 1).astype(np.float64)  # (hidden, 5, 5)
    for rows, cols in ((6, 8), (3, 5), (7, 7)):
        expected = resize_grid(grid, rows, cols, mode="bicubic").transpose(1, 2, 0).reshape(1, rows * cols, -1)
        np.testing.assert_allclose(_np(embeddings.position_table(rows, cols)), expected, rtol=1e-5, atol=1e-6)
    assert embeddings.position_table(5, 5) is embeddings.position_embeddings  # the table's own grid: as is


def test_grouping_resize_matches_numpy():
    rng = np.random.RandomState(0)
    first = rng.dirichlet(np.ones(4), size=(2, 12)).transpose(0, 2, 1).astype(np.float32)  # (2, 4 groups, 12)
    second = rng.dirichlet(np.ones(3), size=(2, 4)).transpose(0, 2, 1).astype(np.float32)  # (2, 3 groups, 4)
    height, width = 12, 16  # a 3x4 patch grid of 4-pixel patches
    got = _np(modeling._grouping((tf.constant(first), tf.constant(second)), height, width))
    product = np.einsum("bgn,bkg->bkn", first.astype(np.float64), second.astype(np.float64))  # (2, 3, 12)
    expected = resize_grid(product.reshape(2, 3, 3, 4), height, width, mode="bilinear").reshape(2, 3, -1)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert bilinear_matrix(3, height).shape == (height, 3)


def test_fresh_model_uses_the_reference_initialisation():
    config = test_config("tiny_odd")
    keras.utils.set_random_seed(0)
    model = TFGroupViTModel(config)
    state = model.canonical_state()
    text, vision = config.text_config, config.vision_config

    def std(name):
        return float(np.std(state[name]))

    assert std("text_model.embeddings.token_embedding.weight") == pytest.approx(0.02, rel=0.1)
    attn_std = text.hidden_size ** -0.5 * (2 * text.num_hidden_layers) ** -0.5
    assert std("text_model.encoder.layers.0.self_attn.q_proj.weight") == pytest.approx(attn_std, rel=0.15)
    out_std = vision.hidden_size ** -0.5
    assert std("vision_model.encoder.stages.0.layers.0.self_attn.out_proj.weight") == pytest.approx(out_std, rel=0.15)
    assert std("vision_model.encoder.stages.0.layers.0.mlp.fc1.weight") == pytest.approx(
        (2 * vision.hidden_size) ** -0.5, rel=0.15)
    assert std("vision_model.encoder.stages.0.downsample.assign.q_proj.weight") == pytest.approx(0.02, rel=0.15)
    assert std("visual_projection.0.weight") == pytest.approx(0.02, rel=0.1)
    assert float(state["logit_scale"]) == pytest.approx(config.logit_scale_init_value)
    for name, array in state.items():
        if name.endswith(("position_embeddings", "group_token", ".bias", "running_mean", "num_batches_tracked")):
            assert not np.any(array), name
        elif name.endswith("running_var") or (name.endswith(".weight") and array.ndim == 1):
            np.testing.assert_array_equal(array, 1.0, err_msg=name)


# ------------------------------------------------------------------------------------------------------------
# Inputs, outputs and errors (eager)
# ------------------------------------------------------------------------------------------------------------


def test_numpy_and_tensor_inputs_agree(tiny, tiny_inputs, tiny_outputs):
    _, model = tiny
    out = model(tf.constant(tiny_inputs["input_ids"].astype(np.int32)),
                tf.constant(tiny_inputs["pixel_values"].astype(np.float64)),
                attention_mask=tiny_inputs["attention_mask"].tolist(), output_segmentation=True)
    np.testing.assert_allclose(_np(out.logits_per_image), _np(tiny_outputs.logits_per_image), rtol=1e-6)
    features = model.get_text_features(tiny_inputs["input_ids"], attention_mask=tiny_inputs["attention_mask"])
    np.testing.assert_allclose(_np(tf.math.l2_normalize(features, axis=-1)), _np(tiny_outputs.text_embeds),
                               rtol=1e-5, atol=1e-6)
    features = model.get_image_features(tiny_inputs["pixel_values"])
    np.testing.assert_allclose(_np(tf.math.l2_normalize(features, axis=-1)), _np(tiny_outputs.image_embeds),
                               rtol=1e-5, atol=1e-6)


def test_output_fields(tiny, tiny_inputs, tiny_outputs):
    config, model = tiny
    plain = _run_eager(model, tiny_inputs)
    assert list(plain) == ["logits_per_image", "logits_per_text", "text_embeds", "image_embeds",
                           "text_model_output", "vision_model_output"]
    assert plain.loss is None and plain.segmentation_logits is None
    assert list(plain.text_model_output) == ["last_hidden_state", "pooler_output"]
    # As the reference, segmentation turns the attentions on; hidden states were asked for.
    vision = tiny_outputs.vision_model_output
    assert [tuple(a.shape) for a in vision.attentions] == [(3, 7, 25), (3, 3, 7)]
    assert len(vision.hidden_states) == len(config.vision_config.depths) + 1
    assert len(tiny_outputs.text_model_output.attentions) == config.text_config.num_hidden_layers
    assert len(tiny_outputs.text_model_output.hidden_states) == config.text_config.num_hidden_layers + 1
    assert tuple(tiny_outputs.segmentation_logits.shape) == (3, 3, 20, 20)
    np.testing.assert_allclose(_np(plain.logits_per_image), _np(tiny_outputs.logits_per_image), rtol=1e-6)


def test_segmentation_with_interpolation_on_a_non_square_image(tiny, tiny_inputs):
    _, model = tiny
    pixels = random_inputs(model.config, 2, 0, seed=3, image_size=(24, 32))["pixel_values"]
    out = model(tiny_inputs["input_ids"], pixels, attention_mask=tiny_inputs["attention_mask"],
                output_segmentation=True, interpolate_pos_encoding=True)
    assert tuple(out.segmentation_logits.shape) == (2, 3, 24, 32)
    assert tuple(out.vision_model_output.attentions[0].shape) == (2, 7, 48)
    assert np.isfinite(_np(out.segmentation_logits)).all()


def _bad_calls(config):
    inputs = random_inputs(config, 2, 2, seed=0)
    ids, mask, pixels = inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"]
    too_big = ids.copy()
    too_big[0, 1] = config.text_config.vocab_size
    negative = ids.copy()
    negative[1, 0] = -3
    long_ids = np.full((2, config.text_config.max_position_embeddings + 1), 5)
    return [
        ("vocab", dict(input_ids=too_big), r"input_ids holds 99, outside \[0, 99\)"),
        ("negative", dict(input_ids=negative), r"input_ids holds -3"),
        ("too long", dict(input_ids=long_ids, attention_mask=None), "max_position_embeddings"),
        ("channels", dict(pixel_values=pixels[:, :2]), "2 channels"),
        ("size", dict(pixel_values=np.zeros((2, 3, 24, 24), np.float32)), "interpolate_pos_encoding"),
        ("not a multiple", dict(pixel_values=np.zeros((2, 3, 22, 20), np.float32), interpolate_pos_encoding=True),
         "multiple of the patch size"),
        ("ids rank", dict(input_ids=ids[0], attention_mask=None), "input_ids must be 2-D"),
        ("pixels rank", dict(pixel_values=pixels[0]), "pixel_values must be 4-D"),
        ("empty texts", dict(input_ids=ids[:0], attention_mask=mask[:0]), "input_ids is an empty batch"),
        ("empty images", dict(pixel_values=pixels[:0]), "pixel_values is an empty batch"),
        ("no tokens", dict(input_ids=ids[:, :0], attention_mask=None), "length 0"),
        ("mask shape", dict(attention_mask=mask[:, :-1]), "attention_mask"),
        ("loss batches", dict(pixel_values=pixels[:1], return_loss=True), "as many texts as images"),
        ("float ids", dict(input_ids=ids.astype(np.float32)), "integer token ids"),
        ("text pixels", dict(pixel_values=np.array([["a"]])), "pixel_values must hold real numbers"),
        ("ragged ids", dict(input_ids=[[1, 2], [3]], attention_mask=None), "input_ids must be a tensor or an array"),
        ("positions range", dict(position_ids=np.arange(1, ids.shape[1] + 1)[None]), "position_ids holds"),
        ("positions shape", dict(position_ids=np.arange(ids.shape[1] - 1)[None]), "position_ids has shape"),
        ("no ids", dict(input_ids=None), "input_ids is required"),
    ], inputs


def test_bad_inputs_raise_value_errors_naming_the_problem(tiny):
    config, model = tiny
    cases, inputs = _bad_calls(config)
    for label, change, message in cases:
        kwargs = dict(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"],
                      attention_mask=inputs["attention_mask"])
        kwargs.update(change)
        with pytest.raises(ValueError, match=message):
            model(kwargs.pop("input_ids"), kwargs.pop("pixel_values"), **kwargs)
            pytest.fail(f"no error for {label}")


def test_tower_models_check_their_inputs():
    config = GroupViTConfig(**MICRO)
    text = TFGroupViTTextModel(config.text_config, initialize=False)
    vision = TFGroupViTVisionModel(config.vision_config, initialize=False)
    with pytest.raises(ValueError, match="input_ids holds 50"):
        text(np.array([[1, 50]]))
    with pytest.raises(ValueError, match="doesn't match model"):
        vision(np.zeros((1, 3, 20, 20), np.float32))


def test_segmentation_needs_a_grouping_stage():
    config = GroupViTConfig(**dict(MICRO, vision_config=dict(MICRO["vision_config"], depths=[1], num_group_tokens=[0],
                                                             num_output_groups=[4])))
    model = TFGroupViTModel(config, initialize=False)
    inputs = random_inputs(config, 1, 1, seed=0)
    assert tuple(_run_eager(model, inputs).logits_per_image.shape) == (1, 1)
    with pytest.raises(ValueError, match="grouping stage"):
        _run_eager(model, inputs, output_segmentation=True)
