"""A synthetic world for training and measuring text-supervised segmentation (numpy + Pillow only).

Each scene is a small RGB image (64 px by default) of one nameable textured background ("grass", "sand",
"water", "asphalt") with one to three coloured shapes on it ("red circle", "blue square", "yellow triangle", ...),
a caption written from the scene ("a red circle above a blue square on grass.") and a ground-truth label mask.
The mask is for evaluation only: training sees the image and the caption (and the entity names parsed from the
caption, see ``groupvit_core.losses``).

Everything is seeded: scene ``i`` of a split is drawn from ``numpy.random.default_rng([SPLIT_SEEDS[split], i])``,
and the train, validation ("val", used to pick a checkpoint during training) and test splits use different root
seeds, so they never share a scene seed.

Labels (``CLASS_NAMES``): 0 is "background" (kept for the VOC layout, never used by a mask: every pixel is one of
the named backgrounds or objects), then the backgrounds, then the objects. ``write_voc_split`` exports a split in
the VOC layout (``groupvit_core.datasets.write_voc_layout``) so that ``groupvit evaluate --format voc
--background-threshold 0`` reads it.

``python -m groupvit_core.synthetic --demo OUT.png`` writes a demo scene (and prints its caption and labels).
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np

BACKGROUNDS: Tuple[str, ...] = ("grass", "sand", "water", "asphalt")
COLORS: Tuple[str, ...] = ("red", "blue", "yellow")
SHAPES: Tuple[str, ...] = ("circle", "square", "triangle")
OBJECTS: Tuple[str, ...] = tuple(f"{color} {shape}" for color in COLORS for shape in SHAPES)
# Label 0 is the VOC "background" slot; masks never use it (every pixel has a name).
CLASS_NAMES: Tuple[str, ...] = ("background",) + BACKGROUNDS + OBJECTS
ENTITY_NAMES: Tuple[str, ...] = BACKGROUNDS + OBJECTS  # label = index + 1

COLOR_RGB = {
    "red": (215, 40, 40),
    "blue": (40, 70, 220),
    "yellow": (240, 215, 40),
}

SPLIT_SEEDS = {"train": 1_000_003, "test": 2_000_003, "demo": 3_000_017, "val": 4_000_037}
DEFAULT_SIZE = 64


@dataclass
class Scene:
    """One generated scene: image (H, W, 3) uint8, mask (H, W) uint8 labels into CLASS_NAMES, the caption, the
    labels of the entities present (background first, then the objects in caption order)."""

    image: np.ndarray
    mask: np.ndarray
    caption: str
    labels: List[int] = field(default_factory=list)

    @property
    def entity_names(self) -> List[str]:
        return [CLASS_NAMES[label] for label in self.labels]


def label_of(name: str) -> int:
    """The label of an entity name ("grass", "red circle", ...)."""
    try:
        return CLASS_NAMES.index(name)
    except ValueError:
        raise ValueError(f"unknown entity {name!r}; known: {', '.join(ENTITY_NAMES)}") from None


# ----------------------------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------------------------


def _smooth_noise(rng: np.random.Generator, size: int, cell: int) -> np.ndarray:
    """Value noise in [0, 1]: a coarse random grid upsampled bilinearly to (size, size)."""
    cells = max(size // cell, 1) + 2
    coarse = rng.random((cells, cells))
    coords = np.arange(size) / cell
    i0 = np.floor(coords).astype(int)
    t = coords - i0
    rows = coarse[i0][:, :] * (1 - t)[:, None] + coarse[i0 + 1] * t[:, None]
    return rows[:, i0] * (1 - t)[None, :] + rows[:, i0 + 1] * t[None, :]


def _texture(name: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """A (size, size, 3) float texture of a named background."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    fine = rng.random((size, size))
    if name == "grass":
        base = np.array([55, 135, 45], np.float64)
        blades = rng.random((1, size)) * 0.6 + 0.7 + 0.25 * np.sin(yy / rng.uniform(1.5, 3.0) + rng.random((1, size)) * 6)
        shade = blades * (0.85 + 0.3 * _smooth_noise(rng, size, 12))
        image = base[None, None] * shade[..., None] + 18 * (fine[..., None] - 0.5)
    elif name == "sand":
        base = np.array([214, 190, 140], np.float64)
        ripple = 0.9 + 0.1 * np.sin((xx + 0.5 * yy) / rng.uniform(2.0, 3.5))
        image = base[None, None] * ripple[..., None] * (0.92 + 0.16 * _smooth_noise(rng, size, 16))[..., None]
        image += 40 * (fine[..., None] - 0.5)
    elif name == "water":
        base = np.array([30, 140, 160], np.float64)
        phase = rng.uniform(0, 2 * np.pi)
        waves = 0.8 + 0.25 * np.sin(yy / rng.uniform(1.8, 3.0) + 0.8 * np.sin(xx / 6.0 + phase))
        image = base[None, None] * waves[..., None] + 10 * (fine[..., None] - 0.5)
    elif name == "asphalt":
        base = np.array([78, 78, 84], np.float64)
        image = base[None, None] * (0.85 + 0.3 * _smooth_noise(rng, size, 8))[..., None]
        speckle = (fine > 0.93) * 60.0 - (fine < 0.05) * 30.0
        image += speckle[..., None] + 12 * (rng.random((size, size, 1)) - 0.5)
    else:  # pragma: no cover - guarded by BACKGROUNDS
        raise ValueError(f"unknown background {name!r}")
    return image


def _shape_mask(shape: str, cy: float, cx: float, radius: float, angle: float, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    dy, dx = yy - cy, xx - cx
    if shape == "circle":
        return dy * dy + dx * dx <= radius * radius
    cos, sin = np.cos(angle), np.sin(angle)
    u, v = cos * dx + sin * dy, -sin * dx + cos * dy
    if shape == "square":
        half = radius * 0.85
        return (np.abs(u) <= half) & (np.abs(v) <= half)
    if shape == "triangle":
        # an equilateral triangle with circumradius ~1.15 * radius, apex at angle
        r = radius * 1.2
        inside = np.ones_like(u, dtype=bool)
        for k in range(3):
            theta = angle + np.pi / 2 + k * 2 * np.pi / 3
            nx, ny = np.cos(theta), np.sin(theta)
            inside &= (dx * nx + dy * ny) <= r * 0.5
        return inside
    raise ValueError(f"unknown shape {shape!r}")  # pragma: no cover


def _relation(a: Tuple[float, float], b: Tuple[float, float]) -> str:
    dy, dx = b[0] - a[0], b[1] - a[1]
    if abs(dy) >= abs(dx):
        return "above" if dy > 0 else "below"
    return "left of" if dx > 0 else "right of"


def make_scene(rng: np.random.Generator, size: int = DEFAULT_SIZE, max_objects: int = 3) -> Scene:
    """Draw one scene from ``rng``."""
    background = int(rng.integers(len(BACKGROUNDS)))
    ground = _texture(BACKGROUNDS[background], rng, size)
    image = ground.copy()
    mask = np.full((size, size), 1 + background, dtype=np.uint8)
    count = int(rng.integers(1, max_objects + 1))
    kinds = rng.choice(len(OBJECTS), size=count, replace=False)
    placed: List[Tuple[int, Tuple[float, float], np.ndarray]] = []
    scale = size / 64.0
    for kind in kinds:
        color, shape = OBJECTS[kind].split(" ")
        for _ in range(20):  # rejection sampling: keep objects mostly apart
            radius = rng.uniform(8.0, 14.0) * scale
            cy, cx = rng.uniform(radius * 0.8, size - radius * 0.8, size=2)
            if all(np.hypot(cy - c[0], cx - c[1]) > 0.75 * (radius + r) for _, c, r in placed):
                break
        shape_mask = _shape_mask(shape, cy, cx, radius, rng.uniform(0, 2 * np.pi), size)
        rgb = np.array(COLOR_RGB[color], np.float64)
        shade = 0.85 + 0.3 * _smooth_noise(rng, size, 10)
        fill = rgb[None, None] * shade[..., None] + 14 * (rng.random((size, size, 1)) - 0.5)
        image = np.where(shape_mask[..., None], fill, image)
        label = CLASS_NAMES.index(OBJECTS[kind])
        mask[shape_mask] = label
        placed.append((label, (cy, cx), radius))
    # Objects hidden (mostly) behind later ones are dropped: their leftover pixels become background again.
    visible = []
    for label, centre, radius in placed:
        pixels = mask == label
        if np.sum(pixels) >= 0.35 * np.pi * radius * radius:
            visible.append((label, centre))
        else:
            image[pixels] = ground[pixels]
            mask[pixels] = 1 + background
    caption = describe([lab for lab, _ in visible], [c for _, c in visible], background)
    labels = [1 + background] + [lab for lab, _ in visible]
    image = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    return Scene(image=image, mask=mask, caption=caption, labels=labels)


def describe(labels: Sequence[int], centres: Sequence[Tuple[float, float]], background: int) -> str:
    """A caption for objects (labels, centres) on a background index."""
    names = [CLASS_NAMES[label] for label in labels]
    ground = BACKGROUNDS[background]
    if not names:
        return f"a photo of {ground}."
    if len(names) == 1:
        return f"a {names[0]} on {ground}."
    if len(names) == 2:
        return f"a {names[0]} {_relation(centres[0], centres[1])} a {names[1]} on {ground}."
    return f"a {names[0]}, a {names[1]} and a {names[2]} on {ground}."


def scene_rng(split: str, index: int) -> np.random.Generator:
    if split not in SPLIT_SEEDS:
        raise ValueError(f"unknown split {split!r}; choose one of {sorted(SPLIT_SEEDS)}")
    if index < 0:
        raise ValueError(f"scene index must be non-negative, got {index}")
    return np.random.default_rng([SPLIT_SEEDS[split], int(index)])


def generate(split: str, index: int, size: int = DEFAULT_SIZE, max_objects: int = 3) -> Scene:
    """Scene ``index`` of ``split`` ('train', 'val', 'test' or 'demo'); the same arguments always give the same
    scene."""
    if size < 16:
        raise ValueError(f"image size must be at least 16 px, got {size}")
    if max_objects < 0:
        raise ValueError(f"max_objects must be non-negative, got {max_objects}")
    return make_scene(scene_rng(split, index), size, max_objects)


def iter_scenes(split: str, count: int, start: int = 0, size: int = DEFAULT_SIZE,
                max_objects: int = 3) -> Iterator[Scene]:
    for index in range(start, start + count):
        yield generate(split, index, size, max_objects)


def write_voc_split(root: str, split: str = "test", count: int = 200, size: int = DEFAULT_SIZE,
                    max_objects: int = 3, image_format: str = "jpg") -> List[str]:
    """Export ``count`` scenes of ``split`` in the VOC layout under ``root`` (images, palette masks,
    ImageSets/Segmentation/val.txt, class_names.txt) for ``groupvit evaluate --format voc``.

    JPEG (the layout's format) is lossy; the masks are exact. Also writes ``captions.txt`` (name, tab, caption).
    """
    from .datasets import write_voc_layout
    from .io_utils import atomic_write_text

    scenes = [(f"{split}_{index:05d}", generate(split, index, size, max_objects)) for index in range(count)]
    names = write_voc_layout(root, ((name, s.image, s.mask) for name, s in scenes), split="val",
                             class_names=CLASS_NAMES, image_format=image_format)
    atomic_write_text(os.path.join(root, "captions.txt"), "".join(f"{n}\t{s.caption}\n" for n, s in scenes))
    return names


def model_pixels(images: np.ndarray, preset: str = "imagenet") -> np.ndarray:
    """uint8 scenes (n, H, W, 3) normalised for the model with ``preset``'s mean and std: (n, 3, H, W) float32."""
    from .image import NORMALIZATION_PRESETS

    mean, std = (np.asarray(v, np.float32) for v in NORMALIZATION_PRESETS[preset])
    scaled = np.asarray(images).astype(np.float32) / 255.0
    return np.ascontiguousarray(((scaled - mean) / std).transpose(0, 3, 1, 2), dtype=np.float32)


class TrainingData:
    """A pool of training scenes ready for a model: images normalised (N, 3, H, W) float32, captions and every
    (template, class) prompt tokenised, and the multi-hot entity targets parsed from the captions (never from
    the masks). ``numpy_batch(step, ...)`` draws a batch from ``(seed, step)`` alone, so runs are reproducible
    and resumable, and splits it between data-parallel processes."""

    def __init__(self, tokenizer, pool_size: int, image_size: int = DEFAULT_SIZE, max_objects: int = 3,
                 max_text_length: int = 32, preset: str = "imagenet", split: str = "train",
                 class_names: Sequence[str] = ENTITY_NAMES, templates: Optional[Sequence[str]] = None) -> None:
        from . import losses
        from .image import NORMALIZATION_PRESETS

        if preset not in NORMALIZATION_PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(NORMALIZATION_PRESETS)}")
        if pool_size < 1:
            raise ValueError(f"pool_size must be positive, got {pool_size}")
        self.preset = preset
        scenes = list(iter_scenes(split, pool_size, size=image_size, max_objects=max_objects))
        # kept as uint8 (a quarter of float32's memory: large pools fit) and normalised per batch
        self.images = np.stack([s.image for s in scenes])
        self.captions = [s.caption for s in scenes]
        self.class_names = list(class_names)
        entities = [losses.parse_entities(c, self.class_names) for c in self.captions]
        self.targets = losses.entity_targets(entities, self.class_names)
        tokens = tokenizer(self.captions, padding="max_length", max_length=max_text_length, truncation=True,
                           return_tensors="np")
        self.caption_ids = np.asarray(tokens["input_ids"], np.int64)
        self.caption_mask = np.asarray(tokens["attention_mask"], np.int64)
        self.templates = list(losses.PROMPT_TEMPLATES if templates is None else templates)
        prompts = [t.format(name) for t in self.templates for name in self.class_names]
        tokens = tokenizer(prompts, padding="max_length", max_length=max_text_length, truncation=True,
                           return_tensors="np")
        shape = (len(self.templates), len(self.class_names), max_text_length)
        self.prompt_ids = np.asarray(tokens["input_ids"], np.int64).reshape(shape)
        self.prompt_mask = np.asarray(tokens["attention_mask"], np.int64).reshape(shape)

    def __len__(self) -> int:
        return len(self.captions)

    def pixels(self, index) -> np.ndarray:
        """Scenes ``index`` normalised for the model: (n, 3, H, W) float32."""
        return model_pixels(self.images[index], self.preset)

    def numpy_batch(self, step: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                    affinity_patch: int = 0):
        """dict of numpy: pixel_values, input_ids, attention_mask (this process' images and captions),
        prompt_ids, prompt_mask (one prompt per class, template drawn per step) and targets (multi-hot); with
        ``affinity_patch`` (the model's patch size) also patch_affinity, ``losses.patch_affinities`` of the
        images (what ``TrainConfig.affinity_weight`` trains with)."""
        rng = np.random.default_rng([seed, step])
        index = rng.choice(len(self), size=batch_size, replace=len(self) < batch_size)
        template = rng.integers(len(self.templates), size=len(self.class_names))
        index = np.array_split(index, world_size)[rank]
        classes = np.arange(len(self.class_names))
        batch = dict(
            pixel_values=self.pixels(index),
            input_ids=self.caption_ids[index],
            attention_mask=self.caption_mask[index],
            prompt_ids=self.prompt_ids[template, classes],
            prompt_mask=self.prompt_mask[template, classes],
            targets=self.targets[index],
        )
        if affinity_patch:
            from . import losses

            batch["patch_affinity"] = losses.patch_affinities(self.images[index], int(affinity_patch))
        return batch


def save_demo(path: str, index: int = 0, size: int = 128) -> Scene:
    """Write demo scene ``index`` (128 px by default, drawn at 64 px and upscaled nearest) as a PNG."""
    from PIL import Image

    from .io_utils import atomic_path

    scene = generate("demo", index, DEFAULT_SIZE)
    image = Image.fromarray(scene.image, "RGB")
    if size != DEFAULT_SIZE:
        image = image.resize((size, size), Image.NEAREST)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return scene


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m groupvit_core.synthetic",
                                     description="Generate synthetic scenes (demo image or a VOC-layout split).")
    parser.add_argument("--demo", metavar="OUT.png", help="write a demo scene as a PNG")
    parser.add_argument("--index", type=int, default=0, help="which demo scene (default 0)")
    parser.add_argument("--voc", metavar="DIR", help="write a split in the VOC layout to DIR")
    parser.add_argument("--split", default="test", choices=("train", "test"), help="split for --voc")
    parser.add_argument("--count", type=int, default=200, help="scenes for --voc (default 200)")
    args = parser.parse_args(argv)
    if not args.demo and not args.voc:
        parser.error("give --demo OUT.png and/or --voc DIR")
    if args.demo:
        scene = save_demo(args.demo, args.index)
        print(f"wrote {args.demo}: {scene.caption}")
        print("labels: " + ",".join(ENTITY_NAMES))
    if args.voc:
        names = write_voc_split(args.voc, args.split, args.count)
        print(f"wrote {len(names)} scenes of split {args.split!r} to {args.voc}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
