"""``groupvit evaluate --data DIR --format voc|context|coco-object --model PATH``: zero-shot segmentation mIoU.

Runs the NVlabs protocol (groupvit_core.segmentation) over a dataset on disk (groupvit_core.datasets): the class
prompts are encoded once, every image is segmented at its original size and compared with its mask; prints
per-class IoU, mIoU and pixel accuracy as a table and optionally writes them as JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any, Dict

from .. import datasets
from .segment import add_model_arguments, build_segmenter, resolve_model

EPILOG = """examples:
  groupvit evaluate --data VOCdevkit/VOC2012 --format voc --model groupvit-gcc-yfcc/
  groupvit evaluate --data VOCdevkit/VOC2010 --format context --model groupvit-gcc-yfcc/ --output-json ctx.json
  groupvit evaluate --data local_data/coco --format coco-object --model groupvit-gcc-redcaps/ --limit 500
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument("--data", required=True, metavar="DIR", help="dataset root (see --format)")
    parser.add_argument("--format", required=True, choices=sorted(datasets.PRESETS),
                        help="voc: JPEGImages, SegmentationClass, ImageSets/Segmentation/val.txt; context: "
                             "JPEGImages, SegmentationClassContext, ImageSets/SegmentationContext/val.txt; "
                             "coco-object: images/val2017, annotations/val2017/*_instanceTrainIds.png")
    add_model_arguments(parser)
    parser.add_argument("--background-threshold", type=float, default=None, metavar="T",
                        help="override the dataset's threshold (voc 0.95, context 0.35, coco-object 0.95)")
    parser.add_argument("--limit", type=int, default=None, metavar="N", help="evaluate the first N images only")
    parser.add_argument("--output-json", metavar="FILE", default=None, help="also write the results as JSON")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def _percent(value: float) -> str:
    return "   n/a" if math.isnan(value) else f"{100.0 * value:6.2f}"


def format_table(report: Dict[str, Any]) -> str:
    names = report["class_names"]
    width = max(12, max(len(name) for name in names))
    lines = [f"{'class':<{width}}  IoU (%)", "-" * (width + 9)]
    for name in names:
        value = report["per_class_iou"][name]
        lines.append(f"{name:<{width}}  {_percent(float('nan') if value is None else value)}")
    lines.append("-" * (width + 9))
    lines.append(f"{'mIoU':<{width}}  {_percent(report['miou'])}")
    lines.append(f"{'pixel acc.':<{width}}  {_percent(report['pixel_accuracy'])}")
    lines.append(f"{'mean acc.':<{width}}  {_percent(report['mean_accuracy'])}")
    lines.append(f"{report['num_images']} images, {report['format']}, {report['framework']}, window "
                 f"{report['window']}, templates {report['templates']}, background threshold "
                 f"{report['background_threshold']}")
    return "\n".join(lines)


def _json_number(value: float):
    return None if math.isnan(value) else float(value)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..cli import CommandError
    from ..io_utils import atomic_write_text

    if args.limit is not None and args.limit < 1:
        raise CommandError(f"--limit must be positive, got {args.limit}")
    try:
        dataset = datasets.open_dataset(args.data, args.format)
    except (OSError, ValueError) as error:
        raise CommandError(str(error)) from None
    model = resolve_model(args.model)
    threshold = dataset.background_threshold if args.background_threshold is None else args.background_threshold
    segmenter, framework = build_segmenter(args, model, threshold)
    segmenter.set_classes(dataset.class_names[1:], templates=args.templates)
    count = len(dataset) if args.limit is None else min(args.limit, len(dataset))
    metric = datasets.SegmentationMetric(len(dataset.class_names))
    with tqdm(total=count, desc="evaluate", unit="img", file=sys.stderr,
              disable=True if args.quiet else None) as bar:
        for start in range(0, count, args.batch_size):
            samples = [dataset[i] for i in range(start, min(start + args.batch_size, count))]
            results = segmenter.segment([sample.image for sample in samples])
            for sample, result in zip(samples, results):
                try:
                    metric.update(result.label_map, sample.mask)
                except ValueError as error:
                    raise CommandError(f"{sample.mask_path}: {error}") from None
            bar.update(len(samples))
    scores = metric.compute()
    report = {
        "format": args.format,
        "data": dataset.root,
        "model": model,
        "framework": framework,
        "num_images": metric.num_images,
        "window": args.window,
        "templates": args.templates,
        "preset": args.preset,
        "background_threshold": threshold,
        "class_names": list(dataset.class_names),
        "per_class_iou": {name: _json_number(v) for name, v in zip(dataset.class_names, scores["iou"])},
        "miou": _json_number(scores["miou"]),
        "pixel_accuracy": _json_number(scores["pixel_accuracy"]),
        "mean_accuracy": _json_number(scores["mean_accuracy"]),
        "num_pixels": scores["num_pixels"],
    }
    print(format_table({**report, "miou": scores["miou"], "pixel_accuracy": scores["pixel_accuracy"],
                        "mean_accuracy": scores["mean_accuracy"]}))
    if args.output_json:
        atomic_write_text(args.output_json, json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.output_json}")
    return 0
