"""Do a trained model's features tell the shapes apart? Linear probes on them (RESULTS_TRAINING.md).

    python tools/probe_group_features.py [MODEL_DIR] [--train 3000] [--val 500]

For every shape (object) of synthetic scenes, with the model's own hard grouping (PyTorch, as
tools/diagnose_groups.py: "its group" is the final group holding most of the shape's patches), three feature
vectors are taken: the projected embedding of its group (what segmentation names), the mean of the shape's patch
tokens just before the first grouping block, and the mean of its patch embeddings (the input of the first stage).
A 9-way linear classifier (softmax regression on standardised features) is fitted on the shapes of ``--train``
training scenes and scored on those of ``--val`` validation scenes; the zero-shot name of the group (its best of
the 13 prompts "a photo of a {name}.") is scored on the same shapes. Colour is easy; the printed "shape" accuracy
(circle / square / triangle, chance 1/3) says whether the features hold the shape at all. A maintainer's
diagnostic (labels are used here, never in training). MODEL_DIR defaults to the built-in model.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Dict, Tuple

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from groupvit_core import builtin, synthetic  # noqa: E402
from groupvit_core.image import NORMALIZATION_PRESETS  # noqa: E402
from groupvit_core.tokenizer import GroupViTTokenizer  # noqa: E402

FEATURES = ("group embedding", "patch tokens before grouping", "patch embeddings")


def collect(model, backend, texts: np.ndarray, split: str, count: int, chunk: int = 250
            ) -> Tuple[Dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """-> ({feature: (shapes, D)}, labels (shapes,) in 0..8, zero-shot labels (shapes,), -1..8 with grounds < 0)."""
    captured = {}
    stage = model.vision_model.encoder.stages[0]
    hooks = [stage.register_forward_pre_hook(lambda module, args: captured.__setitem__("embeddings", args[0])),
             stage.downsample.register_forward_pre_hook(lambda module, args: captured.__setitem__("tokens", args[0]))]
    mean, std = (np.asarray(v, np.float32) for v in NORMALIZATION_PRESETS["imagenet"])
    grounds = len(synthetic.BACKGROUNDS)
    features = {name: [] for name in FEATURES}
    labels, zero_shot = [], []
    try:
        for start in range(0, count, chunk):
            scenes = [synthetic.generate(split, i) for i in range(start, min(count, start + chunk))]
            pixels = np.stack([((s.image.astype(np.float32) / 255 - mean) / std).transpose(2, 0, 1) for s in scenes])
            out = backend.encode_image(pixels)
            soft = out["assignments"][0]
            for later in out["assignments"][1:]:
                soft = later @ soft
            hard = soft.argmax(1)  # (images, patches)
            rows, cols = out["grid"]
            patch = scenes[0].image.shape[0] // rows
            tokens = captured["tokens"].detach().float().numpy()
            embeddings = captured["embeddings"].detach().float().numpy()[:, : rows * cols]
            for b, scene in enumerate(scenes):
                centres = scene.mask[patch // 2::patch, patch // 2::patch][:rows, :cols].reshape(-1)
                for label in np.unique(centres):
                    if label - 1 < grounds:
                        continue
                    inside = centres == label
                    groups, counts = np.unique(hard[b][inside], return_counts=True)
                    own = groups[counts.argmax()]
                    features["group embedding"].append(out["group_embeds"][b, own])
                    features["patch tokens before grouping"].append(tokens[b][inside].mean(0))
                    features["patch embeddings"].append(embeddings[b][inside].mean(0))
                    labels.append(label - 1 - grounds)
                    zero_shot.append(int((out["group_embeds"][b, own] @ texts.T).argmax()) - grounds)
    finally:
        for hook in hooks:
            hook.remove()
    return {k: np.asarray(v) for k, v in features.items()}, np.asarray(labels), np.asarray(zero_shot)


def fit_softmax(x: np.ndarray, y: np.ndarray, classes: int = 9, steps: int = 3000, lr: float = 0.5,
                weight_decay: float = 1e-4) -> Callable[[np.ndarray], np.ndarray]:
    """Multinomial logistic regression by full-batch gradient descent on standardised features -> predict."""
    mu, sd = x.mean(0), x.std(0) + 1e-6
    xn = (x - mu) / sd
    w, b = np.zeros((x.shape[1], classes)), np.zeros(classes)
    for _ in range(steps):
        logits = xn @ w + b
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        p[np.arange(len(y)), y] -= 1
        p /= len(y)
        w -= lr * (xn.T @ p + weight_decay * w)
        b -= lr * p.sum(0)
    return lambda z: (((z - mu) / sd) @ w + b).argmax(1)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default=builtin.builtin_model_path())
    parser.add_argument("--train", type=int, default=3000, help="training scenes whose shapes fit the probes")
    parser.add_argument("--val", type=int, default=500, help="validation scenes whose shapes score them")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    import torch

    from groupvit_pt import GroupViTModel
    from groupvit_pt.segmentation import SegmentationBackend

    torch.set_num_threads(args.threads)
    model = GroupViTModel.from_pretrained(args.model).eval()
    backend = SegmentationBackend(model)
    tokenizer = GroupViTTokenizer.from_pretrained(builtin.builtin_model_path())
    encoded = tokenizer([f"a photo of a {name}." for name in synthetic.ENTITY_NAMES], padding=True)
    texts = backend.encode_text(encoded["input_ids"], encoded["attention_mask"])
    train, y_train, _ = collect(model, backend, texts, "train", args.train)
    val, y_val, zero_shot = collect(model, backend, texts, "val", args.val)

    def report(name: str, predicted: np.ndarray) -> None:
        shape = predicted >= 0  # a group named as a ground is wrong on every count
        print(f"{name:<44} 9-way {np.mean(predicted == y_val):.3f}  "
              f"colour {np.mean(shape & (predicted // 3 == y_val // 3)):.3f}  "
              f"shape {np.mean(shape & (predicted % 3 == y_val % 3)):.3f}")

    print(f"model {args.model}; shapes: {len(y_train)} to fit (train 0..{args.train - 1}), {len(y_val)} to score "
          f"(val 0..{args.val - 1}); shape chance 0.333")
    report("zero-shot name of its group", zero_shot)
    for name in FEATURES:
        report(f"linear probe: {name}", fit_softmax(train[name], y_train)(val[name]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
