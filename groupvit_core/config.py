"""GroupViT configurations: text, vision and the joint model, read from and written to the Hub's ``config.json``.

Field names and defaults are those of the Hugging Face checkpoints (nvidia/groupvit-gcc-yfcc), so a Hub
``config.json`` parses one to one and ours is read back by transformers with the same values. Keys this module
does not know are kept in ``extra`` and written back unchanged. Derived quantities that both framework packages
need (per-stage specs, MLP widths) live here so neither framework computes them on its own.
"""

from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from .io_utils import atomic_write_text, parse_json_bytes, read_json_file, read_text_file

CONFIG_NAME = "config.json"

# Sanity bounds on what a config.json may claim, so a hostile or corrupt file fails at validation instead of
# building millions of weight specs or allocating absurd tensors.  Published checkpoints are far below these.
MAX_LAYERS = 1024  # num_hidden_layers and each entry of depths
MAX_STAGES = 16  # len(depths)
MAX_SIZE = 2**24  # hidden/intermediate/vocab/position/image sizes and group-token counts
_MODULE = {"text_config": "text_model", "vision_config": "vision_model"}

def _check_positive_int(owner: str, name: str, value: Any, allow_zero: bool = False,
                        maximum: Optional[int] = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        # JSON floats such as 256.0 are accepted when integral.
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise TypeError(f"{owner}.{name} must be an integer, got {value!r} ({type(value).__name__})")
    if value < 0 or (value == 0 and not allow_zero):
        bound = "non-negative" if allow_zero else "positive"
        raise ValueError(f"{owner}.{name} must be {bound}, got {value}")
    if maximum is not None and value > maximum:
        module = _MODULE.get(owner, owner)
        raise ValueError(f"{owner}.{name} = {value} exceeds the supported maximum {maximum} "
                         f"({module} weights of that size cannot be built)")
    return value


def _check_number(owner: str, name: str, value: Any, positive: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{owner}.{name} must be a number, got {value!r} ({type(value).__name__})")
    value = float(value)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{owner}.{name} must be finite, got {value}")
    if positive and value <= 0:
        raise ValueError(f"{owner}.{name} must be positive, got {value}")
    return value


def _check_rate(owner: str, name: str, value: Any) -> float:
    value = _check_number(owner, name, value, positive=False)
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{owner}.{name} must be in [0, 1), got {value}")
    return value


def _check_int_list(owner: str, name: str, value: Any, allow_zero: bool, maximum: Optional[int] = None) -> List[int]:
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"{owner}.{name} must be a list of integers, got {value!r}")
    if len(value) > MAX_STAGES:
        raise ValueError(f"{owner}.{name} has {len(value)} entries; at most {MAX_STAGES} stages are supported")
    return [_check_positive_int(owner, f"{name}[{i}]", v, allow_zero=allow_zero, maximum=maximum)
            for i, v in enumerate(value)]


SUPPORTED_ACTIVATIONS = ("quick_gelu", "gelu", "gelu_new", "gelu_pytorch_tanh", "relu")
# quick_gelu(h) = h * sigmoid(1.702 h) = silu(1.702 h) / 1.702: both frameworks run it as one SiLU between fc1
# scaled by this factor and fc2's weight divided by it.
QUICK_GELU_SCALE = 1.702


def _check_activation(owner: str, value: Any) -> str:
    if value not in SUPPORTED_ACTIVATIONS:
        raise ValueError(f"{owner}.hidden_act must be one of {SUPPORTED_ACTIVATIONS}, got {value!r}")
    return value


class _ConfigBase:
    """Shared mechanics: defaults table, unknown-key preservation, dict/JSON conversion."""

    model_type: str = ""
    _base_key: str = ""
    _defaults: Dict[str, Any] = {}

    def __init__(self, **kwargs: Any) -> None:
        values = copy.deepcopy(self._defaults)
        extra: Dict[str, Any] = {}
        for key, value in kwargs.items():
            if key in values:
                values[key] = value
            elif key == "model_type":
                continue
            else:
                extra[key] = copy.deepcopy(value)
        for key, value in values.items():
            object.__setattr__(self, key, value)
        object.__setattr__(self, "extra", extra)
        self.validate()

    def validate(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def to_dict(self) -> Dict[str, Any]:
        out: Dict[str, Any] = dict(copy.deepcopy(self.extra))
        for key in self._defaults:
            out[key] = copy.deepcopy(getattr(self, key))
        out["model_type"] = self.model_type
        return out

    @classmethod
    def from_dict(cls, data: Dict[str, Any]):
        if not isinstance(data, dict):
            raise TypeError(f"{cls.__name__}.from_dict expects a dict, got {type(data).__name__}")
        return cls(**data)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self.to_dict() == other.to_dict()  # type: ignore[union-attr]

    def __repr__(self) -> str:
        return f"{type(self).__name__} {self.to_json_string()}"

    def copy(self, **changes: Any):
        data = self.to_dict()
        data.update(changes)
        return type(self).from_dict(data)

    # ----- files -----
    @classmethod
    def from_json_file(cls, path: Union[str, os.PathLike]) -> "_ConfigBase":
        data = _read_json(path)
        model_type = data.get("model_type", cls.model_type)
        if model_type == "groupvit" and cls.model_type != "groupvit":
            # A text or vision config read from a full checkpoint: take its part, as transformers does.
            return getattr(GroupViTConfig.from_dict(data), cls._base_key).copy()
        if model_type != cls.model_type:
            raise ValueError(f"{path}: model_type is {model_type!r}, expected {cls.model_type!r}")
        return cls.from_dict(data)

    @classmethod
    def from_pretrained(cls, path: Union[str, os.PathLike]) -> "_ConfigBase":
        """Read a checkpoint directory's ``config.json`` or a ``config.json`` file."""
        return cls.from_json_file(resolve_config_file(path))

    def save_pretrained(self, directory: Union[str, os.PathLike]) -> str:
        """Write ``config.json`` into ``directory`` (created if needed), atomically."""
        directory = os.fspath(directory)
        if os.path.exists(directory) and not os.path.isdir(directory):
            raise OSError(f"save_pretrained expects a directory, but {directory} is a file")
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, CONFIG_NAME)
        data = self.to_dict()
        atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")
        return path


class GroupViTTextConfig(_ConfigBase):
    """Text tower: a causal CLIP-style transformer."""

    model_type = "groupvit_text_model"
    _base_key = "text_config"
    _defaults = dict(
        vocab_size=49408,
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=12,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        dropout=0.0,
        attention_dropout=0.0,
        initializer_range=0.02,
        initializer_factor=1.0,
        pad_token_id=1,
        bos_token_id=49406,
        eos_token_id=49407,
    )

    def validate(self) -> None:
        owner = "text_config"
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads",
                     "max_position_embeddings"):
            setattr(self, name, _check_positive_int(owner, name, getattr(self, name), maximum=MAX_SIZE))
        self.num_hidden_layers = _check_positive_int(owner, "num_hidden_layers", self.num_hidden_layers,
                                                     maximum=MAX_LAYERS)
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"text_config.hidden_size ({self.hidden_size}) must be divisible by "
                f"text_config.num_attention_heads ({self.num_attention_heads})"
            )
        self.hidden_act = _check_activation(owner, self.hidden_act)
        self.layer_norm_eps = _check_number(owner, "layer_norm_eps", self.layer_norm_eps)
        self.dropout = _check_rate(owner, "dropout", self.dropout)
        self.attention_dropout = _check_rate(owner, "attention_dropout", self.attention_dropout)
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, _check_positive_int(owner, name, value, allow_zero=True))
        if self.eos_token_id is None:
            raise ValueError("text_config.eos_token_id is required: text pooling reads the first eos token")

    @property
    def legacy_eos_pooling(self) -> bool:
        """Published checkpoints carry eos_token_id == 2; the reference then pools at argmax(input_ids)."""
        return self.eos_token_id == 2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass(frozen=True)
class StageSpec:
    """What one vision stage holds, derived from the vision config (identical for both frameworks)."""

    index: int
    depth: int
    num_group_tokens: int
    num_output_groups: int
    num_prev_group_tokens: int

    @property
    def has_group_tokens(self) -> bool:
        return self.num_group_tokens > 0

    @property
    def has_downsample(self) -> bool:
        return self.num_group_tokens > 0

    @property
    def has_group_projector(self) -> bool:
        return self.num_prev_group_tokens > 0 and self.num_group_tokens > 0


class GroupViTVisionConfig(_ConfigBase):
    """Vision tower: patch embedding followed by grouping stages."""

    model_type = "groupvit_vision_model"
    _base_key = "vision_config"
    _defaults = dict(
        hidden_size=384,
        intermediate_size=1536,
        depths=[6, 3, 3],
        num_hidden_layers=12,
        num_group_tokens=[64, 8, 0],
        num_output_groups=[64, 8, 8],
        num_attention_heads=6,
        image_size=224,
        patch_size=16,
        num_channels=3,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        dropout=0.0,
        attention_dropout=0.0,
        initializer_range=0.02,
        initializer_factor=1.0,
        assign_eps=1.0,
        assign_mlp_ratio=[0.5, 4],
    )

    def validate(self) -> None:
        owner = "vision_config"
        for name in ("hidden_size", "intermediate_size", "num_attention_heads", "image_size", "patch_size",
                     "num_channels"):
            setattr(self, name, _check_positive_int(owner, name, getattr(self, name), maximum=MAX_SIZE))
        self.num_hidden_layers = _check_positive_int(owner, "num_hidden_layers", self.num_hidden_layers,
                                                     maximum=MAX_LAYERS * MAX_STAGES)
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"vision_config.hidden_size ({self.hidden_size}) must be divisible by "
                f"vision_config.num_attention_heads ({self.num_attention_heads})"
            )
        if self.image_size % self.patch_size:
            raise ValueError(
                f"vision_config.image_size ({self.image_size}) must be a multiple of "
                f"vision_config.patch_size ({self.patch_size})"
            )
        self.depths = _check_int_list(owner, "depths", self.depths, allow_zero=False, maximum=MAX_LAYERS)
        if not self.depths:
            raise ValueError("vision_config.depths must name at least one stage")
        self.num_group_tokens = _check_int_list(owner, "num_group_tokens", self.num_group_tokens, allow_zero=True,
                                                maximum=MAX_SIZE)
        self.num_output_groups = _check_int_list(owner, "num_output_groups", self.num_output_groups,
                                                 allow_zero=False, maximum=MAX_SIZE)
        for name in ("num_group_tokens", "num_output_groups"):
            if len(getattr(self, name)) != len(self.depths):
                raise ValueError(
                    f"vision_config.{name} has {len(getattr(self, name))} entries but depths has "
                    f"{len(self.depths)}: one per stage is required"
                )
        if self.num_group_tokens[0] == 0 and len(self.depths) > 1:
            # Without group tokens the first stage would pass all patch tokens on, and a later
            # group_projector would expect num_output_groups[0] tokens that do not exist.
            raise ValueError("vision_config.num_group_tokens[0] must be positive when there are several stages")
        for i in range(1, len(self.depths)):
            if self.num_group_tokens[i] > 0 and self.num_group_tokens[i - 1] == 0:
                raise ValueError(
                    f"vision_config.num_group_tokens[{i}] is positive but stage {i - 1} has no group tokens"
                )
        self.hidden_act = _check_activation(owner, self.hidden_act)
        self.layer_norm_eps = _check_number(owner, "layer_norm_eps", self.layer_norm_eps)
        self.assign_eps = _check_number(owner, "assign_eps", self.assign_eps, positive=False)
        if self.assign_eps < 0:
            raise ValueError(f"vision_config.assign_eps must be non-negative, got {self.assign_eps}")
        self.dropout = _check_rate(owner, "dropout", self.dropout)
        self.attention_dropout = _check_rate(owner, "attention_dropout", self.attention_dropout)
        ratio = self.assign_mlp_ratio
        if isinstance(ratio, (list, tuple)):
            if len(ratio) != 2:
                raise ValueError(f"vision_config.assign_mlp_ratio must be a number or a pair, got {ratio!r}")
            ratios = [_check_number(owner, f"assign_mlp_ratio[{i}]", r) for i, r in enumerate(ratio)]
        else:
            ratios = [_check_number(owner, "assign_mlp_ratio", ratio)] * 2
        for i, r in enumerate(ratios):
            product = r * self.hidden_size
            if not math.isfinite(product) or product > MAX_SIZE:
                raise ValueError(
                    f"vision_config.assign_mlp_ratio[{i}] ({r}) * hidden_size ({self.hidden_size}) must be at most "
                    f"{MAX_SIZE}"
                )
            if int(product) < 1:
                raise ValueError(f"vision_config.assign_mlp_ratio[{i}] * hidden_size must be at least 1")

    # ----- derived quantities, shared by both frameworks -----
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size * self.grid_size

    @property
    def assign_mlp_dims(self) -> Tuple[int, int]:
        """(tokens_dim, channels_dim) of TokenAssign's two MLPs, as the reference truncates them."""
        ratio = self.assign_mlp_ratio
        pair = ratio if isinstance(ratio, (list, tuple)) else (ratio, ratio)
        return int(pair[0] * self.hidden_size), int(pair[1] * self.hidden_size)

    @property
    def group_projector_dim(self) -> int:
        return self.hidden_size // 2

    @property
    def stages(self) -> List[StageSpec]:
        return [
            StageSpec(
                index=i,
                depth=self.depths[i],
                num_group_tokens=self.num_group_tokens[i],
                num_output_groups=self.num_output_groups[i],
                num_prev_group_tokens=self.num_output_groups[i - 1] if i > 0 else 0,
            )
            for i in range(len(self.depths))
        ]

    @property
    def num_final_tokens(self) -> int:
        """Tokens leaving the last stage: its output groups, or the patches if no stage groups."""
        for spec in reversed(self.stages):
            if spec.has_downsample:
                return spec.num_output_groups
        return self.num_patches


def _sub_config(cls, value: Any, name: str):
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value.copy()
    if isinstance(value, dict):
        return cls.from_dict(value)
    raise TypeError(f"{name} must be a {cls.__name__} or a dict, got {type(value).__name__}")


class GroupViTConfig(_ConfigBase):
    """The joint model: a text config, a vision config and the projection heads."""

    model_type = "groupvit"
    _defaults = dict(
        projection_dim=256,
        projection_intermediate_dim=4096,
        logit_scale_init_value=2.6592,
    )

    def __init__(self, text_config: Any = None, vision_config: Any = None, **kwargs: Any) -> None:
        # Old Hub files (transformers < 4.23) carry `text_config_dict` / `vision_config_dict`, which take
        # precedence over `text_config` / `vision_config` exactly as transformers resolves them.
        text_dict = kwargs.pop("text_config_dict", None)
        vision_dict = kwargs.pop("vision_config_dict", None)
        if text_dict is not None:
            text_config = _merge_legacy(text_config, text_dict, "text_config_dict")
        if vision_dict is not None:
            vision_config = _merge_legacy(vision_config, vision_dict, "vision_config_dict")
        text = _sub_config(GroupViTTextConfig, text_config, "text_config")
        vision = _sub_config(GroupViTVisionConfig, vision_config, "vision_config")
        object.__setattr__(self, "text_config", text)
        object.__setattr__(self, "vision_config", vision)
        super().__init__(**kwargs)

    def validate(self) -> None:
        owner = "config"
        self.projection_dim = _check_positive_int(owner, "projection_dim", self.projection_dim, maximum=MAX_SIZE)
        self.projection_intermediate_dim = _check_positive_int(
            owner, "projection_intermediate_dim", self.projection_intermediate_dim, maximum=MAX_SIZE
        )
        self.logit_scale_init_value = _check_number(owner, "logit_scale_init_value", self.logit_scale_init_value,
                                                    positive=False)

    @classmethod
    def from_text_vision_configs(cls, text_config: GroupViTTextConfig, vision_config: GroupViTVisionConfig,
                                 **kwargs: Any) -> "GroupViTConfig":
        if not isinstance(text_config, GroupViTTextConfig):
            raise TypeError(f"text_config must be a GroupViTTextConfig, got {type(text_config).__name__}")
        if not isinstance(vision_config, GroupViTVisionConfig):
            raise TypeError(f"vision_config must be a GroupViTVisionConfig, got {type(vision_config).__name__}")
        return cls(text_config=text_config.to_dict(), vision_config=vision_config.to_dict(), **kwargs)

    def to_dict(self) -> Dict[str, Any]:
        out = super().to_dict()
        out["text_config"] = self.text_config.to_dict()
        out["vision_config"] = self.vision_config.to_dict()
        return out

def _merge_legacy(config: Any, legacy: Any, name: str) -> Dict[str, Any]:
    if not isinstance(legacy, dict):
        raise TypeError(f"{name} must be a dict, got {type(legacy).__name__}")
    base = config.to_dict() if isinstance(config, _ConfigBase) else dict(config or {})
    base.update(legacy)
    return base


def resolve_config_file(path: Union[str, os.PathLike]) -> str:
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(path):
        raise OSError(f"no {CONFIG_NAME} found at {path}")
    return path


def _read_json(path: Union[str, os.PathLike]) -> Dict[str, Any]:
    data = read_json_file(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def load_any_config(path: Union[str, os.PathLike]) -> _ConfigBase:
    """Read a config.json of any of the three model types (full, text-only, vision-only)."""
    data = _read_json(resolve_config_file(path))
    model_type = data.get("model_type", GroupViTConfig.model_type)
    for cls in (GroupViTConfig, GroupViTTextConfig, GroupViTVisionConfig):
        if cls.model_type == model_type:
            return cls.from_dict(data)
    raise ValueError(f"{path}: unknown model_type {model_type!r}")
