"""Train several recipes side by side (one process each) and tabulate their mIoU: the recipe search behind
RESULTS_TRAINING.md, sized for a machine with a GPU or many cores.

Maintainer script, run by hand (never as a test):

    python tools/sweep_training.py --spec SPEC.json --out runs/sweep --device cuda --parallel 12 --deadline 420

SPEC.json maps a run name to ``{"variant": NAME, "arch": {...}, "options": {...}}``: a recipe of
groupvit_pt.training.VARIANTS, overrides of its builtin_model_config arguments, and TrainConfig overrides (steps,
seed, pixel_weight, ...). Each run is ``train_synthetic(OUT/NAME, ...)`` in its own process with one CPU thread,
writing OUT/NAME/result.json, log.txt and history.json. At ``--deadline`` seconds the runs still going are stopped;
their rows show the mIoU measured so far (``eval_every`` in the log). The table goes to stdout and OUT/summary.md,
the numbers to OUT/summary.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

EVAL_LINE = re.compile(r"^step (\d+): loss ([0-9.]+) mIoU ([0-9.]+)")


def load_spec(path: str) -> Dict[str, Dict[str, Any]]:
    with open(path, encoding="utf-8") as handle:
        spec = json.load(handle)
    if not isinstance(spec, dict) or not spec:
        raise ValueError(f"{path}: expected a non-empty JSON object of runs")
    for name, run in spec.items():
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise ValueError(f"{path}: run name {name!r} must be letters, digits, '.', '_' or '-'")
        if not isinstance(run, dict) or set(run) - {"variant", "arch", "options"}:
            raise ValueError(f"{path}: run {name!r} takes only 'variant', 'arch' and 'options'")
        if "eval_count" in run.get("options", {}):
            raise ValueError(f"{path}: run {name!r}: the final evaluation's size is --eval-count (the evaluations "
                             "during training use 100 scenes)")
    return spec


def run_one(name: str, run: Dict[str, Any], out: str, device: Optional[str], eval_count: int) -> int:
    import torch

    from groupvit_pt.training import train_synthetic

    torch.set_num_threads(1)
    options = dict(run.get("options", {}))
    train_synthetic(os.path.join(out, name), variant=run.get("variant", "unif_pool"), eval_count=eval_count,
                    device=device, progress=False, arch=run.get("arch"), **options)
    return 0


def summarise(out: str, spec: Dict[str, Dict[str, Any]], status: Dict[str, str]) -> List[Dict[str, Any]]:
    rows = []
    for name, run in spec.items():
        row: Dict[str, Any] = {"name": name, "variant": run.get("variant", "unif_pool"), "arch": run.get("arch", {}),
                               "options": run.get("options", {}), "status": status.get(name, "not started"),
                               "curve": []}
        log = os.path.join(out, name, "log.txt")
        if os.path.isfile(log):
            with open(log, encoding="utf-8") as handle:
                for line in handle:
                    match = EVAL_LINE.match(line.strip())
                    if match:
                        row["curve"].append((int(match.group(1)), float(match.group(3))))
        result = os.path.join(out, name, "result.json")
        if os.path.isfile(result):
            with open(result, encoding="utf-8") as handle:
                data = json.load(handle)
            row.update(steps=data.get("steps"), train_seconds=data.get("train_seconds"),
                       miou=(data.get("miou") or {}).get("miou"),
                       patch=(data.get("miou_patch_ablation") or {}).get("miou"),
                       random=(data.get("miou_random_weights") or {}).get("miou"))
        rows.append(row)
    return rows


def table(rows: List[Dict[str, Any]]) -> str:
    lines = ["| run | change | status | steps (s) | mIoU during training (100 scenes) | final mIoU | patch ablation |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        settings = list(row["arch"].items()) + list(row["options"].items())
        change = ", ".join(f"{k}={v}" for k, v in settings)
        curve = ", ".join(f"{m:.3f} @{s}" for s, m in row["curve"]) or "-"
        steps = f"{row['steps']} ({row['train_seconds']:.0f})" if row.get("steps") else "-"
        final = f"**{row['miou']:.3f}**" if row.get("miou") is not None else "-"
        patch = f"{row['patch']:.3f}" if row.get("patch") is not None else "-"
        lines.append(f"| {row['name']} | {row['variant']}{': ' + change if change else ''} | {row['status']} | "
                     f"{steps} | {curve} | {final} | {patch} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", required=True, help="JSON file of runs (see the module docstring)")
    parser.add_argument("--out", required=True, help="directory of the runs")
    parser.add_argument("--device", default=None, help="torch device of every run (default cpu)")
    parser.add_argument("--parallel", type=int, default=2, help="runs at a time")
    parser.add_argument("--deadline", type=float, default=None, help="stop what still runs after S seconds")
    parser.add_argument("--eval-count", type=int, default=200, help="test scenes of each run's final mIoU")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run this one spec entry in this process
    args = parser.parse_args(argv)
    spec = load_spec(args.spec)
    if args.one:
        return run_one(args.one, spec[args.one], args.out, args.device, args.eval_count)
    if args.parallel < 1:
        parser.error("--parallel must be at least 1")
    os.makedirs(args.out, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    pending = list(spec)
    running: Dict[str, subprocess.Popen] = {}
    status: Dict[str, str] = {}
    started = time.monotonic()
    while pending or running:
        out_of_time = args.deadline is not None and time.monotonic() - started > args.deadline
        while pending and len(running) < args.parallel and not out_of_time:
            name = pending.pop(0)
            os.makedirs(os.path.join(args.out, name), exist_ok=True)
            command = [sys.executable, os.path.abspath(__file__), "--spec", args.spec, "--out", args.out,
                       "--eval-count", str(args.eval_count), "--one", name]
            if args.device:
                command += ["--device", args.device]
            with open(os.path.join(args.out, name, "stderr.txt"), "w", encoding="utf-8") as err:
                running[name] = subprocess.Popen(command, stdout=err, stderr=subprocess.STDOUT, env=env,
                                                 start_new_session=True)
            status[name] = "running"
            print(f"[{time.monotonic() - started:6.0f}s] started {name}", flush=True)
        if out_of_time:
            for name, process in running.items():
                os.killpg(process.pid, signal.SIGTERM)
                process.wait()
                status[name] = f"stopped at {args.deadline:.0f}s"
            for name in pending:
                status[name] = "not started (deadline)"
            running.clear()
            pending.clear()
            break
        for name, process in list(running.items()):
            code = process.poll()
            if code is not None:
                status[name] = "done" if code == 0 else f"failed ({code})"
                del running[name]
                print(f"[{time.monotonic() - started:6.0f}s] {name}: {status[name]}", flush=True)
        time.sleep(1.0)
    rows = summarise(args.out, spec, status)
    text = table(rows)
    print(text)
    from groupvit_core.io_utils import atomic_write_text

    atomic_write_text(os.path.join(args.out, "summary.md"), text)
    atomic_write_text(os.path.join(args.out, "summary.json"), json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
