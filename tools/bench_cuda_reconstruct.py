#!/usr/bin/env python3
"""Block reconstruction on a GPU through the CLI: `--device cuda`, eager against `--reconstruct-compile` (CUDA graphs).

Each row is one `onnxdfq quantize MODEL --bits 4 --act-bits A --reconstruct --device DEVICE [--reconstruct-compile]`
in a fresh process with an empty inductor cache (a user's first run), the defaults otherwise unless --steps is
given. Recorded: wall time; from the report, the sample generation, reconstruction seconds and whether the steps
really ran compiled; peak RSS; peak GPU memory (nvidia-smi sampled every 0.2 s, all processes); top-1 of the written
file (`onnxdfq eval`, onnxruntime on the CPU). Rows go to OUT/cuda_reconstruct.jsonl as they finish and the
table OUT/cuda_reconstruct.md is rewritten after each, so a run cut short still leaves what it measured.

It is sized for one device call of under 10 minutes a model (the CLI is not installed there: the repository root
and a carried onnx-graphsurgeon wheel go on PYTHONPATH; the assets are copied into an ignored folder that travels):

    echo /.whl/ >> .git/info/exclude; echo /.assets/ >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux2014_x86_64 -d .whl onnx-graphsurgeon==0.6.1
    mkdir -p .assets/cifar10 .assets/imagenet && cp ../shared/assets/cifar10/{resnet20.onnx,test.npz} .assets/cifar10 \\
        && cp -r ../shared/assets/imagenet/{mobilenet_v1_0.75.onnx,val1300} .assets/imagenet
    # device run 1, carry [".whl", ".assets/cifar10"] (both models' assets together pass the 64 MiB a call takes):
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && \\
      PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1 python3 tools/bench_cuda_reconstruct.py --assets .assets --out $OUT
    # device run 2, carry [".whl", ".assets/imagenet"]: the same with --only mobilenet_v1_0.75 --steps 200

Here, to check the script (two CPU rows, a few steps): python tools/bench_cuda_reconstruct.py --device cpu \\
    --only resnet20 --steps 5 --limit 500 --out /tmp/cuda_check
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
from bench_compile import cold_env  # noqa: E402  (an empty inductor cache: a user's first run)

# (model, act bits, test data, preprocessing flags): ResNet-20 W4A4 and MobileNet-V1 W4A8, the time rows
MODELS = {
    "resnet20": ("cifar10/resnet20.onnx", 4, "cifar10/test.npz", ["--preprocess", "imagenet"]),
    "mobilenet_v1_0.75": ("imagenet/mobilenet_v1_0.75.onnx", 8, "imagenet/val1300", ["--preprocess", "inception"]),
}
CLI = [sys.executable, "-c", "import sys; from onnxdfq.cli import main; sys.argv[0] = 'onnxdfq'; main()"]


class GpuMemory:
    """The largest `memory.used` nvidia-smi reports while the block runs (None without nvidia-smi)."""

    def __init__(self) -> None:
        self.peak_mb: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                used = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                      capture_output=True, text=True, timeout=5).stdout.split()
                self.peak_mb = max(self.peak_mb or 0, max(int(u) for u in used))
            except (OSError, ValueError, subprocess.SubprocessError):
                return
            self._stop.wait(0.2)

    def __enter__(self) -> GpuMemory:
        if shutil.which("nvidia-smi"):
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


def quantize(model: Path, flags: list[str], out: Path, report: Path, cache: str) -> dict:
    """One CLI run in a fresh process: wall seconds, peak RSS and GPU memory (MB), or {"error": last line}."""
    env = cold_env(cache)
    start = time.perf_counter()
    with GpuMemory() as gpu, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([*CLI, "quantize", str(model), "-o", str(out), "-q", "--allow-broken",
                                 "--report", str(report), *flags], stdout=subprocess.DEVNULL, stderr=err, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - start
        err.seek(0)
        stderr = err.read().strip()
    if proc.returncode != 0:
        return {"error": stderr.splitlines()[-1] if stderr else f"exit {proc.returncode}"}
    return {"wall_s": round(wall, 1), "peak_rss_mb": round(usage.ru_maxrss / 1024), "gpu_peak_mb": gpu.peak_mb}


def top1(model: Path, data: Path, limit: int | None) -> float:
    evaluated = subprocess.run([*CLI, "eval", str(model), "--data", str(data), "--json", "--batch-size", "250",
                                *(["--limit", str(limit)] if limit else [])],
                               capture_output=True, text=True, check=True)
    return round(json.loads(evaluated.stdout)["top1"], 2)


def run_row(name: str, compiled: bool, args: argparse.Namespace, work: Path) -> dict:
    source, act_bits, data, pre = MODELS[name]
    flags = ["--bits", "4", "--act-bits", str(act_bits), "--reconstruct", "--device", args.device, *pre,
             "--reconstruct-compile" if compiled else "--no-reconstruct-compile"]
    if args.steps:
        flags += ["--reconstruct-steps", str(args.steps)]
    out, report = work / f"{name}.onnx", work / f"{name}.json"
    with tempfile.TemporaryDirectory(dir=work) as cache:
        row = {"model": name, "mode": "compiled" if compiled else "eager", "device": args.device, "flags": flags,
               **quantize(args.assets / source, flags, out, report, cache)}
    if "error" in row:
        return row
    data_report = json.loads(report.read_text())
    params = next(p for p in data_report["passes"] if p["name"] == "reconstruct")["params"]
    row.update(steps=params.get("steps"), blocks=params.get("blocks"), samples=params.get("samples"),
               generation_s=round(params.get("sample_info", {}).get("seconds", 0.0), 1),
               reconstruct_s=round(params.get("seconds", 0.0), 1), ran_compiled=bool(params.get("compiled")),
               top1=top1(out, args.assets / data, args.limit))
    return row


def write(rows: list[dict], out: Path, device_name: str) -> None:
    lines = [f"Device: {device_name}. `onnxdfq quantize --bits 4 --reconstruct --device ...`, one fresh process a row, "
             "inductor's cache empty; top-1 through onnxruntime's CPU provider.", "",
             "| model | steps | mode | ran compiled | top-1 | wall s | generation s | reconstruction s | "
             "ms a step, compiling included | peak RSS MB | peak GPU MB |",
             "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | | {r['mode']} | error: {r['error']} | | | | | | | |")
            continue
        per_step = 1000 * r["reconstruct_s"] / max(1, r["steps"] or 1)
        lines.append(f"| {r['model']} | {r['steps']} | {r['mode']} | {'yes' if r['ran_compiled'] else 'no'} | "
                     f"{r['top1']:.2f} | {r['wall_s']} | {r['generation_s']} | {r['reconstruct_s']} | "
                     f"{per_step:.0f} | {r['peak_rss_mb']} | {r['gpu_peak_mb'] if r['gpu_peak_mb'] else ''} |")
    (out / "cuda_reconstruct.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


def device_name(device: str) -> str:
    import torch

    if device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("bench_cuda_reconstruct: --device cuda, but torch sees no GPU")
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    return f"CPU ({os.cpu_count()} cores), torch {torch.__version__}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", choices=sorted(MODELS), default=["resnet20"])
    parser.add_argument("--modes", nargs="*", choices=["eager", "compiled"], default=["eager", "compiled"])
    parser.add_argument("--steps", type=int, default=None, help="steps a block (default: the CLI's own)")
    parser.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    parser.add_argument("--limit", type=int, default=None, help="evaluate on the first N test images")
    parser.add_argument("--assets", type=Path, default=Path(os.environ.get("ONNXDFQ_ASSETS",
                                                                           ROOT.parent / "shared" / "assets")))
    parser.add_argument("--out", type=Path, default=ROOT / "tools" / "results")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    name = device_name(args.device)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="onnxdfq-cuda-") as tmp:
        for model in args.only:
            for mode in args.modes:
                row = run_row(model, mode == "compiled", args, Path(tmp))
                rows.append(row)
                with (args.out / "cuda_reconstruct.jsonl").open("a") as log:
                    log.write(json.dumps(row) + "\n")
                write(rows, args.out, name)


if __name__ == "__main__":
    main()
