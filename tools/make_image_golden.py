"""Make the image-preprocessing golden files from the reference (transformers 4.57.6). Maintainer script.

Run with a scratch venv holding transformers==4.57.6 and Pillow:
    /path/to/refvenv/bin/python tools/make_image_golden.py

The inputs are synthetic and deterministic (seeded numpy noise, gradients and flat shapes), saved as PNG so the
tests never regenerate them. Every case runs transformers' ``CLIPImageProcessor`` (the class behind the Hub's
``preprocessor_config.json`` of nvidia/groupvit-*) on the PIL image opened from that PNG.

Writes under tests/golden/:
  image_inputs/<name>.png   the input images (modes RGB, L, RGBA and P; sizes tall, wide, odd, smaller than 224)
  image_reference.npz       per case ``levels_<case>``: the reference's pixel_values (3, H, W) stored losslessly
                            as the uint8 levels they came from, i.e. round((value * std + mean) * 255); the script
                            asserts that decoding them as ((levels * (1/255)).astype(float32) - mean) / std gives
                            the reference's float32 output back to 1e-6. ``full_<case>``: the reference's float32
                            output itself, as float16, for a few cases (this checks the normalisation directly).
  image_cases.json          the cases (input file, processor arguments, output shape, per-channel mean/min/max of
                            the reference output), the reference's normalisation constants, its to_dict() for the
                            default processor and what it resolves from Hub-style legacy preprocessor configs.
"""

import json
import os
import sys
import tempfile
import warnings

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(ROOT, "tests", "golden")
INPUTS = os.path.join(GOLDEN, "image_inputs")

import transformers  # noqa: E402
from transformers import CLIPImageProcessor  # noqa: E402
from transformers.utils.constants import (  # noqa: E402
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
)

sys.path.insert(0, ROOT)
# Only to write a preprocessor_config.json the way groupvit_core does, for transformers to read back; no golden
# number comes from groupvit_core.
from groupvit_core.image import GroupViTImageProcessor  # noqa: E402

IMAGENET = {"image_mean": list(IMAGENET_DEFAULT_MEAN), "image_std": list(IMAGENET_DEFAULT_STD)}

# (name, PIL mode, height, width, seed). Heights avoid 1 and 3: transformers would take such an array for
# channels-first.
INPUT_SPECS = [
    ("rgb_square_224x224", "RGB", 224, 224, 1),
    ("rgb_wide_50x300", "RGB", 50, 300, 2),
    ("rgb_tall_300x40", "RGB", 300, 40, 3),
    ("rgb_odd_97x131", "RGB", 97, 131, 4),
    ("rgb_tall_500x333", "RGB", 500, 333, 5),
    ("rgb_wide_333x500", "RGB", 333, 500, 6),
    ("grey_16x16", "L", 16, 16, 7),
    ("grey_45x77", "L", 45, 77, 8),
    ("rgba_120x90", "RGBA", 120, 90, 9),
    ("palette_64x80", "P", 64, 80, 10),
]

# (case name, input name, CLIPImageProcessor keyword arguments, store the float output too)
CASES = [(name, name, {}, False) for name, *_ in INPUT_SPECS] + [
    ("imagenet_rgb_odd_97x131", "rgb_odd_97x131", IMAGENET, True),
    ("imagenet_grey_16x16", "grey_16x16", IMAGENET, True),
    ("imagenet_rgba_120x90", "rgba_120x90", IMAGENET, False),
    ("noresize_pad_rgb_odd_97x131", "rgb_odd_97x131", {"do_resize": False}, False),
    ("noresize_padcrop_rgb_wide_50x300", "rgb_wide_50x300", {"do_resize": False}, False),
    ("noresize_crop_rgb_tall_500x333", "rgb_tall_500x333", {"do_resize": False}, False),
    ("hw_bilinear_oddcrop_rgb_tall_500x333", "rgb_tall_500x333",
     {"size": {"height": 160, "width": 200}, "crop_size": {"height": 150, "width": 181}, "resample": 2}, False),
    ("shortest256_rgb_wide_333x500", "rgb_wide_333x500", {"size": {"shortest_edge": 256}}, False),
    ("shortest100_crop64x96_grey_45x77", "grey_45x77",
     {"size": {"shortest_edge": 100}, "crop_size": {"height": 64, "width": 96}}, False),
    ("nocrop_square_rgb_tall_300x40", "rgb_tall_300x40",
     {"size": {"height": 224, "width": 224}, "do_center_crop": False}, False),
    ("nocrop_shortest_rgb_odd_97x131", "rgb_odd_97x131", {"do_center_crop": False}, False),
    ("nonormalize_rgb_odd_97x131", "rgb_odd_97x131", {"do_normalize": False}, False),
    ("lanczos_palette_64x80", "palette_64x80", {"resample": 1}, False),
    ("nearest_rgba_120x90", "rgba_120x90", {"resample": 0}, False),
    ("clip_full_rgb_square_224x224", "rgb_square_224x224", {}, True),
]

BATCH = ["rgb_square_224x224", "rgb_odd_97x131", "palette_64x80", "grey_16x16"]

# Hub-style preprocessor configs in the legacy layout (ints for size and crop_size, feature extractor type), as
# published with CLIP-family checkpoints, and the newer dict layout; transformers' resolution is recorded.
HUB_CONFIGS = {
    "legacy_int_sizes": {
        "crop_size": 224,
        "do_center_crop": True,
        "do_normalize": True,
        "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor",
        "image_mean": list(OPENAI_CLIP_MEAN),
        "image_std": list(OPENAI_CLIP_STD),
        "resample": 3,
        "size": 224,
    },
    "dict_sizes_imagenet": {
        "crop_size": {"height": 200, "width": 180},
        "do_convert_rgb": True,
        "image_mean": list(IMAGENET_DEFAULT_MEAN),
        "image_processor_type": "CLIPImageProcessor",
        "image_std": list(IMAGENET_DEFAULT_STD),
        "processor_class": "CLIPProcessor",
        "resample": 2,
        "rescale_factor": 0.00392156862745098,
        "size": {"shortest_edge": 240},
    },
    "use_square_size": {"size": 192, "use_square_size": True},
}
# A non-default processor saved by groupvit_core and read back by transformers.
OURS_SAVED = {"size": {"shortest_edge": 256}, "crop_size": {"height": 240, "width": 200}, "resample": 2,
              "do_normalize": True, "image_mean": list(IMAGENET_DEFAULT_MEAN),
              "image_std": list(IMAGENET_DEFAULT_STD), "rescale_factor": 0.5 / 255}
RESOLVED_KEYS = ["do_resize", "size", "resample", "do_center_crop", "crop_size", "do_rescale", "rescale_factor",
                 "do_normalize", "image_mean", "image_std", "do_convert_rgb"]


def synthetic_rgb(height: int, width: int, seed: int) -> np.ndarray:
    """(H, W, 3) uint8: per-channel gradients, a rectangle, a disc, a stripe band and a patch of noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    v, u = yy / max(height - 1, 1), xx / max(width - 1, 1)
    image = np.stack([255 * u, 255 * v, 255 * (1 - 0.5 * u - 0.5 * v)], axis=-1)
    image[: height // 2, : width // 3] += rng.normal(0.0, 6.0, size=(height // 2, width // 3, 3))  # mild noise
    top, left = int(rng.integers(0, max(height // 2, 1))), int(rng.integers(0, max(width // 2, 1)))
    image[top: top + max(height // 3, 1), left: left + max(width // 4, 1)] = rng.integers(0, 256, size=3)
    cy, cx, radius = rng.uniform(0, height), rng.uniform(0, width), 0.3 * min(height, width) + 1
    image[(yy - cy) ** 2 + (xx - cx) ** 2 < radius ** 2] = rng.integers(0, 256, size=3)
    image[:, (np.arange(width) // 3) % 2 == 0, :] *= np.where(v[:, :1] > 0.8, 0.2, 1.0)[..., None]
    ph, pw = max(height // 5, 1), max(width // 5, 1)
    image[-ph:, -pw:] = rng.integers(0, 256, size=(ph, pw, 3))  # hard noise: full-range neighbours
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def make_input(mode: str, height: int, width: int, seed: int) -> Image.Image:
    rgb = synthetic_rgb(height, width, seed)
    if mode == "RGB":
        return Image.fromarray(rgb, "RGB")
    if mode == "L":
        return Image.fromarray(rgb, "RGB").convert("L")
    if mode == "RGBA":
        alpha = (np.linspace(0, 255, width)[None, :] * np.ones((height, 1))).astype(np.uint8)
        alpha[: height // 4] = 0  # fully transparent rows: colour must survive (transformers drops alpha)
        return Image.fromarray(np.dstack([rgb, alpha]), "RGBA")
    if mode == "P":
        image = Image.fromarray(rgb, "RGB").quantize(colors=37, method=Image.Quantize.MEDIANCUT)
        image.info["transparency"] = 0
        return image
    raise ValueError(mode)


def save_png(image: Image.Image, path: str) -> None:
    tmp = path + ".tmp.png"
    image.save(tmp, format="PNG", optimize=True)
    os.replace(tmp, path)


def encode_levels(pixel_values: np.ndarray, processor: CLIPImageProcessor) -> np.ndarray:
    """The uint8 levels that pixel_values (3, H, W) were computed from; asserts the encoding is lossless."""
    assert processor.do_rescale and abs(processor.rescale_factor - 1 / 255) < 1e-15
    mean = np.asarray(processor.image_mean, dtype=np.float64)[:, None, None]
    std = np.asarray(processor.image_std, dtype=np.float64)[:, None, None]
    values = pixel_values.astype(np.float64)
    scaled = values * std + mean if processor.do_normalize else values
    levels = np.rint(scaled * 255)
    assert levels.min() >= 0 and levels.max() <= 255, (levels.min(), levels.max())
    levels = levels.astype(np.uint8)
    decoded = (levels.astype(np.float64) * (1 / 255)).astype(np.float32)
    if processor.do_normalize:
        decoded = (decoded - np.asarray(processor.image_mean, np.float32)[:, None, None]) / np.asarray(
            processor.image_std, np.float32)[:, None, None]
    error = float(np.abs(decoded - pixel_values).max())
    assert error < 1e-6, error
    return levels


def main() -> None:
    os.makedirs(INPUTS, exist_ok=True)
    for name, mode, height, width, seed in INPUT_SPECS:
        save_png(make_input(mode, height, width, seed), os.path.join(INPUTS, name + ".png"))

    def open_input(name: str) -> Image.Image:
        image = Image.open(os.path.join(INPUTS, name + ".png"))
        image.load()
        return image

    arrays, cases = {}, []
    for case, input_name, kwargs, store_full in CASES:
        processor = CLIPImageProcessor(**kwargs)
        image = open_input(input_name)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = processor(image, return_tensors="np")["pixel_values"]
        assert out.dtype == np.float32 and out.shape[0] == 1, (out.dtype, out.shape)
        pixel_values = out[0]
        arrays["levels_" + case] = encode_levels(pixel_values, processor)
        if store_full:
            arrays["full_" + case] = pixel_values.astype(np.float16)
        cases.append({
            "case": case,
            "input": f"image_inputs/{input_name}.png",
            "input_mode": image.mode,
            "input_size_hw": [image.height, image.width],
            "kwargs": kwargs,
            "decode": {"image_mean": list(processor.image_mean), "image_std": list(processor.image_std),
                       "do_normalize": processor.do_normalize},
            "shape": list(pixel_values.shape),
            "channel_mean": pixel_values.astype(np.float64).mean(axis=(1, 2)).tolist(),
            "channel_min": pixel_values.min(axis=(1, 2)).astype(np.float64).tolist(),
            "channel_max": pixel_values.max(axis=(1, 2)).astype(np.float64).tolist(),
            "has_full": store_full,
        })

    batch = CLIPImageProcessor()([open_input(name) for name in BATCH], return_tensors="np")["pixel_values"]
    for index, name in enumerate(BATCH):  # a batch is the stack of the single-image results
        assert np.array_equal(batch[index], CLIPImageProcessor()(open_input(name), return_tensors="np")[
            "pixel_values"][0])

    hub = {}
    for key, data in HUB_CONFIGS.items():
        processor = CLIPImageProcessor.from_dict(dict(data))
        resolved = processor.to_dict()
        hub[key] = {"file": data, "resolved": {k: resolved[k] for k in RESOLVED_KEYS if k in resolved}}

    with tempfile.TemporaryDirectory() as tmp_dir:
        GroupViTImageProcessor(**OURS_SAVED).save_pretrained(tmp_dir)
        with open(os.path.join(tmp_dir, "preprocessor_config.json"), encoding="utf-8") as handle:
            ours_file = json.load(handle)
        resolved = CLIPImageProcessor.from_pretrained(tmp_dir).to_dict()
        hub["ours_saved"] = {"kwargs": OURS_SAVED, "file": ours_file,
                             "resolved": {k: resolved[k] for k in RESOLVED_KEYS if k in resolved},
                             "image_processor_type": resolved.get("image_processor_type")}

    default_dict = CLIPImageProcessor().to_dict()
    meta = {
        "generator": "tools/make_image_golden.py",
        "transformers_version": transformers.__version__,
        "pillow_version": Image.__version__,
        "constants": {"OPENAI_CLIP_MEAN": list(OPENAI_CLIP_MEAN), "OPENAI_CLIP_STD": list(OPENAI_CLIP_STD),
                      "IMAGENET_DEFAULT_MEAN": list(IMAGENET_DEFAULT_MEAN),
                      "IMAGENET_DEFAULT_STD": list(IMAGENET_DEFAULT_STD)},
        "default_to_dict": {k: default_dict[k] for k in RESOLVED_KEYS},
        "hub_configs": hub,
        "batch": {"inputs": [f"image_inputs/{name}.png" for name in BATCH], "shape": list(batch.shape)},
        "cases": cases,
    }

    tmp = os.path.join(GOLDEN, "image_reference.tmp.npz")
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, os.path.join(GOLDEN, "image_reference.npz"))
    tmp = os.path.join(GOLDEN, "image_cases.json.tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(meta, handle, indent=1, sort_keys=True)
        handle.write("\n")
    os.replace(tmp, os.path.join(GOLDEN, "image_cases.json"))
    print(f"wrote {len(cases)} cases, {len(INPUT_SPECS)} inputs", file=sys.stderr)


if __name__ == "__main__":
    main()
