"""The original NVlabs GroupViT checkpoints (``group_vit_gcc_yfcc_30e-879422e0.pth`` ...) as canonical weights.

An NVlabs training checkpoint is a torch zip file holding ``{'model': state_dict, 'optimizer': ..., 'epoch': ...,
'config': <OmegaConf DictConfig>}``; ``state_dict`` is the ``MultiLabelContrastive`` model's own (saved without
DistributedDataParallel, so without a ``module.`` prefix; a uniform ``module.`` prefix is stripped anyway). It is
read with :func:`groupvit_core.checkpoint.read_torch_pickle`, which executes no pickled code and needs no torch.

Name mapping, NVlabs -> canonical (Hugging Face) names; ``i`` is a stage or text layer, ``j`` a vision block:

* ``img_encoder.patch_embed.proj`` -> ``vision_model.embeddings.patch_embeddings.projection``;
  ``img_encoder.patch_embed.norm`` -> ``vision_model.embeddings.layernorm``;
  ``img_encoder.pos_embed`` (1, N, C) -> ``vision_model.embeddings.position_embeddings``;
  ``img_encoder.norm`` -> ``vision_model.layernorm``.
* ``img_encoder.layers.i.group_token`` -> ``vision_model.encoder.stages.i.group_token``.
* ``img_encoder.layers.i.blocks.j.attn.qkv`` (3C, C), fused -> ``...stages.i.layers.j.self_attn.{q,k,v}_proj``;
  ``blocks.j.{norm1, attn.proj, norm2, mlp.fc1, mlp.fc2}`` -> ``layers.j.{layer_norm1, self_attn.out_proj,
  layer_norm2, mlp.fc1, mlp.fc2}``.
* ``img_encoder.layers.i.downsample.*`` (GroupingBlock) -> ``...stages.i.downsample.*`` under the same names, except
  ``pre_assign_attn.attn.proj`` -> ``pre_assign_attn.attn.out_proj``.
* ``img_encoder.layers.i.group_projector.{0, 1.fc1, 1.fc2}`` -> ``...stages.i.group_projector.{0, 1.fc1, 1.fc2}``.
* ``text_encoder.token_embedding`` -> ``text_model.embeddings.token_embedding``;
  ``text_encoder.positional_embedding`` -> ``text_model.embeddings.position_embedding.weight``;
  ``text_encoder.ln_final`` -> ``text_model.final_layer_norm``.
* ``text_encoder.transformer.resblocks.i.attn.in_proj_{weight,bias}`` (3C, C), fused ->
  ``text_model.encoder.layers.i.self_attn.{q,k,v}_proj``; ``resblocks.i.{ln_1, attn.out_proj, ln_2, mlp.c_fc,
  mlp.c_proj}`` -> ``layers.i.{layer_norm1, self_attn.out_proj, layer_norm2, mlp.fc1, mlp.fc2}``.
* ``{img,text}_projector.linear_hidden.0`` / ``.linear_out`` (Conv1d, kernel 1, weight (out, in, 1)) ->
  ``{visual,text}_projection.0`` / ``.3`` with the weight squeezed to (out, in);
  ``{img,text}_projector.linear_hidden.1`` (SyncBatchNorm, statistics and counter) -> ``{visual,text}_projection.1``.
* ``logit_scale`` -> ``logit_scale``; ``multi_label_logit_scale`` (the multi-label loss temperature) is dropped.

Both fused projections put q, k, v in that order along the output axis: ``nn.MultiheadAttention.in_proj_weight``
by definition and the vision ``Attention.qkv`` through its ``reshape(B, N, 3, heads, C // heads)``.

The config is inferred from the tensor shapes (widths, depths, group tokens, output groups, MLP sizes, patch and
image size, vocabulary, context length, projection sizes) except for the head counts, which no shape carries:

* vision heads: the checkpoint's ``config.model.img_encoder.num_heads`` when the pickled config is readable as plain
  data (OmegaConf containers, ``argparse.Namespace`` and dicts are read without importing anything; one value for
  every stage is required), else the published 6;
* text heads: the NVlabs ``TextTransformer`` fixes ``heads = width // 64`` (the published 4 for width 256), unless
  the config names ``text_encoder.heads``;
* both can be forced with the ``vision_heads`` / ``text_heads`` arguments.

The text ids are the legacy ones of the published Hugging Face checkpoints (``bos 0 / eos 2 / pad 1``, what the
transformers conversion script wrote): ``eos_token_id == 2`` selects ``argmax(input_ids)`` pooling, which is exactly
the NVlabs ``text.argmax(dim=-1)``. NVlabs options that the Hugging Face architecture cannot express (``embed_factors``
other than 1, ``qk_scale``, soft assignment, a classification head, other projector depths) raise ValueError.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

import numpy as np

from . import checkpoint
from .config import GroupViTConfig
from .weights import check_state

# Prefixes of an NVlabs MultiLabelContrastive state dict (and of nothing in a Hugging Face one).
NVLABS_PREFIXES = ("img_encoder.", "text_encoder.", "img_projector.", "text_projector.")
HF_PREFIXES = ("text_model.", "vision_model.", "visual_projection.", "text_projection.")
# NVlabs tensors with no Hugging Face counterpart, dropped on conversion.
DROPPED_TENSORS = ("multi_label_logit_scale",)
# Published head count of the vision tower (configs/group_vit_gcc_*.yml: num_heads [6, 6, 6]).
DEFAULT_VISION_HEADS = 6
# NVlabs TextTransformer: heads = width // TEXT_HEAD_WIDTH.
TEXT_HEAD_WIDTH = 64
# Text ids of the published Hugging Face conversions (nvidia/groupvit-gcc-yfcc, nvidia/groupvit-gcc-redcaps).
LEGACY_TEXT_IDS = {"bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1}

_DEPTH_LIMIT = 64


# ----------------------------------------------------------------------------------------------------------------
# Pickled configs as plain data
# ----------------------------------------------------------------------------------------------------------------


def plain_data(obj: Any, _depth: int = 0) -> Any:
    """Best-effort plain-data view (dict / list / scalars) of an object from the restricted unpickler.

    OmegaConf containers arrive as inert ``UnresolvedGlobal`` objects whose state holds ``_content`` (a dict or list
    of nodes) and value nodes whose state holds ``_val``; ``argparse.Namespace`` and other plain objects hold their
    attributes as state. Values that cannot be read (OmegaConf ``???`` and ``${...}`` interpolations, arbitrary
    objects, tensors) become None inside lists and are left out of dicts; an unreadable top level gives None.
    """
    value = _plain(obj, _depth)
    return None if value is _UNREADABLE else value


class _Unreadable:
    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        return "<unreadable>"


_UNREADABLE = _Unreadable()


def _plain(obj: Any, depth: int) -> Any:
    if depth > _DEPTH_LIMIT:
        return _UNREADABLE
    if obj is None or isinstance(obj, (bool, int, float)):
        return obj
    if isinstance(obj, str):
        # OmegaConf's mandatory-missing marker and unresolved interpolations carry no value.
        return _UNREADABLE if obj == "???" or "${" in obj else obj
    if isinstance(obj, (np.ndarray, np.generic)):
        return obj.item() if obj.ndim == 0 and obj.dtype.kind in "biuf" else _UNREADABLE
    if isinstance(obj, Mapping):
        out = {}
        for key, item in obj.items():
            if isinstance(key, (str, int)) and not isinstance(key, bool):
                converted = _plain(item, depth + 1)
                if converted is not _UNREADABLE:
                    out[str(key)] = converted
        return out
    if isinstance(obj, (list, tuple)):
        return [None if (v := _plain(item, depth + 1)) is _UNREADABLE else v for item in obj]
    if isinstance(obj, checkpoint.UnresolvedGlobal):
        state = obj.state
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[0], (dict, type(None))):
            # (instance dict, slot dict) as pickled for objects with __slots__
            merged = dict(state[0] or {})
            merged.update(state[1] if isinstance(state[1], dict) else {})
            state = merged
        if isinstance(state, dict):
            if "_content" in state:  # OmegaConf DictConfig / ListConfig
                return _plain(state["_content"], depth + 1)
            if "_val" in state:  # OmegaConf value node
                return _plain(state["_val"], depth + 1)
            attributes = {k: v for k, v in state.items() if isinstance(k, str) and not k.startswith("_")}
            attributes.update(obj.items)  # dict subclasses (EasyDict, yacs CfgNode) fill items too
            return _plain(attributes, depth + 1)
        if obj.items:
            return _plain(obj.items, depth + 1)
        if obj.kwargs and not obj.args:  # e.g. argparse.Namespace(**kw) built by REDUCE
            return _plain(obj.kwargs, depth + 1)
    return _UNREADABLE


def _lookup(data: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


def model_section(nvlabs_config: Any) -> Optional[Dict[str, Any]]:
    """The ``model`` part of an NVlabs config (plain data), or None: ``{'img_encoder': ..., 'text_encoder': ...}``."""
    if not isinstance(nvlabs_config, dict):
        return None
    model = nvlabs_config.get("model")
    if isinstance(model, dict) and ("img_encoder" in model or "text_encoder" in model):
        return model
    if "img_encoder" in nvlabs_config or "text_encoder" in nvlabs_config:
        return nvlabs_config
    return None


# ----------------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------------


def looks_like_nvlabs(names: Iterable[str]) -> bool:
    """True when the tensor names are those of an NVlabs model (``module.`` prefix allowed), not HF ones."""
    names = [_strip_module(n) for n in names]
    return any(n.startswith(NVLABS_PREFIXES) for n in names) and not any(n.startswith(HF_PREFIXES) for n in names)


def _strip_module(name: str) -> str:
    return name[len("module."):] if name.startswith("module.") else name


def strip_module_prefix(state: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """Remove a ``module.`` prefix (DistributedDataParallel) when every name carries it."""
    if state and all(name.startswith("module.") for name in state):
        return {name[len("module."):]: array for name, array in state.items()}
    return dict(state)


_TENSOR_TYPES = (np.ndarray, np.generic)


def read_nvlabs_checkpoint(path: os.PathLike) -> Tuple[Dict[str, np.ndarray], Optional[Dict[str, Any]]]:
    """Read an NVlabs ``.pth`` into (state dict, plain-data config or None) without torch and without executing code.

    The state dict is the top-level object when it is one, else its ``'model'`` (or ``'state_dict'``) entry; the
    config is the ``'config'`` entry read by :func:`plain_data` (None when absent or unreadable).
    """
    path = os.fspath(path)
    obj = checkpoint.read_torch_pickle(path)
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path}: top-level object is a {type(obj).__name__}, not a checkpoint dict")
    if obj and all(isinstance(v, _TENSOR_TYPES) for v in obj.values()):
        state, config = obj, None
    else:
        for entry in ("model", "state_dict"):
            if isinstance(obj.get(entry), Mapping):
                state = obj[entry]
                break
        else:
            keys = sorted(str(k) for k in obj)
            raise ValueError(f"{path}: no 'model' state dict in the checkpoint; its top-level keys are {keys}")
        config = plain_data(obj.get("config")) if "config" in obj else None
    for name, value in state.items():
        if not isinstance(name, str):
            raise ValueError(f"{path}: state dict key {name!r} is not a string")
        if not isinstance(value, _TENSOR_TYPES):
            raise ValueError(f"{path}: state dict entry {name!r} is a {type(value).__name__}, not a tensor")
    # 0-d tensors may come back as numpy scalars (e.g. widened bfloat16); keep every entry an ndarray.
    return {name: np.asarray(value) for name, value in state.items()}, config if isinstance(config, dict) else None


# ----------------------------------------------------------------------------------------------------------------
# Name mapping
# ----------------------------------------------------------------------------------------------------------------

# Modules of an NVlabs AttnBlock -> canonical GroupViTEncoderLayer modules (the fused qkv is handled separately).
_VISION_BLOCK_MODULES = {
    "norm1": "layer_norm1",
    "attn.proj": "self_attn.out_proj",
    "norm2": "layer_norm2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
# Modules of an NVlabs ResidualAttentionBlock -> canonical GroupViTEncoderLayer modules.
_TEXT_BLOCK_MODULES = {
    "ln_1": "layer_norm1",
    "attn.out_proj": "self_attn.out_proj",
    "ln_2": "layer_norm2",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
# Modules of an NVlabs GroupingBlock -> canonical GroupViTTokenAssign modules.
_GROUPING_MODULES = {
    "norm_tokens": "norm_tokens",
    "mlp_inter.fc1": "mlp_inter.fc1",
    "mlp_inter.fc2": "mlp_inter.fc2",
    "norm_post_tokens": "norm_post_tokens",
    "norm_x": "norm_x",
    "pre_assign_attn.attn.q_proj": "pre_assign_attn.attn.q_proj",
    "pre_assign_attn.attn.k_proj": "pre_assign_attn.attn.k_proj",
    "pre_assign_attn.attn.v_proj": "pre_assign_attn.attn.v_proj",
    "pre_assign_attn.attn.proj": "pre_assign_attn.attn.out_proj",
    "pre_assign_attn.norm2": "pre_assign_attn.norm2",
    "pre_assign_attn.mlp.fc1": "pre_assign_attn.mlp.fc1",
    "pre_assign_attn.mlp.fc2": "pre_assign_attn.mlp.fc2",
    "pre_assign_attn.norm_post": "pre_assign_attn.norm_post",
    "assign.q_proj": "assign.q_proj",
    "assign.k_proj": "assign.k_proj",
    "assign.v_proj": "assign.v_proj",
    "assign.proj": "assign.proj",
    "norm_new_x": "norm_new_x",
    "mlp_channels.fc1": "mlp_channels.fc1",
    "mlp_channels.fc2": "mlp_channels.fc2",
}
_GROUP_PROJECTOR_MODULES = {"0": "0", "1.fc1": "1.fc1", "1.fc2": "1.fc2"}
_SINGLE_TENSORS = {
    "logit_scale": "logit_scale",
    "img_encoder.pos_embed": "vision_model.embeddings.position_embeddings",
    "text_encoder.token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "text_encoder.positional_embedding": "text_model.embeddings.position_embedding.weight",
}
_TOP_MODULES = {
    "img_encoder.patch_embed.proj": "vision_model.embeddings.patch_embeddings.projection",
    "img_encoder.patch_embed.norm": "vision_model.embeddings.layernorm",
    "img_encoder.norm": "vision_model.layernorm",
    "text_encoder.ln_final": "text_model.final_layer_norm",
}
_PROJECTORS = {"img_projector": "visual_projection", "text_projector": "text_projection"}
_PROJECTOR_MODULES = {"linear_hidden.0": ("0", True), "linear_hidden.1": ("1", False), "linear_out": ("3", True)}
_BN_LEAVES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")

_VISION_LAYER = re.compile(r"img_encoder\.layers\.(\d+)\.(.+)")
_TEXT_BLOCK = re.compile(r"text_encoder\.transformer\.resblocks\.(\d+)\.(.+)")
_PROJECTOR = re.compile(r"(img_projector|text_projector)\.(.+)")

# NVlabs modules the Hugging Face architecture has no place for, with the option that creates them.
_UNSUPPORTED = (
    (re.compile(r"img_encoder\.layers\.\d+\.downsample\.reduction\."), "img_encoder.embed_factors other than 1"),
    (re.compile(r"img_encoder\.layers\.\d+\.group_projector\.[2-9]"), "img_encoder.embed_factors other than 1"),
    (re.compile(r"img_encoder\.head\."), "a classification head (img_encoder.num_classes > 0)"),
    (re.compile(r"\.pre_assign_attn\.norm_[qk]\."), "a pre-norm cross-attention block"),
    (re.compile(r"_projector\.linear_hidden\.[3-9]"), "proj_num_layers other than 2"),
)


def _split_module(name: str) -> Tuple[str, str]:
    module, _, leaf = name.rpartition(".")
    return module, leaf


def _split_fused(array: np.ndarray, name: str, source: str) -> List[np.ndarray]:
    if array.ndim not in (1, 2) or array.shape[0] % 3:
        raise ValueError(f"{source}: fused q/k/v tensor {name} has shape {array.shape}; expected (3*C, C) or (3*C,)")
    return [np.ascontiguousarray(part) for part in np.split(array, 3, axis=0)]


def _squeeze_conv1d(array: np.ndarray, name: str, source: str) -> np.ndarray:
    """A Conv1d(kernel_size=1) weight (out, in, 1) is a Linear weight (out, in)."""
    if array.ndim == 3 and array.shape[2] == 1:
        return np.ascontiguousarray(array[:, :, 0])
    if array.ndim == 2:
        return array
    raise ValueError(f"{source}: projector weight {name} has shape {array.shape}; expected (out, in, 1)")


def _map_tensor(name: str, array: np.ndarray, source: str) -> Optional[List[Tuple[str, np.ndarray]]]:
    """Canonical (name, array) pairs for one NVlabs tensor; None when the name is not an NVlabs GroupViT name."""
    if name in _SINGLE_TENSORS:
        if name == "logit_scale" and array.size == 1:
            array = array.reshape(())
        return [(_SINGLE_TENSORS[name], array)]
    module, leaf = _split_module(name)
    if module in _TOP_MODULES and leaf in ("weight", "bias"):
        return [(f"{_TOP_MODULES[module]}.{leaf}", array)]

    match = _VISION_LAYER.fullmatch(name)
    if match:
        stage, rest = match.group(1), match.group(2)
        prefix = f"vision_model.encoder.stages.{stage}"
        if rest == "group_token":
            return [(f"{prefix}.group_token", array)]
        block = re.fullmatch(r"blocks\.(\d+)\.(.+)", rest)
        if block:
            layer = f"{prefix}.layers.{block.group(1)}"
            inner, leaf = _split_module(block.group(2))
            if inner == "attn.qkv" and leaf in ("weight", "bias"):
                parts = _split_fused(array, name, source)
                return [(f"{layer}.self_attn.{p}_proj.{leaf}", part) for p, part in zip("qkv", parts)]
            if inner in _VISION_BLOCK_MODULES and leaf in ("weight", "bias"):
                return [(f"{layer}.{_VISION_BLOCK_MODULES[inner]}.{leaf}", array)]
            return None
        for group, table, target in (("downsample", _GROUPING_MODULES, "downsample"),
                                     ("group_projector", _GROUP_PROJECTOR_MODULES, "group_projector")):
            if rest.startswith(group + "."):
                inner, leaf = _split_module(rest[len(group) + 1:])
                if inner in table and leaf in ("weight", "bias"):
                    return [(f"{prefix}.{target}.{table[inner]}.{leaf}", array)]
        return None

    match = _TEXT_BLOCK.fullmatch(name)
    if match:
        layer = f"text_model.encoder.layers.{match.group(1)}"
        rest = match.group(2)
        if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
            leaf = rest.rsplit("_", 1)[1]
            parts = _split_fused(array, name, source)
            return [(f"{layer}.self_attn.{p}_proj.{leaf}", part) for p, part in zip("qkv", parts)]
        inner, leaf = _split_module(rest)
        if inner in _TEXT_BLOCK_MODULES and leaf in ("weight", "bias"):
            return [(f"{layer}.{_TEXT_BLOCK_MODULES[inner]}.{leaf}", array)]
        return None

    match = _PROJECTOR.fullmatch(name)
    if match:
        target = _PROJECTORS[match.group(1)]
        inner, leaf = _split_module(match.group(2))
        if inner in _PROJECTOR_MODULES:
            index, is_conv = _PROJECTOR_MODULES[inner]
            if is_conv and leaf in ("weight", "bias"):
                value = _squeeze_conv1d(array, name, source) if leaf == "weight" else array
                return [(f"{target}.{index}.{leaf}", value)]
            if not is_conv and leaf in _BN_LEAVES:
                return [(f"{target}.{index}.{leaf}", array)]
        return None
    return None


def map_nvlabs_names(state: Mapping[str, np.ndarray], source: str = "NVlabs checkpoint",
                     ) -> Tuple[Dict[str, np.ndarray], List[str]]:
    """Rename and split NVlabs tensors into canonical ones; returns (canonical state, dropped NVlabs names).

    Raises ValueError naming every tensor that is not part of a GroupViT model the Hugging Face layout can hold.
    """
    state = strip_module_prefix(state)
    canonical: Dict[str, np.ndarray] = {}
    origin: Dict[str, str] = {}
    dropped: List[str] = []
    unknown: List[str] = []
    unsupported: Dict[str, List[str]] = {}
    for name in state:
        array = np.asarray(state[name])
        if name in DROPPED_TENSORS:
            dropped.append(name)
            continue
        reason = next((why for pattern, why in _UNSUPPORTED if pattern.search(name)), None)
        if reason is not None:
            unsupported.setdefault(reason, []).append(name)
            continue
        mapped = _map_tensor(name, array, source)
        if mapped is None:
            unknown.append(name)
            continue
        for target, value in mapped:
            if target in canonical:
                raise ValueError(f"{source}: {name} and {origin[target]} both map to {target}")
            canonical[target], origin[target] = value, name
    problems = [f"{why} is not supported by the GroupViT (Hugging Face) architecture: {_preview(names)}"
                for why, names in unsupported.items()]
    if unknown:
        problems.append(f"{len(unknown)} tensor(s) are not NVlabs GroupViT tensors: {_preview(unknown)}")
    if problems:
        raise ValueError(f"{source}: " + "; ".join(problems))
    return canonical, dropped


def _preview(names: List[str], limit: int = 6) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


# ----------------------------------------------------------------------------------------------------------------
# Config inference
# ----------------------------------------------------------------------------------------------------------------

# Canonical tensor -> its NVlabs name, for the tensors the config is read from (error messages).
_SHAPE_SOURCES = {
    "text_model.embeddings.token_embedding.weight": "text_encoder.token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "text_encoder.positional_embedding",
    "text_model.encoder.layers.0.mlp.fc1.weight": "text_encoder.transformer.resblocks.0.mlp.c_fc.weight",
    "vision_model.embeddings.position_embeddings": "img_encoder.pos_embed",
    "vision_model.embeddings.patch_embeddings.projection.weight": "img_encoder.patch_embed.proj.weight",
    "vision_model.encoder.stages.0.layers.0.mlp.fc1.weight": "img_encoder.layers.0.blocks.0.mlp.fc1.weight",
    "visual_projection.0.weight": "img_projector.linear_hidden.0.weight",
    "visual_projection.3.weight": "img_projector.linear_out.weight",
}


def _shape(state: Mapping[str, np.ndarray], name: str, ndim: int, source: str) -> Tuple[int, ...]:
    if name not in state:
        nvlabs = _SHAPE_SOURCES.get(name)
        hint = f" (NVlabs name {nvlabs})" if nvlabs else ""
        raise ValueError(f"{source}: missing tensor {name}{hint}, needed to infer the config")
    shape = tuple(np.shape(state[name]))
    if len(shape) != ndim:
        raise ValueError(f"{source}: {name} has shape {shape}; expected {ndim} dimensions")
    return shape


def _indices(state: Mapping[str, np.ndarray], pattern: str, what: str, source: str) -> List[int]:
    regex = re.compile(pattern)
    found = sorted({int(m.group(1)) for name in state if (m := regex.match(name))})
    if found != list(range(len(found))):
        raise ValueError(f"{source}: {what} indices {found} are not numbered 0, 1, 2, ... (a block is missing)")
    return found


def _ratio(dim: int, hidden: int) -> Any:
    """A ratio r with int(r * hidden) == dim, written as the published config writes it (0.5, 4)."""
    ratio = dim / hidden
    if ratio.is_integer():
        return int(ratio)
    while int(ratio * hidden) < dim:  # float rounding below an exact integer product
        ratio = float(np.nextafter(ratio, np.inf))
    return ratio


def _head_count(value: Any, what: str, source: str) -> Optional[int]:
    if value is None:
        return None
    values = value if isinstance(value, list) else [value]
    values = [v for v in values if v is not None]
    if not values:
        return None
    if any(isinstance(v, bool) or not isinstance(v, int) or v <= 0 for v in values):
        raise ValueError(f"{source}: {what} must hold positive integers, got {value!r}")
    if len(set(values)) != 1:
        raise ValueError(f"{source}: {what} = {value!r} differs between stages; GroupViT has one head count")
    return values[0]


def _check_supported_options(model: Optional[Dict[str, Any]], source: str) -> None:
    if model is None:
        return
    image = model.get("img_encoder") if isinstance(model.get("img_encoder"), dict) else {}
    text = model.get("text_encoder") if isinstance(model.get("text_encoder"), dict) else {}
    problems = []
    if model.get("type") not in (None, "MultiLabelContrastive"):
        problems.append(f"model.type is {model['type']!r}, expected 'MultiLabelContrastive'")
    if image.get("type") not in (None, "GroupViT"):
        problems.append(f"img_encoder.type is {image['type']!r}, expected 'GroupViT'")
    if text.get("type") not in (None, "TextTransformer"):
        problems.append(f"text_encoder.type is {text['type']!r}, expected 'TextTransformer'")
    if image.get("qk_scale") is not None:
        problems.append(f"img_encoder.qk_scale = {image['qk_scale']!r} (only the default head_dim ** -0.5)")
    if image.get("hard_assignment") is False:
        problems.append("img_encoder.hard_assignment = False (only hard assignment)")
    factors = image.get("embed_factors")
    if isinstance(factors, list) and any(f not in (None, 1) for f in factors):
        problems.append(f"img_encoder.embed_factors = {factors} (only 1)")
    if model.get("proj_num_layers") not in (None, 2):
        problems.append(f"proj_num_layers = {model['proj_num_layers']!r} (only 2)")
    if problems:
        raise ValueError(f"{source}: the checkpoint's config uses options the GroupViT (Hugging Face) architecture "
                         "does not have: " + "; ".join(problems))


def _infer_text(state: Mapping[str, np.ndarray], model: Optional[Dict[str, Any]], heads: Optional[int],
                source: str, notes: List[str]) -> Dict[str, Any]:
    vocab, hidden = _shape(state, "text_model.embeddings.token_embedding.weight", 2, source)
    context, _ = _shape(state, "text_model.embeddings.position_embedding.weight", 2, source)
    layers = _indices(state, r"text_model\.encoder\.layers\.(\d+)\.", "text block", source)
    if not layers:
        raise ValueError(f"{source}: no text transformer blocks (text_encoder.transformer.resblocks.*)")
    intermediate = _shape(state, "text_model.encoder.layers.0.mlp.fc1.weight", 2, source)[0]
    configured = _head_count(_lookup(model, "text_encoder", "heads"), "text_encoder.heads", source)
    if heads is not None:
        notes.append(f"text heads: {heads} (given)")
    elif configured is not None:
        heads = configured
        notes.append(f"text heads: {heads} (from the checkpoint's config)")
    else:
        heads = hidden // TEXT_HEAD_WIDTH
        if heads == 0 or hidden % heads:
            raise ValueError(
                f"{source}: cannot infer the text head count: the NVlabs TextTransformer uses width // "
                f"{TEXT_HEAD_WIDTH} heads, which is {heads} for width {hidden}; give text_heads"
            )
        notes.append(f"text heads: {heads} (width {hidden} // {TEXT_HEAD_WIDTH}, the NVlabs rule)")
    return dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=len(layers),
                num_attention_heads=heads, max_position_embeddings=context, **LEGACY_TEXT_IDS)


def _infer_vision(state: Mapping[str, np.ndarray], model: Optional[Dict[str, Any]], heads: Optional[int],
                  source: str, notes: List[str]) -> Dict[str, Any]:
    _, num_patches, hidden = _shape(state, "vision_model.embeddings.position_embeddings", 3, source)
    _, channels, patch, patch_w = _shape(state, "vision_model.embeddings.patch_embeddings.projection.weight", 4,
                                         source)
    if patch != patch_w:
        raise ValueError(f"{source}: non-square patches ({patch}x{patch_w}) are not supported")
    grid = int(round(num_patches ** 0.5))
    if grid * grid != num_patches:
        raise ValueError(f"{source}: img_encoder.pos_embed has {num_patches} positions, not a square grid")
    image_size = grid * patch
    configured_size = _lookup(model, "img_encoder", "img_size")
    if isinstance(configured_size, int) and configured_size != image_size:
        raise ValueError(f"{source}: the config's img_encoder.img_size is {configured_size} but the position table "
                         f"({num_patches} positions of {patch}x{patch} patches) is for {image_size}")

    stages = _indices(state, r"vision_model\.encoder\.stages\.(\d+)\.", "vision stage", source)
    if not stages:
        raise ValueError(f"{source}: no vision stages (img_encoder.layers.*)")
    depths, group_tokens, output_groups = [], [], []
    tokens_in = num_patches
    mlp_dims = None  # (tokens_dim, channels_dim) of the first grouping block
    for i in stages:
        prefix = f"vision_model.encoder.stages.{i}"
        depth = len(_indices(state, re.escape(prefix) + r"\.layers\.(\d+)\.", f"stage {i} block", source))
        if depth == 0:
            raise ValueError(f"{source}: stage {i} has no blocks (img_encoder.layers.{i}.blocks.*)")
        depths.append(depth)
        token = f"{prefix}.group_token"
        group_tokens.append(_shape(state, token, 3, source)[1] if token in state else 0)
        inter = f"{prefix}.downsample.mlp_inter.fc2.weight"
        if inter in state:
            tokens_in = _shape(state, inter, 2, source)[0]
            if mlp_dims is None:
                mlp_dims = (_shape(state, f"{prefix}.downsample.mlp_inter.fc1.weight", 2, source)[0],
                            _shape(state, f"{prefix}.downsample.mlp_channels.fc1.weight", 2, source)[0])
        # A stage without grouping passes its input tokens on; the value is unused (as in the Hub's [64, 8, 8]).
        output_groups.append(tokens_in)
    for i in range(1, len(stages)):
        if group_tokens[i] and group_tokens[i - 1] != output_groups[i - 1]:
            raise ValueError(
                f"{source}: stage {i}'s group projector takes stage {i - 1}'s {group_tokens[i - 1]} group tokens, "
                f"but the Hugging Face layout sizes it by num_output_groups[{i - 1}] = {output_groups[i - 1]}"
            )
    configured_depths = _lookup(model, "img_encoder", "depths")
    if isinstance(configured_depths, list) and configured_depths != depths:
        raise ValueError(f"{source}: the config's img_encoder.depths {configured_depths} disagree with the "
                         f"tensors ({depths})")

    configured = _head_count(_lookup(model, "img_encoder", "num_heads"), "img_encoder.num_heads", source)
    if heads is not None:
        notes.append(f"vision heads: {heads} (given)")
    elif configured is not None:
        heads = configured
        notes.append(f"vision heads: {heads} (from the checkpoint's config)")
    else:
        heads = DEFAULT_VISION_HEADS
        notes.append(f"vision heads: {heads} (published default; no readable config in the checkpoint)")

    vision = dict(
        hidden_size=hidden,
        intermediate_size=_shape(state, "vision_model.encoder.stages.0.layers.0.mlp.fc1.weight", 2, source)[0],
        depths=depths,
        num_hidden_layers=sum(depths),
        num_group_tokens=group_tokens,
        num_output_groups=output_groups,
        num_attention_heads=heads,
        image_size=image_size,
        patch_size=patch,
        num_channels=channels,
    )
    if mlp_dims is not None:
        vision["assign_mlp_ratio"] = [_ratio(mlp_dims[0], hidden), _ratio(mlp_dims[1], hidden)]
    return vision


def infer_config(state: Mapping[str, np.ndarray], nvlabs_config: Optional[Dict[str, Any]] = None, *,
                 vision_heads: Optional[int] = None, text_heads: Optional[int] = None,
                 source: str = "NVlabs checkpoint") -> Tuple[GroupViTConfig, List[str]]:
    """The GroupViTConfig of a canonical state converted from NVlabs names, plus notes on where heads came from."""
    model = model_section(nvlabs_config)
    _check_supported_options(model, source)
    notes: List[str] = []
    text = _infer_text(state, model, text_heads, source, notes)
    vision = _infer_vision(state, model, vision_heads, source, notes)
    projection_intermediate, _ = _shape(state, "visual_projection.0.weight", 2, source)
    projection_dim, _ = _shape(state, "visual_projection.3.weight", 2, source)
    try:
        config = GroupViTConfig(text_config=text, vision_config=vision, projection_dim=projection_dim,
                                projection_intermediate_dim=projection_intermediate)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{source}: the inferred config is invalid: {error}") from error
    return config, notes


# ----------------------------------------------------------------------------------------------------------------
# Whole conversion
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class NVlabsConversion:
    """Result of converting an NVlabs state dict: config, canonical state and what happened on the way."""

    config: GroupViTConfig
    state: Dict[str, np.ndarray]
    dropped: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    nvlabs_config: Optional[Dict[str, Any]] = None


def convert_nvlabs_state(state: Mapping[str, np.ndarray], nvlabs_config: Optional[Dict[str, Any]] = None, *,
                         vision_heads: Optional[int] = None, text_heads: Optional[int] = None,
                         source: str = "NVlabs checkpoint") -> NVlabsConversion:
    """Map an NVlabs ``MultiLabelContrastive`` state dict to (config, canonical state), checked against the config.

    ``nvlabs_config`` is the checkpoint's config as plain data (see :func:`plain_data`), used for head counts and
    to reject options the Hugging Face architecture lacks. Raises ValueError naming unknown, missing or mis-shaped
    tensors.
    """
    canonical, dropped = map_nvlabs_names(state, source)
    config, notes = infer_config(canonical, nvlabs_config, vision_heads=vision_heads, text_heads=text_heads,
                                 source=source)
    check_state(canonical, config, source=source)
    if dropped:
        notes.append("dropped " + ", ".join(dropped) + " (multi-label loss temperature; not used at inference)")
    notes.append("text ids: legacy bos 0 / eos 2 / pad 1 as the published Hugging Face checkpoints "
                 "(eos_token_id 2 pools at argmax(input_ids), as NVlabs does)")
    return NVlabsConversion(config=config, state=canonical, dropped=dropped, notes=notes, nvlabs_config=nvlabs_config)


def load_nvlabs(path: os.PathLike, *, vision_heads: Optional[int] = None,
                text_heads: Optional[int] = None) -> NVlabsConversion:
    """Read and convert an NVlabs ``.pth`` file (no torch needed)."""
    path = os.fspath(path)
    state, nvlabs_config = read_nvlabs_checkpoint(path)
    if not looks_like_nvlabs(state):
        raise ValueError(f"{path}: not an NVlabs GroupViT checkpoint (tensor names such as "
                         f"{_preview(sorted(state), 3)})")
    return convert_nvlabs_state(state, nvlabs_config, vision_heads=vision_heads, text_heads=text_heads, source=path)
