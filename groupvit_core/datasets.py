"""Segmentation datasets on disk and their metrics: readers for the layouts the paper evaluates on, mIoU from a
confusion matrix, and a writer for the VOC layout (numpy and Pillow only).

Layouts (as mmseg and the NVlabs configs read them; ``root`` may also be a parent such as ``VOCdevkit``):

- ``voc``: ``JPEGImages/<id>.jpg``, ``SegmentationClass/<id>.png`` (palette PNG, 255 = ignore),
  ``ImageSets/Segmentation/val.txt``. Root ``VOCdevkit/VOC2012``. A ``class_names.txt`` next to them (one name a
  line, line 0 the background), as ``write_voc_layout`` writes, replaces the VOC class names.
- ``context``: ``JPEGImages/<id>.jpg``, ``SegmentationClassContext/<id>.png`` (0 = background, 1..59),
  ``ImageSets/SegmentationContext/val.txt``. Root ``VOCdevkit/VOC2010`` after mmseg's ``pascal_context.py``.
- ``coco-object``: ``images/val2017/<id>.jpg``, ``annotations/val2017/<id>_instanceTrainIds.png`` (0 =
  background, 1..80 the things), every image of ``images/val2017``. Root ``local_data/coco`` after NVlabs'
  ``convert_dataset/convert_coco_object.py``.

Class names and background thresholds are those of the NVlabs configs (``PRESETS``); labels index
``class_names`` with 0 = background in all three. Metrics follow mmseg: per-class IoU = TP / (TP + FP + FN)
over the whole dataset (NaN for a class absent from both ground truth and predictions), mIoU = nanmean, pixel
accuracy = correct / labelled pixels; pixels labelled ``ignore_index`` (255) are left out.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from .io_utils import atomic_path, atomic_write_text

IGNORE_INDEX = 255
CLASS_NAMES_FILE = "class_names.txt"

VOC_CLASSES: Tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "table",
    "dog", "horse", "motorbike", "person", "plant", "sheep", "sofa", "train", "monitor",
)

CONTEXT_CLASSES: Tuple[str, ...] = (
    "background", "airplane", "bag", "bed", "bedclothes", "bench", "bicycle", "bird", "boat", "book", "bottle",
    "building", "bus", "cabinet", "car", "cat", "ceiling", "chair", "cloth", "computer", "cow", "cup", "curtain",
    "dog", "door", "fence", "floor", "flower", "food", "grass", "ground", "horse", "keyboard", "light",
    "motorbike", "mountain", "mouse", "person", "plate", "platform", "plant", "road", "rock", "sheep", "shelves",
    "sidewalk", "sign", "sky", "snow", "sofa", "table", "track", "train", "tree", "truck", "monitor", "wall",
    "water", "window", "wood",
)

COCO_OBJECT_CLASSES: Tuple[str, ...] = (
    "background", "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep",
    "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush",
)


@dataclass(frozen=True)
class DatasetPreset:
    """A benchmark as the NVlabs configs define it. ``class_names[0]`` is the background."""

    name: str
    class_names: Tuple[str, ...]
    background_threshold: float
    image_dir: str
    mask_dir: str
    split_file: Optional[str]  # None: every image of image_dir
    image_suffix: str
    mask_suffix: str
    parents: Tuple[str, ...]  # sub-directories tried when root itself lacks the layout

    @property
    def foreground_names(self) -> Tuple[str, ...]:
        return self.class_names[1:]


PRESETS: Dict[str, DatasetPreset] = {
    "voc": DatasetPreset("voc", VOC_CLASSES, 0.95, "JPEGImages", "SegmentationClass",
                         os.path.join("ImageSets", "Segmentation", "val.txt"), ".jpg", ".png",
                         ("VOC2012", os.path.join("VOCdevkit", "VOC2012"))),
    "context": DatasetPreset("context", CONTEXT_CLASSES, 0.35, "JPEGImages", "SegmentationClassContext",
                             os.path.join("ImageSets", "SegmentationContext", "val.txt"), ".jpg", ".png",
                             ("VOC2010", os.path.join("VOCdevkit", "VOC2010"))),
    "coco-object": DatasetPreset("coco-object", COCO_OBJECT_CLASSES, 0.95, os.path.join("images", "val2017"),
                                 os.path.join("annotations", "val2017"), None, ".jpg", "_instanceTrainIds.png",
                                 ("coco",)),
}

# Published mIoU (%) of the released checkpoints, Table 2 / NVlabs README.
PUBLISHED_MIOU: Dict[str, Dict[str, float]] = {
    "nvidia/groupvit-gcc-yfcc": {"voc": 52.3, "context": 22.4, "coco-object": 24.3},
    "nvidia/groupvit-gcc-redcaps": {"voc": 50.8, "context": 23.7, "coco-object": 27.5},
}


def get_preset(name: str) -> DatasetPreset:
    if name not in PRESETS:
        raise ValueError(f"unknown dataset format {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]


# ----------------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Sample:
    name: str
    image: np.ndarray  # (H, W, 3) uint8 RGB
    mask: np.ndarray  # (H, W) uint8 labels, 255 = ignore
    image_path: str
    mask_path: str


def read_image(path: str) -> np.ndarray:
    """An image file -> (H, W, 3) uint8 RGB in its stored pixel layout.

    No EXIF rotation is applied: the masks of these datasets are drawn on the stored pixels. Only the formats of
    ``image.ALLOWED_IMAGE_FORMATS`` are opened.
    """
    from .image import open_image_file

    try:
        with open_image_file(path) as image:
            return np.asarray(image.convert("RGB"), dtype=np.uint8)
    except FileNotFoundError:
        raise OSError(f"cannot open image {path}: no such file") from None
    except (OSError, ValueError, SyntaxError) as err:
        raise OSError(f"cannot read image {path}: {err}") from None


def read_mask(path: str) -> np.ndarray:
    """A label PNG -> (H, W) uint8 of its stored values (palette indices for palette PNGs).

    Only the formats of ``image.ALLOWED_IMAGE_FORMATS`` are opened."""
    from .image import open_image_file

    try:
        with open_image_file(path) as image:
            if image.mode not in ("P", "L", "I", "I;16", "1"):
                raise OSError(f"mask mode {image.mode!r} is not a label image (expected palette or greyscale)")
            array = np.asarray(image)
    except FileNotFoundError:
        raise OSError(f"cannot open mask {path}: no such file") from None
    except (OSError, ValueError, SyntaxError) as err:
        raise OSError(f"cannot read mask {path}: {err}") from None
    if array.ndim != 2:
        raise OSError(f"mask {path} has shape {array.shape}; expected a single-channel label image")
    if array.dtype != np.uint8:
        if array.size and (array.min() < 0 or array.max() > 255):
            raise ValueError(f"mask {path} holds labels outside 0..255")
        array = array.astype(np.uint8)
    return array


class SegmentationDataset:
    """Image/mask pairs of one layout. ``dataset[i]`` reads a ``Sample``; ``class_names[0]`` is background."""

    def __init__(self, root: Union[str, "os.PathLike[str]"], format: str) -> None:
        self.preset = get_preset(format)
        self.format = format
        self.root = _find_root(os.fspath(root), self.preset)
        self.class_names: Tuple[str, ...] = self.preset.class_names
        self.custom_classes = False
        names_file = os.path.join(self.root, CLASS_NAMES_FILE)
        if os.path.isfile(names_file):
            self.class_names = read_class_names(names_file)
            self.custom_classes = True
        self.ids = self._list_ids()
        self._check_masks_exist()

    @property
    def background_threshold(self) -> float:
        return self.preset.background_threshold

    def _list_ids(self) -> List[str]:
        preset, root = self.preset, self.root
        if preset.split_file is not None:
            split = os.path.join(root, preset.split_file)
            with open(split, encoding="utf-8") as handle:
                ids = [line.strip() for line in handle if line.strip()]
            if not ids:
                raise ValueError(f"split file {split} lists no images")
            return ids
        image_dir = os.path.join(root, preset.image_dir)
        ids = sorted(name[: -len(preset.image_suffix)] for name in os.listdir(image_dir)
                     if name.endswith(preset.image_suffix))
        if not ids:
            raise ValueError(f"{image_dir} holds no *{preset.image_suffix} images")
        return ids

    def _check_masks_exist(self) -> None:
        for sample_id in self.ids:
            for path, what in ((self.image_path(sample_id), "image"), (self.mask_path(sample_id), "mask")):
                if not os.path.isfile(path):
                    raise OSError(f"{self.format} dataset at {self.root}: {what} {path} of {sample_id!r} is missing")

    def image_path(self, sample_id: str) -> str:
        return os.path.join(self.root, self.preset.image_dir, sample_id + self.preset.image_suffix)

    def mask_path(self, sample_id: str) -> str:
        return os.path.join(self.root, self.preset.mask_dir, sample_id + self.preset.mask_suffix)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> Sample:
        sample_id = self.ids[index]
        image_path, mask_path = self.image_path(sample_id), self.mask_path(sample_id)
        image = read_image(image_path)
        mask = read_mask(mask_path)
        if mask.shape != image.shape[:2]:
            raise ValueError(f"mask {mask_path} is {mask.shape[1]}x{mask.shape[0]} but its image is "
                             f"{image.shape[1]}x{image.shape[0]}")
        return Sample(sample_id, image, mask, image_path, mask_path)

    def __iter__(self) -> Iterator[Sample]:
        for index in range(len(self)):
            yield self[index]


def _has_layout(root: str, preset: DatasetPreset) -> bool:
    needed = [preset.image_dir, preset.mask_dir] + ([preset.split_file] if preset.split_file else [])
    return all(os.path.exists(os.path.join(root, part)) for part in needed)


def _find_root(root: str, preset: DatasetPreset) -> str:
    if not os.path.isdir(root):
        raise OSError(f"dataset directory {root} does not exist")
    for candidate in (root,) + tuple(os.path.join(root, parent) for parent in preset.parents):
        if _has_layout(candidate, preset):
            return candidate
    needed = [preset.image_dir, preset.mask_dir] + ([preset.split_file] if preset.split_file else [])
    missing = [os.path.join(root, part) for part in needed if not os.path.exists(os.path.join(root, part))]
    raise OSError(
        f"{root} is not a {preset.name} dataset: missing {', '.join(missing)} (also looked in "
        f"{', '.join(os.path.join(root, p) for p in preset.parents)})"
    )


def open_dataset(root: Union[str, "os.PathLike[str]"], format: str) -> SegmentationDataset:
    """Open ``root`` as a ``voc``, ``context`` or ``coco-object`` dataset (OSError naming a missing path)."""
    return SegmentationDataset(root, format)


def read_class_names(path: str) -> Tuple[str, ...]:
    with open(path, encoding="utf-8") as handle:
        names = tuple(line.strip() for line in handle if line.strip())
    if len(names) < 2:
        raise ValueError(f"{path} must list the background and at least one class, one per line")
    return names


# ----------------------------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------------------------


def confusion_matrix(prediction: np.ndarray, target: np.ndarray, num_classes: int,
                     ignore_index: Optional[int] = IGNORE_INDEX) -> np.ndarray:
    """(num_classes, num_classes) int64 counts: rows the ground truth, columns the prediction.

    Pixels whose target is ``ignore_index`` are left out. A target or prediction label outside [0, num_classes)
    (other than the ignored one) raises ValueError.
    """
    prediction = np.asarray(prediction)
    target = np.asarray(target)
    if prediction.shape != target.shape:
        raise ValueError(f"prediction shape {prediction.shape} differs from target shape {target.shape}")
    for name, array in (("prediction", prediction), ("target", target)):
        if not np.issubdtype(array.dtype, np.integer):
            raise TypeError(f"{name} must hold integer labels, got {array.dtype}")
    target = target.astype(np.int64).ravel()
    prediction = prediction.astype(np.int64).ravel()
    if ignore_index is not None:
        keep = target != ignore_index
        target, prediction = target[keep], prediction[keep]
    for name, array in (("target", target), ("prediction", prediction)):
        if array.size and (array.min() < 0 or array.max() >= num_classes):
            bad = array[(array < 0) | (array >= num_classes)][0]
            raise ValueError(f"{name} holds label {bad}, outside 0..{num_classes - 1}"
                             + (f" (and not the ignore label {ignore_index})" if ignore_index is not None else ""))
    counts = np.bincount(target * num_classes + prediction, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def metrics_from_confusion(matrix: np.ndarray) -> Dict[str, Any]:
    """IoU per class (NaN where a class is in neither ground truth nor prediction), mIoU, pixel accuracy,
    per-class accuracy and mean accuracy (NaN-skipping means), as mmseg computes them."""
    matrix = np.asarray(matrix, dtype=np.float64)
    true_positive = np.diag(matrix)
    target_area = matrix.sum(axis=1)
    predicted_area = matrix.sum(axis=0)
    union = target_area + predicted_area - true_positive
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, true_positive / union, np.nan)
        accuracy = np.where(target_area > 0, true_positive / target_area, np.nan)
    total = matrix.sum()
    return {
        "iou": iou,
        "accuracy": accuracy,
        "miou": float(np.nanmean(iou)) if np.any(~np.isnan(iou)) else float("nan"),
        "mean_accuracy": float(np.nanmean(accuracy)) if np.any(~np.isnan(accuracy)) else float("nan"),
        "pixel_accuracy": float(true_positive.sum() / total) if total > 0 else float("nan"),
        "num_pixels": int(total),
    }


class SegmentationMetric:
    """Accumulates a confusion matrix over images; ``compute()`` gives the metrics of everything added."""

    def __init__(self, num_classes: int, ignore_index: Optional[int] = IGNORE_INDEX) -> None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
        self.num_images = 0

    def update(self, prediction: np.ndarray, target: np.ndarray) -> None:
        self.matrix += confusion_matrix(prediction, target, self.num_classes, self.ignore_index)
        self.num_images += 1

    def compute(self) -> Dict[str, Any]:
        return metrics_from_confusion(self.matrix)


# ----------------------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------------------


def write_voc_layout(root: Union[str, "os.PathLike[str]"],
                     samples: Iterable[Tuple[str, Any, np.ndarray]], split: str = "val",
                     class_names: Optional[Sequence[str]] = None, image_format: str = "jpg") -> List[str]:
    """Write (name, image, mask) samples as a VOC-layout dataset under ``root``; returns the sample names.

    Images (PIL, uint8 arrays or paths) go to ``JPEGImages/<name>.jpg`` (``image_format="png"`` writes
    lossless ``.png`` there instead, which ``open_dataset`` will not find: use it only for your own readers),
    masks (H, W) uint8 (255 = ignore) to ``SegmentationClass/<name>.png`` as palette PNGs with the VOC palette,
    the names to ``ImageSets/Segmentation/<split>.txt`` (replacing that list). ``class_names`` (background
    first) are written to ``class_names.txt``, which the reader then uses instead of the VOC names.
    Every file is written atomically.
    """
    from PIL import Image

    from .image import to_rgb_array
    from .visualize import voc_palette

    if image_format not in ("jpg", "png"):
        raise ValueError(f"image_format must be 'jpg' or 'png', got {image_format!r}")
    root = os.fspath(root)
    image_dir = os.path.join(root, "JPEGImages")
    mask_dir = os.path.join(root, "SegmentationClass")
    split_dir = os.path.join(root, "ImageSets", "Segmentation")
    if not isinstance(split, str) or not split or os.sep in split or "/" in split:
        raise ValueError(f"split must be a plain name such as 'val', got {split!r}")
    for directory in (image_dir, mask_dir, split_dir):
        os.makedirs(directory, exist_ok=True)
    palette = voc_palette().reshape(-1).tolist()
    names: List[str] = []
    for item in samples:
        try:
            name, image, mask = item
        except (TypeError, ValueError):
            raise TypeError("samples must be (name, image, mask) triples") from None
        if not isinstance(name, str) or not name or "/" in name or os.sep in name or name.strip() != name:
            raise ValueError(f"sample name {name!r} must be a non-empty file stem without slashes or spaces around")
        if name in names:
            raise ValueError(f"duplicate sample name {name!r}")
        rgb = to_rgb_array(image, what=f"image of sample {name!r}")
        mask = np.asarray(mask)
        if mask.ndim != 2 or mask.shape != rgb.shape[:2]:
            raise ValueError(f"mask of sample {name!r} has shape {mask.shape}; expected {rgb.shape[:2]}")
        if not np.issubdtype(mask.dtype, np.integer) or (mask.size and (mask.min() < 0 or mask.max() > 255)):
            raise ValueError(f"mask of sample {name!r} must hold integer labels in 0..255")
        if class_names is not None:
            labels = mask[mask != IGNORE_INDEX]
            if labels.size and labels.max() >= len(class_names):
                raise ValueError(f"mask of sample {name!r} holds label {labels.max()} but only "
                                 f"{len(class_names)} class names were given")
        with atomic_path(os.path.join(image_dir, f"{name}.{image_format}")) as tmp:
            if image_format == "jpg":
                Image.fromarray(rgb, "RGB").save(tmp, format="JPEG", quality=95)
            else:
                Image.fromarray(rgb, "RGB").save(tmp, format="PNG")
        label_image = Image.frombytes("P", (mask.shape[1], mask.shape[0]),
                                      np.ascontiguousarray(mask, np.uint8).tobytes())
        label_image.putpalette(palette)
        with atomic_path(os.path.join(mask_dir, f"{name}.png")) as tmp:
            label_image.save(tmp, format="PNG")
        names.append(name)
    if not names:
        raise ValueError("no samples to write")
    atomic_write_text(os.path.join(split_dir, f"{split}.txt"), "".join(f"{name}\n" for name in names))
    if class_names is not None:
        class_names = [str(n).strip() for n in class_names]
        if len(class_names) < 2 or any(not n or "\n" in n for n in class_names):
            raise ValueError("class_names must list the background and at least one class, no empty names")
        atomic_write_text(os.path.join(root, CLASS_NAMES_FILE), "".join(f"{n}\n" for n in class_names))
    return names
