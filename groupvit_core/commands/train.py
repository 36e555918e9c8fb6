"""``groupvit train --output DIR``: train a small GroupViT from captions on the synthetic world (PyTorch).

Runs ``groupvit_pt.training.train_synthetic``: image-text contrastive + multi-label contrastive + group-level
losses, AdamW with warm-up and cosine decay, checkpoints (``--resume``), a progress bar, seeded. Measures the
zero-shot mIoU on the held-out synthetic test split at the end. ``--export DIR`` writes the trained model as a
float16 checkpoint with the built-in model's segmentation settings (what groupvit_core/assets/builtin holds).
For data-parallel training over processes, run it under ``torchrun --nproc_per_node N`` (gloo or nccl).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import List, Optional

EPILOG = """examples:
  groupvit train --output runs/builtin                                # the built-in recipe (5000 steps)
  groupvit train --output runs/quick --time-budget 600                # shortened to fit 10 minutes
  groupvit train --output runs/builtin --resume                       # continue from runs/builtin/checkpoint
  groupvit train --output runs/aff --set affinity_weight=0.5 --set steps=5000   # any TrainConfig option
  torchrun --nproc_per_node 2 -m groupvit_core train --output runs/ddp --steps 200
"""

# TrainConfig options that have their own flag (``--set`` refuses them, so that one option has one spelling)
_FLAGGED = {"steps": "--steps", "batch_size": "--batch-size", "lr": "--lr", "seed": "--seed",
            "pool_size": "--pool-size", "eval_every": "--eval-every", "keep_best": "--keep-best",
            "eval_count": "--eval-count (the final test evaluation's size)"}


def parse_settings(items: List[str]) -> dict:
    """``--set OPTION=VALUE`` items -> TrainConfig overrides. VALUE is read as JSON (numbers, true/false, lists)
    and else kept as a string; its type must fit the option's default (an int where a float is expected is
    fine)."""
    from ..cli import CommandError
    from ..losses import TrainConfig

    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    settings = {}
    for item in items:
        name, sep, raw = item.partition("=")
        name = name.strip()
        if not sep or not name:
            raise CommandError(f"--set {item!r}: expected OPTION=VALUE, e.g. --set affinity_weight=0.5")
        if name in _FLAGGED:
            raise CommandError(f"--set {name}: use {_FLAGGED[name]}")
        if name not in defaults:
            raise CommandError(f"--set {name}: not a training option; choose one of "
                               f"{', '.join(sorted(set(defaults) - set(_FLAGGED)))}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        default = defaults[name]
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, float):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            value = float(value) if ok else value
        elif isinstance(default, int):
            ok = isinstance(value, int) and not isinstance(value, bool)
        else:
            ok = isinstance(value, type(default))
        if not ok:
            kind = {bool: "true or false", float: "a number", int: "a whole number"}.get(type(default), "a string")
            raise CommandError(f"--set {name}={raw}: expected {kind} (default {json.dumps(default)})")
        settings[name] = value
    return settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument("--output", "--out", dest="output", required=True, metavar="DIR",
                        help="run directory (model/, checkpoint/, result.json, log.txt)")
    parser.add_argument("--variant", default="aff_mimetic",
                        help="recipe name (default: aff_mimetic, the built-in's)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the recipe's, 5000)")
    parser.add_argument("--batch-size", type=int, default=None, help="global batch (default 64)")
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate (default 2e-3)")
    parser.add_argument("--seed", type=int, default=None, help="seed (default 0)")
    parser.add_argument("--pool-size", type=int, default=None, help="training scenes generated (default: the recipe's)")
    parser.add_argument("--eval-every", type=int, default=None,
                        help="validation mIoU every N steps (default: the recipe's; 0: none)")
    parser.add_argument("--keep-best", action="store_true", default=None,
                        help="end on the weights of the best validation evaluation (needs --eval-every)")
    parser.add_argument("--eval-count", type=int, default=200, help="test scenes for the final mIoU")
    parser.add_argument("--time-budget", type=float, default=None, metavar="S",
                        help="shorten the schedule to what fits in S seconds")
    parser.add_argument("--device", default=None, help="torch device (default cpu)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--resume", action="store_true", help="continue from DIR/checkpoint")
    parser.add_argument("--no-eval", action="store_true", help="skip the final mIoU")
    parser.add_argument("--export", metavar="DIR", default=None,
                        help="also write the model as a float16 built-in-style checkpoint to DIR")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--set", dest="settings", action="append", default=[], metavar="OPTION=VALUE",
                        help="any other TrainConfig option, repeatable (e.g. affinity_weight=0.5, "
                             "group_owned_only=false, group_token_dropout=0.5); values are JSON")


def export_builtin(model_dir: str, target: str) -> str:
    """Copy a trained checkpoint to ``target`` as float16 safetensors + config.json + segmentation.json."""
    from .. import synthetic
    from ..builtin import SEGMENTATION_FILE
    from ..checkpoint import write_safetensors
    from ..io_utils import atomic_write_text
    from ..loading import load_pretrained

    config, state = load_pretrained(model_dir)
    os.makedirs(target, exist_ok=True)
    config.save_pretrained(target)
    write_safetensors(os.path.join(target, "model.safetensors"), state, dtype="float16")
    settings = {"window": "whole", "short_side": config.vision_config.image_size, "preset": "imagenet", "background_threshold": None,
                "top_k": 5, "refine": True, "templates": "single", "image_size": config.vision_config.image_size,
                "class_names": list(synthetic.ENTITY_NAMES)}
    atomic_write_text(os.path.join(target, SEGMENTATION_FILE), json.dumps(settings, indent=1) + "\n")
    return target


def run(args: argparse.Namespace) -> int:
    from ..cli import CommandError

    try:
        from groupvit_pt.training import VARIANTS, command_session, train_synthetic
    except ImportError as error:
        raise CommandError(f"training needs PyTorch: pip install 'groupvit[torch]' ({error})") from None

    if args.variant not in VARIANTS:
        raise CommandError(f"--variant {args.variant}: choose one of {', '.join(sorted(VARIANTS))}")
    settings = parse_settings(args.settings)
    with command_session(args.threads):
        result = train_synthetic(args.output, args.variant, time_budget=args.time_budget,
                                 eval_count=args.eval_count, device=args.device, resume=args.resume,
                                 progress=not args.quiet, evaluate=not args.no_eval, steps=args.steps,
                                 batch_size=args.batch_size, lr=args.lr, seed=args.seed, pool_size=args.pool_size,
                                 eval_every=args.eval_every, keep_best=args.keep_best, **settings)
        if "miou" in result:
            print(f"mIoU {result['miou']['miou']:.4f} (patch-level ablation "
                  f"{result['miou_patch_ablation']['miou']:.4f}, random weights "
                  f"{result['miou_random_weights']['miou']:.4f}) on {args.eval_count} test scenes")
        if args.export:
            print(f"exported {export_builtin(os.path.join(args.output, 'model'), args.export)}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """``python tools/train_builtin.py ...``: the same as ``groupvit train ...``."""
    from ..cli import CommandError

    parser = argparse.ArgumentParser(prog="train_builtin.py", description=__doc__)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except CommandError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
