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


def test_patch_neighbours_and_affinities_match_their_definition():
    index, valid = losses.patch_neighbours(3, 5, dilations=(1, 2))
    assert index.shape == valid.shape == (15, 8)
    for n in range(15):
        r, c = divmod(n, 5)
        for k, (dilation, (dy, dx)) in enumerate((d, o) for d in (1, 2) for o in losses.AFFINITY_OFFSETS):
            rr, cc = r + dy * dilation, c + dx * dilation
            inside = 0 <= rr < 3 and 0 <= cc < 5
            assert valid[n, k] == inside and index[n, k] == (rr * 5 + cc if inside else n)

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(2, 12, 20, 3), dtype=np.uint8)
    got = losses.patch_affinities(images, 4, dilations=(1, 2))
    colours = images.astype(np.float64).reshape(2, 3, 4, 5, 4, 3).mean(axis=(2, 4)).reshape(2, 15, 3) / 255
    for b in range(2):
        d2 = {(n, k): float(((colours[b, n] - colours[b, index[n, k]]) ** 2).sum())
              for n in range(15) for k in range(8) if valid[n, k]}
        mean = sum(d2.values()) / len(d2)
        for n in range(15):
            for k in range(8):
                expected = np.exp(-d2[n, k] / mean) if valid[n, k] else 0.0
                assert got[b, n, k] == pytest.approx(expected, rel=1e-4, abs=1e-6)

    with pytest.raises(ValueError, match="multiple of patch_size"):
        losses.patch_affinities(images, 8)
    with pytest.raises(ValueError, match="batch, height, width, 3"):
        losses.patch_affinities(images[0], 4)
    with pytest.raises(ValueError, match="dilations"):
        losses.patch_neighbours(3, 3, dilations=(0,))
    with pytest.raises(ValueError, match="grid"):
        losses.patch_neighbours(0, 3)


def test_affinities_are_high_inside_a_region_and_low_across_an_edge():
    scene = synthetic.generate("train", 3)
    weights = losses.patch_affinities(scene.image[None], 4)[0]
    index, valid = losses.patch_neighbours(16, 16)
    labels = scene.mask.reshape(16, 4, 16, 4).transpose(0, 2, 1, 3).reshape(256, 16)
    pure = np.array([len(set(p)) == 1 for p in labels])
    label = labels[:, 0]
    both = pure[:, None] & pure[index] & valid
    same, across = both & (label[:, None] == label[index]), both & (label[:, None] != label[index])
    assert same.any() and across.any()
    assert weights[same].mean() > 0.5 > 0.1 > weights[across].mean()


def test_batches_carry_affinities_only_when_asked():
    from groupvit_core.tokenizer import GroupViTTokenizer

    data = synthetic.TrainingData(GroupViTTokenizer(), pool_size=4, image_size=32, max_text_length=24)
    plain, with_affinity = data.numpy_batch(0, 3, seed=0), data.numpy_batch(0, 3, seed=0, affinity_patch=4)
    assert "patch_affinity" not in plain and with_affinity["patch_affinity"].shape == (3, 64, 8)
    index = np.random.default_rng([0, 0]).choice(4, size=3, replace=False)  # as numpy_batch draws them
    np.testing.assert_array_equal(with_affinity["patch_affinity"], losses.patch_affinities(data.images[index], 4))
    assert all(np.array_equal(plain[k], with_affinity[k]) for k in plain)


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
