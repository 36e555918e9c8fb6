"""The built-in model: a small GroupViT trained on the synthetic world (groupvit_core.synthetic), shipped as
package data under ``groupvit_core/assets/builtin`` (config.json, model.safetensors in float16, which both
frameworks widen to float32 on load, and segmentation.json).

It was trained from captions only (see RESULTS_TRAINING.md for how, and its measured mIoU) on 64 px scenes, so it
segments images of that world: grounds ("grass", "sand", "water", "asphalt") and coloured shapes ("red circle",
"blue square", "yellow triangle", ...). ``groupvit segment`` and ``groupvit evaluate`` use it when no ``--model``
is given; its segmentation settings (the image resized to a 64 px short side, the whole image in one window, no
background threshold, the label map refined on the image's pixels) are in ``segmentation.json`` and come back
from ``builtin_segmenter_options()``.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional, Tuple

BUILTIN_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "builtin")
SEGMENTATION_FILE = "segmentation.json"


def builtin_model_path() -> str:
    """The directory of the built-in checkpoint (config.json + model.safetensors); OSError if it is missing."""
    for name in ("config.json", "model.safetensors"):
        if not os.path.isfile(os.path.join(BUILTIN_DIR, name)):
            raise OSError(f"the built-in model is missing {name} in {BUILTIN_DIR}; reinstall groupvit or pass --model")
    return BUILTIN_DIR


def is_builtin(path: Optional[str]) -> bool:
    """Whether ``path`` is the built-in model's directory."""
    return path is not None and os.path.realpath(os.fspath(path)) == os.path.realpath(BUILTIN_DIR)


def _settings() -> Dict[str, Any]:
    path = os.path.join(builtin_model_path(), SEGMENTATION_FILE)
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def builtin_segmenter_options() -> Dict[str, Any]:
    """Keyword arguments of ``ZeroShotSegmenter`` the built-in model was measured with:
    window="whole", short_side=64 (the model's image size), preset, background_threshold=None, top_k, and
    refine (absent from older settings files: False)."""
    settings = _settings()
    options = {key: settings[key] for key in ("window", "short_side", "preset", "background_threshold", "top_k")}
    options["refine"] = bool(settings.get("refine", False))
    return options


def builtin_class_names() -> Tuple[str, ...]:
    """The names the built-in model knows (the synthetic world's grounds and objects)."""
    return tuple(_settings()["class_names"])
