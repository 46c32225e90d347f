#!/usr/bin/env python3
"""The benchmark table: every shared model x every method x the usual widths, in one run.

For each row: top-1 on the full labelled set (CIFAR-10 test, ImageNet val1300), quantization
wall time, file size (and INT4/INT2-packed size for <= 4-bit weights), and onnxruntime CPU
latency of FP32 and quantized at batch 1, measured in turns in the same run (their ratio is
the speedup). Writes BENCHMARKS.md (repo root) and tools/results/bench.json.

It is a thin call of `onnxdfq.sweep.run_sweep` (the `[sweep]` extra, Ray): every quantization and
evaluation shard is a Ray task, each latency measurement a task with the machine to itself
(onnxruntime's own threads, repeated until two ratios agree within 5 %). The sweep's folder
(--work, default .bench/) holds the quantized files and results.json: a cut-off run resumes there.

    python tools/bench.py                       # everything (2 Ray workers on this 2-core machine)
    python tools/bench.py --only resnet20       # rows whose id contains a string; others kept
    python tools/bench.py --limit 500 --out /tmp/bench   # quick look on a subset
    python tools/bench.py --workers 1           # one task at a time (the speedup of the note)

Rows already in the sweep's folder are reused unless --force; BENCHMARKS.md is always rebuilt.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import onnxdfq
from onnxdfq.eval.latency import stable_latency
from onnxdfq.pipeline import METHODS
from onnxdfq.sweep import EvalSpec, SweepConfig, load_results, run_sweep, write_results

ROOT = Path(__file__).resolve().parents[1]
ASSETS = Path(os.environ.get("ONNXDFQ_ASSETS", ROOT.parent / "shared" / "assets"))
CIFAR = {"data": "cifar10/test.npz", "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
IMAGENET = {"data": "imagenet/val1300", "mean": [0.5] * 3, "std": [0.5] * 3}
MODELS = {"resnet20": ("cifar10/resnet20.onnx", CIFAR), "resnet32": ("cifar10/resnet32.onnx", CIFAR),
          "resnet44": ("cifar10/resnet44.onnx", CIFAR), "resnet56": ("cifar10/resnet56.onnx", CIFAR),
          "mobilenet_v1_0.75": ("imagenet/mobilenet_v1_0.75.onnx", IMAGENET)}

# (label, bits, act_bits) per method family
WIDTHS = [("W8A8", "8", "8"), ("W6A8", "6", "8"), ("W4A8", "4", "8"), ("W4A4", "4", "4")]
MIXED = [("2/6 fp32-act", "2/6", "none"), ("2/6 A8", "2/6", "8")]


def configs() -> list[dict]:
    """The matrix (every model x method x width, per-channel) and the issues' focus rows."""
    rows = []
    for model in MODELS:
        for method in ("nearest", "squant", "dfq"):
            rows += [dict(group="matrix", model=model, method=method, label=label, bits=b, act=a, gran="channel")
                     for label, b, a in WIDTHS]
        rows += [dict(group="matrix", model=model, method="dfmpc", label=label, bits=b, act=a, gran="channel")
                 for label, b, a in MIXED]
    for model in ("mobilenet_v1_0.75",):  # the per-tensor collapse and its DFQ fix
        rows += [dict(group="focus", model=model, method=m, label="W8A8", bits="8", act="8", gran="tensor")
                 for m in ("nearest", "dfq")]
    for model in ("resnet20", "resnet56"):
        rows += [dict(group="focus", model=model, method=m, label="W6A8", bits="6", act="8", gran="tensor")
                 for m in ("nearest", "dfq")]
    for model in ("resnet20", "resnet56", "mobilenet_v1_0.75"):  # SQuant vs nearest at 4 and 3 bits
        for label, b, a in (("W3A8", "3", "8"), ("W4 fp32-act", "4", "none"), ("W3 fp32-act", "3", "none")):
            rows += [dict(group="focus", model=model, method=m, label=label, bits=b, act=a, gran="channel")
                     for m in ("nearest", "squant")]
    for model in ("resnet20", "resnet56", "mobilenet_v1_0.75"):  # the paper's SQuant: rounding only
        for label, b, a in (("W4A8", "4", "8"), ("W3A8", "3", "8"), ("W4 fp32-act", "4", "none"),
                            ("W3 fp32-act", "3", "none")):
            rows.append(dict(group="focus", model=model, method="squant", label=label, bits=b, act=a, gran="channel",
                             opts={"bias_correction": False}))
    for model in ("resnet20", "resnet56", "mobilenet_v1_0.75"):  # nearest with the same bias correction
        for label, b, a in (("W4A8", "4", "8"), ("W3 fp32-act", "3", "none")):
            rows.append(dict(group="focus", model=model, method="nearest", label=label, bits=b, act=a,
                             gran="channel", opts={"bias_correction": True}))
    for row in rows:
        suffix = "".join(f" {'+' if v else '-'}{k}" for k, v in row.get("opts", {}).items())
        row["id"] = f"{row['model']} {row['method']}{suffix} {row['label']} {row['gran']}"
    return rows


def sweep_config(cfg: dict) -> SweepConfig:
    """The sweep's config for one benchmark row (its extra options ride along)."""
    return SweepConfig(str(ASSETS / MODELS[cfg["model"]][0]), cfg["method"], cfg["bits"], cfg["act"], cfg["gran"],
                       tuple(cfg.get("opts", {}).items()))


def eval_specs(limit: int | None) -> dict[str, EvalSpec]:
    """Each model's labelled data (CIFAR-10 test or val1300), one evaluation shard per 2500 images."""
    return {Path(rel).stem: EvalSpec(str(ASSETS / spec["data"]), spec["mean"], spec["std"], limit=limit,
                                     batch_size=250 if "cifar" in spec["data"] else 100, shard_size=2500)
            for rel, spec in MODELS.values()}


def bench_row(cfg: dict, row: dict) -> dict:
    """A sweep row in the shape BENCHMARKS.md and bench.json use."""
    return {**cfg, "top1": round(row["top1"], 2), "fp32_top1": round(row["fp32_top1"], 2),
            "delta": round(row["top1"] - row["fp32_top1"], 2), "quantize_s": round(row["quantize_s"], 3),
            "bytes": row["bytes"], "packed_bytes": row["packed_bytes"], "fp32_bytes": row["fp32_bytes"],
            "avg_weight_bits": round(float(row.get("avg_weight_bits") or float("nan")), 2),
            "latency_ms": round(row["latency_ms"], 3), "fp32_latency_ms": round(row["fp32_latency_ms"], 3),
            "speedup": round(row["fp32_latency_ms"] / row["latency_ms"], 2), "samples": row["samples"]}


def _mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:.2f}"


def render(rows: list[dict], fp32: dict, meta: dict) -> str:
    run = meta.get("run") or {}
    how = (f"through `onnxdfq.sweep` on a local Ray, {run['workers']} workers: {run['rows']} rows in "
           f"{run['wall_s'] / 60:.1f} min" if run else "through `onnxdfq.sweep` on a local Ray")
    out = ["# Benchmarks", "",
           f"Regenerate: `python tools/bench.py` (one run {how}; {meta['machine']}; load average "
           f"{meta['load_average']:.1f} when last written: latencies are only comparable within a row; each latency "
           "task has the machine to itself and is repeated until two ratios agree within 5 %). "
           "Quantized as `onnxdfq quantize` with the model's --mean/--std. Top-1 on the full CIFAR-10 test "
           "set (10 000 images) and ImageNet `val1300` (1 300 images; it scores above the model's full-validation "
           "figure, so compare FP32 against quantized, not against papers). Per-channel weights unless noted; "
           "activation ranges from BN statistics (no data); network outputs stay float (the default). "
           "Latency: onnxruntime CPU EP, batch 1, median, FP32 "
           "and quantized taking turns in the same run; speedup = FP32 / quantized. Size: the .onnx file; "
           "'packed' is `--format qdq-packed` (INT4/INT2 initializers).", ""]
    out += ["## FP32 references", "", "| model | top-1 | size MB | CPU latency ms |", "|---|---:|---:|---:|"]
    out += [f"| {m} | {v['top1']:.2f} | {_mb(v['bytes'])} | {v.get('latency_ms', float('nan')):.2f} |"
            for m, v in fp32.items()]
    by_model: dict[str, list[dict]] = {}
    for row in rows:
        if row["group"] == "matrix":
            by_model.setdefault(row["model"], []).append(row)
    labels = [label for label, _, _ in WIDTHS] + [label for label, _, _ in MIXED]
    out += ["", "## Top-1 by method and width", "",
            "| model | method | " + " | ".join(labels) + " |", "|---|---|" + "---:|" * len(labels)]
    for model, model_rows in by_model.items():
        for method in dict.fromkeys(r["method"] for r in model_rows):
            cells = {r["label"]: f"{r['top1']:.2f}" for r in model_rows if r["method"] == method}
            out.append(f"| {model} | {method} | " + " | ".join(cells.get(label, "") for label in labels) + " |")
    out += ["", "## Every row", "",
            "| model | method | W/A | granularity | top-1 | vs FP32 | quantize s | size MB | packed MB "
            "| latency ms | speedup |", "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        opts = r.get("opts", {}).items()
        method = r["method"] + "".join(f" {'+' if v else '-'}{k.replace('_', '-')}" for k, v in opts)
        out.append(f"| {r['model']} | {method} | {r['label']} | {r['gran']} | {r['top1']:.2f} | "
                   f"{r['delta']:+.2f} | {r['quantize_s']:.2f} | {_mb(r['bytes'])} | {_mb(r.get('packed_bytes'))} | "
                   f"{r['latency_ms']:.2f} | {r['speedup']:.2f}x |")
    out += ["", "## Reading the latency column", "",
            "- 8-bit activations: onnxruntime's CPU EP fuses DequantizeLinear -> Conv -> QuantizeLinear into "
            "QLinearConv (int8 kernels), and the Relu disappears into the uint8 zero point; `tests/test_qdq.py` "
            "checks that every ResNet-20 conv fuses. The speedup over FP32 at batch 1 is modest on these small "
            "models (per-op overhead dominates) and grows with layer size.",
            "- Sub-8-bit activations (W4A4): the grid's levels are enforced by an integer Clip between "
            "QuantizeLinear and DequantizeLinear (bit-identical to clipping the floats first), so every conv still "
            "fuses into QLinearConv and W4A4 runs about as fast as W8A8; no onnxruntime kernel computes with "
            "4-bit activations, so it is not faster either.",
            "- `dfq` on ReLU6 nets (MobileNet): CLE turns each ReLU6 into Relu + a per-channel Min to stay exact. "
            "The QDQ file runs that Min on the quantized integers (Q -> Min -> DQ), and every conv fuses into "
            "QLinearConv, but the 26 uint8 Mins take about 1.6 of 5.1 ms per inference (onnxruntime profile), so "
            "MobileNet dfq W8A8 runs slower than nearest (1.1-1.3x FP32 against 1.4-1.6x over runs). Both also "
            "pay about 0.5 ms for the 1x1 classifier, which keeps float logits: `--quantize-outputs` fuses it "
            "(nearest 1.54x -> 1.84x, dfq per-tensor 1.06x -> 1.19x in one interleaved run).",
            "- Float activations (fp32-act rows) run DequantizeLinear + float Conv: no speedup; their point is the "
            "weight storage (see the packed size).",
            "", "## CUDA and TensorRT execution providers", "",
            "Measured with `tools/bench_providers.py` on a lent machine (NVIDIA H200, driver 580.159, "
            "onnxruntime-gpu 1.31.1, 16 CPU cores), the same files as here: ResNet-56 on the first 5000 CIFAR-10 "
            "test images, MobileNet-V1 on the first 500 of val1300. `w8a8_ort` is the default `--target ort` file, "
            "`w8a8_trt` the `--target trt` one (symmetric int8 activations, float biases). Sessions are checked to "
            "run on the provider asked for. On CUDA the accuracy matches the CPU EP within 0.2 (MobileNet: 1 image "
            "in 500); there is no int8 speedup: onnxruntime's CUDA EP has no QLinearConv, so a QDQ Conv runs as "
            "DequantizeLinear -> FP32 cuDNN Conv -> QuantizeLinear, 0.3-0.85x FP32 speed. The TensorRT EP is listed "
            "by onnxruntime-gpu but the machine's image has no TensorRT libraries (libnvinfer), so its sessions "
            "fall back to CUDA, which `make_session` refuses: TensorRT itself was not run. The CPU rows are that "
            "machine's 16-core CPU (not this page's machine)."]
    out += ["", "## OpenVINO", "",
            "The same QDQ files in OpenVINO's CPU runtime (`onnxdfq eval --provider openvino`, the `[openvino]` "
            "extra), next to onnxruntime's CPU EP, full test sets, latencies interleaved in one run of "
            "`tools/bench_providers.py --providers cpu,openvino` on this page's machine (2 cores, taken while "
            "other jobs ran: load average 4-6, so the latency ratios are rough; the accuracies are exact). "
            "Each provider's ratio is against FP32 on that provider."]
    for name in ("openvino_resnet56.md", "openvino_mobilenet.md"):
        path = ROOT / "tools" / "results" / name
        if path.exists():
            out += ["", f"### {name.removeprefix('openvino_').removesuffix('.md')}", "",
                    *[line for line in path.read_text().strip().splitlines() if line.startswith("|")]]
    for name in ("providers_resnet56.md", "providers_mobilenet.md"):
        path = ROOT / "tools" / "results" / name
        if path.exists():
            out += ["", f"### {name.removeprefix('providers_').removesuffix('.md')}", "",
                    *path.read_text().strip().splitlines()]
    # tables other tools write, one page
    for extra in ("folded.md", "prior_study.md", "prior_study_mobilenet.md", "robustness.md"):
        path = ROOT / "tools" / "results" / extra
        if path.exists():
            text = path.read_text().strip().splitlines()
            out += ["", "#" + text[0], *text[1:]]  # their title one level down
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", default=None, help="run rows whose id contains one of these")
    parser.add_argument("--force", action="store_true", help="recompute rows already in the sweep's folder")
    parser.add_argument("--limit", type=int, default=None, help="evaluate on the first N samples only")
    parser.add_argument("--latency-runs", type=int, default=20)
    parser.add_argument("--latency-only", action="store_true",
                        help="re-measure only the latencies of rows in the JSON (run it on a quiet machine)")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="Ray workers (local Ray)")
    parser.add_argument("--address", default=None, help="a Ray cluster instead of a local Ray")
    parser.add_argument("--work", type=Path, default=None, help="the sweep's folder (default .bench/limit-N)")
    parser.add_argument("--out", type=Path, default=ROOT, help="folder for BENCHMARKS.md; JSON in OUT/tools/results")
    args = parser.parse_args()

    json_path = args.out / "tools" / "results" / "bench.json"
    saved = json.loads(json_path.read_text()) if json_path.exists() else {"rows": [], "fp32": {}}
    if saved.get("limit") != args.limit:
        saved = {"rows": [], "fp32": {}}
    grid = {cfg["id"] for cfg in configs()}
    done = {row["id"]: row for row in saved["rows"] if row["id"] in grid}  # rows of configs no longer run go
    fp32 = saved["fp32"]
    wanted = [c for c in configs() if c["method"] in METHODS
              and (not args.only or any(s in c["id"] for s in args.only))]
    if args.latency_only:
        remeasure_latency(wanted, done, fp32, args)
        _save(json_path, args, done, fp32, saved)
        return
    work = args.work or ROOT / ".bench" / f"limit-{args.limit or 'all'}"
    by_key = {sweep_config(cfg).key: cfg for cfg in wanted}
    if args.force:  # drop the wanted rows from the sweep's folder: they are run again
        kept = load_results(work)
        kept["rows"] = [row for row in kept["rows"] if row["key"] not in by_key]
        if kept["meta"]:
            write_results(work, kept)
    start = time.perf_counter()
    results = run_sweep([sweep_config(cfg) for cfg in wanted], eval_specs(args.limit), work, address=args.address,
                        workers=None if args.address else args.workers, latency_runs=args.latency_runs,
                        latency_alone=True, latency_tolerance=0.05,
                        on_start=lambda todo, reused: print(f"{todo} rows to run ({reused} reused)", file=sys.stderr),
                        on_row=lambda row: print(f"{row['key']}: " + (row["error"] or f"top1 {row['top1']:.2f}"),
                                                 file=sys.stderr, flush=True))
    wall = time.perf_counter() - start
    for row in results["rows"]:
        cfg = by_key.get(row["key"])
        if cfg is None:
            continue
        if row.get("error"):
            print(f"FAILED {cfg['id']}: {row['error']}", file=sys.stderr)
            done.pop(cfg["id"], None)
            continue
        done[cfg["id"]] = bench_row(cfg, row)
    for name, entry in results["fp32"].items():
        if entry.get("error") is None:
            latencies = [r["fp32_latency_ms"] for r in done.values() if r["model"] == name and r.get("fp32_latency_ms")]
            fp32[name] = {"top1": round(entry["top1"], 2), "bytes": entry["bytes"],
                          "latency_ms": round(statistics.median(latencies), 3) if latencies else float("nan")}
    if wall > 60:  # a re-render of reused rows is not a run
        print(f"sweep: {len(wanted)} rows in {wall:.0f} s with {args.workers} worker(s)", file=sys.stderr)
    _save(json_path, args, done, fp32, saved, run={"wall_s": round(wall), "workers": args.workers,
                                                    "rows": len(wanted)} if wall > 60 else None)


def remeasure_latency(wanted: list[dict], done: dict, fp32: dict, args) -> None:
    """Latency columns again for rows already measured (quantize + time; no evaluation)."""
    for index, cfg in enumerate([c for c in wanted if c["id"] in done], 1):
        path = ASSETS / MODELS[cfg["model"]][0]
        model = onnxdfq.quantize(str(path), method=cfg["method"], bits=cfg["bits"], act_bits=cfg["act"],
                                 granularity=cfg["gran"], check=False, **cfg.get("opts", {}))
        lat = stable_latency({"fp32": str(path), "q": model}, runs=args.latency_runs)
        row = done[cfg["id"]]
        row.update(latency_ms=round(lat["q"], 3), fp32_latency_ms=round(lat["fp32"], 3),
                   speedup=round(lat["fp32"] / lat["q"], 2))
        fp32[cfg["model"]]["latency_ms"] = row["fp32_latency_ms"]
        print(f"[{index}] {cfg['id']}: {row['latency_ms']:.2f} ms vs fp32 {row['fp32_latency_ms']:.2f} ms "
              f"({row['speedup']:.2f}x)", file=sys.stderr, flush=True)


def _save(json_path: Path, args, done: dict, fp32: dict, saved: dict, run: dict | None = None) -> None:
    order = {cfg["id"]: i for i, cfg in enumerate(configs())}
    rows = sorted(done.values(), key=lambda r: order.get(r["id"], len(order)))
    meta = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, onnxruntime CPU EP",
            "load_average": os.getloadavg()[0], "limit": args.limit,
            "run": run or saved.get("run")}  # the last whole-grid run's wall time and workers
    json_path.parent.mkdir(parents=True, exist_ok=True)
    payload = {**meta, "rows": rows, "fp32": fp32}
    fd, tmp = tempfile.mkstemp(dir=json_path.parent)
    with os.fdopen(fd, "w") as handle:
        json.dump(payload, handle, indent=1)
    os.replace(tmp, json_path)
    (args.out / "BENCHMARKS.md").write_text(render(rows, fp32, meta))


if __name__ == "__main__":
    main()
