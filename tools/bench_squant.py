"""Time squant_round on ResNet-18/50-shaped random weights against a plain copy of the same weights.

    python tools/bench_squant.py [--repeats 5] [--bits 4] [--out tools/results]

Writes squant_bench.md (a markdown table) and squant_bench.json to the output folder. The paper
reports 84 ms for ResNet-18 on an A100 (CUDA kernel); this is the numpy core on the CPU at hand.
"nearest" is round-to-nearest written the obvious way in numpy (divide, rint, clip, cast), for scale.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

from onnxdfq.passes.squant import squant_round
from onnxdfq.quant.qparams import weight_scale
from onnxdfq.quant.scheme import QuantScheme

PAPER_RESNET18_MS = 84.0  # SQuant paper, ResNet-18 on an A100
SEED = 0


def resnet18_shapes() -> list[tuple[int, ...]]:
    """Conv and fc weight shapes of torchvision's ResNet-18 (BasicBlock, [2, 2, 2, 2])."""
    shapes: list[tuple[int, ...]] = [(64, 3, 7, 7)]
    in_ch = 64
    for width in (64, 128, 256, 512):
        for block in range(2):
            shapes += [(width, in_ch, 3, 3), (width, width, 3, 3)]
            if block == 0 and in_ch != width:
                shapes.append((width, in_ch, 1, 1))
            in_ch = width
    return shapes + [(1000, 512)]


def resnet50_shapes() -> list[tuple[int, ...]]:
    """Conv and fc weight shapes of torchvision's ResNet-50 (Bottleneck, [3, 4, 6, 3])."""
    shapes: list[tuple[int, ...]] = [(64, 3, 7, 7)]
    in_ch = 64
    for width, blocks in zip((64, 128, 256, 512), (3, 4, 6, 3), strict=True):
        for block in range(blocks):
            shapes += [(width, in_ch, 1, 1), (width, width, 3, 3), (4 * width, width, 1, 1)]
            if block == 0:
                shapes.append((4 * width, in_ch, 1, 1))
            in_ch = 4 * width
    return shapes + [(1000, 2048)]


def make_weights(shapes: list[tuple[int, ...]], seed: int = SEED) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal(shape) * np.sqrt(2.0 / np.prod(shape[1:]))).astype(np.float32)
            for shape in shapes]


def _timed(work) -> tuple[float, float]:
    """(wall ms, process CPU ms) of one call; CPU time is steadier on a shared machine."""
    wall, cpu = time.perf_counter(), time.process_time()
    work()
    return (time.perf_counter() - wall) * 1e3, (time.process_time() - cpu) * 1e3


def time_model(weights: list[np.ndarray], scheme: QuantScheme, repeats: int) -> dict[str, float]:
    """Best-of-`repeats` times (ms) of SQuant over all layers and of np.copy of the same arrays."""
    scales = [weight_scale(w, scheme) for w in weights]

    def run_squant() -> None:
        for w, scale in zip(weights, scales, strict=True):
            squant_round(w, scale, scheme.qmin, scheme.qmax)

    def run_squant_serial() -> None:
        for w, scale in zip(weights, scales, strict=True):
            squant_round(w, scale, scheme.qmin, scheme.qmax, threads=1)

    def run_copy() -> None:
        for w in weights:
            np.copy(w)

    def run_nearest() -> None:  # round to nearest as one would write it in numpy, for scale
        for w, scale in zip(weights, scales, strict=True):
            x = w / scale.reshape((-1,) + (1,) * (w.ndim - 1))
            np.clip(np.rint(x), scheme.qmin, scheme.qmax).astype(np.int8)

    squant, serial, copy, nearest = [], [], [], []
    for _ in range(repeats):  # interleaved, so load changes hit all alike
        squant.append(_timed(run_squant))
        serial.append(_timed(run_squant_serial))
        copy.append(_timed(run_copy))
        nearest.append(_timed(run_nearest))
    squant, serial, copy, nearest = np.array(squant), np.array(serial), np.array(copy), np.array(nearest)
    return {"squant_ms": squant[:, 0].min(), "squant_ms_median": float(np.median(squant[:, 0])),
            "squant_cpu_ms": squant[:, 1].min(), "serial_ms": serial[:, 0].min(),
            "serial_ms_median": float(np.median(serial[:, 0])),
            "serial_cpu_ms": serial[:, 1].min(), "copy_ms": copy[:, 0].min(),
            "copy_ms_median": float(np.median(copy[:, 0])), "copy_cpu_ms": copy[:, 1].min(),
            "nearest_ms": nearest[:, 0].min()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args()

    scheme = QuantScheme(args.bits)
    rows = []
    for model, shapes in (("ResNet-18", resnet18_shapes()), ("ResNet-50", resnet50_shapes())):
        weights = make_weights(shapes)
        squant_round(weights[1], weight_scale(weights[1], scheme), scheme.qmin, scheme.qmax)  # warm-up
        timing = time_model(weights, scheme, args.repeats)
        rows.append({"model": model, "layers": len(weights), "params": int(sum(w.size for w in weights)),
                     **{key: float(value) for key, value in timing.items()},
                     "ratio": float(timing["squant_ms"] / timing["copy_ms"])})

    cpu = platform.processor() or platform.machine()
    load = os.getloadavg()[0]
    lines = [f"SQuant ({args.bits}-bit per-channel, stages e+k+c), wall time, best (and median) of {args.repeats}; "
             f"{cpu}, {os.cpu_count()} CPU(s), load average {load:.1f} (other jobs inflate times), "
             f"numpy {np.__version__}. "
             f"Paper: {PAPER_RESNET18_MS:.0f} ms for ResNet-18 on an A100.", "",
             "| model | params | squant ms (threads) | median | squant ms (1 thread) | median "
             "| nearest ms (numpy one-liner) | copy ms | ratio to copy |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['model']} | {r['params'] / 1e6:.2f}M | {r['squant_ms']:.1f} | {r['squant_ms_median']:.1f} "
              f"| {r['serial_ms']:.1f} | {r['serial_ms_median']:.1f} | {r['nearest_ms']:.1f} "
              f"| {r['copy_ms']:.2f} | {r['ratio']:.0f}x |" for r in rows]
    lines += ["", "Process CPU time, best of the same runs: "
              + "; ".join(f"{r['model']} squant {r['squant_cpu_ms']:.1f} ms, copy {r['copy_cpu_ms']:.2f} ms"
                          for r in rows) + "."]
    table = "\n".join(lines) + "\n"
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "squant_bench.md").write_text(table)
    meta = {"bits": args.bits, "repeats": args.repeats, "seed": SEED, "cpus": os.cpu_count(),
            "load_average": load, "numpy": np.__version__, "paper_resnet18_ms": PAPER_RESNET18_MS,
            "rows": rows}
    (args.out / "squant_bench.json").write_text(json.dumps(meta, indent=2) + "\n")


if __name__ == "__main__":
    main()
