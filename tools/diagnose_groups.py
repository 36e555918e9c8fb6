"""Where a trained model's shape pixels go: grouping or naming? (RESULTS_TRAINING.md, "Diagnosis").

    python tools/diagnose_groups.py [MODEL_DIR] [--count 60]

For held-out synthetic test scenes (PyTorch, hard grouping at the patch level, every group named by its best
class over the 13 prompts "a photo of a {name}."), each object (shape) is followed to the final group that holds
most of its patches ("its group"), and the script reports: how much of the shape that group holds, how much of
that group is ground, how often some group / its group is named as the shape, what its group is named instead
(a ground, the same colour with another shape, the same shape in another colour, other), and how often the shape
is among the image-level top-5 classes (the segmentation protocol's candidate filter), and how similar the text
embeddings of same-colour, different-shape prompts are. MODEL_DIR defaults to the built-in model.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from groupvit_core import builtin, synthetic  # noqa: E402
from groupvit_core.image import NORMALIZATION_PRESETS  # noqa: E402
from groupvit_core.tokenizer import GroupViTTokenizer  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default=builtin.builtin_model_path())
    parser.add_argument("--count", type=int, default=60)
    args = parser.parse_args(argv)
    import torch

    from groupvit_pt import GroupViTModel
    from groupvit_pt.segmentation import SegmentationBackend

    torch.set_num_threads(1)
    backend = SegmentationBackend(GroupViTModel.from_pretrained(args.model).eval())
    tokenizer = GroupViTTokenizer.from_pretrained(builtin.builtin_model_path())
    names = list(synthetic.ENTITY_NAMES)
    encoded = tokenizer([f"a photo of a {name}." for name in names], padding=True)
    texts = backend.encode_text(encoded["input_ids"], encoded["attention_mask"])  # (classes, dim), unit norm
    scenes = list(synthetic.iter_scenes("test", args.count))
    mean, std = (np.asarray(v, np.float32) for v in NORMALIZATION_PRESETS["imagenet"])
    pixels = np.stack([((s.image.astype(np.float32) / 255 - mean) / std).transpose(2, 0, 1) for s in scenes])
    out = backend.encode_image(pixels.astype(np.float32))
    soft = out["assignments"][0]
    for stage in out["assignments"][1:]:
        soft = stage @ soft  # (images, final groups, patches)
    rows, cols = out["grid"]
    patch = scenes[0].image.shape[0] // rows
    hard = soft.argmax(1)  # (images, patches): the final group of each patch
    group_class = (out["group_embeds"] @ texts.T).argmax(-1)  # (images, groups)
    top5 = np.argsort(-(out["image_embeds"] @ texts.T), axis=1)[:, :5]
    grounds = len(synthetic.BACKGROUNDS)
    held, ground_share, named_any, named_own, in_top5 = [], [], [], [], []
    instead = Counter()
    for b, scene in enumerate(scenes):
        labels = scene.mask[patch // 2::patch, patch // 2::patch][:rows, :cols].reshape(-1)  # 1-based, centres
        for label in np.unique(labels):
            cls = label - 1
            if cls < grounds:
                continue
            inside = labels == label
            groups, counts = np.unique(hard[b][inside], return_counts=True)
            own = groups[counts.argmax()]
            held.append(counts.max() / inside.sum())
            ground_share.append(np.mean(labels[hard[b] == own] - 1 < grounds))
            named_any.append(bool(np.any(group_class[b] == cls)))
            named_own.append(group_class[b, own] == cls)
            in_top5.append(cls in top5[b])
            predicted, true = names[group_class[b, own]], names[cls]
            if predicted == true:
                instead["correct"] += 1
            elif group_class[b, own] < grounds:
                instead["a ground"] += 1
            elif predicted.split()[0] == true.split()[0]:
                instead["same colour, other shape"] += 1
            elif predicted.split()[1] == true.split()[1]:
                instead["same shape, other colour"] += 1
            else:
                instead["other"] += 1
    total = len(held)
    print(f"model {args.model}; {args.count} test scenes, {total} shapes, {rows}x{cols} patches")
    print(f"share of a shape's patches in its group (mean): {np.mean(held):.2f}")
    print(f"share of its group's patches that are ground (mean): {np.mean(ground_share):.2f}")
    print(f"some group is named as the shape: {np.mean(named_any):.2f}; its own group is: {np.mean(named_own):.2f}")
    print("its group is named: " + ", ".join(f"{k} {v / total:.2f}" for k, v in instead.most_common()))
    print(f"the shape is among the image-level top-5 classes: {np.mean(in_top5):.2f}")
    # Can the text side tell the shapes apart at all? Cosine between prompts of one colour, different shapes
    # (near 1: the text tower has collapsed them, and no image feature can pick one over the other).
    objects = [i for i, name in enumerate(names) if " " in name]
    pairs = [(i, j) for i in objects for j in objects
             if i < j and names[i].split()[0] == names[j].split()[0]]
    same_colour = np.mean([texts[i] @ texts[j] for i, j in pairs])
    print(f"text: cosine of same-colour, different-shape prompts (mean of {len(pairs)} pairs): {same_colour:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
