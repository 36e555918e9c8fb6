"""PyTorch backend of zero-shot segmentation: a GroupViTModel behind numpy in / numpy out.

Twin of groupvit_tf/segmentation.py. Everything else of the NVlabs protocol (prompts, windows, hard grouping, the
class rule, background) is framework-free and lives in groupvit_core.segmentation, which calls the three
methods here.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Optional, Union

import numpy as np
import torch

from .modeling import GroupViTModel


class SegmentationBackend:
    """Wraps a GroupViTModel (eval mode) for ``groupvit_core.segmentation.ZeroShotSegmenter``.

    encode_text(input_ids, attention_mask) -> (N, D) float32, L2-normalised text_projection(pooled text).
    encode_image(pixel_values (B, 3, h, w) float32) -> dict of numpy: group_embeds (B, G, D) L2-normalised
    projections of the final group tokens, image_embeds (B, D) L2-normalised projection of their mean,
    assignments [(B, G_i, N_i) soft maps per grouping stage], grid (h / patch, w / patch). The position table is
    interpolated whenever (h, w) differs from the config's image_size. logit_scale: exp of the parameter.
    """

    def __init__(self, model: GroupViTModel, device: Union[None, str, torch.device] = None) -> None:
        if not isinstance(model, GroupViTModel):
            raise TypeError(f"SegmentationBackend wraps a GroupViTModel, got {type(model).__name__}")
        if device is not None:
            model = model.to(device)
        self.model = model.eval()
        self.config = model.config
        self.patch_size = model.config.vision_config.patch_size
        self.image_size = model.config.vision_config.image_size
        self.max_text_length = model.config.text_config.max_position_embeddings
        self.logit_scale = float(np.exp(model.logit_scale.detach().cpu().numpy()))

    @classmethod
    def from_pretrained(cls, path: Union[str, os.PathLike], device: Union[None, str, torch.device] = None,
                        ) -> "SegmentationBackend":
        """Load a checkpoint directory; ``device`` defaults to CUDA when available, else the CPU."""
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        return cls(GroupViTModel.from_pretrained(path), device)

    def encode_text(self, input_ids: np.ndarray, attention_mask: Optional[np.ndarray] = None) -> np.ndarray:
        device = self.model.logit_scale.device
        with torch.inference_mode():
            ids = torch.as_tensor(np.asarray(input_ids, dtype=np.int64), device=device)
            mask = None if attention_mask is None else torch.as_tensor(np.asarray(attention_mask, np.int64),
                                                                        device=device)
            text_embeds = self.model.get_text_features(ids, attention_mask=mask)
            text_embeds = text_embeds / text_embeds.norm(dim=-1, keepdim=True)
            return text_embeds.float().cpu().numpy()

    def encode_image(self, pixel_values: np.ndarray) -> Dict[str, Any]:
        pixel_values = np.asarray(pixel_values, dtype=np.float32)
        if pixel_values.ndim != 4:
            raise ValueError(f"pixel_values must be (batch, 3, height, width), got shape {pixel_values.shape}")
        height, width = pixel_values.shape[2:]
        interpolate = (height, width) != (self.image_size, self.image_size)
        device = self.model.logit_scale.device
        with torch.inference_mode():
            pixels = torch.as_tensor(pixel_values, device=device)
            outputs = self.model.vision_model(pixels, output_attentions=True, interpolate_pos_encoding=interpolate)
            group_tokens = outputs.last_hidden_state
            images, groups, hidden = group_tokens.shape
            # Groups and the pooled tokens through the projection head at once (eval BatchNorm is per sample):
            # (images * groups + images, hidden)
            tokens = torch.cat([group_tokens.reshape(images * groups, hidden), outputs.pooler_output], dim=0)
            embeds = self.model.visual_projection(tokens)
            embeds = embeds / embeds.norm(dim=-1, keepdim=True)
            group_embeds = embeds[: images * groups].reshape(images, groups, -1)
            image_embeds = embeds[images * groups:]
            assignments = [soft.float().cpu().numpy() for soft in (outputs.attentions or ())]
            return dict(group_embeds=group_embeds.float().cpu().numpy(),
                        image_embeds=image_embeds.float().cpu().numpy(), assignments=assignments,
                        grid=(height // self.patch_size, width // self.patch_size))
