"""One loader for every checkpoint layout, shared by groupvit_pt and groupvit_tf.

``load_pretrained`` reads a checkpoint directory (``config.json`` plus ``model.safetensors``,
``pytorch_model.bin`` or ``tf_model.h5``) into a config and a dict of canonical numpy arrays (Hub PyTorch names
and layouts), checked against the config. ``save_pretrained`` writes them back in any of those formats. The
framework packages only move canonical arrays in and out of their modules.
"""

from __future__ import annotations

import os
from typing import Dict, Mapping, Optional, Tuple, Type, Union

import numpy as np

from . import checkpoint
from .config import CONFIG_NAME, GroupViTConfig, GroupViTTextConfig, GroupViTVisionConfig, load_any_config
from .io_utils import atomic_path
from .weights import AnyConfig, canonical_to_h5, check_state, h5_to_canonical, select_submodel, spec_table

WEIGHT_FILES = {"safetensors": "model.safetensors", "bin": "pytorch_model.bin", "h5": "tf_model.h5"}


def _target_config(config: AnyConfig, config_class: Optional[Type[AnyConfig]], path: str) -> AnyConfig:
    if config_class is None or isinstance(config, config_class):
        return config
    if isinstance(config, GroupViTConfig):
        if config_class is GroupViTTextConfig:
            return config.text_config
        if config_class is GroupViTVisionConfig:
            return config.vision_config
    raise ValueError(
        f"{path} holds a {type(config).__name__} checkpoint, which cannot be loaded as a {config_class.__name__}"
    )


def load_pretrained(path: Union[str, os.PathLike], config_class: Optional[Type[AnyConfig]] = None,
                    ) -> Tuple[AnyConfig, Dict[str, np.ndarray]]:
    """Read ``path`` into (config, canonical state) for a model of ``config_class``.

    A text-only or vision-only model can be loaded from a full checkpoint: its part is selected. Missing,
    unexpected or mis-shaped tensors raise ValueError naming them; a missing directory or file raises OSError.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise OSError(f"{path} is not a checkpoint directory (expected config.json and weights)")
    file_config = load_any_config(path)
    raw, fmt = checkpoint.load_state(path)
    if fmt == "h5":
        state = h5_to_canonical(raw, file_config, source=os.path.join(path, WEIGHT_FILES["h5"]))
    else:
        state = dict(raw)
    config = _target_config(file_config, config_class, path)
    state = select_submodel(state, config) if config is not file_config else state
    check_state(state, config, source=os.path.join(path, WEIGHT_FILES[fmt]))
    return config, state


def save_pretrained(directory: Union[str, os.PathLike], config: AnyConfig, state: Mapping[str, np.ndarray],
                    format: str = "safetensors") -> str:
    """Write ``config.json`` and the weights in ``format`` ('safetensors', 'h5' or 'bin'); returns the weight path."""
    if format not in WEIGHT_FILES:
        raise ValueError(f"unknown weight format {format!r}; choose one of {sorted(WEIGHT_FILES)}")
    directory = os.fspath(directory)
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise OSError(f"save_pretrained expects a directory, but {directory} is a file")
    os.makedirs(directory, exist_ok=True)
    check_state(state, config, source="the model's state")
    path = os.path.join(directory, WEIGHT_FILES[format])
    # np.ascontiguousarray would turn 0-d tensors (logit_scale, counters) into shape (1,).
    arrays = {name: np.asarray(array, order="C") for name, array in state.items()}
    # The pair is replaced together: config.json goes to a temporary file first, the weights are written to
    # their own temporary file and renamed (each writer is atomic), and only then is config.json renamed. An
    # interrupted save therefore never leaves a new config.json beside old weights.
    with atomic_path(os.path.join(directory, CONFIG_NAME)) as config_tmp:
        with open(config_tmp, "w", encoding="utf-8") as handle:
            handle.write(config.to_json_string())
        if format == "safetensors":
            checkpoint.write_safetensors(path, arrays, metadata={"format": "pt"})
        elif format == "bin":
            checkpoint.write_torch_bin(path, arrays)
        else:
            checkpoint.write_h5(path, canonical_to_h5(arrays, config))
    return path
