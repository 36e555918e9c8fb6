"""groupvit_pt: GroupViT in PyTorch (torch.nn), loading the same checkpoints as groupvit_tf.

Twin of groupvit_tf (TFGroupViTModel, ...). The configs are groupvit_core's, re-exported here.
"""

from groupvit_core.config import GroupViTConfig, GroupViTTextConfig, GroupViTVisionConfig

from .modeling import GroupViTModel, GroupViTTextModel, GroupViTVisionModel

__all__ = [
    "GroupViTConfig",
    "GroupViTModel",
    "GroupViTTextConfig",
    "GroupViTTextModel",
    "GroupViTVisionConfig",
    "GroupViTVisionModel",
]
