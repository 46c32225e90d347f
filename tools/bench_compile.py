#!/usr/bin/env python3
"""torch.compile of block reconstruction's learning steps (--reconstruct-compile) against eager, side by side.

For each model the pipeline makes the learning samples and grids once (`--bits 4 --act-bits A --reconstruct`, the
defaults otherwise, with --samples samples) and saves what the reconstruction engine receives. The engine then
runs on those very inputs in a fresh process per configuration: eager and compiled, each at two step counts, so
that a straight line through the two wall times splits the cost into a fixed part (the forward passes over all
samples between blocks, plus compiling, cold: inductor's caches are off) and a per-step part. Peak RSS is the
process's. Written to
tools/results/compile_<device>.md/json.

    python tools/bench_compile.py                               # ResNet-20 W4A4, MobileNet-V1 and Lite0 W4A8
    python tools/bench_compile.py --only mobilenet_v1_0.75 --steps 20 120
    python tools/bench_compile.py --device cuda                 # on a GPU (compiled: also CUDA graphs)
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ASSETS = Path(os.environ.get("ONNXDFQ_ASSETS", ROOT.parent / "shared" / "assets"))
MODELS = {  # name: (model, act bits, preprocessing keywords)
    "resnet20": ("cifar10/resnet20.onnx", 4, {"preprocess": "imagenet"}),
    "mobilenet_v1_0.75": ("imagenet/mobilenet_v1_0.75.onnx", 8, {"preprocess": "inception"}),
    "efficientnet_lite0": ("imagenet/efficientnet_lite0.onnx", 8, {"mean": [0.498] * 3, "std": [0.502] * 3}),
}


# every compiled run compiles from scratch, as a user's first run does: with inductor's on-disk caches the second
# run of two reuses the first one's kernels and the line through their wall times breaks. Turning the graph caches
# off is not enough (the compiled C++ kernels stay cached: Lite0 came out at -1160 ms a step), so each run gets an
# empty cache directory of its own
def cold_env(cache_dir: str) -> dict:
    return {**os.environ, "TORCHINDUCTOR_FX_GRAPH_CACHE": "0", "TORCHINDUCTOR_AUTOGRAD_CACHE": "0",
            "TORCHINDUCTOR_CACHE_DIR": cache_dir}


def capture(name: str, samples: int, path: Path, device: str) -> None:
    """Run the pipeline up to the engine (one step) and pickle the engine's inputs."""
    import onnxdfq
    from onnxdfq.synth import reconstruct as rec

    model, act_bits, pre = MODELS[name]
    seen: dict = {}
    engine = rec.reconstruct

    def spy(fp_model, quant_model, samples_, weights, acts, **kwargs):
        seen["args"] = (fp_model.SerializeToString(), quant_model.SerializeToString(), samples_, weights, acts)
        return engine(fp_model, quant_model, samples_, weights, acts, **kwargs)

    rec.reconstruct = spy
    onnxdfq.quantize_model(str(ASSETS / model), bits=4, act_bits=act_bits, check=False, reconstruct=True,
                           reconstruct_steps=1, reconstruct_samples=samples, device=device, **pre)
    path.write_bytes(pickle.dumps(seen["args"]))


def run_engine(path: Path, steps: int, compiled: bool, device: str) -> dict:
    """One engine run on the captured inputs (in this process): wall, loss, peak RSS."""
    import onnx

    from onnxdfq.synth import reconstruct as rec

    fp, quant, samples, weights, acts = pickle.loads(path.read_bytes())
    options = rec.ReconstructOptions(steps=steps, compile=compiled, device=device, input_mix=0.5)
    start = time.perf_counter()
    result = rec.reconstruct(onnx.load_from_string(fp), onnx.load_from_string(quant), samples, weights, acts,
                             options=options)
    wall = time.perf_counter() - start
    return {"seconds": wall, "compiled": result.compiled, "error": result.compile_error,
            "blocks": len(result.blocks), "loss_after": sum(b.loss_after for b in result.blocks),
            "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def measure(name: str, path: Path, steps: tuple[int, int], device: str) -> dict:
    row: dict = {"model": name}
    for compiled in (False, True):
        runs = []
        for count in steps:
            with tempfile.TemporaryDirectory() as cache:
                out = subprocess.run([sys.executable, __file__, "--engine", str(path), "--steps", str(count),
                                      str(count), "--device", device] + (["--compiled"] if compiled else []),
                                     capture_output=True, text=True, check=True, env=cold_env(cache))
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        per_step = (runs[1]["seconds"] - runs[0]["seconds"]) / (steps[1] - steps[0])
        fixed = runs[0]["seconds"] - per_step * steps[0]
        key = "compiled" if compiled else "eager"
        row[key] = {"runs": runs, "step_ms_all_blocks": 1000 * per_step, "fixed_s": fixed,
                    "peak_mb": max(r["peak_mb"] for r in runs)}
        print(f"{name} {key}: {1000 * per_step:.0f} ms a step over {runs[0]['blocks']} blocks, fixed {fixed:.0f} s, "
              f"peak {row[key]['peak_mb']:.0f} MB", flush=True)
    eager, comp = row["eager"], row["compiled"]
    row["speedup"] = eager["step_ms_all_blocks"] / comp["step_ms_all_blocks"]
    # the step count a block from which compiling pays for itself
    gain = (eager["step_ms_all_blocks"] - comp["step_ms_all_blocks"]) / 1000
    row["break_even_steps"] = (comp["fixed_s"] - eager["fixed_s"]) / gain if gain > 0 else None
    return row


def write(rows: list[dict], device: str, steps: tuple[int, int], samples: int) -> None:
    out = ROOT / "tools" / "results"
    (out / f"compile_{device}.json").write_text(json.dumps(rows, indent=1))
    lines = [f"Learning steps eager vs torch.compile ({device}, {os.environ.get('OMP_NUM_THREADS', 'all')} "
             f"threads, {samples} samples, {steps[0]} and {steps[1]} steps a block; tools/bench_compile.py)", "",
             "| model | blocks | eager ms a step (all blocks) | compiled | speed-up | compiling + fixed s, eager / "
             "compiled | break-even steps a block | peak MB eager / compiled | 1000 steps a block, eager / compiled |",
             "|---|---:|---:|---:|---:|---|---:|---|---|"]
    for row in rows:
        e, c = row["eager"], row["compiled"]
        at = [x["fixed_s"] + x["step_ms_all_blocks"] for x in (e, c)]  # 1000 steps: ms a step = s per 1000
        even = f"{row['break_even_steps']:.0f}" if row["break_even_steps"] is not None else "never"
        lines.append(f"| {row['model']} | {e['runs'][0]['blocks']} | {e['step_ms_all_blocks']:.0f} | "
                     f"{c['step_ms_all_blocks']:.0f} | {row['speedup']:.2f}x | "
                     f"{e['fixed_s']:.0f} / {c['fixed_s']:.0f} | "
                     f"{even} | {e['peak_mb']:.0f} / {c['peak_mb']:.0f} | {at[0]:.0f} s / {at[1]:.0f} s |")
    (out / f"compile_{device}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", choices=sorted(MODELS), default=None)
    parser.add_argument("--steps", nargs=2, type=int, default=(20, 120), metavar=("FEW", "MANY"))
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--engine", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--compiled", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.engine is not None:  # a child: one engine run
        print(json.dumps(run_engine(args.engine, args.steps[0], args.compiled, args.device)))
        return
    steps = (args.steps[0], args.steps[1])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.only or list(MODELS):
            path = Path(tmp) / f"{name}.pkl"
            capture(name, args.samples, path, args.device)
            rows.append(measure(name, path, steps, args.device))
    write(rows, args.device, steps, args.samples)


if __name__ == "__main__":
    main()
