"""Pictures of segmentation results (Pillow and numpy only): label PNGs in the VOC palette, overlays with a
legend, and the hard groups in random colours. Every file is written atomically.
"""

from __future__ import annotations

import os
from typing import Any, Optional, Sequence, Union

import numpy as np

from .io_utils import atomic_path

PathLike = Union[str, "os.PathLike[str]"]


def voc_palette(num_colors: int = 256) -> np.ndarray:
    """(num_colors, 3) uint8: the PASCAL VOC colour map (bits of the label index spread over R, G, B)."""
    palette = np.zeros((num_colors, 3), dtype=np.uint8)
    for label in range(num_colors):
        value, red, green, blue = label, 0, 0, 0
        for shift in range(7, -1, -1):
            red |= (value & 1) << shift
            green |= ((value >> 1) & 1) << shift
            blue |= ((value >> 2) & 1) << shift
            value >>= 3
        palette[label] = (red, green, blue)
    return palette


def random_colors(num_colors: int, seed: int = 0) -> np.ndarray:
    """(num_colors, 3) uint8 colours drawn from a seeded generator, kept away from black."""
    rng = np.random.RandomState(seed)
    return rng.randint(40, 256, size=(num_colors, 3)).astype(np.uint8)


def _check_labels(label_map: Any, name: str = "label_map") -> np.ndarray:
    label_map = np.asarray(label_map)
    if label_map.ndim != 2:
        raise ValueError(f"{name} must be (H, W), got shape {label_map.shape}")
    if not np.issubdtype(label_map.dtype, np.integer):
        raise TypeError(f"{name} must hold integers, got {label_map.dtype}")
    if label_map.size and label_map.min() < 0:
        raise ValueError(f"{name} holds negative labels")
    return label_map


def _check_image(image: Any, shape: Sequence[int]):
    from .image import to_rgb_array

    rgb = to_rgb_array(image)
    if rgb.shape[:2] != tuple(shape):
        raise ValueError(f"image is {rgb.shape[1]}x{rgb.shape[0]} but the map is {shape[1]}x{shape[0]}")
    return rgb


def _save(image, path: PathLike) -> str:
    path = os.fspath(path)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return path


def label_image(label_map: np.ndarray, palette: Optional[np.ndarray] = None):
    """(H, W) labels in 0..255 -> palette-mode PIL image (VOC palette by default)."""
    from PIL import Image

    labels = _check_labels(label_map)
    if labels.size and labels.max() > 255:
        raise ValueError(f"a palette PNG holds labels up to 255, got {labels.max()}")
    data = np.ascontiguousarray(labels, dtype=np.uint8).tobytes()
    image = Image.frombytes("P", (labels.shape[1], labels.shape[0]), data)
    colors = voc_palette() if palette is None else np.asarray(palette, dtype=np.uint8)
    image.putpalette(colors.reshape(-1).tolist())
    return image


def save_label_png(path: PathLike, label_map: np.ndarray, palette: Optional[np.ndarray] = None) -> str:
    """Write the labels as a palette PNG (the pixel values are the labels; the palette only shows them)."""
    return _save(label_image(label_map, palette), path)


def colorize(label_map: np.ndarray, palette: Optional[np.ndarray] = None) -> np.ndarray:
    """(H, W) labels -> (H, W, 3) uint8 colours."""
    labels = _check_labels(label_map)
    colors = voc_palette(max(256, int(labels.max()) + 1 if labels.size else 256)) if palette is None else palette
    colors = np.asarray(colors, dtype=np.uint8)
    if labels.size and labels.max() >= len(colors):
        raise ValueError(f"label {labels.max()} has no colour in a palette of {len(colors)}")
    return colors[labels]


def blend(image: np.ndarray, colors: np.ndarray, alpha: float, mask: Optional[np.ndarray] = None) -> np.ndarray:
    """image * (1 - alpha) + colors * alpha (only where ``mask`` is True when given) -> uint8."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    mixed = image.astype(np.float32) * (1.0 - alpha) + colors.astype(np.float32) * alpha
    mixed = np.clip(np.rint(mixed), 0, 255).astype(np.uint8)
    if mask is None:
        return mixed
    return np.where(mask[..., None], mixed, image)


def _legend_panel(entries: Sequence[tuple], height: int):
    """A white panel listing (colour, text) entries with swatches, at least ``height`` tall."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_height = 0
    text_width = 0
    for _, text in entries:
        left, top, right, bottom = probe.textbbox((0, 0), text, font=font)
        line_height = max(line_height, bottom - top)
        text_width = max(text_width, right - left)
    row = max(line_height, 10) + 6
    swatch = row - 4
    width = 8 + swatch + 6 + text_width + 8
    panel = Image.new("RGB", (width, max(height, 8 + row * len(entries))), (255, 255, 255))
    draw = ImageDraw.Draw(panel)
    for index, (color, text) in enumerate(entries):
        y = 4 + index * row
        draw.rectangle([8, y, 8 + swatch, y + swatch], fill=tuple(int(c) for c in color), outline=(0, 0, 0))
        draw.text((8 + swatch + 6, y), text, fill=(0, 0, 0), font=font)
    return panel


def overlay_image(image: Any, label_map: np.ndarray, class_names: Sequence[str], alpha: float = 0.5,
                  background_label: Optional[int] = None, palette: Optional[np.ndarray] = None):
    """The image with each class coloured over it and a legend on the right (classes present, largest first).

    ``background_label`` pixels are left uncoloured (NVlabs' overlay with background).
    """
    from PIL import Image

    labels = _check_labels(label_map)
    rgb = _check_image(image, labels.shape)
    if labels.size and labels.max() >= len(class_names):
        raise ValueError(f"label {labels.max()} has no name among {len(class_names)} class names")
    colors = voc_palette() if palette is None else np.asarray(palette, dtype=np.uint8)
    mask = None if background_label is None else labels != background_label
    picture = Image.fromarray(blend(rgb, colorize(labels, colors), alpha, mask), "RGB")
    counts = np.bincount(labels.ravel(), minlength=len(class_names))
    order = [label for label in np.argsort(-counts, kind="stable") if counts[label] > 0]
    entries = [(colors[label], f"{class_names[label]} {100.0 * counts[label] / labels.size:.1f}%"
                + (" (not coloured)" if label == background_label else "")) for label in order]
    panel = _legend_panel(entries, picture.height)
    canvas = Image.new("RGB", (picture.width + panel.width, max(picture.height, panel.height)), (255, 255, 255))
    canvas.paste(picture, (0, 0))
    canvas.paste(panel, (picture.width, 0))
    return canvas


def save_overlay_png(path: PathLike, image: Any, label_map: np.ndarray, class_names: Sequence[str],
                     alpha: float = 0.5, background_label: Optional[int] = None,
                     palette: Optional[np.ndarray] = None) -> str:
    return _save(overlay_image(image, label_map, class_names, alpha, background_label, palette), path)


def group_boundaries(group_map: np.ndarray) -> np.ndarray:
    """(H, W) bool: pixels whose right or lower neighbour belongs to another group."""
    edges = np.zeros(group_map.shape, dtype=bool)
    edges[:, :-1] |= group_map[:, :-1] != group_map[:, 1:]
    edges[:-1, :] |= group_map[:-1, :] != group_map[1:, :]
    return edges


def groups_image(image: Any, group_map: np.ndarray, alpha: float = 0.6, seed: int = 0):
    """The image with each group in a random colour and the group borders drawn in black."""
    from PIL import Image

    groups = _check_labels(group_map, "group_map")
    rgb = _check_image(image, groups.shape)
    _, dense = np.unique(groups, return_inverse=True)
    dense = dense.reshape(groups.shape)
    colors = random_colors(int(dense.max()) + 1 if dense.size else 1, seed)
    picture = blend(rgb, colors[dense], alpha)
    picture[group_boundaries(groups)] = 0
    return Image.fromarray(picture, "RGB")


def save_groups_png(path: PathLike, image: Any, group_map: np.ndarray, alpha: float = 0.6, seed: int = 0) -> str:
    return _save(groups_image(image, group_map, alpha, seed), path)
