"""Can the vision tower learn to tell the shapes apart at all? A supervised diagnostic (RESULTS_TRAINING.md).

    python tools/probe_shape_learning.py --steps 4000 --patch-size 8 --pool-size 40000

Trains only the vision tower of a built-in-style architecture (plus the visual projection and a linear head) with
image-level multi-label binary cross-entropy on the entities of each scene -- the same labels the captions name,
so this is an upper bound for what the text-supervised losses can teach the image side in as many steps -- and
every ``--every`` steps reports the held-out "shape accuracy": for each object of 300 test scenes, whether its
class scores above the two other shapes of its colour (chance 1/3). Colour and ground are easy; shape is the
hard part. Not used by training; a maintainer's tool for choosing architectures and data sizes.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from groupvit_core import synthetic  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--every", type=int, default=250, help="report every N steps")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--pool-size", type=int, default=4000, help="training scenes (the recipe's pool_size)")
    parser.add_argument("--vision-hidden", type=int, default=64)
    parser.add_argument("--depths", type=int, nargs="+", default=[2, 1])
    parser.add_argument("--patch-size", type=int, default=4)
    parser.add_argument("--position-init", default="random", choices=("random", "sincos"))
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    import torch
    import torch.nn.functional as F

    from groupvit_core.tokenizer import GroupViTTokenizer
    from groupvit_pt import GroupViTModel
    from groupvit_pt.training import SyntheticData, _empty_dir, builtin_model_config, init_positions, vision_forward

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = GroupViTModel(builtin_model_config(vision_hidden=args.vision_hidden, depths=args.depths,
                                               patch_size=args.patch_size))
    init_positions(model, args.position_init)
    classes = len(synthetic.ENTITY_NAMES)
    head = torch.nn.Linear(model.config.projection_dim, classes)
    data = SyntheticData(GroupViTTokenizer.from_pretrained(_empty_dir()), args.pool_size)
    params = [*model.vision_model.parameters(), *model.visual_projection.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.05)
    test = list(synthetic.iter_scenes("test", 300))
    test_pixels = torch.from_numpy(synthetic.model_pixels(np.stack([s.image for s in test])))
    grounds = len(synthetic.BACKGROUNDS)
    shapes = len(synthetic.SHAPES)

    def logits_of(pixels):
        _, pooled, _, _ = vision_forward(model, pixels)
        return head(model.visual_projection(pooled))

    def shape_accuracy() -> float:
        model.eval()
        with torch.no_grad():
            logits = logits_of(test_pixels).numpy()
        model.train()
        right = total = 0
        for row, scene in enumerate(test):
            for label in scene.labels[1:]:
                obj = label - 1 - grounds  # index into synthetic.OBJECTS (colour-major)
                same_colour = [grounds + (obj // shapes) * shapes + k for k in range(shapes)]
                right += int(np.argmax(logits[row, same_colour]) == obj % shapes)
                total += 1
        return right / total

    model.train()
    start = time.perf_counter()
    for step in range(args.steps):
        lr = args.lr * min(1.0, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = data.numpy_batch(step, args.batch_size, args.seed)
        loss = F.binary_cross_entropy_with_logits(logits_of(torch.from_numpy(batch["pixel_values"])),
                                                  torch.from_numpy(batch["targets"]))
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if (step + 1) % args.every == 0 or step + 1 == args.steps:
            print(f"step {step + 1}: train BCE {float(loss.detach()):.3f}, held-out shape accuracy "
                  f"{shape_accuracy():.3f} ({time.perf_counter() - start:.0f}s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
