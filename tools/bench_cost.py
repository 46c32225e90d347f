#!/usr/bin/env python3
"""What quantizing costs, BN kept against BN folded: wall time and peak memory of `onnxdfq quantize` as a user
runs it (a fresh process each, measured by /usr/bin/time -v), and the quantize time the report gives.

Models: the shared EfficientNet-Lite0 and MobileNet-V1 (BN kept, and folded by onnxruntime's basic
optimization), and from tools/cost_models.py a ResNet-50 at 224 px and a CIFAR VGG-16-BN with random
weights, both with a fixed batch of 1 as exporters write them (cost only: random weights say nothing about
accuracy). The kept and folded runs of a row take turns, so machine load hits both alike.

    python tools/bench_cost.py                  # writes tools/results/cost.md and cost.json
    python tools/bench_cost.py --only resnet50  # one model
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ASSETS = Path(os.environ.get("ONNXDFQ_ASSETS", ROOT.parent / "shared" / "assets"))
# model -> (source, preprocessing flags); "built:NAME" comes from tools/cost_models.py with batch 1
MODELS = {
    "efficientnet_lite0": ("imagenet/efficientnet_lite0.onnx", ["--mean", "0.498,0.498,0.498", "--std",
                                                                "0.502,0.502,0.502"]),
    "mobilenet_v1_0.75": ("imagenet/mobilenet_v1_0.75.onnx", ["--preprocess", "inception"]),
    "resnet50": ("built:resnet50", ["--preprocess", "imagenet"]),
    "vgg16_bn": ("built:vgg16_bn", ["--preprocess", "imagenet"]),
}
# (model, label, quantize flags)
ROWS = [
    ("efficientnet_lite0", "default (squant W8A8)", []),
    ("efficientnet_lite0", "nearest W8A8", ["--method", "nearest"]),
    ("efficientnet_lite0", "dfq W8A8 per-tensor", ["--method", "dfq", "--granularity", "tensor"]),
    ("efficientnet_lite0", "squant W4A8", ["--method", "squant", "--bits", "4"]),
    ("mobilenet_v1_0.75", "default (squant W8A8)", []),
    ("mobilenet_v1_0.75", "dfmpc 4/8", ["--method", "dfmpc", "--bits", "4/8"]),
    ("resnet50", "nearest W8A8", ["--method", "nearest"]),
    ("resnet50", "squant W8A8", ["--method", "squant"]),
    ("resnet50", "dfq W8A8 per-tensor", ["--method", "dfq", "--granularity", "tensor"]),
    ("resnet50", "dfmpc 2/6", ["--method", "dfmpc", "--bits", "2/6"]),
    ("vgg16_bn", "dfmpc 2/6", ["--method", "dfmpc", "--bits", "2/6"]),
]


def _files(work: Path) -> dict[str, dict[str, Path]]:
    """Each model's BN-kept file and its folded copy."""
    sys.path.insert(0, str(ROOT / "tools"))
    import onnx
    from cost_models import BUILDERS

    from onnxdfq.eval.session import fold_batchnorm_copy

    files = {}
    for name, (source, _) in MODELS.items():
        if source.startswith("built:"):
            kept = work / f"{name}.onnx"
            onnx.save(BUILDERS[source.split(":", 1)[1]](batch=1), kept)
        else:
            kept = ASSETS / source
        folded = work / f"{name}_folded.onnx"
        fold_batchnorm_copy(str(kept), folded)
        files[name] = {"kept": kept, "folded": folded}
    return files


def timed_quantize(model: Path, flags: list[str], out: Path, report: Path) -> dict:
    """`onnxdfq quantize` in a fresh process under /usr/bin/time -v: {"wall_s", "peak_mb"}, or {"error": last line}."""
    cli = Path(sys.executable).parent / "onnxdfq"
    proc = subprocess.run(["/usr/bin/time", "-v", str(cli), "quantize", str(model), "-o", str(out), "-q",
                           "--allow-broken", "--report", str(report), *flags], capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    wall = re.search(r"Elapsed \(wall clock\) time.*: (?:(\d+):)?(\d+):([\d.]+)", proc.stderr)
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    seconds = int(wall.group(1) or 0) * 3600 + int(wall.group(2)) * 60 + float(wall.group(3))
    return {"wall_s": round(seconds, 2), "peak_mb": round(int(rss.group(1)) / 1024)}


def asset_file(name: str, source: str, work: Path) -> Path:
    """A shared asset, or for ``fold:RELATIVE`` its BN-folded copy (onnxruntime basic optimization), made once in
    ``work`` under ``name``."""
    if not source.startswith("fold:"):
        return ASSETS / source
    from onnxdfq.eval.session import fold_batchnorm_copy

    folded = work / f"{name}.onnx"
    if not folded.exists():
        fold_batchnorm_copy(str(ASSETS / source.split(":", 1)[1]), folded)
    return folded


def eval_top1(model: Path, data: str, limit: int | None = None) -> float:
    """`onnxdfq eval --json` in a fresh process on the asset ``data``: top-1 in percent, two decimals."""
    cli = Path(sys.executable).parent / "onnxdfq"
    evaluated = subprocess.run([str(cli), "eval", str(model), "--data", str(ASSETS / data), "--json",
                                "--batch-size", "250", *(["--limit", str(limit)] if limit else [])],
                               capture_output=True, text=True, check=True)
    return round(json.loads(evaluated.stdout)["top1"], 2)


def run_cli(model: Path, flags: list[str], work: Path) -> dict:
    """One `onnxdfq quantize` in a fresh process: wall seconds, peak RSS (MB), the report's quantize seconds."""
    out, report = work / "q.onnx", work / "report.json"
    timed = timed_quantize(model, flags, out, report)
    if "error" in timed:
        return timed
    data = json.loads(report.read_text())
    return {**timed, "quantize_s":
            round(data["timings_s"]["total"], 2), "check_s": round(data["timings_s"].get("check", 0.0), 2),
            "statistics": data["statistics"]["source"], "grade": data["fidelity"]["grade"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", default=None)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="onnxdfq-cost-"))
    files = _files(work)
    rows = []
    for model, label, flags in ROWS:
        if args.only and model not in args.only:
            continue
        extra = MODELS[model][1]
        size_mb = round(files[model]["kept"].stat().st_size / 1e6, 1)
        row = {"model": model, "config": label, "file_mb": size_mb,
               "kept": run_cli(files[model]["kept"], flags + extra, work),
               "folded": run_cli(files[model]["folded"], flags + extra, work)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    out = ROOT / "tools" / "results"
    (out / "cost.json").write_text(json.dumps({"rows": rows}, indent=1))
    lines = ["# What quantizing costs, BN kept vs BN folded (tools/bench_cost.py)", "",
             "`onnxdfq quantize` as a user runs it, a fresh process per run (wall time and peak RSS from "
             "/usr/bin/time -v, Python's start included; quantize s = the report's time without the output "
             "check), on this 2-core machine. ResNet-50 and VGG-16-BN: random weights, batch fixed at 1 "
             "(tools/cost_models.py).", "",
             "| model | config | file MB | kept: wall s / peak MB / quantize s | folded: wall s / peak MB / "
             "quantize s | folded / kept wall | folded statistics |", "|---|---|---:|---|---|---:|---|"]
    for r in rows:
        kept, folded = r["kept"], r["folded"]
        if "error" in kept or "error" in folded:
            lines.append(f"| {r['model']} | {r['config']} | {r['file_mb']} | {kept.get('error', '')} | "
                         f"{folded.get('error', '')} | - | - |")
            continue
        lines.append(f"| {r['model']} | {r['config']} | {r['file_mb']} | {kept['wall_s']} / {kept['peak_mb']} / "
                     f"{kept['quantize_s']} | {folded['wall_s']} / {folded['peak_mb']} / {folded['quantize_s']} | "
                     f"{folded['wall_s'] / kept['wall_s']:.2f}x | {folded['statistics']} |")
    (out / "cost.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
