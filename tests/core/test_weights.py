"""The weight-name table: a bijection between the reference's PyTorch and Keras names, with matching shapes."""

import json
import os

import numpy as np
import pytest

from groupvit_core.config import GroupViTConfig, GroupViTTextConfig, GroupViTVisionConfig
from groupvit_core.weights import (
    canonical_to_h5,
    check_state,
    checked_arrays,
    h5_to_canonical,
    select_submodel,
    spec_table,
    weight_specs,
)

GOLDEN = os.path.join(os.path.dirname(os.path.dirname(__file__)), "golden", "weight_names.json")


def _golden():
    with open(GOLDEN) as handle:
        return json.load(handle)["configs"]


@pytest.mark.parametrize("name", ["default", "odd", "two_stage"])
def test_table_equals_the_reference_names_and_shapes(name):
    entry = _golden()[name]
    specs = weight_specs(GroupViTConfig(**entry["config"]))
    # Canonical side: the reference's state_dict, in its order.
    assert [[s.name, list(s.shape)] for s in specs] == entry["pytorch"]
    # Keras side: every reference Keras weight is the image of exactly one canonical tensor, shapes included.
    keras = {n: tuple(shape) for n, shape in entry["keras"]}
    mapped = {s.h5_name: s.keras_shape for s in specs if not s.name.endswith("num_batches_tracked")}
    assert mapped == keras
    assert len({s.h5_name for s in specs}) == len(specs)  # injective, counter included


def test_default_size_has_502_entries():
    specs = weight_specs(GroupViTConfig())
    assert len(specs) == 502
    assert sum(1 for s in specs if not s.is_buffer) == 496


@pytest.mark.parametrize("name", ["default", "odd", "two_stage"])
def test_layout_transforms_invert_each_other(name):
    rng = np.random.RandomState(0)
    config = GroupViTConfig(**_golden()[name]["config"])
    state = {s.name: rng.standard_normal(s.shape).astype(np.float32) if s.dtype == "float32"
             else np.array(3, dtype=np.int64) for s in weight_specs(config)}
    h5 = canonical_to_h5(state, config)
    back = h5_to_canonical(h5, config)
    assert back.keys() == state.keys()
    for key in state:
        assert back[key].dtype == state[key].dtype and np.array_equal(back[key], state[key]), key
    table = spec_table(config)
    kernel = h5[table["text_projection.0.weight"].h5_name]
    assert np.array_equal(kernel, state["text_projection.0.weight"].T)
    conv = h5["vision_model/embeddings/patch_embeddings/projection/kernel"]
    assert np.array_equal(conv, state["vision_model.embeddings.patch_embeddings.projection.weight"].transpose(2, 3, 1, 0))
    assert h5["logit_scale"].shape == (1,)


def test_sub_model_tables_are_slices_of_the_full_table():
    config = GroupViTConfig()
    full = {s.name: s for s in weight_specs(config)}
    for sub, prefix in ((config.text_config, "text_model."), (config.vision_config, "vision_model.")):
        specs = weight_specs(sub)
        assert all(s.name.startswith(prefix) and full[s.name] == s for s in specs)
        assert len(specs) == sum(1 for n in full if n.startswith(prefix))


def test_check_state_names_every_problem():
    config = GroupViTConfig(**_golden()["odd"]["config"])
    state = {s.name: np.zeros(s.shape, np.float32) for s in weight_specs(config)}
    check_state(state, config)
    del state["text_projection.1.num_batches_tracked"]  # absent from Keras-written files: allowed
    check_state(state, config)
    del state["logit_scale"]
    state["extra.weight"] = np.zeros(2)
    state["text_projection.0.bias"] = np.zeros(5)
    with pytest.raises(ValueError) as err:
        check_state(state, config, source="ckpt")
    message = str(err.value)
    assert "missing 1 tensor(s): logit_scale" in message
    assert "unexpected 1 tensor(s): extra.weight" in message
    assert "text_projection.0.bias: expected (19,), got (5,)" in message


def test_checked_arrays_fill_absent_counters_convert_dtypes_and_refuse_non_numbers():
    config = GroupViTConfig(**_golden()["odd"]["config"])
    specs = weight_specs(config)
    state = {s.name: np.ones(s.shape, np.float64 if s.dtype == "float32" else np.int32) for s in specs}
    kept = np.ones(specs[0].shape, np.float32)
    state[specs[0].name] = kept
    del state["text_projection.1.num_batches_tracked"]
    arrays = checked_arrays(state, config)
    assert list(arrays) == [s.name for s in specs]
    for spec in specs:
        assert arrays[spec.name].dtype == np.dtype(spec.dtype) and arrays[spec.name].shape == spec.shape, spec.name
    assert arrays["text_projection.1.num_batches_tracked"] == 0
    assert arrays["visual_projection.1.num_batches_tracked"] == 1
    assert arrays[specs[0].name] is kept  # the right dtype already: not copied
    state[specs[1].name] = np.full(specs[1].shape, "x")
    with pytest.raises(ValueError, match=f"{specs[1].name} has non-numeric dtype"):
        checked_arrays(state, config)
    del state["logit_scale"]
    with pytest.raises(ValueError, match="missing 1 tensor"):
        checked_arrays(state, config)


def test_h5_errors_name_the_tensor():
    config = GroupViTConfig(**_golden()["odd"]["config"])
    state = {s.name: np.zeros(s.shape, np.float32) for s in weight_specs(config)}
    h5 = canonical_to_h5(state, config)
    h5["text_model/encoder/layers_._0/mlp/fc1/kernel"] = np.zeros((37, 24), np.float32)  # not transposed
    with pytest.raises(ValueError, match="layers_._0/mlp/fc1/kernel has shape"):
        h5_to_canonical(h5, config)
    h5 = canonical_to_h5(state, config)
    h5["bogus/kernel"] = np.zeros(1)
    with pytest.raises(ValueError, match="bogus/kernel"):
        h5_to_canonical(h5, config)


def test_select_submodel_and_type_errors():
    config = GroupViTConfig(**_golden()["odd"]["config"])
    state = {s.name: np.zeros(s.shape, np.float32) for s in weight_specs(config)}
    text = select_submodel(state, config.text_config)
    check_state(text, config.text_config)
    vision = select_submodel(state, config.vision_config)
    check_state(vision, config.vision_config)
    assert isinstance(config.text_config, GroupViTTextConfig) and isinstance(config.vision_config, GroupViTVisionConfig)
    with pytest.raises(TypeError):
        weight_specs({"hidden_size": 3})
