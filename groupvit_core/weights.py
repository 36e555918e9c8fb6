"""The weight-name table: every tensor of a GroupViT checkpoint, its canonical name and its Keras/h5 twin.

Canonical names are the Hugging Face PyTorch ``state_dict`` names (``vision_model.encoder.stages.1.downsample.
assign.q_proj.weight``). For each tensor the table gives the name under which the Hub's Keras-2 ``tf_model.h5``
stores it (``vision_model/encoder/stages_._1/downsample/assign/q_proj/kernel``, relative to the main layer) and
the layout change between the two (Dense kernels are transposed, conv kernels permuted, the logit scale is a
scalar in PyTorch and a 1-vector in Keras). The table is generated from the config, so any config maps.

Layout fixes live here and only here: groupvit_pt and groupvit_tf both load canonical arrays and ask this module
how to lay them out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, List, Mapping, Tuple, Union

import numpy as np

from .config import GroupViTConfig, GroupViTTextConfig, GroupViTVisionConfig

# Layouts: how a canonical (PyTorch) array becomes its Keras array.
IDENTITY = "identity"
TRANSPOSE = "transpose"  # Dense kernel: PT [out, in] -> Keras [in, out]
CONV = "conv"  # Conv2D kernel: PT [O, I, kh, kw] -> Keras [kh, kw, I, O]
SCALAR = "scalar"  # PT () -> Keras (1,)
LAYOUTS = (IDENTITY, TRANSPOSE, CONV, SCALAR)


@dataclass(frozen=True)
class WeightSpec:
    """One tensor: canonical name and shape, its h5 name, its layout change and its dtype."""

    name: str
    shape: Tuple[int, ...]
    h5_name: str
    layout: str = IDENTITY
    dtype: str = "float32"

    @property
    def keras_shape(self) -> Tuple[int, ...]:
        if self.layout == TRANSPOSE:
            return tuple(reversed(self.shape))
        if self.layout == CONV:
            out_ch, in_ch, kh, kw = self.shape
            return (kh, kw, in_ch, out_ch)
        if self.layout == SCALAR:
            return (1,)
        return tuple(self.shape)

    @property
    def is_buffer(self) -> bool:
        """True for BatchNorm statistics: state, not trainable parameters."""
        return self.name.endswith(("running_mean", "running_var", "num_batches_tracked"))

    def to_keras(self, array: np.ndarray) -> np.ndarray:
        array = np.asarray(array)
        if self.layout == TRANSPOSE:
            return np.ascontiguousarray(array.T)
        if self.layout == CONV:
            return np.ascontiguousarray(array.transpose(2, 3, 1, 0))
        if self.layout == SCALAR:
            return array.reshape(1)
        return array

    def from_keras(self, array: np.ndarray) -> np.ndarray:
        array = np.asarray(array)
        if self.layout == TRANSPOSE:
            return np.ascontiguousarray(array.T)
        if self.layout == CONV:
            return np.ascontiguousarray(array.transpose(3, 2, 0, 1))
        if self.layout == SCALAR:
            return array.reshape(())
        return array


class _TableBuilder:
    """Emits specs in the order the reference's PyTorch modules register them."""

    def __init__(self) -> None:
        self.specs: List[WeightSpec] = []

    def add(self, name: str, shape: Iterable[int], h5_name: str, layout: str = IDENTITY,
            dtype: str = "float32") -> None:
        self.specs.append(WeightSpec(name, tuple(int(s) for s in shape), h5_name, layout, dtype))

    def linear(self, pt: str, h5: str, in_features: int, out_features: int) -> None:
        self.add(f"{pt}.weight", (out_features, in_features), f"{h5}/kernel", TRANSPOSE)
        self.add(f"{pt}.bias", (out_features,), f"{h5}/bias")

    def layer_norm(self, pt: str, h5: str, size: int) -> None:
        self.add(f"{pt}.weight", (size,), f"{h5}/gamma")
        self.add(f"{pt}.bias", (size,), f"{h5}/beta")

    def batch_norm(self, pt: str, h5: str, size: int) -> None:
        self.add(f"{pt}.weight", (size,), f"{h5}/gamma")
        self.add(f"{pt}.bias", (size,), f"{h5}/beta")
        self.add(f"{pt}.running_mean", (size,), f"{h5}/moving_mean")
        self.add(f"{pt}.running_var", (size,), f"{h5}/moving_variance")
        # Keras has no counter; the h5 keeps it under its PyTorch name so that conversions are lossless.
        self.add(f"{pt}.num_batches_tracked", (), f"{h5}/num_batches_tracked", dtype="int64")

    def mlp(self, pt: str, h5: str, hidden: int, intermediate: int, output: int) -> None:
        self.linear(f"{pt}.fc1", f"{h5}/fc1", hidden, intermediate)
        self.linear(f"{pt}.fc2", f"{h5}/fc2", intermediate, output)

    def attention(self, pt: str, h5: str, hidden: int) -> None:
        for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
            self.linear(f"{pt}.{proj}", f"{h5}/{proj}", hidden, hidden)

    def encoder_layer(self, pt: str, h5: str, hidden: int, intermediate: int) -> None:
        self.attention(f"{pt}.self_attn", f"{h5}/self_attn", hidden)
        self.layer_norm(f"{pt}.layer_norm1", f"{h5}/layer_norm1", hidden)
        self.mlp(f"{pt}.mlp", f"{h5}/mlp", hidden, intermediate, hidden)
        self.layer_norm(f"{pt}.layer_norm2", f"{h5}/layer_norm2", hidden)

    def text_model(self, config: GroupViTTextConfig) -> None:
        hidden = config.hidden_size
        self.add("text_model.embeddings.token_embedding.weight", (config.vocab_size, hidden),
                 "text_model/embeddings/token_embedding/weight")
        self.add("text_model.embeddings.position_embedding.weight", (config.max_position_embeddings, hidden),
                 "text_model/embeddings/position_embedding/embeddings")
        for i in range(config.num_hidden_layers):
            self.encoder_layer(f"text_model.encoder.layers.{i}", f"text_model/encoder/layers_._{i}", hidden,
                               config.intermediate_size)
        self.layer_norm("text_model.final_layer_norm", "text_model/final_layer_norm", hidden)

    def vision_model(self, config: GroupViTVisionConfig) -> None:
        hidden = config.hidden_size
        patch = config.patch_size
        self.add("vision_model.embeddings.position_embeddings", (1, config.num_patches, hidden),
                 "vision_model/embeddings/position_embeddings")
        self.add("vision_model.embeddings.patch_embeddings.projection.weight",
                 (hidden, config.num_channels, patch, patch),
                 "vision_model/embeddings/patch_embeddings/projection/kernel", CONV)
        self.add("vision_model.embeddings.patch_embeddings.projection.bias", (hidden,),
                 "vision_model/embeddings/patch_embeddings/projection/bias")
        self.layer_norm("vision_model.embeddings.layernorm", "vision_model/embeddings/layernorm", hidden)
        tokens_dim, channels_dim = config.assign_mlp_dims
        for stage in config.stages:
            pt = f"vision_model.encoder.stages.{stage.index}"
            h5 = f"vision_model/encoder/stages_._{stage.index}"
            if stage.has_group_tokens:
                self.add(f"{pt}.group_token", (1, stage.num_group_tokens, hidden), f"{h5}/group_token")
            for j in range(stage.depth):
                self.encoder_layer(f"{pt}.layers.{j}", f"{h5}/layers_._{j}", hidden, config.intermediate_size)
            if stage.has_downsample:
                ds, dh = f"{pt}.downsample", f"{h5}/downsample"
                self.layer_norm(f"{ds}.norm_tokens", f"{dh}/norm_tokens", hidden)
                self.mlp(f"{ds}.mlp_inter", f"{dh}/mlp_inter", stage.num_group_tokens, tokens_dim,
                         stage.num_output_groups)
                self.layer_norm(f"{ds}.norm_post_tokens", f"{dh}/norm_post_tokens", hidden)
                self.layer_norm(f"{ds}.norm_x", f"{dh}/norm_x", hidden)
                self.attention(f"{ds}.pre_assign_attn.attn", f"{dh}/pre_assign_attn/attn", hidden)
                self.layer_norm(f"{ds}.pre_assign_attn.norm2", f"{dh}/pre_assign_attn/norm2", hidden)
                self.mlp(f"{ds}.pre_assign_attn.mlp", f"{dh}/pre_assign_attn/mlp", hidden,
                         config.intermediate_size, hidden)
                self.layer_norm(f"{ds}.pre_assign_attn.norm_post", f"{dh}/pre_assign_attn/norm_post", hidden)
                for proj in ("q_proj", "k_proj", "v_proj", "proj"):
                    self.linear(f"{ds}.assign.{proj}", f"{dh}/assign/{proj}", hidden, hidden)
                self.layer_norm(f"{ds}.norm_new_x", f"{dh}/norm_new_x", hidden)
                self.mlp(f"{ds}.mlp_channels", f"{dh}/mlp_channels", hidden, channels_dim, hidden)
            if stage.has_group_projector:
                self.layer_norm(f"{pt}.group_projector.0", f"{h5}/group_projector.0", hidden)
                self.mlp(f"{pt}.group_projector.1", f"{h5}/group_projector.1", stage.num_prev_group_tokens,
                         config.group_projector_dim, stage.num_group_tokens)
        self.layer_norm("vision_model.layernorm", "vision_model/layernorm", hidden)

    def projection(self, name: str, in_features: int, intermediate: int, out_features: int) -> None:
        self.linear(f"{name}.0", f"{name}.0", in_features, intermediate)
        self.batch_norm(f"{name}.1", f"{name}.1", intermediate)
        self.linear(f"{name}.3", f"{name}.3", intermediate, out_features)


AnyConfig = Union[GroupViTConfig, GroupViTTextConfig, GroupViTVisionConfig]


def weight_specs(config: AnyConfig) -> List[WeightSpec]:
    """All tensors of the model that ``config`` describes, in the reference's registration order.

    A GroupViTTextConfig or GroupViTVisionConfig gives the tensors of the text-only or vision-only model,
    whose canonical names keep the ``text_model.`` / ``vision_model.`` prefix exactly as the Hub's.
    """
    builder = _TableBuilder()
    if isinstance(config, GroupViTConfig):
        builder.add("logit_scale", (), "logit_scale", SCALAR)
        builder.text_model(config.text_config)
        builder.vision_model(config.vision_config)
        builder.projection("visual_projection", config.vision_config.hidden_size,
                           config.projection_intermediate_dim, config.projection_dim)
        builder.projection("text_projection", config.text_config.hidden_size,
                           config.projection_intermediate_dim, config.projection_dim)
    elif isinstance(config, GroupViTTextConfig):
        builder.text_model(config)
    elif isinstance(config, GroupViTVisionConfig):
        builder.vision_model(config)
    else:
        raise TypeError(f"weight_specs expects a GroupViT config, got {type(config).__name__}")
    return builder.specs


def spec_table(config: AnyConfig) -> Dict[str, WeightSpec]:
    return {spec.name: spec for spec in weight_specs(config)}


def check_state(state: Mapping[str, np.ndarray], config: AnyConfig, *, source: str = "checkpoint",
                allow_missing: Iterable[str] = ("num_batches_tracked",)) -> None:
    """Raise ValueError naming every missing, unexpected or mis-shaped tensor of a canonical state dict.

    Tensors whose name ends with one of ``allow_missing`` may be absent (the BatchNorm counter is absent from
    files written by Keras and carries no numerical meaning in eval mode).
    """
    table = spec_table(config)
    allowed = tuple(allow_missing)
    missing = [n for n in table if n not in state and not n.endswith(allowed)]
    unexpected = [n for n in state if n not in table]
    misshaped = [
        f"{n}: expected {table[n].shape}, got {tuple(np.shape(state[n]))}"
        for n in state
        if n in table and tuple(np.shape(state[n])) != table[n].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensor(s): {_preview(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} tensor(s): {_preview(unexpected)}")
    if misshaped:
        problems.append(f"{len(misshaped)} tensor(s) with the wrong shape: {_preview(misshaped)}")
    if problems:
        raise ValueError(f"{source} does not match the config: " + "; ".join(problems))


def checked_arrays(state: Mapping[str, np.ndarray], config: AnyConfig, *,
                   source: str = "the canonical state") -> Dict[str, np.ndarray]:
    """``check_state``, then {canonical name: numpy array of the spec's dtype} in table order, for loading.

    A BatchNorm ``num_batches_tracked`` absent from ``state`` is 0; a non-numeric array raises ValueError. Arrays
    already of the right dtype are not copied (they may be read-only views of a file).
    """
    check_state(state, config, source=source)
    arrays = {}
    for spec in weight_specs(config):
        if spec.name not in state:  # a BatchNorm counter absent from the file (Keras has none)
            arrays[spec.name] = np.zeros(spec.shape, dtype=spec.dtype)
            continue
        array = np.asarray(state[spec.name])
        if array.dtype.kind not in "biuf":
            raise ValueError(f"{spec.name} has non-numeric dtype {array.dtype}")
        arrays[spec.name] = array.astype(spec.dtype, copy=False)
    return arrays


def _preview(names: List[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def canonical_to_h5(state: Mapping[str, np.ndarray], config: AnyConfig) -> Dict[str, np.ndarray]:
    """Canonical (PyTorch-layout) arrays -> {h5 name: Keras-layout array}."""
    check_state(state, config)
    table = spec_table(config)
    return {table[name].h5_name: table[name].to_keras(array) for name, array in state.items()}


def h5_to_canonical(h5_state: Mapping[str, np.ndarray], config: AnyConfig, *,
                    source: str = "tf_model.h5") -> Dict[str, np.ndarray]:
    """{h5 name: Keras-layout array} -> canonical arrays; raises ValueError for unknown or mis-shaped names."""
    by_h5 = {spec.h5_name: spec for spec in weight_specs(config)}
    unknown = [name for name in h5_state if name not in by_h5]
    if unknown:
        raise ValueError(f"{source} holds tensor(s) this config does not have: {_preview(unknown)}")
    state: Dict[str, np.ndarray] = {}
    for h5_name, array in h5_state.items():
        spec = by_h5[h5_name]
        if tuple(np.shape(array)) != spec.keras_shape:
            raise ValueError(
                f"{source}: {h5_name} has shape {tuple(np.shape(array))}, expected {spec.keras_shape}"
            )
        state[spec.name] = spec.from_keras(array)
    check_state(state, config, source=source)
    return state


def select_submodel(state: Mapping[str, np.ndarray], config: AnyConfig) -> Dict[str, np.ndarray]:
    """Keep the tensors that ``config``'s model has: lets a text or vision model load from a full checkpoint."""
    table = spec_table(config)
    return {name: array for name, array in state.items() if name in table}
