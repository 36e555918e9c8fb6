"""TensorFlow backend of zero-shot segmentation: a TFGroupViTModel behind numpy in / numpy out.

Twin of groupvit_pt/segmentation.py. Everything else of the NVlabs protocol (prompts, windows, hard grouping, the
class rule, background) is framework-free and lives in groupvit_core.segmentation, which calls the three
methods here. The image pass follows the model's graph policy (``groupvit_tf.modeling._graph_call``): the first
call of each spatial size runs eagerly, the second traces a ``tf.function`` (static height and width, dynamic
batch, so a smaller last batch does not trace again) that later calls reuse. Segmenting one image thus costs one
eager pass (~0.4 s at the default size on 2 CPU cores) instead of a trace (~3 s).
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Dict, Optional, Union

import numpy as np
import tensorflow as tf

from .modeling import TFGroupViTModel, _graph_call, _runs_as_graph


_IMAGE_PASS = "segmentation_image_pass"  # the name of the image pass among the model's cached graph functions


class SegmentationBackend:
    """Wraps a TFGroupViTModel (inference) for ``groupvit_core.segmentation.ZeroShotSegmenter``.

    encode_text(input_ids, attention_mask) -> (N, D) float32, L2-normalised text_projection(pooled text).
    encode_image(pixel_values (B, 3, h, w) float32) -> dict of numpy: group_embeds (B, G, D) L2-normalised
    projections of the final group tokens, image_embeds (B, D) L2-normalised projection of their mean,
    assignments [(B, G_i, N_i) soft maps per grouping stage], grid (h / patch, w / patch). The position table is
    interpolated whenever (h, w) differs from the config's image_size. logit_scale: exp of the parameter.
    """

    def __init__(self, model: TFGroupViTModel, device: Optional[str] = None) -> None:
        if not isinstance(model, TFGroupViTModel):
            raise TypeError(f"SegmentationBackend wraps a TFGroupViTModel, got {type(model).__name__}")
        self._device = device
        self.model = model
        self.config = model.config
        self.patch_size = model.config.vision_config.patch_size
        self.image_size = model.config.vision_config.image_size
        self.max_text_length = model.config.text_config.max_position_embeddings
        self.logit_scale = float(np.exp(np.asarray(model.logit_scale.numpy()).reshape(())))

    @classmethod
    def from_pretrained(cls, path: Union[str, os.PathLike], device: Optional[str] = None,
                        ) -> "SegmentationBackend":
        """Load a checkpoint directory; ``device`` (e.g. "/GPU:0") defaults to TensorFlow's placement."""
        return cls(TFGroupViTModel.from_pretrained(path), device)

    def encode_text(self, input_ids: np.ndarray, attention_mask: Optional[np.ndarray] = None) -> np.ndarray:
        with tf.device(self._device) if self._device else contextlib.nullcontext():
            ids = tf.convert_to_tensor(np.asarray(input_ids, dtype=np.int64))
            mask = None if attention_mask is None else tf.convert_to_tensor(np.asarray(attention_mask, np.int64))
            text_embeds = self.model.get_text_features(ids, attention_mask=mask, training=False)
            text_embeds = tf.math.l2_normalize(text_embeds, axis=-1, epsilon=1e-24)
            return text_embeds.numpy().astype(np.float32)

    def encode_image(self, pixel_values: np.ndarray) -> Dict[str, Any]:
        pixel_values = np.asarray(pixel_values, dtype=np.float32)
        if pixel_values.ndim != 4:
            raise ValueError(f"pixel_values must be (batch, 3, height, width), got shape {pixel_values.shape}")
        height, width = pixel_values.shape[2:]
        with tf.device(self._device) if self._device else contextlib.nullcontext():
            pixels = tf.convert_to_tensor(pixel_values)
            if _runs_as_graph(self.model, False):
                outputs = _graph_call(self.model, _IMAGE_PASS, self._image_pass, (pixels,), {})
            else:
                outputs = self._image_pass(pixels)
            group_embeds, image_embeds, assignments = outputs
            return dict(group_embeds=group_embeds.numpy(), image_embeds=image_embeds.numpy(),
                        assignments=[soft.numpy() for soft in assignments],
                        grid=(height // self.patch_size, width // self.patch_size))

    def _image_pass(self, pixels: tf.Tensor):
        # Depends on the model only: the function _graph_call caches on the model serves every backend of it.
        height, width = pixels.shape[2], pixels.shape[3]
        interpolate = (height, width) != (self.image_size, self.image_size)
        outputs = self.model.vision_model(pixels, output_attentions=True, interpolate_pos_encoding=interpolate,
                                          training=False)
        group_tokens = outputs.last_hidden_state
        images, groups, hidden = tf.shape(group_tokens)[0], group_tokens.shape[1], group_tokens.shape[2]
        # Groups and the pooled tokens through the projection head at once (inference BatchNorm is per sample):
        # (images * groups + images, hidden)
        tokens = tf.concat([tf.reshape(group_tokens, [-1, hidden]), outputs.pooler_output], axis=0)
        embeds = tokens
        for layer in self.model.visual_projection:
            embeds = layer(embeds, training=False)
        embeds = embeds / tf.norm(embeds, axis=-1, keepdims=True)
        group_embeds = tf.reshape(embeds[: images * groups], [images, groups, -1])
        image_embeds = embeds[images * groups:]
        return group_embeds, image_embeds, tuple(outputs.attentions or ())
