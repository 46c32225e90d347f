#!/usr/bin/env python3
"""DF-MPC ablation and results on the shared models: each ingredient on/off on ResNet-56 2/6, then
the other ResNets (2/6 with float and 8-bit activations, 3/6) and MobileNet-V1 (6/8, 4/8).

Real data is used only to evaluate (full CIFAR-10 test set, ImageNet val1300); the method never sees it.
Results are appended to the JSON as they come, and rows already there are skipped (--fresh redoes them).

usage: python tools/ablation_dfmpc.py [--set ablation|results|all] [--only SUBSTRING ...] [--limit N] [--fresh]
(--fresh redoes the selected runs and keeps every other row of the JSON)
       [--out tools/results/dfmpc_ablation]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from onnxdfq.eval.data import open_dataset
from onnxdfq.eval.runner import evaluate
from onnxdfq.pipeline import quantize_model

ASSETS = Path(os.environ.get("ONNXDFQ_ASSETS", Path(__file__).resolve().parents[2] / "shared" / "assets"))
CIFAR = {"data": ASSETS / "cifar10/test.npz", "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
IMAGENET = {"data": ASSETS / "imagenet/val1300", "mean": [0.5] * 3, "std": [0.5] * 3}
FP32 = {"resnet20": 91.73, "resnet32": 92.63, "resnet44": 93.10, "resnet56": 93.39, "mobilenet_v1_0.75": 76.85}

V01 = {"quantizer": "lsq", "low_rule": "first"}  # the 0.1 defaults (least-squares ternary), pinned
PLAIN = {**V01, "reestimate": "none", "high_gain": False}  # quantized at the plan's widths, nothing compensated
RECIPE = {**V01, "sigma_model": "tap", "high_gain": False}  # the recipe: tap-model BN re-estimation
CORR = {"quantizer": "corr", "refine_steps": 0}  # correlation-maximising top-|w| ternary support, no ascent
# (label, model, bits, act_bits, options): options are quantize_model keywords, "dfmpc" -> DFMPCPass options
ABLATION = [
    ("plain uniform ternary (max abs w)", "resnet56", "2/6", None,
     {"dfmpc": {**PLAIN, "quantizer": "absmax"}, "bias_correction": False}),
    ("plain TWN ternary", "resnet56", "2/6", None, {"dfmpc": {**PLAIN, "quantizer": "twn"}, "bias_correction": False}),
    ("plain LSQ ternary", "resnet56", "2/6", None, {"dfmpc": PLAIN, "bias_correction": False}),
    ("LSQ + paper c, original BN statistics", "resnet56", "2/6", None,
     {"dfmpc": {**PLAIN, "compensate": True}, "bias_correction": False}),
    ("LSQ + mean re-estimation", "resnet56", "2/6", None,
     {"dfmpc": {**RECIPE, "reestimate": "mean"}, "bias_correction": False}),
    ("LSQ + mean+std (tap model, rho 0.2)", "resnet56", "2/6", None, {"dfmpc": RECIPE, "bias_correction": False}),
    ("  + bias correction (issue recipe)", "resnet56", "2/6", None, {"dfmpc": RECIPE}),
    ("  + sigma blend (tap x regression)", "resnet56", "2/6", None, {"dfmpc": {**V01, "high_gain": False}}),
    ("  + high-layer gain = 0.1 default", "resnet56", "2/6", None, {"dfmpc": V01}),
    ("0.1 default - bias correction", "resnet56", "2/6", None, {"dfmpc": V01, "bias_correction": False}),
    ("0.1 default, rho fit per layer", "resnet56", "2/6", None, {"dfmpc": {**V01, "rho": "fit"}}),
    ("0.1 default + paper c (lambda1 0.5)", "resnet56", "2/6", None, {"dfmpc": {**V01, "compensate": True}}),
    ("0.1 default + CLE before", "resnet56", "2/6", None, {"dfmpc": V01, "cle": True}),
    # issue 15 candidates, each on the 0.1 default, then the new default (quantizer corr, refine_steps 64,
    # low_rule spatial) with each one added or removed
    ("0.1 default + next-layer least squares (high_correction lsq)", "resnet56", "2/6", None,
     {"dfmpc": {**V01, "high_correction": "lsq"}}),
    ("0.1 default, next-layer least squares instead of the gain", "resnet56", "2/6", None,
     {"dfmpc": {**V01, "high_correction": "lsq", "high_gain": False}}),
    ("0.1 default + shortcut correlation 0.3", "resnet56", "2/6", None, {"dfmpc": {**V01, "shortcut_corr": 0.3}}),
    ("0.1 default, low_rule last (block's 2nd conv low)", "resnet56", "2/6", None,
     {"dfmpc": {**V01, "low_rule": "last"}}),
    ("0.1 default + corr ternary support (per-channel threshold)", "resnet56", "2/6", None, {"dfmpc": CORR}),
    ("  + coordinate ascent, 64 steps (sigma blend)", "resnet56", "2/6", None, {"dfmpc": {"sigma_model": "blend"}}),
    ("  + sigma regression (auto after the ascent) = new default", "resnet56", "2/6", None, {}),
    ("new default, sigma tap", "resnet56", "2/6", None, {"dfmpc": {"sigma_model": "tap"}}),
    ("new default, 400 ascent steps", "resnet56", "2/6", None, {"dfmpc": {"refine_steps": 400}}),
    ("new default, rho 0.35", "resnet56", "2/6", None, {"dfmpc": {"rho": 0.35}}),
    ("new default - high-layer gain", "resnet56", "2/6", None, {"dfmpc": {"high_gain": False}}),
    ("new default - bias correction", "resnet56", "2/6", None, {"bias_correction": False}),
    ("new default + next-layer least squares", "resnet56", "2/6", None, {"dfmpc": {"high_correction": "lsq"}}),
    ("new default + shortcut correlation 0.3", "resnet56", "2/6", None, {"dfmpc": {"shortcut_corr": 0.3}}),
    ("new default + shortcut correlation -0.3", "resnet56", "2/6", None, {"dfmpc": {"shortcut_corr": -0.3}}),
    ("new default + shortcut correlation 0.6", "resnet56", "2/6", None, {"dfmpc": {"shortcut_corr": 0.6}}),
    ("new default, low_rule last", "resnet56", "2/6", None, {"dfmpc": {"low_rule": "last"}}),
    ("new default + paper c (lambda1 0.5)", "resnet56", "2/6", None, {"dfmpc": {"compensate": True}}),
    ("resnet56 3/6 0.1 default", "resnet56", "3/6", None, {"dfmpc": V01}),
    ("resnet56 3/6 new default (lsq grid, no ascent)", "resnet56", "3/6", None, {}),
    ("resnet56 3/6 corr + 64 ascent steps, sigma blend", "resnet56", "3/6", None,
     {"dfmpc": {"refine_steps": 64, "sigma_model": "blend"}}),
    ("resnet56 3/6 corr + 64 ascent steps, sigma regression", "resnet56", "3/6", None, {"dfmpc": {"refine_steps": 64}}),
]
RESULTS = [
    *[(f"{name} {bits} A{act or 'fp32'}", name, bits, act, {})
      for name in ("resnet20", "resnet32", "resnet44", "resnet56")
      for bits, act in (("2/6", None), ("2/6", 8), ("3/6", None))],
    ("resnet20 2/6 Afp32 plain LSQ ternary", "resnet20", "2/6", None, {"dfmpc": PLAIN, "bias_correction": False}),
    ("resnet56 2/6 Afp32 plain LSQ ternary", "resnet56", "2/6", None, {"dfmpc": PLAIN, "bias_correction": False}),
    ("resnet56 2/6 Afp32 0.1 default", "resnet56", "2/6", None, {"dfmpc": V01}),
    ("resnet56 2/6 Afp32 new default, sigma blend", "resnet56", "2/6", None, {"dfmpc": {"sigma_model": "blend"}}),
    ("resnet20 2/6 Afp32 new default, sigma blend", "resnet20", "2/6", None, {"dfmpc": {"sigma_model": "blend"}}),
    ("mobilenet 6/8 Afp32", "mobilenet_v1_0.75", "6/8", None, {}),
    ("mobilenet 4/8 Afp32", "mobilenet_v1_0.75", "4/8", None, {}),
    ("mobilenet 4/8 Afp32 corr + 64 ascent steps", "mobilenet_v1_0.75", "4/8", None, {"dfmpc": {"refine_steps": 64}}),
    ("mobilenet 4/8 Afp32 corr + 8 ascent steps", "mobilenet_v1_0.75", "4/8", None, {"dfmpc": {"refine_steps": 8}}),
    ("mobilenet 4/8 Afp32 sigma tap", "mobilenet_v1_0.75", "4/8", None, {"dfmpc": {"sigma_model": "tap"}}),
    ("mobilenet 4/8 Afp32 sigma regression", "mobilenet_v1_0.75", "4/8", None,
     {"dfmpc": {"sigma_model": "regression"}}),
    ("mobilenet 4/8 Afp32 plain", "mobilenet_v1_0.75", "4/8", None, {"dfmpc": PLAIN, "bias_correction": False}),
    ("mobilenet 4/8 Afp32 + CLE before", "mobilenet_v1_0.75", "4/8", None, {"cle": True}),
    ("mobilenet 4/8 Afp32 sigma blend + 64 ascent steps", "mobilenet_v1_0.75", "4/8", None,
     {"dfmpc": {"refine_steps": 64, "sigma_model": "blend"}}),
    ("mobilenet 4/8 Afp32 mean re-estimation only", "mobilenet_v1_0.75", "4/8", None,
     {"dfmpc": {"reestimate": "mean"}}),
    ("mobilenet 4/8 Afp32 absmax grid", "mobilenet_v1_0.75", "4/8", None, {"dfmpc": {"quantizer": "absmax"}}),
]


def _input_range(dataset: dict) -> tuple[float, float]:
    mean, std = np.asarray(dataset["mean"]), np.asarray(dataset["std"])
    return float(np.min(-mean / std)), float(np.max((1 - mean) / std))


def run_one(label: str, name: str, bits: str, act, options: dict, limit: int | None, datasets: dict) -> dict:
    dataset = IMAGENET if name.startswith("mobilenet") else CIFAR
    folder = "imagenet" if name.startswith("mobilenet") else "cifar10"
    start = time.perf_counter()
    result = quantize_model(ASSETS / folder / f"{name}.onnx", method="dfmpc", bits=bits, act_bits=act,
                            input_range=_input_range(dataset), **options)
    seconds = time.perf_counter() - start
    key = str(dataset["data"])
    if key not in datasets:
        datasets[key] = open_dataset(key, mean=dataset["mean"], std=dataset["std"],
                                     size=(224, 224) if folder == "imagenet" else None)
    acc = evaluate(result.model, datasets[key], limit=limit, batch_size=100 if folder == "cifar10" else 50)
    dfmpc = next(p for p in result.report["passes"] if p["name"] == "dfmpc")["params"]
    return {"label": label, "model": name, "bits": bits, "act_bits": act or "fp32", "options": options,
            "top1": round(acc.top1, 2), "count": acc.count, "fp32": FP32[name], "quantize_s": round(seconds, 2),
            "pairs": len(dfmpc["pairs"]), "average_weight_bits": round(result.report["average_weight_bits"], 3),
            "weight_storage_kb": round(result.report["weight_storage_bytes"] / 1024, 1)}


def write_markdown(rows: list[dict], path: Path) -> None:
    lines = ["# DF-MPC ablation and results", "",
             "Data-free (real data only to evaluate). `python tools/ablation_dfmpc.py`: the ResNet-56 ablation "
             "(`--set ablation --limit 2000`) on the first 2000 CIFAR-10 test images, the results (`--set results`) "
             "on the full test set (10 000) and ImageNet val1300; the images column says which.", "",
             "| run | model | bits | acts | top-1 | FP32 | pairs | avg bits | weights KiB | images |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    order = {run[0]: index for index, run in enumerate(ABLATION + RESULTS)}
    for row in sorted(rows, key=lambda r: order.get(r["label"], len(order))):
        lines.append(f"| {row['label']} | {row['model']} | {row['bits']} | {row['act_bits']} | {row['top1']:.2f} | "
                     f"{row['fp32']:.2f} | {row['pairs']} | {row['average_weight_bits']:.2f} | "
                     f"{row['weight_storage_kb']} | {row['count']} |")
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", default=None, help="keep runs whose label contains one of these")
    parser.add_argument("--set", choices=["ablation", "results", "all"], default="all", help="which runs")
    parser.add_argument("--limit", type=int, default=None, help="evaluate on the first N images only")
    parser.add_argument("--fresh", action="store_true", help="redo the selected runs even if the JSON has them")
    parser.add_argument("--out", default="tools/results/dfmpc_ablation")
    args = parser.parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    json_path = out.with_suffix(".json")
    done = {} if not json_path.exists() else {r["label"]: r for r in json.loads(json_path.read_text())}
    rows, datasets = [], {}
    runs = {"ablation": ABLATION, "results": RESULTS, "all": ABLATION + RESULTS}[args.set]
    for label, name, bits, act, options in runs:
        if args.only and not any(key in label for key in args.only):
            continue
        if not args.fresh and label in done and done[label]["count"] == (args.limit or done[label]["count"]):
            rows.append(done[label])
            continue
        row = run_one(label, name, bits, act, options, args.limit, datasets)
        print(f"{row['top1']:6.2f}  {label}  ({row['quantize_s']} s)", flush=True)
        rows.append(row)
        merged = {**done, **{r["label"]: r for r in rows}}
        json_path.write_text(json.dumps(list(merged.values()), indent=1))
        write_markdown(list(merged.values()), out.with_suffix(".md"))


if __name__ == "__main__":
    main()
