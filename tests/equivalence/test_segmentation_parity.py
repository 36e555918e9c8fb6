"""Zero-shot segmentation gives the same label maps in PyTorch and TensorFlow (groupvit_*.segmentation).

One small random checkpoint (TEST_CONFIGS["small"], the real vocabulary) loaded by both backends; drawn test
pictures of several sizes go through the paper's protocol at half its sizes to stay fast (short side 224 instead
of 448, 224x224 windows at stride 112, long side capped at 640; the same code paths) and the whole-image mode.
Label maps must agree on >= 99.9% of pixels, and every disagreement must be a near-tie: a pixel whose two best
scores are within NEAR_TIE in one of the frameworks (hard assignments are argmaxes, see REFERENCE.md "Parity
hazard"). Scores and group maps may differ on at most 0.1% of pixels (a near-tie between two groups).
"""

import os

import numpy as np
import pytest
from PIL import Image, ImageDraw

pytest.importorskip("torch")
pytest.importorskip("tensorflow")

from groupvit_core import checkpoint  # noqa: E402
from groupvit_core.segmentation import ZeroShotSegmenter  # noqa: E402
from groupvit_core.testing import random_inputs, random_weights, test_config  # noqa: E402
from groupvit_core.tokenizer import GroupViTTokenizer  # noqa: E402
from groupvit_pt.segmentation import SegmentationBackend as PTBackend  # noqa: E402
from groupvit_tf.segmentation import SegmentationBackend as TFBackend  # noqa: E402

MIN_AGREEMENT = 0.999
NEAR_TIE = 1e-3
CLASSES = ["sky", "red disc", "green square", "grass", "road"]
PROTOCOL = dict(short_side=224, max_long_side=640, window_size=224, stride=112)


@pytest.fixture(scope="module")
def backends(tmp_path_factory):
    directory = tmp_path_factory.mktemp("ckpt_small")
    config = test_config("small")
    config.save_pretrained(directory)
    checkpoint.write_safetensors(os.path.join(directory, "model.safetensors"), random_weights(config, seed=3))
    return PTBackend.from_pretrained(str(directory), device="cpu"), TFBackend.from_pretrained(str(directory))


def picture(height, width, seed):
    rng = np.random.RandomState(seed)
    image = Image.new("RGB", (width, height), (90, 160, 230))
    draw = ImageDraw.Draw(image)
    draw.rectangle([0, height * 2 // 3, width, height], fill=(60, 150, 50))
    x, y = rng.randint(0, width // 2), rng.randint(0, height // 2)
    draw.ellipse([x, y, x + width // 3, y + height // 3], fill=(220, 40, 40))
    draw.rectangle([width // 2, height // 3, width * 5 // 6, height * 3 // 4], fill=(40, 200, 60))
    noisy = np.asarray(image).astype(int) + rng.randint(-12, 13, size=(height, width, 3))
    return np.clip(noisy, 0, 255).astype(np.uint8)


PICTURES = [picture(60, 80, 0), picture(97, 131, 1), picture(50, 300, 2), picture(120, 64, 3)]


def _check_agreement(pt_results, tf_results):
    for pt, tf in zip(pt_results, tf_results):
        assert pt.class_names == tf.class_names
        assert pt.label_map.shape == tf.label_map.shape
        same = pt.label_map == tf.label_map
        assert same.mean() >= MIN_AGREEMENT, f"labels agree on {same.mean():.5f} of pixels"
        for result in (pt, tf):
            top2 = np.sort(result.probabilities, axis=0)[-2:]
            result.margin = top2[1] - top2[0]
        ties = (pt.margin < NEAR_TIE) | (tf.margin < NEAR_TIE)
        assert np.all(same | ties), "labels differ at pixels that are not near-ties"
        # Scores may also jump where a pixel's group is a near-tie (same label, another group): rare.
        moved = np.abs(pt.probabilities - tf.probabilities).max(axis=0) > 1e-3
        assert moved.mean() <= 1 - MIN_AGREEMENT, f"scores differ on {moved.mean():.5f} of pixels"
        assert (pt.group_map == tf.group_map).mean() >= MIN_AGREEMENT


def test_text_and_image_encodings_agree(backends):
    pt, tf = backends
    assert pt.logit_scale == pytest.approx(tf.logit_scale, rel=1e-6)
    inputs = random_inputs(pt.config, batch_images=2, batch_texts=4, seed=5, image_size=(64, 48))
    np.testing.assert_allclose(pt.encode_text(inputs["input_ids"], inputs["attention_mask"]),
                               tf.encode_text(inputs["input_ids"], inputs["attention_mask"]), atol=1e-5)
    a, b = pt.encode_image(inputs["pixel_values"]), tf.encode_image(inputs["pixel_values"])
    assert a["grid"] == b["grid"] == (8, 6)
    for key in ("group_embeds", "image_embeds"):
        np.testing.assert_allclose(a[key], b[key], atol=1e-5)
    for soft_pt, soft_tf in zip(a["assignments"], b["assignments"]):
        np.testing.assert_allclose(soft_pt, soft_tf, atol=1e-5)


def test_sliding_window_label_maps_agree(backends):
    results = []
    for backend in backends:
        segmenter = ZeroShotSegmenter(backend, GroupViTTokenizer(), background_threshold=0.1, batch_size=4,
                                      **PROTOCOL)
        segmenter.set_classes(CLASSES)
        results.append(segmenter.segment(PICTURES))
    _check_agreement(*results)
    # Not a degenerate comparison: the random model gives background and classes at this threshold.
    assert len(np.unique(np.concatenate([r.label_map.ravel() for r in results[0]]))) >= 3


def test_whole_image_label_maps_agree_without_background(backends):
    results = []
    for backend in backends:
        segmenter = ZeroShotSegmenter(backend, GroupViTTokenizer(), window="whole", preset="clip", **PROTOCOL)
        segmenter.set_classes(CLASSES, templates=["a photo of a {}.", "a {} in a video game."])
        # Same aspect ratio, different sizes: one model input size, so both go through in one batch.
        results.append(segmenter.segment([PICTURES[0], picture(90, 120, 4)]))
    _check_agreement(*results)
