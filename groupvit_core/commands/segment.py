"""``groupvit segment IMAGE... --labels "cat,dog"``: zero-shot segmentation of image files into named classes.

Writes ``<stem>_labels.png`` (palette PNG, pixel value = label), ``<stem>_overlay.png`` (classes over the image,
with a legend) and ``<stem>_groups.png`` (the hard groups) per image, and prints each class's pixel share. The
model runs in PyTorch or TensorFlow (imported only once the arguments are checked).
"""

from __future__ import annotations

import argparse
import os
from typing import List, Optional

from .. import builtin
from .. import segmentation as seg

EPILOG = """label map: with --background-threshold T, 0 = background and the i-th label is i (1-based);
without it, labels are 0-based in --labels order.

examples:
  groupvit segment cat.jpg --labels "cat,dog,sofa" --model groupvit-gcc-yfcc/ --background-threshold 0.95
  groupvit segment a.jpg b.jpg --labels "sky,tree,road,car" --model groupvit-gcc-yfcc/ --output out/
"""


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by ``segment`` and ``evaluate``."""
    parser.add_argument("--model", metavar="PATH", default=None,
                        help="checkpoint directory (config.json + model.safetensors / pytorch_model.bin / "
                             "tf_model.h5), e.g. nvidia/groupvit-gcc-yfcc downloaded; default: the built-in "
                             "model trained on the synthetic world (groupvit_core.builtin)")
    parser.add_argument("--framework", choices=seg.FRAMEWORKS, default=None,
                        help="run the model in PyTorch (pt) or TensorFlow (tf); default: pt if torch is installed")
    parser.add_argument("--templates", choices=("single", "ensemble"), default="single",
                        help="class prompts: 'a photo of a {}.' (single, the paper's) or CLIP's 80 templates "
                             "averaged (ensemble)")
    parser.add_argument("--window", choices=seg.WINDOW_MODES, default=None,
                        help="448x448 windows at stride 224 (slide, the paper's) or the whole image at once; "
                             "default: slide (the built-in model: its own setting, whole)")
    parser.add_argument("--preset", choices=("imagenet", "clip"), default=None,
                        help="pixel normalisation: ImageNet statistics (the NVlabs code) or CLIP's (the Hub "
                             "preprocessor); default: imagenet (the built-in model: its own setting)")
    parser.add_argument("--batch-size", type=int, default=4, metavar="B",
                        help="windows per forward pass; evaluate also reads B images at a time (default 4)")
    parser.add_argument("--refine", action=argparse.BooleanOptionalAction, default=None,
                        help="refine the label map on the image's own pixels (labels follow colour edges; not "
                             "the paper's protocol); default: off (the built-in model: its own setting, on)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    parser.add_argument("--labels", default=None,
                        help='comma-separated class names, e.g. "cat,dog,person"; required with --model, '
                             "default with the built-in model: the classes it was trained on")
    add_model_arguments(parser)
    parser.add_argument("--background-threshold", type=float, default=None, metavar="T",
                        help="add a background class: pixels whose best class score is below T (0..1; the paper "
                             "uses 0.95 for VOC/COCO, 0.35 for Context); default: no background")
    parser.add_argument("--output", metavar="DIR", default=".", help="output directory (default: .)")


def parse_labels(text: str) -> List[str]:
    from ..cli import CommandError

    try:
        return seg.check_class_names(text.split(","))
    except ValueError as error:
        raise CommandError(f"--labels: {error}") from None


def resolve_model(path: Optional[str]) -> str:
    from ..cli import CommandError

    if path is None:
        try:
            return builtin.builtin_model_path()
        except OSError as error:
            raise CommandError(f"{error}. {seg.NO_MODEL_MESSAGE}") from None
    if not os.path.isdir(path):
        raise CommandError(f"--model {path}: not a checkpoint directory (expected config.json and weights)")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise CommandError(f"--model {path}: no config.json in the directory")
    return path


def build_segmenter(args: argparse.Namespace, model: str, background_threshold: Optional[float]):
    """Load the backend and the tokenizer and build a ZeroShotSegmenter from the shared options."""
    from ..cli import CommandError
    from ..tokenizer import GroupViTTokenizer

    if args.batch_size < 1:
        raise CommandError(f"--batch-size must be positive, got {args.batch_size}")
    if background_threshold is not None and not 0.0 <= background_threshold <= 1.0:
        raise CommandError(f"--background-threshold must be in [0, 1], got {background_threshold}")
    try:
        framework = args.framework or seg.default_framework()
        backend = seg.load_backend(model, framework)
        tokenizer = GroupViTTokenizer.from_pretrained(model)
    except (OSError, ValueError) as error:
        raise CommandError(f"cannot load the model from {model}: {error}") from error
    # The built-in model carries the settings it was measured with; explicit options still win.
    options = builtin.builtin_segmenter_options() if builtin.is_builtin(model) else {}
    args.window = args.window or options.get("window", "slide")
    args.preset = args.preset or options.get("preset", seg.DEFAULT_PRESET)
    extra = {key: options[key] for key in ("short_side", "top_k") if key in options}
    extra["refine"] = options.get("refine", False) if args.refine is None else args.refine
    segmenter = seg.ZeroShotSegmenter(backend, tokenizer, preset=args.preset, window=args.window,
                                      background_threshold=background_threshold, batch_size=args.batch_size,
                                      **extra)
    return segmenter, framework


def _check_images(paths: List[str]) -> None:
    from ..cli import CommandError
    from ..image import open_image_file

    stems = {}
    for path in paths:
        try:
            with open_image_file(path) as image:  # only image.ALLOWED_IMAGE_FORMATS
                image.verify()
        except FileNotFoundError:
            raise CommandError(f"cannot read image {path}: no such file") from None
        except (OSError, ValueError, SyntaxError) as error:
            raise CommandError(f"cannot read image {path}: {error}") from None
        stem = os.path.splitext(os.path.basename(path))[0]
        if stem in stems:
            raise CommandError(f"{stems[stem]} and {path} would write the same output files ({stem}_*.png); "
                               "segment them into different --output directories")
        stems[stem] = path


def run(args: argparse.Namespace) -> int:
    from ..cli import CommandError
    from ..image import load_image
    from ..visualize import save_groups_png, save_label_png, save_overlay_png

    labels = parse_labels(args.labels) if args.labels is not None else None
    _check_images(args.images)
    model = resolve_model(args.model)
    if labels is None:
        if not builtin.is_builtin(model):
            raise CommandError("--labels is required with --model (comma-separated class names)")
        labels = list(builtin.builtin_class_names())
    if os.path.exists(args.output) and not os.path.isdir(args.output):
        raise CommandError(f"--output {args.output} exists and is not a directory")
    segmenter, framework = build_segmenter(args, model, args.background_threshold)
    segmenter.set_classes(labels, templates=args.templates)
    os.makedirs(args.output, exist_ok=True)
    background = 0 if args.background_threshold is not None else None
    for path in args.images:
        try:
            image = load_image(path)
        except OSError as error:
            raise CommandError(str(error)) from None
        result = segmenter.segment([image])[0]
        stem = os.path.join(args.output, os.path.splitext(os.path.basename(path))[0])
        written = [
            save_label_png(f"{stem}_labels.png", result.label_map),
            save_overlay_png(f"{stem}_overlay.png", image, result.label_map, result.class_names,
                             background_label=background),
            save_groups_png(f"{stem}_groups.png", image, result.group_map),
        ]
        print(f"{path} ({image.width}x{image.height}, {framework}):")
        shares = result.class_shares()
        width = max(len(name) for name in shares)
        for name, share in sorted(shares.items(), key=lambda item: -item[1]):
            print(f"  {name:<{width}}  {100.0 * share:6.2f}%")
        print("  wrote " + ", ".join(written))
    return 0
