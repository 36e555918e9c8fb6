"""Image preprocessing: every golden case within one 8-bit level of transformers' CLIPImageProcessor, presets,
config files, bad inputs.

The golden outputs come from tools/make_image_golden.py (transformers 4.57.6) on the PNGs in
tests/golden/image_inputs/.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from groupvit_core.image import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    NORMALIZATION_PRESETS,
    GroupViTImageProcessor,
    center_crop,
    load_image,
    resize_shortest_edge,
    shortest_edge_output_size,
)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GOLDEN = os.path.join(ROOT, "tests", "golden")

with open(os.path.join(GOLDEN, "image_cases.json"), encoding="utf-8") as _handle:
    META = json.load(_handle)
CASES = {case["case"]: case for case in META["cases"]}
_REFERENCE = np.load(os.path.join(GOLDEN, "image_reference.npz"))
REFERENCE = {key: _REFERENCE[key] for key in _REFERENCE.files}
EPS = 1e-5


def one_level(std) -> float:
    """One 8-bit level in normalised units for the most sensitive channel."""
    return 1 / 255 / min(std) + EPS


def open_input(relative: str) -> Image.Image:
    image = Image.open(os.path.join(GOLDEN, relative))
    image.load()
    return image


def reference(case: dict) -> np.ndarray:
    """Decode the reference's output from its stored uint8 levels (the generator checked this is lossless)."""
    levels = REFERENCE["levels_" + case["case"]]
    values = (levels.astype(np.float64) * (1 / 255)).astype(np.float32)
    if case["decode"]["do_normalize"]:
        mean = np.asarray(case["decode"]["image_mean"], np.float32)[:, None, None]
        std = np.asarray(case["decode"]["image_std"], np.float32)[:, None, None]
        values = (values - mean) / std
    return values


def tolerance(case: dict) -> float:
    return one_level(case["decode"]["image_std"]) if case["decode"]["do_normalize"] else 1 / 255 + EPS


def assert_close(actual: np.ndarray, case: dict, label: str = "") -> None:
    expected = reference(case)
    assert actual.dtype == np.float32
    assert actual.shape == tuple(case["shape"]), (actual.shape, case["shape"])
    diff = float(np.abs(actual - expected).max())
    assert diff <= tolerance(case), f"{case['case']}{label}: max abs diff {diff:.6g} > {tolerance(case):.6g}"


# ----------------------------------------------------------------------------------------------------------------
# Golden parity


def test_golden_files_cover_the_required_cases():
    modes = {case["input_mode"] for case in CASES.values()}
    assert {"RGB", "L", "RGBA", "P"} <= modes
    sizes = [case["input_size_hw"] for case in CASES.values()]
    assert any(h < 224 and w < 224 for h, w in sizes)  # upscaled
    assert any(h > 2 * w for h, w in sizes) and any(w > 2 * h for h, w in sizes)  # tall and wide
    assert any(h % 2 and w % 2 for h, w in sizes)  # odd
    assert len(CASES) == len(META["cases"]) >= 20


@pytest.mark.parametrize("name", sorted(CASES))
def test_golden_case_within_one_level(name):
    case = CASES[name]
    processor = GroupViTImageProcessor(**case["kwargs"])
    out = processor(open_input(case["input"]), return_tensors="np")
    assert set(out) == {"pixel_values"}
    assert out.pixel_values is out["pixel_values"]
    assert out.pixel_values.shape == (1, *case["shape"])
    assert_close(out.pixel_values[0], case)
    stats = out.pixel_values[0].astype(np.float64)
    np.testing.assert_allclose(stats.mean(axis=(1, 2)), case["channel_mean"], atol=tolerance(case))
    if case["has_full"]:  # the normalisation itself against the reference's float output (stored as float16)
        full = REFERENCE["full_" + name].astype(np.float32)
        diff = float(np.abs(out.pixel_values[0] - full).max())
        assert diff <= tolerance(case), f"{name}: max abs diff to float output {diff:.6g}"


@pytest.mark.parametrize("name", sorted(CASES))
def test_golden_case_via_preprocess_overrides(name):
    # The same settings given per call instead of in the constructor.
    case = CASES[name]
    out = GroupViTImageProcessor().preprocess(open_input(case["input"]), **case["kwargs"])
    assert_close(out["pixel_values"][0], case, " (preprocess overrides)")


@pytest.mark.parametrize("name", ["rgb_odd_97x131", "rgb_tall_300x40", "grey_45x77", "rgba_120x90",
                                  "imagenet_rgba_120x90", "noresize_pad_rgb_odd_97x131"])
def test_numpy_inputs_match_the_reference_for_pil(name):
    case = CASES[name]
    array = np.asarray(open_input(case["input"]))  # (H, W), (H, W, 3) or (H, W, 4) uint8
    processor = GroupViTImageProcessor(**case["kwargs"])
    assert_close(processor(array).pixel_values[0], case, " (uint8 array)")
    assert_close(processor(array / 255.0).pixel_values[0], case, " (float64 array in [0, 1])")
    assert_close(processor((array / 255.0).astype(np.float32)).pixel_values[0], case, " (float32 array)")
    if array.ndim == 2:
        assert_close(processor(array[:, :, None]).pixel_values[0], case, " ((H, W, 1) array)")


def test_file_paths_are_loaded():
    case = CASES["rgb_odd_97x131"]
    path = os.path.join(GOLDEN, case["input"])
    assert_close(GroupViTImageProcessor()(path).pixel_values[0], case, " (path)")
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (131, 97)


def test_batch_is_the_stack_of_single_results():
    names = [os.path.splitext(os.path.basename(path))[0] for path in META["batch"]["inputs"]]
    images = [open_input(path) for path in META["batch"]["inputs"]]
    batch = GroupViTImageProcessor()(images).pixel_values
    assert batch.shape == tuple(META["batch"]["shape"]) and batch.dtype == np.float32
    assert batch.flags.c_contiguous
    for index, name in enumerate(names):
        assert_close(batch[index], CASES[name], f" (batch item {index})")
    # a tuple and a 4-D channels-last array are batches too
    assert GroupViTImageProcessor()(tuple(images)).pixel_values.shape == batch.shape
    square = np.asarray(open_input(CASES["rgb_square_224x224"]["input"]))
    stacked = GroupViTImageProcessor()(np.stack([square, square[::-1]])).pixel_values
    assert stacked.shape == (2, 3, 224, 224)
    assert_close(stacked[0], CASES["rgb_square_224x224"], " (4-D array)")


def test_uncropped_images_of_different_sizes_cannot_be_stacked():
    images = [open_input(CASES[n]["input"]) for n in ("rgb_odd_97x131", "rgb_wide_50x300")]
    with pytest.raises(ValueError, match="different sizes"):
        GroupViTImageProcessor(do_center_crop=False)(images)


# ----------------------------------------------------------------------------------------------------------------
# Geometry helpers (the golden cases above exercise them end to end)


def test_shortest_edge_output_size_truncates_the_long_side():
    assert shortest_edge_output_size(500, 333, 224) == (336, 224)
    assert shortest_edge_output_size(333, 500, 224) == (224, 336)
    assert shortest_edge_output_size(50, 300, 224) == (224, 1344)
    assert shortest_edge_output_size(97, 131, 224) == (224, 302)
    assert shortest_edge_output_size(16, 16, 224) == (224, 224)


def test_resize_shortest_edge_and_center_crop():
    image = open_input(CASES["rgb_tall_500x333"]["input"])
    resized = resize_shortest_edge(image, 224)
    assert resized.shape == (336, 224, 3) and resized.dtype == np.uint8
    grey = resize_shortest_edge(np.zeros((10, 20), np.uint8), 5)
    assert grey.shape == (5, 10, 3)
    ramp = np.arange(5 * 7, dtype=np.uint8).reshape(5, 7, 1)
    crop = center_crop(ramp, 3, 4)
    assert crop.shape == (3, 4, 1) and crop[0, 0, 0] == ramp[1, 1, 0]
    padded = center_crop(ramp, 8, 10)  # smaller than the crop: zero padding, odd margins one more before
    assert padded.shape == (8, 10, 1)
    assert padded[2, 2, 0] == ramp[0, 0, 0] and padded[:2].max() == 0 and padded[:, :2].max() == 0
    assert padded[7].max() == 0 and padded[:, 9].max() == 0


# ----------------------------------------------------------------------------------------------------------------
# Presets and defaults


def test_constants_equal_the_reference():
    constants = META["constants"]
    assert list(CLIP_MEAN) == constants["OPENAI_CLIP_MEAN"] and list(CLIP_STD) == constants["OPENAI_CLIP_STD"]
    assert list(IMAGENET_MEAN) == constants["IMAGENET_DEFAULT_MEAN"]
    assert list(IMAGENET_STD) == constants["IMAGENET_DEFAULT_STD"]
    assert NORMALIZATION_PRESETS["clip"] == (CLIP_MEAN, CLIP_STD)
    assert NORMALIZATION_PRESETS["imagenet"] == (IMAGENET_MEAN, IMAGENET_STD)


def test_defaults_equal_clip_image_processor_defaults():
    ours = GroupViTImageProcessor().to_dict()
    for key, value in META["default_to_dict"].items():
        assert ours[key] == pytest.approx(value) if isinstance(value, float) else ours[key] == value, key
    assert GroupViTImageProcessor() == GroupViTImageProcessor.preset() == GroupViTImageProcessor.preset("clip")
    assert GroupViTImageProcessor().preset_name == "clip"


def test_imagenet_preset():
    processor = GroupViTImageProcessor.preset("imagenet")
    assert processor.image_mean == IMAGENET_MEAN and processor.image_std == IMAGENET_STD
    assert processor.preset_name == "imagenet"
    assert processor.size == {"shortest_edge": 224} and processor.crop_size == {"height": 224, "width": 224}
    case = CASES["imagenet_rgb_odd_97x131"]
    assert_close(processor(open_input(case["input"])).pixel_values[0], case, " (imagenet preset)")
    custom = GroupViTImageProcessor.preset("ImageNet", crop_size=160)
    assert custom.crop_size == {"height": 160, "width": 160} and custom.preset_name == "imagenet"
    assert GroupViTImageProcessor(image_mean=0.5, image_std=0.5).preset_name is None
    with pytest.raises(ValueError, match="unknown preset"):
        GroupViTImageProcessor.preset("openai")


# ----------------------------------------------------------------------------------------------------------------
# Config files


@pytest.mark.parametrize("name", sorted(META["hub_configs"]))
def test_config_dicts_resolve_like_transformers(name, tmp_path):
    entry = META["hub_configs"][name]
    processor = GroupViTImageProcessor.from_dict(entry["file"])
    ours = processor.to_dict()
    assert {k: ours[k] for k in entry["resolved"]} == entry["resolved"]
    # Keys the processor does not use survive, except use_square_size, which is applied (transformers drops it).
    dropped = set(entry["file"]) - set(ours) - {"use_square_size"}
    assert not dropped, f"keys {sorted(dropped)} of the config were dropped"
    path = tmp_path / "preprocessor_config.json"
    path.write_text(json.dumps(entry["file"]))
    assert GroupViTImageProcessor.from_pretrained(tmp_path) == processor
    assert GroupViTImageProcessor.from_pretrained(path) == processor


def test_transformers_reads_our_saved_file_with_the_same_settings(tmp_path):
    entry = META["hub_configs"]["ours_saved"]
    assert entry["image_processor_type"] == "CLIPImageProcessor"
    saved = GroupViTImageProcessor(**entry["kwargs"]).save_pretrained(tmp_path)
    with open(saved, encoding="utf-8") as handle:
        ours_file = json.load(handle)
    assert ours_file == entry["file"]  # the file transformers read back in the generator
    assert {k: ours_file[k] for k in entry["resolved"]} == entry["resolved"]


def test_save_and_load_round_trip(tmp_path):
    processor = GroupViTImageProcessor.preset("imagenet", size={"height": 200, "width": 180}, crop_size=(150, 120),
                                              resample="bilinear", do_normalize=False)
    processor.extra_config["processor_class"] = "CLIPProcessor"
    path = processor.save_pretrained(tmp_path / "ckpt")
    assert os.path.basename(path) == "preprocessor_config.json"
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["preprocessor_config.json"]  # no temp file left behind
    loaded = GroupViTImageProcessor.from_pretrained(tmp_path / "ckpt")
    assert loaded == processor and loaded.to_dict() == processor.to_dict()
    assert loaded.extra_config == {"image_processor_type": "CLIPImageProcessor", "processor_class": "CLIPProcessor"}
    assert loaded.resample == 2 and loaded.crop_size == {"height": 150, "width": 120}
    assert "GroupViTImageProcessor(" in repr(loaded)


def test_bad_config_files(tmp_path):
    with pytest.raises(OSError, match="preprocessor_config.json"):
        GroupViTImageProcessor.from_pretrained(tmp_path)
    bad = tmp_path / "preprocessor_config.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        GroupViTImageProcessor.from_pretrained(tmp_path)
    bad.write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        GroupViTImageProcessor.from_pretrained(tmp_path)
    bad.write_text(json.dumps({"size": {"longest_edge": 3}}))
    with pytest.raises(ValueError, match="size"):
        GroupViTImageProcessor.from_pretrained(bad)
    bad.write_text(json.dumps({"image_std": [0.2, 0.0, 0.2]}))
    with pytest.raises(ValueError, match="image_std"):
        GroupViTImageProcessor.from_pretrained(bad)
    with pytest.raises(OSError, match="is a file"):
        GroupViTImageProcessor().save_pretrained(bad)


# ----------------------------------------------------------------------------------------------------------------
# Bad inputs and settings


RGB = np.zeros((20, 30, 3), np.uint8)


@pytest.mark.parametrize(
    "images, error, match",
    [
        ([], ValueError, "empty list"),
        (np.zeros((0, 20, 30, 3), np.uint8), ValueError, "empty batch"),
        (np.zeros((0, 30, 3), np.uint8), ValueError, "zero size"),
        (np.zeros((20, 0), np.uint8), ValueError, "zero size"),
        (Image.new("RGB", (0, 5)), ValueError, "zero size"),
        (np.zeros((20, 30, 2), np.uint8), ValueError, "2 channels"),
        (np.zeros((20, 30, 5), np.uint8), ValueError, "5 channels"),
        (np.zeros((3, 20, 30), np.uint8), ValueError, "channels-first"),
        (np.zeros((20,), np.uint8), ValueError, "shape"),
        (np.full((20, 30, 3), np.nan, np.float32), ValueError, "NaN"),
        (np.full((20, 30, 3), np.inf), ValueError, "infinite"),
        (np.full((20, 30, 3), 2.0), ValueError, r"\[0, 1\]"),
        (np.full((20, 30, 3), -0.1), ValueError, r"\[0, 1\]"),
        (np.zeros((20, 30, 3), np.int64), TypeError, "dtype int64"),
        (np.zeros((20, 30, 3), np.uint16), TypeError, "dtype uint16"),
        (np.zeros((20, 30, 3), bool), TypeError, "dtype bool"),
        (np.zeros((20, 30, 3), np.complex64), TypeError, "dtype complex64"),
        (None, TypeError, "None"),
        (12, TypeError, "unsupported type int"),
        ({"pixel_values": RGB}, TypeError, "unsupported type dict"),
        ([RGB, object()], TypeError, r"images\[1\] has unsupported type object"),
        ([[RGB]], TypeError, "nested"),
        ([RGB, np.zeros((20, 30, 2), np.uint8)], ValueError, r"images\[1\] has 2 channels"),
    ],
)
def test_bad_images_raise(images, error, match):
    with pytest.raises(error, match=match):
        GroupViTImageProcessor()(images)


def test_missing_and_broken_files_raise_oserror_naming_the_file(tmp_path):
    missing = tmp_path / "missing.png"
    with pytest.raises(OSError, match="missing.png"):
        load_image(missing)
    with pytest.raises(OSError, match="missing.png"):
        GroupViTImageProcessor()(str(missing))
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image at all")
    with pytest.raises(OSError, match="broken.jpg"):
        load_image(broken)
    truncated = tmp_path / "truncated.png"
    with open(os.path.join(GOLDEN, CASES["rgb_odd_97x131"]["input"]), "rb") as handle:
        truncated.write_bytes(handle.read()[:300])
    with pytest.raises(OSError, match="truncated.png"):
        load_image(truncated)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"size": {"longest_edge": 224}}, ValueError, "size"),
        ({"size": {"shortest_edge": 0}}, ValueError, "shortest_edge"),
        ({"size": "224"}, TypeError, "size"),
        ({"crop_size": {"shortest_edge": 224}}, ValueError, "crop_size"),
        ({"crop_size": (224, 224, 3)}, ValueError, "crop_size"),
        ({"crop_size": {"height": 224.5, "width": 224}}, ValueError, "height"),
        ({"resample": 9}, ValueError, "resample"),
        ({"resample": "cubic"}, ValueError, "resample"),
        ({"rescale_factor": 0}, ValueError, "rescale_factor"),
        ({"rescale_factor": float("nan")}, ValueError, "rescale_factor"),
        ({"image_mean": [0.5, 0.5]}, ValueError, "image_mean"),
        ({"image_std": [0.5, float("inf"), 0.5]}, ValueError, "image_std"),
        ({"image_std": [0.5, -0.5, 0.5]}, ValueError, "image_std"),
        ({"do_resize": "yes"}, TypeError, "do_resize"),
    ],
)
def test_bad_settings_raise(kwargs, error, match):
    with pytest.raises(error, match=match):
        GroupViTImageProcessor(**kwargs)
    with pytest.raises(error, match=match):
        GroupViTImageProcessor().preprocess(RGB, **kwargs)


def test_bad_call_options_raise():
    with pytest.raises(TypeError, match="do_flip"):
        GroupViTImageProcessor()(RGB, do_flip=True)
    with pytest.raises(ValueError, match="return_tensors"):
        GroupViTImageProcessor()(RGB, return_tensors="pt")
    with pytest.raises(TypeError):
        GroupViTImageProcessor(do_flip=True)
    assert GroupViTImageProcessor()(RGB, return_tensors=None).pixel_values.shape == (1, 3, 224, 224)


def test_without_rgb_conversion_only_rgb_is_accepted():
    processor = GroupViTImageProcessor(do_convert_rgb=False)
    assert processor(RGB).pixel_values.shape == (1, 3, 224, 224)
    with pytest.raises(ValueError, match="do_convert_rgb"):
        processor(Image.new("L", (8, 8)))
    with pytest.raises(ValueError, match="do_convert_rgb"):
        processor(np.zeros((8, 8, 4), np.uint8))


# ----------------------------------------------------------------------------------------------------------------
# Isolation


def test_importing_the_image_module_loads_no_framework():
    code = (
        "import sys\n"
        "import groupvit_core.image\n"
        "from groupvit_core import GroupViTImageProcessor\n"
        "GroupViTImageProcessor()(__import__('numpy').zeros((8, 8, 3), 'uint8'))\n"
        "print(','.join(sorted(m for m in ('torch', 'tensorflow', 'keras', 'jax', 'transformers')"
        " if m in sys.modules)))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"importing groupvit_core.image loaded {result.stdout.strip()}"
