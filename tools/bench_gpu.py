"""The BENCHMARKS.md table on a CUDA GPU, in float32 and bfloat16: groupvit_pt against transformers' GroupViT.

Maintainer script, run by hand on a machine with a GPU (never as a test):

    python tools/bench_gpu.py [--dtypes float32 bfloat16] [--workloads 1 2 3 3b 4b] [--repeats 20]
                              [--compile] [--write PATH] [--device cpu]   # cpu: a dry run of the script

Same checkpoint, inputs, workloads and FLOP counts as tools/bench.py (workload 4, our NVlabs segmenter, and
workload 5, loading, are CPU-side stories and are left out). The reference is ``transformers.GroupViTModel`` when
the installed transformers still has it (4.57.6 is the reference version; the row says which one ran) and is
skipped otherwise. Each implementation is moved to the GPU in the given dtype; float32 runs with TF32 matmuls
off (exact float32, as the CPU table). Timing: CUDA events around each call after a synchronise, interleaved
ours / reference, ``--warmup`` untimed rounds then the median of ``--repeats``. The "% of matmul" column is the
workload's FLOPs per second over the median throughput of an 8192^3 product in the same dtype, measured between
rounds. bfloat16 rows compare ours with the reference in bfloat16, so their max |diff| is bfloat16 noise;
``--compile`` adds rows for torch.compile(ours).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import statistics
import sys
import tempfile
from typing import Any, Callable, Dict, List, Optional

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.environ.setdefault("USE_TF", "0")


def _bench_module():
    spec = importlib.util.spec_from_file_location("groupvit_bench", os.path.join(ROOT, "tools", "bench.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


bench = _bench_module()
GPU_WORKLOADS = ("1", "2", "3", "3b", "4b")
MATMUL_SIZE = 8192


def _workloads(model, inputs: Dict[str, Any], ours: bool, device, dtype) -> Dict[str, Callable[[], Any]]:
    import torch

    t = {}
    for key, value in inputs.items():
        if isinstance(value, np.ndarray) and key.endswith(("_ids", "_mask", "_pixels")):
            tensor = torch.from_numpy(value).to(device)
            t[key] = tensor.to(dtype) if key.endswith("_pixels") else tensor
    if ours:
        return {
            "1": lambda: model(t["w1_ids"], t["w1_pixels"], attention_mask=t["w1_mask"],
                               output_segmentation=True).segmentation_logits,
            "2": lambda: model.get_image_features(t["w2_pixels"]),
            "3": lambda: model.get_text_features(t["w3_ids"], attention_mask=t["w3_mask"]),
            "3b": lambda: model.get_text_features(t["w3b_ids"], attention_mask=t["w3b_mask"]),
            "4b": lambda: model(t["w4_ids"], t["w4_pixels"], attention_mask=t["w4_mask"],
                                output_segmentation=True).segmentation_logits,
        }
    return {
        "1": lambda: model(input_ids=t["w1_ids"], pixel_values=t["w1_pixels"], attention_mask=t["w1_mask"],
                           output_segmentation=True).segmentation_logits,
        "2": lambda: model.get_image_features(pixel_values=t["w2_pixels"]),
        "3": lambda: model.get_text_features(input_ids=t["w3_ids"], attention_mask=t["w3_mask"]),
        "3b": lambda: model.get_text_features(input_ids=t["w3b_ids"], attention_mask=t["w3b_mask"]),
        "4b": lambda: model(input_ids=t["w4_ids"], pixel_values=t["w4_pixels"], attention_mask=t["w4_mask"],
                            output_segmentation=True).segmentation_logits,
    }


def _features(result: Any) -> Any:
    """get_*_features returns a tensor in ours and in transformers 4.x, an output object in later versions."""
    return result if hasattr(result, "float") else result.pooler_output


def _time(fn: Callable[[], Any], cuda: bool = True) -> float:
    import time

    import torch

    if not cuda:  # --device cpu: a dry run of the script, wall clock
        start_time = time.perf_counter()
        fn()
        return time.perf_counter() - start_time
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    parser.add_argument("--workloads", nargs="+", default=list(GPU_WORKLOADS), choices=GPU_WORKLOADS)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile(ours)")
    parser.add_argument("--write", metavar="PATH", help="write the markdown report to PATH")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                        help="cpu: a dry run of the script without a GPU (timings are not the table's)")
    args = parser.parse_args(argv)

    import torch

    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        print("no CUDA device: nothing to measure (--device cpu runs the script as a dry run)")
        return 1
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device = torch.device(args.device)
    matmul_size = MATMUL_SIZE if cuda else 1024
    timer = lambda fn: _time(fn, cuda)  # noqa: E731
    try:
        import transformers

        reference_class = getattr(transformers, "GroupViTModel", None)
        reference_version = transformers.__version__
    except Exception as error:  # not installed, or an install that does not import: run ours alone
        print(f"reference not available: {error!r}")
        reference_class, reference_version = None, None

    from groupvit_pt import GroupViTModel

    lines = [
        f"GPU run {datetime.datetime.now():%Y-%m-%d %H:%M}: `python tools/bench_gpu.py {' '.join(argv or sys.argv[1:])}`",
        "",
        f"- GPU: {torch.cuda.get_device_name() if cuda else 'none (--device cpu dry run)'}; "
        f"torch {torch.__version__}; reference: "
        + (f"transformers {reference_version}" if reference_class is not None else "not available (skipped)"),
        f"- medians of {args.repeats} interleaved rounds after {args.warmup} warm-up rounds "
        + ("(CUDA events)" if cuda else "(wall clock)"),
        "",
        "| dtype | workload | GFLOP | reference | ours | ours / ref | ref % matmul | ours % matmul | max abs diff |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    with tempfile.TemporaryDirectory(prefix="groupvit-bench-gpu-") as ckpt:
        config = bench.make_checkpoint(ckpt)
        inputs = bench.make_inputs(config)
        flops = bench.workload_flops(config, inputs)
        for dtype_name in args.dtypes:
            dtype = getattr(torch, dtype_name)
            a = torch.randn(matmul_size, matmul_size, device=device, dtype=dtype)
            b = torch.randn(matmul_size, matmul_size, device=device, dtype=dtype)
            probe = lambda: 2 * matmul_size ** 3 / timer(lambda: torch.mm(a, b)) / 1e9  # noqa: E731
            probe()
            ours_model = GroupViTModel.from_pretrained(ckpt).to(device=device, dtype=dtype)
            implementations = {"ours": _workloads(ours_model, inputs, True, device, dtype)}
            if args.compile:
                compiled = torch.compile(ours_model)
                implementations["ours+compile"] = _workloads(compiled, inputs, True, device, dtype)
            if reference_class is not None:
                ref_model = reference_class.from_pretrained(ckpt).to(device=device, dtype=dtype).eval()
                implementations["ref"] = _workloads(ref_model, inputs, False, device, dtype)
            for name in [w for w in GPU_WORKLOADS if w in args.workloads]:
                samples: Dict[str, List[float]] = {key: [] for key in implementations}
                matmul: List[float] = []
                with torch.inference_mode():
                    outputs = {key: _features(fns[name]()).float().cpu().numpy()
                               for key, fns in implementations.items()}
                    for round_index in range(args.warmup + args.repeats):
                        keys = list(implementations)
                        for key in keys if round_index % 2 == 0 else reversed(keys):
                            elapsed = timer(implementations[key][name])
                            if round_index >= args.warmup:
                                samples[key].append(elapsed)
                        if round_index >= args.warmup:
                            matmul.append(probe())
                ceiling = statistics.median(matmul)
                medians = {key: statistics.median(values) for key, values in samples.items()}
                for key in [k for k in implementations if k.startswith("ours")]:
                    ref = medians.get("ref", float("nan"))
                    diff = (float(np.max(np.abs(outputs[key] - outputs["ref"]))) if "ref" in outputs
                            else float("nan"))
                    row = (f"| {dtype_name} | {name}: {bench.WORKLOAD_TITLES[name]}{' (compiled)' if '+' in key else ''}"
                           f" | {flops[name] / 1e9:.1f} | {ref * 1e3:.2f} ms | {medians[key] * 1e3:.2f} ms "
                           f"| **{medians[key] / ref:.2f}** | {100 * flops[name] / ref / 1e9 / ceiling:.1f}% "
                           f"| {100 * flops[name] / medians[key] / 1e9 / ceiling:.1f}% | {diff:.1e} |")
                    print(row, flush=True)
                    lines.append(row)
            lines.append(f"| {dtype_name} | matmul {matmul_size}^3 | | | | | {ceiling / 1e3:.0f} TFLOP/s | | |")
            del implementations, ours_model
            if cuda:
                torch.cuda.empty_cache()
    text = "\n".join(lines) + "\n"
    print()
    print(text)
    if args.write:
        from groupvit_core.io_utils import atomic_write_text

        atomic_write_text(args.write, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
