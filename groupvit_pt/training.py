"""Training GroupViT from images and captions in PyTorch, and measuring the segmentation that emerges.

Losses (all text supervision; masks are never seen):

- ``contrastive``: the image-text contrastive loss on whole captions (mean of the two cross-entropies).
- ``multilabel``: the paper's multi-label contrastive loss. The entities of each caption (parsed by
  ``groupvit_core.losses.parse_entities``) are put into prompt templates, one prompt per class of the vocabulary
  with a template drawn per step; each image is contrasted against every prompt with soft targets (its entities,
  evenly), and each prompt present in the batch against every image (the images naming it, evenly).
- ``group``: a group-level multiple-instance term (an addition to the paper's recipe, still text-only): every
  final group's embedding is classified against the class prompts; each entity of the caption must be the
  best class of some group (coverage: -log max_g p(entity | g)) and each group must name an entity of its
  caption (purity: -log sum_{e in caption} p(e | g)).
- ``affinity`` (optional, ``TrainConfig.affinity_weight``): a label-free grouping prior from the image's own
  pixels: neighbouring patches of similar colour (``groupvit_core.losses.patch_affinities``) should share a group,
  patches across a colour edge should not (``affinity_loss``). Further optional terms: ``pixel`` and
  ``uniformity`` (see TrainConfig).

``Trainer`` runs AdamW with linear warm-up and cosine decay, seeded and deterministic on the CPU (batches come
from ``(seed, step)``, Gumbel noise from the trainer's own copy of torch's RNG), writes
checkpoints (``save_pretrained`` plus the optimizer and step, read back with ``torch.load(weights_only=True)``)
and resumes from them, shows a progress bar with loss and throughput, and runs data-parallel over processes
with ``torch.distributed`` (DDP; each process takes its share of every batch; the contrastive terms are computed
per process on its share).

The data is the synthetic world of ``groupvit_core.synthetic``; ``evaluate_segmentation`` measures zero-shot mIoU
on its held-out test split with the shared protocol of ``groupvit_core.segmentation`` (hard grouping, softmax
over the class prompts with the logit scale clamped at 100), with ``grouping=False`` as the ablation that
classifies every patch token instead of the groups. ``TrainConfig`` (groupvit_core.losses) is shared with
groupvit_tf.training; ``train_synthetic`` is what ``groupvit train`` and tools/train_builtin.py run.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import os
import sys
import time
from dataclasses import asdict
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from groupvit_core import losses as core_losses
from groupvit_core import synthetic
from groupvit_core.config import GroupViTConfig

from .modeling import GroupViTModel

TRAIN_STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
BEST_MODEL_DIR = "best_model"
LOGIT_SCALE_MAX = 100.0


TrainConfig = core_losses.TrainConfig


def builtin_model_config(text_hidden: int = 64, vision_hidden: int = 96, patch_size: int = 4,
                         groups: Union[int, Sequence[int]] = 8, depths: Sequence[int] = (3, 2), image_size: int = 64,
                         assign_eps: float = 1.0, vision_mlp_ratio: int = 2) -> GroupViTConfig:
    """The small architecture of the built-in model: 64 px images, patch 4, one grouping stage of 8 groups,
    a 2-layer text tower over the full CLIP vocabulary (49408 tokens) with 32 positions.

    ``groups`` as a sequence gives one grouping stage per entry, after each stage of ``depths`` but the last
    (as the paper's 64 -> 8): ``groups=(16, 8), depths=(2, 1, 1)``. ``vision_mlp_ratio``: the vision layers' MLP
    width over their hidden size."""
    depths = list(depths)
    stages = [int(groups)] if isinstance(groups, (int, np.integer)) else [int(g) for g in groups]
    if len(stages) != len(depths) - 1:
        raise ValueError(f"{len(stages)} grouping stage(s) need {len(stages) + 1} depths, got {depths}")
    return GroupViTConfig(
        text_config=dict(hidden_size=text_hidden, intermediate_size=2 * text_hidden, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=32),
        vision_config=dict(hidden_size=vision_hidden, intermediate_size=vision_mlp_ratio * vision_hidden, depths=depths,
                           num_hidden_layers=sum(depths), num_group_tokens=stages + [0],
                           num_output_groups=stages + stages[-1:], num_attention_heads=4,
                           image_size=image_size, patch_size=patch_size, assign_eps=assign_eps),
        projection_dim=64,
        projection_intermediate_dim=256,
    )


# ----------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------


class SyntheticData(synthetic.TrainingData):
    """``groupvit_core.synthetic.TrainingData`` with batches as torch tensors."""

    def batch(self, step: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
              affinity_patch: int = 0) -> Dict[str, torch.Tensor]:
        """The share of process ``rank`` of the global batch of ``step`` (the same on every run with ``seed``)."""
        arrays = self.numpy_batch(step, batch_size, seed, rank, world_size, affinity_patch)
        return {name: torch.from_numpy(value) for name, value in arrays.items()}


# ----------------------------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------------------------


def contrastive_loss(image_embeds: torch.Tensor, text_embeds: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Image-text contrastive loss on normalised embeddings: mean of the image->text and text->image CEs."""
    logits = scale * image_embeds @ text_embeds.t()
    labels = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-row cross-entropy with soft targets (rows of targets sum to 1) -> (rows,)."""
    return -(targets * F.log_softmax(logits, dim=-1)).sum(dim=-1)


def multilabel_loss(image_embeds: torch.Tensor, prompt_embeds: torch.Tensor, targets: torch.Tensor,
                    scale: torch.Tensor) -> torch.Tensor:
    """The multi-label contrastive loss: images vs. class prompts with soft targets, both directions."""
    logits = scale * image_embeds @ prompt_embeds.t()  # (images, classes)
    per_image = targets.sum(dim=1, keepdim=True)
    image_term = soft_cross_entropy(logits, targets / per_image.clamp_min(1)).mean()
    per_class = targets.sum(dim=0)
    valid = per_class > 0
    text_targets = (targets.t() / per_class.clamp_min(1)[:, None])[valid]
    text_term = soft_cross_entropy(logits.t()[valid], text_targets).mean()
    return 0.5 * (image_term + text_term)


def group_loss(group_embeds: torch.Tensor, prompt_embeds: torch.Tensor, targets: torch.Tensor,
               scale: torch.Tensor, owned: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Group-level multiple-instance loss: coverage of each caption entity by some group + purity of groups.

    ``owned`` (images, groups) bool: count only these groups (TrainConfig.group_owned_only: the groups that own
    at least one patch), so that an entity must be named by a group that holds pixels."""
    logits = scale * group_embeds @ prompt_embeds.t()  # (images, groups, classes)
    log_p = F.log_softmax(logits, dim=-1)
    present = targets > 0  # (images, classes)
    in_caption = torch.logsumexp(log_p.masked_fill(~present[:, None, :], float("-inf")), dim=-1)
    if owned is None:
        best = log_p.max(dim=1).values  # (images, classes): the best group for each class
        coverage = -(best * present).sum() / present.sum().clamp_min(1)
        return 0.5 * (coverage - in_caption.mean())
    best = log_p.masked_fill(~owned[..., None], float("-inf")).max(dim=1).values.clamp_min(-30.0)
    coverage = -(best * present).sum() / present.sum().clamp_min(1)
    purity = -(in_caption * owned).sum() / owned.sum().clamp_min(1)
    return 0.5 * (coverage + purity)


def owned_groups(soft: torch.Tensor) -> torch.Tensor:
    """(images, groups, patches) soft assignment -> (images, groups) bool: the group is some patch's argmax."""
    return F.one_hot(soft.argmax(dim=1), soft.shape[1]).amax(dim=1) > 0


def prompt_uniformity_loss(prompt_embeds: torch.Tensor, temperature: float) -> torch.Tensor:
    """log mean_{i != j} exp(t * cos(p_i, p_j)) over the class prompts (normalised embeddings), divided by t:
    a soft maximum of the pairwise similarities, so the closest pairs are pushed apart hardest."""
    count = prompt_embeds.shape[0]
    sims = prompt_embeds @ prompt_embeds.t()
    off = ~torch.eye(count, dtype=torch.bool, device=sims.device)
    return (torch.logsumexp(temperature * sims[off], dim=0) - math.log(count * (count - 1))) / temperature


def pixel_group_loss(pixel_embeds: torch.Tensor, group_embeds: torch.Tensor, prompt_embeds: torch.Tensor,
                     targets: torch.Tensor, scale: torch.Tensor, nonempty: torch.Tensor) -> torch.Tensor:
    """The group loss on what each group's pixels alone say (mean of its hard-assigned patch tokens), plus a
    consistency term pulling each group's own class distribution towards its pixels' one.

    Without it, group tokens can learn an image's entities through attention without owning their pixels;
    here the entities must be recoverable from disjoint sets of patches, so the patches have to differ by entity.
    """
    logits = scale * pixel_embeds @ prompt_embeds.t()  # (images, groups, classes)
    log_p = F.log_softmax(logits, dim=-1)
    present = targets > 0
    masked = log_p.masked_fill(~nonempty[..., None], float("-inf"))
    best = masked.max(dim=1).values
    coverage = -(best.clamp_min(-30.0) * present).sum() / present.sum().clamp_min(1)
    in_caption = torch.logsumexp(log_p.masked_fill(~present[:, None, :], float("-inf")), dim=-1)
    purity = -(in_caption * nonempty).sum() / nonempty.sum().clamp_min(1)
    group_log_p = F.log_softmax(scale * group_embeds @ prompt_embeds.t(), dim=-1)
    consistency = (soft_cross_entropy_log(group_log_p, log_p.detach().exp()) * nonempty).sum() \
        / nonempty.sum().clamp_min(1)
    return (coverage + purity + consistency) / 3


def affinity_loss(soft: torch.Tensor, weights: torch.Tensor, neighbours: torch.Tensor, valid: torch.Tensor
                  ) -> torch.Tensor:
    """Colour-affinity grouping prior over neighbouring patches n, m with agreement a = <s_n, s_m> of their soft
    assignments: attraction sum w (1 - a) / sum w plus repulsion sum e a / sum e, e = (1 - w) ** AFFINITY_EDGE_POWER
    on valid pairs. Without the repulsion one group for the whole image would cost nothing, without the attraction
    a checkerboard. ``soft`` (B, G, N): the patches' soft assignment to the final groups; ``weights`` (B, N, K):
    ``groupvit_core.losses.patch_affinities``; ``neighbours``, ``valid`` (N, K): ``patch_neighbours``."""
    batch, count, patches = soft.shape
    other = soft[:, :, neighbours.reshape(-1)].reshape(batch, count, patches, -1)
    agreement = (soft[..., None] * other).sum(dim=1)  # (B, N, K)
    edges = (1.0 - weights).clamp_min(0) ** core_losses.AFFINITY_EDGE_POWER * valid.to(weights.dtype)
    attract = (weights * (1.0 - agreement)).sum() / weights.sum().clamp_min(1e-12)
    return attract + (edges * agreement).sum() / edges.sum().clamp_min(1e-12)


def soft_cross_entropy_log(log_p: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return -(targets * log_p).sum(dim=-1)


def _assign_tokens(assign, image_tokens: torch.Tensor, group_tokens: torch.Tensor, token_dropout: float
                   ) -> Tuple[torch.Tensor, torch.Tensor]:
    """GroupViTTokenAssign.forward, with each group's own (projected) token dropped from its output with
    probability ``token_dropout`` (per image and group; the kept ones are not rescaled)."""
    if not token_dropout:
        return assign(image_tokens, group_tokens)
    group_tokens = assign.norm_tokens(group_tokens)
    image_tokens = assign.norm_x(image_tokens)
    projected = assign.norm_post_tokens(assign.mlp_inter(group_tokens))
    projected = assign.pre_assign_attn(projected, image_tokens)
    new_tokens, soft = assign.assign(projected, image_tokens)
    keep = (torch.rand(projected.shape[:2], device=projected.device) >= token_dropout).to(projected.dtype)
    new_tokens = new_tokens + projected * keep[..., None]
    new_tokens = assign.mlp_channels(assign.norm_new_x(new_tokens), residual=new_tokens)
    return new_tokens, soft


def vision_forward(model: GroupViTModel, pixel_values: torch.Tensor, token_dropout: float = 0.0
                   ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The vision tower as GroupViTVisionTransformer runs it, also returning the first grouping stage's patch
    tokens (after its layers, before grouping) and the patches' soft assignment to the final groups (the product
    of the stages' soft maps) -> (last_hidden_state (B, G, C), pooled (B, C), patches (B, N, C), soft (B, G, N)).
    ``token_dropout`` (training only): see TrainConfig.group_token_dropout."""
    vision = model.vision_model
    hidden = vision.embeddings(pixel_values)
    prev_groups = None
    patches = soft_first = None
    for stage in vision.encoder.stages:
        if stage.group_token is None:
            tokens = hidden
        else:
            group_tokens = stage.group_token.expand(hidden.shape[0], -1, -1)
            if stage.group_projector is not None:
                group_tokens = group_tokens + stage.group_projector(prev_groups)
            tokens = torch.cat([hidden, group_tokens], dim=1)
        for layer in stage.layers:
            tokens = layer(tokens)[0]
        if stage.group_token is None:
            hidden = tokens
            continue
        count = group_tokens.shape[1]
        image_tokens, group_tokens = tokens[:, :-count], tokens[:, -count:]
        if stage.downsample is not None:
            if patches is None:
                patches = image_tokens
            image_tokens, soft = _assign_tokens(stage.downsample, image_tokens, group_tokens,
                                                token_dropout if model.training else 0.0)
            soft_first = soft if soft_first is None else soft @ soft_first
        hidden, prev_groups = image_tokens, group_tokens
    last = vision.layernorm(hidden)
    return last, last.mean(dim=1), patches, soft_first


def init_model(model: GroupViTModel, config: TrainConfig) -> None:
    """Apply ``config.position_init`` and ``config.attention_init`` to a freshly built model, before training
    (``groupvit_core.losses.initial_weights``; the defaults change nothing). ``train_synthetic`` and
    ``groupvit train`` call it; with the Python API, call it before ``Trainer`` (the Trainer never re-initialises a
    model it is given)."""
    config.validate()
    weights = core_losses.initial_weights(model.config, config.position_init, config.attention_init, config.seed)
    state = model.state_dict()
    with torch.no_grad():
        for name, value in weights.items():
            state[name].copy_(torch.from_numpy(value))


def init_positions(model: GroupViTModel, kind: str) -> None:
    """Set the vision position table's initial values: "random" leaves the model's own init, "sincos" writes
    groupvit_core.losses.sincos_position_table (still trained afterwards)."""
    init_model(model, TrainConfig(position_init=kind))


def init_attention(model: GroupViTModel, kind: str, seed: int = 0) -> None:
    """Set the initial weights of the vision tower's self-attention layers: "default" leaves the model's own init,
    "mimetic" writes ``groupvit_core.losses.initial_weights``' mimetic q/k/v/out (drawn from ``seed``)."""
    init_model(model, TrainConfig(attention_init=kind, seed=seed))


def normalize(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


class TrainingModule(nn.Module):
    """GroupViTModel plus the training losses in one forward (the unit DDP wraps)."""

    def __init__(self, model: GroupViTModel, config: TrainConfig) -> None:
        super().__init__()
        self.model = model
        self.train_config = config

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, targets: torch.Tensor,
                patch_affinity: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        model, cfg = self.model, self.train_config
        groups, pooled, patches, soft = vision_forward(model, pixel_values, cfg.group_token_dropout)
        batch, count, hidden = groups.shape
        flat = [groups.reshape(batch * count, hidden), pooled]
        if cfg.pixel_weight:
            # each group's pixels alone: the mean of the patch tokens hard-assigned to it (straight-through)
            hard = F.one_hot(soft.argmax(dim=1), count).transpose(1, 2).to(soft.dtype)  # (B, G, N)
            hard = hard - soft.detach() + soft
            sizes = hard.detach().sum(dim=-1)  # (B, G)
            pixel_groups = (hard @ patches) / sizes.clamp_min(1)[..., None]
            flat.append(model.vision_model.layernorm(pixel_groups).reshape(batch * count, hidden))
        # groups and pooled tokens through one projection call, as the segmentation backend does
        projected = model.visual_projection(torch.cat(flat, dim=0))
        group_embeds = normalize(projected[: batch * count]).reshape(batch, count, -1)
        image_embeds = normalize(projected[batch * count: batch * count + batch])
        ids = torch.cat([input_ids, prompt_ids], dim=0)
        mask = torch.cat([attention_mask, prompt_mask], dim=0)
        text = normalize(model.text_projection(model.text_model(ids, attention_mask=mask).pooler_output))
        caption_embeds, prompt_embeds = text[:batch], text[batch:]
        scale = model.logit_scale.exp().clamp(max=LOGIT_SCALE_MAX)
        zero = scale.new_zeros(())
        parts = {
            "contrastive": contrastive_loss(image_embeds, caption_embeds, scale) if cfg.contrastive_weight else zero,
            "multilabel": multilabel_loss(image_embeds, prompt_embeds, targets, scale)
            if cfg.multilabel_weight else zero,
            "group": group_loss(group_embeds, prompt_embeds, targets, scale,
                                owned=owned_groups(soft) if cfg.group_owned_only else None)
            if cfg.group_weight else zero,
            "pixel": zero,
            "uniformity": prompt_uniformity_loss(prompt_embeds, cfg.prompt_uniformity_temperature)
            if cfg.prompt_uniformity_weight else zero,
            "affinity": zero,
        }
        if cfg.affinity_weight:
            if patch_affinity is None:
                raise ValueError("TrainConfig.affinity_weight needs the batch's patch_affinity (numpy_batch(..., "
                                 "affinity_patch=PATCH_SIZE))")
            patch = model.config.vision_config.patch_size
            index, valid = core_losses.patch_neighbours(pixel_values.shape[-2] // patch,
                                                        pixel_values.shape[-1] // patch)
            parts["affinity"] = affinity_loss(soft, patch_affinity, torch.from_numpy(index).to(soft.device),
                                              torch.from_numpy(valid).to(soft.device))
        if cfg.pixel_weight:
            pixel_embeds = normalize(projected[batch * count + batch:]).reshape(batch, count, -1)
            parts["pixel"] = pixel_group_loss(pixel_embeds, group_embeds, prompt_embeds, targets, scale,
                                              sizes > 0)
        parts["loss"] = (cfg.contrastive_weight * parts["contrastive"] + cfg.multilabel_weight * parts["multilabel"]
                         + cfg.group_weight * parts["group"] + cfg.pixel_weight * parts["pixel"]
                         + cfg.prompt_uniformity_weight * parts["uniformity"]
                         + cfg.affinity_weight * parts["affinity"])
        return parts


# ----------------------------------------------------------------------------------------------------------------
# Schedule, optimizer, checkpoints
# ----------------------------------------------------------------------------------------------------------------


def learning_rate(step: int, config: TrainConfig) -> float:
    """Linear warm-up to ``lr`` over ``warmup_steps``, then cosine decay to ``min_lr`` at ``steps``."""
    if config.warmup_steps and step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    progress = min(max(progress, 0.0), 1.0)
    return config.min_lr + 0.5 * (config.lr - config.min_lr) * (1 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases, norms, embeddings, group tokens and the logit scale."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim < 2 or "embedding" in name or "group_token" in name or "norm" in name:
            no_decay.append(param)
        else:
            decay.append(param)
    return torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=config.lr, betas=(0.9, 0.98),
                             eps=1e-6)


def save_checkpoint(directory: str, model: GroupViTModel, optimizer: torch.optim.Optimizer, step: int,
                    config: TrainConfig, history: List[Dict[str, float]],
                    rng_state: Optional[torch.Tensor] = None) -> None:
    """model.safetensors + config.json (save_pretrained), optimizer.pt and trainer_state.json, each atomic."""
    from groupvit_core.io_utils import atomic_path, atomic_write_text

    os.makedirs(directory, exist_ok=True)
    model.save_pretrained(directory)
    with atomic_path(os.path.join(directory, OPTIMIZER_FILE)) as tmp:
        torch.save(optimizer.state_dict(), tmp)
    state = {"step": step, "train_config": asdict(config), "history": history,
             "torch_rng": (torch.get_rng_state() if rng_state is None else rng_state).tolist()}
    atomic_write_text(os.path.join(directory, TRAIN_STATE_FILE), json.dumps(state) + "\n")


def load_checkpoint(directory: str, model: GroupViTModel, optimizer: torch.optim.Optimizer
                    ) -> Tuple[int, List[Dict[str, float]], torch.Tensor]:
    """Restore weights and optimizer from ``save_checkpoint``'s directory -> (step, history, RNG state)."""
    from groupvit_core.loading import load_pretrained

    state_path = os.path.join(directory, TRAIN_STATE_FILE)
    if not os.path.isfile(state_path):
        raise OSError(f"{directory} is not a training checkpoint (no {TRAIN_STATE_FILE})")
    with open(state_path, encoding="utf-8") as handle:
        state = json.load(handle)
    _, weights = load_pretrained(directory, GroupViTConfig)
    model.load_canonical_state(weights)
    optimizer.load_state_dict(torch.load(os.path.join(directory, OPTIMIZER_FILE), weights_only=True))
    return int(state["step"]), list(state.get("history", [])), torch.tensor(state["torch_rng"], dtype=torch.uint8)


# ----------------------------------------------------------------------------------------------------------------
# Trainer
# ----------------------------------------------------------------------------------------------------------------


def _copy_state(model: nn.Module) -> Dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def _distributed() -> Tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class Trainer:
    """Trains a GroupViTModel on the synthetic world.

    >>> trainer = Trainer(GroupViTModel(builtin_model_config()), TrainConfig(steps=2000), output_dir="run")
    >>> history = trainer.train()        # checkpoints in run/checkpoint, the final model in run/model
    >>> evaluate_segmentation(trainer.model)["miou"]

    With ``config.eval_every`` the model is measured on the validation split during training (history records
    gain "miou"); with ``config.keep_best`` the finished run's model (``trainer.model`` and run/model) is the best
    of those evaluations, also saved as it happens to run/best_model, while run/checkpoint keeps the last state.
    """

    def __init__(self, model: GroupViTModel, config: TrainConfig, output_dir: Optional[str] = None,
                 tokenizer: Any = None, data: Optional[SyntheticData] = None, resume: bool = False,
                 progress: bool = True, log: Optional[Callable[[str], None]] = None,
                 device: Optional[str] = None) -> None:
        from groupvit_core.tokenizer import GroupViTTokenizer

        config.validate()
        model_size = model.config.vision_config.image_size
        if model_size != config.image_size:
            raise ValueError(f"the model's image_size {model_size} differs from TrainConfig.image_size "
                             f"{config.image_size} (the size of the training scenes): build the model at that size "
                             "or set TrainConfig(image_size=...) to the model's")
        self.config = config
        self.rank, self.world_size = _distributed()
        if config.batch_size % self.world_size:
            raise ValueError(f"batch_size {config.batch_size} is not divisible by {self.world_size} processes")
        # The trainer keeps its own copy of torch's CPU RNG (Gumbel noise), so that two trainers in one
        # process do not draw from each other's stream and a checkpoint restores it exactly.
        self.rng_state = torch.Generator().manual_seed(config.seed).get_state()
        self.device = torch.device(device or "cpu")
        self.model = model.to(self.device)
        self.model.set_gumbel(config.gumbel)
        self.tokenizer = tokenizer or GroupViTTokenizer.from_pretrained(_empty_dir())
        self.data = data or SyntheticData(self.tokenizer, config.pool_size, config.image_size, config.max_objects,
                                          config.max_text_length, config.preset)
        # the affinity term's colour affinities are computed per batch from the scenes at the model's patch size
        self.affinity_patch = model.config.vision_config.patch_size if config.affinity_weight else 0
        self.module: nn.Module = TrainingModule(model, config)
        if self.world_size > 1:
            self.module = nn.parallel.DistributedDataParallel(self.module)
        self.optimizer = build_optimizer(model, config)
        self.output_dir = output_dir
        self.progress = progress and self.rank == 0
        self.log = log or (lambda line: print(line, file=sys.stderr))
        self.step = 0
        self.history: List[Dict[str, float]] = []
        # keep_best: (step, validation mIoU, a copy of the weights) of the best evaluation so far
        self.best: Optional[Tuple[int, float, Dict[str, torch.Tensor]]] = None
        if resume:
            if output_dir is None:
                raise ValueError("resume needs an output_dir holding a checkpoint")
            path = os.path.join(output_dir, "checkpoint")
            if os.path.isfile(os.path.join(path, TRAIN_STATE_FILE)):
                self.step, self.history, self.rng_state = load_checkpoint(path, model, self.optimizer)
                self.log(f"resumed from {path} at step {self.step}")
                self._restore_best()

    def _restore_best(self) -> None:
        """After a resume: the best evaluation from the history, its weights from OUTPUT/best_model."""
        path = os.path.join(self.output_dir, BEST_MODEL_DIR)
        scored = [(record["miou"], int(record["step"])) for record in self.history if "miou" in record]
        if not (self.config.keep_best and scored and os.path.isfile(os.path.join(path, "config.json"))):
            return
        from groupvit_core.loading import load_pretrained

        miou, step = max(scored, key=lambda item: (item[0], -item[1]))
        current = _copy_state(self.model)
        _, weights = load_pretrained(path, GroupViTConfig)
        self.model.load_canonical_state(weights)
        self.best = (step, float(miou), _copy_state(self.model))
        self.model.load_state_dict(current)

    def _evaluate(self, record: Dict[str, float], on_eval: Optional[Callable[[int, Dict[str, Any]], None]]) -> None:
        cfg = self.config
        result = evaluate_segmentation(self.model, count=cfg.eval_count, tokenizer=self.tokenizer,
                                       preset=cfg.preset, image_size=cfg.image_size, split="val")
        record["miou"] = result["miou"]
        line = f"step {self.step}: loss {record['loss']:.4f} mIoU {result['miou']:.4f}"
        if cfg.keep_best and (self.best is None or result["miou"] > self.best[1]):
            self.best = (self.step, result["miou"], _copy_state(self.model))
            if self.output_dir:
                self.model.save_pretrained(os.path.join(self.output_dir, BEST_MODEL_DIR))
            line += " (best so far)"
        self.log(line)
        if on_eval:
            on_eval(self.step, result)

    def train_step(self, batch: Dict[str, torch.Tensor]) -> Dict[str, float]:
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(self.step, self.config)
        self.module.train()
        outer = torch.get_rng_state()
        torch.set_rng_state(self.rng_state)
        try:
            parts = self.module(**batch)
            self.optimizer.zero_grad(set_to_none=True)
            parts["loss"].backward()
        finally:
            self.rng_state = torch.get_rng_state()
            torch.set_rng_state(outer)
        if self.config.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.optimizer.step()
        with torch.no_grad():
            self.model.logit_scale.clamp_(max=math.log(LOGIT_SCALE_MAX))
        self.step += 1
        return {name: float(value.detach()) for name, value in parts.items()}

    def train(self, steps: Optional[int] = None,
              on_eval: Optional[Callable[[int, Dict[str, Any]], None]] = None) -> List[Dict[str, float]]:
        """Run until ``steps`` (default config.steps); returns the per-step loss history (this run's part)."""
        from tqdm import tqdm

        cfg = self.config
        end = cfg.steps if steps is None else min(steps, cfg.steps)
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not self.progress, file=sys.stderr,
                   dynamic_ncols=True, desc="train")
        start_time, start_step = time.perf_counter(), self.step
        while self.step < end:
            batch = self.data.batch(self.step, cfg.batch_size, cfg.seed, self.rank, self.world_size,
                                    self.affinity_patch)
            batch = {name: value.to(self.device, non_blocking=True) for name, value in batch.items()}
            record = self.train_step(batch)
            record["step"] = self.step
            record["lr"] = learning_rate(self.step - 1, cfg)
            self.history.append(record)
            elapsed = time.perf_counter() - start_time
            throughput = (self.step - start_step) * cfg.batch_size / max(elapsed, 1e-9)
            bar.set_postfix(loss=f"{record['loss']:.3f}", img_s=f"{throughput:.0f}", refresh=False)
            bar.update(1)
            if self.output_dir and self.rank == 0 and cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                save_checkpoint(os.path.join(self.output_dir, "checkpoint"), self.model, self.optimizer,
                                self.step, cfg, self.history, self.rng_state)
            if cfg.eval_every and self.step % cfg.eval_every == 0 and self.rank == 0:
                self._evaluate(self.history[-1], on_eval)
        bar.close()
        if self.output_dir and self.rank == 0:
            save_checkpoint(os.path.join(self.output_dir, "checkpoint"), self.model, self.optimizer, self.step,
                            cfg, self.history, self.rng_state)
        if self.step >= cfg.steps and self.best is not None and self.rank == 0:
            # the run is over: end on the best validation evaluation (the checkpoint above keeps the last state)
            self.model.load_state_dict(self.best[2])
            self.log(f"kept the weights of step {self.best[0]} (validation mIoU {self.best[1]:.4f})")
        if self.output_dir and self.rank == 0:
            self.model.save_pretrained(os.path.join(self.output_dir, "model"))
        return self.history


def _empty_dir() -> str:
    """A directory without tokenizer files: GroupViTTokenizer.from_pretrained then uses the packaged CLIP BPE."""
    import tempfile

    path = os.path.join(tempfile.gettempdir(), "groupvit_empty_tokenizer_dir")
    os.makedirs(path, exist_ok=True)
    return path


# ----------------------------------------------------------------------------------------------------------------
# Evaluation on the synthetic test split
# ----------------------------------------------------------------------------------------------------------------


class PatchBackend:
    """Ablation without grouping: the stage-0 patch tokens (before the first grouping) go through the final
    LayerNorm and the visual projection and are classified one by one (no assignment maps)."""

    def __init__(self, backend: Any) -> None:
        self.inner = backend
        self.model = backend.model
        for name in ("patch_size", "image_size", "max_text_length", "logit_scale"):
            setattr(self, name, getattr(backend, name))

    def encode_text(self, input_ids, attention_mask=None):
        return self.inner.encode_text(input_ids, attention_mask)

    def encode_image(self, pixel_values: np.ndarray) -> Dict[str, Any]:
        vision = self.model.vision_model
        height, width = pixel_values.shape[2:]
        with torch.inference_mode():
            pixels = torch.as_tensor(np.asarray(pixel_values, np.float32), device=self.model.logit_scale.device)
            hidden = vision.embeddings(pixels, interpolate_pos_encoding=(height, width) != (self.image_size,) * 2)
            stage = vision.encoder.stages[0]
            tokens = torch.cat([hidden, stage.group_token.expand(hidden.shape[0], -1, -1)], dim=1)
            for layer in stage.layers:
                tokens = layer(tokens)[0]
            patches = vision.layernorm(tokens[:, : hidden.shape[1]])
            batch, count, size = patches.shape
            flat = torch.cat([patches.reshape(batch * count, size), patches.mean(dim=1)], dim=0)
            embeds = normalize(self.model.visual_projection(flat))
            embeds = embeds.float().cpu()
        return dict(group_embeds=embeds[: batch * count].reshape(batch, count, -1).numpy(),
                    image_embeds=embeds[batch * count:].numpy(), assignments=[],
                    grid=(height // self.patch_size, width // self.patch_size))


def evaluate_segmentation(model: GroupViTModel, count: int = 200, tokenizer: Any = None, preset: str = "imagenet",
                          image_size: Optional[int] = None, grouping: bool = True, templates: Any = None,
                          split: str = "test", batch_size: int = 50, refine: bool = False) -> Dict[str, Any]:
    """Zero-shot mIoU on ``count`` held-out synthetic scenes, with ``groupvit_core.segmentation``'s protocol.

    Classes: the synthetic entities (4 grounds + 9 objects, one prompt "a photo of a {}." each); whole image at
    its own size (no 448 resize, no windows), hard grouping, top-5 classes, no background threshold (every pixel
    of the world has a name). Label 0 ("background") is never in the masks; it is absent from the mean. The
    scenes are drawn at ``image_size`` px, by default the model's own (``vision_config.image_size``). ``refine``:
    the label maps refined on the images' pixels (``ZeroShotSegmenter(refine=True)``, the built-in's setting).
    """
    from groupvit_core.datasets import SegmentationMetric
    from groupvit_core.segmentation import ZeroShotSegmenter
    from groupvit_core.tokenizer import GroupViTTokenizer

    from .segmentation import SegmentationBackend

    was_training = model.training
    backend = SegmentationBackend(model)
    if not grouping:
        backend = PatchBackend(backend)
    tokenizer = tokenizer or GroupViTTokenizer.from_pretrained(_empty_dir())
    segmenter = ZeroShotSegmenter(backend, tokenizer, preset=preset, window="whole", short_side=None,
                                  background_threshold=None, batch_size=batch_size, refine=refine)
    segmenter.set_classes(list(synthetic.ENTITY_NAMES), templates=templates)
    metric = SegmentationMetric(len(synthetic.CLASS_NAMES))
    image_size = image_size or model.config.vision_config.image_size
    scenes = list(synthetic.iter_scenes(split, count, size=image_size))
    for start in range(0, count, batch_size):
        chunk = scenes[start:start + batch_size]
        results = segmenter.segment([s.image for s in chunk])
        for scene, result in zip(chunk, results):
            metric.update(result.label_map + 1, scene.mask)  # labels 0..K-1 -> 1..K (0 = unused background)
    scores = metric.compute()
    model.train(was_training)
    iou = {name: (None if np.isnan(v) else float(v)) for name, v in zip(synthetic.CLASS_NAMES, scores["iou"])}
    return {"miou": float(scores["miou"]), "pixel_accuracy": float(scores["pixel_accuracy"]), "iou": iou,
            "count": count, "grouping": grouping, "refine": refine}


# ----------------------------------------------------------------------------------------------------------------
# The reproducing entry point (tools/train_builtin.py and `groupvit train`)
# ----------------------------------------------------------------------------------------------------------------

# "owned_tokdrop" + the colour-affinity grouping prior (TrainConfig.affinity_weight 0.3): the previous built-in's
# recipe (RESULTS_TRAINING.md, "A colour-affinity grouping prior"); "aff_mimetic" builds on it
_OWNED_AFF: Dict[str, Any] = {"prompt_uniformity_weight": 1.0, "pool_size": 40000, "steps": 2500,
                              "group_token_dropout": 0.7, "group_owned_only": True, "eval_every": 250,
                              "keep_best": True, "affinity_weight": 0.3}

# name: (architecture overrides of builtin_model_config, TrainConfig overrides). "aff_mimetic" is the built-in
# recipe (RESULTS_TRAINING.md); "owned_aff", "owned_tokdrop", "unif_pool" and "small" were the ones before it.
VARIANTS: Dict[str, Tuple[Dict[str, Any], Dict[str, Any]]] = {
    "small": ({"vision_hidden": 64, "depths": (2, 1)}, {}),
    "full": ({}, {}),
    "no_group": ({}, {"group_weight": 0.0}),
    "no_gumbel": ({}, {"gumbel": False}),
    "patch8": ({"patch_size": 8}, {}),
    "g4": ({"groups": 4}, {}),
    "g16": ({"groups": 16}, {}),
    "eps0": ({"assign_eps": 0.0}, {}),
    "lr1e3": ({}, {"lr": 1e-3}),
    "grouponly": ({}, {"contrastive_weight": 0.0, "multilabel_weight": 0.0}),
    "pixel": ({}, {"pixel_weight": 1.0}),
    "small_pixel": ({"vision_hidden": 64, "depths": (2, 1)}, {"pixel_weight": 1.0}),
    "small_pixel2": ({"vision_hidden": 64, "depths": (2, 1)}, {"pixel_weight": 2.0}),
    "small_pixel_lr1e3": ({"vision_hidden": 64, "depths": (2, 1)}, {"pixel_weight": 1.0, "lr": 1e-3}),
    "small_pixel_nogumbel": ({"vision_hidden": 64, "depths": (2, 1)}, {"pixel_weight": 1.0, "gumbel": False}),
    "small_pixel_g16": ({"vision_hidden": 64, "depths": (2, 1), "groups": 16}, {"pixel_weight": 1.0}),
    "small_pixel_nogroup": ({"vision_hidden": 64, "depths": (2, 1)}, {"pixel_weight": 1.0, "group_weight": 0.0}),
    "tiny_pixel": ({"vision_hidden": 64, "depths": (1, 1)}, {"pixel_weight": 1.0}),
    "small_tokdrop": ({"vision_hidden": 64, "depths": (2, 1)}, {"group_token_dropout": 0.5}),
    "deep_tokdrop": ({"vision_hidden": 64, "depths": (3, 1)}, {"group_token_dropout": 0.5}),
    "small_sincos": ({"vision_hidden": 64, "depths": (2, 1)}, {"position_init": "sincos"}),
    "small_unif": ({"vision_hidden": 64, "depths": (2, 1)}, {"prompt_uniformity_weight": 1.0}),
    "unif_pool": ({"vision_hidden": 64, "depths": (2, 1)},
                  {"prompt_uniformity_weight": 1.0, "pool_size": 40000, "steps": 2500}),
    "unif_pool_tokdrop": ({"vision_hidden": 64, "depths": (2, 1)},
                          {"prompt_uniformity_weight": 1.0, "pool_size": 40000, "group_token_dropout": 0.5}),
    "unif_pool_p8": ({"vision_hidden": 64, "depths": (2, 1), "patch_size": 8},
                     {"prompt_uniformity_weight": 1.0, "pool_size": 40000}),
    # "unif_pool" + group-token dropout 0.5 and early stopping on the validation split: less spread between seeds
    # (RESULTS_TRAINING.md: test mIoU 0.31-0.38 over four runs, against 0.16-0.39 for "unif_pool")
    "unif_tokdrop": ({"vision_hidden": 64, "depths": (2, 1)},
                     {"prompt_uniformity_weight": 1.0, "pool_size": 40000, "steps": 2500, "group_token_dropout": 0.5,
                      "eval_every": 250, "keep_best": True}),
    # the paper's two grouping stages (16 -> 8 groups here) on top of "unif_tokdrop"
    "unif_tokdrop_2stage": ({"vision_hidden": 64, "depths": (2, 1, 1), "groups": (16, 8)},
                            {"prompt_uniformity_weight": 1.0, "pool_size": 40000, "steps": 2500,
                             "group_token_dropout": 0.5, "eval_every": 250, "keep_best": True}),
    # "unif_tokdrop" with the group loss on pixel-owning groups only (TrainConfig.group_owned_only) and group-token
    # dropout 0.7: the previous built-in's recipe (RESULTS_TRAINING.md, "Owned groups")
    "owned_tokdrop": ({"vision_hidden": 64, "depths": (2, 1)},
                      {"prompt_uniformity_weight": 1.0, "pool_size": 40000, "steps": 2500, "group_token_dropout": 0.7,
                       "group_owned_only": True, "eval_every": 250, "keep_best": True}),
    "owned_aff": ({"vision_hidden": 64, "depths": (2, 1)}, dict(_OWNED_AFF)),
    # "owned_aff" + mimetic initialisation of the vision self-attention (TrainConfig.attention_init), twice as long
    # (5000 steps, validation every 500): the built-in's recipe (RESULTS_TRAINING.md, "Mimetic initialisation")
    "aff_mimetic": ({"vision_hidden": 64, "depths": (2, 1)},
                    {**_OWNED_AFF, "steps": 5000, "eval_every": 500, "attention_init": "mimetic"}),
    "small_unif10": ({"vision_hidden": 64, "depths": (2, 1)}, {"prompt_uniformity_weight": 1.0,
                                                                "prompt_uniformity_temperature": 10.0}),
}


@contextlib.contextmanager
def command_session(threads: Optional[int] = None) -> Iterator[None]:
    """What ``groupvit train`` sets up around a run: torch's CPU threads, and the process group when torchrun
    started this process (WORLD_SIZE > 1: nccl with CUDA, else gloo), destroyed at the end."""
    if threads:
        torch.set_num_threads(threads)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    try:
        yield
    finally:
        if distributed and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def train_synthetic(out: str, variant: str = "aff_mimetic", time_budget: Optional[float] = None,
                    eval_count: int = 200, device: Optional[str] = None, resume: bool = False, progress: bool = True,
                    evaluate: bool = True, arch: Optional[Dict[str, Any]] = None, **overrides: Any
                    ) -> Dict[str, Any]:
    """Train a recipe of ``VARIANTS`` on the synthetic world into ``out`` and measure it.

    Writes out/model (the trained model), out/checkpoint (resumable), out/log.txt and, when ``evaluate``,
    out/result.json: zero-shot mIoU on ``eval_count`` held-out test scenes with grouping, the patch-level
    ablation of the same weights and a random-weights model of the same architecture. ``time_budget`` (seconds)
    shortens the schedule to what fits, measured on the first 30 steps. ``arch`` overrides the recipe's
    arguments of builtin_model_config; ``overrides`` set TrainConfig fields.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {sorted(VARIANTS)}")
    base_arch, recipe = VARIANTS[variant]
    arch = {**base_arch, **(arch or {})}
    unknown = sorted(set(arch) - set(inspect.signature(builtin_model_config).parameters))
    if unknown:
        raise ValueError(f"unknown architecture option(s): {', '.join(unknown)}")
    options = dict(recipe)
    options.update({k: v for k, v in overrides.items() if v is not None})
    config = TrainConfig.from_dict(options)
    config.validate()  # before anything is built or written
    # the scenes' size (TrainConfig.image_size) is the model's: the architecture follows it
    if arch.setdefault("image_size", config.image_size) != config.image_size:
        raise ValueError(f"the architecture's image_size {arch['image_size']} differs from the training scenes' "
                         f"image_size {config.image_size}: set the image_size option alone")
    torch.manual_seed(config.seed)
    model = GroupViTModel(builtin_model_config(**arch))
    init_model(model, config)
    os.makedirs(out, exist_ok=True)
    log_file = open(os.path.join(out, "log.txt"), "a", encoding="utf-8")

    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)
        log_file.write(line + "\n")
        log_file.flush()

    started = time.perf_counter()
    trainer = Trainer(model, config, output_dir=out, resume=resume, progress=progress, log=say, device=device)
    if time_budget and trainer.world_size > 1:
        raise ValueError("time_budget needs a single process (each process would measure its own step count)")
    say(f"variant {variant} arch {arch} {config}; data ready in {time.perf_counter() - started:.1f}s")
    if time_budget:
        probe = min(30, config.steps - trainer.step)
        t0 = time.perf_counter()
        trainer.train(steps=trainer.step + probe)
        per_step = (time.perf_counter() - t0) / max(probe, 1)
        remaining = time_budget - (time.perf_counter() - started)
        trainer.config.steps = max(trainer.step + 1, min(config.steps, trainer.step + int(remaining / per_step)))
        say(f"{per_step:.3f}s/step -> {trainer.config.steps} steps")
    t0 = time.perf_counter()
    history = trainer.train()
    seconds = time.perf_counter() - t0
    say(f"trained {trainer.step} steps in {seconds:.0f}s")
    result: Dict[str, Any] = {"variant": variant, "arch": {k: list(v) if isinstance(v, tuple) else v
                                                           for k, v in arch.items()},
                              "train_config": asdict(trainer.config), "steps": trainer.step,
                              "train_seconds": seconds, "device": str(trainer.device),
                              "final_loss": history[-1] if history else None}
    if trainer.best is not None:
        result["best_step"], result["best_val_miou"] = trainer.best[0], trainer.best[1]
    if trainer.rank != 0:
        log_file.close()
        return result
    if evaluate:
        result["miou"] = evaluate_segmentation(trainer.model, count=eval_count)
        result["miou_patch_ablation"] = evaluate_segmentation(trainer.model, count=eval_count, grouping=False)
        torch.manual_seed(1234)
        random_model = GroupViTModel(builtin_model_config(**arch)).to(trainer.device)
        result["miou_random_weights"] = evaluate_segmentation(random_model, count=eval_count)
        say(f"mIoU {result['miou']['miou']:.4f} patch-ablation {result['miou_patch_ablation']['miou']:.4f} "
            f"random {result['miou_random_weights']['miou']:.4f}")
    from groupvit_core.io_utils import atomic_write_text

    atomic_write_text(os.path.join(out, "result.json"), json.dumps(result, indent=1) + "\n")
    atomic_write_text(os.path.join(out, "history.json"), json.dumps(history) + "\n")
    log_file.close()
    return result
