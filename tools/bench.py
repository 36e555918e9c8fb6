"""Speed of groupvit_pt / groupvit_tf against transformers 4.57.6's GroupViT on CPU: the BENCHMARKS.md table.

Maintainer script, run by hand (never as a timed test), in the reference environment, which has transformers,
torch, TensorFlow, tf-keras (the reference's TF classes) and Keras 3 (ours) side by side:

    /work/refvenv/bin/python tools/bench.py [--frameworks pt tf] [--workloads 1 2 3 3b 4 4b 5] [--repeats 7]
                                            [--threads 2] [--write BENCHMARKS.md]

One random default-size checkpoint (groupvit_core.testing.random_weights, model.safetensors) is written to a
temporary directory and loaded by the reference (transformers.GroupViTModel / TFGroupViTModel) and by ours
(groupvit_pt.GroupViTModel / groupvit_tf.TFGroupViTModel), all in this one process. For each workload the
outputs of ours and the reference are compared first, then the two are timed interleaved (ours, reference,
reference, ours, ... after ``--warmup`` untimed rounds) and the medians of ``--repeats`` rounds are reported
with their ratio. Every round also times a 2048^3 float32 matrix product (torch, MKL) on the same threads: the
median of those is "the machine's matmul throughput", so that a workload's "% of matmul" column is
(workload FLOPs / median time) / that throughput, measured under the same load. FLOPs are counted analytically
(2 per multiply-add, matrix products only) for the work the REFERENCE does; where ours skips work (workloads 3
and 4) its column is an effective rate and may exceed what the hardware could do for the same work.

Workloads (inputs are the same arrays for both implementations):
  1   full forward with output_segmentation: 4 images 224 px x 8 texts padded to 77 tokens;
  2   get_image_features, 16 images;
  3   get_text_features, 64 texts padded to 77 tokens (real lengths 5-20, as CLIP-tokenised prompts);
  3b  get_text_features, 64 texts of 77 real tokens (no padding: the same work for both);
  4   segmentation of one 224 px image against 20 class names (VOC) whose text embeddings are cached: the
      reference has no cache, so its side is its forward with output_segmentation on 1 image x 20 prompts
      ("a photo of a {name}.", padded to the longest); ours is groupvit_core.segmentation.ZeroShotSegmenter
      (NVlabs protocol, window="whole", short side 224) on a uint8 image with set_class_embeddings done once;
  4b  the same as the reference's side of 4 with our model (forward, output_segmentation, 1 image x 20 texts);
  5   from_pretrained of the checkpoint to the first output (1 image x 1 text forward), each run in a fresh
      child process (imports not timed), alternating ours and the reference; the same children report the
      peak resident memory (VmHWM) of loading plus one pass of workloads 1-4.

Threads: torch.set_num_threads(--threads) and TensorFlow's intra-/inter-op pools of the same size. The machine
may be shared: the load average is recorded before and after, and only interleaved ratios are meaningful.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# transformers' TF classes need Keras 2 (tf-keras); ours use Keras 3 (`import keras`): both load in one process.
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

WORKLOADS = ("1", "2", "3", "3b", "4", "4b", "5")
FRAMEWORKS = ("pt", "tf")
MATMUL_SIZE = 2048
TEXT_LENGTH = 77
SEGMENT_CLASSES = 20
PROMPT = "a photo of a {}."


# ----------------------------------------------------------------------------------------------------------------
# FLOPs of the reference's work (2 per multiply-add, matrix products only)
# ----------------------------------------------------------------------------------------------------------------


def _layer_macs(tokens: int, hidden: int, intermediate: int, keys: Optional[int] = None) -> int:
    keys = tokens if keys is None else keys
    return 4 * tokens * hidden * hidden + 2 * tokens * hidden * intermediate + 2 * tokens * keys * hidden


def text_macs(config, batch: int, length: int) -> int:
    text = config.text_config
    per_text = text.num_hidden_layers * _layer_macs(length, text.hidden_size, text.intermediate_size)
    return batch * per_text


def vision_macs(config, batch: int, height: int, width: int) -> int:
    vision = config.vision_config
    hidden, inter, patch = vision.hidden_size, vision.intermediate_size, vision.patch_size
    tokens_dim, channels_dim = vision.assign_mlp_dims
    tokens = (height // patch) * (width // patch)
    macs = tokens * vision.num_channels * patch * patch * hidden  # patch convolution
    prev_groups = 0
    for spec in vision.stages:
        groups = spec.num_group_tokens
        if spec.has_group_projector:
            macs += hidden * (prev_groups * vision.group_projector_dim + vision.group_projector_dim * groups)
        macs += spec.depth * _layer_macs(tokens + groups, hidden, inter)
        if spec.has_downsample:
            out = spec.num_output_groups
            macs += hidden * (groups * tokens_dim + tokens_dim * out)  # mlp_inter (token axis)
            macs += out * hidden * hidden + 2 * tokens * hidden * hidden + 2 * out * tokens * hidden  # cross q,kv,attn
            macs += out * hidden * hidden + 2 * out * hidden * inter  # cross out_proj, mlp
            macs += out * hidden * hidden + 2 * tokens * hidden * hidden + 2 * out * tokens * hidden  # assign
            macs += out * hidden * hidden + 2 * out * hidden * channels_dim  # assign proj, mlp_channels
            tokens = out
        prev_groups = groups
    return batch * macs


def head_macs(config, in_features: int, rows: int) -> int:
    return rows * (in_features * config.projection_intermediate_dim
                   + config.projection_intermediate_dim * config.projection_dim)


def forward_flops(config, images: int, texts: int, length: int, height: int, width: int,
                  segmentation: bool) -> int:
    vision = config.vision_config
    macs = vision_macs(config, images, height, width) + text_macs(config, texts, length)
    macs += head_macs(config, vision.hidden_size, images) + head_macs(config, config.text_config.hidden_size, texts)
    macs += texts * images * config.projection_dim
    if segmentation:
        groups = vision.stages[-1].num_output_groups if vision.stages[-1].has_downsample else (
            [s for s in vision.stages if s.has_downsample][-1].num_output_groups)
        grid = (height // vision.patch_size) * (width // vision.patch_size)
        macs += head_macs(config, vision.hidden_size, images * groups)  # group tokens through the head
        macs += images * groups * texts * config.projection_dim
        macs += images * grid * vision.num_group_tokens[0] * groups  # product of the soft maps (small)
        macs += images * groups * height * width * texts  # logits per group mixed into pixels
    return 2 * macs


# ----------------------------------------------------------------------------------------------------------------
# Checkpoint and inputs
# ----------------------------------------------------------------------------------------------------------------


def make_checkpoint(directory: str):
    from groupvit_core import loading
    from groupvit_core.testing import random_weights, test_config

    config = test_config("default")
    loading.save_pretrained(directory, config, random_weights(config, seed=0), format="safetensors")
    return config


def _pad_texts(config, count: int, seed: int, real_lengths: Optional[Sequence[int]] = None
               ) -> Tuple[np.ndarray, np.ndarray]:
    from groupvit_core.testing import random_inputs

    rng = np.random.RandomState(seed)
    lengths = real_lengths if real_lengths is not None else rng.randint(5, 21, size=count)
    texts = random_inputs(config, 0, count, seed=seed, text_lengths=list(lengths))
    ids = np.full((count, TEXT_LENGTH), config.text_config.eos_token_id, dtype=np.int64)
    mask = np.zeros((count, TEXT_LENGTH), dtype=np.int64)
    width = texts["input_ids"].shape[1]
    ids[:, :width], mask[:, :width] = texts["input_ids"], texts["attention_mask"]
    return ids, mask


def make_inputs(config) -> Dict[str, Any]:
    from groupvit_core.datasets import VOC_CLASSES
    from groupvit_core.tokenizer import GroupViTTokenizer

    rng = np.random.RandomState(1)
    size = config.vision_config.image_size
    inputs: Dict[str, Any] = {}
    inputs["w1_ids"], inputs["w1_mask"] = _pad_texts(config, 8, seed=1)
    inputs["w1_pixels"] = rng.standard_normal((4, 3, size, size)).astype(np.float32)
    inputs["w2_pixels"] = rng.standard_normal((16, 3, size, size)).astype(np.float32)
    inputs["w3_ids"], inputs["w3_mask"] = _pad_texts(config, 64, seed=3)
    inputs["w3b_ids"], inputs["w3b_mask"] = _pad_texts(config, 64, seed=4, real_lengths=[TEXT_LENGTH] * 64)
    tokenizer = GroupViTTokenizer()
    names = list(VOC_CLASSES[1:1 + SEGMENT_CLASSES])
    batch = tokenizer([PROMPT.format(name) for name in names], padding="longest", return_tensors="np")
    inputs["w4_names"] = names
    inputs["w4_ids"] = np.asarray(batch["input_ids"], dtype=np.int64)
    inputs["w4_mask"] = np.asarray(batch["attention_mask"], dtype=np.int64)
    image = rng.randint(0, 256, size=(size, size, 3)).astype(np.uint8)
    inputs["w4_image"] = image
    # The reference gets the pixels our segmenter computes from the image (CLIP normalisation, no resize at 224).
    from groupvit_core.image import NORMALIZATION_PRESETS

    mean, std = (np.asarray(v, dtype=np.float32) for v in NORMALIZATION_PRESETS["clip"])
    pixels = (image.astype(np.float64) / 255).astype(np.float32)
    inputs["w4_pixels"] = np.ascontiguousarray(np.moveaxis((pixels - mean) / std, -1, 0)[None], dtype=np.float32)
    inputs["w5_ids"] = inputs["w1_ids"][:1, :8].copy()
    inputs["w5_ids"][0, -1] = config.text_config.eos_token_id
    inputs["w5_pixels"] = inputs["w1_pixels"][:1]
    return inputs


def workload_flops(config, inputs: Dict[str, Any]) -> Dict[str, int]:
    size = config.vision_config.image_size
    return {
        "1": forward_flops(config, 4, 8, TEXT_LENGTH, size, size, segmentation=True),
        "2": 2 * (vision_macs(config, 16, size, size) + head_macs(config, config.vision_config.hidden_size, 16)),
        "3": 2 * (text_macs(config, 64, TEXT_LENGTH) + head_macs(config, config.text_config.hidden_size, 64)),
        "3b": 2 * (text_macs(config, 64, TEXT_LENGTH) + head_macs(config, config.text_config.hidden_size, 64)),
        "4": forward_flops(config, 1, SEGMENT_CLASSES, inputs["w4_ids"].shape[1], size, size, segmentation=True),
        "4b": forward_flops(config, 1, SEGMENT_CLASSES, inputs["w4_ids"].shape[1], size, size, segmentation=True),
        "5": forward_flops(config, 1, 1, inputs["w5_ids"].shape[1], size, size, segmentation=False),
    }


# ----------------------------------------------------------------------------------------------------------------
# The four implementations: each gives {workload: (run, output)} where run() does the work and output(result)
# extracts the array compared between ours and the reference.
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Workload:
    run: Callable[[], Any]
    output: Callable[[Any], np.ndarray]
    compare: str = "close"  # "close": ours vs reference within tolerance; "embeds": see workload 4


def _torch_setup(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _tf_setup(threads: int) -> None:
    import tensorflow as tf

    with contextlib.suppress(RuntimeError):  # already initialised (a second call in one process)
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)


def load_model(impl: str, ckpt: str):
    """impl: pt-ours, pt-ref, tf-ours, tf-ref."""
    if impl == "pt-ours":
        from groupvit_pt import GroupViTModel

        return GroupViTModel.from_pretrained(ckpt)
    if impl == "pt-ref":
        import transformers

        return transformers.GroupViTModel.from_pretrained(ckpt).eval()
    if impl == "tf-ours":
        from groupvit_tf import TFGroupViTModel

        return TFGroupViTModel.from_pretrained(ckpt)
    if impl == "tf-ref":
        from transformers import TFGroupViTModel

        return TFGroupViTModel.from_pretrained(ckpt, from_pt=True)
    raise ValueError(impl)


def first_output(impl: str, model, inputs: Dict[str, Any]) -> np.ndarray:
    ids, pixels = inputs["w5_ids"], inputs["w5_pixels"]
    if impl.startswith("pt"):
        import torch

        with torch.inference_mode():
            if impl == "pt-ours":
                return model(ids, pixels).logits_per_image.numpy()
            return model(input_ids=torch.from_numpy(ids), pixel_values=torch.from_numpy(pixels)
                         ).logits_per_image.numpy()
    import tensorflow as tf

    ids, pixels = tf.constant(ids), tf.constant(pixels)
    if impl == "tf-ours":
        return model(ids, pixels).logits_per_image.numpy()
    return model(input_ids=ids, pixel_values=pixels).logits_per_image.numpy()


def pt_workloads(model, inputs: Dict[str, Any], ours: bool) -> Dict[str, Workload]:
    import torch

    t = {k: torch.from_numpy(v) for k, v in inputs.items() if isinstance(v, np.ndarray)}

    def inference(fn):
        def run():
            with torch.inference_mode():
                return fn()
        return run

    if ours:
        w = {
            "1": inference(lambda: model(t["w1_ids"], t["w1_pixels"], attention_mask=t["w1_mask"],
                                         output_segmentation=True)),
            "2": inference(lambda: model.get_image_features(t["w2_pixels"])),
            "3": inference(lambda: model.get_text_features(t["w3_ids"], attention_mask=t["w3_mask"])),
            "3b": inference(lambda: model.get_text_features(t["w3b_ids"], attention_mask=t["w3b_mask"])),
            "4b": inference(lambda: model(t["w4_ids"], t["w4_pixels"], attention_mask=t["w4_mask"],
                                          output_segmentation=True)),
        }
    else:
        w = {
            "1": inference(lambda: model(input_ids=t["w1_ids"], pixel_values=t["w1_pixels"],
                                         attention_mask=t["w1_mask"], output_segmentation=True)),
            "2": inference(lambda: model.get_image_features(pixel_values=t["w2_pixels"])),
            "3": inference(lambda: model.get_text_features(input_ids=t["w3_ids"], attention_mask=t["w3_mask"])),
            "3b": inference(lambda: model.get_text_features(input_ids=t["w3b_ids"], attention_mask=t["w3b_mask"])),
            "4": inference(lambda: model(input_ids=t["w4_ids"], pixel_values=t["w4_pixels"],
                                         attention_mask=t["w4_mask"], output_segmentation=True)),
        }
        w["4b"] = w["4"]
    out = {
        "1": lambda r: r.segmentation_logits.numpy(),
        "2": lambda r: r.numpy(), "3": lambda r: r.numpy(), "3b": lambda r: r.numpy(),
        "4": lambda r: r.image_embeds.numpy(),
        "4b": lambda r: r.segmentation_logits.numpy(),
    }
    result = {name: Workload(run, out[name]) for name, run in w.items()}
    if ours:
        from groupvit_pt.segmentation import SegmentationBackend

        result["4"] = _segmenter_workload(SegmentationBackend(model), inputs)
    return result


def tf_workloads(model, inputs: Dict[str, Any], ours: bool) -> Dict[str, Workload]:
    import tensorflow as tf

    t = {k: tf.constant(v) for k, v in inputs.items() if isinstance(v, np.ndarray)}
    if ours:
        w = {
            "1": lambda: model(t["w1_ids"], t["w1_pixels"], attention_mask=t["w1_mask"], output_segmentation=True),
            "2": lambda: model.get_image_features(t["w2_pixels"]),
            "3": lambda: model.get_text_features(t["w3_ids"], attention_mask=t["w3_mask"]),
            "3b": lambda: model.get_text_features(t["w3b_ids"], attention_mask=t["w3b_mask"]),
            "4b": lambda: model(t["w4_ids"], t["w4_pixels"], attention_mask=t["w4_mask"], output_segmentation=True),
        }
    else:
        w = {
            "1": lambda: model(input_ids=t["w1_ids"], pixel_values=t["w1_pixels"], attention_mask=t["w1_mask"],
                               output_segmentation=True),
            "2": lambda: model.get_image_features(pixel_values=t["w2_pixels"]),
            "3": lambda: model.get_text_features(input_ids=t["w3_ids"], attention_mask=t["w3_mask"]),
            "3b": lambda: model.get_text_features(input_ids=t["w3b_ids"], attention_mask=t["w3b_mask"]),
            "4": lambda: model(input_ids=t["w4_ids"], pixel_values=t["w4_pixels"], attention_mask=t["w4_mask"],
                               output_segmentation=True),
        }
        w["4b"] = w["4"]
    out = {
        "1": lambda r: np.asarray(r.segmentation_logits),
        "2": np.asarray, "3": np.asarray, "3b": np.asarray,
        "4": lambda r: np.asarray(r.image_embeds),
        "4b": lambda r: np.asarray(r.segmentation_logits),
    }
    result = {name: Workload(_synced(run), out[name]) for name, run in w.items()}
    if ours:
        from groupvit_tf.segmentation import SegmentationBackend

        result["4"] = _segmenter_workload(SegmentationBackend(model), inputs)
    return result


def _synced(run: Callable[[], Any]) -> Callable[[], Any]:
    """TF ops run asynchronously inside functions: wait for the first output so that the timing is complete."""
    def wrapped():
        result = run()
        first = result if not hasattr(result, "values") else next(v for v in result.values() if v is not None)
        np.asarray(first)
        return result
    return wrapped


def _segmenter_workload(backend, inputs: Dict[str, Any]) -> Workload:
    from groupvit_core.segmentation import ZeroShotSegmenter

    size = backend.image_size
    segmenter = ZeroShotSegmenter(backend, preset="clip", window="whole", short_side=size)
    # The cache: class-prompt embeddings computed once, outside the timed part.
    text = backend.encode_text(inputs["w4_ids"], inputs["w4_mask"])
    segmenter.set_class_embeddings(inputs["w4_names"], text)
    image = inputs["w4_image"]
    pixels = inputs["w4_pixels"]

    def run():
        return segmenter.segment([image])[0]

    # Compared with the reference's image_embeds (the label map has no reference counterpart).
    return Workload(run, lambda _: backend.encode_image(pixels)["image_embeds"], compare="embeds")


# ----------------------------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------------------------


def matmul_probe() -> Callable[[], float]:
    """A closure timing one MATMUL_SIZE^3 float32 product with torch (MKL); returns GFLOP/s."""
    import torch

    a = torch.randn(MATMUL_SIZE, MATMUL_SIZE)
    b = torch.randn(MATMUL_SIZE, MATMUL_SIZE)
    torch.mm(a, b)

    def probe() -> float:
        start = time.perf_counter()
        torch.mm(a, b)
        return 2 * MATMUL_SIZE ** 3 / (time.perf_counter() - start) / 1e9

    return probe


@dataclass
class Row:
    framework: str
    workload: str
    flops: int
    ours_s: float = float("nan")
    ref_s: float = float("nan")
    ours_pt_s: float = float("nan")  # TF rows: our PyTorch model on the same work, timed in the same rounds
    ours_cpu_s: float = float("nan")
    ref_cpu_s: float = float("nan")
    matmul_gflops: float = float("nan")
    max_diff: float = float("nan")
    agree: Optional[bool] = None
    note: str = ""
    samples: Dict[str, List[float]] = field(default_factory=dict)


def time_interleaved(runs: Dict[str, Callable[[], Any]], probe: Callable[[], float], warmup: int,
                     repeats: int) -> Dict[str, List[float]]:
    """Wall and process-CPU seconds of each run, interleaved (the order reverses every round), plus the matmul
    probe's GFLOP/s after each round."""
    samples: Dict[str, List[float]] = {"matmul": []}
    for name in runs:
        samples[name], samples[name + "_cpu"] = [], []
    for round_index in range(warmup + repeats):
        order = list(runs.items()) if round_index % 2 == 0 else list(reversed(list(runs.items())))
        for name, fn in order:
            cpu, wall = time.process_time(), time.perf_counter()
            fn()
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            if round_index >= warmup:
                samples[name].append(wall)
                samples[name + "_cpu"].append(cpu)
        gflops = probe()
        if round_index >= warmup:
            samples["matmul"].append(gflops)
    return samples


def compare(kind: str, ours: np.ndarray, ref: np.ndarray) -> Tuple[float, bool]:
    ours, ref = np.asarray(ours, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    if ours.shape != ref.shape:
        return float("inf"), False
    diff = float(np.max(np.abs(ours - ref))) if ours.size else 0.0
    scale = float(np.max(np.abs(ref))) if ref.size else 1.0
    # Segmentation logits are ~s^2 (s = exp(logit_scale) ~ 14) times a cosine: the parity tests' 2e-3.
    tolerance = 2e-3 if kind in ("1", "4b") else 1e-4 * max(1.0, scale)
    return diff, diff <= tolerance


def bench_framework(framework: str, names: Sequence[str], ckpt: str, config, inputs: Dict[str, Any],
                    args, probe, ours_pt: Optional[Dict[str, Workload]] = None) -> List[Row]:
    flops = workload_flops(config, inputs)
    setup, build = (_torch_setup, pt_workloads) if framework == "pt" else (_tf_setup, tf_workloads)
    setup(args.threads)
    print(f"[{framework}] loading ours and the reference", flush=True)
    ours_model, ref_model = load_model(f"{framework}-ours", ckpt), load_model(f"{framework}-ref", ckpt)
    ours, ref = build(ours_model, inputs, ours=True), build(ref_model, inputs, ours=False)
    rows = []
    for name in names:
        if name == "5":
            continue
        row = Row(framework, name, flops[name])
        mine, theirs = ours[name], ref[name]
        print(f"[{framework}] workload {name}: first calls and output check", flush=True)
        ours_out, ref_result = mine.output(mine.run()), theirs.run()
        ref_out = theirs.output(ref_result) if mine.compare == "close" else np.asarray(
            ref_result.image_embeds)
        row.max_diff, row.agree = compare(name, ours_out, ref_out)
        runs = {"ours": mine.run, "ref": theirs.run}
        if ours_pt is not None and name in ours_pt:
            runs["ours_pt"] = ours_pt[name].run
        samples = time_interleaved(runs, probe, args.warmup, args.repeats)
        row.samples = samples
        if "ours_pt" in samples:
            row.ours_pt_s = statistics.median(samples["ours_pt"])
        row.ours_s, row.ref_s = statistics.median(samples["ours"]), statistics.median(samples["ref"])
        row.ours_cpu_s, row.ref_cpu_s = statistics.median(samples["ours_cpu"]), statistics.median(samples["ref_cpu"])
        row.matmul_gflops = statistics.median(samples["matmul"])
        print(f"[{framework}] workload {name}: ours {row.ours_s * 1e3:.0f} ms, reference {row.ref_s * 1e3:.0f} ms, "
              f"ratio {row.ours_s / row.ref_s:.3f}, max |diff| {row.max_diff:.2e}"
              f"{'' if row.agree else '  OUTPUTS DISAGREE'}"
              + (f", our PyTorch {row.ours_pt_s * 1e3:.0f} ms" if not np.isnan(row.ours_pt_s) else ""), flush=True)
        rows.append(row)
    del ours, ref, ours_model, ref_model
    return rows


# ----------------------------------------------------------------------------------------------------------------
# Workload 5 and peak memory: child processes
# ----------------------------------------------------------------------------------------------------------------


def _peak_rss_mb() -> float:
    """This process's peak resident memory in MB: VmHWM (Linux), else ru_maxrss. (ru_maxrss alone is wrong for
    a child started from a big parent: Linux carries the parent's value over fork and exec.)"""
    with contextlib.suppress(OSError):
        with open("/proc/self/status", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_main(impl: str, ckpt: str, threads: int, memory: bool) -> int:
    """Run in a fresh process: imports (untimed), then from_pretrained to first output (timed), then optionally one
    pass of workloads 1-4; prints one JSON line."""
    framework = impl.split("-")[0]
    # transformers looks for TensorFlow only when USE_TORCH is not forced on (tf-ref converts with torch: auto).
    os.environ.pop("USE_TORCH", None)
    os.environ["USE_TF"] = "0" if framework == "pt" else "1"
    from groupvit_core.testing import test_config

    inputs = make_inputs(test_config("default"))  # the checkpoint's config (make_checkpoint)
    if framework == "pt":
        _torch_setup(threads)
        import torch  # noqa: F401
        if impl == "pt-ref":
            import transformers  # noqa: F401
        else:
            import groupvit_pt  # noqa: F401
    else:
        _tf_setup(threads)
        import tensorflow  # noqa: F401
        if impl == "tf-ref":
            import transformers  # noqa: F401
            from transformers import TFGroupViTModel  # noqa: F401
        else:
            import groupvit_tf  # noqa: F401
    rss_imports = _peak_rss_mb()
    start = time.perf_counter()
    model = load_model(impl, ckpt)
    first_output(impl, model, inputs)
    load_s = time.perf_counter() - start
    result = {"impl": impl, "load_s": load_s, "rss_imports_mb": rss_imports,
              "rss_load_mb": _peak_rss_mb()}
    if memory:
        build = pt_workloads if framework == "pt" else tf_workloads
        for name, workload in build(model, inputs, ours=impl.endswith("ours")).items():
            workload.run()
        result["rss_peak_mb"] = _peak_rss_mb()
    print("BENCH_CHILD " + json.dumps(result), flush=True)
    return 0


def run_child(impl: str, ckpt: str, threads: int, memory: bool) -> Dict[str, Any]:
    command = [sys.executable, os.path.abspath(__file__), "--child", impl, "--ckpt", ckpt,
               "--threads", str(threads)] + (["--child-memory"] if memory else [])
    completed = subprocess.run(command, capture_output=True, text=True)
    for line in completed.stdout.splitlines():
        if line.startswith("BENCH_CHILD "):
            return json.loads(line[len("BENCH_CHILD "):])
    raise RuntimeError(f"child {impl} failed (exit {completed.returncode}):\n{completed.stderr[-4000:]}")


def bench_loading(frameworks: Sequence[str], ckpt: str, config, inputs, args) -> Tuple[List[Row], Dict[str, Any]]:
    rows, memory = [], {}
    flops = workload_flops(config, inputs)
    for framework in frameworks:
        samples: Dict[str, List[float]] = {"ours": [], "ref": []}
        for round_index in range(args.load_repeats):
            order = ("ours", "ref") if round_index % 2 == 0 else ("ref", "ours")
            for who in order:
                impl = f"{framework}-{who}"
                print(f"[{framework}] workload 5: child {impl}{' (+ memory)' if impl not in memory else ''}",
                      flush=True)
                try:
                    result = run_child(impl, ckpt, args.threads, memory=impl not in memory)
                except RuntimeError as error:  # keep the other results; the row says what failed
                    print(error, flush=True)
                    continue
                samples[who].append(result["load_s"])
                if impl not in memory:
                    memory[impl] = result
        if not samples["ours"] or not samples["ref"]:
            continue
        row = Row(framework, "5", flops["5"], ours_s=statistics.median(samples["ours"]),
                  ref_s=statistics.median(samples["ref"]), samples=samples)
        print(f"[{framework}] workload 5: ours {row.ours_s:.2f} s, reference {row.ref_s:.2f} s, "
              f"ratio {row.ours_s / row.ref_s:.3f}", flush=True)
        rows.append(row)
    return rows, memory


# ----------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------


_ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile")  # what decides the GEMM kernels' speed


def _cpu_name() -> str:
    """'model name' of /proc/cpuinfo and the vector extensions that matter here, e.g. 'Intel(R) Xeon(R)
    Processor (avx2 fma avx512f avx512_bf16 amx_tile)': the project's machines have been AMD (AVX2) and Intel
    (AVX-512/AMX) CPUs of one marketing name or another, whose ratios differ."""
    name, flags = None, set()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name") and name is None:
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    name = name or platform.processor() or "unknown CPU"
    present = [flag for flag in _ISA_FLAGS if flag in flags]
    return f"{name} ({' '.join(present)})" if present else name


def _versions() -> str:
    parts = [f"python {platform.python_version()}", f"numpy {np.__version__}"]
    for module in ("torch", "tensorflow", "keras", "tf_keras", "transformers"):
        mod = sys.modules.get(module)
        if mod is not None:
            parts.append(f"{module} {getattr(mod, '__version__', '?')}")
    return ", ".join(parts)


WORKLOAD_TITLES = {
    "1": "forward + segmentation, 4 img x 8 texts (77)",
    "2": "image features, 16 images",
    "3": "text features, 64 texts padded to 77",
    "3b": "text features, 64 texts of 77 tokens",
    "4": "segment 1 image, 20 cached classes",
    "4b": "forward + segmentation, 1 img x 20 texts",
    "5": "from_pretrained to first output",
}


def format_table(rows: Sequence[Row]) -> str:
    lines = ["| framework | workload | GFLOP | reference | ours | ours / ref | ref % matmul | ours % matmul "
             "| max abs diff | TF ours / PT ours |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|---:|"]
    for row in rows:
        unit, scale = ("s", 1.0) if row.workload == "5" else ("ms", 1e3)
        ratio = row.ours_s / row.ref_s
        if row.workload == "5" or np.isnan(row.matmul_gflops):
            ref_pct = ours_pct = "-"
        else:
            ref_pct = f"{100 * row.flops / row.ref_s / 1e9 / row.matmul_gflops:.0f}%"
            ours_pct = f"{100 * row.flops / row.ours_s / 1e9 / row.matmul_gflops:.0f}%"
        diff = "-" if np.isnan(row.max_diff) else f"{row.max_diff:.1e}{'' if row.agree else ' (DISAGREE)'}"
        fmt = "{:.2f}" if unit == "s" else "{:.0f}"
        lines.append(
            f"| {'PyTorch' if row.framework == 'pt' else 'TensorFlow'} | {row.workload}: "
            f"{WORKLOAD_TITLES[row.workload]} | {row.flops / 1e9:.1f} | {fmt.format(row.ref_s * scale)} {unit} "
            f"| {fmt.format(row.ours_s * scale)} {unit} | **{ratio:.2f}** | {ref_pct} | {ours_pct} | {diff} "
            f"| {'-' if np.isnan(row.ours_pt_s) else f'{row.ours_s / row.ours_pt_s:.2f}'} |")
    return "\n".join(lines)


def format_memory(memory: Dict[str, Any]) -> str:
    lines = ["| implementation | after imports | after load + first output | peak (load + workloads 1-4) |",
             "|---|---:|---:|---:|"]
    for impl in ("pt-ref", "pt-ours", "tf-ref", "tf-ours"):
        if impl in memory:
            m = memory[impl]
            lines.append(f"| {impl} | {m['rss_imports_mb']:.0f} MB | {m['rss_load_mb']:.0f} MB "
                         f"| {m.get('rss_peak_mb', float('nan')):.0f} MB |")
    return "\n".join(lines)


def report(rows: Sequence[Row], memory: Dict[str, Any], args, loads: Tuple[str, str], started: str,
           seconds: float) -> str:
    matmul = [r.matmul_gflops for r in rows if not np.isnan(r.matmul_gflops)]
    command = "/work/refvenv/bin/python tools/bench.py " + " ".join(args.argv)
    text = [
        f"Run {started} ({seconds / 60:.0f} min): `{command.strip()}`",
        "",
        f"- CPU: {_cpu_name()}, {os.cpu_count()} cores; threads: {args.threads} (torch and TensorFlow)",
        f"- load average (1, 5, 15 min) before: {loads[0]}; after: {loads[1]}",
        f"- {_versions()}",
        f"- matmul throughput ({MATMUL_SIZE}^3 float32, torch, median of the probes taken between rounds): "
        + (f"{statistics.median(matmul):.1f} GFLOP/s (range {min(matmul):.1f}-{max(matmul):.1f})" if matmul
           else "not measured"),
        f"- medians of {args.repeats} interleaved rounds after {args.warmup} warm-up rounds "
        f"(workload 5: {args.load_repeats} child processes per side)",
        "",
        format_table(rows),
    ]
    if memory:
        text += ["", "Peak resident memory (VmHWM of one child process per implementation):", "",
                 format_memory(memory)]
    return "\n".join(text) + "\n"


def load_average() -> str:
    with contextlib.suppress(OSError):
        return ", ".join(f"{v:.2f}" for v in os.getloadavg())
    return "unknown"


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frameworks", nargs="+", choices=FRAMEWORKS, default=list(FRAMEWORKS))
    parser.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS))
    parser.add_argument("--repeats", type=int, default=7, help="timed interleaved rounds (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds after the first call")
    parser.add_argument("--load-repeats", type=int, default=5,
                        help="child processes per side for workload 5 (the median; an odd count)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--write", metavar="PATH", help="write the report (markdown) to PATH")
    parser.add_argument("--json", metavar="PATH", help="write every sample as JSON to PATH")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--ckpt", help=argparse.SUPPRESS)
    parser.add_argument("--child-memory", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.argv = argv
    if args.child:
        return child_main(args.child, args.ckpt, args.threads, args.child_memory)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if "tf" not in args.frameworks:
        os.environ["USE_TF"] = "0"

    started = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    start, load_before = time.perf_counter(), load_average()
    rows: List[Row] = []
    memory: Dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="groupvit-bench-") as ckpt:
        config = make_checkpoint(ckpt)
        inputs = make_inputs(config)
        _torch_setup(args.threads)
        probe = matmul_probe()
        names = [w for w in WORKLOADS if w in args.workloads]
        ours_pt = None
        if "pt" in args.frameworks and "tf" in args.frameworks:
            # TF rows also time our PyTorch model in the same rounds: "within 1.25x of our PyTorch time".
            ours_pt = pt_workloads(load_model("pt-ours", ckpt), inputs, ours=True)
        for framework in args.frameworks:
            rows += bench_framework(framework, names, ckpt, config, inputs, args, probe,
                                    ours_pt if framework == "tf" else None)
            _save_json(args, rows, memory, started)
        if "5" in names:
            load_rows, memory = bench_loading(args.frameworks, ckpt, config, inputs, args)
            rows += load_rows
    text = report(rows, memory, args, (load_before, load_average()), started, time.perf_counter() - start)
    print()
    print(text)
    if args.write:
        from groupvit_core.io_utils import atomic_write_text

        atomic_write_text(args.write, text)
    _save_json(args, rows, memory, started)
    return 0


def _save_json(args, rows: Sequence[Row], memory: Dict[str, Any], started: str) -> None:
    if args.json:
        from groupvit_core.io_utils import atomic_write_text

        atomic_write_text(args.json, json.dumps({
            "rows": [row.__dict__ for row in rows], "memory": memory, "started": started}, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
