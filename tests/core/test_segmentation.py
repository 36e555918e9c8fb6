"""Zero-shot segmentation core (groupvit_core.segmentation, groupvit_core.visualize), checked against brute-force
per-pixel implementations written here with plain loops, and a numpy stand-in for the model backend."""

import math
import os

import numpy as np
import pytest
from PIL import Image

from groupvit_core import segmentation as seg
from groupvit_core import visualize
from groupvit_core.segmentation import (
    SegmentationResult,
    Window,
    WindowAccumulator,
    ZeroShotSegmenter,
    group_class_scores,
    hard_group_map,
    plan_windows,
    refine_label_map,
)
from groupvit_core.tokenizer import GroupViTTokenizer


# ----------------------------------------------------------------------------------------------------------------
# A numpy stand-in for SegmentationBackend: two grouping stages, any input size that is a multiple of the patch.
# ----------------------------------------------------------------------------------------------------------------


def _softmax(x, axis):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


class FakeBackend:
    def __init__(self, patch_size=4, groups=(6, 3), dim=8, seed=0, logit_scale=30.0):
        rng = np.random.RandomState(seed)
        self.patch_size = patch_size
        self.dim = dim
        self.logit_scale = logit_scale
        self.max_text_length = 77
        self.proj = rng.standard_normal((3 * patch_size * patch_size, groups[0]))
        self.stage2 = 2.0 * rng.standard_normal((groups[1], groups[0]))
        self.group_vecs = rng.standard_normal((groups[1], dim))
        self.text_rows = []
        self.image_shapes = []

    def encode_text(self, input_ids, attention_mask):
        self.text_rows.append(len(input_ids))
        out = []
        for ids, mask in zip(input_ids, attention_mask):
            ids = ids[mask > 0]
            rng = np.random.RandomState(int(np.sum(ids * np.arange(1, len(ids) + 1)) % (2 ** 31)))
            out.append(rng.standard_normal(self.dim))
        out = np.asarray(out)
        return (out / np.linalg.norm(out, axis=1, keepdims=True)).astype(np.float32)

    def encode_image(self, pixel_values):
        assert pixel_values.dtype == np.float32
        self.image_shapes.append(pixel_values.shape)
        batch, channels, height, width = pixel_values.shape
        p = self.patch_size
        assert height % p == 0 and width % p == 0
        rows, cols = height // p, width // p
        patches = pixel_values.reshape(batch, channels, rows, p, cols, p).transpose(0, 2, 4, 1, 3, 5)
        patches = patches.reshape(batch, rows * cols, -1)
        first = _softmax(patches @ self.proj, axis=-1).transpose(0, 2, 1)  # (B, G1, N) softmax over groups
        means = patches.mean(axis=1)
        second = _softmax(self.stage2[None] + means[:, :1, None], axis=1)  # (B, G2, G1)
        groups = self.group_vecs[None] + 0.3 * means[:, None, : self.dim]
        groups /= np.linalg.norm(groups, axis=-1, keepdims=True)
        image = groups.mean(axis=1)
        image /= np.linalg.norm(image, axis=-1, keepdims=True)
        return dict(group_embeds=groups.astype(np.float32), image_embeds=image.astype(np.float32),
                    assignments=[first.astype(np.float32), second.astype(np.float32)], grid=(rows, cols))


@pytest.fixture(scope="module")
def tokenizer():
    return GroupViTTokenizer()


def _image(height, width, seed=0):
    rng = np.random.RandomState(seed)
    image = np.zeros((height, width, 3), dtype=np.uint8)
    image[:] = rng.randint(0, 256, size=3)
    image[height // 3:, width // 2:] = rng.randint(0, 256, size=3)
    return np.clip(image.astype(int) + rng.randint(-20, 21, size=image.shape), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------------------------
# Brute-force references (plain loops, written from the definitions)
# ----------------------------------------------------------------------------------------------------------------


def _torch_bilinear_taps(dst, in_size, out_size):
    """PyTorch interpolate(bilinear, align_corners=False) source taps of one output index."""
    src = (dst + 0.5) * in_size / out_size - 0.5
    if src < 0:
        src = 0.0
    low = int(src)
    high = low + 1 if low < in_size - 1 else low
    frac = src - low
    return [(low, 1.0 - frac), (high, frac)]


def _brute_resize(values, out_h, out_w):
    """(C, h, w) -> (C, out_h, out_w) with explicit loops."""
    channels, in_h, in_w = values.shape
    out = np.zeros((channels, out_h, out_w))
    for y in range(out_h):
        for x in range(out_w):
            for (sy, wy) in _torch_bilinear_taps(y, in_h, out_h):
                for (sx, wx) in _torch_bilinear_taps(x, in_w, out_w):
                    out[:, y, x] += wy * wx * values[:, sy, sx]
    return out


def _brute_group_map(assignments, grid, height, width):
    rows, cols = grid
    num_tokens = rows * cols
    # distribution[token][g] = sum over chains of stage assignments
    distribution = [[assignments[0][g, t] for g in range(assignments[0].shape[0])] for t in range(num_tokens)]
    for soft in assignments[1:]:
        distribution = [[sum(distribution[t][g1] * soft[g2, g1] for g1 in range(soft.shape[1]))
                         for g2 in range(soft.shape[0])] for t in range(num_tokens)]
    groups = len(distribution[0])
    grid_maps = np.array([[[distribution[r * cols + c][g] for c in range(cols)] for r in range(rows)]
                          for g in range(groups)])
    resized = _brute_resize(grid_maps, height, width)
    out = np.zeros((height, width), dtype=np.int64)
    for y in range(height):
        for x in range(width):
            best = 0
            for g in range(1, groups):
                if resized[g, y, x] > resized[best, y, x]:
                    best = g
            out[y, x] = best
    return out


def _brute_scores(group_embeds, image_embed, text_embeds, logit_scale, top_k, threshold):
    scale = min(logit_scale, 100.0)
    groups, classes = group_embeds.shape[0], text_embeds.shape[0]
    dot = lambda a, b: sum(float(x) * float(y) for x, y in zip(a, b))  # noqa: E731
    whole = [math.exp(scale * dot(image_embed, text_embeds[c])) for c in range(classes)]
    order = sorted(range(classes), key=lambda c: (-whole[c], c))
    kept = set(order[:min(top_k, classes)])
    table = []
    for g in range(groups):
        logits = [scale * dot(group_embeds[g], text_embeds[c]) for c in range(classes)]
        total = sum(math.exp(v) for v in logits)
        pre = [math.exp(v) / total for v in logits]
        kept_total = sum(math.exp(logits[c]) for c in kept)
        post = [math.exp(logits[c]) / kept_total if c in kept else 0.0 for c in range(classes)]
        table.append([pre[c] * post[c] for c in range(classes)])
    if threshold is None:
        return np.array(table)
    cap = min(threshold, max(max(row) for row in table))
    return np.array([[1.0 if max(row) < cap else 0.0] + row for row in table])


def _brute_segment(backend, text_embeds, pixels, windows, top_k, threshold):
    """Per-pixel average over the windows covering it of its group's scores (pixels: (3, H, W), no resizing)."""
    _, height, width = pixels.shape
    channels = text_embeds.shape[0] + (threshold is not None)
    total = np.zeros((channels, height, width))
    count = np.zeros((height, width))
    for window in windows:
        crop = pixels[None, :, window.top:window.bottom, window.left:window.right]
        out = backend.encode_image(np.ascontiguousarray(crop))
        soft = [a[0].astype(np.float64) for a in out["assignments"]]
        groups = _brute_group_map(soft, out["grid"], window.height, window.width)
        table = _brute_scores(out["group_embeds"][0], out["image_embeds"][0], text_embeds, backend.logit_scale,
                              top_k, threshold)
        for y in range(window.height):
            for x in range(window.width):
                total[:, window.top + y, window.left + x] += table[groups[y, x]]
                count[window.top + y, window.left + x] += 1
    assert count.min() >= 1
    return total / count


# ----------------------------------------------------------------------------------------------------------------
# Windows
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("height,width,window,stride", [
    (448, 597, 448, 224), (597, 448, 448, 224), (448, 448, 448, 224), (1000, 1500, 448, 224),
    (300, 2048, 448, 224), (20, 28, 16, 8), (17, 33, 16, 5), (5, 7, 16, 8), (16, 16, 16, 16), (31, 31, 16, 16),
])
def test_windows_cover_every_pixel_and_stay_inside(height, width, window, stride):
    windows = plan_windows(height, width, window, stride)
    coverage = np.zeros((height, width), dtype=int)
    for w in windows:
        assert 0 <= w.top < w.bottom <= height and 0 <= w.left < w.right <= width
        assert w.height == min(window, height) and w.width == min(window, width)
        coverage[w.top:w.bottom, w.left:w.right] += 1
    assert coverage.min() >= 1
    # mmseg's grid: ceil((side - window) / stride) + 1 windows per axis, the first at 0, the last at the edge.
    rows = max(0, math.ceil((height - window) / stride)) + 1
    cols = max(0, math.ceil((width - window) / stride)) + 1
    assert len(windows) == rows * cols
    assert windows[0].top == 0 and windows[0].left == 0
    assert windows[-1].bottom == height and windows[-1].right == width
    tops = sorted({w.top for w in windows})
    assert all(b - a <= stride for a, b in zip(tops, tops[1:]))


def test_window_plan_of_a_voc_sized_image():
    # 500x375 -> short side 448 -> 448x597: two windows, at x = 0 and x = 597 - 448.
    assert seg.rescaled_size(375, 500) == (448, 597)
    assert plan_windows(448, 597) == [Window(0, 0, 448, 448), Window(0, 149, 448, 597)]


def test_window_planner_rejects_gaps_and_bad_sizes():
    with pytest.raises(ValueError, match="stride"):
        plan_windows(100, 100, 16, 17)
    with pytest.raises(ValueError, match="height"):
        plan_windows(0, 100)


def test_rescaled_size_follows_mmcv_rule():
    assert seg.rescaled_size(448, 448) == (448, 448)
    assert seg.rescaled_size(100, 50) == (896, 448)  # upscaled
    assert seg.rescaled_size(100, 1000) == (205, 2048)  # long side capped at 2048
    assert seg.rescaled_size(333, 500) == (448, 673)  # 672.67 rounds half up


def test_accumulator_averages_overlaps_like_brute_force():
    rng = np.random.RandomState(0)
    height, width, channels = 23, 37, 3
    windows = plan_windows(height, width, 16, 7)
    acc = WindowAccumulator(channels, height, width)
    added = []
    for w in windows:
        scores = rng.rand(channels, w.height, w.width).astype(np.float32)
        acc.add(w, scores)
        added.append((w, scores))
    average = acc.average()
    assert average.shape == (channels, height, width)
    for y in range(height):
        for x in range(width):
            values = [s[:, y - w.top, x - w.left] for w, s in added
                      if w.top <= y < w.bottom and w.left <= x < w.right]
            assert len(values) >= 1
            np.testing.assert_allclose(average[:, y, x], np.mean(values, axis=0), rtol=1e-6)


def test_accumulator_refuses_uncovered_pixels_and_misfit_scores():
    acc = WindowAccumulator(2, 10, 10)
    acc.add(Window(0, 0, 10, 5), np.ones((2, 10, 5), np.float32))
    with pytest.raises(ValueError, match="covered by no window"):
        acc.average()
    with pytest.raises(ValueError, match="do not fit"):
        acc.add(Window(0, 0, 10, 5), np.ones((2, 5, 10), np.float32))
    with pytest.raises(ValueError, match=r"expected \(channels, height, width\)"):
        acc.add(Window(0, 0, 10, 5), np.ones((10, 5, 2), np.float32))  # channels-last


def test_accumulator_group_map_takes_the_nearest_window_centre():
    acc = WindowAccumulator(1, 4, 12)
    acc.add(Window(0, 0, 4, 8), np.zeros((1, 4, 8), np.float32), np.zeros((4, 8), int), num_groups=5)
    acc.add(Window(0, 4, 4, 12), np.zeros((1, 4, 8), np.float32), np.ones((4, 8), int), num_groups=5)
    # Columns 0..5 are nearer the first window's centre (3.5), 6..11 the second's (7.5); col 5/6 split evenly.
    assert acc.groups[0].tolist() == [0] * 6 + [6] * 6


# ----------------------------------------------------------------------------------------------------------------
# Grouping and the class rule
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("grid,out", [((3, 4), (11, 13)), ((2, 2), (8, 8)), ((4, 3), (4, 3)), ((2, 5), (7, 20))])
def test_hard_group_map_matches_brute_force(grid, out):
    rng = np.random.RandomState(sum(grid) + sum(out))
    tokens = grid[0] * grid[1]
    first = _softmax(3 * rng.randn(6, tokens), axis=0)
    second = _softmax(3 * rng.randn(3, 6), axis=0)
    fast = hard_group_map([first, second], grid, *out)
    slow = _brute_group_map([first, second], grid, *out)
    np.testing.assert_array_equal(fast, slow)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int32])
def test_argmax_first_axis_is_numpys_argmax_with_ties_and_nan(dtype):
    rng = np.random.RandomState(7)
    stack = rng.randint(0, 4, size=(6, 9, 11)).astype(dtype)  # many ties
    np.testing.assert_array_equal(seg.argmax_first_axis(stack), np.argmax(stack, axis=0))
    if np.issubdtype(dtype, np.floating):
        stack[3, 2, 5] = np.nan  # NaN wins, first NaN on several
        stack[1, 0, 0] = stack[4, 0, 0] = np.nan
        stack[0, 8, 10] = np.nan
        expected = np.argmax(stack, axis=0)
        assert expected[2, 5] == 3 and expected[0, 0] == 1 and expected[8, 10] == 0
        np.testing.assert_array_equal(seg.argmax_first_axis(stack), expected)
    np.testing.assert_array_equal(seg.argmax_first_axis(stack[:1]), np.zeros((9, 11)))
    with pytest.raises(ValueError, match="stack of planes"):
        seg.argmax_first_axis(np.zeros(5))


def test_hard_group_map_single_stage_and_no_stage():
    rng = np.random.RandomState(1)
    soft = _softmax(rng.randn(5, 6), axis=0)
    np.testing.assert_array_equal(hard_group_map([soft], (2, 3), 4, 6), _brute_group_map([soft], (2, 3), 4, 6))
    # Without grouping stages every patch is its own group.
    np.testing.assert_array_equal(hard_group_map([], (2, 2), 2, 2), [[0, 1], [2, 3]])


def test_group_distribution_checks_stage_shapes():
    with pytest.raises(ValueError, match="tokens"):
        seg.group_distribution([np.ones((4, 6)), np.ones((2, 5))])


@pytest.mark.parametrize("classes,top_k,threshold", [(7, 5, None), (7, 5, 0.95), (3, 5, 0.5), (9, 2, 0.35),
                                                     (4, None, 0.2), (6, 1, None)])
def test_group_class_scores_match_brute_force(classes, top_k, threshold):
    rng = np.random.RandomState(classes * 10 + (top_k or 0))
    norm = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    groups = norm(rng.randn(4, 6))
    image = norm(rng.randn(6))
    texts = norm(rng.randn(classes, 6))
    fast = group_class_scores(groups, image, texts, 37.0, top_k, threshold)
    slow = _brute_scores(groups, image, texts, 37.0, top_k if top_k else classes, threshold)
    np.testing.assert_allclose(fast, slow, rtol=1e-9, atol=1e-12)


def test_logit_scale_is_clamped_at_100():
    rng = np.random.RandomState(3)
    groups, image, texts = rng.randn(3, 5), rng.randn(5), rng.randn(4, 5)
    np.testing.assert_allclose(group_class_scores(groups, image, texts, 500.0),
                               group_class_scores(groups, image, texts, 100.0))


def test_background_threshold_is_capped_at_the_best_group_score():
    # Every group's best score is below 0.95: the cap (max over groups) keeps the best group as foreground.
    rng = np.random.RandomState(4)
    texts = np.eye(3)
    groups = np.array([[1.0, 0.9, 0.0], [0.0, 1.0, 0.95], [0.5, 0.5, 0.5]])
    table = group_class_scores(groups, np.array([1.0, 1.0, 1.0]), texts, 3.0, 5, 0.95)
    best = table[:, 1:].max(axis=1)
    assert best.max() < 0.95
    assert table[np.argmax(best), 0] == 0.0
    assert all(table[g, 0] == 1.0 for g in range(3) if best[g] < best.max())
    del rng


# ----------------------------------------------------------------------------------------------------------------
# Prompts and classes
# ----------------------------------------------------------------------------------------------------------------


def test_templates_and_prompts():
    assert seg.resolve_templates(None) == ("a photo of a {}.",)
    assert seg.resolve_templates("single") == ("a photo of a {}.",)
    assert len(seg.resolve_templates("ensemble")) == 80
    assert seg.build_prompts(["cat", "dog"], ["a {}.", "the {}"]) == ["a cat.", "the cat", "a dog.", "the dog"]
    with pytest.raises(ValueError, match="unknown template set"):
        seg.resolve_templates("fancy")
    with pytest.raises(ValueError, match="exactly one"):
        seg.resolve_templates(["no placeholder"])


def test_class_name_checks():
    assert seg.check_class_names([" cat", "dog "]) == ["cat", "dog"]
    with pytest.raises(ValueError, match="empty"):
        seg.check_class_names([])
    with pytest.raises(ValueError, match="duplicate class name 'Cat'"):
        seg.check_class_names(["cat", "Cat "])
    with pytest.raises(ValueError, match="class name 1 is empty"):
        seg.check_class_names(["cat", "  "])
    with pytest.raises(TypeError, match="one str"):
        seg.check_class_names("cat,dog")


def test_text_embeddings_are_computed_once_and_reused(tokenizer):
    backend = FakeBackend()
    segmenter = ZeroShotSegmenter(backend, tokenizer, short_side=None, window_size=16, stride=8)
    embeds = segmenter.set_classes(["cat", "dog", "tree"])
    assert backend.text_rows == [3]
    assert embeds.shape == (3, backend.dim)
    np.testing.assert_allclose(np.linalg.norm(embeds, axis=1), 1.0, rtol=1e-6)
    segmenter.segment([_image(20, 20), _image(16, 24, seed=1)])
    segmenter.segment([_image(20, 20)])
    assert backend.text_rows == [3]  # never re-encoded


def test_template_ensemble_averages_normalised_prompt_embeddings(tokenizer):
    backend = FakeBackend()
    segmenter = ZeroShotSegmenter(backend, tokenizer)
    templates = ["a photo of a {}.", "art of the {}.", "a {} in a video game."]
    embeds = segmenter.set_classes(["cat", "dog"], templates=templates)
    assert backend.text_rows == [6]
    per_prompt = []
    for name in ["cat", "dog"]:
        batch = tokenizer([t.format(name) for t in templates], padding="longest", return_tensors="np")
        per_prompt.append(backend.encode_text(batch["input_ids"], batch["attention_mask"]).astype(np.float64))
    expected = np.stack([p.mean(axis=0) / np.linalg.norm(p.mean(axis=0)) for p in per_prompt])
    np.testing.assert_allclose(embeds, expected, rtol=1e-6)


def test_precomputed_embeddings_and_output_class_names():
    backend = FakeBackend()
    segmenter = ZeroShotSegmenter(backend, None, background_threshold=0.9)
    segmenter.set_class_embeddings(["a", "b"], 3 * np.eye(2, backend.dim))
    np.testing.assert_allclose(segmenter.text_embeddings, np.eye(2, backend.dim))
    assert segmenter.output_class_names == ("background", "a", "b")
    with pytest.raises(ValueError, match=r"\(2, D\)"):
        segmenter.set_class_embeddings(["a", "b"], np.ones((3, backend.dim)))
    with pytest.raises(ValueError, match="no tokenizer"):
        segmenter.set_classes(["a"])


# ----------------------------------------------------------------------------------------------------------------
# The whole pipeline against brute force
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("threshold", [None, 0.6])
def test_sliding_segmentation_matches_brute_force(tokenizer, threshold):
    backend = FakeBackend(seed=2)
    segmenter = ZeroShotSegmenter(backend, tokenizer, short_side=None, window_size=16, stride=8,
                                  background_threshold=threshold, top_k=2, batch_size=3)
    segmenter.set_classes(["sky", "grass", "road", "car"])
    image = _image(20, 28, seed=5)
    result = segmenter.segment([image])[0]
    _, pixels = segmenter.prepare(image)
    windows = plan_windows(20, 28, 16, 8)
    assert len(windows) == 6
    expected = _brute_segment(backend, segmenter.text_embeddings.astype(np.float64), pixels, windows, 2, threshold)
    np.testing.assert_allclose(result.probabilities, expected, atol=1e-5)
    np.testing.assert_array_equal(result.label_map, np.argmax(expected, axis=0))
    assert result.label_map.dtype == np.int32 and result.group_map.shape == (20, 28)
    names = ("background",) * (threshold is not None) + ("sky", "grass", "road", "car")
    assert result.class_names == names and result.has_background == (threshold is not None)


def test_whole_image_with_resizing_matches_brute_force(tokenizer):
    backend = FakeBackend(seed=3)
    segmenter = ZeroShotSegmenter(backend, tokenizer, window="whole", short_side=12, background_threshold=0.95)
    segmenter.set_classes(["a", "b", "c"])
    image = _image(15, 25, seed=6)
    result = segmenter.segment([image])[0]
    # 15x25 -> short side 12 -> 12x20; one window of the whole image; scores resized back to 15x25.
    assert backend.image_shapes == [(1, 3, 12, 20)]
    _, pixels = segmenter.prepare(image)
    assert pixels.shape == (3, 12, 20)
    small = _brute_segment(backend, segmenter.text_embeddings.astype(np.float64), pixels,
                           [Window(0, 0, 12, 20)], 5, 0.95)
    expected = _brute_resize(small, 15, 25)
    np.testing.assert_allclose(result.probabilities, expected, atol=1e-5)
    np.testing.assert_array_equal(result.label_map, np.argmax(expected, axis=0))


@pytest.mark.parametrize("window,threshold", [("whole", None), ("whole", 0.9), ("slide", None)])
def test_one_window_without_resizing_matches_brute_force(tokenizer, window, threshold):
    # One window covering the image (whole, or a sliding window larger than the image) at the model's size: the
    # scores are taken as the window gives them, without the accumulator.
    backend = FakeBackend(seed=4)
    segmenter = ZeroShotSegmenter(backend, tokenizer, window=window, short_side=None, window_size=32, stride=16,
                                  background_threshold=threshold, top_k=2)
    segmenter.set_classes(["a", "b", "c"])
    image = _image(16, 24, seed=7)
    result = segmenter.segment([image])[0]
    assert backend.image_shapes == [(1, 3, 16, 24)]
    _, pixels = segmenter.prepare(image)
    expected = _brute_segment(backend, segmenter.text_embeddings.astype(np.float64), pixels,
                              [Window(0, 0, 16, 24)], 2, threshold)
    np.testing.assert_allclose(result.probabilities, expected, atol=1e-6)
    np.testing.assert_array_equal(result.label_map, np.argmax(expected, axis=0))
    out = backend.encode_image(pixels[None])
    groups = _brute_group_map([a[0].astype(np.float64) for a in out["assignments"]], out["grid"], 16, 24)
    np.testing.assert_array_equal(result.group_map, groups)
    assert result.probabilities.dtype == np.float32 and result.probabilities.flags.c_contiguous
    assert result.label_map.dtype == np.int32 and result.group_map.dtype == np.int32


def test_window_not_a_multiple_of_the_patch_is_resized_for_the_model(tokenizer):
    backend = FakeBackend()
    segmenter = ZeroShotSegmenter(backend, tokenizer, window="whole", short_side=None)
    segmenter.set_classes(["a", "b"])
    result = segmenter.segment([_image(18, 30)])[0]
    assert backend.image_shapes == [(1, 3, 16, 32)]  # nearest multiples of the 4-pixel patch
    assert result.label_map.shape == (18, 30) and result.probabilities.shape == (2, 18, 30)


def test_batches_of_images_of_different_sizes(tokenizer):
    backend = FakeBackend()
    segmenter = ZeroShotSegmenter(backend, tokenizer, short_side=20, window_size=16, stride=8, batch_size=5)
    segmenter.set_classes(["a", "b", "c"])
    images = [_image(20, 20), _image(40, 30, seed=1), _image(20, 45, seed=2)]
    results = segmenter.segment(images)
    assert [r.label_map.shape for r in results] == [(20, 20), (40, 30), (20, 45)]
    # windows of all images go through the model together, batch_size at a time
    assert all(shape[0] <= 5 for shape in backend.image_shapes)
    assert sum(shape[0] for shape in backend.image_shapes) == sum(
        len(plan_windows(*seg.rescaled_size(*im.shape[:2], 20), 16, 8)) for im in images)
    one_by_one = [segmenter.segment_image(im) for im in images]
    for a, b in zip(results, one_by_one):
        np.testing.assert_array_equal(a.label_map, b.label_map)
        np.testing.assert_allclose(a.probabilities, b.probabilities, atol=1e-6)


def test_prepare_normalises_with_the_preset(tokenizer):
    from groupvit_core.image import NORMALIZATION_PRESETS

    # Every level in every channel: each pixel gets ((level / 255) as float32 - mean) / std in float32, exactly.
    image = np.stack([np.arange(256).reshape(16, 16), np.arange(256)[::-1].reshape(16, 16),
                      np.arange(256).reshape(16, 16).T], axis=-1).astype(np.uint8)
    for preset in ("imagenet", "clip"):
        segmenter = ZeroShotSegmenter(FakeBackend(), tokenizer, preset=preset, short_side=None)
        mean, std = (np.array(v, dtype=np.float32) for v in NORMALIZATION_PRESETS[preset])
        rgb, pixels = segmenter.prepare(image)
        levels = (image.astype(np.float64) * (1 / 255)).astype(np.float32)
        expected = ((levels - mean) / std).transpose(2, 0, 1)
        np.testing.assert_array_equal(pixels, expected)
        assert pixels.dtype == np.float32 and pixels.flags.c_contiguous
        np.testing.assert_array_equal(rgb, image)
        np.testing.assert_allclose(pixels, ((image / 255 - mean) / std).transpose(2, 0, 1), atol=1e-6)


def test_prepare_with_an_image_processors_normalisation(tokenizer):
    class Processor:  # a scalar mean and std apply to every channel
        image_mean, image_std, rescale_factor = 0.5, 0.25, 1 / 127.5

    segmenter = ZeroShotSegmenter(FakeBackend(), tokenizer, image_processor=Processor(), short_side=None)
    image = _image(6, 10, seed=3)
    _, pixels = segmenter.prepare(image)
    levels = (image.astype(np.float64) * (1 / 127.5)).astype(np.float32)
    np.testing.assert_array_equal(pixels, ((levels - np.float32(0.5)) / np.float32(0.25)).transpose(2, 0, 1))


@pytest.mark.parametrize("out", [(7, 5), (12, 20), (4, 6)])
def test_resize_nearest_takes_floor_of_the_scaled_index(out):
    labels = np.arange(24, dtype=np.int32).reshape(4, 6)
    result = seg.resize_nearest(labels, *out)
    expected = [[labels[min(y * 4 // out[0], 3), min(x * 6 // out[1], 5)] for x in range(out[1])]
                for y in range(out[0])]
    np.testing.assert_array_equal(result, expected)
    assert result.dtype == np.int32
    result[...] = -1  # a fresh array, also at the same size
    assert labels.min() == 0


def test_uint8_resize_is_bilinear_without_antialiasing():
    rng = np.random.RandomState(0)
    image = rng.randint(0, 256, size=(9, 13, 3)).astype(np.uint8)
    out = seg.resize_image_uint8(image, 5, 20)
    expected = np.moveaxis(_brute_resize(np.moveaxis(image.astype(np.float64), -1, 0), 5, 20), 0, -1)
    assert np.abs(out - expected).max() <= 0.5 + 1e-3  # rounded to the nearest level (float32 arithmetic)


def test_segmenter_errors(tokenizer):
    backend = FakeBackend()
    with pytest.raises(ValueError, match="window"):
        ZeroShotSegmenter(backend, tokenizer, window="tiles")
    with pytest.raises(ValueError, match="background_threshold"):
        ZeroShotSegmenter(backend, tokenizer, background_threshold=1.5)
    with pytest.raises(ValueError, match="stride"):
        ZeroShotSegmenter(backend, tokenizer, window_size=16, stride=32)
    with pytest.raises(ValueError, match="preset"):
        ZeroShotSegmenter(backend, tokenizer, preset="nope")
    with pytest.raises(TypeError, match="backend object has no"):
        ZeroShotSegmenter(object(), tokenizer)
    segmenter = ZeroShotSegmenter(backend, tokenizer)
    with pytest.raises(ValueError, match="set_classes"):
        segmenter.segment([_image(8, 8)])
    segmenter.set_classes(["a"])
    with pytest.raises(ValueError, match="empty list"):
        segmenter.segment([])
    with pytest.raises(TypeError, match="list of images"):
        segmenter.segment(_image(8, 8))
    with pytest.raises(OSError, match="no such file"):
        segmenter.segment(["/nonexistent/picture.jpg"])


def _brute_refine(image, labels, num_labels, iterations, dilations, sigma):
    """refine_label_map from its docstring, pixel by pixel in float64 -> (probabilities (L, H, W), labels)."""
    height, width = labels.shape
    colours = image.astype(np.float64) / 255.0
    offsets = [(dy * d, dx * d) for d in dilations for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]

    def at(y, x):
        return min(max(y, 0), height - 1), min(max(x, 0), width - 1)

    weights = np.zeros((height, width, len(offsets)))
    for y in range(height):
        for x in range(width):
            around = np.array([colours[at(y + dy, x + dx)] for dy, dx in offsets])  # (K, 3)
            distance = np.abs(around - colours[y, x]).mean(axis=1)
            spread = around.std(axis=0).mean()
            logits = -distance / (sigma + spread + 1e-8)
            weights[y, x] = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    probabilities = np.eye(num_labels)[labels]  # (H, W, L)
    for _ in range(iterations):
        new = np.zeros_like(probabilities)
        for y in range(height):
            for x in range(width):
                for k, (dy, dx) in enumerate(offsets):
                    new[y, x] += weights[y, x, k] * probabilities[at(y + dy, x + dx)]
        probabilities = new
    return probabilities, probabilities.argmax(axis=-1)


def test_refine_label_map_matches_its_definition():
    rng = np.random.RandomState(3)
    image = rng.randint(0, 256, size=(9, 11, 3)).astype(np.uint8)
    image[:, 6:] = np.clip(image[:, 6:] // 4 + 180, 0, 255)  # two regions of different colour
    labels = 2 * rng.randint(0, 3, size=(9, 11))  # labels 0, 2, 4 of 6: absent labels must not matter
    for iterations, dilations, sigma in ((2, (1, 2), 0.05), (3, (1, 3), 0.0), (1, (2,), 0.5)):
        probabilities, expected = _brute_refine(image, labels, 6, iterations, dilations, sigma)
        got = refine_label_map(image, labels, 6, iterations=iterations, dilations=dilations, sigma=sigma)
        assert got.dtype == np.int32 and got.shape == labels.shape
        top2 = np.sort(probabilities, axis=-1)[..., -2:]
        clear = top2[..., 1] - top2[..., 0] > 1e-4  # leave out near-ties (float32 against float64)
        assert clear.mean() > 0.9
        np.testing.assert_array_equal(got[clear], expected[clear])


def test_refine_label_map_moves_a_blocky_boundary_to_the_colour_edge():
    rng = np.random.RandomState(0)
    image = np.zeros((24, 32, 3), dtype=np.uint8)
    image[:, :13] = (40, 140, 40)  # grass-like on the left, a red object from column 13 on
    image[:, 13:] = (200, 30, 30)
    image = np.clip(image.astype(int) + rng.randint(-10, 11, size=image.shape), 0, 255).astype(np.uint8)
    blocky = np.zeros((24, 32), dtype=np.int64)
    blocky[:, 16:] = 1  # the labels of a 4 px patch grid: the boundary 3 px too far right
    truth = np.zeros((24, 32), dtype=np.int32)
    truth[:, 13:] = 1
    refined = refine_label_map(image, blocky, 2)
    np.testing.assert_array_equal(refined, truth)
    np.testing.assert_array_equal(refine_label_map(image, blocky, 2, iterations=0), blocky)


def test_refine_label_map_rejects_bad_input():
    image = np.zeros((4, 5, 3), dtype=np.uint8)
    labels = np.zeros((4, 5), dtype=np.int64)
    with pytest.raises(ValueError, match="image must be"):
        refine_label_map(image[..., 0], labels, 2)
    with pytest.raises(ValueError, match="does not match"):
        refine_label_map(image, labels[:3], 2)
    with pytest.raises(TypeError, match="integers"):
        refine_label_map(image, labels.astype(np.float32), 2)
    with pytest.raises(ValueError, match=r"in \[0, 2\)"):
        refine_label_map(image, labels + 2, 2)
    with pytest.raises(ValueError, match="iterations"):
        refine_label_map(image, labels, 2, iterations=-1)
    with pytest.raises(ValueError, match="dilations is empty"):
        refine_label_map(image, labels, 2, dilations=())
    with pytest.raises(ValueError, match="dilation must be a positive integer"):
        refine_label_map(image, labels, 2, dilations=(1, 0))
    with pytest.raises(ValueError, match="sigma"):
        refine_label_map(image, labels, 2, sigma=-0.1)


def test_segmenter_refine_moves_labels_only(tokenizer):
    images = [_image(20, 20), _image(24, 28, seed=1)]
    results = {}
    for refine in (False, True):
        segmenter = ZeroShotSegmenter(FakeBackend(), tokenizer, window="whole", short_side=None, refine=refine)
        segmenter.set_classes(["a", "b", "c"])
        results[refine] = segmenter.segment(images)
    for image, plain, refined in zip(images, results[False], results[True]):
        np.testing.assert_array_equal(refined.probabilities, plain.probabilities)
        np.testing.assert_array_equal(refined.group_map, plain.group_map)
        np.testing.assert_array_equal(refined.label_map, refine_label_map(image, plain.label_map, 3))
    with pytest.raises(TypeError, match="refine must be True or False"):
        ZeroShotSegmenter(FakeBackend(), tokenizer, refine="yes")


def test_result_class_shares():
    result = SegmentationResult(np.array([[0, 1], [1, 1]], np.int32), np.zeros((3, 2, 2), np.float32),
                                np.zeros((2, 2), np.int32), ("background", "cat", "dog"), True)
    assert result.class_shares() == {"background": 0.25, "cat": 0.75, "dog": 0.0}


def test_load_backend_rejects_unknown_framework():
    with pytest.raises(ValueError, match="framework"):
        seg.load_backend("somewhere", "jax")


# ----------------------------------------------------------------------------------------------------------------
# Pictures
# ----------------------------------------------------------------------------------------------------------------


def test_voc_palette_known_colours():
    palette = visualize.voc_palette()
    assert palette.shape == (256, 3)
    assert palette[0].tolist() == [0, 0, 0]
    assert palette[1].tolist() == [128, 0, 0]
    assert palette[15].tolist() == [192, 128, 128]  # person
    assert palette[255].tolist() == [224, 224, 192]


def test_label_png_round_trips_the_labels(tmp_path):
    labels = np.arange(12, dtype=np.int32).reshape(3, 4)
    path = visualize.save_label_png(tmp_path / "labels.png", labels)
    with Image.open(path) as image:
        assert image.mode == "P"
        np.testing.assert_array_equal(np.asarray(image), labels)
    assert [p for p in os.listdir(tmp_path)] == ["labels.png"]  # no temp file left behind
    with pytest.raises(ValueError, match="255"):
        visualize.save_label_png(tmp_path / "big.png", np.full((2, 2), 300))


def test_overlay_and_groups_pictures(tmp_path):
    image = _image(30, 40)
    labels = np.zeros((30, 40), np.int32)
    labels[10:, 20:] = 2
    overlay = visualize.overlay_image(image, labels, ["background", "cat", "dog"], background_label=0)
    assert overlay.height >= 30 and overlay.width > 40  # legend on the right
    body = np.asarray(overlay)[:, :40]
    np.testing.assert_array_equal(body[:10], image[:10])  # background left as is
    assert not np.array_equal(body[10:, 20:], image[10:, 20:])
    visualize.save_overlay_png(tmp_path / "overlay.png", image, labels, ["background", "cat", "dog"])
    groups = np.zeros((30, 40), np.int32)
    groups[:, 25:] = 7
    picture = np.asarray(visualize.groups_image(image, groups))
    assert picture.shape == (30, 40, 3) and (picture[:, 24] == 0).all()  # border drawn
    visualize.save_groups_png(tmp_path / "groups.png", image, groups)
    assert sorted(os.listdir(tmp_path)) == ["groups.png", "overlay.png"]
    with pytest.raises(ValueError, match="no name"):
        visualize.overlay_image(image, labels, ["background", "cat"])
    with pytest.raises(ValueError, match="map is"):
        visualize.groups_image(image, groups[:10])


# ----------------------------------------------------------------------------------------------------------------
# Command-line errors (all raised before any framework is imported)
# ----------------------------------------------------------------------------------------------------------------


def _run_cli(argv, capsys):
    from groupvit_core.cli import main

    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture()
def picture(tmp_path):
    path = tmp_path / "picture.png"
    Image.fromarray(_image(20, 30)).save(path)
    return str(path)


@pytest.mark.parametrize("labels,message", [
    ("", "class name 0 is empty"),
    (" , ", "empty"),
    ("cat,dog, Cat", "duplicate class name 'Cat'"),
])
def test_segment_cli_rejects_bad_labels(picture, capsys, labels, message):
    code, _, err = _run_cli(["segment", picture, "--labels", labels, "--model", "x"], capsys)
    assert code == 2 and "--labels" in err and message in err


def test_segment_cli_rejects_unreadable_images(tmp_path, picture, capsys):
    code, _, err = _run_cli(["segment", str(tmp_path / "missing.jpg"), "--labels", "cat"], capsys)
    assert code == 2 and "missing.jpg: no such file" in err
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image at all")
    code, _, err = _run_cli(["segment", picture, str(broken), "--labels", "cat"], capsys)
    assert code == 2 and "cannot read image" in err and "broken.jpg" in err
    twin = tmp_path / "other"
    twin.mkdir()
    Image.fromarray(_image(8, 8)).save(twin / "picture.png")
    code, _, err = _run_cli(["segment", picture, str(twin / "picture.png"), "--labels", "cat"], capsys)
    assert code == 2 and "same output files" in err


def test_segment_cli_without_a_model_says_which_checkpoints_to_pass(picture, capsys, tmp_path, monkeypatch):
    from groupvit_core import builtin

    # An installation whose built-in model is missing says which checkpoints to pass.
    monkeypatch.setattr(builtin, "BUILTIN_DIR", str(tmp_path / "no_builtin"))
    code, _, err = _run_cli(["segment", picture, "--labels", "cat,dog"], capsys)
    assert code == 2 and "nvidia/groupvit-gcc-yfcc" in err and "groupvit convert" in err
    code, _, err = _run_cli(["segment", picture, "--labels", "cat", "--model", str(tmp_path / "none")], capsys)
    assert code == 2 and "not a checkpoint directory" in err
    code, _, err = _run_cli(["segment", picture, "--labels", "cat", "--model", str(tmp_path)], capsys)
    assert code == 2 and "no config.json" in err


def test_evaluate_cli_names_the_missing_dataset_path(tmp_path, capsys):
    code, _, err = _run_cli(["evaluate", "--data", str(tmp_path), "--format", "context", "--model", "x"], capsys)
    assert code == 2 and "SegmentationClassContext" in err
    code, _, err = _run_cli(["evaluate", "--data", str(tmp_path), "--format", "voc", "--model", "x",
                             "--limit", "0"], capsys)
    assert code == 2 and "--limit" in err


def test_cli_help_lists_the_options(capsys):
    from groupvit_core.cli import main

    for command, options in (("segment", ["--labels", "--background-threshold", "--templates", "--window",
                                          "--refine", "--no-refine"]),
                             ("evaluate", ["--data", "--format", "--limit", "--output-json"])):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        out = capsys.readouterr().out
        assert all(option in out for option in options + ["--model", "--framework", "--batch-size"])
