"""Make the config golden files from the reference (transformers 4.57.6). Maintainer script.

Run with a scratch venv holding transformers==4.57.6:
    /path/to/refvenv/bin/python tools/make_config_golden.py

Writes under tests/golden/:
  config_hf_default.json      config.json written by transformers for GroupViTConfig() (a Hub-style file)
  config_hf_custom.json       config.json written by transformers for a non-default config
  config_legacy_hub.json      a config.json in the layout of the published nvidia/groupvit-* files
                              (text_config_dict / vision_config_dict, legacy ids bos 0 / eos 2 / pad 1, qkv_bias)
  config_resolved.json        for each file above and for a config.json written by groupvit_core: the values
                              transformers resolves (model fields of text, vision and top level)
"""

import json
import os
import shutil
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import transformers  # noqa: E402
from transformers import GroupViTConfig as HFConfig  # noqa: E402

from groupvit_core.config import GroupViTConfig  # noqa: E402

GOLDEN = os.path.join(ROOT, "tests", "golden")
TEXT_FIELDS = list(GroupViTConfig().text_config._defaults)
VISION_FIELDS = list(GroupViTConfig().vision_config._defaults)
TOP_FIELDS = list(GroupViTConfig._defaults)

LEGACY_HUB = {
    "architectures": ["GroupViTModel"],
    "initializer_factor": 1.0,
    "logit_scale_init_value": 2.6592,
    "model_type": "groupvit",
    "output_segmentation": False,
    "projection_dim": 256,
    "projection_intermediate_dim": 4096,
    "text_config": {"_name_or_path": "", "add_cross_attention": False, "architectures": None,
                    "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1, "hidden_size": 256,
                    "model_type": "groupvit_text_model", "num_hidden_layers": 12, "vocab_size": 49408},
    "text_config_dict": {"bos_token_id": 0, "dropout": 0.0, "eos_token_id": 2, "hidden_act": "quick_gelu",
                         "hidden_size": 256, "initializer_factor": 1.0, "initializer_range": 0.02,
                         "intermediate_size": 1024, "layer_norm_eps": 1e-05, "max_position_embeddings": 77,
                         "model_type": "groupvit_text_model", "num_attention_heads": 4, "num_hidden_layers": 12,
                         "pad_token_id": 1, "vocab_size": 49408},
    "torch_dtype": "float32",
    "transformers_version": "4.22.0.dev0",
    "vision_config": {"_name_or_path": "", "model_type": "groupvit_vision_model", "hidden_size": 384,
                      "depths": [6, 3, 3], "qkv_bias": True},
    "vision_config_dict": {"assign_eps": 1.0, "assign_mlp_ratio": [0.5, 4], "depths": [6, 3, 3],
                           "dropout": 0.0, "hidden_act": "gelu", "hidden_size": 384, "image_size": 224,
                           "initializer_factor": 1.0, "initializer_range": 0.02, "intermediate_size": 1536,
                           "layer_norm_eps": 1e-05, "model_type": "groupvit_vision_model",
                           "num_attention_heads": 6, "num_group_tokens": [64, 8, 0], "num_hidden_layers": 12,
                           "num_output_groups": [64, 8, 8], "patch_size": 16, "qkv_bias": True},
}

CUSTOM = dict(
    text_config=dict(vocab_size=99, hidden_size=24, num_attention_heads=3, intermediate_size=37,
                     num_hidden_layers=2, max_position_embeddings=13, bos_token_id=97, eos_token_id=98),
    vision_config=dict(hidden_size=30, num_attention_heads=3, intermediate_size=37, patch_size=4, image_size=20,
                       depths=[2, 1, 1], num_group_tokens=[7, 3, 0], num_output_groups=[7, 3, 3],
                       assign_mlp_ratio=0.75, hidden_act="quick_gelu"),
    projection_dim=11, projection_intermediate_dim=19, logit_scale_init_value=1.5,
)


def resolved(config: HFConfig) -> dict:
    return {
        "top": {k: getattr(config, k) for k in TOP_FIELDS},
        "text": {k: getattr(config.text_config, k) for k in TEXT_FIELDS},
        "vision": {k: getattr(config.vision_config, k) for k in VISION_FIELDS},
    }


def write_json(name: str, data: dict) -> str:
    path = os.path.join(GOLDEN, name)
    with open(path, "w") as handle:
        json.dump(data, handle, indent=2, sort_keys=True)
        handle.write("\n")
    return path


def main() -> None:
    os.makedirs(GOLDEN, exist_ok=True)
    out = {"transformers_version": transformers.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        for name, config in (("config_hf_default.json", HFConfig()), ("config_hf_custom.json", HFConfig(**CUSTOM))):
            config.save_pretrained(tmp)
            shutil.copy(os.path.join(tmp, "config.json"), os.path.join(GOLDEN, name))
            out[name] = resolved(HFConfig.from_pretrained(tmp))
        legacy = write_json("config_legacy_hub.json", LEGACY_HUB)
        out["config_legacy_hub.json"] = resolved(HFConfig.from_json_file(legacy))
        # Ours, written by groupvit_core from the custom and legacy files, read back by transformers.
        for name in ("config_hf_custom.json", "config_legacy_hub.json"):
            ours_dir = os.path.join(tmp, "ours_" + name)
            GroupViTConfig.from_pretrained(os.path.join(GOLDEN, name)).save_pretrained(ours_dir)
            out["ours_from_" + name] = resolved(HFConfig.from_pretrained(ours_dir))
    write_json("config_resolved.json", out)
    print("wrote config golden files to", GOLDEN)


if __name__ == "__main__":
    main()
