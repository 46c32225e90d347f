#!/usr/bin/env python3
"""The benchmark table: every shared model x every method x the usual widths, in one run.

For each row: top-1 on the full labelled set (CIFAR-10 test, ImageNet val1300), quantization
wall time, file size (and INT4/INT2-packed size for <= 4-bit weights), and onnxruntime CPU
latency of FP32 and quantized at batch 1, measured in turns in the same run (their ratio is
the speedup). Writes BENCHMARKS.md (repo root) and tools/results/bench.json.

    python tools/bench.py                       # everything (about 40 min on 2 cores)
    python tools/bench.py --only resnet20       # rows whose id contains a string; others kept from the JSON
    python tools/bench.py --limit 500 --out /tmp/bench   # quick look on a subset

Rows already in the JSON are reused unless --force (or --limit differs); BENCHMARKS.md is
always rebuilt from the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

import onnxdfq
from onnxdfq.eval.data import Dataset, open_dataset
from onnxdfq.eval.latency import measure_latency
from onnxdfq.graph import packing
from onnxdfq.pipeline import METHODS

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


def load_data(spec: dict, model_path: Path, limit: int | None) -> Dataset:
    """The whole evaluation set, decoded and preprocessed once, kept in memory for every row."""
    session_shape = onnx.load(str(model_path), load_external_data=False).graph.input[0].type.tensor_type.shape
    size = tuple(d.dim_value for d in session_shape.dim[2:4])
    dataset = open_dataset(ASSETS / spec["data"], mean=spec["mean"], std=spec["std"], size=size)
    xs, ys = zip(*dataset.batches(250, limit), strict=True)
    x, y = np.concatenate(xs), np.concatenate(ys)
    return Dataset(dataset.name, len(x), _arrays=(x, y))


def file_size(model: onnx.ModelProto) -> int:
    return len(model.SerializeToString())


def packed_copy(model: onnx.ModelProto, report: dict) -> onnx.ModelProto:
    """What `--format qdq-packed` writes for the same quantization: the low-bit weight initializers
    of a copy re-stored as INT4/INT2 (the widths the report gives per layer)."""
    widths = {f"{name}.weight_quantized": packing.packed_type(layer["bits"])
              for name, layer in report["layers"].items() if "bits" in layer}
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return packing.pack_weights(copy, {name: w for name, w in widths.items() if w is not None})[0]


def run_row(cfg: dict, path: Path, data: Dataset, fp32: dict, latency_runs: int) -> dict:
    extra = {"granularity": cfg["gran"], **cfg.get("opts", {})}
    start = time.perf_counter()
    result = onnxdfq.quantize_model(str(path), method=cfg["method"], bits=cfg["bits"], act_bits=cfg["act"], check=False,
                                    **extra)  # the timing is the quantization; evaluation below checks it
    seconds = time.perf_counter() - start
    model = result.model
    top1 = onnxdfq.evaluate(model, data, batch_size=250).top1
    size = file_size(model)
    packed_size = None
    if int(cfg["bits"].split("/")[0]) <= 4:
        packed_size = file_size(packed_copy(model, result.report))
    lat = stable_latency(str(path), model, latency_runs)
    return {**cfg, "top1": round(top1, 2), "fp32_top1": fp32["top1"], "delta": round(top1 - fp32["top1"], 2),
            "quantize_s": round(seconds, 3), "bytes": size, "packed_bytes": packed_size, "fp32_bytes": fp32["bytes"],
            "avg_weight_bits": round(float(result.report.get("average_weight_bits", float("nan"))), 2),
            "latency_ms": round(lat["q"], 3), "fp32_latency_ms": round(lat["fp32"], 3),
            "speedup": round(lat["fp32"] / lat["q"], 2), "samples": data.count}


def _mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:.2f}"


def render(rows: list[dict], fp32: dict, meta: dict) -> str:
    out = ["# Benchmarks", "",
           f"Regenerate: `python tools/bench.py` (one run; {meta['machine']}; load average {meta['load_average']:.1f} "
           "when last written: latencies are only comparable within a row). Top-1 on the full CIFAR-10 test "
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
            "- Sub-8-bit activations (W4A4): the QDQ graph keeps a Clip in front of each QuantizeLinear so that only "
            "the 4-bit levels occur; no onnxruntime kernel computes with 4-bit activations, the Clip blocks the "
            "QLinearConv fusion and the model runs as float convolutions between Q/DQ pairs, several times slower "
            "than FP32. Such files are for accuracy studies and for runtimes with low-bit kernels.",
            "- `dfq` on ReLU6 nets (MobileNet): CLE turns each ReLU6 into Relu + a per-channel Min to stay exact. "
            "The QDQ file runs that Min on the quantized integers (Q -> Min -> DQ; quantization is monotone, so the "
            "result is the same as clipping before quantizing), and every conv fuses into QLinearConv; the 26 uint8 "
            "Mins still cost about what int8 saves, so MobileNet dfq W8A8 runs at about FP32 speed (0.94-1.15x over "
            "three runs; nearest 1.24-1.36x). "
            "Before the Mins moved onto the integers they ran in float between DQ and Q: 0.69x.",
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
    for extra in ("folded.md", "prior_study.md", "robustness.md"):  # tables other tools write, one page
        path = ROOT / "tools" / "results" / extra
        if path.exists():
            text = path.read_text().strip().splitlines()
            out += ["", "#" + text[0], *text[1:]]  # their title one level down
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", default=None, help="run rows whose id contains one of these")
    parser.add_argument("--force", action="store_true", help="recompute rows already in the JSON")
    parser.add_argument("--limit", type=int, default=None, help="evaluate on the first N samples only")
    parser.add_argument("--latency-runs", type=int, default=20)
    parser.add_argument("--latency-only", action="store_true",
                        help="re-measure only the latencies of rows in the JSON (run it on a quiet machine)")
    parser.add_argument("--out", type=Path, default=ROOT, help="folder for BENCHMARKS.md; JSON in OUT/tools/results")
    args = parser.parse_args()

    json_path = args.out / "tools" / "results" / "bench.json"
    saved = json.loads(json_path.read_text()) if json_path.exists() else {"rows": [], "fp32": {}}
    if saved.get("limit") != args.limit:
        saved = {"rows": [], "fp32": {}}
    done = {row["id"]: row for row in saved["rows"]}
    fp32 = saved["fp32"]
    wanted = [c for c in configs() if c["method"] in METHODS
              and (not args.only or any(s in c["id"] for s in args.only))]
    if args.latency_only:
        remeasure_latency(wanted, done, fp32, args)
        _save(json_path, args, done, fp32)
        return
    todo = [c for c in wanted if args.force or c["id"] not in done]
    print(f"{len(todo)} rows to run ({len(wanted) - len(todo)} reused)", file=sys.stderr)
    if not todo:  # only re-render (e.g. after tools/bench_folded.py or tools/robustness.py): keep the run's meta
        order = {cfg["id"]: i for i, cfg in enumerate(configs())}
        rows = sorted(done.values(), key=lambda r: order.get(r["id"], len(order)))
        (args.out / "BENCHMARKS.md").write_text(render(rows, fp32, saved))
        return
    data_cache: dict[str, Dataset] = {}
    for index, cfg in enumerate(todo, 1):
        rel, spec = MODELS[cfg["model"]]
        path = ASSETS / rel
        if cfg["model"] not in data_cache:
            data_cache = {cfg["model"]: load_data(spec, path, args.limit)}  # one set in memory at a time
            if args.force or cfg["model"] not in fp32:
                data = data_cache[cfg["model"]]
                lat = measure_latency({"fp32": str(path)}, runs=args.latency_runs)["fp32"]
                fp32[cfg["model"]] = {"top1": round(onnxdfq.evaluate(str(path), data, batch_size=250).top1, 2),
                                      "bytes": path.stat().st_size, "latency_ms": round(lat, 3)}
        row = run_row(cfg, path, data_cache[cfg["model"]], fp32[cfg["model"]], args.latency_runs)
        done[cfg["id"]] = row
        print(f"[{index}/{len(todo)}] {cfg['id']}: top1 {row['top1']:.2f} (fp32 {row['fp32_top1']:.2f}) "
              f"{row['quantize_s']:.2f}s speedup {row['speedup']:.2f}x", file=sys.stderr, flush=True)
        _save(json_path, args, done, fp32)  # a cut-off run keeps what it measured
    _save(json_path, args, done, fp32)


def stable_latency(fp32_path: str, model, runs: int, tolerance: float = 0.05, tries: int = 4) -> dict[str, float]:
    """Interleaved FP32 / quantized latencies, measured again until two measurements in a row give speedups
    within ``tolerance`` of each other (at most ``tries``); the pair with the median speedup is kept."""
    results = []
    for _ in range(tries):
        results.append(measure_latency({"fp32": fp32_path, "q": model}, runs=runs))
        ratios = [r["fp32"] / r["q"] for r in results]
        if len(ratios) >= 2 and abs(ratios[-1] - ratios[-2]) <= tolerance * ratios[-2]:
            break
    order = sorted(range(len(results)), key=lambda i: results[i]["fp32"] / results[i]["q"])
    return results[order[len(order) // 2]]


def remeasure_latency(wanted: list[dict], done: dict, fp32: dict, args) -> None:
    """Latency columns again for rows already measured (quantize + time; no evaluation)."""
    for index, cfg in enumerate([c for c in wanted if c["id"] in done], 1):
        path = ASSETS / MODELS[cfg["model"]][0]
        model = onnxdfq.quantize(str(path), method=cfg["method"], bits=cfg["bits"], act_bits=cfg["act"],
                                 granularity=cfg["gran"], check=False, **cfg.get("opts", {}))
        lat = stable_latency(str(path), model, args.latency_runs)
        row = done[cfg["id"]]
        row.update(latency_ms=round(lat["q"], 3), fp32_latency_ms=round(lat["fp32"], 3),
                   speedup=round(lat["fp32"] / lat["q"], 2))
        fp32[cfg["model"]]["latency_ms"] = row["fp32_latency_ms"]
        print(f"[{index}] {cfg['id']}: {row['latency_ms']:.2f} ms vs fp32 {row['fp32_latency_ms']:.2f} ms "
              f"({row['speedup']:.2f}x)", file=sys.stderr, flush=True)


def _save(json_path: Path, args, done: dict, fp32: dict) -> None:
    order = {cfg["id"]: i for i, cfg in enumerate(configs())}
    rows = sorted(done.values(), key=lambda r: order.get(r["id"], len(order)))
    meta = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, onnxruntime CPU EP",
            "load_average": os.getloadavg()[0], "limit": args.limit}
    json_path.parent.mkdir(parents=True, exist_ok=True)
    payload = {**meta, "rows": rows, "fp32": fp32}
    fd, tmp = tempfile.mkstemp(dir=json_path.parent)
    with os.fdopen(fd, "w") as handle:
        json.dump(payload, handle, indent=1)
    os.replace(tmp, json_path)
    (args.out / "BENCHMARKS.md").write_text(render(rows, fp32, meta))


if __name__ == "__main__":
    main()
