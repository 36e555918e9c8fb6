"""The synthetic world and the framework-free loss helpers: seeded, splits apart, masks and captions agree,
VOC export readable by groupvit_core.datasets."""

import os

import numpy as np
import pytest

from groupvit_core import datasets, losses, synthetic


def test_scenes_are_seeded_and_splits_differ():
    a = synthetic.generate("train", 3)
    b = synthetic.generate("train", 3)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.mask, b.mask)
    assert a.caption == b.caption
    test = synthetic.generate("test", 3)
    assert not np.array_equal(a.image, test.image)
    val = synthetic.generate("val", 3)
    assert not np.array_equal(val.image, test.image) and not np.array_equal(val.image, a.image)
    seeds = list(synthetic.SPLIT_SEEDS.values())
    assert len(set(seeds)) == len(seeds)  # no two splits share a root seed, so no scene seed either


@pytest.mark.parametrize("index", range(12))
def test_mask_labels_match_caption(index):
    scene = synthetic.generate("test", index)
    assert scene.image.shape == (64, 64, 3) and scene.image.dtype == np.uint8
    assert scene.mask.shape == (64, 64)
    present = set(np.unique(scene.mask).tolist())
    assert 0 not in present  # every pixel has a name
    assert present == set(scene.labels)
    assert synthetic.CLASS_NAMES[scene.labels[0]] in synthetic.BACKGROUNDS
    parsed = losses.parse_entities(scene.caption, synthetic.ENTITY_NAMES)
    assert sorted(parsed) == sorted(scene.entity_names)


def test_parse_entities_longest_match_and_order():
    vocab = ["circle", "red circle", "grass"]
    assert losses.parse_entities("A red circle on grass.", vocab) == ["red circle", "grass"]
    assert losses.parse_entities("a circle", vocab) == ["circle"]
    assert losses.parse_entities("nothing here", vocab) == []
    with pytest.raises(TypeError):
        losses.parse_entities(3, vocab)


def test_soft_targets():
    multi_hot = losses.entity_targets([["a", "b"], ["b"]], ["a", "b", "c"])
    np.testing.assert_array_equal(multi_hot, [[1, 1, 0], [0, 1, 0]])
    image_t, text_t, valid = losses.soft_targets(multi_hot)
    np.testing.assert_allclose(image_t, [[0.5, 0.5, 0], [0, 1, 0]])
    np.testing.assert_allclose(text_t, [[1, 0], [0.5, 0.5], [0, 0]])
    np.testing.assert_array_equal(valid, [True, True, False])
    with pytest.raises(ValueError, match="at least one entity"):
        losses.soft_targets(np.zeros((1, 2)))
    with pytest.raises(ValueError, match="not one of"):
        losses.entity_targets([["z"]], ["a"])


def test_prompt_batch_seeded():
    names = list(synthetic.ENTITY_NAMES)
    assert losses.prompt_batch(names)[0] == "a photo of a grass."
    a = losses.prompt_batch(names, np.random.default_rng(1))
    b = losses.prompt_batch(names, np.random.default_rng(1))
    assert a == b and len(a) == len(names)


def test_voc_export_reads_back(tmp_path):
    names = synthetic.write_voc_split(str(tmp_path), "test", count=3)
    dataset = datasets.open_dataset(str(tmp_path), "voc")
    assert len(dataset) == 3 and tuple(dataset.class_names) == synthetic.CLASS_NAMES
    sample = dataset[1]
    np.testing.assert_array_equal(sample.mask, synthetic.generate("test", 1).mask)
    assert sample.name == names[1]
    assert os.path.isfile(tmp_path / "captions.txt")


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown split"):
        synthetic.generate("validation", 0)
    with pytest.raises(ValueError, match="non-negative"):
        synthetic.generate("train", -1)
    with pytest.raises(ValueError, match="at least 16"):
        synthetic.generate("train", 0, size=8)


def test_demo_cli(tmp_path, capsys):
    out = tmp_path / "demo.png"
    assert synthetic.main(["--demo", str(out)]) == 0
    from PIL import Image

    with Image.open(out) as image:
        assert image.size == (128, 128)
    assert "grass" in capsys.readouterr().out
