"""Images from untrusted sources: the size bounds of GroupViTImageProcessor (MAX_IMAGE_SIDE, MAX_RESIZE_PIXELS,
the windowed resize of extreme aspect ratios) and the file-format allow-list (ALLOWED_IMAGE_FORMATS) of every
image reader: image.load_image, datasets.read_image / read_mask and the segment command's pre-check.

Parity with transformers of ordinary images is tests/core/test_image.py (golden files); memory caps of extreme
inputs run in child processes in tests/core/test_fuzz_inputs.py.
"""

import io
import json

import numpy as np
import pytest
from PIL import Image

from groupvit_core import datasets
from groupvit_core import image as image_module
from groupvit_core.cli import CommandError
from groupvit_core.commands.segment import _check_images
from groupvit_core.image import (
    ALLOWED_IMAGE_FORMATS,
    MAX_IMAGE_SIDE,
    MAX_RESIZE_PIXELS,
    GroupViTImageProcessor,
    center_crop,
    load_image,
    resize,
    resize_crop_window,
)

LEVELS = dict(do_rescale=False, do_normalize=False)  # pixel_values in 8-bit levels


def smooth_image(height, width, seed=0):
    """Low-frequency colour waves: content on which a resampled window shifted by a fraction of a pixel changes
    little (noise would turn any such shift into large differences)."""
    rng = np.random.RandomState(seed)
    rows, cols = np.mgrid[0:height, 0:width]
    channels = []
    for _ in range(3):
        freq_rows, freq_cols, phase = rng.uniform(0.5, 3, size=3)
        channels.append(127.5 + 120 * np.sin(2 * np.pi * (freq_rows * rows / height + freq_cols * cols / width)
                                             + phase))
    return np.rint(np.stack(channels, axis=-1)).astype(np.uint8)


# ----------------------------------------------------------------------------------------------------------------
# size / crop_size bounds


@pytest.mark.parametrize("kwargs, field", [
    ({"size": {"shortest_edge": MAX_IMAGE_SIDE + 1}}, "size['shortest_edge']"),
    ({"size": MAX_IMAGE_SIDE + 1}, "size['shortest_edge']"),
    ({"size": {"height": 224, "width": 10**6}}, "size['width']"),
    ({"size": (2**63, 224)}, "size['height']"),
    ({"crop_size": {"height": 100000, "width": 100000}}, "crop_size['height']"),
    ({"crop_size": MAX_IMAGE_SIDE + 1}, "crop_size['height']"),
])
def test_sizes_above_the_limit_are_refused_naming_the_field(kwargs, field, tmp_path):
    with pytest.raises(ValueError, match="MAX_IMAGE_SIDE") as error:
        GroupViTImageProcessor(**kwargs)
    assert field in str(error.value) and str(MAX_IMAGE_SIDE) in str(error.value)
    with pytest.raises(ValueError, match="MAX_IMAGE_SIDE"):
        GroupViTImageProcessor().preprocess(np.zeros((4, 4, 3), np.uint8), **kwargs)
    path = tmp_path / "preprocessor_config.json"
    path.write_text(json.dumps({key: list(value) if isinstance(value, tuple) else value
                                for key, value in kwargs.items()}))
    with pytest.raises(ValueError, match="preprocessor_config.json"):
        GroupViTImageProcessor.from_pretrained(tmp_path)


def test_sizes_at_the_limit_are_accepted():
    processor = GroupViTImageProcessor(size={"shortest_edge": MAX_IMAGE_SIDE},
                                       crop_size={"height": MAX_IMAGE_SIDE, "width": 16})
    assert processor.size == {"shortest_edge": MAX_IMAGE_SIDE}
    assert processor.crop_size == {"height": MAX_IMAGE_SIDE, "width": 16}
    assert MAX_RESIZE_PIXELS >= MAX_IMAGE_SIDE * MAX_IMAGE_SIDE  # every fixed-size resize stays possible


# ----------------------------------------------------------------------------------------------------------------
# Extreme aspect ratios


@pytest.mark.parametrize("as_type", ["array", "pil", "png", "grey_tall"])
def test_a_1_by_100000_image_gives_the_centre_of_its_resized_picture(as_type, tmp_path):
    # Shortest edge 224 makes it 224 x 22,400,000 (transformers would allocate 15 GB); the centre crop keeps the
    # source columns 49999.5 .. 50000.5, whose red values are 124 | 125 (the ramp steps every 400 columns).
    ramp = np.zeros((1, 100000, 3), np.uint8)
    ramp[0, :, 0] = np.arange(100000) // 400
    ramp[0, :, 1] = 77
    image = {"array": ramp, "pil": Image.fromarray(ramp), "grey_tall": ramp[:, :, 0].T}.get(as_type)
    if as_type == "png":
        image = str(tmp_path / "strip.png")
        Image.fromarray(ramp).save(image)
    pixels = GroupViTImageProcessor(**LEVELS)(image).pixel_values
    assert pixels.shape == (1, 3, 224, 224)
    assert set(np.unique(pixels[0, 0])) <= {124.0, 125.0} and pixels[0, 0].min() == 124 and pixels[0, 0].max() == 125
    if as_type != "grey_tall":
        assert np.unique(pixels[0, 1]).tolist() == [77.0] and np.unique(pixels[0, 2]).tolist() == [0.0]


@pytest.mark.parametrize("resample", sorted(image_module.RESAMPLE_FILTERS))
def test_a_constant_extreme_strip_stays_constant_with_every_filter(resample):
    strip = np.empty((3, 60000, 3), np.uint8)
    strip[...] = (200, 7, 255)
    pixels = GroupViTImageProcessor(resample=resample, **LEVELS)(strip).pixel_values
    assert pixels.shape == (1, 3, 224, 224)
    for channel, value in enumerate((200, 7, 255)):
        assert np.unique(pixels[0, channel]).tolist() == [value], (resample, channel)


@pytest.mark.parametrize("shape", [(6, 300), (300, 8), (40, 300), (300, 41), (97, 131), (10, 40)])
@pytest.mark.parametrize("crop", [(224, 224), (100, 300), (300, 100)])
def test_the_windowed_resize_draws_the_same_picture_as_the_full_one(shape, crop, monkeypatch):
    # Force the windowed path on ordinary sizes and compare with the full resize + crop (which test_image.py checks
    # against transformers). Pillow takes the window as float32 and may order its two passes differently for it, so
    # the bits may differ: by 2 levels at most for the interpolating filters on smooth content, by a shifted sample
    # for nearest and box.
    image = smooth_image(*shape, seed=shape[0])
    for resample, levels in (("bicubic", 2), ("bilinear", 2), ("lanczos", 2), ("hamming", 2), ("nearest", 8),
                             ("box", 8)):
        processor = GroupViTImageProcessor(resample=resample, crop_size={"height": crop[0], "width": crop[1]},
                                           **LEVELS)
        full = processor(image).pixel_values
        with monkeypatch.context() as patch:
            patch.setattr(image_module, "MAX_RESIZE_PIXELS", 1)
            windowed = processor(image).pixel_values
        assert windowed.shape == full.shape == (1, 3) + crop
        assert float(np.abs(windowed - full).max()) <= levels, (resample, float(np.abs(windowed - full).max()))
        assert float(np.abs(windowed - full).mean()) < 0.5, resample


def test_resize_crop_window_is_the_window_the_centre_crop_keeps():
    image = smooth_image(30, 50)
    full = center_crop(resize(image, 120, 200), 100, 60)
    window = resize_crop_window(image, 120, 200, 100, 60)
    assert window.shape == (100, 60, 3)
    assert np.abs(window.astype(int) - full.astype(int)).max() <= 2
    # where the resized image is smaller than the crop the window is all of it, padded by center_crop afterwards
    assert resize_crop_window(image, 120, 200, 300, 60).shape == (120, 60, 3)


def test_without_a_centre_crop_an_oversized_resize_is_refused_naming_the_sizes():
    strip = np.zeros((1, 100000, 3), np.uint8)
    with pytest.raises(ValueError, match="224 x 22400000") as error:
        GroupViTImageProcessor(do_center_crop=False)(strip)
    assert "MAX_RESIZE_PIXELS" in str(error.value) and "image" in str(error.value)
    with pytest.raises(ValueError, match=r"images\[1\]"):
        GroupViTImageProcessor(do_center_crop=False)([np.zeros((8, 8, 3), np.uint8), strip])
    with pytest.raises(ValueError, match="MAX_RESIZE_PIXELS"):
        resize(strip, 224, 22400000)
    with pytest.raises(ValueError, match="MAX_RESIZE_PIXELS"):
        image_module.resize_shortest_edge(strip, 224)
    # an uncropped resize under the limit still works
    assert GroupViTImageProcessor(do_center_crop=False)(strip[:, :20]).pixel_values.shape == (1, 3, 224, 4480)


def test_center_crop_allocates_only_the_crop():
    # A tall thin array cropped to a wide window: padding the whole image to max(crop, image) first (as
    # transformers does) would allocate 200000 x 5000 pixels; the result only needs the crop.
    tall = np.broadcast_to(np.arange(200000, dtype=np.int64)[:, None, None], (200000, 1, 1))
    crop = center_crop(tall, 4, 5000)
    assert crop.shape == (4, 5000, 1)
    # 4999 columns of padding, the odd one before the image (transformers' rule): column 2500 holds the image's
    assert crop[:, 2500, 0].tolist() == [99998, 99999, 100000, 100001]
    assert crop[:, :2500].max() == 0 and crop[:, 2501:].max() == 0


# ----------------------------------------------------------------------------------------------------------------
# File formats


def _encode(format, mode="RGB", size=(9, 7), **options):
    rng = np.random.RandomState(3)
    picture = Image.fromarray(rng.randint(0, 256, size=(size[1], size[0], 3)).astype(np.uint8)).convert(mode)
    buffer = io.BytesIO()
    picture.save(buffer, format=format, **options)
    return buffer.getvalue()


def _mpo():
    """A JPEG with a second picture (MPO, as some cameras write): Pillow opens it through the JPEG plugin."""
    first, second = Image.new("RGB", (9, 7), (10, 20, 30)), Image.new("RGB", (9, 7), (200, 100, 0))
    buffer = io.BytesIO()
    first.save(buffer, format="MPO", save_all=True, append_images=[second])
    return buffer.getvalue()


ALLOWED_SAMPLES = {
    "png": lambda: _encode("PNG"), "apng": lambda: _encode("PNG", save_all=True),
    "jpeg": lambda: _encode("JPEG"), "mpo": _mpo, "gif": lambda: _encode("GIF", "P"),
    "bmp": lambda: _encode("BMP"), "tiff": lambda: _encode("TIFF"), "webp": lambda: _encode("WEBP"),
    "ppm": lambda: _encode("PPM"), "pgm": lambda: _encode("PPM", "L"), "pbm": lambda: _encode("PPM", "1"),
}
REFUSED_SAMPLES = {
    "eps": lambda: _encode("EPS"), "ico": lambda: _encode("ICO", size=(16, 16)), "tga": lambda: _encode("TGA"),
    "pcx": lambda: _encode("PCX"), "sgi": lambda: _encode("SGI"), "im": lambda: _encode("IM"),
    "dib": lambda: _encode("DIB"), "xbm": lambda: _encode("XBM", "1"),
}


def test_the_allow_list_names_pillow_formats():
    assert ALLOWED_IMAGE_FORMATS == ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP", "PPM")
    Image.init()
    assert set(ALLOWED_IMAGE_FORMATS) <= set(Image.OPEN), "each entry must be a format Pillow can open"


@pytest.mark.parametrize("name", sorted(ALLOWED_SAMPLES))
def test_allowed_formats_load_whatever_the_file_name(name, tmp_path):
    path = tmp_path / f"{name}_saved_as.jpg"
    path.write_bytes(ALLOWED_SAMPLES[name]())
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (9, 7)
    assert datasets.read_image(str(path)).shape == (7, 9, 3)
    _check_images([str(path)])
    assert GroupViTImageProcessor()(str(path)).pixel_values.shape == (1, 3, 224, 224)


@pytest.mark.parametrize("name", sorted(REFUSED_SAMPLES))
def test_other_formats_are_refused_by_every_reader(name, tmp_path):
    data = REFUSED_SAMPLES[name]()
    with Image.open(io.BytesIO(data)) as probe:  # Pillow itself would open it
        assert probe.format not in ALLOWED_IMAGE_FORMATS
    path = tmp_path / "photo.png"
    path.write_bytes(data)
    for read in (load_image, datasets.read_image, datasets.read_mask):
        with pytest.raises(OSError) as error:
            read(str(path))
        assert "photo.png" in str(error.value) and "PNG, JPEG" in str(error.value), (read, str(error.value))
    with pytest.raises(CommandError, match="photo.png"):
        _check_images([str(path)])
    with pytest.raises(OSError, match="allowed formats"):
        GroupViTImageProcessor()(str(path))


def test_masks_are_still_read_from_palette_pngs(tmp_path):
    mask = Image.frombytes("P", (3, 2), bytes([0, 1, 2, 255, 1, 0]))
    mask.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * (768 - 9))
    path = tmp_path / "mask.png"
    mask.save(path)
    assert datasets.read_mask(str(path)).tolist() == [[0, 1, 2], [255, 1, 0]]
