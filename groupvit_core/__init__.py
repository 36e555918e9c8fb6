"""groupvit_core: the framework-free half of groupvit (numpy only; never imports torch, tensorflow or keras).

Configs, the CLIP tokenizer, image preprocessing, the weight-name table, checkpoint I/O and the framework-free
parts of zero-shot segmentation. ``groupvit_pt`` and ``groupvit_tf`` build on it.
"""

from .config import GroupViTConfig, GroupViTTextConfig, GroupViTVisionConfig, StageSpec, load_any_config

__version__ = "0.1.0"

__all__ = [
    "GroupViTConfig",
    "GroupViTTextConfig",
    "GroupViTVisionConfig",
    "StageSpec",
    "load_any_config",
    "GroupViTTokenizer",
    "GroupViTImageProcessor",
    "__version__",
]


def __getattr__(name):
    # The tokenizer and image processor pull in `tokenizers` and Pillow: import them on first use.
    if name == "GroupViTTokenizer":
        from .tokenizer import GroupViTTokenizer

        return GroupViTTokenizer
    if name == "GroupViTImageProcessor":
        from .image import GroupViTImageProcessor

        return GroupViTImageProcessor
    raise AttributeError(f"module 'groupvit_core' has no attribute {name!r}")
