"""Zero-shot semantic segmentation with GroupViT, as the paper measures it (numpy only, framework-free).

This is the original NVlabs inference (``segmentation/evaluation/group_vit_seg.py`` run through mmseg's
``slide_inference``), not the ``output_segmentation=True`` head of the Hugging Face model. Per image:

1. Resize so the short side is 448 (the long side capped at 2048), as mmseg's ``Resize(img_scale=(2048, 448),
   keep_ratio=True)``: half-pixel bilinear without antialiasing, rounded back to uint8; normalise with a preset
   (``"imagenet"``, the NVlabs statistics, by default; ``"clip"`` for the Hub preprocessor's).
2. Cut 448x448 windows at stride 224 (``plan_windows``; every pixel is covered once or more), or take the whole
   image (``window="whole"``). Each window goes through the vision tower with the position table interpolated to
   its patch grid. A window side that is not a multiple of the patch size is resized to the nearest multiple.
3. Hard grouping (``hard_group_map``): the soft assignment maps multiplied in stage order give every patch a
   distribution over the final groups; it is resized bilinearly to the window and each pixel takes its argmax.
4. Class scores per group (``group_class_scores``), the NVlabs rule: with s = min(exp(logit_scale), 100),
   ``pre = softmax(s * groups @ texts^T)``; the k (default 5) classes most similar to the whole window are kept,
   the others set to -inf and the softmax taken again; the product of the two softmaxes is the group's class
   score. With a background threshold t, a group is background where its best score is below
   min(t, best score of any group).
5. Each pixel takes its group's scores; overlapping windows are averaged (``WindowAccumulator``, mmseg's
   ``count_mat``); the average is resized bilinearly to the original image and the label is its argmax (ties go
   to the lowest index, so to background).
6. Optional, not part of the paper's protocol (``refine=True``): the label map is refined on the image's own
   pixels (``refine_label_map``, pixel-adaptive mask refinement after Araslanov & Roth, CVPR 2020): each pixel's
   one-hot label is averaged a few times over its neighbours, weighted by how alike their colours are, so that
   labels stop at colour edges instead of at the patch grid. No labels or training are involved; the built-in
   model's settings turn it on (chosen on the validation split, RESULTS_TRAINING.md).

Label convention (``SegmentationResult``): ``class_names[label]`` names every label. With a background threshold
``class_names == ("background", *classes)``: 0 is background and class i of ``set_classes`` is label i + 1.
Without one ``class_names == classes`` and labels are 0 .. K-1.

The model runs behind a small adapter, ``SegmentationBackend`` in ``groupvit_pt.segmentation`` or
``groupvit_tf.segmentation`` (numpy in, numpy out), so everything here is shared by both frameworks.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from .resize import bilinear_matrix

# ----------------------------------------------------------------------------------------------------------------
# Constants of the NVlabs protocol
# ----------------------------------------------------------------------------------------------------------------

SHORT_SIDE = 448  # mmseg img_scale=(2048, 448)
MAX_LONG_SIDE = 2048
WINDOW_SIZE = 448  # test_cfg crop_size
WINDOW_STRIDE = 224  # test_cfg stride
TOP_K = 5
LOGIT_SCALE_MAX = 100.0
# refine_label_map's defaults, chosen on the synthetic world's validation split (64 px images, patch 4)
REFINE_ITERATIONS = 8
REFINE_DILATIONS = (1, 2, 4)
REFINE_SIGMA = 0.02
DEFAULT_PRESET = "imagenet"  # the NVlabs evaluation normalises with ImageNet statistics
WINDOW_MODES = ("slide", "whole")

DEFAULT_TEMPLATE = "a photo of a {}."

# OpenAI CLIP's 80 ImageNet prompt templates (MIT licence), the NVlabs "full" template set.
ENSEMBLE_TEMPLATES: Tuple[str, ...] = (
    "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.", "a photo of the hard to see {}.",
    "a low resolution photo of the {}.", "a rendering of a {}.", "graffiti of a {}.", "a bad photo of the {}.",
    "a cropped photo of the {}.", "a tattoo of a {}.", "the embroidered {}.", "a photo of a hard to see {}.",
    "a bright photo of a {}.", "a photo of a clean {}.", "a photo of a dirty {}.", "a dark photo of the {}.",
    "a drawing of a {}.", "a photo of my {}.", "the plastic {}.", "a photo of the cool {}.",
    "a close-up photo of a {}.", "a black and white photo of the {}.", "a painting of the {}.",
    "a painting of a {}.", "a pixelated photo of the {}.", "a sculpture of the {}.", "a bright photo of the {}.",
    "a cropped photo of a {}.", "a plastic {}.", "a photo of the dirty {}.", "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.", "a photo of the {}.", "a good photo of the {}.", "a rendering of the {}.",
    "a {} in a video game.", "a photo of one {}.", "a doodle of a {}.", "a close-up photo of the {}.",
    "a photo of a {}.", "the origami {}.", "the {} in a video game.", "a sketch of a {}.", "a doodle of the {}.",
    "a origami {}.", "a low resolution photo of a {}.", "the toy {}.", "a rendition of the {}.",
    "a photo of the clean {}.", "a photo of a large {}.", "a rendition of a {}.", "a photo of a nice {}.",
    "a photo of a weird {}.", "a blurry photo of a {}.", "a cartoon {}.", "art of a {}.", "a sketch of the {}.",
    "a embroidered {}.", "a pixelated photo of a {}.", "itap of the {}.", "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.", "a plushie {}.", "a photo of the nice {}.", "a photo of the small {}.",
    "a photo of the weird {}.", "the cartoon {}.", "art of the {}.", "a drawing of the {}.",
    "a photo of the large {}.", "a black and white photo of a {}.", "the plushie {}.", "a dark photo of a {}.",
    "itap of a {}.", "graffiti of the {}.", "a toy {}.", "itap of my {}.", "a photo of a cool {}.",
    "a photo of a small {}.", "a tattoo of the {}.",
)

# NVlabs' 7-template "subset" (used there for ImageNet classification).
SUBSET_TEMPLATES: Tuple[str, ...] = (
    "itap of a {}.", "a bad photo of a {}.", "a origami {}.", "a photo of the large {}.", "a {} in a video game.",
    "art of the {}.", "a photo of the small {}.",
)

TEMPLATE_SETS: Dict[str, Tuple[str, ...]] = {
    "single": (DEFAULT_TEMPLATE,),
    "ensemble": ENSEMBLE_TEMPLATES,
    "subset": SUBSET_TEMPLATES,
}

NO_MODEL_MESSAGE = (
    "no model given: pass --model DIR, a GroupViT checkpoint directory (config.json plus model.safetensors, "
    "pytorch_model.bin or tf_model.h5), e.g. a download of nvidia/groupvit-gcc-yfcc or "
    "nvidia/groupvit-gcc-redcaps, or a directory converted from an NVlabs .pth with `groupvit convert`"
)


# ----------------------------------------------------------------------------------------------------------------
# Prompts and class names
# ----------------------------------------------------------------------------------------------------------------


def check_class_names(names: Any) -> List[str]:
    """Strip class names and reject an empty list, empty names and duplicates (case-insensitive)."""
    if isinstance(names, str):
        raise TypeError("class names must be a list of str, got one str (split it, e.g. names.split(','))")
    try:
        names = list(names)
    except TypeError:
        raise TypeError(f"class names must be a list of str, got {type(names).__name__}") from None
    if not names:
        raise ValueError("the class list is empty: give at least one class name")
    cleaned: List[str] = []
    seen: Dict[str, int] = {}
    for index, name in enumerate(names):
        if not isinstance(name, str):
            raise TypeError(f"class name {index} must be a str, got {type(name).__name__}")
        stripped = name.strip()
        if not stripped:
            raise ValueError(f"class name {index} is empty")
        key = stripped.casefold()
        if key in seen:
            raise ValueError(
                f"duplicate class name {stripped!r} (entries {seen[key]} and {index}, compared case-insensitively)"
            )
        seen[key] = index
        cleaned.append(stripped)
    return cleaned


def resolve_templates(templates: Union[None, str, Sequence[str]] = None) -> Tuple[str, ...]:
    """None or "single" -> ("a photo of a {}.",); "ensemble" -> CLIP's 80; "subset"; or a list with "{}" each."""
    if templates is None:
        return TEMPLATE_SETS["single"]
    if isinstance(templates, str):
        if templates in TEMPLATE_SETS:
            return TEMPLATE_SETS[templates]
        raise ValueError(
            f"unknown template set {templates!r}; choose one of {sorted(TEMPLATE_SETS)} or pass a list of templates"
        )
    templates = tuple(templates)
    if not templates:
        raise ValueError("the template list is empty")
    for template in templates:
        if not isinstance(template, str):
            raise TypeError(f"templates must be str, got {type(template).__name__}")
        if template.count("{}") != 1:
            raise ValueError(f"template {template!r} must contain exactly one '{{}}' for the class name")
    return templates


def build_prompts(class_names: Sequence[str], templates: Sequence[str]) -> List[str]:
    """Prompts class-major: all templates of class 0, then class 1, ... (len = classes * templates)."""
    return [template.format(name) for name in class_names for template in templates]


def l2_normalize(array: np.ndarray, axis: int = -1) -> np.ndarray:
    array = np.asarray(array, dtype=np.float64)
    norm = np.linalg.norm(array, axis=axis, keepdims=True)
    return array / np.maximum(norm, 1e-12)


def average_template_embeddings(embeddings: np.ndarray, num_classes: int, num_templates: int) -> np.ndarray:
    """(classes * templates, D) normalised prompt embeddings -> (classes, D): mean per class, re-normalised."""
    embeddings = np.asarray(embeddings, dtype=np.float64)
    if embeddings.ndim != 2 or embeddings.shape[0] != num_classes * num_templates:
        raise ValueError(
            f"expected {num_classes * num_templates} prompt embeddings ({num_classes} classes x {num_templates} "
            f"templates), got shape {embeddings.shape}"
        )
    per_class = embeddings.reshape(num_classes, num_templates, -1).mean(axis=1)
    return l2_normalize(per_class).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------------
# Geometry: resizing, windows, accumulation
# ----------------------------------------------------------------------------------------------------------------


def _check_positive(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def rescaled_size(height: int, width: int, short_side: int = SHORT_SIDE,
                  max_long_side: int = MAX_LONG_SIDE) -> Tuple[int, int]:
    """mmcv's ``rescale_size`` for img_scale=(max_long_side, short_side): one factor, sides rounded half up."""
    height, width = _check_positive("height", height), _check_positive("width", width)
    short_side, max_long_side = _check_positive("short_side", short_side), _check_positive("max_long_side",
                                                                                             max_long_side)
    factor = min(max_long_side / max(height, width), short_side / min(height, width))
    return max(int(height * factor + 0.5), 1), max(int(width * factor + 0.5), 1)


def _bilinear_taps(in_size: int, out_size: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The two source indices and weights (float64) of each output of ``bilinear_matrix(in_size, out_size)``."""
    matrix = bilinear_matrix(in_size, out_size)
    nonzero = matrix != 0
    low = np.argmax(nonzero, axis=1)
    high = in_size - 1 - np.argmax(nonzero[:, ::-1], axis=1)
    rows = np.arange(out_size)
    return low, high, matrix[rows, low], np.where(high != low, matrix[rows, high], 0.0)


def _resize_axis(array: np.ndarray, out_size: int, axis: int) -> np.ndarray:
    """Bilinear resize of one axis, two taps per output sample, in the array's floating dtype."""
    if array.shape[axis] == out_size:
        return array
    low, high, low_weight, high_weight = _bilinear_taps(array.shape[axis], out_size)
    shape = [1] * array.ndim
    shape[axis] = out_size
    # low * low_weight + high * high_weight, computed in place on the gathered copies (the same roundings)
    out = np.take(array, low, axis=axis)
    out *= low_weight.astype(array.dtype).reshape(shape)
    upper = np.take(array, high, axis=axis)
    upper *= high_weight.astype(array.dtype).reshape(shape)
    out += upper
    return out


def argmax_first_axis(stack: np.ndarray) -> np.ndarray:
    """``np.argmax(stack, axis=0)`` (ties to the lower index, NaN counts as the largest) -> intp.

    One pass per plane over contiguous (..., H, W) planes instead of numpy's transposed copy of the whole stack.
    """
    stack = np.asarray(stack)
    if stack.ndim < 2 or stack.shape[0] == 0:
        raise ValueError(f"argmax_first_axis needs a stack of planes (n >= 1, ...), got shape {stack.shape}")
    best = stack[0].copy()
    index = np.zeros(best.shape, dtype=np.intp)
    for position in range(1, stack.shape[0]):
        plane = stack[position]
        np.copyto(index, position, where=plane > best)
        np.maximum(best, plane, out=best)  # NaN propagates: such pixels are redone below
    if best.dtype.kind == "f":
        nan = np.isnan(best)
        if nan.any():
            index[nan] = np.argmax(stack[:, nan], axis=0)
    return index


def resize_bilinear(array: np.ndarray, height: int, width: int, axes: Tuple[int, int] = (-2, -1)) -> np.ndarray:
    """Resize two axes (default the last two) bilinearly: half-pixel centres, no antialiasing -> float32.

    The arithmetic of ``bilinear_matrix`` (PyTorch's interpolate), applied as two taps per output sample rather
    than dense matrices, so large score maps resize quickly.
    """
    array = np.asarray(array, dtype=np.float32)
    row_axis, col_axis = (axis % array.ndim for axis in axes)
    if array.shape[row_axis] == height and array.shape[col_axis] == width:
        return array.copy()
    return _resize_axis(_resize_axis(array, height, row_axis), width, col_axis)


def resize_nearest(labels: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize of the last two axes, source index floor(dst * in / out) as PyTorch's 'nearest'."""
    in_h, in_w = labels.shape[-2:]
    if (in_h, in_w) == (height, width):
        return labels.copy()
    rows = np.minimum((np.arange(height) * (in_h / height)).astype(np.int64), in_h - 1)
    cols = np.minimum((np.arange(width) * (in_w / width)).astype(np.int64), in_w - 1)
    return labels[..., rows[:, None], cols[None, :]]


def resize_image_uint8(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """(H, W, 3) uint8 -> (height, width, 3) uint8 as OpenCV's INTER_LINEAR (mmcv's default): no antialiasing."""
    if image.shape[:2] == (height, width):
        return image
    channels_first = np.moveaxis(image.astype(np.float32), -1, 0)
    resized = resize_bilinear(channels_first, height, width)
    return np.moveaxis(np.clip(np.rint(resized), 0, 255).astype(np.uint8), 0, -1)


@dataclass(frozen=True)
class Window:
    """A crop [top:bottom, left:right] of the (resized) image."""

    top: int
    left: int
    bottom: int
    right: int

    @property
    def height(self) -> int:
        return self.bottom - self.top

    @property
    def width(self) -> int:
        return self.right - self.left


def plan_windows(height: int, width: int, window: Union[int, Tuple[int, int]] = WINDOW_SIZE,
                 stride: Union[int, Tuple[int, int]] = WINDOW_STRIDE) -> List[Window]:
    """mmseg's ``slide_inference`` grid: windows of ``window`` at ``stride``, the last ones shifted back inside.

    A side shorter than the window gives one window of that side. Every pixel is covered at least once.
    """
    height, width = _check_positive("height", height), _check_positive("width", width)
    win_h, win_w = (window, window) if not isinstance(window, (tuple, list)) else window
    stride_h, stride_w = (stride, stride) if not isinstance(stride, (tuple, list)) else stride
    win_h, win_w = _check_positive("window height", win_h), _check_positive("window width", win_w)
    stride_h, stride_w = _check_positive("stride", stride_h), _check_positive("stride", stride_w)
    if stride_h > win_h or stride_w > win_w:
        raise ValueError(f"stride ({stride_h}, {stride_w}) larger than the window ({win_h}, {win_w}) leaves gaps")
    rows = max(height - win_h + stride_h - 1, 0) // stride_h + 1
    cols = max(width - win_w + stride_w - 1, 0) // stride_w + 1
    windows = []
    for row in range(rows):
        for col in range(cols):
            bottom = min(row * stride_h + win_h, height)
            right = min(col * stride_w + win_w, width)
            windows.append(Window(max(bottom - win_h, 0), max(right - win_w, 0), bottom, right))
    return windows


class WindowAccumulator:
    """Sums per-window score maps into the image and divides by the number of windows covering each pixel.

    Scores are channels-first: ``add`` takes (channels, window height, window width), ``average`` returns
    (channels, height, width) (the layout of ``SegmentationResult.probabilities``).

    Also assembles a group map: each pixel takes the group id from the window whose centre is nearest (Chebyshev
    distance; the first such window on a tie), with ids offset by ``window_index * groups`` so that groups of
    different windows stay distinct.
    """

    def __init__(self, num_channels: int, height: int, width: int) -> None:
        self.scores = np.zeros((num_channels, height, width), dtype=np.float32)
        self.count = np.zeros((height, width), dtype=np.int32)
        self.groups = np.zeros((height, width), dtype=np.int32)
        self._group_distance = np.full((height, width), np.inf)
        self._windows_added = 0

    def add(self, window: Window, scores: np.ndarray, groups: Optional[np.ndarray] = None,
            num_groups: int = 0) -> None:
        expected = (self.scores.shape[0], window.height, window.width)
        if scores.shape != expected:
            raise ValueError(f"window scores of shape {scores.shape} do not fit {window}: expected (channels, "
                             f"height, width) = {expected}")
        region = (slice(window.top, window.bottom), slice(window.left, window.right))
        self.scores[(slice(None),) + region] += scores
        self.count[region] += 1
        if groups is not None:
            centre_y = (window.top + window.bottom - 1) / 2
            centre_x = (window.left + window.right - 1) / 2
            ys = np.abs(np.arange(window.top, window.bottom) - centre_y)[:, None]
            xs = np.abs(np.arange(window.left, window.right) - centre_x)[None, :]
            distance = np.maximum(ys, xs)
            if self._windows_added == 0:  # every distance beats the initial infinity; no id offset yet
                self._group_distance[region] = distance
                self.groups[region] = groups
            else:
                closer = distance < self._group_distance[region]
                offset = self._windows_added * num_groups
                self._group_distance[region] = np.where(closer, distance, self._group_distance[region])
                self.groups[region] = np.where(closer, groups.astype(np.int32) + offset, self.groups[region])
        self._windows_added += 1

    def average(self) -> np.ndarray:
        if np.any(self.count == 0):
            missing = int(np.sum(self.count == 0))
            raise ValueError(f"{missing} pixels are covered by no window")
        return self.scores / self.count.astype(np.float32)


# ----------------------------------------------------------------------------------------------------------------
# Grouping and the NVlabs class rule
# ----------------------------------------------------------------------------------------------------------------


def group_distribution(assignments: Sequence[np.ndarray], num_tokens: Optional[int] = None) -> np.ndarray:
    """Soft maps (G_i, N_i) of one image, in stage order -> (N, G): each patch's distribution over final groups.

    With no grouping stage every patch is its own group (identity of size ``num_tokens``).
    """
    distribution = None
    for stage, soft in enumerate(assignments):
        soft = np.asarray(soft, dtype=np.float64)
        if soft.ndim != 2:
            raise ValueError(f"assignment {stage} must be (groups, tokens) for one image, got {soft.shape}")
        if distribution is not None and distribution.shape[1] != soft.shape[1]:
            raise ValueError(
                f"assignment {stage} maps {soft.shape[1]} tokens but the previous stage gave "
                f"{distribution.shape[1]} groups"
            )
        distribution = soft.T if distribution is None else distribution @ soft.T
    if distribution is None:
        if num_tokens is None:
            raise ValueError("no assignment maps and no token count: cannot form groups")
        return np.eye(num_tokens)
    return distribution


def hard_group_map(assignments: Sequence[np.ndarray], grid: Tuple[int, int], height: int,
                   width: int) -> np.ndarray:
    """(height, width) int64 group id per pixel: the argmax of the bilinearly resized group distribution."""
    rows, cols = grid
    distribution = group_distribution(assignments, rows * cols)
    if distribution.shape[0] != rows * cols:
        raise ValueError(f"the first assignment has {distribution.shape[0]} tokens, the grid {rows}x{cols}")
    maps = np.ascontiguousarray(distribution.T).reshape(-1, rows, cols)  # (groups, rows, cols)
    resized = _resize_axis(_resize_axis(maps, height, 1), width, 2)  # (groups, height, width), float64
    return argmax_first_axis(resized)  # ties -> lowest group, as torch.argmax


def refine_label_map(image: np.ndarray, label_map: np.ndarray, num_labels: int,
                     iterations: int = REFINE_ITERATIONS, dilations: Sequence[int] = REFINE_DILATIONS,
                     sigma: float = REFINE_SIGMA) -> np.ndarray:
    """Pixel-adaptive refinement of a label map on its image (after PAMR, Araslanov & Roth, CVPR 2020).

    image (H, W, 3) uint8 and label_map (H, W) ints in [0, num_labels). The one-hot labels are averaged
    ``iterations`` times over each pixel's 8 neighbours at every dilation in ``dilations`` (edges replicated),
    neighbour k weighted by softmax_k(-d_k / (sigma + s)), where d_k is the mean absolute colour difference (RGB
    in [0, 1]) between the pixel and neighbour k and s the mean per-channel standard deviation of the
    neighbours' colours. The result is the argmax (ties to the lower label) -> (H, W) int32.
    """
    image = np.asarray(image)
    label_map = np.asarray(label_map)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"image must be (H, W, 3), got shape {image.shape}")
    if label_map.shape != image.shape[:2]:
        raise ValueError(f"label_map shape {label_map.shape} does not match the image's {image.shape[:2]}")
    if not np.issubdtype(label_map.dtype, np.integer):
        raise TypeError(f"label_map must hold integers, got {label_map.dtype}")
    num_labels = _check_positive("num_labels", num_labels)
    if label_map.size and (label_map.min() < 0 or label_map.max() >= num_labels):
        raise ValueError(f"label_map values must be in [0, {num_labels}), got {label_map.min()}..{label_map.max()}")
    if isinstance(iterations, bool) or not isinstance(iterations, (int, np.integer)) or iterations < 0:
        raise ValueError(f"iterations must be a non-negative integer, got {iterations!r}")
    dilations = tuple(dilations)
    if not dilations:
        raise ValueError("dilations is empty")
    for dilation in dilations:
        _check_positive("dilation", dilation)
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float, np.floating, np.integer)) or sigma < 0:
        raise ValueError(f"sigma must be a non-negative number, got {sigma!r}")
    if iterations == 0 or label_map.size == 0:
        return label_map.astype(np.int32)

    height, width = label_map.shape
    pad = max(dilations)
    offsets = [(dy * d, dx * d) for d in dilations for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx]

    def shifted(padded: np.ndarray, dy: int, dx: int) -> np.ndarray:  # (..., H+2p, W+2p) -> moved (..., H, W)
        return padded[..., pad + dy:pad + dy + height, pad + dx:pad + dx + width]

    def padded(array: np.ndarray) -> np.ndarray:  # edges replicated
        return np.pad(array, [(0, 0)] * (array.ndim - 2) + [(pad, pad), (pad, pad)], mode="edge")

    # One neighbour at a time: memory stays a few (H, W) planes per offset, not (offsets, labels, H, W).
    colours = np.moveaxis(image.astype(np.float32) / 255.0, -1, 0)  # (3, H, W)
    around = padded(colours)
    distance = np.empty((len(offsets), height, width), dtype=np.float32)
    total = np.zeros_like(colours)
    squares = np.zeros_like(colours)
    for k, (dy, dx) in enumerate(offsets):
        neighbour = shifted(around, dy, dx)
        distance[k] = np.abs(neighbour - colours).mean(axis=0)
        total += neighbour
        squares += neighbour * neighbour
    mean = total / len(offsets)
    spread = np.sqrt(np.maximum(squares / len(offsets) - mean * mean, 0.0)).mean(axis=0)  # (H, W)
    weights = -distance / (np.float32(sigma) + spread + np.float32(1e-8))
    weights = np.exp(weights - weights.max(axis=0, keepdims=True))
    weights /= weights.sum(axis=0, keepdims=True)
    # Only the labels present can spread (an absent label stays at 0 everywhere): propagate those, in order.
    present, compact = np.unique(label_map, return_inverse=True)
    probabilities = np.zeros((len(present), height, width), dtype=np.float32)
    np.put_along_axis(probabilities, compact.reshape(1, height, width), 1.0, axis=0)
    for _ in range(int(iterations)):
        source = padded(probabilities)
        probabilities = np.zeros_like(probabilities)
        for k, (dy, dx) in enumerate(offsets):
            probabilities += weights[k] * shifted(source, dy, dx)
    return present[np.argmax(probabilities, axis=0)].astype(np.int32)


def _softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    shifted = logits - np.max(logits, axis=axis, keepdims=True)
    exp = np.exp(shifted)
    return exp / np.sum(exp, axis=axis, keepdims=True)


def top_k_classes(image_embed: np.ndarray, text_embeds: np.ndarray, logit_scale: float, k: int) -> np.ndarray:
    """Indices of the k classes most similar to the whole image (ties to the lower index), sorted best first."""
    similarity = _softmax(logit_scale * (text_embeds @ image_embed))
    k = min(int(k), similarity.shape[0])
    return np.argsort(-similarity, kind="stable")[:k]


def group_class_scores(group_embeds: np.ndarray, image_embed: np.ndarray, text_embeds: np.ndarray,
                       logit_scale: float, top_k: Optional[int] = TOP_K,
                       background_threshold: Optional[float] = None,
                       logit_scale_max: float = LOGIT_SCALE_MAX) -> np.ndarray:
    """The NVlabs rule for one window -> (G, K) scores, or (G, 1 + K) with background column 0.

    group_embeds (G, D), image_embed (D,) and text_embeds (K, D) are L2-normalised. s = min(logit_scale,
    logit_scale_max). pre = softmax_K(s * groups @ texts^T); the top-k classes by softmax_K(s * image @ texts^T)
    are kept, the others masked with -inf and the softmax taken again (post); scores = post * pre. Background
    column: 1 for a group whose best score is below min(threshold, max of all scores), else 0. top_k None or
    >= K keeps every class.
    """
    group_embeds = np.asarray(group_embeds, dtype=np.float64)
    image_embed = np.asarray(image_embed, dtype=np.float64)
    text_embeds = np.asarray(text_embeds, dtype=np.float64)
    num_classes = text_embeds.shape[0]
    scale = min(float(logit_scale), float(logit_scale_max))
    logits = scale * (group_embeds @ text_embeds.T)  # (groups, classes)
    pre = _softmax(logits)
    keep = np.zeros(num_classes, dtype=bool)
    keep[top_k_classes(image_embed, text_embeds, scale, num_classes if top_k is None else top_k)] = True
    masked = np.where(keep[None, :], logits, -np.inf)
    scores = _softmax(masked) * pre
    if background_threshold is None:
        return scores
    threshold = min(float(background_threshold), float(scores.max()))
    background = (scores.max(axis=1) < threshold).astype(np.float64)
    return np.concatenate([background[:, None], scores], axis=1)


# ----------------------------------------------------------------------------------------------------------------
# Results and the segmenter
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class SegmentationResult:
    """One image's segmentation, at the input image's size.

    label_map (H, W) int32: ``class_names[label]`` names each pixel (0 = "background" when a background threshold
    was set, classes 1..K; otherwise classes 0..K-1). probabilities (C, H, W) float32, C = len(class_names): the
    scores the label is the argmax of (before ``refine``, which moves labels only): each class channel is the
    NVlabs score (in [0, 1]) of the pixel's group, the background channel the share of windows that called the
    pixel background; averaged over windows and resized bilinearly, not normalised to sum to 1. group_map (H, W)
    int32: the hard group of each pixel (ids offset per window in sliding mode, so groups of different windows
    differ).
    """

    label_map: np.ndarray
    probabilities: np.ndarray
    group_map: np.ndarray
    class_names: Tuple[str, ...]
    has_background: bool = False

    def class_shares(self) -> Dict[str, float]:
        """Fraction of pixels per class name (every class, in label order)."""
        counts = np.bincount(self.label_map.ravel(), minlength=len(self.class_names))
        total = float(self.label_map.size)
        return {name: float(counts[i]) / total for i, name in enumerate(self.class_names)}


class _OneWindow:
    """The accumulator of an image that one window covers: the window's scores are the average as they come
    (what WindowAccumulator's sum into zeros and division by a count of one would give), without those passes."""

    def __init__(self) -> None:
        self.scores: Optional[np.ndarray] = None
        self.groups: Optional[np.ndarray] = None

    def add(self, window: Window, scores: np.ndarray, groups: np.ndarray, num_groups: int = 0) -> None:
        self.scores, self.groups = scores, groups.astype(np.int32)  # scores: the caller's fresh array, kept

    def average(self) -> np.ndarray:
        return self.scores


@dataclass
class _Pending:
    """Per-image state while its windows run."""

    original_size: Tuple[int, int]
    accumulator: Union[WindowAccumulator, _OneWindow]
    image: Optional[np.ndarray] = None  # the RGB image, kept only for refine


def _backend_attribute(backend: Any, name: str) -> Any:
    if not hasattr(backend, name):
        raise TypeError(f"the segmentation backend {type(backend).__name__} has no {name!r}")
    return getattr(backend, name)


class ZeroShotSegmenter:
    """Segments images into a fixed set of class names with a GroupViT ``SegmentationBackend``.

    ``set_classes`` encodes the class prompts once; ``segment`` then takes a list of images (PIL images, uint8
    arrays (H, W[, C]) or file paths) and returns one ``SegmentationResult`` per image, windows of all images
    batched through the model ``batch_size`` at a time. Normalisation: ``image_processor``'s image_mean/image_std
    and rescale_factor if given (nothing else of it is used: resizing is part of the protocol), else ``preset``.
    ``refine``: the label map refined on the image's pixels (``refine_label_map``, step 6 of the module
    docstring; not the paper's protocol, off by default); ``probabilities`` stay the model's scores.
    """

    def __init__(self, backend: Any, tokenizer: Any = None, image_processor: Any = None,
                 preset: str = DEFAULT_PRESET, *, window: str = "slide",
                 background_threshold: Optional[float] = None, top_k: Optional[int] = TOP_K,
                 short_side: Optional[int] = SHORT_SIDE, max_long_side: int = MAX_LONG_SIDE,
                 window_size: int = WINDOW_SIZE, stride: int = WINDOW_STRIDE, batch_size: int = 4,
                 logit_scale_max: float = LOGIT_SCALE_MAX, refine: bool = False) -> None:
        for name in ("encode_text", "encode_image", "logit_scale", "patch_size"):
            _backend_attribute(backend, name)
        self.backend = backend
        self.tokenizer = tokenizer
        self.mean, self.std, self.rescale_factor = _normalization(image_processor, preset)
        if window not in WINDOW_MODES:
            raise ValueError(f"window must be one of {WINDOW_MODES}, got {window!r}")
        self.window = window
        self.background_threshold = _check_threshold(background_threshold)
        if top_k is not None:
            top_k = _check_positive("top_k", top_k)
        self.top_k = top_k
        self.short_side = None if short_side is None else _check_positive("short_side", short_side)
        self.max_long_side = _check_positive("max_long_side", max_long_side)
        self.window_size = _check_positive("window_size", window_size)
        self.stride = _check_positive("stride", stride)
        if self.stride > self.window_size:
            raise ValueError(f"stride ({stride}) must not exceed window_size ({window_size})")
        self.batch_size = _check_positive("batch_size", batch_size)
        self.logit_scale_max = float(logit_scale_max)
        if not isinstance(refine, (bool, np.bool_)):
            raise TypeError(f"refine must be True or False, got {type(refine).__name__}")
        self.refine = bool(refine)
        self.class_names: Optional[Tuple[str, ...]] = None
        self.text_embeddings: Optional[np.ndarray] = None

    # -- classes ---------------------------------------------------------------------------------------------

    def set_classes(self, names: Sequence[str], templates: Union[None, str, Sequence[str]] = None,
                    text_batch_size: int = 256) -> np.ndarray:
        """Encode the prompts of ``names`` once and keep the (K, D) embeddings for every later image."""
        names = check_class_names(names)
        templates = resolve_templates(templates)
        if self.tokenizer is None:
            raise ValueError("this segmenter has no tokenizer: pass one, or use set_class_embeddings")
        prompts = build_prompts(names, templates)
        max_length = getattr(self.backend, "max_text_length", None)
        chunks = []
        for start in range(0, len(prompts), text_batch_size):
            batch = self.tokenizer(prompts[start:start + text_batch_size], padding="longest",
                                   max_length=max_length, truncation=True, return_tensors="np")
            chunks.append(np.asarray(self.backend.encode_text(batch["input_ids"], batch["attention_mask"])))
        embeddings = average_template_embeddings(np.concatenate(chunks, axis=0), len(names), len(templates))
        return self.set_class_embeddings(names, embeddings)

    def set_class_embeddings(self, names: Sequence[str], embeddings: np.ndarray) -> np.ndarray:
        """Use precomputed (K, D) text embeddings (they are L2-normalised here) for the classes ``names``."""
        names = check_class_names(names)
        embeddings = np.asarray(embeddings)
        if embeddings.ndim != 2 or embeddings.shape[0] != len(names):
            raise ValueError(f"expected ({len(names)}, D) text embeddings for {len(names)} classes, "
                             f"got shape {embeddings.shape}")
        if not np.all(np.isfinite(embeddings)):
            raise ValueError("text embeddings contain NaN or infinite values")
        self.class_names = tuple(names)
        self.text_embeddings = l2_normalize(embeddings).astype(np.float32)
        return self.text_embeddings

    @property
    def output_class_names(self) -> Tuple[str, ...]:
        if self.class_names is None:
            raise ValueError("no classes set: call set_classes(names) first")
        return (("background",) if self.background_threshold is not None else ()) + self.class_names

    # -- images ----------------------------------------------------------------------------------------------

    def prepare(self, image: Any) -> Tuple[np.ndarray, np.ndarray]:
        """One image -> (RGB uint8 (H0, W0, 3), normalised float32 (3, H, W) after the short-side resize)."""
        from .image import to_rgb_array  # Pillow is imported only when images are used

        rgb = to_rgb_array(image)
        height, width = rgb.shape[:2]
        if self.short_side is not None:
            height, width = rescaled_size(height, width, self.short_side, self.max_long_side)
        resized = resize_image_uint8(rgb, height, width)
        # Normalised through a table of the 256 levels per channel: the arithmetic applied to each pixel,
        # ((level * rescale_factor) as float32 - mean) / std, done once per level instead of once per pixel.
        levels = (np.arange(256, dtype=np.float64) * self.rescale_factor).astype(np.float32)
        mean, std = (np.broadcast_to(v, (3,)).reshape(3, 1) for v in (self.mean, self.std))
        table = ((levels[None, :] - mean) / std).astype(np.float32)  # (3, 256)
        pixels = np.empty((3, height, width), dtype=np.float32)
        for channel in range(3):
            np.take(table[channel], resized[:, :, channel], out=pixels[channel])
        return rgb, pixels

    def windows_for(self, height: int, width: int) -> List[Window]:
        if self.window == "whole":
            return [Window(0, 0, height, width)]
        return plan_windows(height, width, self.window_size, self.stride)

    def model_input_size(self, height: int, width: int) -> Tuple[int, int]:
        """A window's size rounded to the nearest multiple of the patch size (at least one patch)."""
        patch = int(self.backend.patch_size)
        return (max(patch, int(round(height / patch)) * patch), max(patch, int(round(width / patch)) * patch))

    def segment(self, images: Sequence[Any], progress: Optional[Callable[[int], None]] = None,
                ) -> List[SegmentationResult]:
        """Segment a list of images -> a list of results (one per image, at the image's size)."""
        if self.text_embeddings is None:
            raise ValueError("no classes set: call set_classes(names) first")
        if isinstance(images, (str, bytes)) or not isinstance(images, (list, tuple)):
            raise TypeError("segment expects a list of images; wrap a single image as [image]")
        if not images:
            raise ValueError("segment got an empty list of images")
        names = self.output_class_names
        pending: List[_Pending] = []
        tasks: Dict[Tuple[int, int], List[Tuple[int, Window, np.ndarray]]] = {}
        for index, image in enumerate(images):
            rgb, pixels = self.prepare(image)
            height, width = pixels.shape[1:]
            windows = self.windows_for(height, width)
            accumulator = WindowAccumulator(len(names), height, width) if len(windows) > 1 else _OneWindow()
            pending.append(_Pending(rgb.shape[:2], accumulator, rgb if self.refine else None))
            for window in windows:
                crop = pixels[:, window.top:window.bottom, window.left:window.right]
                size = self.model_input_size(window.height, window.width)
                if size != (window.height, window.width):
                    crop = resize_bilinear(crop, *size)
                tasks.setdefault(size, []).append((index, window, crop))
        for size, items in tasks.items():
            for start in range(0, len(items), self.batch_size):
                chunk = items[start:start + self.batch_size]
                encoded = self.backend.encode_image(np.stack([crop for _, _, crop in chunk]))
                self._accumulate(chunk, encoded, pending)
        results = []
        for state in pending:
            results.append(self._finish(state, names))
            if progress is not None:
                progress(1)
        return results

    def segment_image(self, image: Any) -> SegmentationResult:
        return self.segment([image])[0]

    def _accumulate(self, chunk, encoded: Mapping[str, Any], pending: List[_Pending]) -> None:
        group_embeds = np.asarray(encoded["group_embeds"])
        image_embeds = np.asarray(encoded["image_embeds"])
        assignments = [np.asarray(a) for a in encoded["assignments"]]
        grid = tuple(int(v) for v in encoded["grid"])
        scale = float(self.backend.logit_scale)
        for row, (index, window, _) in enumerate(chunk):
            groups = hard_group_map([a[row] for a in assignments], grid, window.height, window.width)
            table = group_class_scores(group_embeds[row], image_embeds[row], self.text_embeddings, scale,
                                       self.top_k, self.background_threshold, self.logit_scale_max)
            # (channels, height, width), C-contiguous (np.take; fancy indexing would lay the channels out last)
            scores = np.take(np.ascontiguousarray(table.T, dtype=np.float32), groups, axis=1)
            pending[index].accumulator.add(window, scores, groups, num_groups=group_embeds.shape[1])

    def _finish(self, state: _Pending, names: Tuple[str, ...]) -> SegmentationResult:
        height, width = state.original_size
        average = state.accumulator.average()  # (channels, h, w) float32, a fresh array
        scores = _resize_axis(_resize_axis(average, height, 1), width, 2)  # (channels, H, W)
        groups = resize_nearest(state.accumulator.groups, height, width)
        label_map = argmax_first_axis(scores).astype(np.int32)
        if state.image is not None:
            label_map = refine_label_map(state.image, label_map, len(names))
        return SegmentationResult(
            label_map=label_map,
            probabilities=scores,
            group_map=groups.astype(np.int32),
            class_names=names,
            has_background=self.background_threshold is not None,
        )


def _check_threshold(value: Any) -> Optional[float]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise TypeError(f"background_threshold must be a number or None, got {type(value).__name__}")
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"background_threshold must be in [0, 1], got {value}")
    return value


def _normalization(image_processor: Any, preset: str) -> Tuple[np.ndarray, np.ndarray, float]:
    if image_processor is not None:
        mean = np.asarray(image_processor.image_mean, dtype=np.float32)
        std = np.asarray(image_processor.image_std, dtype=np.float32)
        factor = float(getattr(image_processor, "rescale_factor", 1 / 255))
        return mean, std, factor
    from .image import NORMALIZATION_PRESETS

    if preset not in NORMALIZATION_PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(NORMALIZATION_PRESETS)}")
    mean, std = NORMALIZATION_PRESETS[preset]
    return np.asarray(mean, dtype=np.float32), np.asarray(std, dtype=np.float32), 1 / 255


# ----------------------------------------------------------------------------------------------------------------
# Backends
# ----------------------------------------------------------------------------------------------------------------

FRAMEWORKS = ("pt", "tf")
_FRAMEWORK_MODULES = {"pt": "torch", "tf": "tensorflow"}


def default_framework() -> str:
    """'pt' when torch is installed, else 'tf' when TensorFlow is; checked without importing either."""
    for name in FRAMEWORKS:
        if importlib.util.find_spec(_FRAMEWORK_MODULES[name]) is not None:
            return name
    raise OSError("neither PyTorch nor TensorFlow is installed: pip install 'groupvit[torch]' or 'groupvit[tf]'")


def load_backend(path: Any, framework: Optional[str] = None) -> Any:
    """``SegmentationBackend.from_pretrained(path)`` of groupvit_pt or groupvit_tf (imported only here)."""
    framework = default_framework() if framework is None else framework
    if framework not in FRAMEWORKS:
        raise ValueError(f"framework must be one of {FRAMEWORKS}, got {framework!r}")
    if importlib.util.find_spec(_FRAMEWORK_MODULES[framework]) is None:
        raise OSError(f"framework {framework!r} needs {_FRAMEWORK_MODULES[framework]}, which is not installed")
    module = importlib.import_module(f"groupvit_{framework}.segmentation")
    return module.SegmentationBackend.from_pretrained(path)
