#!/usr/bin/env python3
"""Activation calibration table: BN statistics vs real images vs ZeroQ / DSG / DFFG samples.

    python tools/calibration.py [--only SUBSTRING ...] [--estimators mse,percentile,minmax]
                                [--cache /tmp/onnxdfq_calib_cache] [--out tools/results/calibration]
                                [--generate-only] [--limit N]

For ResNet-20 and ResNet-56 (CIFAR-10): W8A8, W6A6 and W4A4 per-channel nearest weights, with
activation ranges from BN statistics (``--calib bn``), from the first 256 real ``train5000``
images, and from 256 samples of each generator; MobileNet-V1 0.75 W8A8 per-channel with BN
ranges and with DFFG samples. Every calibrated row uses the same estimator; one setting is also
run with every estimator. Generated sets are cached as ``.npz`` under ``--cache`` (the same files
``onnxdfq synth`` writes), so reruns only quantize and evaluate. Top-1 is on the full test sets
unless ``--limit`` is given. Writes ``calibration.md`` and ``calibration.json``.
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

import onnxdfq

ASSETS = Path(os.environ.get("ONNXDFQ_ASSETS", Path(__file__).resolve().parents[2] / "shared" / "assets"))
CIFAR = {"data": ASSETS / "cifar10/test.npz", "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
         "real": ASSETS / "cifar10/train5000.npz"}
IMAGENET = {"data": ASSETS / "imagenet/val1300", "mean": [0.5] * 3, "std": [0.5] * 3, "real": None}
MODELS = {
    "resnet20": (ASSETS / "cifar10/resnet20.onnx", CIFAR),
    "resnet56": (ASSETS / "cifar10/resnet56.onnx", CIFAR),
    "mobilenet_v1_0.75": (ASSETS / "imagenet/mobilenet_v1_0.75.onnx", IMAGENET),
}
SAMPLES = 256  # calibration samples of real data, and of DFFG
SEED = 0
# Generator settings, chosen to fit a shared 2-core CPU (one torch thread: with more threads than
# free cores, torch's OpenMP spinning made ResNet-56 steps 8x slower). ZeroQ / DSG: 64 samples
# (2 batches of 32) with 100 Adam steps per batch instead of 500: 200 forward+backward passes of
# 32 images (ZeroQ's defaults for 256 samples: 4000). DFFG: its defaults (150 steps, one batch of
# 32 seeds, 8 iterates kept per seed = 256 samples); on MobileNet (inputs in [-1, 1]) alpha 0.05
# as its docstring recommends, and 16 seeds x 16 iterates to halve the cost at 224 x 224.
SYNTH = {
    "zeroq": {"n": 64, "steps": 100},
    "dsg": {"n": 64, "steps": 100},
    "dffg": {"n": SAMPLES},
}
SYNTH_PER_MODEL = {"mobilenet_v1_0.75": {"dffg": {"alpha": 0.05, "batch_size": 16, "keep": 16}}}
BEST_ESTIMATOR = "mse"  # the estimator of the main table (see the per-estimator rows)

# (model, bits, act bits, calibration sources)
CIFAR_SOURCES = ["bn", "real", "zeroq", "dsg", "dffg"]
CONFIGS = [
    ("resnet20", "8", "8", CIFAR_SOURCES),
    ("resnet20", "6", "6", CIFAR_SOURCES),
    ("resnet20", "4", "4", CIFAR_SOURCES),
    ("resnet56", "8", "8", CIFAR_SOURCES),
    ("resnet56", "6", "6", CIFAR_SOURCES),
    ("resnet56", "4", "4", CIFAR_SOURCES),
    ("mobilenet_v1_0.75", "8", "8", ["bn", "dffg"]),
]
# one setting with every estimator (same samples)
ESTIMATOR_SWEEP = [("resnet20", "4", "4", ["real", "dffg"]), ("resnet20", "6", "6", ["real", "dffg"])]


def synth_options(model: str, method: str) -> dict[str, Any]:
    return {**SYNTH[method], **SYNTH_PER_MODEL.get(model, {}).get(method, {})}


def cached_synth(model: str, method: str, cache: Path) -> tuple[Path, dict[str, Any]]:
    """The ``.npz`` of SAMPLES ``method`` samples for ``model`` (generated once), and its metadata."""
    from onnxdfq import synth

    options = synth_options(model, method)
    n, batch_size = options.pop("n"), options.pop("batch_size", 32)
    tag = "_".join(f"{k}{v}" for k, v in sorted(options.items()))
    path = cache / f"{model}_{method}_n{n}_b{batch_size}_seed{SEED}{'_' + tag if tag else ''}.npz"
    if path.exists():
        with np.load(path, allow_pickle=False) as data:
            return path, json.loads(str(data["meta"]))
    proto = onnx.load(str(MODELS[model][0]))
    start = time.perf_counter()
    samples = synth.generate(proto, method, n, batch_size=batch_size, seed=SEED, **options)
    seconds = time.perf_counter() - start
    noise = np.random.default_rng(SEED).standard_normal(samples.shape).astype(np.float32)
    meta = {"method": method, "samples": int(samples.shape[0]), "seed": SEED, "batch_size": batch_size,
            "steps": options.get("steps", synth.get_generator(method).default_steps),
            "options": {k: v for k, v in options.items() if k != "steps"}, "seconds": round(seconds, 1),
            "bn_loss": synth.bn_statistics_loss(proto, samples),
            "noise_bn_loss": synth.bn_statistics_loss(proto, noise)}
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, x=samples, meta=np.array(json.dumps(meta)))
    os.replace(tmp, path)
    print(f"generated {path.name}: {seconds:.0f} s, BN loss {meta['bn_loss']:.4g}", file=sys.stderr, flush=True)
    return path, meta


def calib_options(model: str, source: str, estimator: str, cache: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """quantize_model options for one calibration source, and what to report about it."""
    _, data = MODELS[model]
    if source == "bn":
        return {"mean": data["mean"], "std": data["std"]}, {}
    common = {"calib_range": estimator, "mean": data["mean"], "std": data["std"]}
    if source == "real":
        return {**common, "calib": f"data:{data['real']}", "calib_samples": SAMPLES}, {"data": data["real"].name}
    path, meta = cached_synth(model, source, cache)
    return {**common, "calib": f"data:{path}"}, meta


def top1(model: Any, data: dict[str, Any], limit: int | None) -> float:
    """Top-1 (%) with a one-thread onnxruntime session (the machine is shared)."""
    from onnxdfq.eval.data import open_dataset
    from onnxdfq.eval.metrics import topk_correct
    from onnxdfq.eval.session import make_session

    session = make_session(model, "cpu", threads=1)
    name, shape = session.get_inputs()[0].name, session.get_inputs()[0].shape
    dataset = open_dataset(data["data"], mean=data["mean"], std=data["std"], size=tuple(shape[2:4]))
    correct = seen = 0
    for x, y in dataset.batches(250, limit):
        correct += topk_correct(session.run(None, {name: x})[0], y, 1)
        seen += len(y)
    return 100.0 * correct / seen


def run_row(model: str, bits: str, act: str, source: str, estimator: str, cache: Path,
            limit: int | None, fp32: dict[str, float]) -> dict[str, Any]:
    """One table cell; rows already computed (same settings and limit) come from the cache."""
    key = f"{model} W{bits}A{act} {source} {estimator if source != 'bn' else '-'} limit={limit}"
    done_path = cache / "rows.json"
    done = json.loads(done_path.read_text()) if done_path.exists() else {}
    if key in done:
        return done[key]
    path, data = MODELS[model]
    options, meta = calib_options(model, source, estimator, cache)
    if model not in fp32:
        fp32[model] = done.get(f"fp32 {model} limit={limit}") or top1(str(path), data, limit)
    start = time.perf_counter()
    result = onnxdfq.quantize_model(path, method="nearest", bits=bits, act_bits=act, granularity="channel",
                                    **options)
    seconds = time.perf_counter() - start
    row = {"model": model, "weights": f"W{bits}", "acts": f"A{act}", "source": source,
           "estimator": "-" if source == "bn" else estimator, "top1": round(top1(result.model, data, limit), 2),
           "fp32": round(fp32[model], 2), "quantize_s": round(seconds, 2), "samples": result.report["calibration"].get(
               "samples"), "synth": meta if source in SYNTH else None, "limit": limit}
    done = json.loads(done_path.read_text()) if done_path.exists() else {}  # another run may have added rows
    done[key] = row
    done[f"fp32 {model} limit={limit}"] = fp32[model]
    tmp = done_path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(done, indent=1))
    os.replace(tmp, done_path)
    return row


def to_markdown(rows: list[dict[str, Any]], sweep: list[dict[str, Any]], synth_meta: dict[str, dict],
                limit: int | None, sweep_limit: int | None) -> str:
    lines = ["# Activation calibration: BN statistics, real images and synthetic samples", "",
             f"`python tools/calibration.py {' '.join(sys.argv[1:])}` on {platform.machine()} ({os.cpu_count()} "
             f"CPU cores), onnxruntime CPU EP. Nearest per-channel weights, estimator "
             f"`{BEST_ESTIMATOR}` unless listed; top-1 on "
             + (f"the first {limit} test images." if limit else
                "the full test sets (CIFAR-10: 10 000, val1300: 1300)."),
             "`real` = the first 256 images of `train5000.npz`; `bn` = ranges from BN statistics (no data); "
             "zeroq / dsg / dffg = every sample of the generated set (counts below).", ""]
    table: dict[tuple[str, str], dict[str, float]] = {}
    for row in rows:
        table.setdefault((row["model"], f"{row['weights']}{row['acts']}"), {})[row["source"]] = row["top1"]
    sources = ["bn", "real", "zeroq", "dsg", "dffg"]
    lines += ["| model | bits | FP32 | " + " | ".join(sources) + " |", "|---|---|---|" + "---|" * len(sources)]
    fp32 = {row["model"]: row["fp32"] for row in rows}
    for (model, bits), values in table.items():
        cells = [f"{values[s]:.2f}" if s in values else "-" for s in sources]
        lines.append(f"| {model} | {bits} | {fp32[model]:.2f} | " + " | ".join(cells) + " |")
    if sweep:
        lines += ["", f"Estimators (same samples; top-1 on the first {sweep_limit} test images):", "",
                  "| model | bits | source | estimator | top-1 |",
                  "|---|---|---|---|---|"]
        lines += [f"| {r['model']} | {r['weights']}{r['acts']} | {r['source']} | {r['estimator']} | {r['top1']:.2f} |"
                  for r in sweep]
    if synth_meta:
        lines += ["", "Generated sets (seed 0, CPU, one torch thread on a shared machine: seconds are indicative):",
                  "", "| model | method | samples | batch | steps per batch | options | seconds | BN loss "
                  "| noise BN loss |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for (model, method), meta in sorted(synth_meta.items()):
            options = ", ".join(f"{k}={v}" for k, v in meta["options"].items()) or "defaults"
            lines.append(f"| {model} | {method} | {meta['samples']} | {meta['batch_size']} | {meta['steps']} "
                         f"| {options} | {meta['seconds']:.0f} "
                         f"| {meta['bn_loss']:.4g} | {meta['noise_bn_loss']:.4g} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="*", default=None, help="keep rows whose 'model WxAy source' has one of these")
    parser.add_argument("--estimators", default="mse,percentile,minmax", help="estimators of the sweep rows")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/onnxdfq_calib_cache"))
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "calibration"))
    parser.add_argument("--generate-only", action="store_true", help="only fill the cache of generated samples")
    parser.add_argument("--limit", type=int, default=None, help="evaluate on the first N test images only")
    parser.add_argument("--sweep-limit", type=int, default=2000, help="test images for the estimator sweep rows")
    args = parser.parse_args()

    def wanted(model: str, bits: str, act: str, source: str) -> bool:
        label = f"{model} W{bits}A{act} {source}"
        return not args.only or any(s in label for s in args.only)

    if args.generate_only:
        for model, _, _, sources in CONFIGS:
            for source in sources:
                if source in SYNTH and wanted(model, "", "", source):
                    cached_synth(model, source, args.cache)
        return
    rows, sweep, fp32, fp32_sweep, synth_meta = [], [], {}, {}, {}
    for model, bits, act, sources in CONFIGS:
        for source in sources:
            if wanted(model, bits, act, source):
                rows.append(run_row(model, bits, act, source, BEST_ESTIMATOR, args.cache, args.limit, fp32))
                print(json.dumps({k: v for k, v in rows[-1].items() if k != "synth"}), file=sys.stderr, flush=True)
                if rows[-1]["synth"]:
                    synth_meta[(model, source)] = rows[-1]["synth"]
    for model, bits, act, sources in ESTIMATOR_SWEEP:
        for source in sources:
            for estimator in [e.strip() for e in args.estimators.split(",") if e.strip()]:
                if wanted(model, bits, act, source):
                    sweep.append(run_row(model, bits, act, source, estimator, args.cache, args.sweep_limit,
                                         fp32_sweep))
                    print(json.dumps({k: v for k, v in sweep[-1].items() if k != "synth"}), file=sys.stderr,
                          flush=True)
    markdown = to_markdown(rows, sweep, synth_meta, args.limit, args.sweep_limit)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(markdown)
    out.with_suffix(".json").write_text(json.dumps({"rows": rows, "estimator_sweep": sweep,
                                                    "limit": args.limit}, indent=1) + "\n")
    print(markdown)


if __name__ == "__main__":
    main()
