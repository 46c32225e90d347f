#!/usr/bin/env python3
"""Block reconstruction (--reconstruct) against the grids it starts from: top-1, time and peak memory.

Every row runs `onnxdfq quantize` as a user does (a fresh process, wall time and peak RSS from /usr/bin/time -v)
and `onnxdfq eval` on the full test set (CIFAR-10 test, 10 000 images; ImageNet val1300). Sample sources: the
default (DFFG for a model with BN; for a BN-folded one the prior's statistics, and samples from inverting the
classifier to learn on below 128 px, prior images above) and real training images (the oracle row:
`--calib data:` with 256 of CIFAR-10's train5000).

    python tools/bench_reconstruct.py                      # every row; writes tools/results/reconstruct.md/json
    python tools/bench_reconstruct.py --only resnet20      # one model
    python tools/bench_reconstruct.py --limit 2000         # fewer test images (a quick look)
    python tools/bench_reconstruct.py --only resnet20 --update   # re-run one model, keep the other rows
    python tools/bench_reconstruct.py --match DFFG --update      # re-run the rows whose config says DFFG
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
from bench_cost import asset_file, eval_top1, timed_quantize  # noqa: E402  (the same /usr/bin/time -v run as the cost table)

ASSETS = Path(os.environ.get("ONNXDFQ_ASSETS", ROOT.parent / "shared" / "assets"))
CIFAR = ["--preprocess", "imagenet"]  # the shared CIFAR ResNets were trained on ImageNet's mean/std
MODELS = {
    "resnet20": ("cifar10/resnet20.onnx", "cifar10/test.npz", CIFAR),
    "resnet56": ("cifar10/resnet56.onnx", "cifar10/test.npz", CIFAR),
    "resnet20_folded": ("fold:cifar10/resnet20.onnx", "cifar10/test.npz", CIFAR),
    "resnet56_folded": ("fold:cifar10/resnet56.onnx", "cifar10/test.npz", CIFAR),
    "mobilenet_v1_0.75": ("imagenet/mobilenet_v1_0.75.onnx", "imagenet/val1300", ["--preprocess", "inception"]),
    "efficientnet_lite0": ("imagenet/efficientnet_lite0.onnx", "imagenet/val1300",
                           ["--mean", "0.498,0.498,0.498", "--std", "0.502,0.502,0.502"]),
}
ORACLE = ["--calib", "data:" + str(ASSETS / "cifar10" / "train5000.npz"), "--reconstruct-samples", "256"]
W4A4 = ["--method", "squant", "--bits", "4", "--act-bits", "4"]
W3A3 = ["--method", "squant", "--bits", "3", "--act-bits", "3"]
W4A8 = ["--method", "squant", "--bits", "4", "--act-bits", "8"]
FL8 = ["--first-last-bits", "8"]
GPTQ = ["--method", "gptq", "--bits", "4"]  # GPTQ rounding on the same generated samples (passes/gptq.py)
GPTQ44 = GPTQ + ["--act-bits", "4"]
REC = ["--reconstruct"]
# (model, label, flags)
ROWS = [
    ("resnet20", "W4A4 squant", W4A4),
    ("resnet20", "W4A4 squant + reconstruct (DFFG)", W4A4 + REC),
    ("resnet20", "W4A4 fl8 squant", W4A4 + FL8),
    ("resnet20", "W4A4 fl8 squant + reconstruct (DFFG)", W4A4 + FL8 + REC),
    ("resnet20", "W4A4 fl8 squant + reconstruct (prior)", W4A4 + FL8 + REC + ["--calib", "prior"]),
    ("resnet20", "W4A4 fl8 squant + reconstruct (real, oracle)", W4A4 + FL8 + REC + ORACLE),
    ("resnet20", "W3A3 fl8 squant", W3A3 + FL8),
    ("resnet20", "W3A3 fl8 squant + reconstruct (DFFG)", W3A3 + FL8 + REC),
    ("resnet20", "W4A8 squant + reconstruct (DFFG)", W4A8 + REC),
    ("resnet20", "W8A8 squant + reconstruct (DFFG)", ["--method", "squant"] + REC),
    ("resnet20", "W4A8 gptq (DFFG)", GPTQ),
    ("resnet20", "W4A4 gptq (DFFG)", GPTQ + ["--act-bits", "4"]),
    ("resnet20", "W4A4 fl8 gptq + reconstruct (DFFG)", GPTQ + ["--act-bits", "4"] + FL8 + REC),
    ("resnet20", "W4A4 gptq + reconstruct (DFFG; the default start)", GPTQ + ["--act-bits", "4"] + REC),
    ("resnet20", "W3A8 squant", ["--method", "squant", "--bits", "3"]),
    ("resnet20", "W3A8 gptq (DFFG)", ["--method", "gptq", "--bits", "3"]),
    ("resnet20_folded", "W4A4 squant", W4A4),
    ("resnet20_folded", "W4A4 squant + reconstruct (prior)", W4A4 + REC + ["--calib", "prior"]),
    ("resnet20_folded", "W4A4 squant + reconstruct (inverted, default)", W4A4 + REC),
    ("resnet20_folded", "W4A4 fl8 squant", W4A4 + FL8),
    ("resnet20_folded", "W4A4 fl8 squant + reconstruct (inverted, default)", W4A4 + FL8 + REC),
    ("resnet20_folded", "W4A4 gptq (prior)", GPTQ + ["--act-bits", "4", "--calib", "prior"]),
    ("resnet20_folded", "W4A4 gptq (inverted, default)", GPTQ + ["--act-bits", "4"]),
    ("resnet20_folded", "W4A4 gptq + reconstruct (inverted; the default start)", GPTQ + ["--act-bits", "4"] + REC),
    ("resnet20_folded", "W4A4 squant + reconstruct (pseudo-BN DFFG)", W4A4 + REC + ["--pseudo-bn"]),
    ("resnet56", "W4A4 fl8 squant", W4A4 + FL8),
    ("resnet56", "W4A4 fl8 squant + reconstruct (DFFG)", W4A4 + FL8 + REC),
    ("resnet56_folded", "W4A4 squant", W4A4),
    ("resnet56_folded", "W4A4 squant + reconstruct (inverted, default)", W4A4 + REC),
    ("mobilenet_v1_0.75", "W4A8 squant", W4A8),
    ("mobilenet_v1_0.75", "W4A8 squant + reconstruct (DFFG)", W4A8 + REC),
    ("mobilenet_v1_0.75", "W4A8 gptq (DFFG)", GPTQ),
    ("mobilenet_v1_0.75", "W4A8 gptq + reconstruct (DFFG; the default start)", GPTQ + REC),
    ("mobilenet_v1_0.75", "W4A4 squant", W4A4),
    ("mobilenet_v1_0.75", "W4A4 gptq (DFFG)", GPTQ + ["--act-bits", "4"]),
    ("mobilenet_v1_0.75", "W4A4 squant + reconstruct (DFFG)", W4A4 + REC),
    ("mobilenet_v1_0.75", "W4A4 gptq + reconstruct (DFFG; the default start)", GPTQ44 + REC),
    ("mobilenet_v1_0.75", "W4A4 fl8 squant", W4A4 + FL8),
    ("mobilenet_v1_0.75", "W4A4 fl8 squant + reconstruct (DFFG)", W4A4 + FL8 + REC),
    ("mobilenet_v1_0.75", "W4A4 fl8 gptq + reconstruct (DFFG; the default start)", GPTQ44 + FL8 + REC),
    ("mobilenet_v1_0.75", "dfmpc 4/8", ["--method", "dfmpc", "--bits", "4/8"]),
    ("mobilenet_v1_0.75", "dfmpc 4/8 + reconstruct (DFFG)", ["--method", "dfmpc", "--bits", "4/8"] + REC),
    ("efficientnet_lite0", "W4A8 squant", W4A8),
    ("efficientnet_lite0", "W4A8 squant + reconstruct (DFFG)", W4A8 + REC),
    ("efficientnet_lite0", "W4A8 gptq (DFFG)", GPTQ),
    ("efficientnet_lite0", "W4A8 gptq + reconstruct (DFFG; the default start)", GPTQ + REC),
    ("efficientnet_lite0", "W4A4 squant", W4A4),
    ("efficientnet_lite0", "W4A4 squant + reconstruct (DFFG)", W4A4 + REC),
]


def run_row(model: str, flags: list[str], work: Path, limit: int | None) -> dict:
    out, report = work / "q.onnx", work / "report.json"
    source, data, pre = MODELS[model]
    timed = timed_quantize(asset_file(model, source, work), [*pre, *flags], out, report)
    if "error" in timed:
        return timed
    info = json.loads(report.read_text())
    rec = next((p for p in info["passes"] if p["name"] == "reconstruct"), None)
    hessians = next((p for p in info["passes"] if p["name"] == "hessians"), None)
    row = {"top1": eval_top1(out, data, limit), "wall_s": round(timed["wall_s"], 1),
           "peak_mb": timed["peak_mb"]}
    if hessians is not None:
        row.update(samples=f"{hessians['params']['samples']} {hessians['params']['source']}",
                   hessian_s=hessians["params"]["seconds"])
    if rec is not None and "skipped" in rec["params"]:
        row.update(samples="skipped: " + rec["params"]["skipped"].split(":")[0])
    elif rec is not None:
        blocks = rec["layers"].values()
        steps = rec["params"].get("sample_info", {}).get("steps")
        source = f"{rec['params']['samples']} {rec['params']['source']}" + (f", {steps} steps" if steps else "")
        row.update(samples=source,
                   reconstruct_s=rec["params"]["seconds"],
                   mse_before=round(sum(b["mse_before"] for b in blocks), 4),
                   mse_after=round(sum(b["mse_after"] for b in blocks), 4))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", default=None, help="models to run")
    parser.add_argument("--limit", type=int, default=None, help="test images (default: all)")
    parser.add_argument("--out", default="reconstruct", help="results/NAME.md and .json")
    parser.add_argument("--match", default=None, help="run only the rows whose config contains this text")
    parser.add_argument("--update", action="store_true",
                        help="with --only / --match: re-run those rows and keep the others of results/NAME.json")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="onnxdfq-rec-"))
    out = ROOT / "tools" / "results"
    kept = {}
    if args.update and (out / f"{args.out}.json").exists():
        previous = json.loads((out / f"{args.out}.json").read_text())
        if previous.get("limit") == args.limit:
            kept = {(r["model"], r["config"]): r for r in previous["rows"]}
    rows = []
    for model, label, flags in ROWS:
        if (args.only and model not in args.only) or (args.match and args.match not in label):
            if (model, label) in kept:
                rows.append(kept[(model, label)])
            continue
        row = {"model": model, "config": label, "flags": " ".join(flags), **run_row(model, flags, work, args.limit)}
        rows.append(row)
        print(json.dumps(row), flush=True)
        (out / f"{args.out}.json").write_text(json.dumps({"limit": args.limit, "rows": rows + [
            r for key, r in kept.items() if key not in {(x["model"], x["config"]) for x in rows}]}, indent=1))
    (out / f"{args.out}.json").write_text(json.dumps({"limit": args.limit, "rows": rows}, indent=1))
    lines = ["# Block reconstruction (tools/bench_reconstruct.py)", "",
             f"`onnxdfq quantize` then `onnxdfq eval` on {f'the first {args.limit}' if args.limit else 'all'} test "
             "images (CIFAR-10 test; ImageNet val1300), a fresh process per row on this 2-core machine (wall time and "
             "peak RSS of the quantize run, sample generation included). fl8 = `--first-last-bits 8`. Samples: DFFG "
             "(generated from the BN statistics, the default for a model with BN, kept inside the input's box the "
             "preprocessing gives), inverted (images the classifier assigns to random classes, `synth:invert`: what a "
             "BN-folded model under 128 px learns on by default), prior images, 256 real CIFAR-10 training images "
             "(the oracle). Reconstruction MSE: block output against FP32, summed over blocks, before -> after. gptq: "
             "GPTQ rounding through each layer's input Hessian on the "
             "same samples (`--method gptq`; the Hessians' seconds in the reconstruct column, marked H).", "",
             "| model | config | top-1 | wall s | peak MB | samples | reconstruct s | MSE before -> after |",
             "|---|---|---:|---:|---:|---|---:|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['config']} | error: {r['error']} | | | | | |")
            continue
        mse = f"{r['mse_before']} -> {r['mse_after']}" if "mse_before" in r else ""
        hessian = f" (H {r['hessian_s']})" if "hessian_s" in r else ""
        lines.append(f"| {r['model']} | {r['config']} | {r['top1']:.2f} | {r['wall_s']} | {r['peak_mb']} | "
                     f"{r.get('samples', '')} | {r.get('reconstruct_s', '')}"
                     f"{hessian} | {mse} |")
    (out / f"{args.out}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
