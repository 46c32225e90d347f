#!/usr/bin/env python3
"""Which of the prior's statistics cost the points on a BN-folded model: a swap study with real-image oracles.

A BN-folded model quantized without data takes every layer's per-channel output mean and std from the image prior.
This study quantizes it again with some of those statistics replaced by the ones real images give (the first
``--real`` labelled images, used here and nowhere in onnxdfq itself) and scores every variant on the remaining
images, so that the real images measured on are not the ones scored:

- ``prior``: the data-free default;
- ``real``: every layer's mean and std from real images (the oracle);
- ``real means`` / ``real stds``: only the one moment swapped;
- ``real on depthwise`` / ``real on pointwise``: both moments, only for the outputs of depthwise (group > 1) or of
  1x1 layers;
- ``propagated means, prior stds`` / ``..., real stds``: each layer's mean recomputed in graph order from its
  input's clipped-Gaussian mean (``statistics.linear_moments``), the std kept from the prior or from real images.

    python tools/stats_swap.py --model efficientnet_lite0            # writes tools/results/stats_swap_*.md
    python tools/stats_swap.py --model mobilenet_v1_0.75 --bits 4 --act-bits 8

Not a benchmark of onnxdfq's defaults: a diagnosis for the issue on BN-folded exports.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

import onnxdfq
from onnxdfq.eval.data import open_dataset
from onnxdfq.eval.runner import evaluate
from onnxdfq.eval.session import fold_batchnorm_copy
from onnxdfq.graph import layers as graph_layers
from onnxdfq.passes import channel_stats, statistics
from onnxdfq.passes.base import ChannelStats, Workspace

ROOT = Path(__file__).resolve().parents[1]
ASSETS = Path(os.environ.get("ONNXDFQ_ASSETS", ROOT.parent / "shared" / "assets"))
MODELS = {"efficientnet_lite0": ("imagenet/efficientnet_lite0.onnx", "imagenet/val1300", [0.498] * 3, [0.502] * 3),
          "mobilenet_v1_0.75": ("imagenet/mobilenet_v1_0.75.onnx", "imagenet/val1300", [0.5] * 3, [0.5] * 3),
          "resnet20": ("cifar10/resnet20.onnx", "cifar10/test.npz", [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])}

Edit = Callable[[Workspace, dict[str, tuple[np.ndarray, np.ndarray]]], None]


def _kind(layer: graph_layers.Layer) -> str:
    if layer.group > 1:
        return "depthwise"
    return "pointwise" if layer.weight.ndim == 4 and layer.weight.shape[2:] == (1, 1) else "other"


def _swap(mean: bool, std: bool, kinds: tuple[str, ...] = ("depthwise", "pointwise", "other")) -> Edit:
    def edit(ws: Workspace, real: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
        for layer in graph_layers.read_layers(ws.graph):
            known = ws.channel_stats.get(layer.name)
            if known is None or layer.name not in real or _kind(layer) not in kinds:
                continue
            real_mean, real_std = real[layer.name]
            ws.channel_stats[layer.name] = ChannelStats(real_mean if mean else known.mean,
                                                        real_std if std else known.std, known.source)
    return edit


def _propagated(real_std: bool) -> Edit:
    def edit(ws: Workspace, real: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
        if real_std:
            _swap(False, True)(ws, real)
        layers = graph_layers.read_layers(ws.graph)
        for layer in layers:  # graph order: each mean from the already recomputed means before it
            known = ws.channel_stats.get(layer.name)
            source = statistics.propagate_statistics(ws, layers).get(layer.input_name)
            if known is None or source is None or source.source == "input":
                continue
            in_mean, in_var = source.moments()
            if in_mean.size != layer.weight.shape[1] * layer.group:
                continue
            mean, _ = statistics.linear_moments(layer.weight, layer.bias, layer.group, in_mean, in_var)
            ws.channel_stats[layer.name] = ChannelStats(mean, known.std, known.source)
    return edit


VARIANTS: dict[str, Edit | None] = {
    "prior": None, "real": _swap(True, True), "real means": _swap(True, False), "real stds": _swap(False, True),
    "real on depthwise": _swap(True, True, ("depthwise",)), "real on pointwise": _swap(True, True, ("pointwise",)),
    "propagated means, prior stds": _propagated(False), "propagated means, real stds": _propagated(True)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="efficientnet_lite0")
    parser.add_argument("--method", default="squant")
    parser.add_argument("--bits", default="4")
    parser.add_argument("--act-bits", default="none")
    parser.add_argument("--real", type=int, default=64, help="real images the oracle statistics come from")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    path, data, mean, std = MODELS[args.model]
    work = Path(tempfile.mkdtemp(prefix="stats_swap_"))
    folded = work / "folded.onnx"
    fold_batchnorm_copy(ASSETS / path, folded)
    size = (224, 224) if "imagenet" in data else None  # val1300 is stored at 227 px
    dataset = open_dataset(ASSETS / data, mean=mean, std=std, size=size)
    real_x = np.concatenate([x for x, _ in dataset.batches(args.real, limit=args.real)])
    np.savez(work / "real.npz", x=real_x)
    act_bits = None if args.act_bits == "none" else int(args.act_bits)
    common = dict(method=args.method, bits=args.bits, act_bits=act_bits, mean=mean, std=std, check=False)

    original = channel_stats.MeasureChannelStatsPass.call
    real: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    edit: Edit | None = None

    def call(self, ws: Workspace):  # noqa: ANN001, ANN202
        report = original(self, ws)
        if edit is None:
            real.update({name: (st.mean, st.std) for name, st in ws.channel_stats.items()})
        else:
            edit(ws, real)
            statistics.invalidate(ws)
        return report

    channel_stats.MeasureChannelStatsPass.call = call
    try:
        onnxdfq.quantize_model(str(folded), **common, calib=f"data:{work / 'real.npz'}")
        rows = []
        for name, variant in VARIANTS.items():
            edit = variant if variant is not None else (lambda ws, real: None)
            start = time.perf_counter()
            model = onnxdfq.quantize_model(str(folded), **common).model
            top1 = evaluate(model, dataset, offset=args.real, batch_size=100).top1
            rows.append((name, top1, time.perf_counter() - start))
            print(f"{name:32s} {top1:6.2f}", flush=True)
    finally:
        channel_stats.MeasureChannelStatsPass.call = original
    kept = onnxdfq.quantize(str(ASSETS / path), **common)
    kept_top1 = evaluate(kept, dataset, offset=args.real, batch_size=100).top1
    bits = f"W{args.bits}A{args.act_bits}"
    lines = [f"# Statistics swap study: {args.model} BN-folded, {args.method} {bits}",
             "", f"Scored on images {args.real + 1}-{dataset.count} of {data}; oracle statistics from the first "
             f"{args.real}. BN kept (its own statistics): {kept_top1:.2f}.", "",
             "| statistics | top-1 |", "|---|---:|"]
    lines += [f"| {name} | {top1:.2f} |" for name, top1, _ in rows]
    out = args.out or ROOT / "tools" / "results" / f"stats_swap_{args.model}_{args.method}_{bits.lower()}.md"
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
