"""Configs: Hub config.json files parse one to one, ours read back in transformers unchanged, bad values fail."""

import json
import os

import pytest

from groupvit_core.config import GroupViTConfig, GroupViTTextConfig, GroupViTVisionConfig, load_any_config

GOLDEN = os.path.join(os.path.dirname(os.path.dirname(__file__)), "golden")


def _resolved():
    with open(os.path.join(GOLDEN, "config_resolved.json")) as handle:
        return json.load(handle)


def _values(config: GroupViTConfig) -> dict:
    return {
        "top": {k: getattr(config, k) for k in GroupViTConfig._defaults},
        "text": {k: getattr(config.text_config, k) for k in GroupViTTextConfig._defaults},
        "vision": {k: getattr(config.vision_config, k) for k in GroupViTVisionConfig._defaults},
    }


@pytest.mark.parametrize("name", ["config_hf_default.json", "config_hf_custom.json", "config_legacy_hub.json"])
def test_hub_files_parse_to_the_values_transformers_resolves(name):
    config = GroupViTConfig.from_pretrained(os.path.join(GOLDEN, name))
    assert _values(config) == _resolved()[name]


@pytest.mark.parametrize("name", ["config_hf_custom.json", "config_legacy_hub.json"])
def test_transformers_read_back_our_files_with_the_same_values(name):
    # The golden records what transformers 4.57.6 resolved from the config.json groupvit_core wrote.
    assert _resolved()["ours_from_" + name] == _resolved()[name]
    ours = GroupViTConfig.from_pretrained(os.path.join(GOLDEN, name))
    assert _values(ours) == _resolved()["ours_from_" + name]


def test_legacy_ids_switch_pooling_and_unknown_keys_survive(tmp_path):
    config = GroupViTConfig.from_pretrained(os.path.join(GOLDEN, "config_legacy_hub.json"))
    assert config.text_config.eos_token_id == 2 and config.text_config.legacy_eos_pooling
    assert config.vision_config.extra["qkv_bias"] is True
    assert config.extra["torch_dtype"] == "float32"
    config.save_pretrained(tmp_path)
    again = GroupViTConfig.from_pretrained(tmp_path)
    assert again == config
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["vision_config"]["qkv_bias"] is True
    assert written["output_segmentation"] is False
    assert "text_config_dict" not in written  # merged into text_config, as transformers resolves it


def test_defaults_match_the_reference_numbers():
    config = GroupViTConfig()
    text, vision = config.text_config, config.vision_config
    assert (text.vocab_size, text.hidden_size, text.intermediate_size, text.num_hidden_layers) == (49408, 256, 1024, 12)
    assert (text.num_attention_heads, text.max_position_embeddings, text.hidden_act) == (4, 77, "quick_gelu")
    assert (vision.hidden_size, vision.depths, vision.num_group_tokens) == (384, [6, 3, 3], [64, 8, 0])
    assert (vision.num_output_groups, vision.assign_mlp_dims, vision.grid_size) == ([64, 8, 8], (192, 1536), 14)
    assert (config.projection_dim, config.projection_intermediate_dim) == (256, 4096)
    assert [s.num_prev_group_tokens for s in vision.stages] == [0, 64, 8]
    assert [s.has_group_projector for s in vision.stages] == [False, True, False]
    assert vision.num_final_tokens == 8


def test_from_text_vision_configs_and_dict_round_trip():
    text = GroupViTTextConfig(hidden_size=64, num_attention_heads=2)
    vision = GroupViTVisionConfig(hidden_size=96, num_attention_heads=3, assign_mlp_ratio=0.5)
    config = GroupViTConfig.from_text_vision_configs(text, vision, projection_dim=32, my_key=[1, 2])
    assert config.text_config == text and config.vision_config == vision
    assert config.vision_config.assign_mlp_dims == (48, 48)
    assert GroupViTConfig.from_dict(config.to_dict()) == config
    assert config.extra["my_key"] == [1, 2]
    with pytest.raises(TypeError, match="text_config"):
        GroupViTConfig.from_text_vision_configs(vision, vision)


def test_sub_configs_read_from_a_full_checkpoint(tmp_path):
    config = GroupViTConfig(text_config={"hidden_size": 64, "num_attention_heads": 2})
    config.save_pretrained(tmp_path)
    assert GroupViTTextConfig.from_pretrained(tmp_path) == config.text_config
    assert GroupViTVisionConfig.from_pretrained(tmp_path) == config.vision_config
    config.text_config.save_pretrained(tmp_path / "text")
    assert isinstance(load_any_config(tmp_path / "text"), GroupViTTextConfig)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(text_config={"hidden_size": 30, "num_attention_heads": 4}), "text_config.hidden_size"),
        (dict(vision_config={"hidden_size": 100, "num_attention_heads": 6}), "vision_config.hidden_size"),
        (dict(vision_config={"depths": [2, 2]}), "num_group_tokens"),
        (dict(vision_config={"num_output_groups": [64, 8]}), "num_output_groups"),
        (dict(vision_config={"image_size": 230}), "vision_config.image_size"),
        (dict(vision_config={"patch_size": 0}), "vision_config.patch_size"),
        (dict(text_config={"vocab_size": -5}), "text_config.vocab_size"),
        (dict(projection_dim=0), "projection_dim"),
        (dict(vision_config={"depths": []}), "depths"),
        (dict(vision_config={"assign_mlp_ratio": [0.5]}), "assign_mlp_ratio"),
        (dict(text_config={"hidden_act": "swishy"}), "hidden_act"),
        (dict(text_config={"layer_norm_eps": float("nan")}), "layer_norm_eps"),
        (dict(vision_config={"dropout": 1.5}), "dropout"),
        (dict(vision_config={"num_group_tokens": [0, 8, 0]}), "num_group_tokens"),
    ],
)
def test_inconsistent_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        GroupViTConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(text_config={"hidden_size": "256"}), "text_config.hidden_size"),
        (dict(vision_config={"depths": 3}), "vision_config.depths"),
        (dict(text_config=[1, 2]), "text_config"),
        (dict(text_config={"num_hidden_layers": True}), "num_hidden_layers"),
    ],
)
def test_wrong_types_name_the_field(kwargs, field):
    with pytest.raises(TypeError, match=field.replace(".", r"\.")):
        GroupViTConfig(**kwargs)


def test_bad_files(tmp_path):
    with pytest.raises(OSError, match="config.json"):
        GroupViTConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        GroupViTConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        GroupViTConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="model_type"):
        GroupViTConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ValueError, match="UTF-8"):
        GroupViTConfig.from_pretrained(tmp_path)
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(OSError, match="is a file"):
        GroupViTConfig().save_pretrained(afile)


def test_integral_floats_are_accepted_as_ints():
    config = GroupViTConfig(text_config={"hidden_size": 256.0})
    assert config.text_config.hidden_size == 256 and isinstance(config.text_config.hidden_size, int)
