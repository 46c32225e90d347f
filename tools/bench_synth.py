#!/usr/bin/env python3
"""Benchmark the synthetic-data generators (ZeroQ, DSG, DFFG) on the shared models.

    python tools/bench_synth.py [--device cpu|cuda] [--n 256] [--mobilenet] [--out tools/results]
                                [--methods zeroq,dsg,dffg] [--set zeroq.lr=0.2 ...]

For every model and method: wall time to generate ``n`` samples with the method's defaults,
the number of forward+backward passes, ``bn_statistics_loss`` over the generated set, and how
long the *first batch* took to reach ZeroQ's final batch loss (the per-step batch loss comes
from the ``progress`` callback, which every generator reports in the same units). Gaussian
noise (and, for CIFAR, 256 real training images) are listed for scale. Writes
``synth_bench_<device>.md`` and ``.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxdfq import synth

ASSETS = Path(os.environ.get("ONNXDFQ_ASSETS", Path(__file__).resolve().parents[2] / "shared" / "assets"))
MODELS = {
    "resnet20": ASSETS / "cifar10" / "resnet20.onnx",
    "mobilenet_v1": ASSETS / "imagenet" / "mobilenet_v1_0.75.onnx",
}
CIFAR_MEAN, CIFAR_STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


def _parse_overrides(items: list[str]) -> dict[str, dict[str, float]]:
    """``["zeroq.lr=0.2", "dffg.steps=60"]`` -> ``{"zeroq": {"lr": 0.2}, "dffg": {"steps": 60}}``."""
    overrides: dict[str, dict[str, float]] = {}
    for item in items:
        key, value = item.split("=", 1)
        method, option = key.split(".", 1)
        overrides.setdefault(method, {})[option] = int(value) if value.lstrip("-").isdigit() else float(value)
    return overrides


def _real_cifar(n: int) -> np.ndarray | None:
    path = ASSETS / "cifar10" / "train5000.npz"
    if not path.exists():
        return None
    images = np.load(path)["x"][:n].astype(np.float32) / 255.0
    return ((images - CIFAR_MEAN) / CIFAR_STD).transpose(0, 3, 1, 2).astype(np.float32)


def run_method(
    model: onnx.ModelProto, method: str, args: argparse.Namespace, options: dict[str, float]
) -> dict[str, Any]:
    """Generate ``args.n`` samples; return timings, losses and the per-step trajectory."""
    trajectory: list[tuple[int, float, float]] = []  # (global step, seconds since start, batch loss)
    start = time.perf_counter()

    def progress(step: int, total: int, loss: float) -> None:
        trajectory.append((step, time.perf_counter() - start, loss))

    samples = synth.generate(model, method, args.n, batch_size=args.batch_size, seed=args.seed,
                             device=args.device, progress=progress, **options)
    wall = time.perf_counter() - start
    steps = synth.get_generator(method).default_steps if "steps" not in options else int(options["steps"])
    set_loss = synth.bn_statistics_loss(model, samples, device=args.device)
    return {
        "method": method,
        "options": options,
        "samples": int(samples.shape[0]),
        "steps_per_batch": steps,
        "passes": len(trajectory),
        "batches": len(trajectory) // steps,
        "wall_s": wall,
        "set_loss": set_loss,
        "first_batch_final_loss": trajectory[steps - 1][2],
        "first_batch": [(s, round(t, 4), loss) for s, t, loss in trajectory[:steps]],
    }


def time_to_reach(row: dict[str, Any], target: float) -> tuple[int | None, float | None]:
    """First step (and its time) at which the first batch's loss is at or below ``target``."""
    for step, seconds, loss in row["first_batch"]:
        if loss <= target:
            return step, seconds
    return None, None


def bench_model(name: str, args: argparse.Namespace, overrides: dict[str, dict[str, float]]) -> dict[str, Any]:
    model = onnx.load(str(MODELS[name]))
    size = synth.input_sample_shape(model)
    noise = np.random.default_rng(args.seed).standard_normal((args.n, *size)).astype(np.float32)
    baselines = {"gaussian noise": synth.bn_statistics_loss(model, noise, device=args.device)}
    real = _real_cifar(args.n) if name == "resnet20" else None
    if real is not None:
        baselines[f"real CIFAR-10 train ({len(real)})"] = synth.bn_statistics_loss(model, real, device=args.device)
    # Warm-up (thread pools, oneDNN kernels) so that the first method timed does not pay for it.
    synth.generate(model, args.methods[0], 2, batch_size=2, steps=2, device=args.device)
    rows = []
    for method in args.methods:
        rows.append(run_method(model, method, args, overrides.get(method, {})))
        print(f"{name} {method}: {rows[-1]['wall_s']:.1f} s, set loss {rows[-1]['set_loss']:.4g}", flush=True)
    zeroq = next((r for r in rows if r["method"] == "zeroq"), None)
    for row in rows:
        if zeroq is not None:
            row["target_loss"] = zeroq["first_batch_final_loss"]
            row["steps_to_target"], row["seconds_to_target"] = time_to_reach(row, row["target_loss"])
            row["speedup_vs_zeroq"] = zeroq["wall_s"] / row["wall_s"]
    return {"model": name, "baselines": baselines, "rows": rows}


def _fmt(value: float | None, spec: str) -> str:
    return "not reached" if value is None else format(value, spec)


def to_markdown(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [
        f"# Synthetic calibration data benchmark ({args.device})",
        "",
        f"`python tools/bench_synth.py {' '.join(sys.argv[1:])}` on {platform.machine()} "
        f"({os.cpu_count()} CPU cores), {args.n} samples per method, batch {args.batch_size}, seed {args.seed}, "
        "each method's default settings unless listed.",
        "BN loss = `bn_statistics_loss` (mean over BN layers of (||mu~ - mu||^2 + ||sigma~ - sigma||^2) / C) over the "
        "whole generated set. *To ZeroQ loss*: first step of the first batch whose batch loss is <= ZeroQ's final "
        "first-batch loss, and the seconds since `generate` was called.",
        "",
    ]
    for result in results:
        lines += [f"## {result['model']}", "", "| method | options | samples | steps x batches | fwd+bwd passes "
                  "| wall s | BN loss (set) | first-batch final loss | steps to ZeroQ loss | s to ZeroQ loss "
                  "| speed-up vs ZeroQ (wall) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for row in result["rows"]:
            options = ", ".join(f"{k}={v}" for k, v in row["options"].items()) or "defaults"
            lines.append(
                f"| {row['method']} | {options} | {row['samples']} | {row['steps_per_batch']} x {row['batches']} "
                f"| {row['passes']} | {row['wall_s']:.1f} | {row['set_loss']:.4g} "
                f"| {row['first_batch_final_loss']:.4g} "
                f"| {_fmt(row.get('steps_to_target'), 'd')} | {_fmt(row.get('seconds_to_target'), '.1f')} "
                f"| {_fmt(row.get('speedup_vs_zeroq'), '.1f')} |"
            )
        lines.append("")
        lines += [f"- {label}: BN loss {value:.4g}" for label, value in result["baselines"].items()]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--n", type=int, default=256, help="samples per method")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", default="zeroq,dsg,dffg", help="comma-separated; zeroq first gives the target")
    parser.add_argument("--mobilenet", action="store_true", help="also run MobileNet-V1 (slow on a CPU)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="METHOD.OPTION=VALUE")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args()
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    overrides = _parse_overrides(args.overrides)
    names = ["resnet20"] + (["mobilenet_v1"] if args.mobilenet else [])
    missing = [str(MODELS[n]) for n in names if not MODELS[n].exists()]
    if missing:
        raise SystemExit(f"missing shared assets: {missing}")
    results = [bench_model(name, args, overrides) for name in names]
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"synth_bench_{args.device}"
    stem.with_suffix(".md").write_text(to_markdown(results, args) + "\n")
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    stem.with_suffix(".json").write_text(json.dumps({"config": config, "results": results}, indent=1) + "\n")
    print(f"wrote {stem.with_suffix('.md')} and .json")


if __name__ == "__main__":
    main()
