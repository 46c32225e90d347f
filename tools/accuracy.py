#!/usr/bin/env python3
"""Accuracy table on the shared real models: FP32 vs each method/width, one run, markdown + JSON.

usage: python tools/accuracy.py [--only SUBSTRING ...] [--out tools/results/accuracy]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import onnxdfq
from onnxdfq.pipeline import METHODS

ASSETS = Path(os.environ.get("ONNXDFQ_ASSETS", Path(__file__).resolve().parents[2] / "shared" / "assets"))
CIFAR = dict(data=ASSETS / "cifar10/test.npz", mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
IMAGENET = dict(data=ASSETS / "imagenet/val1300", mean=[0.5] * 3, std=[0.5] * 3)

# (model, dataset, method, bits, act_bits, granularity, extra options)
CONFIGS = [
    ("resnet20", CIFAR, "nearest", "8", "8", "channel", {}),
    ("resnet56", CIFAR, "nearest", "8", "8", "channel", {}),
    ("mobilenet_v1_0.75", IMAGENET, "nearest", "8", "8", "channel", {}),
    ("mobilenet_v1_0.75", IMAGENET, "nearest", "8", "8", "tensor", {}),
    ("mobilenet_v1_0.75", IMAGENET, "dfq", "8", "8", "tensor", {}),
    ("mobilenet_v1_0.75", IMAGENET, "dfq", "8", "8", "channel", {}),
    ("mobilenet_v1_0.75", IMAGENET, "dfq", "6", "8", "channel", {}),
    ("resnet20", CIFAR, "nearest", "6", "8", "tensor", {}),
    ("resnet20", CIFAR, "dfq", "6", "8", "tensor", {}),
    ("resnet56", CIFAR, "nearest", "6", "8", "tensor", {}),
    ("resnet56", CIFAR, "dfq", "6", "8", "tensor", {}),
    ("resnet20", CIFAR, "nearest", "4", "8", "channel", {}),
    ("resnet20", CIFAR, "squant", "4", "8", "channel", {}),
    ("resnet20", CIFAR, "nearest", "3", "none", "channel", {}),
    ("resnet20", CIFAR, "squant", "3", "none", "channel", {}),
    ("resnet56", CIFAR, "nearest", "3", "none", "channel", {}),
    ("resnet56", CIFAR, "squant", "3", "none", "channel", {}),
    ("resnet20", CIFAR, "nearest", "4", "4", "channel", {}),
    ("resnet20", CIFAR, "squant", "4", "4", "channel", {}),
    ("mobilenet_v1_0.75", IMAGENET, "nearest", "4", "8", "channel", {}),
    ("mobilenet_v1_0.75", IMAGENET, "squant", "4", "8", "channel", {}),
]


def model_path(name: str) -> Path:
    folder = "imagenet" if name.startswith("mobilenet") else "cifar10"
    return ASSETS / folder / f"{name}.onnx"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", nargs="*", default=None, help="keep configs whose label contains one of these")
    parser.add_argument("--out", default="tools/results/accuracy")
    args = parser.parse_args()
    rows, fp32_cache = [], {}
    for name, data, method, bits, act, gran, extra in CONFIGS:
        label = f"{name} {method} W{bits}A{act} {gran}"
        if method not in METHODS or (args.only and not any(s in label for s in args.only)):
            continue
        path = model_path(name)
        if name not in fp32_cache:
            fp32_cache[name] = onnxdfq.evaluate(path, str(data["data"]), mean=data["mean"], std=data["std"],
                                                batch_size=250).top1
        start = time.perf_counter()
        model = onnxdfq.quantize(path, method=method, bits=bits, act_bits=act, granularity=gran, **extra)
        seconds = time.perf_counter() - start
        top1 = onnxdfq.evaluate(model, str(data["data"]), mean=data["mean"], std=data["std"], batch_size=250).top1
        row = {"model": name, "method": method, "weights": f"W{bits}", "acts": "fp32" if act == "none" else f"A{act}",
               "granularity": gran, "top1": round(top1, 2), "fp32": round(fp32_cache[name], 2),
               "quantize_s": round(seconds, 3)}
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    header = ("| model | method | weights | acts | granularity | top-1 | FP32 | quantize s |\n"
              "|---|---|---|---|---|---|---|---|\n")
    table = header + "".join(f"| {r['model']} | {r['method']} | {r['weights']} | {r['acts']} | {r['granularity']} | "
                             f"{r['top1']:.2f} | {r['fp32']:.2f} | {r['quantize_s']:.2f} |\n" for r in rows)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(table)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    print(table)


if __name__ == "__main__":
    main()
