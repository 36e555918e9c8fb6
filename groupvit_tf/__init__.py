"""groupvit_tf: GroupViT as Keras 3 models on the TensorFlow backend (twin of groupvit_pt).

Exports TFGroupViTModel, TFGroupViTTextModel and TFGroupViTVisionModel, and re-exports the configs from
groupvit_core. Keras 3 picks its backend once, at its first import: this package sets ``KERAS_BACKEND=tensorflow``
when it is unset and refuses to load under any other backend (the models use TensorFlow ops directly).
"""

import os

_BACKEND = os.environ.get("KERAS_BACKEND")
if _BACKEND is None:
    os.environ["KERAS_BACKEND"] = "tensorflow"
elif _BACKEND != "tensorflow":
    raise ImportError(
        f"groupvit_tf needs the TensorFlow backend of Keras 3, but KERAS_BACKEND={_BACKEND!r} is set; "
        "unset it or set KERAS_BACKEND=tensorflow before importing keras"
    )

import keras  # noqa: E402

if not keras.__version__.startswith("3."):
    raise ImportError(f"groupvit_tf needs Keras 3, found keras {keras.__version__}")
if keras.backend.backend() != "tensorflow":
    raise ImportError(
        f"groupvit_tf needs the TensorFlow backend of Keras 3, but keras was already loaded with the "
        f"{keras.backend.backend()!r} backend (KERAS_BACKEND or ~/.keras/keras.json); set KERAS_BACKEND=tensorflow"
    )

from groupvit_core.config import GroupViTConfig, GroupViTTextConfig, GroupViTVisionConfig  # noqa: E402

from .modeling import TFGroupViTModel, TFGroupViTTextModel, TFGroupViTVisionModel  # noqa: E402

__all__ = [
    "TFGroupViTModel",
    "TFGroupViTTextModel",
    "TFGroupViTVisionModel",
    "GroupViTConfig",
    "GroupViTTextConfig",
    "GroupViTVisionConfig",
]
