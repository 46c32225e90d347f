#!/usr/bin/env python3
"""--bits auto (per-layer widths under a budget) against uniform widths at the same size, measured and proxy;
DF-MPC pairs as candidates against the same budget without them; --avg-act-bits (4- or 8-bit activations).

Every row runs `onnxdfq quantize` as a user does (a fresh process; wall time and peak RSS from /usr/bin/time -v)
and `onnxdfq eval` on the full test set (CIFAR-10 test, 10 000 images; ImageNet val1300). No data anywhere:
sensitivities are measured on prior images (32 at 224 px, 64 below), or taken from the proxy (no inference).
For each measured run the table gives the rank correlation (Spearman) between the proxy's and the measured
sensitivities over every (layer, width) pair, and the share of layers where the two allocations agree.

    python tools/bench_allocation.py                     # every row; writes tools/results/allocation.md/json
    python tools/bench_allocation.py --only resnet20     # one model
    python tools/bench_allocation.py --only resnet20 --update   # re-run it, keep the other rows
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
from bench_cost import asset_file, eval_top1, timed_quantize  # noqa: E402  (the same /usr/bin/time -v run as the cost table)

ASSETS = Path(os.environ.get("ONNXDFQ_ASSETS", ROOT.parent / "shared" / "assets"))
CIFAR = ["--preprocess", "imagenet"]  # the shared CIFAR ResNets were trained on ImageNet's mean/std
INCEPTION = ["--preprocess", "inception"]
MODELS = {
    "resnet20": ("cifar10/resnet20.onnx", "cifar10/test.npz", CIFAR),
    "resnet56": ("cifar10/resnet56.onnx", "cifar10/test.npz", CIFAR),
    "mobilenet_v1_0.75": ("imagenet/mobilenet_v1_0.75.onnx", "imagenet/val1300", INCEPTION),
    "mobilenet_v1_0.75_folded": ("fold:imagenet/mobilenet_v1_0.75.onnx", "imagenet/val1300", INCEPTION),
}
A8 = ["--act-bits", "8"]
PACKED = ["--format", "qdq-packed"]


def auto(budget: str, value: str, sensitivity: str = "measured") -> list[str]:
    return ["--bits", "auto", f"--{budget}", value, "--sensitivity", sensitivity, *A8]


def uniform(bits: int, packed: bool = False) -> list[str]:
    return ["--bits", str(bits), *A8, *(PACKED if packed else [])]


# (model, label, flags): the bars, and uniform widths at the same size
ROWS = [
    ("mobilenet_v1_0.75", "uniform W4A8", uniform(4)),
    ("mobilenet_v1_0.75", "uniform W5A8", uniform(5)),
    ("mobilenet_v1_0.75", "uniform W6A8", uniform(6)),
    ("mobilenet_v1_0.75", "auto --avg-bits 5, measured", auto("avg-bits", "5")),
    ("mobilenet_v1_0.75", "auto --avg-bits 5, proxy", auto("avg-bits", "5", "proxy")),
    ("mobilenet_v1_0.75", "auto --avg-bits 4, measured", auto("avg-bits", "4")),
    ("mobilenet_v1_0.75_folded", "uniform W5A8", uniform(5)),
    ("mobilenet_v1_0.75_folded", "auto --avg-bits 5, measured", auto("avg-bits", "5")),
    ("mobilenet_v1_0.75_folded", "auto --avg-bits 5, proxy", auto("avg-bits", "5", "proxy")),
    ("resnet56", "uniform W3A8", uniform(3)),
    ("resnet56", "uniform W4A8", uniform(4)),
    ("resnet56", "auto --avg-bits 3, measured", auto("avg-bits", "3")),
    ("resnet56", "auto --avg-bits 3, proxy", auto("avg-bits", "3", "proxy")),
    ("resnet20", "uniform W4A8, packed", uniform(4, packed=True)),
    ("resnet20", "uniform W2A8, packed", uniform(2, packed=True)),
    ("resnet20", "auto --size-budget 0.15, measured", auto("size-budget", "0.15")),
    ("resnet20", "auto --size-budget 0.15, proxy", auto("size-budget", "0.15", "proxy")),
    # DF-MPC pairs as candidates (default on) at ultra-low budgets, against the same budget without them
    ("resnet20", "uniform W2A8", uniform(2)),
    ("resnet20", "uniform W3A8", uniform(3)),
    ("resnet20", "auto --avg-bits 2.5, measured", auto("avg-bits", "2.5")),
    ("resnet20", "auto --avg-bits 2.5, measured, --no-dfmpc-pairs", [*auto("avg-bits", "2.5"), "--no-dfmpc-pairs"]),
    ("resnet56", "dfmpc 2/6 A8", ["--method", "dfmpc", "--bits", "2/6", *A8]),
    ("resnet56", "auto --avg-bits 2.5, measured", auto("avg-bits", "2.5")),
    ("resnet56", "auto --avg-bits 2.5, measured, --no-dfmpc-pairs", [*auto("avg-bits", "2.5"), "--no-dfmpc-pairs"]),
    ("mobilenet_v1_0.75", "auto --avg-bits 3, measured", auto("avg-bits", "3")),
    ("mobilenet_v1_0.75", "auto --avg-bits 3, measured, --no-dfmpc-pairs",
     [*auto("avg-bits", "3"), "--no-dfmpc-pairs"]),
    # activation widths (--avg-act-bits: 4 or 8 per tensor), weights 8-bit or auto
    ("resnet20", "W8A8", ["--bits", "8", *A8]),
    ("resnet20", "W8A4", ["--bits", "8", "--act-bits", "4"]),
    ("resnet20", "W8, --avg-act-bits 6", ["--bits", "8", *A8, "--avg-act-bits", "6"]),
    ("resnet20", "W8, --avg-act-bits 5", ["--bits", "8", *A8, "--avg-act-bits", "5"]),
    ("resnet56", "W8A4", ["--bits", "8", "--act-bits", "4"]),
    ("resnet56", "W8, --avg-act-bits 5", ["--bits", "8", *A8, "--avg-act-bits", "5"]),
    ("mobilenet_v1_0.75", "W8A8", ["--bits", "8", *A8]),
    ("mobilenet_v1_0.75", "W8A4", ["--bits", "8", "--act-bits", "4"]),
    ("mobilenet_v1_0.75", "W8, --avg-act-bits 6", ["--bits", "8", *A8, "--avg-act-bits", "6"]),
    ("mobilenet_v1_0.75", "auto --avg-bits 5, --avg-act-bits 6", [*auto("avg-bits", "5"), "--avg-act-bits", "6"]),
    ("mobilenet_v1_0.75_folded", "W8, --avg-act-bits 6", ["--bits", "8", *A8, "--avg-act-bits", "6"]),
]


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    ranks = [np.argsort(np.argsort(v)) for v in (a, b)]
    return float(np.corrcoef(*ranks)[0, 1])


def _proxy_plan(entry: dict) -> dict[str, int]:
    """The widths the proxy would have chosen under the same budget (re-solved from the report's numbers)."""
    from onnxdfq.quant.allocation import allocate_widths

    params = entry["params"]
    layers = entry["layers"]
    widths = params["widths"]
    proxy = np.array([[max(row["proxy"][str(b)], 1e-9) for b in widths] for row in layers.values()])
    proxy = np.minimum.accumulate(proxy, axis=1)
    counts = np.array([row["params"] for row in layers.values()], float)
    size = counts[:, None] * np.array(widths, float)[None, :]
    fixed = sum(params["fixed"].values())
    if params["budget"] != "avg_bits" or fixed:
        return {}
    choice = allocate_widths(proxy, size, params["budget_value"] * counts.sum()).choice
    return {name: widths[int(c)] for name, c in zip(layers, choice, strict=True)}


def run_row(model: str, flags: list[str], work: Path) -> dict:
    out, report = work / "q.onnx", work / "report.json"
    source, data, pre = MODELS[model]
    path = asset_file(model, source, work)
    timed = timed_quantize(path, [*pre, *flags], out, report)
    if "error" in timed:
        return timed
    info = json.loads(report.read_text())
    fp32 = path.stat().st_size  # the file quantized: the asset, or its folded copy
    row = {"top1": eval_top1(out, data), "wall_s": round(timed["wall_s"], 1),
           "peak_mb": timed["peak_mb"], "avg_bits": round(info["average_weight_bits"], 3),
           "size_fraction": round(out.stat().st_size / fp32, 4)}
    acts = next((p for p in info["passes"] if p["name"] == "act_width_allocation"), None)
    if acts is not None:
        row["avg_act_bits"] = round(acts["params"]["average_act_bits"], 2)
        row["act_allocation_s"] = round(info["timings_s"].get("act_width_allocation_samples", 0.0), 1)
    entry = next((p for p in info["passes"] if p["name"] == "bit_allocation"), None)
    if entry is not None:
        row["dfmpc_pairs"] = len(entry["params"].get("dfmpc_pairs", []))
        row["allocation_s"] = round(info["timings_s"].get("bit_allocation_samples",
                                                          info["timings_s"].get("bit_allocation", 0.0)), 1)
        row["widths"] = {name: layer["bits"] for name, layer in entry["layers"].items()}
        if entry["params"]["sensitivity"] == "measured":
            widths = entry["params"]["widths"]
            measured = np.array([[layer["sensitivity"][str(b)] for b in widths] for layer in entry["layers"].values()])
            proxy = np.array([[layer["proxy"][str(b)] for b in widths] for layer in entry["layers"].values()])
            row["spearman_proxy_measured"] = round(_spearman(measured.ravel(), proxy.ravel()), 3)
            plan = _proxy_plan(entry)
            if plan:
                row["plans_agree"] = round(np.mean([plan[k] == v for k, v in row["widths"].items()]), 3)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", default=None, help="models to run")
    parser.add_argument("--out", default="allocation", help="results/NAME.md and .json")
    parser.add_argument("--update", action="store_true",
                        help="with --only: re-run those models and keep the other rows of results/NAME.json")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="onnxdfq-alloc-"))
    out = ROOT / "tools" / "results"
    kept = {}
    if args.update and (out / f"{args.out}.json").exists():
        kept = {(r["model"], r["config"]): r for r in json.loads((out / f"{args.out}.json").read_text())["rows"]}
    rows = []
    for model, label, flags in ROWS:
        if args.only and model not in args.only:
            if (model, label) in kept:
                rows.append(kept[(model, label)])
            continue
        row = {"model": model, "config": label, "flags": " ".join(flags), **run_row(model, flags, work)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    (out / f"{args.out}.json").write_text(json.dumps({"rows": rows}, indent=1))
    lines = ["# Per-layer widths without data (tools/bench_allocation.py)", "",
             "`onnxdfq quantize` then `onnxdfq eval` on every test image (CIFAR-10 test; ImageNet val1300), a fresh "
             "process per row on this 2-core machine (wall time and peak RSS of the quantize run). Method squant "
             "(the default), 8-bit activations. avg bits: grid bits per weight over the parameters; size: the written "
             "file / the FP32 file. Spearman: rank correlation of the proxy's and the measured sensitivities over "
             "every (layer, width); plans agree: share of layers given the same width by the proxy's allocation; "
             "DF-MPC pairs: pairs the allocation chose (ternary low layer compensated, next layer wider); act bits: "
             "average activation bits per element under --avg-act-bits (act s: its measurement time).", "",
             "| model | config | top-1 | avg bits | size | wall s | peak MB | allocation s | Spearman | plans agree "
             "| DF-MPC pairs | act bits | act s |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['config']} | error: {r['error']} | | | | | | | | | | |")
            continue
        lines.append(f"| {r['model']} | {r['config']} | {r['top1']:.2f} | {r['avg_bits']:.2f} | "
                     f"{r['size_fraction']:.3f} | {r['wall_s']} | {r['peak_mb']} | {r.get('allocation_s', '')} | "
                     f"{r.get('spearman_proxy_measured', '')} | {r.get('plans_agree', '')} | "
                     f"{r.get('dfmpc_pairs', '')} | {r.get('avg_act_bits', '')} | {r.get('act_allocation_s', '')} |")
    (out / f"{args.out}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
