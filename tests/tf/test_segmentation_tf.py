"""TensorFlow segmentation backend (groupvit_tf.segmentation) and the segment/evaluate commands run on it.

Twin of tests/pt/test_segmentation_pt.py. A small random checkpoint (TEST_CONFIGS["small"], the real vocabulary)
stands in for a released model: the numbers are meaningless, the plumbing is what is checked.
"""

import json
import os

import numpy as np
import pytest
from PIL import Image, ImageDraw

tf = pytest.importorskip("tensorflow")

from groupvit_core import checkpoint  # noqa: E402
from groupvit_core.cli import main  # noqa: E402
from groupvit_core.datasets import write_voc_layout  # noqa: E402
from groupvit_core.resize import resize_grid  # noqa: E402
from groupvit_core.testing import random_inputs, random_weights, test_config  # noqa: E402
from groupvit_tf import TFGroupViTModel  # noqa: E402
from groupvit_tf.segmentation import SegmentationBackend  # noqa: E402

FRAMEWORK = "tf"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("ckpt_small")
    config = test_config("small")
    config.save_pretrained(directory)
    checkpoint.write_safetensors(os.path.join(directory, "model.safetensors"), random_weights(config, seed=0))
    return str(directory)


@pytest.fixture(scope="module")
def backend(model_dir):
    return SegmentationBackend.from_pretrained(model_dir, device="/CPU:0")


def scene(index):
    """A drawn picture (sky, a red disc, a green square) and its mask (0 sky, 1 disc, 2 square, 255 border)."""
    rng = np.random.RandomState(index)
    height, width = 60 + 10 * index, 80 - 5 * index
    image = Image.new("RGB", (width, height), (90, 160, 230))
    mask = Image.new("L", (width, height), 0)
    x, y = rng.randint(5, width // 2), rng.randint(5, height // 2)
    for draw, fill in ((ImageDraw.Draw(image), (220, 40, 40)), (ImageDraw.Draw(mask), 1)):
        draw.ellipse([x, y, x + 25, y + 25], fill=fill)
    for draw, fill in ((ImageDraw.Draw(image), (40, 200, 60)), (ImageDraw.Draw(mask), 2)):
        draw.rectangle([width - 30, height - 30, width - 8, height - 8], fill=fill)
    mask = np.asarray(mask).copy()
    mask[0, :] = 255
    return f"scene_{index}", np.asarray(image), mask


def test_backend_matches_the_model(backend, model_dir):
    model = TFGroupViTModel.from_pretrained(model_dir)
    config = model.config
    inputs = random_inputs(config, batch_images=2, batch_texts=3, seed=1, image_size=(48, 40))
    out = model(inputs["input_ids"], inputs["pixel_values"], attention_mask=inputs["attention_mask"],
                output_segmentation=True, interpolate_pos_encoding=True, training=False)
    text = backend.encode_text(inputs["input_ids"], inputs["attention_mask"])
    np.testing.assert_allclose(text, out.text_embeds.numpy(), atol=1e-5)
    encoded = backend.encode_image(inputs["pixel_values"])
    np.testing.assert_allclose(encoded["image_embeds"], out.image_embeds.numpy(), atol=1e-5)
    assert encoded["grid"] == (6, 5)
    for mine, theirs in zip(encoded["assignments"], out.vision_model_output.attentions):
        np.testing.assert_allclose(mine, theirs.numpy(), atol=1e-5)
    groups = encoded["group_embeds"]
    assert groups.shape == (2, 4, config.projection_dim)
    np.testing.assert_allclose(np.linalg.norm(groups, axis=-1), 1.0, atol=1e-5)
    # The model's reference segmentation logits, rebuilt from the backend's outputs with numpy:
    # s^2 * (groups . texts) mixed by the soft grouping resized to the input.
    grouping = encoded["assignments"][0].transpose(0, 2, 1) @ encoded["assignments"][1].transpose(0, 2, 1)
    grouping = resize_grid(grouping.transpose(0, 2, 1).reshape(2, 4, 6, 5), 48, 40)  # (images, groups, H, W)
    scale = backend.logit_scale
    expected = scale ** 2 * np.einsum("igd,td,ighw->ithw", groups, text, grouping)
    np.testing.assert_allclose(expected, out.segmentation_logits.numpy(), rtol=1e-4, atol=1e-3)
    assert backend.logit_scale == pytest.approx(float(np.exp(model.logit_scale.numpy()[0])))


def test_backend_refuses_other_objects_and_bad_pixels(backend):
    with pytest.raises(TypeError, match="TFGroupViTModel"):
        SegmentationBackend(object())
    with pytest.raises(ValueError, match="batch, 3, height, width"):
        backend.encode_image(np.zeros((3, 32, 32), np.float32))


def _image_pass_functions(backend):
    from groupvit_tf.segmentation import _IMAGE_PASS

    return {key[3]: function for key, function in backend.model.__dict__.get("_graph_functions", {}).items()
            if key[0] == _IMAGE_PASS}


def test_image_pass_runs_eagerly_once_then_is_traced_once_per_spatial_size(model_dir):
    backend = SegmentationBackend.from_pretrained(model_dir, device="/CPU:0")
    pixels = np.random.RandomState(0).rand(3, 3, 40, 48).astype(np.float32)
    eager = backend.encode_image(pixels[:2])  # first call of this size: eager, nothing traced
    assert list(_image_pass_functions(backend).values()) == [None]
    traced = backend.encode_image(pixels[:2])  # second: traced
    smaller = backend.encode_image(pixels[2:])  # another batch size: the same graph
    other_size = backend.encode_image(pixels[:1, :, :32, :32])  # another spatial size: eager again
    functions = _image_pass_functions(backend)
    assert len(functions) == 2
    (graph,) = [function for function in functions.values() if function is not None]
    assert graph.experimental_get_tracing_count() == 1
    for name in ("group_embeds", "image_embeds"):
        np.testing.assert_allclose(traced[name], eager[name], atol=1e-5)
    for mine, theirs in zip(traced["assignments"], eager["assignments"]):
        np.testing.assert_allclose(mine, theirs, atol=1e-5)
    assert smaller["image_embeds"].shape[0] == 1 and other_size["grid"] == (4, 4)
    assert not np.allclose(smaller["image_embeds"][0], traced["image_embeds"][0])
    backend.model.run_eagerly = True  # Keras' switch: no graphs at all
    backend.encode_image(pixels[:1, :, :32, :32])
    assert _image_pass_functions(backend) == functions


def test_evaluate_command_on_a_synthetic_voc_dataset(model_dir, tmp_path, capsys):
    data = tmp_path / "voc"
    write_voc_layout(data, [scene(i) for i in range(3)], class_names=["background", "circle", "square"])
    report_path = tmp_path / "report.json"
    code = main(["evaluate", "--data", str(data), "--format", "voc", "--model", model_dir, "--framework",
                 FRAMEWORK, "--batch-size", "8", "--output-json", str(report_path), "-q"])
    out = capsys.readouterr().out
    assert code == 0
    assert "mIoU" in out and "circle" in out
    with open(report_path) as handle:
        report = json.load(handle)
    assert report["num_images"] == 3 and report["framework"] == FRAMEWORK
    assert report["class_names"] == ["background", "circle", "square"]
    assert report["background_threshold"] == 0.95
    values = [report["miou"], report["pixel_accuracy"], report["mean_accuracy"]]
    values += [v for v in report["per_class_iou"].values() if v is not None]
    assert all(0.0 <= v <= 1.0 for v in values)
    assert report["num_pixels"] == sum(int((m != 255).sum()) for _, _, m in (scene(i) for i in range(3)))


def test_segment_command_writes_pictures_and_shares(model_dir, tmp_path, capsys):
    paths = []
    for index in range(2):
        name, image, _ = scene(index)
        paths.append(str(tmp_path / f"{name}.png"))
        Image.fromarray(image).save(paths[-1])
    out_dir = tmp_path / "out"
    code = main(["segment", *paths, "--labels", "sky, red disc,green square", "--model", model_dir,
                 "--framework", FRAMEWORK, "--background-threshold", "0.9",
                 "--output", str(out_dir)])
    out = capsys.readouterr().out
    assert code == 0
    assert sorted(os.listdir(out_dir)) == sorted(f"scene_{i}_{kind}.png" for i in range(2)
                                                 for kind in ("labels", "overlay", "groups"))
    with Image.open(out_dir / "scene_1_labels.png") as labels:
        assert labels.mode == "P" and labels.size == (75, 70)
        assert np.asarray(labels).max() <= 3
    shares = [float(line.split()[-1].rstrip("%")) for line in out.splitlines() if line.strip().endswith("%")]
    assert len(shares) == 8 and sum(shares) == pytest.approx(200.0, abs=0.1)
    assert "red disc" in out and "background" in out
