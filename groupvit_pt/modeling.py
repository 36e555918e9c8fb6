"""GroupViT in PyTorch: torch.nn modules numerically equal to transformers 4.57.6's PyTorch GroupViT.

Twin of groupvit_tf/modeling.py: the same classes in the same order with the same attribute names, which are the
checkpoint's name segments (``vision_model.encoder.stages.1.downsample.assign.q_proj.weight``). Weights move in
and out as canonical numpy arrays through groupvit_core.loading, so one checkpoint (model.safetensors,
pytorch_model.bin or tf_model.h5) serves both frameworks. Position-table interpolation and the segmentation maps
are resized with groupvit_core.resize's matrices, the same arithmetic as the TensorFlow twin.

Differences from the reference, all deliberate: position interpolation is reachable from ``forward``
(``interpolate_pos_encoding=True``), the loss is a scalar, bad inputs raise ValueError naming the problem, and
Gumbel noise can be switched off in training (``model.set_gumbel(False)``) for deterministic comparisons.

Speed (BENCHMARKS.md; the outputs stay the reference's within float32 rounding): attention runs through
scaled_dot_product_attention (its causal kernel when there is no padding); q/k/v come from one GEMM over weights
stacked at run time, and quick_gelu's MLP is rescaled so that its activation is a single silu (both derived
weights are cached while the parameters are unchanged, ``_derived_weights``); in inference the activation and
the residual addition run in place on the GEMM's output (``_linear``); ``get_text_features`` runs the
text layers only up to the last end-of-text token (``pooled_output``), and the full forward's padded texts get
no keys or values past the last position any text attends to (``_attended_keys``); from_pretrained builds on the
meta device.
"""

from __future__ import annotations

import functools
import os
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from groupvit_core import loading
from groupvit_core.config import (QUICK_GELU_SCALE, GroupViTConfig, GroupViTTextConfig, GroupViTVisionConfig,
                                  StageSpec)
from groupvit_core.outputs import BaseModelOutputWithPooling, GroupViTModelOutput
from groupvit_core.resize import attention_grid, bicubic_matrix, bilinear_matrix
from groupvit_core.weights import checked_arrays, weight_specs

# The projection heads' BatchNorm1d, as the reference builds it (torch momentum 0.1 == Keras momentum 0.9).
BATCH_NORM_EPS = 1e-5
BATCH_NORM_MOMENTUM = 0.1
# transformers' GroupViTConfig hard-codes these for the joint model's initialisation.
JOINT_INITIALIZER_RANGE = 0.02
JOINT_INITIALIZER_FACTOR = 1.0

AnyConfig = Union[GroupViTConfig, GroupViTTextConfig, GroupViTVisionConfig]
ArrayLike = Union[torch.Tensor, np.ndarray]


# ----------------------------------------------------------------------------------------------------------------
# Functions
# ----------------------------------------------------------------------------------------------------------------


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(QUICK_GELU_SCALE * x)


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The activation function the config names: quick_gelu, gelu (exact erf), gelu_new / gelu_pytorch_tanh
    (tanh approximation) or relu."""
    if name == "quick_gelu":
        return _quick_gelu
    if name == "gelu":
        return functools.partial(F.gelu, approximate="none")
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return functools.partial(F.gelu, approximate="tanh")
    if name == "relu":
        return F.relu
    raise ValueError(f"unknown activation {name!r}; supported: quick_gelu, gelu, gelu_new, gelu_pytorch_tanh, relu")


def _straight_through(soft: torch.Tensor, axis: int) -> torch.Tensor:
    # argmax returns the first maximal index: ties go to the LOWEST index, as in the reference and tf.argmax.
    index = soft.argmax(dim=axis, keepdim=True)
    hard = torch.zeros_like(soft).scatter_(axis, index, 1.0)
    # Forward value: the one-hot map; gradient: the soft map's (the reference's exact arithmetic).
    return hard - soft.detach() + soft


def hard_softmax(logits: torch.Tensor, axis: int) -> torch.Tensor:
    """One-hot of argmax(softmax(logits)) along ``axis`` with the softmax's gradient (straight-through)."""
    return _straight_through(logits.softmax(dim=axis), axis)


def gumbel_softmax(logits: torch.Tensor, axis: int = -1, hard: bool = False,
                   generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Softmax of ``logits`` plus Gumbel(0, 1) noise along ``axis``; one-hot straight-through when ``hard``.

    The noise is -log(-log(u)) with u uniform in [tiny, 1 - eps], drawn exactly as
    torch.distributions.Gumbel(0, 1).sample does, so a seeded run reproduces the reference's noise.
    """
    info = torch.finfo(logits.dtype)
    uniform = torch.rand(logits.shape, generator=generator, dtype=logits.dtype, device=logits.device)
    uniform = info.tiny + uniform * ((1.0 - info.eps) - info.tiny)
    gumbels = -torch.log(-torch.log(uniform))
    soft = (logits + gumbels).softmax(dim=axis)
    return _straight_through(soft, axis) if hard else soft


def contrastive_loss(logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each row against its own index (the matching pair is on the diagonal)."""
    return F.cross_entropy(logits, torch.arange(logits.shape[0], device=logits.device))


def groupvit_loss(logits_per_text: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric contrastive loss: the mean of the text->image and image->text cross-entropies (a scalar)."""
    texts, images = logits_per_text.shape
    if texts != images:
        raise ValueError(
            f"the contrastive loss needs as many texts as images (pairs on the diagonal), got {texts} texts "
            f"and {images} images"
        )
    return (contrastive_loss(logits_per_text) + contrastive_loss(logits_per_text.t())) / 2.0


@functools.lru_cache(maxsize=128)
def _build_resize_matrix(mode: str, in_size: int, out_size: int, dtype: torch.dtype, device: torch.device
                         ) -> torch.Tensor:
    make = bicubic_matrix if mode == "bicubic" else bilinear_matrix
    return torch.tensor(make(in_size, out_size), dtype=dtype, device=device)


_EAGER_RESIZE_MATRIX: List[Callable[..., torch.Tensor]] = []


def _resize_matrix(mode: str, in_size: int, out_size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A resize matrix, built once per size in numpy and cached. Under torch.compile it runs eagerly, outside the
    graph, through torch.compiler.disable; that wrapper is made on the first compiled call rather than by a
    decorator, which would import torch._dynamo with this module (~1 s and ~70 MB an eager user never needs)."""
    if torch.compiler.is_compiling():
        if not _EAGER_RESIZE_MATRIX:
            _EAGER_RESIZE_MATRIX.append(torch.compiler.disable(_build_resize_matrix))
        return _EAGER_RESIZE_MATRIX[0](mode, in_size, out_size, dtype, device)
    return _build_resize_matrix(mode, in_size, out_size, dtype, device)


def _derived_weights(cache: Dict[str, tuple], name: str, tensors: Sequence[torch.Tensor],
                     build: Callable[..., Tuple[torch.Tensor, ...]]) -> Tuple[torch.Tensor, ...]:
    """``build(*tensors)``: weights derived at run time (stacked q/k/v, rescaled MLP), cached in ``cache[name]``.

    The checkpoint layout is untouched: derived tensors exist only here. When autograd needs them they are built
    on every call; otherwise they are kept and rebuilt as soon as one of ``tensors`` is replaced or changed in
    place. The cache keeps detached aliases of the tensors it was built from: an alias shares storage and
    version counter with its tensor, so while it lives an equal data pointer means the same memory and an equal
    version the same contents.
    """
    if (torch.is_grad_enabled() and any(tensor.requires_grad for tensor in tensors)) or any(
            tensor.is_inference() for tensor in tensors):  # inference tensors have no version counter
        return build(*tensors)
    entry = cache.get(name)
    if entry is not None:
        aliases, versions, derived = entry
        if all(alias.data_ptr() == tensor.data_ptr() and alias.shape == tensor.shape and alias.dtype == tensor.dtype
               and version == tensor._version for alias, version, tensor in zip(aliases, versions, tensors)):
            return derived
    with torch.no_grad():
        derived = build(*tensors)
    cache[name] = ([tensor.detach() for tensor in tensors], [tensor._version for tensor in tensors], derived)
    return derived


def _stacked_linear(cache: Dict[str, tuple], layers: Sequence[nn.Linear]) -> Tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of ``layers`` stacked along the output axis: one GEMM computes all their outputs."""
    count = len(layers)
    return _derived_weights(
        cache, f"stacked{count}", [t for layer in layers for t in (layer.weight, layer.bias)],
        lambda *t: (torch.cat(t[0::2]), torch.cat(t[1::2])))


_ACTIVATIONS = {"gelu": (functools.partial(F.gelu, approximate="none"), torch.ops.aten.gelu_),
                "silu": (F.silu, torch.ops.aten.silu_)}


def _linear(states: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, activation: Optional[str] = None,
            residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``residual + act(states @ weight^T + bias)``; act: None, "gelu" (exact erf) or "silu"; not both.

    One GEMM (F.linear), then the activation or the residual addition in place on its fresh output when autograd
    does not need it. (oneDNN's GEMM epilogues, torch.ops.mkldnn._linear_pointwise, were measured slower on an
    AVX2 CPU: its erf/sigmoid post-ops cost ~20% of the GEMM, the in-place pass ~8%; BENCHMARKS.md.)
    """
    if activation is not None and residual is not None:
        raise ValueError("_linear fuses an activation or a residual, not both")
    out = F.linear(states, weight, bias)
    in_place = not (torch.is_grad_enabled() and (out.requires_grad or (residual is not None
                                                                        and residual.requires_grad)))
    if activation is not None:
        function, function_ = _ACTIVATIONS[activation]
        return function_(out) if in_place else function(out)
    if residual is None:
        return out
    return out.add_(residual) if in_place else residual + out


def _attended_keys(attended: torch.Tensor) -> int:
    """How many leading positions the padded causal attention needs as keys; ``attended``: (batch, length) bool.

    Past the last position any text attends to, every key is masked (finfo.min) in every row, so its weight is
    exactly zero wherever a row has an unmasked key: always when each text attends to its first position (causally
    visible to every query). Otherwise (a text masked at position 0) a row may see only masked keys, where the
    reference spreads the weight over them: then all positions are kept. Prompts padded to 77 tokens keep ~10-20.
    """
    length = attended.shape[1]
    if not bool(attended[:, 0].all()):
        return length
    return int(attended.any(dim=0).nonzero().max()) + 1


def _combine_masks(attention_mask: Optional[torch.Tensor], causal: bool, query_length: int, key_length: int,
                   dtype: torch.dtype, device: torch.device) -> Optional[torch.Tensor]:
    """One additive mask from a boolean (True = attend) or additive mask and the causal rule.

    Masked entries get finfo.min as in the reference; where both masks apply the sum overflows to -inf, which is
    what the reference's two additions give too.
    """
    mask = None
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            mask = torch.zeros(attention_mask.shape, dtype=dtype, device=device)
            mask = mask.masked_fill(~attention_mask, torch.finfo(dtype).min)
        else:
            mask = attention_mask.to(dtype)
    if causal:
        future = torch.ones(query_length, key_length, dtype=torch.bool, device=device).triu(1)
        causal_mask = torch.zeros(query_length, key_length, dtype=dtype, device=device)
        causal_mask = causal_mask.masked_fill(future, torch.finfo(dtype).min)
        mask = causal_mask if mask is None else mask + causal_mask
    return mask


# ----------------------------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------------------------


class GroupViTAttention(nn.Module):
    """Multi-head attention (self or cross), scale head_dim**-0.5, through scaled_dot_product_attention.

    q/k/v (k/v for cross-attention) are computed by one GEMM over the stacked weights (``_stacked_linear``).
    """

    def __init__(self, hidden_size: int, num_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})")
        self._num_heads = num_heads
        self._head_dim = hidden_size // num_heads
        self._scale = self._head_dim ** -0.5
        self._dropout = dropout
        self._derived: Dict[str, tuple] = {}
        self.q_proj = nn.Linear(hidden_size, hidden_size)
        self.k_proj = nn.Linear(hidden_size, hidden_size)
        self.v_proj = nn.Linear(hidden_size, hidden_size)
        self.out_proj = nn.Linear(hidden_size, hidden_size)

    def _split_heads(self, states: torch.Tensor) -> torch.Tensor:
        batch, length, _ = states.shape
        # (batch, length, hidden) -> (batch, heads, length, head_dim); a strided view, no copy
        return states.view(batch, length, self._num_heads, self._head_dim).transpose(1, 2)

    def _project(self, states: torch.Tensor, layers: Tuple[nn.Linear, ...]) -> Tuple[torch.Tensor, ...]:
        weight, bias = _stacked_linear(self._derived, layers)
        # (batch, length, hidden) -> (batch, length, len(layers) * hidden) -> one (batch, length, hidden) view each
        return _linear(states, weight, bias).split(self.q_proj.out_features, dim=-1)

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None, causal: bool = False,
                output_attentions: bool = False, residual: Optional[torch.Tensor] = None,
                key_length: Optional[int] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Returns (output, attention probabilities (batch, heads, query, key) if ``output_attentions``).

        ``attention_mask`` is boolean (True = attend) or additive, broadcastable to (batch, heads, query, key).
        With ``residual`` the output is ``residual + attention`` (the addition fused into the last GEMM).
        ``key_length`` (self-attention): only the first ``key_length`` positions are keys, the caller having
        established that every later one gets zero weight in every row; ``attention_mask`` then covers those keys
        only, and the probabilities are returned zero-padded to all positions.
        """
        batch, query_length, hidden = hidden_states.shape
        if encoder_hidden_states is None and key_length is not None and key_length < query_length:
            query = F.linear(hidden_states, self.q_proj.weight, self.q_proj.bias)
            key, value = self._project(hidden_states[:, :key_length], (self.k_proj, self.v_proj))
        elif encoder_hidden_states is None:
            query, key, value = self._project(hidden_states, (self.q_proj, self.k_proj, self.v_proj))
        else:
            query = self.q_proj(hidden_states)
            key, value = self._project(encoder_hidden_states, (self.k_proj, self.v_proj))
        query, key, value = self._split_heads(query), self._split_heads(key), self._split_heads(value)
        dropout = self._dropout if self.training else 0.0
        weights = None
        if output_attentions:
            # SDPA does not return its probabilities: compute them explicitly, as the reference does.
            scores = torch.matmul(query * self._scale, key.transpose(-1, -2))
            mask = _combine_masks(attention_mask, causal, query_length, key.shape[2], scores.dtype, scores.device)
            if mask is not None:
                scores = scores + mask
            weights = scores.softmax(dim=-1)
            probabilities = F.dropout(weights, p=dropout, training=True) if dropout else weights
            context = torch.matmul(probabilities, value)
            if key.shape[2] < query_length:  # the keys left out had zero weight: as zeros in the probabilities
                weights = F.pad(weights, (0, query_length - key.shape[2]))
        elif causal and attention_mask is None:
            context = F.scaled_dot_product_attention(query, key, value, dropout_p=dropout, is_causal=True,
                                                     scale=self._scale)
        else:
            mask = _combine_masks(attention_mask, causal, query_length, key.shape[2], query.dtype, query.device)
            context = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout,
                                                     scale=self._scale)
        # (batch, heads, query, head_dim) -> (batch, query, hidden)
        context = context.transpose(1, 2).reshape(batch, query_length, hidden)
        return _linear(context, self.out_proj.weight, self.out_proj.bias, residual=residual), weights


class GroupViTMLP(nn.Module):
    """fc1 -> activation -> fc2 along the channel axis."""

    def __init__(self, hidden_act: str, in_features: int, intermediate_size: int, out_features: int) -> None:
        super().__init__()
        self._activation = activation(hidden_act)
        self._hidden_act = hidden_act
        self._derived: Dict[str, tuple] = {}
        self.fc1 = nn.Linear(in_features, intermediate_size)
        self.fc2 = nn.Linear(intermediate_size, out_features)

    def forward(self, hidden_states: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``fc2(act(fc1(hidden_states)))``, plus ``residual`` when given (fused into the last GEMM)."""
        if self._hidden_act == "gelu":
            inner = _linear(hidden_states, self.fc1.weight, self.fc1.bias, activation="gelu")
            return _linear(inner, self.fc2.weight, self.fc2.bias, residual=residual)
        if self._hidden_act == "quick_gelu":
            # quick_gelu(h) = h * sigmoid(1.702 h) = silu(1.702 h) / 1.702: with fc1 scaled by 1.702 and fc2's
            # weight by 1 / 1.702 it is one silu, fused into fc1's GEMM, instead of three elementwise passes.
            weight1, bias1, weight2 = _derived_weights(
                self._derived, "quick_gelu", (self.fc1.weight, self.fc1.bias, self.fc2.weight),
                lambda w1, b1, w2: (w1 * QUICK_GELU_SCALE, b1 * QUICK_GELU_SCALE, w2 / QUICK_GELU_SCALE))
            inner = _linear(hidden_states, weight1, bias1, activation="silu")
            return _linear(inner, weight2, self.fc2.bias, residual=residual)
        out = self.fc2(self._activation(self.fc1(hidden_states)))
        return out if residual is None else residual + out


class GroupViTMixerMLP(GroupViTMLP):
    """The same MLP applied along the token axis: maps a number of tokens to another."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # (batch, tokens, hidden) -> (batch, hidden, tokens) -> MLP -> back
        return super().forward(hidden_states.transpose(1, 2)).transpose(1, 2)


class GroupViTEncoderLayer(nn.Module):
    """Pre-LayerNorm transformer layer: self-attention and MLP, each with a residual."""

    def __init__(self, config: Union[GroupViTTextConfig, GroupViTVisionConfig]) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.self_attn = GroupViTAttention(hidden, config.num_attention_heads, config.attention_dropout)
        self.layer_norm1 = nn.LayerNorm(hidden, eps=config.layer_norm_eps)
        self.mlp = GroupViTMLP(config.hidden_act, hidden, config.intermediate_size, hidden)
        self.layer_norm2 = nn.LayerNorm(hidden, eps=config.layer_norm_eps)

    def forward(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                causal: bool = False, output_attentions: bool = False, key_length: Optional[int] = None
                ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        hidden_states, weights = self.self_attn(self.layer_norm1(hidden_states), attention_mask=attention_mask,
                                                causal=causal, output_attentions=output_attentions,
                                                residual=hidden_states, key_length=key_length)
        hidden_states = self.mlp(self.layer_norm2(hidden_states), residual=hidden_states)
        return hidden_states, weights


class GroupViTCrossAttentionLayer(nn.Module):
    """Group tokens attend to image tokens; post-norm, no pre-norm on query or key (as the reference)."""

    def __init__(self, config: GroupViTVisionConfig) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.attn = GroupViTAttention(hidden, config.num_attention_heads, config.attention_dropout)
        self.norm2 = nn.LayerNorm(hidden, eps=config.layer_norm_eps)
        self.mlp = GroupViTMLP(config.hidden_act, hidden, config.intermediate_size, hidden)
        self.norm_post = nn.LayerNorm(hidden, eps=config.layer_norm_eps)

    def forward(self, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        hidden_states = self.attn(query, encoder_hidden_states=key, residual=query)[0]
        hidden_states = self.mlp(self.norm2(hidden_states), residual=hidden_states)
        return self.norm_post(hidden_states)


class GroupViTAssignAttention(nn.Module):
    """Hard assignment of image tokens to groups: single head, scale hidden_size**-0.5, softmax over GROUPS."""

    def __init__(self, config: GroupViTVisionConfig) -> None:
        super().__init__()
        hidden = config.hidden_size
        self._scale = hidden ** -0.5
        self._assign_eps = config.assign_eps
        self._gumbel = True  # Gumbel noise in training; set through the model's set_gumbel
        self._derived: Dict[str, tuple] = {}
        self.q_proj = nn.Linear(hidden, hidden)
        self.k_proj = nn.Linear(hidden, hidden)
        self.v_proj = nn.Linear(hidden, hidden)
        self.proj = nn.Linear(hidden, hidden)

    def forward(self, query: torch.Tensor, key: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Returns (new group tokens (batch, groups, hidden), soft assignment (batch, groups, tokens))."""
        # k and v by one GEMM over the stacked weights: (batch, tokens, hidden) each
        weight, bias = _stacked_linear(self._derived, (self.k_proj, self.v_proj))
        keys, values = F.linear(key, weight, bias).split(self.k_proj.out_features, dim=-1)
        # (batch, groups, tokens)
        raw = torch.matmul(self.q_proj(query), keys.transpose(1, 2)) * self._scale
        soft = raw.softmax(dim=-2)
        if self.training and self._gumbel:
            assignment = gumbel_softmax(raw, axis=-2, hard=True)
        else:
            assignment = _straight_through(soft, axis=-2)  # == hard_softmax(raw, -2), softmax computed once
        assignment = assignment / (assignment.sum(dim=-1, keepdim=True) + self._assign_eps)
        new_tokens = self.proj(torch.matmul(assignment, values))
        return new_tokens, soft


class GroupViTTokenAssign(nn.Module):
    """Merges a stage's image tokens into its output groups (the reference's GroupingBlock)."""

    def __init__(self, config: GroupViTVisionConfig, num_group_tokens: int, num_output_groups: int) -> None:
        super().__init__()
        hidden, eps = config.hidden_size, config.layer_norm_eps
        tokens_dim, channels_dim = config.assign_mlp_dims
        self.norm_tokens = nn.LayerNorm(hidden, eps=eps)
        self.mlp_inter = GroupViTMixerMLP(config.hidden_act, num_group_tokens, tokens_dim, num_output_groups)
        self.norm_post_tokens = nn.LayerNorm(hidden, eps=eps)
        self.norm_x = nn.LayerNorm(hidden, eps=eps)
        self.pre_assign_attn = GroupViTCrossAttentionLayer(config)
        self.assign = GroupViTAssignAttention(config)
        self.norm_new_x = nn.LayerNorm(hidden, eps=eps)
        self.mlp_channels = GroupViTMLP(config.hidden_act, hidden, channels_dim, hidden)

    def forward(self, image_tokens: torch.Tensor, group_tokens: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        group_tokens = self.norm_tokens(group_tokens)
        image_tokens = self.norm_x(image_tokens)
        # (batch, group tokens, hidden) -> (batch, output groups, hidden)
        projected = self.norm_post_tokens(self.mlp_inter(group_tokens))
        projected = self.pre_assign_attn(projected, image_tokens)
        new_tokens, soft = self.assign(projected, image_tokens)
        new_tokens = new_tokens + projected
        new_tokens = self.mlp_channels(self.norm_new_x(new_tokens), residual=new_tokens)
        return new_tokens, soft


class GroupViTPatchEmbeddings(nn.Module):
    """Non-overlapping patches through a strided convolution; NCHW pixels in, (batch, patches, hidden) out."""

    def __init__(self, num_channels: int, hidden_size: int, patch_size: int) -> None:
        super().__init__()
        self.projection = nn.Conv2d(num_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # (batch, hidden, rows, cols) -> (batch, rows * cols, hidden)
        return self.projection(pixel_values).flatten(2).transpose(1, 2)


class GroupViTVisionEmbeddings(nn.Module):
    """Patch embeddings, LayerNorm, THEN the position table (bicubically resized for other input sizes)."""

    def __init__(self, config: GroupViTVisionConfig) -> None:
        super().__init__()
        self._num_channels = config.num_channels
        self._image_size = config.image_size
        self._patch_size = config.patch_size
        self._grid_size = config.grid_size
        self._dropout = config.dropout
        self.patch_embeddings = GroupViTPatchEmbeddings(config.num_channels, config.hidden_size, config.patch_size)
        self.position_embeddings = nn.Parameter(torch.zeros(1, config.num_patches, config.hidden_size))
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def position_table(self, rows: int, cols: int) -> torch.Tensor:
        """The position table for a (rows, cols) patch grid: (1, rows * cols, hidden)."""
        table = self.position_embeddings
        size = self._grid_size
        if (rows, cols) == (size, size):
            return table
        hidden = table.shape[-1]
        row_matrix = _resize_matrix("bicubic", size, rows, table.dtype, table.device)  # (rows, size)
        col_matrix = _resize_matrix("bicubic", size, cols, table.dtype, table.device)  # (cols, size)
        # (size, size * hidden) -> (rows, size, hidden)
        resized = torch.matmul(row_matrix, table.reshape(size, size * hidden)).reshape(rows, size, hidden)
        # (cols, size) @ (rows, size, hidden) -> (rows, cols, hidden)
        resized = torch.matmul(col_matrix, resized)
        return resized.reshape(1, rows * cols, hidden)

    def forward(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        _, channels, height, width = pixel_values.shape
        if channels != self._num_channels:
            raise ValueError(f"pixel_values has {channels} channels, the model expects {self._num_channels}")
        patch = self._patch_size
        if interpolate_pos_encoding:
            if height % patch or width % patch or height == 0 or width == 0:
                raise ValueError(
                    f"with interpolate_pos_encoding the image size must be a positive multiple of the patch size "
                    f"{patch}, got {height}x{width}"
                )
        elif (height, width) != (self._image_size, self._image_size):
            raise ValueError(
                f"pixel_values are {height}x{width} but the model expects {self._image_size}x{self._image_size}; "
                f"pass interpolate_pos_encoding=True for other sizes"
            )
        embeddings = self.layernorm(self.patch_embeddings(pixel_values))
        embeddings = embeddings + self.position_table(height // patch, width // patch)
        if self._dropout and self.training:
            embeddings = F.dropout(embeddings, p=self._dropout, training=True)
        return embeddings


class GroupViTTextEmbeddings(nn.Module):
    """Token plus position embeddings."""

    def __init__(self, config: GroupViTTextConfig) -> None:
        super().__init__()
        self._vocab_size = config.vocab_size
        self._max_positions = config.max_position_embeddings
        # Tables passed in (left uninitialised: _init_tower or the checkpoint fills them) so that nn.Embedding skips
        # its normal_ init, which on the meta device of from_pretrained costs ~70 MB of lazily imported code.
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size,
                                            _weight=torch.empty(config.vocab_size, config.hidden_size))
        self.position_embedding = nn.Embedding(
            config.max_position_embeddings, config.hidden_size,
            _weight=torch.empty(config.max_position_embeddings, config.hidden_size))

    def forward(self, input_ids: torch.Tensor, position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        length = input_ids.shape[-1]
        if length > self._max_positions:
            raise ValueError(
                f"input_ids has {length} tokens, more than max_position_embeddings ({self._max_positions})"
            )
        low, high = torch.stack(torch.aminmax(input_ids)).tolist()  # one host sync for both bounds
        if low < 0 or high >= self._vocab_size:
            bad = low if low < 0 else high
            raise ValueError(f"input_ids holds token id {bad}, outside the vocabulary [0, {self._vocab_size})")
        if position_ids is None:
            position_ids = torch.arange(length, device=input_ids.device).unsqueeze(0)
        else:
            low, high = torch.stack(torch.aminmax(position_ids)).tolist()
            if low < 0 or high >= self._max_positions:
                raise ValueError(
                    f"position_ids must lie in [0, {self._max_positions}), got values in [{low}, {high}]"
                )
        return self.token_embedding(input_ids) + self.position_embedding(position_ids)


class GroupViTStage(nn.Module):
    """Transformer layers over image tokens plus this stage's group tokens, then grouping (TokenAssign)."""

    def __init__(self, config: GroupViTVisionConfig, spec: StageSpec) -> None:
        super().__init__()
        hidden = config.hidden_size
        self._num_group_tokens = spec.num_group_tokens
        if spec.has_group_tokens:
            self.group_token = nn.Parameter(torch.zeros(1, spec.num_group_tokens, hidden))
        else:
            self.group_token = None
        self.layers = nn.ModuleList([GroupViTEncoderLayer(config) for _ in range(spec.depth)])
        if spec.has_downsample:
            self.downsample = GroupViTTokenAssign(config, spec.num_group_tokens, spec.num_output_groups)
        else:
            self.downsample = None
        if spec.has_group_projector:
            self.group_projector = nn.Sequential(
                nn.LayerNorm(hidden, eps=config.layer_norm_eps),
                GroupViTMixerMLP(config.hidden_act, spec.num_prev_group_tokens, config.group_projector_dim,
                                 spec.num_group_tokens),
            )
        else:
            self.group_projector = None

    def forward(self, hidden_states: torch.Tensor, prev_group_tokens: Optional[torch.Tensor] = None
                ) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
        """Returns (next stage's image tokens, this stage's group tokens after the layers, soft map or None)."""
        if self.group_token is None:
            tokens = hidden_states
        else:
            group_tokens = self.group_token.expand(hidden_states.shape[0], -1, -1)
            if self.group_projector is not None:
                group_tokens = group_tokens + self.group_projector(prev_group_tokens)
            # Group tokens go AFTER the image tokens: (batch, tokens + groups, hidden)
            tokens = torch.cat([hidden_states, group_tokens], dim=1)
        for layer in self.layers:
            tokens = layer(tokens)[0]
        if self.group_token is None:
            return tokens, None, None
        count = self._num_group_tokens
        image_tokens, group_tokens = tokens[:, :-count], tokens[:, -count:]
        soft = None
        if self.downsample is not None:
            image_tokens, soft = self.downsample(image_tokens, group_tokens)
        return image_tokens, group_tokens, soft


class GroupViTTextEncoder(nn.Module):
    """The text tower's stack of layers."""

    def __init__(self, config: GroupViTTextConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList([GroupViTEncoderLayer(config) for _ in range(config.num_hidden_layers)])

    def forward(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                causal: bool = True, output_attentions: bool = False, output_hidden_states: bool = False,
                key_length: Optional[int] = None) -> Tuple[torch.Tensor, Optional[tuple], Optional[tuple]]:
        all_hidden = [hidden_states] if output_hidden_states else None
        all_weights = [] if output_attentions else None
        for layer in self.layers:
            hidden_states, weights = layer(hidden_states, attention_mask=attention_mask, causal=causal,
                                           output_attentions=output_attentions, key_length=key_length)
            if output_hidden_states:
                all_hidden.append(hidden_states)
            if output_attentions:
                all_weights.append(weights)
        return (hidden_states, tuple(all_hidden) if output_hidden_states else None,
                tuple(all_weights) if output_attentions else None)


class GroupViTVisionEncoder(nn.Module):
    """The vision tower's grouping stages."""

    def __init__(self, config: GroupViTVisionConfig) -> None:
        super().__init__()
        self.stages = nn.ModuleList([GroupViTStage(config, spec) for spec in config.stages])

    def forward(self, hidden_states: torch.Tensor, output_hidden_states: bool = False
                ) -> Tuple[torch.Tensor, Optional[tuple], tuple]:
        """Returns (final tokens, (each stage's input..., final tokens) or None, soft maps of grouping stages)."""
        all_hidden = [] if output_hidden_states else None
        soft_maps = []
        group_tokens = None
        for stage in self.stages:
            if output_hidden_states:
                all_hidden.append(hidden_states)
            hidden_states, group_tokens, soft = stage(hidden_states, group_tokens)
            if soft is not None:
                soft_maps.append(soft)
        if output_hidden_states:
            all_hidden.append(hidden_states)
        return hidden_states, tuple(all_hidden) if output_hidden_states else None, tuple(soft_maps)


class GroupViTTextTransformer(nn.Module):
    """Causal text transformer pooled at the first end-of-text token."""

    def __init__(self, config: GroupViTTextConfig) -> None:
        super().__init__()
        self._eos_token_id = config.eos_token_id
        self._legacy_eos_pooling = config.legacy_eos_pooling
        self.embeddings = GroupViTTextEmbeddings(config)
        self.encoder = GroupViTTextEncoder(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def _inputs(self, input_ids: ArrayLike, attention_mask: Optional[ArrayLike], position_ids: Optional[ArrayLike]
                ) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
        device, dtype = self.final_layer_norm.weight.device, self.final_layer_norm.weight.dtype
        input_ids = _as_input_ids(input_ids, device)
        attention_mask = _as_attention_mask(attention_mask, input_ids, dtype, device)
        if position_ids is not None:
            position_ids = _as_position_ids(position_ids, input_ids, device)
        return input_ids, attention_mask, position_ids

    def _padding_mask(self, attention_mask: torch.Tensor, query_length: Optional[int] = None) -> torch.Tensor:
        # As the reference: every key whose mask is not 1 gets finfo.min, added to the causal mask; built once for
        # all layers. (batch, keys) -> (batch, 1, 1, keys) + (queries, keys); queries default to the keys.
        dtype, length = attention_mask.dtype, attention_mask.shape[1]
        padding = torch.zeros(attention_mask.shape, dtype=dtype, device=attention_mask.device)
        padding = padding.masked_fill(attention_mask != 1, torch.finfo(dtype).min)
        return _combine_masks(padding[:, None, None, :], True, query_length or length, length, dtype,
                              attention_mask.device)

    def _pooling_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self._legacy_eos_pooling:
            # Published checkpoints (eos_token_id == 2): the reference pools at argmax(input_ids), first maximum.
            return input_ids.to(torch.int32).argmax(dim=-1)
        # First end token; a text without one pools at position 0, as the reference's argmax does.
        return (input_ids == self._eos_token_id).to(torch.int32).argmax(dim=-1)

    def forward(self, input_ids: ArrayLike, attention_mask: Optional[ArrayLike] = None,
                position_ids: Optional[ArrayLike] = None, output_attentions: bool = False,
                output_hidden_states: bool = False) -> BaseModelOutputWithPooling:
        input_ids, attention_mask, position_ids = self._inputs(input_ids, attention_mask, position_ids)
        hidden_states = self.embeddings(input_ids, position_ids)
        mask, causal, keys = None, True, None
        attended = None if attention_mask is None else attention_mask == 1
        if attended is not None and not bool(attended.all()):
            # Without padding the causal rule alone lets SDPA take its is_causal path.
            keys = _attended_keys(attended)
            mask, causal = self._padding_mask(attention_mask[:, :keys], input_ids.shape[1]), False
        last, hidden_states, weights = self.encoder(hidden_states, attention_mask=mask, causal=causal,
                                                    output_attentions=output_attentions,
                                                    output_hidden_states=output_hidden_states, key_length=keys)
        last = self.final_layer_norm(last)
        pooled = last[torch.arange(last.shape[0], device=last.device), self._pooling_positions(input_ids)]
        return BaseModelOutputWithPooling(last_hidden_state=last, pooler_output=pooled, hidden_states=hidden_states,
                                          attentions=weights)

    def pooled_output(self, input_ids: ArrayLike, attention_mask: Optional[ArrayLike] = None,
                      position_ids: Optional[ArrayLike] = None) -> torch.Tensor:
        """``forward(...).pooler_output`` (batch, hidden), doing only the work it depends on.

        Attention is causal, so the hidden state at a text's pooling position never depends on later tokens: the
        layers run up to the batch's last pooling position only (CLIP prompts are padded to 77 tokens, most of
        them padding). The padding mask is dropped (SDPA's causal path) when no text has a masked token before
        its pooling position, since causality already hides every later key. Both are exact: a text whose keys
        up to its pooling position are ALL masked attends to every key (the reference's all-finfo.min row), so
        then the whole sequence runs with the mask.
        """
        input_ids, attention_mask, position_ids = self._inputs(input_ids, attention_mask, position_ids)
        hidden_states = self.embeddings(input_ids, position_ids)  # checks every id, not only the kept ones
        positions = self._pooling_positions(input_ids)
        mask, causal = None, True
        if attention_mask is not None:
            # (batch, length): True for the keys a text's pooling position can see
            visible = torch.arange(input_ids.shape[1], device=input_ids.device)[None, :] <= positions[:, None]
            masked = (attention_mask != 1) & visible
            if bool(masked.any()):
                if bool((masked == visible).all(dim=1).any()):
                    length = input_ids.shape[1]  # a text sees only masked keys: keep the whole sequence
                else:
                    length = int(positions.max()) + 1
                mask, causal = self._padding_mask(attention_mask[:, :length]), False
        if causal:
            length = int(positions.max()) + 1
        last = self.encoder(hidden_states[:, :length], attention_mask=mask, causal=causal)[0]
        pooled = last[torch.arange(last.shape[0], device=last.device), positions]
        return self.final_layer_norm(pooled)  # per token: the same as normalising every position first


class GroupViTVisionTransformer(nn.Module):
    """Patch embeddings, grouping stages, final LayerNorm; pooled = mean over the final group tokens."""

    def __init__(self, config: GroupViTVisionConfig) -> None:
        super().__init__()
        self.embeddings = GroupViTVisionEmbeddings(config)
        self.encoder = GroupViTVisionEncoder(config)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, pixel_values: ArrayLike, output_attentions: bool = False, output_hidden_states: bool = False,
                interpolate_pos_encoding: bool = False) -> BaseModelOutputWithPooling:
        weight = self.layernorm.weight
        pixel_values = _as_pixel_values(pixel_values, weight.dtype, weight.device)
        hidden_states = self.embeddings(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding)
        last, hidden_states, soft_maps = self.encoder(hidden_states, output_hidden_states=output_hidden_states)
        last = self.layernorm(last)
        return BaseModelOutputWithPooling(last_hidden_state=last, pooler_output=last.mean(dim=1),
                                          hidden_states=hidden_states,
                                          attentions=soft_maps if output_attentions else None)


# ----------------------------------------------------------------------------------------------------------------
# Checkpoint API shared by GroupViTTextModel, GroupViTVisionModel and GroupViTModel
# ----------------------------------------------------------------------------------------------------------------


def _get_config(model: nn.Module) -> AnyConfig:
    """The model's config (read-only)."""
    return model._config


def _assign_modules(model: nn.Module):
    return [module for module in model.modules() if isinstance(module, GroupViTAssignAttention)]


def _set_gumbel(model: nn.Module, enabled: bool) -> nn.Module:
    """Switch Gumbel noise of every AssignAttention in training mode (eval mode never adds noise)."""
    for module in _assign_modules(model):
        module._gumbel = bool(enabled)
    return model


def _get_gumbel(model: nn.Module) -> bool:
    """Whether AssignAttention adds Gumbel noise in training mode (default True; eval mode never does)."""
    return all(module._gumbel for module in _assign_modules(model))


def _canonical_state(model: nn.Module, copy: bool = True) -> Dict[str, np.ndarray]:
    """The canonical state: {Hub PyTorch name: numpy array (float32; BatchNorm counters int64)} in table order.

    The arrays are copies unless ``copy=False`` (then CPU float32 weights are shared, as for writing a file).
    """
    state = model.state_dict()
    result = {}
    for spec in weight_specs(model.config):
        array = state[spec.name].detach().to(device="cpu", dtype=getattr(torch, spec.dtype)).numpy()
        result[spec.name] = array.copy() if copy else array
    return result


def _canonical_tensors(model: nn.Module, state: Mapping[str, np.ndarray]) -> Dict[str, torch.Tensor]:
    tensors = {}
    for name, array in checked_arrays(state, model.config).items():
        if not array.flags.writeable or not array.flags.c_contiguous:
            array = np.array(array, order="C")
        tensors[name] = torch.from_numpy(array)
    return tensors


def _load_canonical_state(model: nn.Module, state: Mapping[str, np.ndarray]) -> nn.Module:
    """Copy canonical numpy arrays into the weights, strictly: missing, unexpected or mis-shaped -> ValueError.

    A BatchNorm ``num_batches_tracked`` absent from ``state`` is set to 0.
    """
    model.load_state_dict(_canonical_tensors(model, state), strict=True)
    return model


def _from_pretrained(cls, path: Union[str, os.PathLike]) -> nn.Module:
    """Load a checkpoint directory (config.json + model.safetensors, pytorch_model.bin or tf_model.h5) in eval mode.

    Loading is strict (missing, unexpected or mis-shaped tensors raise ValueError; a missing directory or file
    raises OSError); the text and vision models load from a full checkpoint.
    """
    config, state = loading.load_pretrained(path, cls.config_class)
    # Built on the meta device (no initialisation work), then the checkpoint's arrays are assigned in place.
    with torch.device("meta"):
        model = cls(config)
    model.load_state_dict(_canonical_tensors(model, state), strict=True, assign=True)
    return model.eval()


def _save_pretrained(model: nn.Module, path: Union[str, os.PathLike], format: str = "safetensors") -> str:
    """Write config.json and the weights ('safetensors', 'h5' or 'bin'); returns the weight file's path."""
    return loading.save_pretrained(path, model.config, _canonical_state(model, copy=False), format=format)


class GroupViTTextModel(nn.Module):
    """The text tower alone; its weights keep the ``text_model.`` prefix, so it loads from a full checkpoint."""

    config_class = GroupViTTextConfig

    def __init__(self, config: GroupViTTextConfig) -> None:
        super().__init__()
        _check_config(config, GroupViTTextConfig)
        self._config = config
        self.text_model = GroupViTTextTransformer(config)
        _init_tower(self.text_model, config, config.initializer_range, config.initializer_factor)

    # The checkpoint API is shared by the three models: defined once, above.
    config = property(_get_config)
    from_pretrained = classmethod(_from_pretrained)
    save_pretrained = _save_pretrained
    canonical_state = _canonical_state
    load_canonical_state = _load_canonical_state

    def forward(self, input_ids: ArrayLike, attention_mask: Optional[ArrayLike] = None,
                position_ids: Optional[ArrayLike] = None, output_attentions: bool = False,
                output_hidden_states: bool = False) -> BaseModelOutputWithPooling:
        return self.text_model(input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               output_attentions=output_attentions, output_hidden_states=output_hidden_states)


class GroupViTVisionModel(nn.Module):
    """The vision tower alone; its weights keep the ``vision_model.`` prefix, so it loads from a full checkpoint."""

    config_class = GroupViTVisionConfig

    def __init__(self, config: GroupViTVisionConfig) -> None:
        super().__init__()
        _check_config(config, GroupViTVisionConfig)
        self._config = config
        self.vision_model = GroupViTVisionTransformer(config)
        _init_tower(self.vision_model, config, config.initializer_range, config.initializer_factor)

    # The checkpoint API is shared by the three models: defined once, above.
    config = property(_get_config)
    from_pretrained = classmethod(_from_pretrained)
    save_pretrained = _save_pretrained
    canonical_state = _canonical_state
    load_canonical_state = _load_canonical_state
    set_gumbel = _set_gumbel
    gumbel = property(_get_gumbel, _set_gumbel)

    def forward(self, pixel_values: ArrayLike, output_attentions: bool = False, output_hidden_states: bool = False,
                interpolate_pos_encoding: bool = False) -> BaseModelOutputWithPooling:
        return self.vision_model(pixel_values, output_attentions=output_attentions,
                                 output_hidden_states=output_hidden_states,
                                 interpolate_pos_encoding=interpolate_pos_encoding)


class GroupViTModel(nn.Module):
    """Text and vision towers with their projection heads: contrastive logits and zero-shot segmentation."""

    config_class = GroupViTConfig

    def __init__(self, config: GroupViTConfig) -> None:
        super().__init__()
        _check_config(config, GroupViTConfig)
        self._config = config
        text, vision = config.text_config, config.vision_config
        self.text_model = GroupViTTextTransformer(text)
        self.vision_model = GroupViTVisionTransformer(vision)
        self.visual_projection = _projection(vision.hidden_size, config.projection_intermediate_dim,
                                             config.projection_dim)
        self.text_projection = _projection(text.hidden_size, config.projection_intermediate_dim,
                                           config.projection_dim)
        self.logit_scale = nn.Parameter(torch.tensor(float(config.logit_scale_init_value)))
        # The reference initialises the joint model with its top-level constants, the towers' own sizes.
        _init_tower(self.text_model, text, JOINT_INITIALIZER_RANGE, JOINT_INITIALIZER_FACTOR)
        _init_tower(self.vision_model, vision, JOINT_INITIALIZER_RANGE, JOINT_INITIALIZER_FACTOR)
        _init_tower(self.visual_projection, vision, JOINT_INITIALIZER_RANGE, JOINT_INITIALIZER_FACTOR)
        _init_tower(self.text_projection, text, JOINT_INITIALIZER_RANGE, JOINT_INITIALIZER_FACTOR)

    # The checkpoint API is shared by the three models: defined once, above.
    config = property(_get_config)
    from_pretrained = classmethod(_from_pretrained)
    save_pretrained = _save_pretrained
    canonical_state = _canonical_state
    load_canonical_state = _load_canonical_state
    set_gumbel = _set_gumbel
    gumbel = property(_get_gumbel, _set_gumbel)

    def get_text_features(self, input_ids: ArrayLike, attention_mask: Optional[ArrayLike] = None,
                          position_ids: Optional[ArrayLike] = None) -> torch.Tensor:
        """Text embeddings before L2 normalisation: text_projection(pooled text output)."""
        pooled = self.text_model.pooled_output(input_ids, attention_mask=attention_mask, position_ids=position_ids)
        return self.text_projection(pooled)

    def get_image_features(self, pixel_values: ArrayLike, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        """Image embeddings before L2 normalisation: visual_projection(mean of the final group tokens)."""
        outputs = self.vision_model(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding)
        return self.visual_projection(outputs.pooler_output)

    def forward(self, input_ids: ArrayLike, pixel_values: ArrayLike, attention_mask: Optional[ArrayLike] = None,
                position_ids: Optional[ArrayLike] = None, return_loss: bool = False, output_attentions: bool = False,
                output_hidden_states: bool = False, output_segmentation: bool = False,
                interpolate_pos_encoding: bool = False) -> GroupViTModelOutput:
        weight = self.logit_scale
        input_ids = _as_input_ids(input_ids, weight.device)
        pixel_values = _as_pixel_values(pixel_values, weight.dtype, weight.device)
        if return_loss and input_ids.shape[0] != pixel_values.shape[0]:
            raise ValueError(
                f"return_loss needs as many texts as images, got {input_ids.shape[0]} texts and "
                f"{pixel_values.shape[0]} images"
            )
        if output_segmentation:
            if not self._config.vision_config.stages[0].has_downsample:
                raise ValueError("output_segmentation needs a vision tower with at least one grouping stage")
            output_attentions = True  # as the reference: the segmentation reads the vision attentions
        vision_outputs = self.vision_model(pixel_values, output_attentions=output_attentions,
                                           output_hidden_states=output_hidden_states,
                                           interpolate_pos_encoding=interpolate_pos_encoding)
        text_outputs = self.text_model(input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                       output_attentions=output_attentions,
                                       output_hidden_states=output_hidden_states)
        image_embeds = self.visual_projection(vision_outputs.pooler_output)
        text_embeds = self.text_projection(text_outputs.pooler_output)
        image_embeds = image_embeds / image_embeds.norm(dim=-1, keepdim=True)
        text_embeds = text_embeds / text_embeds.norm(dim=-1, keepdim=True)
        scale = self.logit_scale.exp()  # no clamp, as the reference
        logits_per_text = torch.matmul(text_embeds, image_embeds.t()) * scale
        logits_per_image = logits_per_text.t()

        segmentation_logits = None
        if output_segmentation:
            segmentation_logits = self._segmentation_logits(vision_outputs, text_embeds, scale,
                                                            pixel_values.shape[2], pixel_values.shape[3])
        loss = groupvit_loss(logits_per_text) if return_loss else None
        return GroupViTModelOutput(loss=loss, logits_per_image=logits_per_image, logits_per_text=logits_per_text,
                                   segmentation_logits=segmentation_logits, text_embeds=text_embeds,
                                   image_embeds=image_embeds, text_model_output=text_outputs,
                                   vision_model_output=vision_outputs)

    def _segmentation_logits(self, vision_outputs: BaseModelOutputWithPooling, text_embeds: torch.Tensor,
                             scale: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """(images, texts, height, width): each pixel mixes its groups' text similarities (reference semantics)."""
        group_tokens = vision_outputs.last_hidden_state
        images, groups, hidden = group_tokens.shape
        texts = text_embeds.shape[0]
        # Each final group token through the visual head once: (images * groups, projection)
        group_embeds = self.visual_projection(group_tokens.reshape(images * groups, hidden))
        group_embeds = group_embeds / group_embeds.norm(dim=-1, keepdim=True)
        # (images * groups, texts) -> (images, texts, groups)
        logits_per_group = (torch.matmul(group_embeds, text_embeds.t()) * scale).reshape(images, groups, texts)
        logits_per_group = logits_per_group.transpose(1, 2)
        grouping = _grouping(vision_outputs.attentions, height, width)  # (images, groups, height * width)
        segmentation = torch.matmul(logits_per_group, grouping) * scale
        return segmentation.reshape(images, texts, height, width)


# ----------------------------------------------------------------------------------------------------------------
# Helpers: input checks, initialisation, canonical state
# ----------------------------------------------------------------------------------------------------------------


def _grouping(soft_maps: Tuple[torch.Tensor, ...], height: int, width: int) -> torch.Tensor:
    """Product of the soft maps in stage order, resized bilinearly to the input: (images, groups, height * width).

    Computed without gradient, as the reference's get_grouping_from_attentions.
    """
    with torch.no_grad():
        # (images, groups_1, tokens) -> (images, tokens, groups_1) -> ... -> (images, tokens, groups_k)
        grouping = soft_maps[0].transpose(1, 2)
        for soft in soft_maps[1:]:
            grouping = torch.matmul(grouping, soft.transpose(1, 2))
        images, tokens, groups = grouping.shape
        rows, cols = attention_grid(height, width, tokens)
        # (images, groups, rows, cols)
        grid = grouping.transpose(1, 2).reshape(images, groups, rows, cols)
        row_matrix = _resize_matrix("bilinear", rows, height, grid.dtype, grid.device)  # (height, rows)
        col_matrix = _resize_matrix("bilinear", cols, width, grid.dtype, grid.device)  # (width, cols)
        # (height, rows) @ (images, groups, rows, cols) @ (cols, width) -> (images, groups, height, width)
        resized = torch.matmul(torch.matmul(row_matrix, grid), col_matrix.t())
        return resized.reshape(images, groups, height * width)


def _projection(in_features: int, intermediate: int, out_features: int) -> nn.Sequential:
    """The reference's projection head; canonical names .0 (Linear), .1 (BatchNorm1d), .2 (ReLU), .3 (Linear)."""
    return nn.Sequential(
        nn.Linear(in_features, intermediate),
        nn.BatchNorm1d(intermediate, eps=BATCH_NORM_EPS, momentum=BATCH_NORM_MOMENTUM),
        nn.ReLU(inplace=True),
        nn.Linear(intermediate, out_features),
    )


def _check_config(config: object, expected: type) -> None:
    if not isinstance(config, expected):
        raise TypeError(f"expected a {expected.__name__}, got {type(config).__name__}")


@torch.no_grad()
def _init_tower(root: nn.Module, config: Union[GroupViTTextConfig, GroupViTVisionConfig],
                initializer_range: float, factor: float) -> None:
    """The reference's _init_weights, applied children first as transformers' post_init does.

    Position table, group tokens and BatchNorm keep their construction values (zeros; torch defaults). Skipped
    for a model built on the meta device by from_pretrained, whose weights all come from the checkpoint.
    """
    if any(parameter.is_meta for parameter in root.parameters()):
        return
    layers_std = (2 * config.num_hidden_layers) ** -0.5

    def init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            module.weight.normal_(mean=0.0, std=initializer_range)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.LayerNorm):
            module.bias.zero_()
            module.weight.fill_(1.0)
        if isinstance(module, GroupViTTextEmbeddings):
            module.token_embedding.weight.normal_(mean=0.0, std=factor * 0.02)
            module.position_embedding.weight.normal_(mean=0.0, std=factor * 0.02)
        elif isinstance(module, GroupViTAttention):
            hidden = module.q_proj.in_features
            in_std = hidden ** -0.5 * layers_std * factor
            for proj in (module.q_proj, module.k_proj, module.v_proj):
                proj.weight.normal_(mean=0.0, std=in_std)
            module.out_proj.weight.normal_(mean=0.0, std=hidden ** -0.5 * factor)
        elif isinstance(module, GroupViTMLP):
            # The reference reads the tower's hidden size here, also for the token-axis MLPs.
            module.fc1.weight.normal_(mean=0.0, std=(2 * config.hidden_size) ** -0.5 * factor)
            module.fc2.weight.normal_(mean=0.0, std=config.hidden_size ** -0.5 * layers_std * factor)

    root.apply(init)


def _to_tensor(value: object, name: str, kinds: str, what: str, dtype: torch.dtype,
               device: torch.device) -> torch.Tensor:
    """A ``dtype`` tensor on ``device`` from a tensor, array or nested list whose dtype kind is in ``kinds``.

    Numpy inputs are shared, not copied, where their dtype already fits.
    """
    if isinstance(value, torch.Tensor):
        if value.layout != torch.strided:
            raise ValueError(f"{name} must be a dense (strided) tensor, got layout {value.layout}; "
                             f"call .to_dense() first")
        if value.device.type == "meta":
            raise ValueError(f"{name} is a meta tensor (a shape without data); pass a tensor with values")
        kind = ("b" if value.dtype == torch.bool else "c" if value.is_complex()
                else "f" if value.is_floating_point() else "i")
        if kind not in kinds:
            raise ValueError(f"{name} must hold {what}, got dtype {value.dtype}")
        return value.to(device=device, dtype=dtype)
    try:
        array = np.asarray(value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be a tensor or an array, got {type(value).__name__}: {err}") from None
    if array.dtype.kind not in kinds:
        raise ValueError(f"{name} must hold {what}, got dtype {array.dtype}")
    if array.dtype.kind in "biu":
        array = array.astype(np.int64, copy=False)  # torch reads every numpy integer width through int64
    if not array.flags.writeable or not array.flags.c_contiguous or not array.dtype.isnative:
        array = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("="))
        array = array if array.flags.writeable else array.copy()
    return torch.from_numpy(array).to(device=device, dtype=dtype)


def _as_input_ids(input_ids: object, device: torch.device) -> torch.Tensor:
    if input_ids is None:
        raise ValueError("input_ids is required")
    ids = _to_tensor(input_ids, "input_ids", "iu", "integer token ids", torch.int64, device)
    if ids.dim() != 2:
        raise ValueError(f"input_ids must be 2-D (batch, length), got shape {tuple(ids.shape)}")
    if ids.shape[0] == 0:
        raise ValueError("input_ids is an empty batch")
    if ids.shape[1] == 0:
        raise ValueError("input_ids has no tokens (length 0)")
    return ids


def _as_attention_mask(attention_mask: object, input_ids: torch.Tensor, dtype: torch.dtype,
                       device: torch.device) -> Optional[torch.Tensor]:
    if attention_mask is None:
        return None
    mask = _to_tensor(attention_mask, "attention_mask", "biuf", "0/1 values", dtype, device)
    if tuple(mask.shape) != tuple(input_ids.shape):
        raise ValueError(
            f"attention_mask has shape {tuple(mask.shape)} but input_ids has shape {tuple(input_ids.shape)}"
        )
    return mask


def _as_position_ids(position_ids: object, input_ids: torch.Tensor, device: torch.device) -> torch.Tensor:
    positions = _to_tensor(position_ids, "position_ids", "iu", "integer positions", torch.int64, device)
    if positions.dim() == 1:
        positions = positions.unsqueeze(0)
    if positions.dim() != 2 or positions.shape[1] != input_ids.shape[1] or positions.shape[0] not in (
            1, input_ids.shape[0]):
        raise ValueError(
            f"position_ids has shape {tuple(positions.shape)}; expected (1, {input_ids.shape[1]}) or "
            f"{tuple(input_ids.shape)}"
        )
    return positions


def _as_pixel_values(pixel_values: object, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if pixel_values is None:
        raise ValueError("pixel_values is required")
    pixels = _to_tensor(pixel_values, "pixel_values", "iuf", "real numbers", dtype, device)
    if pixels.dim() != 4:
        raise ValueError(f"pixel_values must be 4-D (batch, channels, height, width), got shape "
                         f"{tuple(pixels.shape)}")
    if pixels.shape[0] == 0:
        raise ValueError("pixel_values is an empty batch")
    return pixels
