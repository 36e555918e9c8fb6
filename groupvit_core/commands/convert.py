"""``groupvit convert SRC DST``: convert a checkpoint between safetensors, tf_model.h5, pytorch_model.bin and NVlabs .pth.

A thin wrapper over :func:`groupvit_core.convert.convert_checkpoint`; needs no tensor framework.
"""

from __future__ import annotations

import argparse
import json
import sys

from ..convert import DTYPES, FORMATS, convert_checkpoint, format_summary

EPILOG = """examples:
  groupvit convert nvidia-groupvit-gcc-yfcc/ groupvit-h5/ --format h5
  groupvit convert groupvit-h5/ groupvit-st/ --format safetensors
  groupvit convert group_vit_gcc_yfcc_30e-879422e0.pth groupvit-gcc-yfcc/
  groupvit convert groupvit-gcc-yfcc/ groupvit-fp16/ --dtype float16
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument("src", metavar="SRC",
                        help="checkpoint directory (config.json + model.safetensors / pytorch_model.bin / "
                             "tf_model.h5), one such weight file, or an original NVlabs .pth file")
    parser.add_argument("dst", metavar="DST", help="output checkpoint directory (must not exist unless --overwrite)")
    parser.add_argument("--format", choices=FORMATS, default="safetensors",
                        help="weight file format to write (default: safetensors)")
    parser.add_argument("--dtype", choices=DTYPES, default=None,
                        help="cast floating-point tensors (integer tensors keep their type; default: keep)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace DST if it exists (only after the new checkpoint is complete)")
    parser.add_argument("--vision-heads", type=int, default=None, metavar="N",
                        help="NVlabs sources: vision attention heads (default: the .pth's config, else 6)")
    parser.add_argument("--text-heads", type=int, default=None, metavar="N",
                        help="NVlabs sources: text attention heads (default: width // 64, as NVlabs)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar and no summary")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")


def run(args: argparse.Namespace) -> int:
    from ..cli import CommandError

    for name in ("vision_heads", "text_heads"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise CommandError(f"--{name.replace('_', '-')} must be positive, got {value}")
    try:
        summary = convert_checkpoint(
            args.src, args.dst, format=args.format, dtype=args.dtype, overwrite=args.overwrite,
            progress=not args.quiet and sys.stderr.isatty(),
            vision_heads=args.vision_heads, text_heads=args.text_heads,
        )
    except (OSError, ValueError, TypeError) as error:
        raise CommandError(str(error)) from error
    if args.json:
        print(json.dumps(summary, indent=2, sort_keys=True))
    elif not args.quiet:
        print(format_summary(summary))
    return 0
