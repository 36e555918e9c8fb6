"""Framework-free parts of GroupViT's training losses (numpy only).

GroupViT (Xu et al., 2022) trains with two losses: the image-text contrastive loss on whole captions, and the
multi-label contrastive loss, for which the nouns of each caption are put into prompt templates ("a photo of a
{}.") and every image is contrasted against all prompts of the batch with *soft* targets (an image's positives
are all the prompts of its nouns, spread evenly). This module does the text-side work both frameworks share:

- ``parse_entities``: the entity names (nouns with their adjectives, e.g. "red circle", and nameable grounds such
  as "grass") a caption mentions, from a fixed vocabulary, longest match first.
- ``entity_targets``: multi-hot (images, classes) targets from the parsed entities.
- ``soft_targets``: the soft targets of the multi-label loss in both directions (image -> prompts, row-normalised;
  prompt -> images, column-normalised, prompts absent from the batch masked out).
- ``TrainConfig``: the hyper-parameters of a training run, shared by both frameworks.
- ``PROMPT_TEMPLATES`` and ``prompt_batch``: which template each class prompt uses at a training step (seeded).

The tensors and the cross-entropies live in ``groupvit_pt.training`` and ``groupvit_tf.training``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

# Templates for the class prompts during training; the first is the evaluation prompt of the paper.
PROMPT_TEMPLATES: Tuple[str, ...] = (
    "a photo of a {}.",
    "a {}.",
    "a picture of a {}.",
    "there is a {}.",
    "a photo of the {}.",
    "an image of a {}.",
)


def _normalise(text: str) -> str:
    return " " + re.sub(r"[^a-z0-9]+", " ", text.lower()).strip() + " "


def parse_entities(caption: str, vocabulary: Sequence[str]) -> List[str]:
    """The vocabulary entries mentioned in ``caption``, in order of first mention, each once.

    Matching is on whole words, case-insensitive, longest entry first ("red circle" wins over "circle").
    """
    if not isinstance(caption, str):
        raise TypeError(f"caption must be a str, got {type(caption).__name__}")
    text = _normalise(caption)
    entries = sorted(set(vocabulary), key=lambda entry: -len(entry))
    found: List[Tuple[int, str]] = []
    for entry in entries:
        pattern = _normalise(entry)
        if pattern.strip() == "":
            raise ValueError("the vocabulary holds an empty entry")
        start = text.find(pattern)
        if start >= 0:
            found.append((start, entry))
            # blank the match so that a shorter entry inside it is not found again
            text = text[:start] + " " + "#" * (len(pattern) - 2) + " " + text[start + len(pattern):]
    return [entry for _, entry in sorted(found)]


def entity_targets(entity_lists: Sequence[Sequence[str]], class_names: Sequence[str]) -> np.ndarray:
    """(images, classes) float32 multi-hot: 1 where image i mentions class j."""
    index = {name: i for i, name in enumerate(class_names)}
    targets = np.zeros((len(entity_lists), len(class_names)), dtype=np.float32)
    for row, entities in enumerate(entity_lists):
        for name in entities:
            if name not in index:
                raise ValueError(f"entity {name!r} is not one of the {len(class_names)} class names")
            targets[row, index[name]] = 1.0
    return targets


def soft_targets(multi_hot: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The multi-label loss' soft targets from (images, classes) multi-hot labels.

    Returns (image_targets (I, C): each row sums to 1 over the image's classes; text_targets (C, I): each row
    sums to 1 over the images holding the class; text_valid (C,) bool: classes present in the batch — rows of
    absent classes are zero and must be left out of the text -> image term).
    """
    multi_hot = np.asarray(multi_hot, dtype=np.float32)
    if multi_hot.ndim != 2:
        raise ValueError(f"multi-hot targets must be (images, classes), got shape {multi_hot.shape}")
    per_image = multi_hot.sum(axis=1, keepdims=True)
    if np.any(per_image == 0):
        raise ValueError("every image needs at least one entity for the multi-label loss")
    image_targets = multi_hot / per_image
    per_class = multi_hot.sum(axis=0)
    valid = per_class > 0
    text_targets = np.where(valid[:, None], multi_hot.T / np.maximum(per_class, 1)[:, None], 0.0)
    return image_targets.astype(np.float32), text_targets.astype(np.float32), valid


def prompt_batch(class_names: Sequence[str], rng: Optional[np.random.Generator] = None,
                 templates: Sequence[str] = PROMPT_TEMPLATES) -> List[str]:
    """One prompt per class: a template drawn from ``rng`` for each (the first template without an rng)."""
    prompts = []
    for name in class_names:
        template = templates[0] if rng is None else templates[int(rng.integers(len(templates)))]
        prompts.append(template.format(name))
    return prompts


POSITION_INITS: Tuple[str, ...] = ("random", "sincos")
ATTENTION_INITS: Tuple[str, ...] = ("default", "mimetic")
# Mimetic initialisation (Trockman & Kolter, "Mimetic Initialization of Self-Attention Layers", ICML 2023): the
# product of each head's query and key weights starts near MIMETIC_QK[0] * Z + MIMETIC_QK[1] * I and the product
# of the value and output weights near MIMETIC_VO[0] * Z - MIMETIC_VO[1] * I (Z Gaussian with variance 1 / dim),
# the structure trained ViTs' attention layers show; the paper's values for ViTs.
MIMETIC_QK: Tuple[float, float] = (0.7, 0.7)
MIMETIC_VO: Tuple[float, float] = (0.4, 0.4)


# Patch-grid neighbour offsets of the affinity term, each undirected pair once: right, down and the two diagonals,
# at every dilation of AFFINITY_DILATIONS.
AFFINITY_OFFSETS: Tuple[Tuple[int, int], ...] = ((0, 1), (1, 0), (1, 1), (1, -1))
AFFINITY_DILATIONS: Tuple[int, ...] = (1, 2)
# The affinity term's repulsion weighs a pair by (1 - affinity) ** AFFINITY_EDGE_POWER: at 4, three quarters of
# the repulsion falls on pairs across a true object edge (measured on the masks of 200 training scenes), while
# pairs inside a textured ground, whose affinities spread lower, are left nearly alone.
AFFINITY_EDGE_POWER: float = 4.0


def patch_neighbours(rows: int, cols: int, dilations: Sequence[int] = AFFINITY_DILATIONS) -> Tuple[np.ndarray,
                                                                                                   np.ndarray]:
    """The neighbours of each patch of a (rows, cols) grid (row-major, as the vision tower orders its patches)
    -> (index (rows * cols, K) int64, valid (rows * cols, K) bool), K = 4 * len(dilations): for every offset of
    ``AFFINITY_OFFSETS`` times a dilation, the patch it points to; where that falls off the grid, the patch itself
    with valid False."""
    if rows < 1 or cols < 1:
        raise ValueError(f"grid must be at least 1x1, got {rows}x{cols}")
    dilations = [int(d) for d in dilations]
    if not dilations or min(dilations) < 1:
        raise ValueError(f"dilations must be positive integers, got {list(dilations)}")
    row, col = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    row, col = row.ravel(), col.ravel()
    index, valid = [], []
    for dilation in dilations:
        for dy, dx in AFFINITY_OFFSETS:
            r, c = row + dy * dilation, col + dx * dilation
            ok = (r >= 0) & (r < rows) & (c >= 0) & (c < cols)
            index.append(np.where(ok, r * cols + c, row * cols + col))
            valid.append(ok)
    return np.stack(index, axis=1).astype(np.int64), np.stack(valid, axis=1)


def patch_affinities(images: np.ndarray, patch_size: int, dilations: Sequence[int] = AFFINITY_DILATIONS
                     ) -> np.ndarray:
    """Colour affinity between neighbouring patches, from the images' own pixels (no labels): (B, N, K) float32.

    ``images``: (B, H, W, 3) uint8 (H and W multiples of ``patch_size``). Each patch is its mean colour (in [0, 1]);
    the affinity of patch n and its k-th neighbour (``patch_neighbours``) is exp(-d^2 / mean d^2), d the distance
    of their colours and the mean taken over the image's valid pairs, so the scale adapts to each image's
    contrast (as PAMR normalises by the local spread); 0 for neighbours off the grid. Pairs inside one uniformly
    coloured region score near 1, pairs across a colour edge near 0."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be (batch, height, width, 3), got shape {images.shape}")
    batch, height, width, _ = images.shape
    if patch_size < 1 or height % patch_size or width % patch_size:
        raise ValueError(f"image size {height}x{width} is not a multiple of patch_size {patch_size}")
    rows, cols = height // patch_size, width // patch_size
    colours = images.astype(np.float32).reshape(batch, rows, patch_size, cols, patch_size, 3).mean(axis=(2, 4))
    colours = colours.reshape(batch, rows * cols, 3) / 255.0
    index, valid = patch_neighbours(rows, cols, dilations)
    distance = ((colours[:, :, None, :] - colours[:, index, :]) ** 2).sum(axis=-1)  # (B, N, K)
    validf = valid[None].astype(np.float32)
    scale = (distance * validf).sum(axis=(1, 2)) / max(float(validf.sum()), 1.0)
    weights = np.exp(-distance / np.maximum(scale, 1e-8)[:, None, None]) * validf
    return weights.astype(np.float32)


def sincos_position_table(rows: int, cols: int, dim: int, temperature: float = 10000.0) -> np.ndarray:
    """A (rows * cols, dim) float32 2-D sine-cosine position table (row-major patches, as the vision tower orders
    them): the first half of the channels encodes the row, the second half the column, each as sin and cos of
    ``dim / 4`` geometric frequencies (MAE's ``get_2d_sincos_pos_embed``). ``dim`` must be a multiple of 4."""
    if dim % 4 or dim <= 0:
        raise ValueError(f"a 2-D sine-cosine table needs a positive dim divisible by 4, got {dim}")
    if rows < 1 or cols < 1:
        raise ValueError(f"grid must be at least 1x1, got {rows}x{cols}")
    omega = 1.0 / temperature ** (np.arange(dim // 4, dtype=np.float64) / (dim // 4))

    def encode(positions: np.ndarray) -> np.ndarray:
        angles = positions[:, None] * omega[None, :]
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    row, col = np.meshgrid(np.arange(rows, dtype=np.float64), np.arange(cols, dtype=np.float64), indexing="ij")
    return np.concatenate([encode(row.ravel()), encode(col.ravel())], axis=1).astype(np.float32)


def mimetic_factors(dim: int, alpha: float, beta: float, sign: float, rng: np.random.Generator
                    ) -> Tuple[np.ndarray, np.ndarray]:
    """Factors ``(L, R)``, each ``(dim, dim)`` float32, with ``L @ R = alpha * Z + sign * beta * I`` (``Z`` standard
    Gaussian / sqrt(dim)), split evenly by the SVD (``L = U sqrt(S)``, ``R = sqrt(S) V^T``), so that the first ``k``
    columns of ``L`` and rows of ``R`` give the best rank-``k`` approximation (one attention head's share)."""
    if dim < 1:
        raise ValueError(f"dim must be positive, got {dim}")
    target = alpha * rng.standard_normal((dim, dim)) / np.sqrt(dim) + sign * beta * np.eye(dim)
    u, s, vt = np.linalg.svd(target)
    root = np.sqrt(s)
    return (u * root[None, :]).astype(np.float32), (root[:, None] * vt).astype(np.float32)


def _check_inits(position_init: str, attention_init: str) -> None:
    if position_init not in POSITION_INITS:
        raise ValueError(f"position_init must be one of {', '.join(POSITION_INITS)}, got {position_init!r}")
    if attention_init not in ATTENTION_INITS:
        raise ValueError(f"attention_init must be one of {', '.join(ATTENTION_INITS)}, got {attention_init!r}")


def initial_weights(config: Any, position_init: str = "random", attention_init: str = "default", seed: int = 0
                    ) -> Dict[str, np.ndarray]:
    """The weights that ``TrainConfig.position_init`` / ``attention_init`` set before training, as
    ``{Hub PyTorch name: float32 array in the PyTorch layout}`` for a ``GroupViTConfig``; both frameworks' ``init_model``
    assign them (an empty dict for the defaults: the model keeps its own init).

    "sincos" sets the vision position table (``sincos_position_table``); "mimetic" sets every vision stage's
    self-attention (not the grouping blocks'): per head, q and k from ``mimetic_factors(MIMETIC_QK, +1)``, per
    layer v and out from ``mimetic_factors(MIMETIC_VO, -1)``, biases zero, drawn in layer order from ``seed``."""
    _check_inits(position_init, attention_init)
    vision = config.vision_config
    dim = vision.hidden_size
    weights: Dict[str, np.ndarray] = {}
    if position_init == "sincos":
        grid = vision.image_size // vision.patch_size
        weights["vision_model.embeddings.position_embeddings"] = sincos_position_table(grid, grid, dim)[None]
    if attention_init == "mimetic":
        rng = np.random.default_rng(seed)
        heads = vision.num_attention_heads
        width = dim // heads
        for stage, depth in enumerate(vision.depths):
            for layer in range(depth):
                prefix = f"vision_model.encoder.stages.{stage}.layers.{layer}.self_attn."
                q = np.empty((dim, dim), np.float32)
                k = np.empty((dim, dim), np.float32)
                for head in range(heads):
                    rows = slice(head * width, (head + 1) * width)
                    left, right = mimetic_factors(dim, *MIMETIC_QK, 1.0, rng)
                    # q k^T = x Wq^T Wk x^T (torch's Linear: y = x W^T): Wq_h^T = L[:, :w], Wk_h = R[:w]
                    q[rows], k[rows] = left[:, :width].T, right[:width]
                # out = (a x Wv^T) Wo^T: Wv^T = L, Wo^T = R
                left, right = mimetic_factors(dim, *MIMETIC_VO, -1.0, rng)
                for name, value in (("q_proj", q), ("k_proj", k), ("v_proj", left.T), ("out_proj", right.T)):
                    weights[prefix + name + ".weight"] = np.ascontiguousarray(value, dtype=np.float32)
                    weights[prefix + name + ".bias"] = np.zeros(dim, np.float32)
    return weights


@dataclass
class TrainConfig:
    """Hyper-parameters of a training run (all JSON-serialisable)."""

    steps: int = 2000
    batch_size: int = 64
    lr: float = 2e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    warmup_steps: int = 100
    seed: int = 0
    image_size: int = 64
    max_objects: int = 3
    pool_size: int = 4000  # training scenes generated once and sampled from
    max_text_length: int = 32
    contrastive_weight: float = 1.0
    multilabel_weight: float = 1.0
    group_weight: float = 1.0
    pixel_weight: float = 0.0
    # text-only: push the class prompts' embeddings apart (log-mean-exp of their pairwise cosines at
    # ``prompt_uniformity_temperature``), so that prompts differing in one word ("red circle", "red square") cannot
    # collapse onto one embedding while the image tower is still blind to that word
    prompt_uniformity_weight: float = 0.0
    prompt_uniformity_temperature: float = 5.0
    # training only: probability that a group's own token is dropped from its output (which then comes from its
    # assigned pixels alone), so that a group cannot name an entity without owning its pixels
    group_token_dropout: float = 0.0
    # the group loss counts only the groups that own at least one patch (hard assignment), so that a caption's
    # entity must be named by a group holding pixels, not by a group token that saw it through attention alone
    group_owned_only: bool = False
    # label-free grouping prior from the image's own pixels (``patch_affinities``): neighbouring patches of similar
    # colour should share a group and patches across a colour edge should not (attraction + repulsion, see
    # groupvit_pt.training.affinity_loss); keeps groups from spreading over an edge into their surroundings
    affinity_weight: float = 0.0
    # initial vision position table: "random" (the model's own init, zeros as the reference's) or "sincos" (2-D
    # sine-cosine, as in MAE: neighbouring patches start out with similar positions, so attention can look locally
    # from step 0)
    position_init: str = "random"
    # initial weights of the vision tower's self-attention layers: "default" (the model's own init) or "mimetic"
    # (``mimetic_factors``: query-key products near the identity, value-output products near minus the identity,
    # which speeds up ViTs trained from scratch on small data)
    attention_init: str = "default"
    gumbel: bool = True
    preset: str = "imagenet"
    grad_clip: float = 1.0
    checkpoint_every: int = 500
    # mIoU on ``eval_count`` scenes of the validation split every ``eval_every`` steps (0: never); with
    # ``keep_best`` the run ends on the weights of the best of those evaluations (early stopping on the
    # validation split; the test split is never used to choose)
    eval_every: int = 0
    eval_count: int = 100
    keep_best: bool = False

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown training option(s): {', '.join(unknown)}")
        return cls(**data)

    def validate(self) -> None:
        for name in ("steps", "batch_size", "image_size", "pool_size", "max_text_length"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0.0 <= self.group_token_dropout < 1.0:
            raise ValueError(f"group_token_dropout must be in [0, 1), got {self.group_token_dropout}")
        if self.lr <= 0 or self.min_lr < 0 or self.weight_decay < 0 or self.warmup_steps < 0:
            raise ValueError("lr must be positive; min_lr, weight_decay and warmup_steps non-negative")
        if self.affinity_weight < 0:
            raise ValueError(f"affinity_weight must be non-negative, got {self.affinity_weight}")
        if self.prompt_uniformity_weight < 0 or self.prompt_uniformity_temperature <= 0:
            raise ValueError("prompt_uniformity_weight must be non-negative and prompt_uniformity_temperature "
                             f"positive, got {self.prompt_uniformity_weight} and {self.prompt_uniformity_temperature}")
        if self.keep_best and int(self.eval_every) < 1:
            raise ValueError("keep_best needs eval_every > 0 (the validation evaluations it chooses from)")
        if int(self.eval_every) < 0 or int(self.eval_count) < 1:
            raise ValueError(f"eval_every must be non-negative and eval_count positive, got {self.eval_every} and "
                             f"{self.eval_count}")
        _check_inits(self.position_init, self.attention_init)
        from .image import NORMALIZATION_PRESETS

        if self.preset not in NORMALIZATION_PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}")
