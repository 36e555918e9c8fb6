"""The ``groupvit`` command: convert weights, segment images, evaluate segmentation.

Each subcommand lives in ``groupvit_core/commands/<name>.py`` with ``add_arguments(parser)`` and
``run(args) -> int``; this module only wires them together, so ``groupvit --help`` stays fast (no framework is
imported until a subcommand needs one).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

from . import __version__

# name -> (module, one-line help)
COMMANDS = {
    "convert": ("groupvit_core.commands.convert", "convert a checkpoint between safetensors, tf_model.h5, "
                "pytorch_model.bin and the original NVlabs .pth"),
    "segment": ("groupvit_core.commands.segment", "segment images into the given class names"),
    "evaluate": ("groupvit_core.commands.evaluate", "zero-shot segmentation mIoU on a VOC/Context/COCO-layout dataset"),
    "train": ("groupvit_core.commands.train", "train a small GroupViT from captions on the synthetic world (PyTorch)"),
}


class CommandError(Exception):
    """A user-facing failure: printed as 'groupvit <cmd>: error: ...' with exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="groupvit",
        description="GroupViT in PyTorch and TensorFlow/Keras 3 from one set of checkpoints.",
    )
    parser.add_argument("--version", action="version", version=f"groupvit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        command_parser = sub.add_parser(name, help=help_text, description=help_text)
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name != module_name:
                raise
            command_parser.set_defaults(_unavailable=name)
            continue
        module.add_arguments(command_parser)
        command_parser.set_defaults(_run=module.run)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if getattr(args, "_unavailable", None):
        print(f"groupvit {args.command}: not available in this version", file=sys.stderr)
        return 2
    try:
        return int(args._run(args) or 0)
    except CommandError as err:
        print(f"groupvit {args.command}: error: {err}", file=sys.stderr)
        return 2
    except (ValueError, TypeError, OSError) as err:
        print(f"groupvit {args.command}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"groupvit {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
