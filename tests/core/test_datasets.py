"""Dataset readers, the VOC-layout writer and mIoU arithmetic (groupvit_core.datasets)."""

import math
import os

import numpy as np
import pytest
from PIL import Image

from groupvit_core import datasets
from groupvit_core.datasets import (
    PRESETS,
    SegmentationMetric,
    confusion_matrix,
    metrics_from_confusion,
    open_dataset,
    write_voc_layout,
)


# ----------------------------------------------------------------------------------------------------------------
# Metrics against loops
# ----------------------------------------------------------------------------------------------------------------


def _brute_metrics(pairs, num_classes, ignore=255):
    matrix = [[0] * num_classes for _ in range(num_classes)]
    for prediction, target in pairs:
        for p, t in zip(prediction.ravel().tolist(), target.ravel().tolist()):
            if t == ignore:
                continue
            matrix[t][p] += 1
    iou = []
    for c in range(num_classes):
        tp = matrix[c][c]
        fn = sum(matrix[c]) - tp
        fp = sum(matrix[r][c] for r in range(num_classes)) - tp
        iou.append(tp / (tp + fp + fn) if tp + fp + fn else float("nan"))
    present = [v for v in iou if not math.isnan(v)]
    total = sum(sum(row) for row in matrix)
    correct = sum(matrix[c][c] for c in range(num_classes))
    return matrix, iou, sum(present) / len(present), correct / total


def test_confusion_matrix_and_miou_match_loops():
    rng = np.random.RandomState(0)
    num_classes = 6
    metric = SegmentationMetric(num_classes)
    pairs = []
    for shape in [(7, 9), (5, 4), (11, 3)]:
        target = rng.randint(0, num_classes - 1, size=shape)  # class 5 never in the ground truth
        target[rng.rand(*shape) < 0.2] = 255
        prediction = rng.randint(0, num_classes - 2, size=shape)  # classes 4, 5 never predicted
        pairs.append((prediction, target))
        metric.update(prediction, target)
    matrix, iou, miou, accuracy = _brute_metrics(pairs, num_classes)
    np.testing.assert_array_equal(metric.matrix, matrix)
    result = metric.compute()
    np.testing.assert_allclose(result["iou"], iou)  # NaN where a class is in neither
    assert math.isnan(result["iou"][5]) and result["iou"][4] == 0.0
    assert result["miou"] == pytest.approx(miou)
    assert result["pixel_accuracy"] == pytest.approx(accuracy)
    assert metric.num_images == 3


def test_perfect_and_empty_predictions():
    target = np.array([[0, 1], [2, 255]])
    result = metrics_from_confusion(confusion_matrix(target.copy() % 255, target, 3))
    assert result["miou"] == 1.0 and result["pixel_accuracy"] == 1.0 and result["num_pixels"] == 3
    everything_ignored = metrics_from_confusion(confusion_matrix(np.zeros((2, 2), int), np.full((2, 2), 255), 3))
    assert math.isnan(everything_ignored["miou"]) and math.isnan(everything_ignored["pixel_accuracy"])


def test_confusion_matrix_errors():
    with pytest.raises(ValueError, match="shape"):
        confusion_matrix(np.zeros((2, 2), int), np.zeros((2, 3), int), 3)
    with pytest.raises(ValueError, match="target holds label 7"):
        confusion_matrix(np.zeros((2, 2), int), np.full((2, 2), 7), 3)
    with pytest.raises(ValueError, match="prediction holds label 3"):
        confusion_matrix(np.full((2, 2), 3), np.zeros((2, 2), int), 3)
    with pytest.raises(TypeError, match="integer"):
        confusion_matrix(np.zeros((2, 2)), np.zeros((2, 2), int), 3)


# ----------------------------------------------------------------------------------------------------------------
# Presets
# ----------------------------------------------------------------------------------------------------------------


def test_presets_follow_the_nvlabs_configs():
    assert len(PRESETS["voc"].class_names) == 21 and PRESETS["voc"].background_threshold == 0.95
    assert len(PRESETS["context"].class_names) == 60 and PRESETS["context"].background_threshold == 0.35
    assert len(PRESETS["coco-object"].class_names) == 81 and PRESETS["coco-object"].background_threshold == 0.95
    for preset in PRESETS.values():
        assert preset.class_names[0] == "background"
        assert len(set(preset.class_names)) == len(preset.class_names)
    assert PRESETS["voc"].class_names[11] == "table" and PRESETS["voc"].class_names[20] == "monitor"
    assert PRESETS["coco-object"].class_names[1] == "person"
    with pytest.raises(ValueError, match="unknown dataset format"):
        datasets.get_preset("ade20k")


# ----------------------------------------------------------------------------------------------------------------
# Writing and reading layouts
# ----------------------------------------------------------------------------------------------------------------


def _samples(count=3, seed=0):
    rng = np.random.RandomState(seed)
    out = []
    for i in range(count):
        height, width = 20 + 3 * i, 30 - 2 * i
        image = np.empty((height, width, 3), np.uint8)
        image[:] = rng.randint(0, 256, size=3)
        mask = np.zeros((height, width), np.uint8)
        mask[2:10, 3:12] = 1 + i % 2
        image[2:10, 3:12] = rng.randint(0, 256, size=3)
        mask[0, :] = 255
        out.append((f"img_{i:03d}", image, mask))
    return out


def test_voc_writer_round_trip(tmp_path):
    samples = _samples()
    names = write_voc_layout(tmp_path, samples, class_names=["background", "circle", "square"])
    assert names == ["img_000", "img_001", "img_002"]
    with open(tmp_path / "ImageSets" / "Segmentation" / "val.txt") as handle:
        assert handle.read().split() == names
    with Image.open(tmp_path / "SegmentationClass" / "img_001.png") as mask_image:
        assert mask_image.mode == "P"
        assert mask_image.getpalette()[3:6] == [128, 0, 0]  # VOC colour of label 1
    dataset = open_dataset(tmp_path, "voc")
    assert len(dataset) == 3 and dataset.custom_classes
    assert dataset.class_names == ("background", "circle", "square")
    for (name, image, mask), sample in zip(samples, dataset):
        assert sample.name == name
        np.testing.assert_array_equal(sample.mask, mask)
        assert sample.image.shape == image.shape and sample.image.dtype == np.uint8
        assert np.abs(sample.image.astype(int) - image).mean() < 8  # JPEG
    leftovers = [f for _, _, files in os.walk(tmp_path) for f in files if f.endswith(".tmp")]
    assert leftovers == []


def test_voc_writer_png_images_and_errors(tmp_path):
    name, image, mask = _samples(1)[0]
    write_voc_layout(tmp_path / "png", [(name, image, mask)], image_format="png")
    with Image.open(tmp_path / "png" / "JPEGImages" / f"{name}.png") as stored:
        np.testing.assert_array_equal(np.asarray(stored), image)
    with pytest.raises(ValueError, match="shape"):
        write_voc_layout(tmp_path / "a", [(name, image, mask[:5])])
    with pytest.raises(ValueError, match="duplicate sample name"):
        write_voc_layout(tmp_path / "b", [(name, image, mask), (name, image, mask)])
    with pytest.raises(ValueError, match="label 2"):
        bad = mask.copy()
        bad[5, 5] = 2
        write_voc_layout(tmp_path / "c", [(name, image, bad)], class_names=["background", "one"])
    with pytest.raises(ValueError, match="no samples"):
        write_voc_layout(tmp_path / "d", [])
    with pytest.raises(ValueError, match="split"):
        write_voc_layout(tmp_path / "e", [(name, image, mask)], split="../x")


def test_voc_reader_finds_the_devkit_layout_and_uses_voc_names(tmp_path):
    root = tmp_path / "VOCdevkit" / "VOC2012"
    write_voc_layout(root, _samples(2))
    dataset = open_dataset(tmp_path, "voc")
    assert dataset.root == str(root)
    assert dataset.class_names == PRESETS["voc"].class_names and not dataset.custom_classes
    assert dataset.background_threshold == 0.95


def test_missing_layout_names_the_missing_path(tmp_path):
    with pytest.raises(OSError, match="does not exist"):
        open_dataset(tmp_path / "nowhere", "voc")
    (tmp_path / "JPEGImages").mkdir()
    with pytest.raises(OSError, match=r"SegmentationClass.*val\.txt"):
        open_dataset(tmp_path, "voc")
    write_voc_layout(tmp_path / "v", _samples(2))
    os.remove(tmp_path / "v" / "SegmentationClass" / "img_001.png")
    with pytest.raises(OSError, match=r"mask .*img_001\.png of 'img_001' is missing"):
        open_dataset(tmp_path / "v", "voc")


def _write_png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_context_layout(tmp_path):
    root = tmp_path / "VOC2010"
    rng = np.random.RandomState(1)
    for name in ("2008_000002", "2008_000003"):
        _write_png(root / "JPEGImages" / f"{name}.jpg", rng.randint(0, 256, (12, 10, 3)).astype(np.uint8))
        _write_png(root / "SegmentationClassContext" / f"{name}.png", rng.randint(0, 60, (12, 10)).astype(np.uint8))
    split = root / "ImageSets" / "SegmentationContext" / "val.txt"
    split.parent.mkdir(parents=True)
    split.write_text("2008_000002\n2008_000003\n")
    dataset = open_dataset(tmp_path, "context")
    assert len(dataset) == 2 and len(dataset.class_names) == 60
    assert dataset[1].mask.max() < 60 and dataset.background_threshold == 0.35


def test_coco_object_layout(tmp_path):
    rng = np.random.RandomState(2)
    for name in ("000000000139", "000000000285"):
        _write_png(tmp_path / "images" / "val2017" / f"{name}.jpg", rng.randint(0, 256, (9, 7, 3)).astype(np.uint8))
        _write_png(tmp_path / "annotations" / "val2017" / f"{name}_instanceTrainIds.png",
                   rng.randint(0, 81, (9, 7)).astype(np.uint8))
    dataset = open_dataset(tmp_path, "coco-object")
    assert dataset.ids == ["000000000139", "000000000285"]
    assert dataset.mask_path("000000000139").endswith("_instanceTrainIds.png")
    assert dataset[0].image.shape == (9, 7, 3) and len(dataset.class_names) == 81


def test_mask_of_the_wrong_size_or_kind(tmp_path):
    write_voc_layout(tmp_path, _samples(1))
    _write_png(tmp_path / "SegmentationClass" / "img_000.png", np.zeros((3, 3), np.uint8))
    with pytest.raises(ValueError, match="mask .* is 3x3 but its image is 30x20"):
        open_dataset(tmp_path, "voc")[0]
    _write_png(tmp_path / "SegmentationClass" / "img_000.png", np.zeros((20, 30, 3), np.uint8))
    with pytest.raises(OSError, match="not a label image"):
        open_dataset(tmp_path, "voc")[0]


def test_images_are_read_in_stored_orientation(tmp_path):
    # An EXIF orientation tag must not rotate the image away from its mask.
    write_voc_layout(tmp_path, _samples(1))
    path = tmp_path / "JPEGImages" / "img_000.jpg"
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB"))
        exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    Image.fromarray(pixels).save(path, exif=exif.tobytes(), quality=95)
    sample = open_dataset(tmp_path, "voc")[0]
    assert sample.image.shape[:2] == sample.mask.shape == (20, 30)
    with pytest.raises(OSError, match="cannot read image"):
        path.write_bytes(b"broken")
        open_dataset(tmp_path, "voc")[0]
