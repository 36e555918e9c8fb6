"""GroupViT in Keras 3 on the TensorFlow backend: text tower, grouping vision tower and contrastive heads.

Twin of ``groupvit_pt/modeling.py``: the same classes in the same order (with a ``TF`` prefix) and the same
attribute names, which are the checkpoint's name segments (``vision_model.encoder.stages.1.downsample.assign``).
Weights move in and out only as canonical numpy arrays (Hub PyTorch names and layouts): ``canonical_variables``
walks the attributes in canonical naming and every layout change comes from ``groupvit_core.weights``.

TensorFlow specifics worth knowing:
- Inputs may be numpy arrays or tensors; ``pixel_values`` are (batch, channels, height, width) as in PyTorch.
- Eagerly, bad inputs raise ValueError. Inside ``tf.function`` the checks that need values (token ids in range,
  dynamic lengths) become ``tf.debugging`` assertions and raise ``tf.errors.InvalidArgumentError`` when run.
  Under XLA (``jit_compile=True``) TensorFlow drops assertions, so out-of-range ids then give NaN embeddings
  instead of silently reading a clamped row.
- Image height and width must be static under ``tf.function`` (the batch may be dynamic): resizes are constant
  matrices built for the traced size (groupvit_core.resize), so the arithmetic equals PyTorch's interpolate.
- Outputs are groupvit_core.outputs mappings, returned as such from eager calls, ``tf.function`` (tf.nest sees
  mappings) and ``Model.predict`` (registered with Keras' optree namespace). As the reference,
  ``output_segmentation=True`` also returns the attentions of both towers.
- Training: Gumbel noise in the assignments unless ``set_gumbel(False)``; straight-through hard assignment;
  BatchNorm as torch computes it (batch statistics, unbiased running variance, a ``num_batches_tracked``
  counter), which Keras' own BatchNormalization does not (it updates the moving variance with the biased
  estimate). The segmentation's grouping carries no gradient, as in the reference (torch.no_grad).
- Keras conventions: ``get_config()`` is the GroupViT config's ``to_dict()``; ``model.save("x.keras")`` and
  ``keras.models.load_model`` round-trip; ``model.export(dir)`` writes a SavedModel with a ``serve`` endpoint.
- Speed: an eager inference call of the three models (``model(...)``, ``get_text_features``,
  ``get_image_features`` with ``training=False``) checks its inputs eagerly (ValueError as above), then runs a
  ``tf.function`` cached on the model per set of flags, with the batch and the text length dynamic in its input
  signature: the first call of each kind runs eagerly (a one-off call does not pay for tracing), the second
  traces it (seconds at the default size), later ones skip Python and get TensorFlow's fused kernels.
  ``model.run_eagerly = True`` (Keras' switch) runs eagerly instead; ``model.jit_compile = True`` compiles the
  functions with XLA (Keras' "auto" does so on GPU only); on CPU that is no faster for large batches (0.94-1.06x
  for 16 images' or 64 texts' features) and pays only for single small images (the segmentation image pass of
  one 224 px image 0.80x, of four 1.01x, of one 448 px window 1.05x), and every new input shape, batch size
  included, compiles again (3.5-5.5 s at the default size). Inside the layers the
  masked (text) self-attention's q/k/v come from one GEMM split into heads by one transpose (elsewhere one GEMM
  per projection, see ``_project``), every dense layer is one 2-D MatMul + BiasAdd with the MLP's activation on
  its 2-D result (the pattern the graph optimizer fuses into one kernel), the encoder layers' LayerNorms in traced
  inference graphs on oneDNN CPUs take the form it fuses into one kernel (``_pre_norm``), and
  ``get_text_features`` runs the text layers only up to the last end-of-text token (``pooled_output``), as the
  PyTorch twin, whose rule for padded texts in the full forward it follows too (``_attended_keys``). From a
  checkpoint the variables are created holding their values (no placeholder to fill and overwrite).
"""

from __future__ import annotations

import os
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import keras
import numpy as np
import tensorflow as tf

from groupvit_core import loading
from groupvit_core.config import (QUICK_GELU_SCALE, GroupViTConfig, GroupViTTextConfig, GroupViTVisionConfig,
                                  StageSpec)
from groupvit_core.outputs import BaseModelOutputWithPooling, GroupViTModelOutput
from groupvit_core.resize import attention_grid, bicubic_matrix, bilinear_matrix
from groupvit_core.weights import checked_arrays, spec_table, weight_specs

# The projection heads' BatchNorm1d, as the reference builds it (Keras momentum 0.9 == torch momentum 0.1).
BATCH_NORM_EPS = 1e-5
BATCH_NORM_MOMENTUM = 0.9
# transformers' GroupViTConfig hard-codes these for the joint model's initialisation.
JOINT_INITIALIZER_RANGE = 0.02
JOINT_INITIALIZER_FACTOR = 1.0

AnyConfig = Union[GroupViTConfig, GroupViTTextConfig, GroupViTVisionConfig]
_FLOAT_MIN = float(np.finfo(np.float32).min)  # masked scores, as the reference's torch.finfo(dtype).min
_SERIALIZABLE_PACKAGE = "groupvit_tf"


# ----------------------------------------------------------------------------------------------------------
# Functions
# ----------------------------------------------------------------------------------------------------------


def _quick_gelu(x: tf.Tensor) -> tf.Tensor:
    return x * tf.sigmoid(QUICK_GELU_SCALE * x)


def _gelu(x: tf.Tensor) -> tf.Tensor:
    return tf.nn.gelu(x, approximate=False)


def _gelu_tanh(x: tf.Tensor) -> tf.Tensor:
    return tf.nn.gelu(x, approximate=True)


_ACTIVATIONS = {"quick_gelu": _quick_gelu, "gelu": _gelu, "gelu_new": _gelu_tanh, "gelu_pytorch_tanh": _gelu_tanh,
                "relu": tf.nn.relu}
# The MLPs apply their activation to the 2-D output of fc1's MatMul + BiasAdd, before it is reshaped back
# (``_linear(..., activation=...)``): there TensorFlow's oneDNN graph rewrite fuses an exact or tanh GELU into the
# MatMul, where after the reshape tf.nn.gelu ran as five elementwise kernels, each a full pass over the MLP's
# widest tensor (~55 % of the GEMM's time). Measured A/B in one process (default size, 2 CPU threads) against the
# GELU compiled by XLA after the reshape, as before: image features of 16 images 0.91x, segmenting one image
# 0.94x, the full forward 0.96x; outputs within 1.5e-5. quick_gelu (the text tower's) runs as one SiLU, see
# TFGroupViTMLP.


def activation(name: str):
    """The activation function named by a config's ``hidden_act``."""
    if name not in _ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r}")
    return _ACTIVATIONS[name]


def _attended_keys(attention_mask) -> tf.Tensor:
    """How many leading positions the padded causal attention needs as keys (a scalar int32 tensor).

    Past the last position any text attends to, every key is masked (float min) in every row, so its weight
    is exactly zero wherever a row has an unmasked key: always when each text attends to its first position
    (causally visible to every query). Otherwise (a text masked at position 0) a row may see only masked
    keys, where the reference spreads the weight over them: then all positions are kept. Prompts padded to 77
    tokens keep ~10-20. As groupvit_pt.
    """
    attended = tf.equal(tf.cast(attention_mask, tf.float32), 1.0)
    length = tf.shape(attention_mask)[1]
    last = tf.reduce_max(tf.where(tf.reduce_any(attended, axis=0), tf.range(length), -1)) + 1
    return tf.where(tf.reduce_all(attended[:, 0]), last, length)


def _first_max_one_hot(values: tf.Tensor, axis: int) -> tf.Tensor:
    # One-hot of the maximum along `axis`; exact ties go to the LOWEST index, as torch.max does.
    is_max = tf.equal(values, tf.reduce_max(values, axis=axis, keepdims=True))
    first = tf.logical_and(is_max, tf.equal(tf.cumsum(tf.cast(is_max, tf.int32), axis=axis), 1))
    return tf.cast(first, values.dtype)


def hard_softmax(logits: tf.Tensor, axis: int) -> tf.Tensor:
    """One-hot of the softmax's argmax with a straight-through gradient (y_hard - stop_grad(y_soft) + y_soft)."""
    y_soft = tf.nn.softmax(logits, axis=axis)
    y_hard = _first_max_one_hot(y_soft, axis)
    return y_hard - tf.stop_gradient(y_soft) + y_soft


def gumbel_softmax(logits: tf.Tensor, axis: int = -1, hard: bool = False, tau: float = 1.0,
                   seed: Optional[int] = None) -> tf.Tensor:
    """Softmax of ``(logits + Gumbel noise) / tau``; with ``hard`` the straight-through one-hot of its argmax.

    The noise is -log(-log(U)) with U uniform in [tiny, 1), so both logarithms stay finite (no
    tensorflow_probability needed).
    """
    tiny = float(np.finfo(logits.dtype.as_numpy_dtype).tiny)
    uniform = tf.random.uniform(tf.shape(logits), minval=tiny, maxval=1.0, dtype=logits.dtype, seed=seed)
    gumbels = -tf.math.log(-tf.math.log(uniform))
    y_soft = tf.nn.softmax((logits + gumbels) / tau, axis=axis)
    if not hard:
        return y_soft
    y_hard = _first_max_one_hot(y_soft, axis)
    return y_hard - tf.stop_gradient(y_soft) + y_soft


def contrastive_loss(logits: tf.Tensor) -> tf.Tensor:
    """Mean cross-entropy of each row against its own index (the matching pair)."""
    labels = tf.range(tf.shape(logits)[0])
    return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits))


def groupvit_loss(logits_per_text: tf.Tensor) -> tf.Tensor:
    """CLIP loss: the mean of the text->image and image->text cross-entropies, a scalar."""
    texts, images = logits_per_text.shape[0], logits_per_text.shape[1]
    if texts is not None and images is not None and texts != images:
        raise ValueError(
            f"return_loss needs as many images as texts (matching pairs), got {images} images and {texts} texts"
        )
    checks = []
    if texts is None or images is None:
        shape = tf.shape(logits_per_text)
        checks.append(tf.debugging.assert_equal(
            shape[0], shape[1], message="return_loss needs as many images as texts (matching pairs)"))
    with tf.control_dependencies(checks):
        caption_loss = contrastive_loss(logits_per_text)
        image_loss = contrastive_loss(tf.transpose(logits_per_text))
    return (caption_loss + image_loss) / 2.0


# ----------------------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------------------


class TFGroupViTAttention(keras.layers.Layer):
    """Multi-head attention (self or cross) with head_dim**-0.5 scaling applied to the queries."""

    _canonical_attrs = ("q_proj", "k_proj", "v_proj", "out_proj")

    def __init__(self, hidden_size: int, num_heads: int, dropout: float = 0.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})")
        self._hidden_size = hidden_size
        self._num_heads = num_heads
        self._head_dim = hidden_size // num_heads
        self._scale = self._head_dim ** -0.5
        self._dropout = float(dropout)
        self.q_proj = _dense(hidden_size, hidden_size, "q_proj")
        self.k_proj = _dense(hidden_size, hidden_size, "k_proj")
        self.v_proj = _dense(hidden_size, hidden_size, "v_proj")
        self.out_proj = _dense(hidden_size, hidden_size, "out_proj")
        self.built = True

    def _split_heads(self, tensor: tf.Tensor) -> tf.Tensor:
        batch, length = tf.shape(tensor)[0], tf.shape(tensor)[1]
        tensor = tf.reshape(tensor, [batch, length, self._num_heads, self._head_dim])
        return tf.transpose(tensor, [0, 2, 1, 3])  # (batch, heads, length, head_dim)

    @staticmethod
    def _project(states: tf.Tensor, layers: Tuple[keras.layers.Dense, ...]) -> List[tf.Tensor]:
        # One GEMM per projection for the vision tower's self-attention (unmasked), cross-attention and the padded
        # text's keys: there that beats one GEMM over the kernels concatenated at run time and a Split, whose
        # copies (the kernels, 1.8 MB per vision layer on every call, and every output value) cost more than the
        # wider GEMM saves. A/B in one process (default size, 2 CPU threads), outputs identical: image features of
        # 16 images 0.95x, segmenting one image 0.93x (0.94x with its 20 prompts), the full forward 0.96x.
        return [_linear(states, layer.kernel, layer.bias) for layer in layers]

    def _project_heads(self, states: tf.Tensor) -> List[tf.Tensor]:
        # Self-attention q, k, v already split into heads, each (batch, heads, length, head_dim), q scaled: one GEMM,
        # then ONE transpose of the (batch, length, 3, heads, head_dim) result to (3, batch, heads, length,
        # head_dim), whose split along the first axis copies nothing. Splitting the GEMM's last axis first copied
        # every value once more, then transposed q, k and v one by one. Measured A/B in one process (default size,
        # 2 CPU threads): text features 0.96-0.98x; outputs identical. Three GEMMs and three head transposes instead
        # are no faster here (0.87-1.08x on the text shapes in a microbenchmark), unlike in _project.
        batch, length = tf.shape(states)[0], tf.shape(states)[1]
        layers = (self.q_proj, self.k_proj, self.v_proj)  # kernels side by side at run time (checkpoint untouched)
        packed = _linear(states, tf.concat([layer.kernel for layer in layers], axis=1),
                         tf.concat([layer.bias for layer in layers], axis=0))
        packed = tf.reshape(packed, [batch, length, 3, self._num_heads, self._head_dim])
        query, key, value = tf.unstack(tf.transpose(packed, [2, 0, 3, 1, 4]), num=3, axis=0)
        return [query * self._scale, key, value]

    def call(self, hidden_states, encoder_hidden_states=None, attention_mask=None, causal: bool = False,
             output_attentions: bool = False, residual=None, key_length=None, training: bool = False):
        """Returns (output, probabilities or None). ``attention_mask``: boolean (True = attend) or additive,
        broadcastable to (batch, heads, queries, keys). With ``residual`` the output is ``residual + attention``.
        ``key_length`` (self-attention, a scalar tensor): only the first ``key_length`` positions are keys, the
        caller having established that every later one gets zero weight in every row; ``attention_mask`` then
        covers those keys only, and the probabilities are returned zero-padded to all positions."""
        if encoder_hidden_states is None and (attention_mask is not None or causal) and key_length is None:
            query, key, value = self._project_heads(hidden_states)  # the text tower
        else:
            # The vision tower (unmasked), cross-attention, padded texts (keys and values of the first
            # key_length positions). For the vision tower's self-attention these plain ops replaced an attention
            # core compiled by XLA: A/B in one process (default size, 2 CPU threads, outputs within 2.6e-6), 16
            # images' features 0.95-0.97x, one image's forward 0.96-0.98x, the full forward 0.99x, and the first
            # traced call 0.3 s shorter (no XLA compile).
            query = _linear(hidden_states, self.q_proj.kernel, self.q_proj.bias)
            source = hidden_states if encoder_hidden_states is None else encoder_hidden_states
            if key_length is not None:
                source = source[:, :key_length]
            key, value = self._project(source, (self.k_proj, self.v_proj))
            query = self._split_heads(query * self._scale)
            key = self._split_heads(key)
            value = self._split_heads(value)
        scores = tf.matmul(query, key, transpose_b=True)  # (batch, heads, queries, keys)
        if causal:
            queries, keys = tf.shape(scores)[2], tf.shape(scores)[3]
            lower = tf.cast(tf.linalg.band_part(tf.ones([queries, keys]), -1, 0), tf.bool)
            scores = scores + tf.where(lower, 0.0, _FLOAT_MIN)
        if attention_mask is not None:
            if attention_mask.dtype == tf.bool:  # as additive: where causal also masks, the sum is -inf
                attention_mask = tf.where(attention_mask, 0.0, _FLOAT_MIN)
            scores = scores + tf.cast(attention_mask, scores.dtype)
        probs = tf.nn.softmax(scores, axis=-1)
        dropped = tf.nn.dropout(probs, rate=self._dropout) if training and self._dropout > 0 else probs
        output = tf.matmul(dropped, value)  # (batch, heads, queries, head_dim)
        output = tf.transpose(output, [0, 2, 1, 3])
        output = tf.reshape(output, [tf.shape(output)[0], tf.shape(output)[1], self._hidden_size])
        output = _linear(output, self.out_proj.kernel, self.out_proj.bias, residual)
        if not output_attentions:
            return output, None
        if key_length is not None:  # the keys left out had zero weight: as zeros in the probabilities
            probs = tf.pad(probs, [[0, 0], [0, 0], [0, 0], [0, tf.shape(probs)[2] - tf.shape(probs)[3]]])
        return output, probs


class TFGroupViTMLP(keras.layers.Layer):
    """fc1 -> activation (config.hidden_act) -> fc2 along the last axis."""

    _canonical_attrs = ("fc1", "fc2")

    def __init__(self, hidden_act: str, in_features: int, intermediate_size: int, out_features: int,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._activation = activation(hidden_act)
        self._hidden_act = hidden_act
        self.fc1 = _dense(in_features, intermediate_size, "fc1")
        self.fc2 = _dense(intermediate_size, out_features, "fc2")
        self.built = True

    def call(self, hidden_states, residual=None, training: bool = False):
        """``fc2(act(fc1(hidden_states)))``, plus ``residual`` when given."""
        if self._hidden_act == "quick_gelu":
            # quick_gelu as one SiLU, fc1 scaled by 1.702 and fc2's kernel by 1 / 1.702 (as groupvit_pt): one
            # elementwise kernel where x * sigmoid(1.702 x) ran three. Measured A/B in one process (default size,
            # 2 CPU threads): text features of 64 texts of 77 tokens 0.89-0.91x, padded prompts 0.97-0.98x, the
            # full forward 0.98-1.01x; outputs within 1.3e-5.
            scale = QUICK_GELU_SCALE
            inner = _linear(hidden_states, self.fc1.kernel * scale, self.fc1.bias * scale, activation=tf.nn.silu)
            return _linear(inner, self.fc2.kernel / scale, self.fc2.bias, residual)
        inner = _linear(hidden_states, self.fc1.kernel, self.fc1.bias, activation=self._activation)
        return _linear(inner, self.fc2.kernel, self.fc2.bias, residual)


class TFGroupViTMixerMLP(TFGroupViTMLP):
    """The MLP applied along the token axis: (batch, tokens, channels) -> (batch, out_tokens, channels)."""

    def call(self, hidden_states, training: bool = False):
        hidden_states = tf.transpose(hidden_states, [0, 2, 1])  # (batch, channels, tokens)
        hidden_states = super().call(hidden_states, training=training)
        return tf.transpose(hidden_states, [0, 2, 1])  # (batch, out_tokens, channels)


class TFGroupViTEncoderLayer(keras.layers.Layer):
    """Pre-LayerNorm transformer layer: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    _canonical_attrs = ("self_attn", "layer_norm1", "mlp", "layer_norm2")

    def __init__(self, config, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        hidden = config.hidden_size
        self.self_attn = TFGroupViTAttention(hidden, config.num_attention_heads, config.attention_dropout,
                                             name="self_attn")
        self.layer_norm1 = _layer_norm(hidden, config.layer_norm_eps, "layer_norm1")
        self.mlp = TFGroupViTMLP(config.hidden_act, hidden, config.intermediate_size, hidden, name="mlp")
        self.layer_norm2 = _layer_norm(hidden, config.layer_norm_eps, "layer_norm2")
        self.built = True

    def call(self, hidden_states, attention_mask=None, output_attentions: bool = False, key_length=None,
             training: bool = False):
        hidden_states, probs = self.self_attn(_pre_norm(self.layer_norm1, hidden_states, training),
                                              attention_mask=attention_mask, output_attentions=output_attentions,
                                              residual=hidden_states, key_length=key_length, training=training)
        hidden_states = self.mlp(_pre_norm(self.layer_norm2, hidden_states, training), residual=hidden_states,
                                 training=training)
        return hidden_states, probs


class TFGroupViTCrossAttentionLayer(keras.layers.Layer):
    """Group tokens attend to image tokens (no pre-norm), MLP, then a post LayerNorm."""

    _canonical_attrs = ("attn", "norm2", "mlp", "norm_post")

    def __init__(self, config: GroupViTVisionConfig, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        hidden = config.hidden_size
        self.attn = TFGroupViTAttention(hidden, config.num_attention_heads, config.attention_dropout, name="attn")
        self.norm2 = _layer_norm(hidden, config.layer_norm_eps, "norm2")
        self.mlp = TFGroupViTMLP(config.hidden_act, hidden, config.intermediate_size, hidden, name="mlp")
        self.norm_post = _layer_norm(hidden, config.layer_norm_eps, "norm_post")
        self.built = True

    def call(self, query, key, training: bool = False):
        hidden_states = self.attn(query, encoder_hidden_states=key, residual=query, training=training)[0]
        hidden_states = self.mlp(self.norm2(hidden_states), residual=hidden_states, training=training)
        return self.norm_post(hidden_states)


class TFGroupViTAssignAttention(keras.layers.Layer):
    """Single-head assignment of image tokens to groups: softmax over GROUPS, hard one-hot, straight-through.

    Gumbel noise is added in training, as the reference, unless turned off with the models' ``set_gumbel(False)``
    (to compare training losses and gradients deterministically. Changing it after a
    ``tf.function`` was traced needs a retrace.
    """

    _canonical_attrs = ("q_proj", "k_proj", "v_proj", "proj")

    def __init__(self, config: GroupViTVisionConfig, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        hidden = config.hidden_size
        self._scale = hidden ** -0.5  # the hidden size, not a head dim: a single head
        self._assign_eps = config.assign_eps
        self._gumbel = True
        self.q_proj = _dense(hidden, hidden, "q_proj")
        self.k_proj = _dense(hidden, hidden, "k_proj")
        self.v_proj = _dense(hidden, hidden, "v_proj")
        self.proj = _dense(hidden, hidden, "proj")
        self.built = True

    def call(self, query, key, training: bool = False):
        """query (batch, groups, C), key (batch, tokens, C) -> (new group tokens, soft assignment (batch, groups,
        tokens))."""
        query = _linear(query, self.q_proj.kernel, self.q_proj.bias)
        key, value = TFGroupViTAttention._project(key, (self.k_proj, self.v_proj))  # (batch, tokens, C) each
        raw = tf.matmul(query, key, transpose_b=True) * self._scale  # (batch, groups, tokens)
        if training and self._gumbel:
            assignment = gumbel_softmax(raw, axis=-2, hard=True)
        else:
            assignment = hard_softmax(raw, axis=-2)
        soft = tf.nn.softmax(raw, axis=-2)
        assignment = assignment / (tf.reduce_sum(assignment, axis=-1, keepdims=True) + self._assign_eps)
        output = _linear(tf.matmul(assignment, value), self.proj.kernel, self.proj.bias)  # (batch, groups, C)
        return output, soft


class TFGroupViTTokenAssign(keras.layers.Layer):
    """Merges a stage's image tokens into ``num_output_groups`` groups (GroupViT's grouping block)."""

    _canonical_attrs = ("norm_tokens", "mlp_inter", "norm_post_tokens", "norm_x", "pre_assign_attn", "assign",
                        "norm_new_x", "mlp_channels")

    def __init__(self, config: GroupViTVisionConfig, num_group_tokens: int, num_output_groups: int,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        hidden, eps = config.hidden_size, config.layer_norm_eps
        tokens_dim, channels_dim = config.assign_mlp_dims
        self.norm_tokens = _layer_norm(hidden, eps, "norm_tokens")
        self.mlp_inter = TFGroupViTMixerMLP(config.hidden_act, num_group_tokens, tokens_dim, num_output_groups,
                                            name="mlp_inter")
        self.norm_post_tokens = _layer_norm(hidden, eps, "norm_post_tokens")
        self.norm_x = _layer_norm(hidden, eps, "norm_x")
        self.pre_assign_attn = TFGroupViTCrossAttentionLayer(config, name="pre_assign_attn")
        self.assign = TFGroupViTAssignAttention(config, name="assign")
        self.norm_new_x = _layer_norm(hidden, eps, "norm_new_x")
        self.mlp_channels = TFGroupViTMLP(config.hidden_act, hidden, channels_dim, hidden, name="mlp_channels")
        self.built = True

    def call(self, image_tokens, group_tokens, training: bool = False):
        group_tokens = self.norm_tokens(group_tokens)
        image_tokens = self.norm_x(image_tokens)
        projected = self.norm_post_tokens(self.mlp_inter(group_tokens, training=training))  # (batch, out, C)
        projected = self.pre_assign_attn(projected, image_tokens, training=training)
        new_tokens, soft = self.assign(projected, image_tokens, training=training)
        new_tokens = new_tokens + projected
        new_tokens = self.mlp_channels(self.norm_new_x(new_tokens), residual=new_tokens, training=training)
        return new_tokens, soft


class TFGroupViTPatchEmbeddings(keras.layers.Layer):
    """Non-overlapping patch convolution; NCHW pixels in, (batch, patches, hidden) out (row-major patches)."""

    _canonical_attrs = ("projection",)

    def __init__(self, num_channels: int, hidden_size: int, patch_size: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.projection = keras.layers.Conv2D(
            hidden_size, kernel_size=patch_size, strides=patch_size, padding="valid", data_format="channels_last",
            kernel_initializer="zeros", bias_initializer="zeros", name="projection",
        )
        self.projection.build((None, None, None, num_channels))
        self.built = True

    def call(self, pixel_values):
        pixels = tf.transpose(pixel_values, [0, 2, 3, 1])  # NCHW -> NHWC
        patches = self.projection(pixels)  # (batch, rows, cols, hidden)
        rows, cols, hidden = patches.shape[1], patches.shape[2], patches.shape[3]
        return tf.reshape(patches, [tf.shape(patches)[0], rows * cols, hidden])


class TFGroupViTVisionEmbeddings(keras.layers.Layer):
    """Patch embedding, LayerNorm, THEN the position table (resized bicubic for other input sizes)."""

    _canonical_attrs = ("patch_embeddings", "position_embeddings", "layernorm")

    def __init__(self, config: GroupViTVisionConfig, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._config = config
        self.patch_embeddings = TFGroupViTPatchEmbeddings(config.num_channels, config.hidden_size, config.patch_size,
                                                          name="patch_embeddings")
        self.position_embeddings = self.add_weight(
            shape=(1, config.num_patches, config.hidden_size), initializer="zeros", name="position_embeddings")
        self.layernorm = _layer_norm(config.hidden_size, config.layer_norm_eps, "layernorm")
        self.built = True

    def check_pixels(self, pixel_values: tf.Tensor, interpolate_pos_encoding: bool) -> Tuple[int, int]:
        """ValueError for a bad rank, channel count, empty batch or size; returns the static (height, width)."""
        config = self._config
        shape = pixel_values.shape
        if shape.rank != 4:
            raise ValueError(f"pixel_values must be 4-D (batch, channels, height, width), got shape {shape}")
        batch, channels, height, width = shape
        if batch == 0:
            raise ValueError("pixel_values is an empty batch")
        if channels is not None and channels != config.num_channels:
            raise ValueError(
                f"pixel_values has {channels} channels, the model expects {config.num_channels} "
                "(pixels must be (batch, channels, height, width))"
            )
        if channels is None or height is None or width is None:
            raise ValueError(
                f"pixel_values needs static channels, height and width under tf.function, got shape {shape}; "
                "only the batch may be dynamic"
            )
        patch = config.patch_size
        if not interpolate_pos_encoding:
            if height != config.image_size or width != config.image_size:
                raise ValueError(
                    f"Input image size ({height}*{width}) doesn't match model ({config.image_size}*"
                    f"{config.image_size}); pass interpolate_pos_encoding=True for other sizes"
                )
        elif height % patch or width % patch or height < patch or width < patch:
            raise ValueError(
                f"with interpolate_pos_encoding the image size ({height}*{width}) must be a positive multiple of "
                f"the patch size {patch}"
            )
        return height, width

    def position_table(self, rows: int, cols: int) -> tf.Tensor:
        """The position table for a (rows, cols) patch grid, (1, rows * cols, hidden): resized bicubic (PyTorch's
        arithmetic, as two constant matmuls) unless the grid is the table's own."""
        grid = self._config.grid_size
        if (rows, cols) == (grid, grid):
            return self.position_embeddings
        hidden = self._config.hidden_size
        table = tf.reshape(self.position_embeddings, [grid, grid, hidden])  # (rows, cols, hidden)
        row_matrix = tf.constant(bicubic_matrix(grid, rows), tf.float32)  # (new rows, rows)
        col_matrix = tf.constant(bicubic_matrix(grid, cols), tf.float32)  # (new cols, cols)
        table = tf.einsum("yi,ijc->yjc", row_matrix, table)
        table = tf.einsum("xj,yjc->yxc", col_matrix, table)
        return tf.reshape(table, [1, rows * cols, hidden])

    def call(self, pixel_values, interpolate_pos_encoding: bool = False, training: bool = False):
        height, width = self.check_pixels(pixel_values, interpolate_pos_encoding)
        tokens = self.layernorm(self.patch_embeddings(pixel_values))
        patch = self._config.patch_size
        tokens = tokens + self.position_table(height // patch, width // patch)
        if training and self._config.dropout > 0:
            tokens = tf.nn.dropout(tokens, rate=self._config.dropout)
        return tokens


class TFGroupViTTextEmbeddings(keras.layers.Layer):
    """Token plus position embeddings; validates ids and length (see the module docstring for tf.function)."""

    _canonical_attrs = ("token_embedding", "position_embedding")

    def __init__(self, config: GroupViTTextConfig, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._config = config
        self.token_embedding = keras.layers.Embedding(config.vocab_size, config.hidden_size,
                                                      embeddings_initializer="zeros", name="token_embedding")
        self.token_embedding.build()
        self.position_embedding = keras.layers.Embedding(config.max_position_embeddings, config.hidden_size,
                                                         embeddings_initializer="zeros", name="position_embedding")
        self.position_embedding.build()
        self.built = True

    def check_ids(self, input_ids, position_ids=None) -> List[tf.Operation]:
        """Length and id ranges: ValueError eagerly, assertions (InvalidArgumentError when run) in a graph."""
        config = self._config
        length = input_ids.shape[1]
        checks = []
        if length is not None and length > config.max_position_embeddings:
            raise ValueError(
                f"Sequence length must be less than max_position_embeddings (got `sequence length`: {length} "
                f"and max_position_embeddings: {config.max_position_embeddings})"
            )
        if length is None:
            checks.append(tf.debugging.assert_less_equal(
                tf.shape(input_ids)[1], config.max_position_embeddings,
                message=f"sequence longer than max_position_embeddings ({config.max_position_embeddings})"))
        checks += _check_values_in_range(input_ids, config.vocab_size, "input_ids", "vocab_size")
        if position_ids is not None:
            checks += _check_values_in_range(position_ids, config.max_position_embeddings, "position_ids",
                                             "max_position_embeddings")
        return checks

    def call(self, input_ids, position_ids=None):
        config = self._config
        checks = self.check_ids(input_ids, position_ids)
        if position_ids is None:
            position_ids = tf.range(tf.shape(input_ids)[1])[None, :]
        with tf.control_dependencies(checks):
            tokens = tf.gather(self.token_embedding.embeddings, input_ids)
            positions = tf.gather(self.position_embedding.embeddings, position_ids)
        if not tf.executing_eagerly():
            tokens = _poison_out_of_range(tokens, input_ids, config.vocab_size)
            positions = _poison_out_of_range(positions, position_ids, config.max_position_embeddings)
        return tokens + positions


class TFGroupViTStage(keras.layers.Layer):
    """One grouping stage: group tokens appended AFTER the image tokens, transformer layers, then grouping."""

    _canonical_attrs = ("group_token", "layers", "downsample", "group_projector")

    def __init__(self, config: GroupViTVisionConfig, spec: StageSpec, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        hidden = config.hidden_size
        self._num_group_tokens = spec.num_group_tokens
        if spec.has_group_tokens:
            self.group_token = self.add_weight(shape=(1, spec.num_group_tokens, hidden), initializer="zeros",
                                               name="group_token")
        else:
            self.group_token = None
        self.layers = [TFGroupViTEncoderLayer(config, name=f"layers_._{j}") for j in range(spec.depth)]
        if spec.has_downsample:
            self.downsample = TFGroupViTTokenAssign(config, spec.num_group_tokens, spec.num_output_groups,
                                                    name="downsample")
        else:
            self.downsample = None
        if spec.has_group_projector:
            # The reference's nn.Sequential(LayerNorm, MixerMLP): canonical names .0 and .1.
            self.group_projector = [
                _layer_norm(hidden, config.layer_norm_eps, "group_projector.0"),
                TFGroupViTMixerMLP(config.hidden_act, spec.num_prev_group_tokens, config.group_projector_dim,
                                   spec.num_group_tokens, name="group_projector.1"),
            ]
        else:
            self.group_projector = None
        self.built = True

    def call(self, hidden_states, prev_group_tokens=None, training: bool = False):
        """-> (image tokens, this stage's group tokens after its layers or None, soft assignment or None)."""
        if self.group_token is None:
            tokens = hidden_states
        else:
            batch = tf.shape(hidden_states)[0]
            group_tokens = tf.broadcast_to(self.group_token, [batch, self.group_token.shape[1],
                                                              self.group_token.shape[2]])
            if self.group_projector is not None:
                group_tokens = group_tokens + _run_sequence(self.group_projector, prev_group_tokens, training)
            tokens = tf.concat([hidden_states, group_tokens], axis=1)  # (batch, image + groups, C)
        for layer in self.layers:
            tokens = layer(tokens, training=training)[0]
        if self.group_token is None:
            return tokens, None, None
        image_tokens = tokens[:, : -self._num_group_tokens]
        group_tokens = tokens[:, -self._num_group_tokens:]
        soft = None
        if self.downsample is not None:
            image_tokens, soft = self.downsample(image_tokens, group_tokens, training=training)
        return image_tokens, group_tokens, soft


class TFGroupViTTextEncoder(keras.layers.Layer):
    _canonical_attrs = ("layers",)

    def __init__(self, config: GroupViTTextConfig, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.layers = [TFGroupViTEncoderLayer(config, name=f"layers_._{i}") for i in range(config.num_hidden_layers)]
        self.built = True

    def call(self, hidden_states, attention_mask=None, output_attentions: bool = False,
             output_hidden_states: bool = False, key_length=None, training: bool = False):
        """-> (last hidden state, hidden states (input of each layer + last) or None, attentions or None)."""
        all_hidden = [] if output_hidden_states else None
        all_attentions = [] if output_attentions else None
        for layer in self.layers:
            if output_hidden_states:
                all_hidden.append(hidden_states)
            hidden_states, probs = layer(hidden_states, attention_mask=attention_mask,
                                         output_attentions=output_attentions, key_length=key_length,
                                         training=training)
            if output_attentions:
                all_attentions.append(probs)
        if output_hidden_states:
            all_hidden.append(hidden_states)
        return (hidden_states, None if all_hidden is None else tuple(all_hidden),
                None if all_attentions is None else tuple(all_attentions))


class TFGroupViTVisionEncoder(keras.layers.Layer):
    _canonical_attrs = ("stages",)

    def __init__(self, config: GroupViTVisionConfig, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.stages = [TFGroupViTStage(config, spec, name=f"stages_._{spec.index}") for spec in config.stages]
        self.built = True

    def call(self, hidden_states, training: bool = False):
        """-> (final tokens, (input of each stage..., final tokens), soft maps of the grouping stages)."""
        all_hidden: List[tf.Tensor] = []
        soft_maps: List[tf.Tensor] = []
        group_tokens = None
        for stage in self.stages:
            all_hidden.append(hidden_states)
            hidden_states, group_tokens, soft = stage(hidden_states, group_tokens, training=training)
            if soft is not None:
                soft_maps.append(soft)
        all_hidden.append(hidden_states)
        return hidden_states, tuple(all_hidden), tuple(soft_maps)


class TFGroupViTTextTransformer(keras.layers.Layer):
    """Causal text transformer; pooled output = hidden state at the first eos (legacy: argmax of the ids)."""

    _canonical_attrs = ("embeddings", "encoder", "final_layer_norm")

    def __init__(self, config: GroupViTTextConfig, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._config = config
        self.embeddings = TFGroupViTTextEmbeddings(config, name="embeddings")
        self.encoder = TFGroupViTTextEncoder(config, name="encoder")
        self.final_layer_norm = _layer_norm(config.hidden_size, config.layer_norm_eps, "final_layer_norm")
        self.built = True

    def check_inputs(self, input_ids, attention_mask=None, position_ids=None) -> List[tf.Operation]:
        """Every check of the text inputs (shapes, then ids): lets a model fail before running any tower."""
        return self._check_shapes(input_ids, attention_mask, position_ids) + self.embeddings.check_ids(
            input_ids, position_ids)

    def _check_shapes(self, input_ids, attention_mask, position_ids) -> List[tf.Operation]:
        if input_ids.shape.rank != 2:
            raise ValueError(f"input_ids must be 2-D (batch, sequence), got shape {input_ids.shape}")
        batch, length = input_ids.shape
        if batch == 0:
            raise ValueError("input_ids is an empty batch")
        if length == 0:
            raise ValueError("input_ids has an empty sequence (length 0)")
        checks = []
        if attention_mask is not None:
            if attention_mask.shape.rank != 2 or not attention_mask.shape.is_compatible_with(input_ids.shape):
                raise ValueError(
                    f"attention_mask must have the shape of input_ids {input_ids.shape}, got {attention_mask.shape}"
                )
            if not (attention_mask.shape.is_fully_defined() and input_ids.shape.is_fully_defined()):
                checks.append(tf.debugging.assert_equal(tf.shape(attention_mask), tf.shape(input_ids),
                                                        message="attention_mask must have the shape of input_ids"))
        if position_ids is not None:
            shape = position_ids.shape
            if (shape.rank != 2 or not shape[1:].is_compatible_with(input_ids.shape[1:])
                    or (shape[0] is not None and batch is not None and shape[0] not in (1, batch))):
                raise ValueError(
                    f"position_ids has shape {shape}; expected (1, length) or the shape of input_ids "
                    f"{input_ids.shape}"
                )
            if not (shape[1:].is_fully_defined() and input_ids.shape[1:].is_fully_defined()):
                checks.append(tf.debugging.assert_equal(tf.shape(position_ids)[1], tf.shape(input_ids)[1],
                                                        message="position_ids must have the length of input_ids"))
        return checks

    def _additive_mask(self, input_ids, attention_mask, key_length=None) -> tf.Tensor:
        # As the reference: causal (0 / float min) + padding (0 where mask == 1, float min elsewhere), over the
        # first key_length keys (default: all positions).
        length = tf.shape(input_ids)[1]
        keys = length if key_length is None else key_length
        lower = tf.cast(tf.linalg.band_part(tf.ones([length, keys]), -1, 0), tf.bool)
        mask = tf.where(lower, 0.0, _FLOAT_MIN)[None, None]  # (1, 1, L, keys)
        if attention_mask is not None:
            padding = tf.where(tf.equal(tf.cast(attention_mask[:, :keys], tf.float32), 1.0), 0.0, _FLOAT_MIN)
            mask = mask + padding[:, None, None, :]  # (batch, 1, L, keys)
        return mask

    def _pooling_positions(self, input_ids) -> tf.Tensor:
        length = tf.shape(input_ids)[1]
        positions = tf.range(length)[None, :]
        if self._config.legacy_eos_pooling:
            hits = tf.equal(input_ids, tf.reduce_max(input_ids, axis=-1, keepdims=True))
        else:
            hits = tf.equal(input_ids, tf.cast(self._config.eos_token_id, input_ids.dtype))
        first = tf.reduce_min(tf.where(hits, positions, length), axis=-1)
        return tf.where(first == length, 0, first)  # no eos: position 0, as the reference's argmax

    def call(self, input_ids, attention_mask=None, position_ids=None, output_attentions: bool = False,
             output_hidden_states: bool = False, training: bool = False):
        checks = self._check_shapes(input_ids, attention_mask, position_ids)
        with tf.control_dependencies(checks):
            input_ids = tf.identity(input_ids)
        hidden_states = self.embeddings(input_ids, position_ids=position_ids)
        keys = None if attention_mask is None else _attended_keys(attention_mask)
        mask = self._additive_mask(input_ids, attention_mask, keys)
        last, all_hidden, all_attentions = self.encoder(
            hidden_states, attention_mask=mask, output_attentions=output_attentions,
            output_hidden_states=output_hidden_states, key_length=keys, training=training)
        last = self.final_layer_norm(last)
        pooled = tf.gather(last, self._pooling_positions(input_ids), batch_dims=1)  # (batch, hidden)
        return BaseModelOutputWithPooling(last_hidden_state=last, pooler_output=pooled, hidden_states=all_hidden,
                                          attentions=all_attentions)

    def pooled_output(self, input_ids, attention_mask=None, position_ids=None, training: bool = False):
        """``call(...).pooler_output`` (batch, hidden), doing only the work it depends on.

        Attention is causal, so the hidden state at a text's pooling position never depends on later tokens: the
        layers run up to the batch's last pooling position only (CLIP prompts are padded to 77 tokens, most of
        them padding). Exact: a text whose keys up to its pooling position are ALL masked attends to every key
        (the reference's all-float-min row), so then the whole sequence runs.
        """
        checks = self._check_shapes(input_ids, attention_mask, position_ids)
        with tf.control_dependencies(checks):
            input_ids = tf.identity(input_ids)
        hidden_states = self.embeddings(input_ids, position_ids=position_ids)  # checks every id
        positions = self._pooling_positions(input_ids)
        full = tf.shape(input_ids)[1]
        length = tf.reduce_max(positions) + 1
        if attention_mask is not None:
            visible = tf.range(full)[None, :] <= positions[:, None]  # (batch, length): keys the pooled token sees
            masked = tf.logical_and(tf.not_equal(tf.cast(attention_mask, tf.float32), 1.0), visible)
            blind = tf.reduce_any(tf.reduce_all(tf.equal(masked, visible), axis=1))
            length = tf.where(blind, full, length)
            attention_mask = attention_mask[:, :length]
        mask = self._additive_mask(input_ids[:, :length], attention_mask)
        last = self.encoder(hidden_states[:, :length], attention_mask=mask, training=training)[0]
        pooled = tf.gather(last, positions, batch_dims=1)
        return self.final_layer_norm(pooled)  # per token: the same as normalising every position first


class TFGroupViTVisionTransformer(keras.layers.Layer):
    """Embeddings, grouping stages, final LayerNorm; pooled output = mean over the final tokens."""

    _canonical_attrs = ("embeddings", "encoder", "layernorm")

    def __init__(self, config: GroupViTVisionConfig, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.embeddings = TFGroupViTVisionEmbeddings(config, name="embeddings")
        self.encoder = TFGroupViTVisionEncoder(config, name="encoder")
        self.layernorm = _layer_norm(config.hidden_size, config.layer_norm_eps, "layernorm")
        self.built = True

    def call(self, pixel_values, output_attentions: bool = False, output_hidden_states: bool = False,
             interpolate_pos_encoding: bool = False, training: bool = False):
        hidden_states = self.embeddings(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding,
                                        training=training)
        last, all_hidden, soft_maps = self.encoder(hidden_states, training=training)
        last = self.layernorm(last)
        pooled = tf.reduce_mean(last, axis=1)
        return BaseModelOutputWithPooling(
            last_hidden_state=last, pooler_output=pooled,
            hidden_states=all_hidden if output_hidden_states else None,
            attentions=soft_maps if output_attentions else None,
        )


# ----------------------------------------------------------------------------------------------------------
# Checkpoint API shared by TFGroupViTTextModel, TFGroupViTVisionModel and TFGroupViTModel
# ----------------------------------------------------------------------------------------------------------


def _get_config(model: keras.Model) -> AnyConfig:
    """The model's config (read-only)."""
    return model._config


def _assign_layers(model: keras.Model) -> List[TFGroupViTAssignAttention]:
    vision = getattr(model, "vision_model", None)
    if vision is None:
        return []
    return [stage.downsample.assign for stage in vision.encoder.stages if stage.downsample is not None]


def _set_gumbel(model: keras.Model, enabled: bool) -> keras.Model:
    """Switch Gumbel noise of every AssignAttention in training mode (eval mode never adds noise).

    A ``tf.function`` traced before the switch keeps the old behaviour until it is retraced.
    """
    for layer in _assign_layers(model):
        layer._gumbel = bool(enabled)
    return model


def _get_gumbel(model: keras.Model) -> bool:
    """Whether AssignAttention adds Gumbel noise in training mode (default True; eval mode never does)."""
    return all(layer._gumbel for layer in _assign_layers(model))


def _canonical_walk(node: Any, prefix: str) -> Iterator[Tuple[str, keras.Variable]]:
    """Yield (canonical name, variable) by walking attributes in canonical naming (``_canonical_attrs``)."""

    def join(name: str) -> str:
        return f"{prefix}.{name}" if prefix else name

    if node is None or isinstance(node, keras.layers.ReLU):
        return
    if isinstance(node, keras.Variable):
        yield prefix, node
    elif isinstance(node, (keras.layers.Dense, keras.layers.Conv2D)):
        yield join("weight"), node.kernel
        yield join("bias"), node.bias
    elif isinstance(node, _BatchNorm1d):
        yield join("weight"), node.gamma
        yield join("bias"), node.beta
        yield join("running_mean"), node.moving_mean
        yield join("running_var"), node.moving_variance
        yield join("num_batches_tracked"), node.num_batches_tracked
    elif isinstance(node, keras.layers.LayerNormalization):
        yield join("weight"), node.gamma
        yield join("bias"), node.beta
    elif isinstance(node, keras.layers.Embedding):
        yield join("weight"), node.embeddings
    elif isinstance(node, (list, tuple)):
        for index, child in enumerate(node):
            yield from _canonical_walk(child, join(str(index)))
    elif hasattr(node, "_canonical_attrs"):
        for attr in node._canonical_attrs:
            yield from _canonical_walk(getattr(node, attr), join(attr))
    else:
        raise TypeError(f"no canonical mapping for {type(node).__name__} at {prefix!r}")


def _canonical_variables(model: keras.Model) -> Dict[str, keras.Variable]:
    """{canonical name: Keras variable} for every tensor of ``weight_specs(model.config)``, in Keras layouts."""
    variables = dict(_canonical_walk(model, ""))
    names = [spec.name for spec in weight_specs(model.config)]
    if set(variables) != set(names):  # pragma: no cover - a bug in this module, not in the caller's data
        raise RuntimeError(f"canonical walk and weight table disagree: {sorted(set(variables) ^ set(names))[:8]}")
    return {name: variables[name] for name in names}


def _canonical_state(model: keras.Model) -> Dict[str, np.ndarray]:
    """The canonical state: {Hub PyTorch name: numpy array (float32; BatchNorm counters int64)} in table order."""
    table = spec_table(model.config)
    return {name: np.asarray(table[name].from_keras(variable.numpy()), dtype=table[name].dtype)
            for name, variable in _canonical_variables(model).items()}


def _keras_values(config: Any, state: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """Checked canonical arrays -> {canonical name: array in the Keras layout} (``checked_arrays``: missing,
    unexpected, mis-shaped or non-numeric -> ValueError; an absent BatchNorm ``num_batches_tracked`` is 0)."""
    table = spec_table(config)
    return {name: table[name].to_keras(array) for name, array in checked_arrays(state, config).items()}


def _load_canonical_state(model: keras.Model, state: Mapping[str, np.ndarray]) -> keras.Model:
    """Copy canonical numpy arrays into the weights, strictly: missing, unexpected or mis-shaped -> ValueError.

    Layouts change through groupvit_core.weights (WeightSpec.to_keras). A BatchNorm ``num_batches_tracked``
    absent from ``state`` is set to 0.
    """
    _assign(_canonical_variables(model), _keras_values(model.config, state))  # all checked first
    return model


def _assign(variables: Mapping[str, keras.Variable], values: Mapping[str, np.ndarray]) -> None:
    for name, variable in variables.items():
        variable.assign(values[name])


def _constant(value: np.ndarray):
    return lambda shape, dtype=None: value


def _built_with_values(cls, config: Any, values: Mapping[str, np.ndarray]) -> keras.Model:
    """``cls(config)`` whose variables are created holding ``values`` (Keras layouts, canonical names).

    The model is built inside a ``keras.StatelessScope``, where Keras defers creating the variables until the
    scope ends; each deferred variable is given its checkpoint value as initialiser first, so no variable is
    filled with a placeholder and then assigned (loading the default-size model: ~0.4 s less on 2 CPU cores, and
    no placeholder copy in memory).
    Should a Keras version create the variables eagerly instead, they are assigned after the build, as
    ``load_canonical_state`` does: the result is the same either way.
    """
    with keras.StatelessScope():
        model = cls(config, initialize=False)
        variables = _canonical_variables(model)
        deferred = all(getattr(variable, "_value", 0) is None and callable(getattr(variable, "_initializer", None))
                       and tuple(variable.shape) == np.shape(values[name]) for name, variable in variables.items())
        if deferred:
            for name, variable in variables.items():
                variable._initializer = _constant(values[name])
    if not deferred:
        _assign(variables, values)
    return model


def _from_pretrained(cls, path: Union[str, os.PathLike]):
    """Load a checkpoint directory (config.json + model.safetensors, pytorch_model.bin or tf_model.h5).

    Loading is strict (missing, unexpected or mis-shaped tensors raise ValueError; a missing directory or file
    raises OSError); the text and vision models load from a full checkpoint. Never imports torch.
    """
    config, state = loading.load_pretrained(path, cls.config_class)
    values = _keras_values(config, state)  # every check before building
    # Not a no-op: the arrays read from the file that _keras_values re-laid out (transposed kernels) are freed
    # here, before the variables are made; kept until the build returns they raise peak memory (~70 MB at the
    # default size).
    del state
    return _built_with_values(cls, config, values)


def _save_pretrained(model: keras.Model, path: Union[str, os.PathLike], format: str = "safetensors") -> str:
    """Write config.json and the weights ('safetensors', 'h5' (Hub Keras-2 layout) or 'bin'); returns the path."""
    return loading.save_pretrained(path, model.config, _canonical_state(model), format=format)


def _get_keras_config(model: keras.Model) -> Dict[str, Any]:
    """Keras serialisation config: the GroupViT config's ``to_dict()``."""
    return model.config.to_dict()


def _from_keras_config(cls, config: Dict[str, Any]):
    return cls(cls.config_class.from_dict(dict(config)))


def _export(model: keras.Model, filepath: Union[str, os.PathLike], format: str = "tf_saved_model",
            verbose: Optional[bool] = None, image_size: Optional[Tuple[int, int]] = None, **kwargs: Any):
    """Write a TensorFlow SavedModel whose ``serve`` endpoint (also the default signature) returns a dict.

    TFGroupViTModel: serve(input_ids int64 (batch, length), attention_mask int64 (batch, length), pixel_values
    float32 (batch, channels, H, W)) -> logits_per_image, logits_per_text, text_embeds, image_embeds and, with a
    grouping stage, segmentation_logits. The towers return last_hidden_state and pooler_output. Batch and text
    length are dynamic; ``image_size=(H, W)`` serves another (static) input size with an interpolated position
    table.
    """
    if format != "tf_saved_model":
        raise ValueError(f"export supports format='tf_saved_model' only, got {format!r}")
    if kwargs:
        raise ValueError(f"unexpected export argument(s): {sorted(kwargs)}")
    serve, signature = model._serving_endpoint(image_size)
    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint("serve", serve, input_signature=signature)
    archive.write_out(os.fspath(filepath), verbose=bool(verbose))
    return filepath


def _keras_call_setup(model: keras.Model) -> None:
    # The models convert and check their own inputs (numpy, lists, tensors), so that errors name the input.
    model._convert_input_args = False
    model._allow_non_tensor_positional_args = True
    model.built = True


@keras.saving.register_keras_serializable(package=_SERIALIZABLE_PACKAGE)
class TFGroupViTTextModel(keras.Model):
    """The text tower alone; its weights keep the ``text_model.`` prefix, so it loads from a full checkpoint."""

    config_class = GroupViTTextConfig
    _canonical_attrs = ("text_model",)

    def __init__(self, config: GroupViTTextConfig, *, initialize: bool = True, **kwargs: Any) -> None:
        _check_config(config, GroupViTTextConfig)
        super().__init__(**kwargs)
        self._config = config
        self.text_model = TFGroupViTTextTransformer(config, name="text_model")
        _keras_call_setup(self)
        if initialize:
            _init_tower(self.text_model, config, config.initializer_range, config.initializer_factor)

    # The checkpoint API is shared by the three models: defined once, above.
    config = property(_get_config)
    from_pretrained = classmethod(_from_pretrained)
    save_pretrained = _save_pretrained
    canonical_variables = _canonical_variables
    canonical_state = _canonical_state
    load_canonical_state = _load_canonical_state
    get_config = _get_keras_config
    from_config = classmethod(_from_keras_config)
    export = _export

    def call(self, input_ids, attention_mask=None, position_ids=None, output_attentions: bool = False,
             output_hidden_states: bool = False, training: bool = False) -> BaseModelOutputWithPooling:
        tensors = _text_inputs(input_ids, attention_mask, position_ids)
        flags = dict(output_attentions=output_attentions, output_hidden_states=output_hidden_states)
        if tf.executing_eagerly():
            self.text_model.check_inputs(*tensors)
        if _runs_as_graph(self, training):
            return _graph_call(self, "call", self.text_model, tensors, flags)
        return self.text_model(*tensors, training=training, **flags)

    def _serving_endpoint(self, image_size: Optional[Tuple[int, int]] = None):
        if image_size is not None:
            raise ValueError("image_size does not apply to a text model")
        signature = [tf.TensorSpec([None, None], tf.int64, name="input_ids"),
                     tf.TensorSpec([None, None], tf.int64, name="attention_mask")]

        def serve(input_ids, attention_mask):
            out = self(input_ids, attention_mask=attention_mask)
            return {"last_hidden_state": out.last_hidden_state, "pooler_output": out.pooler_output}

        return serve, signature


@keras.saving.register_keras_serializable(package=_SERIALIZABLE_PACKAGE)
class TFGroupViTVisionModel(keras.Model):
    """The vision tower alone; its weights keep the ``vision_model.`` prefix, so it loads from a full checkpoint."""

    config_class = GroupViTVisionConfig
    _canonical_attrs = ("vision_model",)

    def __init__(self, config: GroupViTVisionConfig, *, initialize: bool = True, **kwargs: Any) -> None:
        _check_config(config, GroupViTVisionConfig)
        super().__init__(**kwargs)
        self._config = config
        self.vision_model = TFGroupViTVisionTransformer(config, name="vision_model")
        _keras_call_setup(self)
        if initialize:
            _init_tower(self.vision_model, config, config.initializer_range, config.initializer_factor)

    # The checkpoint API is shared by the three models: defined once, above.
    config = property(_get_config)
    from_pretrained = classmethod(_from_pretrained)
    save_pretrained = _save_pretrained
    canonical_variables = _canonical_variables
    canonical_state = _canonical_state
    load_canonical_state = _load_canonical_state
    set_gumbel = _set_gumbel
    gumbel = property(_get_gumbel, _set_gumbel)
    get_config = _get_keras_config
    from_config = classmethod(_from_keras_config)
    export = _export

    def call(self, pixel_values, output_attentions: bool = False, output_hidden_states: bool = False,
             interpolate_pos_encoding: bool = False, training: bool = False) -> BaseModelOutputWithPooling:
        pixel_values = _as_pixel_values(pixel_values)
        flags = dict(output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                     interpolate_pos_encoding=interpolate_pos_encoding)
        if tf.executing_eagerly():
            self.vision_model.embeddings.check_pixels(pixel_values, interpolate_pos_encoding)
        if _runs_as_graph(self, training):
            return _graph_call(self, "call", self.vision_model, (pixel_values,), flags)
        return self.vision_model(pixel_values, training=training, **flags)

    def _serving_endpoint(self, image_size: Optional[Tuple[int, int]] = None):
        config = self._config
        height, width = image_size or (config.image_size, config.image_size)
        interpolate = (height, width) != (config.image_size, config.image_size)
        signature = [tf.TensorSpec([None, config.num_channels, height, width], tf.float32, name="pixel_values")]

        def serve(pixel_values):
            out = self(pixel_values, interpolate_pos_encoding=interpolate)
            return {"last_hidden_state": out.last_hidden_state, "pooler_output": out.pooler_output}

        return serve, signature


@keras.saving.register_keras_serializable(package=_SERIALIZABLE_PACKAGE)
class TFGroupViTModel(keras.Model):
    """Text and vision towers with their projection heads: contrastive logits and zero-shot segmentation."""

    config_class = GroupViTConfig
    _canonical_attrs = ("text_model", "vision_model", "visual_projection", "text_projection", "logit_scale")

    def __init__(self, config: GroupViTConfig, *, initialize: bool = True, **kwargs: Any) -> None:
        _check_config(config, GroupViTConfig)
        super().__init__(**kwargs)
        self._config = config
        text, vision = config.text_config, config.vision_config
        self.text_model = TFGroupViTTextTransformer(text, name="text_model")
        self.vision_model = TFGroupViTVisionTransformer(vision, name="vision_model")
        self.visual_projection = _projection(vision.hidden_size, config.projection_intermediate_dim,
                                             config.projection_dim, "visual_projection")
        self.text_projection = _projection(text.hidden_size, config.projection_intermediate_dim,
                                           config.projection_dim, "text_projection")
        # Keras layout of the scalar: (1,) (groupvit_core.weights SCALAR).
        self.logit_scale = self.add_weight(
            shape=(1,), initializer=keras.initializers.Constant(float(config.logit_scale_init_value)),
            name="logit_scale")
        _keras_call_setup(self)
        if initialize:
            # The reference initialises the joint model with its top-level constants, the towers' own sizes.
            _init_tower(self.text_model, text, JOINT_INITIALIZER_RANGE, JOINT_INITIALIZER_FACTOR)
            _init_tower(self.vision_model, vision, JOINT_INITIALIZER_RANGE, JOINT_INITIALIZER_FACTOR)
            _init_tower(self.visual_projection, vision, JOINT_INITIALIZER_RANGE, JOINT_INITIALIZER_FACTOR)
            _init_tower(self.text_projection, text, JOINT_INITIALIZER_RANGE, JOINT_INITIALIZER_FACTOR)

    # The checkpoint API is shared by the three models: defined once, above.
    config = property(_get_config)
    from_pretrained = classmethod(_from_pretrained)
    save_pretrained = _save_pretrained
    canonical_variables = _canonical_variables
    canonical_state = _canonical_state
    load_canonical_state = _load_canonical_state
    set_gumbel = _set_gumbel
    gumbel = property(_get_gumbel, _set_gumbel)
    get_config = _get_keras_config
    from_config = classmethod(_from_keras_config)
    export = _export

    def get_text_features(self, input_ids, attention_mask=None, position_ids=None,
                          training: bool = False) -> tf.Tensor:
        """Text embeddings before L2 normalisation: text_projection(pooled text output)."""
        tensors = _text_inputs(input_ids, attention_mask, position_ids)
        if tf.executing_eagerly():
            self.text_model.check_inputs(*tensors)
        if _runs_as_graph(self, training):
            return _graph_call(self, "get_text_features", self._text_features, tensors, {})
        return self._text_features(*tensors, training=training)

    def _text_features(self, input_ids, attention_mask, position_ids, training: bool = False) -> tf.Tensor:
        pooled = self.text_model.pooled_output(input_ids, attention_mask, position_ids, training=training)
        return _run_sequence(self.text_projection, pooled, training)

    def get_image_features(self, pixel_values, interpolate_pos_encoding: bool = False,
                           training: bool = False) -> tf.Tensor:
        """Image embeddings before L2 normalisation: visual_projection(mean of the final group tokens)."""
        pixel_values = _as_pixel_values(pixel_values)
        if tf.executing_eagerly():
            self.vision_model.embeddings.check_pixels(pixel_values, interpolate_pos_encoding)
        if _runs_as_graph(self, training):
            return _graph_call(self, "get_image_features", self._image_features, (pixel_values,),
                               {"interpolate_pos_encoding": interpolate_pos_encoding})
        return self._image_features(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding,
                                    training=training)

    def _image_features(self, pixel_values, interpolate_pos_encoding: bool = False,
                        training: bool = False) -> tf.Tensor:
        outputs = self.vision_model(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding,
                                    training=training)
        return _run_sequence(self.visual_projection, outputs.pooler_output, training)

    def call(self, input_ids, pixel_values, attention_mask=None, position_ids=None, return_loss: bool = False,
             output_attentions: bool = False, output_hidden_states: bool = False,
             output_segmentation: bool = False, interpolate_pos_encoding: bool = False,
             training: bool = False) -> GroupViTModelOutput:
        input_ids, attention_mask, position_ids = _text_inputs(input_ids, attention_mask, position_ids)
        pixel_values = _as_pixel_values(pixel_values)
        if tf.executing_eagerly():  # fail on any bad input before running a tower
            self.text_model.check_inputs(input_ids, attention_mask, position_ids)
            self.vision_model.embeddings.check_pixels(pixel_values, interpolate_pos_encoding)
        texts, images = input_ids.shape[0], pixel_values.shape[0]
        if return_loss and texts is not None and images is not None and texts != images:
            raise ValueError(f"return_loss needs as many texts as images, got {texts} texts and {images} images")
        if output_segmentation:
            if not self._config.vision_config.stages[0].has_downsample:
                raise ValueError("output_segmentation needs a vision tower with at least one grouping stage")
            output_attentions = True  # as the reference: the segmentation reads the vision attentions
        flags = dict(return_loss=return_loss, output_attentions=output_attentions,
                     output_hidden_states=output_hidden_states, output_segmentation=output_segmentation,
                     interpolate_pos_encoding=interpolate_pos_encoding)
        if _runs_as_graph(self, training):
            return _graph_call(self, "call", self._forward, (input_ids, pixel_values, attention_mask, position_ids),
                               flags)
        return self._forward(input_ids, pixel_values, attention_mask, position_ids, training=training, **flags)

    def _forward(self, input_ids, pixel_values, attention_mask, position_ids, return_loss: bool = False,
                 output_attentions: bool = False, output_hidden_states: bool = False,
                 output_segmentation: bool = False, interpolate_pos_encoding: bool = False,
                 training: bool = False) -> GroupViTModelOutput:
        vision_outputs = self.vision_model(pixel_values, output_attentions=output_attentions,
                                           output_hidden_states=output_hidden_states,
                                           interpolate_pos_encoding=interpolate_pos_encoding, training=training)
        text_outputs = self.text_model(input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                       output_attentions=output_attentions,
                                       output_hidden_states=output_hidden_states, training=training)
        image_embeds = _run_sequence(self.visual_projection, vision_outputs.pooler_output, training)
        text_embeds = _run_sequence(self.text_projection, text_outputs.pooler_output, training)
        image_embeds = _l2_normalize(image_embeds)
        text_embeds = _l2_normalize(text_embeds)
        scale = tf.exp(tf.reshape(self.logit_scale, []))  # no clamp, as the reference
        logits_per_text = tf.matmul(text_embeds, image_embeds, transpose_b=True) * scale
        logits_per_image = tf.transpose(logits_per_text)

        segmentation_logits = None
        if output_segmentation:
            segmentation_logits = self._segmentation_logits(vision_outputs, text_embeds, scale,
                                                            pixel_values.shape[2], pixel_values.shape[3], training)
        loss = groupvit_loss(logits_per_text) if return_loss else None
        return GroupViTModelOutput(loss=loss, logits_per_image=logits_per_image, logits_per_text=logits_per_text,
                                   segmentation_logits=segmentation_logits, text_embeds=text_embeds,
                                   image_embeds=image_embeds, text_model_output=text_outputs,
                                   vision_model_output=vision_outputs)

    def _segmentation_logits(self, vision_outputs: BaseModelOutputWithPooling, text_embeds: tf.Tensor,
                             scale: tf.Tensor, height: int, width: int, training: bool) -> tf.Tensor:
        """(images, texts, height, width): each pixel mixes its groups' text similarities (reference semantics)."""
        group_tokens = vision_outputs.last_hidden_state
        images = tf.shape(group_tokens)[0]
        groups, hidden = group_tokens.shape[1], group_tokens.shape[2]
        texts = tf.shape(text_embeds)[0]
        # Each final group token through the visual head once: (images * groups, projection)
        group_embeds = _run_sequence(self.visual_projection, tf.reshape(group_tokens, [-1, hidden]), training)
        group_embeds = _l2_normalize(group_embeds)
        # (images * groups, texts) -> (images, texts, groups)
        logits_per_group = tf.reshape(tf.matmul(group_embeds, text_embeds, transpose_b=True) * scale,
                                      [images, groups, texts])
        logits_per_group = tf.transpose(logits_per_group, [0, 2, 1])
        grouping = _grouping(vision_outputs.attentions, height, width)  # (images, groups, height * width)
        segmentation = tf.matmul(logits_per_group, grouping) * scale
        return tf.reshape(segmentation, [images, texts, height, width])

    def _serving_endpoint(self, image_size: Optional[Tuple[int, int]] = None):
        vision = self._config.vision_config
        height, width = image_size or (vision.image_size, vision.image_size)
        interpolate = (height, width) != (vision.image_size, vision.image_size)
        segmentation = vision.stages[0].has_downsample
        signature = [tf.TensorSpec([None, None], tf.int64, name="input_ids"),
                     tf.TensorSpec([None, None], tf.int64, name="attention_mask"),
                     tf.TensorSpec([None, vision.num_channels, height, width], tf.float32, name="pixel_values")]

        def serve(input_ids, attention_mask, pixel_values):
            out = self(input_ids, pixel_values, attention_mask=attention_mask, output_segmentation=segmentation,
                       interpolate_pos_encoding=interpolate)
            result = {"logits_per_image": out.logits_per_image, "logits_per_text": out.logits_per_text,
                      "text_embeds": out.text_embeds, "image_embeds": out.image_embeds}
            if segmentation:
                result["segmentation_logits"] = out.segmentation_logits
            return result

        return serve, signature


# ----------------------------------------------------------------------------------------------------------
# Helpers: layers, input checks, initialisation
# ----------------------------------------------------------------------------------------------------------


def _grouping(soft_maps: Tuple[tf.Tensor, ...], height: int, width: int) -> tf.Tensor:
    """Product of the soft maps in stage order, resized bilinearly to the input: (images, groups, height * width).

    Without gradient, as the reference's get_grouping_from_attentions (torch.no_grad).
    """
    # (images, groups_1, tokens) -> (images, tokens, groups_1) -> ... -> (images, tokens, groups_k)
    grouping = tf.transpose(soft_maps[0], [0, 2, 1])
    for soft in soft_maps[1:]:
        grouping = tf.matmul(grouping, tf.transpose(soft, [0, 2, 1]))
    images = tf.shape(grouping)[0]
    tokens, groups = grouping.shape[1], grouping.shape[2]
    rows, cols = attention_grid(height, width, tokens)
    # (images, groups, rows, cols)
    grid = tf.reshape(tf.transpose(grouping, [0, 2, 1]), [images, groups, rows, cols])
    row_matrix = tf.constant(bilinear_matrix(rows, height), tf.float32)  # (height, rows)
    col_matrix = tf.constant(bilinear_matrix(cols, width), tf.float32)  # (width, cols)
    # (height, rows) @ (images, groups, rows, cols) @ (cols, width) -> (images, groups, height, width)
    resized = tf.matmul(tf.einsum("hy,bgyx->bghx", row_matrix, grid), col_matrix, transpose_b=True)
    return tf.stop_gradient(tf.reshape(resized, [images, groups, height * width]))


class _BatchNorm1d(keras.layers.BatchNormalization):
    """torch.nn.BatchNorm1d in Keras: the same training arithmetic and a ``num_batches_tracked`` counter.

    Keras' BatchNormalization updates its moving variance with the biased batch variance; torch uses the
    unbiased one. This layer normalises with the biased variance and updates the running statistics with the
    unbiased one (momentum 0.9 in Keras' convention == torch's 0.1), as torch does, and counts training batches
    in an int64 variable, so that the canonical state is complete and training matches PyTorch.
    """

    def __init__(self, size: int, **kwargs: Any) -> None:
        super().__init__(axis=-1, momentum=BATCH_NORM_MOMENTUM, epsilon=BATCH_NORM_EPS, **kwargs)
        self.build((None, size))

    def build(self, input_shape):
        super().build(input_shape)
        self.num_batches_tracked = self.add_weight(shape=(), dtype="int64", initializer="zeros", trainable=False,
                                                   name="num_batches_tracked", autocast=False)

    def call(self, inputs, training=None, mask=None):
        if not training:
            return tf.nn.batch_normalization(inputs, self.moving_mean, self.moving_variance, self.beta, self.gamma,
                                             self.epsilon)
        batch = inputs.shape[0]
        checks = []
        if batch is not None and batch < 2:
            raise ValueError(f"BatchNorm1d in training needs more than 1 value per channel, got a batch of {batch}")
        if batch is None:
            checks.append(tf.debugging.assert_greater(
                tf.shape(inputs)[0], 1, message="BatchNorm1d in training needs more than 1 value per channel"))
        with tf.control_dependencies(checks):
            mean, variance = tf.nn.moments(inputs, axes=[0])  # biased, used to normalise
        count = tf.cast(tf.shape(inputs)[0], inputs.dtype)
        unbiased = variance * count / (count - 1.0)
        momentum = self.momentum
        self.moving_mean.assign(self.moving_mean * momentum + mean * (1.0 - momentum))
        self.moving_variance.assign(self.moving_variance * momentum + unbiased * (1.0 - momentum))
        self.num_batches_tracked.assign_add(tf.constant(1, tf.int64))
        return tf.nn.batch_normalization(inputs, mean, variance, self.beta, self.gamma, self.epsilon)


def _projection(in_features: int, intermediate: int, out_features: int, name: str) -> list:
    """The reference's projection head; canonical names .0 (Linear), .1 (BatchNorm1d), .2 (ReLU), .3 (Linear)."""
    return [
        _dense(in_features, intermediate, f"{name}.0"),
        _BatchNorm1d(intermediate, name=f"{name}.1"),
        keras.layers.ReLU(name=f"{name}.2"),
        _dense(intermediate, out_features, f"{name}.3"),
    ]


def _dense(in_features: int, out_features: int, name: str) -> keras.layers.Dense:
    # Constant initialisers: _init_tower draws the reference's distributions (skipped by from_pretrained).
    layer = keras.layers.Dense(out_features, kernel_initializer="zeros", bias_initializer="zeros", name=name)
    layer.build((None, in_features))
    return layer


def _linear(states: tf.Tensor, kernel, bias, residual: Optional[tf.Tensor] = None, activation=None) -> tf.Tensor:
    """``residual + activation(states @ kernel + bias)`` over the last axis, as one 2-D MatMul + BiasAdd followed
    by the activation on the 2-D result (the pattern TensorFlow's graph optimizer fuses into one oneDNN kernel),
    then reshaped back."""
    units = kernel.shape[-1]
    flat = tf.reshape(states, [-1, states.shape[-1]])  # (tokens, in_features)
    out = tf.nn.bias_add(tf.matmul(flat, kernel), bias)
    if activation is not None:
        out = activation(out)
    # (tokens, units) -> (..., units), keeping the static sizes that are known
    dynamic = tf.shape(states)
    shape = [size if size is not None else dynamic[i] for i, size in enumerate(states.shape[:-1])] + [units]
    out = tf.reshape(out, shape)
    return out if residual is None else residual + out


def _layer_norm(size: int, eps: float, name: str) -> keras.layers.LayerNormalization:
    layer = keras.layers.LayerNormalization(axis=-1, epsilon=eps, name=name)
    layer.build((None, size))
    return layer


# The encoder layers' LayerNorms in traced inference graphs on a oneDNN CPU build run as one kernel: written as a
# FusedBatchNormV3 in training mode over a (1, rows, features, 1) NCHW view (every row its own "channel", so its
# batch statistics are the row's mean and biased variance), followed by the affine map, the pattern TensorFlow's
# graph optimizer (grappler's remapper) rewrites into _MklLayerNorm when the row count is only known at run time
# (as in the models' traced functions, whose batch is dynamic; with static sizes it stays a FusedBatchNormV3, as
# fast as Keras'). Keras' LayerNormalization makes eight passes over the tensor there. In a traced function, 2 CPU
# threads: (64, 20, 256) 1.3-1.7 -> 0.6-0.9 ms, (16, 260, 384) 3.3 -> 1.2 ms; against float64 at least as accurate
# as Keras' (0.4-0.8x its error, inputs shifted by up to 1e4).
# In the model, A/B in one process (default size, 2 CPU threads, two runs): text features 0.88-0.90x, image
# features of 16 images 0.94-0.945x, the full forward 0.93-0.96x. Only before the layers' GEMMs: the remapper does
# not check that the added "beta" is a vector, so where the arithmetic optimizer folded a following addition into
# it (the vision embeddings' LayerNorm + position embeddings) it built a kernel that fails. Without oneDNN
# (TF_ENABLE_ONEDNN_OPTS=0) nothing fuses and the batch-norm form is slower than Keras' (2.5-3.4 vs 1.5 ms), and
# with a GPU it is unmeasured: both keep Keras' layer, as do eager calls and training. (A SavedModel exported on a
# oneDNN CPU keeps the form; served without oneDNN it gives the same numbers, more slowly.)
_FUSED_LAYER_NORM: Optional[bool] = None  # decided on first use: oneDNN on and no GPU


def _fused_layer_norm_available() -> bool:
    global _FUSED_LAYER_NORM
    if _FUSED_LAYER_NORM is None:
        try:
            from tensorflow.python.util import _pywrap_util_port  # TensorFlow's own test for its oneDNN build

            onednn = bool(_pywrap_util_port.IsMklEnabled())
        except (ImportError, AttributeError):
            onednn = False
        _FUSED_LAYER_NORM = onednn and not tf.config.list_logical_devices("GPU")
    return _FUSED_LAYER_NORM


def _pre_norm(layer: keras.layers.LayerNormalization, states: tf.Tensor, training: bool) -> tf.Tensor:
    """``layer(states)`` for the LayerNorm before an encoder layer's attention or MLP (see above)."""
    if (training or tf.executing_eagerly() or states.dtype != tf.float32 or states.shape[-1] is None
            or not _fused_layer_norm_available()):
        return layer(states)
    shape = tf.shape(states)
    rows = tf.reduce_prod(shape[:-1], keepdims=True)
    empty = tf.zeros([0], tf.float32)
    normed = tf.raw_ops.FusedBatchNormV3(
        x=tf.reshape(states, tf.concat([[1], rows, [states.shape[-1], 1]], axis=0)), scale=tf.fill(rows, 1.0),
        offset=tf.fill(rows, 0.0), mean=empty, variance=empty, epsilon=layer.epsilon, data_format="NCHW",
        is_training=True)[0]
    return layer.beta + tf.reshape(normed, shape) * layer.gamma


def _l2_normalize(x: tf.Tensor) -> tf.Tensor:
    # x / ||x||, as the reference (no epsilon).
    return x / tf.norm(x, axis=-1, keepdims=True)


def _run_sequence(layers, x: tf.Tensor, training: bool) -> tf.Tensor:
    for layer in layers:
        x = layer(x, training=training)
    return x


def _runs_as_graph(model: keras.Model, training: Any) -> bool:
    """Eager inference calls run as cached ``tf.function``s, unless ``model.run_eagerly`` (Keras' switch)."""
    return tf.executing_eagerly() and not training and not model.run_eagerly


def _graph_call(model: keras.Model, name: str, method, tensors: Sequence[Optional[tf.Tensor]],
                flags: Dict[str, Any]):
    """``method(*tensors, **flags)`` through a ``tf.function`` cached on the model.

    One function per method, flags, pattern of absent (None) tensors and input dtypes/static sizes; its input
    signature leaves the batch and the text length dynamic (image height and width are static), so new batch
    sizes and text lengths do not retrace. The first call of each kind runs eagerly (tracing takes seconds at
    the default size, several eager calls' worth: a one-off call, such as loading a model to segment one image,
    would only pay for it); the second traces and later ones reuse the graph. Compiled with XLA when
    ``model.jit_compile`` (Keras' setting: its "auto" means XLA on GPU only).
    """
    absent = tuple(tensor is None for tensor in tensors)
    given = [tensor for tensor in tensors if tensor is not None]
    specs = [tf.TensorSpec([None] * tensor.shape.rank if tensor.shape.rank != 4 else [None] + tensor.shape[1:],
                           tensor.dtype) for tensor in given]
    jit_compile = bool(model.jit_compile)
    key = (name, tuple(sorted(flags.items())), absent, tuple((spec.dtype.name, tuple(spec.shape)) for spec in specs),
           jit_compile)
    functions = model.__dict__.get("_graph_functions")
    if functions is None:  # a plain attribute, outside Keras' tracking and serialisation
        functions = {}
        object.__setattr__(model, "_graph_functions", functions)
    function = functions.get(key)
    if key not in functions and not jit_compile:  # first call of this kind: eager, remembered as None
        functions[key] = None
        return method(*tensors, **flags)
    if function is None:
        def run(*arguments):
            remaining = iter(arguments)
            return method(*(None if missing else next(remaining) for missing in absent), **flags)

        function = functions[key] = tf.function(run, input_signature=specs, jit_compile=jit_compile)
    return function(*given)


def _check_config(config: object, expected: type) -> None:
    if not isinstance(config, expected):
        raise TypeError(f"expected a {expected.__name__}, got {type(config).__name__}")


def _normal(variable: keras.Variable, std: float) -> None:
    variable.assign(keras.random.normal(tuple(variable.shape), stddev=std, dtype=variable.dtype))


def _init_tower(node: Any, config: Union[GroupViTTextConfig, GroupViTVisionConfig], initializer_range: float,
                factor: float) -> None:
    """The reference's _init_weights, applied children first as transformers' post_init does.

    Position table, group tokens and BatchNorm keep their construction values (zeros; torch defaults).
    """
    if node is None:
        return
    if isinstance(node, (list, tuple)):
        for child in node:
            _init_tower(child, config, initializer_range, factor)
        return
    for attr in getattr(node, "_canonical_attrs", ()):
        _init_tower(getattr(node, attr), config, initializer_range, factor)
    layers_std = (2 * config.num_hidden_layers) ** -0.5
    if isinstance(node, (keras.layers.Dense, keras.layers.Conv2D)):
        _normal(node.kernel, initializer_range)
        node.bias.assign(tf.zeros_like(node.bias))
    elif isinstance(node, keras.layers.LayerNormalization):
        node.gamma.assign(tf.ones_like(node.gamma))
        node.beta.assign(tf.zeros_like(node.beta))
    if isinstance(node, TFGroupViTTextEmbeddings):
        _normal(node.token_embedding.embeddings, factor * 0.02)
        _normal(node.position_embedding.embeddings, factor * 0.02)
    elif isinstance(node, TFGroupViTAttention):
        hidden = node.q_proj.kernel.shape[0]
        for proj in (node.q_proj, node.k_proj, node.v_proj):
            _normal(proj.kernel, hidden ** -0.5 * layers_std * factor)
        _normal(node.out_proj.kernel, hidden ** -0.5 * factor)
    elif isinstance(node, TFGroupViTMLP):
        # The reference reads the tower's hidden size here, also for the token-axis MLPs.
        _normal(node.fc1.kernel, (2 * config.hidden_size) ** -0.5 * factor)
        _normal(node.fc2.kernel, config.hidden_size ** -0.5 * layers_std * factor)


def _is_tensor(value: Any) -> bool:
    return isinstance(value, (tf.Tensor, tf.Variable)) or tf.is_tensor(value)


def _to_tensor(value: Any, name: str, kinds: str, what: str) -> Optional[tf.Tensor]:
    """A tensor from a tensor, array or nested list whose dtype kind is in ``kinds``; else ValueError."""
    if value is None:
        return None
    if _is_tensor(value):
        tensor = tf.convert_to_tensor(value)
        dtype = tensor.dtype
        kind = "b" if dtype == tf.bool else "f" if dtype.is_floating else "i" if dtype.is_integer else "?"
    else:
        try:
            array = np.asarray(value)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{name} must be a tensor or an array, got {type(value).__name__}: {err}") from None
        kind = "i" if array.dtype.kind in "iu" else array.dtype.kind
        tensor = None
    if kind not in kinds:
        shown = tensor.dtype.name if tensor is not None else array.dtype
        raise ValueError(f"{name} must hold {what}, got dtype {shown}")
    return tensor if tensor is not None else tf.convert_to_tensor(array)


def _text_inputs(input_ids: Any, attention_mask: Any, position_ids: Any
                 ) -> Tuple[tf.Tensor, Optional[tf.Tensor], Optional[tf.Tensor]]:
    """(input_ids, attention_mask, position_ids) as tensors; shapes are checked by the text transformer."""
    if input_ids is None:
        raise ValueError("input_ids is required")
    ids = _to_tensor(input_ids, "input_ids", "i", "integer token ids")
    mask = _to_tensor(attention_mask, "attention_mask", "bif", "0/1 values")
    positions = _to_tensor(position_ids, "position_ids", "i", "integer positions")
    ids = _as_index_dtype(ids, "input_ids")
    positions = _as_index_dtype(positions, "position_ids")
    if positions is not None and positions.shape.rank == 1:
        positions = positions[None, :]
    return ids, mask, positions


_GATHER_INDEX_DTYPES = (tf.int16, tf.int32, tf.int64)


def _as_index_dtype(values: Optional[tf.Tensor], name: str) -> Optional[tf.Tensor]:
    """Integer ids of a dtype tf.gather rejects (int8, uint8..uint64) as int64, as groupvit_pt accepts them.

    uint64 values above the int64 maximum would wrap to negative numbers; eagerly they are a ValueError here,
    in a graph the range assertions reject the wrapped (negative) values."""
    if values is None or values.dtype in _GATHER_INDEX_DTYPES:
        return values
    if values.dtype == tf.uint64 and tf.executing_eagerly():
        array = values.numpy()
        if array.size and int(array.max()) > np.iinfo(np.int64).max:
            raise ValueError(f"{name} holds {int(array.max())}, which is not a valid index (above the int64 maximum)")
    return tf.cast(values, tf.int64)


def _as_pixel_values(pixel_values: Any) -> tf.Tensor:
    if pixel_values is None:
        raise ValueError("pixel_values is required")
    pixels = _to_tensor(pixel_values, "pixel_values", "if", "real numbers")
    return pixels if pixels.dtype == tf.float32 else tf.cast(pixels, tf.float32)


def _check_values_in_range(values: tf.Tensor, upper: int, name: str, bound: str) -> List[tf.Operation]:
    """Eagerly: ValueError for a value outside [0, upper). In a graph: assertions that raise
    InvalidArgumentError when run (to be run before the lookup; XLA ignores them, see _poison_out_of_range)."""
    if tf.executing_eagerly():
        array = values.numpy()
        if array.size:
            low, high = int(array.min()), int(array.max())
            if low < 0 or high >= upper:
                bad = low if low < 0 else high
                raise ValueError(f"{name} holds {bad}, outside [0, {upper}) ({bound} is {upper})")
        return []
    return [
        tf.debugging.assert_non_negative(values, message=f"{name} must be non-negative"),
        tf.debugging.assert_less(values, tf.constant(upper, values.dtype),
                                 message=f"{name} outside [0, {upper}) ({bound} is {upper})"),
    ]


def _register_outputs_with_keras_tree() -> None:
    """Let Keras' own structure utilities (predict, evaluate, fit) see through the output mappings.

    tf.nest already treats them as mappings; Keras 3's optree namespace would otherwise take them for leaves.
    """
    try:
        import optree
    except ImportError:  # pragma: no cover - Keras then falls back to dm-tree, which handles mappings
        return
    for output_class in (BaseModelOutputWithPooling, GroupViTModelOutput):
        try:
            optree.register_pytree_node(
                output_class,
                lambda output: (tuple(output.values()), tuple(output.keys()), tuple(output.keys())),
                lambda keys, values, output_class=output_class: output_class(zip(keys, values)),
                namespace="keras",
            )
        except ValueError:  # already registered (module reloaded)
            pass


_register_outputs_with_keras_tree()


def _poison_out_of_range(embeddings: tf.Tensor, ids: tf.Tensor, upper: int) -> tf.Tensor:
    # XLA drops assertions and clamps gathers: make out-of-range ids visible as NaN instead of a clamped row.
    valid = tf.logical_and(ids >= 0, ids < upper)[..., None]
    return tf.where(valid, embeddings, tf.constant(np.nan, embeddings.dtype))
