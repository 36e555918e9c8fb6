"""Record the reference's weight names and shapes, PyTorch and Keras, for a few configs. Maintainer script.

    TF_USE_LEGACY_KERAS=1 /path/to/refvenv/bin/python tools/make_weight_names_golden.py

Writes tests/golden/weight_names.json: for each config, the transformers 4.57.6 GroupViTModel state_dict
(name, shape) list in registration order and the TFGroupViTModel weights (name, shape) list, with the model
scope ('tf_group_vi_t_model/groupvit/') and ':0' stripped as they appear inside tf_model.h5.
"""

import json
import os
import sys

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import transformers  # noqa: E402
from transformers import GroupViTConfig as HFConfig  # noqa: E402
from transformers import GroupViTModel, TFGroupViTModel  # noqa: E402

CONFIGS = {
    "default": {},
    "odd": dict(
        text_config=dict(vocab_size=99, hidden_size=24, num_attention_heads=3, intermediate_size=37,
                         num_hidden_layers=2, max_position_embeddings=13),
        vision_config=dict(hidden_size=30, num_attention_heads=3, intermediate_size=37, patch_size=4, image_size=20,
                           depths=[2, 1, 1], num_group_tokens=[7, 3, 0], num_output_groups=[7, 3, 3],
                           assign_mlp_ratio=0.75),
        projection_dim=11, projection_intermediate_dim=19,
    ),
    "two_stage": dict(
        text_config=dict(vocab_size=120, hidden_size=32, num_attention_heads=4, intermediate_size=40,
                         num_hidden_layers=3, max_position_embeddings=16),
        vision_config=dict(hidden_size=48, num_attention_heads=4, intermediate_size=64, patch_size=8, image_size=48,
                           depths=[2, 2], num_group_tokens=[12, 4], num_output_groups=[12, 4]),
        projection_dim=16, projection_intermediate_dim=40,
    ),
}


def main() -> None:
    out = {"transformers_version": transformers.__version__, "configs": {}}
    for name, kwargs in CONFIGS.items():
        config = HFConfig(**kwargs)
        pt = GroupViTModel(config)
        tf_model = TFGroupViTModel(config)
        tf_model(tf_model.dummy_inputs)
        prefix = tf_model.name + "/groupvit/"
        out["configs"][name] = {
            "config": kwargs,
            "pytorch": [[k, list(v.shape)] for k, v in pt.state_dict().items()],
            "keras": [[w.name[len(prefix):].removesuffix(":0"), list(w.shape)] for w in tf_model.weights],
        }
    path = os.path.join(ROOT, "tests", "golden", "weight_names.json")
    with open(path, "w") as handle:
        json.dump(out, handle, indent=0)
    print("wrote", path)


if __name__ == "__main__":
    main()
