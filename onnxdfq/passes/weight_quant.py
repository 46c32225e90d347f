"""Weight quantization: choose each layer's grid and round its weights (nearest or a smarter rounder)."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable

import numpy as np

from onnxdfq.graph import layers as graph_layers
from onnxdfq.graph.patterns import linear_streams
from onnxdfq.passes.base import LayerRow, Pass, PassReport, WeightQuant, Workspace
from onnxdfq.passes.gptq import gptq_round, output_error
from onnxdfq.passes.squant import squant_mean_flips
from onnxdfq.passes.statistics import tensor_statistics
from onnxdfq.quant.fake import quantize, sqnr_db
from onnxdfq.quant.gaussian import clipped_mean_scale_slope
from onnxdfq.quant.qparams import TINY_SCALE, mse_weight_absmax, weight_scale
from onnxdfq.quant.scheme import BitWidthMap, QuantScheme

__all__ = ["Rounder", "nearest_round", "get_rounder", "WeightQuantPass"]

logger = logging.getLogger(__name__)

# GPTQ's 4-bit layers under 8-bit (or float) activations take the MSE-optimal clipped weight range instead of
# max |w|: the error GPTQ spreads over the remaining columns is smaller on the finer grid. gptq, no data:
# MobileNet-V1 W4A8 69.15 / 69.08 -> 70.46 / 70.62 % (seeds 0, 1), EfficientNet-Lite0 W4A8 75.46 -> 75.77 (BN
# folded: 74.23 -> 76.31); worse on the BN-folded MobileNet-V1 W4A8 (65.15 -> 64.23). Under 4-bit activations it
# was mixed (ResNet-20 / -56 W4A4 +0.5, MobileNet-V1 W4A4 40.92 -> 38.69), at 3 bits it cost ResNet-20 W3A8 on
# real samples 0.45 (90.58 -> 90.13), and SQuant's rounding loses with it (MobileNet-V1 W4A8 67.31 -> 63.92), so
# those keep max |w|.
GPTQ_CLIP_BITS = 4

# rounder(w_fp [O, ...] float, scale [O] or [1], qmin, qmax) -> signed integer array of w_fp's shape
Rounder = Callable[[np.ndarray, np.ndarray, int, int], np.ndarray]


def nearest_round(w_fp: np.ndarray, scale: np.ndarray, qmin: int, qmax: int) -> np.ndarray:
    return quantize(np.asarray(w_fp, np.float64), scale, qmin, qmax, axis=0)


def get_rounder(method: str, **options) -> Rounder:
    """The rounder of ``method``; gptq's layers without a Hessian (none fetched for them) fall back to SQuant."""
    if method == "gptq":
        method = "squant"
    if method == "nearest":
        return nearest_round
    if method == "squant":
        from onnxdfq.passes.squant import squant_round

        stages = tuple(options.get("stages") or ("e", "k", "c"))

        def rounder(w_fp, scale, qmin, qmax):
            return squant_round(w_fp, scale, qmin, qmax, stages=stages)

        return rounder
    raise ValueError(f"unknown rounding method {method!r}")


def reduced_range_layers(layers: list, bitmap: BitWidthMap, act_ranges: dict, mode: bool | str,
                         act_bits: int | None) -> list[str]:
    """Layers that get 7-bit weights because their 8-bit input is signed (``mode`` "auto"; True: every 8-bit layer).

    onnxruntime's x86 kernels without VNNI shift int8 activations to uint8 and add pairs of
    uint8 x int8 products in int16 (vpmaddubsw), which saturates for large |w|: measured on
    ResNet-20 W8A8, the stem conv alone costs 0.9 top-1. |w_int| <= 63 cannot saturate.
    ReLU outputs (uint8, zero point 0) are small and keep the full 8-bit weight grid.
    """
    if mode is False or act_bits != 8:
        return []
    reduced = []
    for layer in layers:
        if bitmap.bits_for(layer.name, layer.op_type) != 8:
            continue
        act_range = act_ranges.get(layer.input_name)
        if mode is True or (act_range is not None and act_range.lo < 0):
            reduced.append(layer.name)
    return sorted(reduced)


class WeightQuantPass(Pass):
    """Quantize every layer's weight onto a symmetric signed grid (zero point 0).

    Widths come from ws.bit_widths when a pass planned them (DF-MPC) and ``bits`` otherwise; layers that
    already hold integer weights (DF-MPC's low layers) are left as they are.
    """

    name = "weight_quant"
    changes_graph = False  # integers go to ws.weight_quant; the float graph is untouched

    def __init__(self, bits: int | BitWidthMap = 8, *, per_channel: bool = True, method: str = "nearest",
                 rounder: Rounder | None = None, stages: tuple[str, ...] | None = None,
                 reduce_range: bool | str = False, act_bits: int | None = None) -> None:
        self.bitmap = bits if isinstance(bits, BitWidthMap) else BitWidthMap(bits)
        self.per_channel = per_channel
        self.method = method
        self.rounder = rounder or get_rounder(method, stages=stages)
        self.reduce_range, self.act_bits = reduce_range, act_bits

    def call(self, ws: Workspace) -> PassReport:
        report = PassReport(self.name, params={"method": self.method, "per_channel": self.per_channel,
                                               "default_bits": self.bitmap.default})
        layers = graph_layers.read_layers(ws.graph)
        bitmap = ws.bit_widths or self.bitmap
        ws.reduced_range = reduced_range_layers(layers, bitmap, ws.act_ranges, self.reduce_range, self.act_bits)
        if ws.reduced_range:
            bitmap = bitmap.with_names(dict.fromkeys(ws.reduced_range, 7))
        zero_channels: dict[str, int] = {}
        uncertain = self._uncertain_means(ws, layers) if self.method == "squant" else {}
        for layer in layers:
            if layer.name in ws.weight_quant:
                continue
            bits = bitmap.bits_for(layer.name, layer.op_type)
            scheme = QuantScheme(bits, signed=True, symmetric=True, per_channel=self.per_channel, axis=0)
            # popped: each [D, D] is freed once its layer is rounded (ResNet-50's 3x3 convs hold 85 MB each)
            hessian, rows = ws.hessians.pop(layer.name, (None, 0)) if self.method == "gptq" else (None, 0)
            clipped = (hessian is not None and bits == GPTQ_CLIP_BITS
                       and (self.act_bits is None or self.act_bits >= 8))
            with warnings.catch_warnings(record=True) as caught:  # all-zero channels: say which layer
                warnings.simplefilter("always", RuntimeWarning)
                scale = weight_scale(layer.weight, scheme, mse_weight_absmax(layer.weight, scheme) if clipped else None)
            if caught:
                zero_channels[layer.name] = int((np.asarray(scale) <= TINY_SCALE).sum())
            if hessian is not None:
                w_int = gptq_round(layer.weight, scale, scheme.qmin, scheme.qmax, hessian, rows)
            else:
                w_int = self.rounder(layer.weight, scale, scheme.qmin, scheme.qmax)
                if layer.name in uncertain:
                    w_int = squant_mean_flips(layer.weight, scale, w_int, uncertain[layer.name][1], scheme.qmin,
                                              scheme.qmax)
            quant = WeightQuant(bits, scale, w_int, self.per_channel, self.method)
            ws.weight_quant[layer.name] = quant
            dequantized = quant.dequantized()
            row = {"bits": bits, "scale_min": float(scale.min()), "scale_max": float(scale.max()),
                   "weight_range": "mse" if clipped else "absmax",
                   "weight_sqnr_db": round(sqnr_db(layer.weight, dequantized), 3)}
            if layer.name in uncertain:
                row["mean_weighted_flips"] = uncertain[layer.name][0]
            if hessian is not None:  # the layer's output error on the samples, against nearest rounding's
                nearest = WeightQuant(bits, scale, nearest_round(layer.weight, scale, scheme.qmin, scheme.qmax),
                                      self.per_channel, "nearest").dequantized()
                base_error = output_error(layer.weight, nearest, hessian)
                row["output_error_vs_nearest"] = round(output_error(layer.weight, dequantized, hessian) / base_error,
                                                       4) if base_error > 0 else 1.0
            report.rows.append(LayerRow(layer.name, row))
        if zero_channels:  # dead channels (CLE cuts them out on purpose) quantize to exact zeros
            report.warnings.append(f"{sum(zero_channels.values())} all-zero weight channel(s) in {len(zero_channels)} "
                                   "layer(s), stored as zeros: " + ", ".join(f"{k} ({v})" for k, v in
                                                                            zero_channels.items()))
        if uncertain:
            kinds = [kind for kind, _ in uncertain.values()]
            report.params["mean_weighted_flips"] = {kind: kinds.count(kind) for kind in ("stream", "clipped")}
        if self.method == "gptq":
            ws.hessians = {}  # layers this pass did not round (DF-MPC's) leave theirs too
        report.modified = bool(report.rows)
        return report

    @staticmethod
    def _uncertain_means(ws: Workspace, layers: list[graph_layers.Layer]) -> dict[str, tuple[str, np.ndarray]]:
        """Layers (groups of one) whose input means come from prior images, with the per-input-channel direction
        those means are most likely wrong along; SQuant balances the error weighted by it (``squant_mean_flips``).

        - ``stream``: the input is a linear stream (``linear_streams``): the prior's means themselves, which there
          are mostly the prior's own offset. BN-folded EfficientNet-Lite0 squant W4A8 on val1300: 74.46 -> 75.77 %
          (on every 1x1 layer instead: 75.38).
        - ``clipped``: a layer of one-tap kernels (1x1 conv, Gemm) reads a ReLU / ReLU6 output: how each mean
          moves when the prior excites the layer more or less than real images do (``clipped_mean_scale_slope``;
          the prior's stds are 0.8-4x off per layer). BN-folded MobileNet-V1 squant W4A8: 60.54 / 60.46 / 61.23
          -> 62.08 / 61.69 / 61.92 over prior seeds 0-2; Lite0 and a held-out MobileNetV2-style net: within 0.1.

        BN statistics and measured samples are trusted as they are: none of this runs on them.
        """
        if not any(st.source == "prior" for st in ws.channel_stats.values()):
            return {}  # BN statistics or measured samples: every BN-kept run stops here
        streams = linear_streams(ws.graph, layers)
        stats = tensor_statistics(ws)
        found: dict[str, tuple[str, np.ndarray]] = {}
        for layer in layers:
            known = stats.get(layer.input_name)
            if layer.group != 1 or known is None or known.channels != layer.weight.shape[1]:
                continue
            sources = streams.get(layer.input_name)
            if sources:
                if all(name in ws.channel_stats and ws.channel_stats[name].source == "prior" for name in sources):
                    mean = known.moments()[0]
                    if np.all(np.isfinite(mean)):
                        found[layer.name] = ("stream", mean)
                continue
            if known.source != "prior" or not (np.any(np.isfinite(known.lo)) or np.any(np.isfinite(known.hi))):
                continue
            if layer.weight[0, 0].size != 1:  # k x k kernels: SQuant's K stage keeps each kernel's sum balanced,
                continue  # and measured no gain here (folded ResNet-56 W4A8 93.10 -> 93.05, ResNet-20 W4A4 +0.11)
            slope = clipped_mean_scale_slope(known.mean, np.sqrt(np.maximum(known.var, 0.0)), known.lo, known.hi)
            found[layer.name] = ("clipped", np.where(np.isfinite(slope), slope, 0.0))
        return found
