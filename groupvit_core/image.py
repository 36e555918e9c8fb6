"""Image preprocessing for GroupViT: images -> float32 ``pixel_values`` (batch, 3, height, width).

Numpy and Pillow only (no tensor library), shared by groupvit_pt and groupvit_tf. With its defaults
``GroupViTImageProcessor`` reproduces transformers' ``CLIPImageProcessor``, the class behind the Hub's
``preprocessor_config.json`` of the nvidia/groupvit-* checkpoints, step by step and in the same arithmetic:

1. convert to RGB as Pillow's ``convert("RGB")`` does (greyscale replicated, alpha dropped without compositing,
   palette looked up);
2. resize with Pillow on the uint8 image: shortest edge to ``size["shortest_edge"]`` (the long edge becomes
   ``int(shortest_edge * long / short)``, truncated), or to ``size["height"] x size["width"]``; bicubic by default;
3. centre crop to ``crop_size``; where the image is smaller than the crop it is first padded with zeros (black),
   centred, the extra pixel of an odd margin going to the top/left pad;
4. rescale: ``(uint8 as float64 * rescale_factor)`` cast to float32;
5. normalise: ``(x - mean) / std`` in float32, per channel.

Normalisation statistics are named presets: ``"clip"`` (the Hub preprocessor, default) and ``"imagenet"`` (the
original NVlabs training and evaluation code). See ``GroupViTImageProcessor.preset``.

Bounds (not in transformers): ``size`` and ``crop_size`` values are at most ``MAX_IMAGE_SIDE``; a resize whose
output would exceed ``MAX_RESIZE_PIXELS`` (an extreme aspect ratio: shortest edge 224 of a 1 x 100000 image is
224 x 22,400,000) is done only on the window that survives the centre crop (same filter and scale: the same
picture, though not bit-identical to transformers, which would need gigabytes), and refused with ``ValueError``
when there is no centre crop. Files are opened only in the formats of ``ALLOWED_IMAGE_FORMATS``.
"""

from __future__ import annotations

import json
import math
import numbers
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image, ImageOps

from .io_utils import atomic_write_text, parse_json_bytes, read_json_file, read_text_file
from .outputs import ModelOutput

CLIP_MEAN: Tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: Tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN: Tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: Tuple[float, float, float] = (0.229, 0.224, 0.225)

# name -> (image_mean, image_std)
NORMALIZATION_PRESETS: Dict[str, Tuple[Tuple[float, ...], Tuple[float, ...]]] = {
    "clip": (CLIP_MEAN, CLIP_STD),
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
}
DEFAULT_PRESET = "clip"

PREPROCESSOR_NAME = "preprocessor_config.json"
DEFAULT_SIZE = 224
DEFAULT_RESCALE_FACTOR = 1 / 255

# The only file formats load_image (and every other image reader of the project) lets Pillow open, whatever the
# file's name. Pillow recognises dozens more from the content, some of them handled by external programs (EPS and
# PostScript go to Ghostscript) or by rarely used parsers: an untrusted file must not choose its decoder freely.
# JPEGs with several pictures (MPO) open through "JPEG"; "PPM" covers PBM/PGM/PPM/PNM.
ALLOWED_IMAGE_FORMATS: Tuple[str, ...] = ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP", "PPM")

# Upper bound of every size / crop_size value, so that a config file cannot make each call allocate gigabytes.
MAX_IMAGE_SIDE = 8192
# Largest resize output materialised in full (the largest fixed-size resize MAX_IMAGE_SIDE squared, 192 MiB as
# RGB uint8). Above it the processor resizes only the window that survives the centre crop, or refuses.
MAX_RESIZE_PIXELS = MAX_IMAGE_SIDE * MAX_IMAGE_SIDE

# Pillow's filter numbers, which is what transformers stores as "resample" in preprocessor_config.json.
RESAMPLE_FILTERS: Dict[str, int] = {
    "nearest": int(Image.Resampling.NEAREST),  # 0
    "lanczos": int(Image.Resampling.LANCZOS),  # 1
    "bilinear": int(Image.Resampling.BILINEAR),  # 2
    "bicubic": int(Image.Resampling.BICUBIC),  # 3
    "box": int(Image.Resampling.BOX),  # 4
    "hamming": int(Image.Resampling.HAMMING),  # 5
}
DEFAULT_RESAMPLE = RESAMPLE_FILTERS["bicubic"]

# The settings a processor holds, in the order of transformers' CLIPImageProcessor (and of to_dict()).
SETTINGS = (
    "do_resize",
    "size",
    "resample",
    "do_center_crop",
    "crop_size",
    "do_rescale",
    "rescale_factor",
    "do_normalize",
    "image_mean",
    "image_std",
    "do_convert_rgb",
)

ImageInput = Union["Image.Image", np.ndarray, str, "os.PathLike[str]"]


class ImageBatch(ModelOutput):
    """The processor's result: ``batch.pixel_values`` or ``batch["pixel_values"]``, float32 (B, 3, H, W)."""

    FIELDS = ("pixel_values",)


# ----------------------------------------------------------------------------------------------------------------
# Loading and validating single images


def open_image_file(path: Union[str, "os.PathLike[str]"]) -> Image.Image:
    """``Image.open`` restricted to ``ALLOWED_IMAGE_FORMATS`` (lazy, like ``Image.open``: use it as a context).

    A file in any other format, or no image at all, raises ``PIL.UnidentifiedImageError`` (an ``OSError``) naming
    the file and the allowed formats; other errors are Pillow's.
    """
    try:
        return Image.open(path, formats=ALLOWED_IMAGE_FORMATS)
    except Image.UnidentifiedImageError:
        raise Image.UnidentifiedImageError(
            f"cannot identify image file {os.fspath(path)!r} as one of the allowed formats "
            f"{', '.join(ALLOWED_IMAGE_FORMATS)} (other formats are not opened, whatever the file name)"
        ) from None


def load_image(path: Union[str, "os.PathLike[str]"]) -> Image.Image:
    """Open an image file as an RGB PIL image, applying its EXIF orientation (as transformers' ``load_image``).

    Only the formats of ``ALLOWED_IMAGE_FORMATS`` are opened, whatever the file's name. Every failure (missing
    file, not an image, a format not allowed, truncated data) is raised as ``OSError`` naming the file.
    """
    path = os.fspath(path)
    if not isinstance(path, str):
        raise TypeError(f"load_image expects a file path, got {type(path).__name__}")
    try:
        with open_image_file(path) as image:
            image.load()
            image = ImageOps.exif_transpose(image)
            return image.convert("RGB")
    except FileNotFoundError:
        raise OSError(f"cannot open image {path}: no such file") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        # Pillow raises UnidentifiedImageError (an OSError), SyntaxError or ValueError for broken files.
        raise OSError(f"cannot read image {path}: {err}") from None


def _check_size_hw(height: int, width: int, what: str) -> None:
    if height <= 0 or width <= 0:
        raise ValueError(f"{what} has zero size: height {height}, width {width}")


def _array_to_uint8(array: np.ndarray, what: str) -> np.ndarray:
    """Validate dtype and values; float images in [0, 1] are quantised to 8 bits (round to nearest)."""
    if array.dtype == np.uint8:
        return array
    if np.issubdtype(array.dtype, np.floating):
        if not np.all(np.isfinite(array)):
            raise ValueError(f"{what} contains NaN or infinite values")
        low, high = float(array.min()), float(array.max())
        if low < 0.0 or high > 1.0:
            raise ValueError(
                f"{what} is a float array with values in [{low}, {high}]; float images must lie in [0, 1] "
                "(pass 0..255 data as uint8)"
            )
        return np.rint(array.astype(np.float64) * 255.0).astype(np.uint8)
    raise TypeError(
        f"{what} has unsupported dtype {array.dtype}; expected uint8 (0..255) or float in [0, 1]"
        + (" (convert 0..255 integers with .astype(np.uint8))" if np.issubdtype(array.dtype, np.integer) else "")
    )


def _array_to_rgb(array: np.ndarray, what: str, convert_rgb: bool) -> np.ndarray:
    """(H, W), (H, W, 1), (H, W, 3) or (H, W, 4) uint8/float array -> (H, W, 3) uint8, as Pillow converts."""
    if array.ndim not in (2, 3):
        raise ValueError(f"{what} must have shape (H, W) or (H, W, C), got {array.shape}")
    _check_size_hw(array.shape[0], array.shape[1], what)
    channels = 1 if array.ndim == 2 else array.shape[2]
    if channels not in (1, 3, 4):
        hint = ""
        if array.ndim == 3 and array.shape[0] in (1, 3, 4):
            hint = "; it looks channels-first: transpose it to (H, W, C)"
        raise ValueError(
            f"{what} has {channels} channels (shape {array.shape}); expected 1 (greyscale), 3 (RGB) or "
            f"4 (RGBA) in the last axis{hint}"
        )
    array = _array_to_uint8(array, what)
    if channels == 3:
        return np.ascontiguousarray(array)
    if not convert_rgb:
        raise ValueError(f"{what} has {channels} channel(s) and do_convert_rgb is False; the model needs RGB")
    if channels == 1:
        grey = array if array.ndim == 2 else array[:, :, 0]
        return np.ascontiguousarray(np.repeat(grey[:, :, None], 3, axis=2))
    return np.ascontiguousarray(array[:, :, :3])  # RGBA -> RGB drops alpha, like Pillow's convert("RGB")


def _pil_to_rgb(image: Image.Image, what: str, convert_rgb: bool) -> np.ndarray:
    _check_size_hw(image.height, image.width, what)
    if image.mode != "RGB":
        if not convert_rgb:
            raise ValueError(f"{what} has mode {image.mode!r} and do_convert_rgb is False; the model needs RGB")
        try:
            image = image.convert("RGB")
        except (OSError, ValueError) as err:
            raise ValueError(f"{what}: cannot convert mode {image.mode!r} to RGB: {err}") from None
    return np.asarray(image, dtype=np.uint8)


def to_rgb_array(image: ImageInput, convert_rgb: bool = True, what: str = "image") -> np.ndarray:
    """One image (PIL image, array or file path) -> (H, W, 3) uint8 array, validated."""
    if isinstance(image, Image.Image):
        return _pil_to_rgb(image, what, convert_rgb)
    if isinstance(image, np.ndarray):
        return _array_to_rgb(image, what, convert_rgb)
    if isinstance(image, (str, os.PathLike)):
        return _pil_to_rgb(load_image(image), f"{what} ({os.fspath(image)})", convert_rgb)
    raise TypeError(
        f"{what} has unsupported type {type(image).__name__}; expected a PIL image, a numpy array "
        "(H, W[, C]) or a file path"
    )


def _flatten_images(images: Any) -> List[Any]:
    """A single image, a (B, H, W, C) array or a list/tuple of images -> list of single images."""
    if isinstance(images, np.ndarray) and images.ndim == 4:
        if images.shape[0] == 0:
            raise ValueError("images is an empty batch (first axis of the 4-D array is 0)")
        return list(images)
    if isinstance(images, (list, tuple)):
        if len(images) == 0:
            raise ValueError("images is an empty list; pass at least one image")
        for index, image in enumerate(images):
            if isinstance(image, (list, tuple)):
                raise TypeError(f"images[{index}] is a nested {type(image).__name__}; pass a flat list of images")
        return list(images)
    if images is None:
        raise TypeError("images is None; pass a PIL image, a numpy array, a file path or a list of them")
    return [images]


# ----------------------------------------------------------------------------------------------------------------
# Geometry: the same arithmetic as transformers.image_transforms


def shortest_edge_output_size(height: int, width: int, shortest_edge: int) -> Tuple[int, int]:
    """(new_height, new_width) with the short side ``shortest_edge`` and the long side truncated to int."""
    _check_size_hw(height, width, "image")
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = shortest_edge, int(shortest_edge * long / short)
    return (new_long, new_short) if width <= height else (new_short, new_long)


def _check_resize_budget(height: int, width: int, what: str = "image") -> None:
    if height * width > MAX_RESIZE_PIXELS:
        raise ValueError(
            f"resizing {what} to {height} x {width} pixels would exceed the limit of {MAX_RESIZE_PIXELS} pixels "
            "(MAX_RESIZE_PIXELS): its aspect ratio is too extreme for this size; use a smaller size or a centre "
            "crop (do_center_crop), which resizes only the window it keeps"
        )


def resize(image: np.ndarray, height: int, width: int, resample: int = DEFAULT_RESAMPLE) -> np.ndarray:
    """Resize an (H, W, 3) uint8 array to (height, width, 3) with Pillow (antialiased filters, uint8 output).

    An output of more than ``MAX_RESIZE_PIXELS`` pixels is refused with ``ValueError``.
    """
    _check_resize_budget(height, width)
    resized = Image.fromarray(image, "RGB").resize((width, height), resample=resample)
    return np.asarray(resized, dtype=np.uint8)


def _crop_window(resized: int, crop: int) -> Tuple[int, int]:
    """(start, length) along one axis of the part of a ``resized``-long axis that a centre crop keeps."""
    if resized <= crop:
        return 0, resized  # all of it, padded afterwards
    return (resized - crop) // 2, crop


def resize_crop_window(image: np.ndarray, height: int, width: int, crop_height: int, crop_width: int,
                       resample: int = DEFAULT_RESAMPLE) -> np.ndarray:
    """The part of ``resize(image, height, width)`` that ``center_crop(..., crop_height, crop_width)`` keeps,
    computed without the rest: Pillow resamples only that window of the source (``resize(box=...)``) at the same
    scale. Memory is bounded by the crop, whatever the aspect ratio. The picture is the same but not the bits:
    Pillow passes the box as float32 and may order its two passes differently for a window (one 8-bit level
    usually, more on noise-like content; a shifted sample with ``nearest``), so the processor uses this only where
    the full resize would exceed ``MAX_RESIZE_PIXELS``.
    """
    source_height, source_width = image.shape[:2]
    top, window_height = _crop_window(height, crop_height)
    left, window_width = _crop_window(width, crop_width)
    # Python ints: the products are exact and each true division is correctly rounded, so right <= source_width.
    box = (left * source_width / width, top * source_height / height,
           (left + window_width) * source_width / width, (top + window_height) * source_height / height)
    window = Image.fromarray(image, "RGB").resize((window_width, window_height), resample=resample, box=box)
    return np.asarray(window, dtype=np.uint8)


def resize_shortest_edge(image: ImageInput, size: int, resample: int = DEFAULT_RESAMPLE) -> np.ndarray:
    """Resize an image so its shorter side is ``size``, keeping the aspect ratio -> (H', W', 3) uint8."""
    size = _check_int(size, "size")
    rgb = to_rgb_array(image)
    new_height, new_width = shortest_edge_output_size(rgb.shape[0], rgb.shape[1], size)
    return resize(rgb, new_height, new_width, _check_resample(resample))


def center_crop(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Centre crop an (H, W, C) array to (height, width); an image smaller than the crop is zero-padded first."""
    orig_height, orig_width = image.shape[:2]
    top = (orig_height - height) // 2
    left = (orig_width - width) // 2
    if top >= 0 and left >= 0:
        return image[top: top + height, left: left + width]
    # transformers pads to max(crop, image) with the image centred (odd margins: one more pixel before it) and
    # then takes the same window shifted by the padding: output row y is image row y + top (floor division above),
    # zero where that is outside the image. Only the crop is allocated, not the padded image.
    cropped = np.zeros((height, width) + image.shape[2:], dtype=image.dtype)
    rows = slice(max(0, top), min(orig_height, top + height))
    cols = slice(max(0, left), min(orig_width, left + width))
    cropped[rows.start - top: rows.stop - top, cols.start - left: cols.stop - left] = image[rows, cols]
    return cropped


# ----------------------------------------------------------------------------------------------------------------
# Settings validation


def _check_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _check_bool(value: Any, name: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def _check_side(value: Any, name: str) -> int:
    value = _check_int(value, name)
    if value > MAX_IMAGE_SIDE:
        raise ValueError(f"{name} is {value}, more than the limit of {MAX_IMAGE_SIDE} pixels (MAX_IMAGE_SIDE)")
    return value


def _check_size(size: Any, name: str, default_to_square: bool) -> Dict[str, int]:
    """transformers' get_size_dict: an int is a shortest edge (or a square), a pair is (height, width).

    Each value must be a positive int of at most ``MAX_IMAGE_SIDE``."""
    if isinstance(size, numbers.Integral) and not isinstance(size, bool):
        size = {"height": size, "width": size} if default_to_square else {"shortest_edge": size}
    elif isinstance(size, (list, tuple)):
        if len(size) != 2:
            raise ValueError(f"{name} as a sequence must be (height, width), got {size!r}")
        size = {"height": size[0], "width": size[1]}
    if not isinstance(size, Mapping):
        raise TypeError(f"{name} must be an int, a (height, width) pair or a dict, got {size!r}")
    keys = set(size)
    if keys == {"shortest_edge"} and not default_to_square:
        return {"shortest_edge": _check_side(size["shortest_edge"], f"{name}['shortest_edge']")}
    if keys == {"height", "width"}:
        return {"height": _check_side(size["height"], f"{name}['height']"),
                "width": _check_side(size["width"], f"{name}['width']")}
    allowed = "{'height', 'width'}" + ("" if default_to_square else " or {'shortest_edge'}")
    raise ValueError(f"{name} must have the keys {allowed}, got {sorted(keys)}")


def _check_resample(resample: Any) -> int:
    if isinstance(resample, str):
        key = resample.lower()
        if key not in RESAMPLE_FILTERS:
            raise ValueError(f"resample {resample!r} is not one of {sorted(RESAMPLE_FILTERS)}")
        return RESAMPLE_FILTERS[key]
    if isinstance(resample, bool) or not isinstance(resample, numbers.Integral):
        raise TypeError(f"resample must be a Pillow filter number or name, got {resample!r}")
    if int(resample) not in RESAMPLE_FILTERS.values():
        raise ValueError(f"resample must be one of {sorted(RESAMPLE_FILTERS.values())} (Pillow filters), "
                         f"got {resample!r}")
    return int(resample)


def _check_stats(values: Any, name: str, positive: bool) -> Tuple[float, float, float]:
    if isinstance(values, numbers.Real) and not isinstance(values, bool):
        values = [values] * 3  # transformers repeats a scalar over the channels
    if isinstance(values, np.ndarray):
        values = values.tolist()
    if not isinstance(values, (list, tuple)) or len(values) != 3:
        raise ValueError(f"{name} must be a number or 3 numbers (one per RGB channel), got {values!r}")
    out = []
    for value in values:
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise ValueError(f"{name} must hold finite numbers, got {values!r}")
        if positive and value <= 0:
            raise ValueError(f"{name} must be positive, got {values!r}")
        out.append(float(value))
    return tuple(out)


def _check_rescale_factor(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"rescale_factor must be a positive finite number, got {value!r}")
    return float(value)


# ----------------------------------------------------------------------------------------------------------------
# The processor


class GroupViTImageProcessor:
    """PIL images, uint8 arrays or file paths -> ``ImageBatch(pixel_values=float32 (B, 3, H, W))``.

    Accepted images: PIL images of any mode Pillow can convert to RGB; numpy arrays (H, W) greyscale, (H, W, 1),
    (H, W, 3) RGB or (H, W, 4) RGBA (alpha dropped, as Pillow does) of dtype uint8; float arrays with values in
    [0, 1] are accepted too and quantised to uint8 (round to nearest) first, so they give exactly what
    ``np.rint(x * 255).astype(np.uint8)`` gives (transformers guesses the range of float data instead); file paths
    (opened with ``load_image``); a list of these or a (B, H, W, C) array. Arrays are channels-last.

    The settings and their defaults are those of transformers' ``CLIPImageProcessor`` and use its key names in
    ``preprocessor_config.json``; ``preprocess`` takes the same names as per-call overrides. Keys of a config file
    that the processor does not use are kept in ``extra_config`` and written back by ``save_pretrained``.
    """

    model_input_names = ("pixel_values",)

    def __init__(
        self,
        do_resize: bool = True,
        size: Union[int, Sequence[int], Mapping[str, int], None] = None,
        resample: Union[int, str] = DEFAULT_RESAMPLE,
        do_center_crop: bool = True,
        crop_size: Union[int, Sequence[int], Mapping[str, int], None] = None,
        do_rescale: bool = True,
        rescale_factor: float = DEFAULT_RESCALE_FACTOR,
        do_normalize: bool = True,
        image_mean: Union[float, Sequence[float], None] = None,
        image_std: Union[float, Sequence[float], None] = None,
        do_convert_rgb: bool = True,
    ) -> None:
        default_mean, default_std = NORMALIZATION_PRESETS[DEFAULT_PRESET]
        settings = self._check_settings(dict(
            do_resize=do_resize,
            size={"shortest_edge": DEFAULT_SIZE} if size is None else size,
            resample=resample,
            do_center_crop=do_center_crop,
            crop_size={"height": DEFAULT_SIZE, "width": DEFAULT_SIZE} if crop_size is None else crop_size,
            do_rescale=do_rescale,
            rescale_factor=rescale_factor,
            do_normalize=do_normalize,
            image_mean=default_mean if image_mean is None else image_mean,
            image_std=default_std if image_std is None else image_std,
            do_convert_rgb=do_convert_rgb,
        ))
        self.do_resize: bool = settings["do_resize"]
        self.size: Dict[str, int] = settings["size"]
        self.resample: int = settings["resample"]
        self.do_center_crop: bool = settings["do_center_crop"]
        self.crop_size: Dict[str, int] = settings["crop_size"]
        self.do_rescale: bool = settings["do_rescale"]
        self.rescale_factor: float = settings["rescale_factor"]
        self.do_normalize: bool = settings["do_normalize"]
        self.image_mean: Tuple[float, float, float] = settings["image_mean"]
        self.image_std: Tuple[float, float, float] = settings["image_std"]
        self.do_convert_rgb: bool = settings["do_convert_rgb"]
        self.extra_config: Dict[str, Any] = {}

    @staticmethod
    def _check_settings(settings: Dict[str, Any]) -> Dict[str, Any]:
        checked = dict(settings)
        for name in ("do_resize", "do_center_crop", "do_rescale", "do_normalize", "do_convert_rgb"):
            if name in checked:
                checked[name] = _check_bool(checked[name], name)
        if "size" in checked:
            checked["size"] = _check_size(checked["size"], "size", default_to_square=False)
        if "crop_size" in checked:
            checked["crop_size"] = _check_size(checked["crop_size"], "crop_size", default_to_square=True)
        if "resample" in checked:
            checked["resample"] = _check_resample(checked["resample"])
        if "rescale_factor" in checked:
            checked["rescale_factor"] = _check_rescale_factor(checked["rescale_factor"])
        if "image_mean" in checked:
            checked["image_mean"] = _check_stats(checked["image_mean"], "image_mean", positive=False)
        if "image_std" in checked:
            checked["image_std"] = _check_stats(checked["image_std"], "image_std", positive=True)
        return checked

    # -- presets and config files --------------------------------------------------------------------------------

    @classmethod
    def preset(cls, name: str = DEFAULT_PRESET, **overrides: Any) -> "GroupViTImageProcessor":
        """A processor with the named normalisation statistics (``"clip"``: the Hub preprocessor, the default;
        ``"imagenet"``: the original NVlabs code). Other settings may be given as keyword arguments."""
        if not isinstance(name, str) or name.lower() not in NORMALIZATION_PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(NORMALIZATION_PRESETS)}")
        mean, std = NORMALIZATION_PRESETS[name.lower()]
        overrides.setdefault("image_mean", mean)
        overrides.setdefault("image_std", std)
        return cls(**overrides)

    @property
    def preset_name(self) -> Optional[str]:
        """The preset whose statistics this processor normalises with, or None for custom statistics."""
        for name, (mean, std) in NORMALIZATION_PRESETS.items():
            if np.allclose(self.image_mean, mean, rtol=0, atol=1e-9) and np.allclose(
                    self.image_std, std, rtol=0, atol=1e-9):
                return name
        return None

    def to_dict(self) -> Dict[str, Any]:
        """Settings under transformers' key names, plus the unused keys read from a config file."""
        data: Dict[str, Any] = {"image_processor_type": "CLIPImageProcessor"}
        data.update(self.extra_config)
        for name in SETTINGS:
            value = getattr(self, name)
            data[name] = list(value) if isinstance(value, tuple) else (dict(value) if isinstance(value, dict)
                                                                         else value)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "GroupViTImageProcessor":
        """Build from a ``preprocessor_config.json`` mapping (transformers' keys; legacy int sizes accepted)."""
        if not isinstance(data, Mapping):
            raise TypeError(f"preprocessor config must be a mapping, got {type(data).__name__}")
        data = dict(data)
        settings = {name: data.pop(name) for name in SETTINGS if name in data and data[name] is not None}
        for name in SETTINGS:
            data.pop(name, None)  # an explicit null means "default", as in transformers
        use_square_size = data.pop("use_square_size", False)
        processor = cls(**settings)
        if use_square_size:
            # CLIPImageProcessor's legacy flag: resize to a square of the shortest-edge size.
            edge = processor.size.get("shortest_edge", processor.size.get("height"))
            processor.size = {"height": edge, "width": edge}
        processor.extra_config = data
        return processor

    @classmethod
    def from_pretrained(cls, path: Union[str, "os.PathLike[str]"]) -> "GroupViTImageProcessor":
        """Read ``preprocessor_config.json`` from a checkpoint directory, or a JSON file given directly."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, PREPROCESSOR_NAME)
        if not os.path.isfile(path):
            raise OSError(f"no {PREPROCESSOR_NAME} found at {path}")
        data = read_json_file(path)
        if not isinstance(data, dict):
            raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as err:
            raise type(err)(f"{path}: {err}") from None

    def save_pretrained(self, directory: Union[str, "os.PathLike[str]"]) -> str:
        """Write ``preprocessor_config.json`` into ``directory`` (created if needed), atomically."""
        directory = os.fspath(directory)
        if os.path.exists(directory) and not os.path.isdir(directory):
            raise OSError(f"save_pretrained expects a directory, but {directory} is a file")
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, PREPROCESSOR_NAME)
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return path

    def __eq__(self, other: object) -> bool:
        return isinstance(other, GroupViTImageProcessor) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        settings = ", ".join(f"{name}={getattr(self, name)!r}" for name in SETTINGS)
        return f"{type(self).__name__}({settings})"

    # -- preprocessing -------------------------------------------------------------------------------------------

    def __call__(self, images: Any, return_tensors: Optional[str] = "np", **overrides: Any) -> ImageBatch:
        return self.preprocess(images, return_tensors=return_tensors, **overrides)

    def preprocess(self, images: Any, return_tensors: Optional[str] = "np", **overrides: Any) -> ImageBatch:
        """Preprocess one image or a list of them -> ``ImageBatch`` with float32 ``pixel_values`` (B, 3, H, W).

        ``overrides`` replace this processor's settings for this call (same names as the constructor).
        ``return_tensors`` may be ``"np"`` or None (both give one stacked numpy array); convert to a framework
        tensor outside groupvit_core (``torch.from_numpy``, ``keras.ops.convert_to_tensor``).
        """
        if return_tensors not in (None, "np", "numpy"):
            raise ValueError(f"return_tensors={return_tensors!r} is not supported here (numpy only); use 'np' and "
                             "convert the array with your framework")
        unknown = sorted(set(overrides) - set(SETTINGS))
        if unknown:
            raise TypeError(f"unknown preprocessing option(s) {unknown}; options are {list(SETTINGS)}")
        settings = {name: getattr(self, name) for name in SETTINGS}
        settings.update(self._check_settings({k: v for k, v in overrides.items() if v is not None}))

        image_list = _flatten_images(images)
        processed = []
        for index, image in enumerate(image_list):
            what = "image" if len(image_list) == 1 and not isinstance(images, (list, tuple)) else f"images[{index}]"
            processed.append(self._preprocess_one(image, settings, what))
        shapes = {array.shape for array in processed}
        if len(shapes) > 1:
            raise ValueError(
                f"the images have different sizes after preprocessing ({sorted(shapes)}) and cannot be stacked; "
                "enable do_center_crop or resize to a fixed {'height', 'width'} size"
            )
        return ImageBatch(pixel_values=np.stack(processed, axis=0))

    @staticmethod
    def _preprocess_one(image: Any, settings: Mapping[str, Any], what: str) -> np.ndarray:
        """One image -> float32 (3, H, W), the steps in transformers' order."""
        rgb = to_rgb_array(image, convert_rgb=settings["do_convert_rgb"], what=what)  # (height, width, 3) uint8
        if settings["do_resize"]:
            size = settings["size"]
            if "shortest_edge" in size:
                new_height, new_width = shortest_edge_output_size(rgb.shape[0], rgb.shape[1],
                                                                  size["shortest_edge"])
            else:
                new_height, new_width = size["height"], size["width"]
            if settings["do_center_crop"] and new_height * new_width > MAX_RESIZE_PIXELS:
                # An extreme aspect ratio: the full resize would take gigabytes, the crop keeps a small window.
                rgb = resize_crop_window(rgb, new_height, new_width, settings["crop_size"]["height"],
                                         settings["crop_size"]["width"], settings["resample"])
            else:
                _check_resize_budget(new_height, new_width, what)
                rgb = resize(rgb, new_height, new_width, settings["resample"])
        if settings["do_center_crop"]:
            rgb = center_crop(rgb, settings["crop_size"]["height"], settings["crop_size"]["width"])
        if settings["do_rescale"]:
            # transformers multiplies in float64 and casts to float32 afterwards.
            pixels = (rgb.astype(np.float64) * settings["rescale_factor"]).astype(np.float32)
        else:
            pixels = rgb.astype(np.float32)
        if settings["do_normalize"]:
            mean = np.asarray(settings["image_mean"], dtype=np.float32)
            std = np.asarray(settings["image_std"], dtype=np.float32)
            pixels = (pixels - mean) / std
        return np.ascontiguousarray(pixels.transpose(2, 0, 1))  # (3, height, width)


__all__ = [
    "ALLOWED_IMAGE_FORMATS",
    "CLIP_MEAN",
    "CLIP_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MAX_IMAGE_SIDE",
    "MAX_RESIZE_PIXELS",
    "NORMALIZATION_PRESETS",
    "PREPROCESSOR_NAME",
    "RESAMPLE_FILTERS",
    "GroupViTImageProcessor",
    "ImageBatch",
    "center_crop",
    "load_image",
    "open_image_file",
    "resize",
    "resize_crop_window",
    "resize_shortest_edge",
    "shortest_edge_output_size",
    "to_rgb_array",
]
