"""Decide every quantization parameter before any Q/DQ node exists; `passes/emit.py` only writes them.

Three decisions, each its own pass so that the pipeline can place it:
- `ActivationQParamsPass`: each activation range becomes a grid (scale, zero point, storage type) for the
  deployment target (after the ranges, before the weights: the weights' bias safety needs s_x);
- `BiasSafeWeightsPass`: a weight scale grown where the int32 bias b / (s_x * s_w) would saturate, and
  those weights rounded again on it (after weight quantization, before bias correction, so that the
  correction sees the weights that will be written);
- `BiasQParamsPass`: the int32 biases themselves, from the final (corrected) float biases.
"""

from __future__ import annotations

import logging

import numpy as np

from onnxdfq.graph import layers as graph_layers
from onnxdfq.passes.base import LayerRow, Pass, PassReport, Workspace
from onnxdfq.quant.qparams import activation_grid, bias_safe_weight_scale, int32_bias

__all__ = ["ActivationQParamsPass", "BiasSafeWeightsPass", "BiasQParamsPass"]

logger = logging.getLogger(__name__)


class ActivationQParamsPass(Pass):
    """ws.act_ranges -> ws.act_qparams: the grid of every activation that gets a Q/DQ pair."""

    name = "act_qparams"
    changes_graph = False

    def __init__(self, act_bits: int, target: str = "ort") -> None:
        self.act_bits, self.target = act_bits, target

    def call(self, ws: Workspace) -> PassReport:
        report = PassReport(self.name, params={"act_bits": self.act_bits, "target": self.target})
        for name, act_range in ws.act_ranges.items():
            grid = activation_grid(act_range.lo, act_range.hi, ws.act_widths.get(name, self.act_bits), self.target)
            ws.act_qparams[name] = grid
            report.rows.append(LayerRow(name, {"act_scale": grid.scale, "act_zero_point": grid.stored_zero_point,
                                               "act_dtype": grid.dtype, "act_signed_grid": grid.signed,
                                               "act_bits": grid.bits, "source": act_range.source}))
        report.modified = bool(report.rows)
        return report


def _int_bias_layers(ws: Workspace):
    """Layers whose bias will be stored as int32: a bias, integer weights, and a quantized input."""
    for layer in graph_layers.read_layers(ws.graph):
        if layer.bias is not None and layer.name in ws.weight_quant and layer.input_name in ws.act_qparams:
            yield layer, ws.act_qparams[layer.input_name].scale


class BiasSafeWeightsPass(Pass):
    """Grow the weight scale of channels whose int32 bias would saturate, and round them again on it."""

    name = "bias_safe_weights"
    changes_graph = False

    def call(self, ws: Workspace) -> PassReport:
        report = PassReport(self.name)
        for layer, s_x in _int_bias_layers(ws):
            quant = ws.weight_quant[layer.name]
            scale, grow = bias_safe_weight_scale(quant.scale, layer.bias, s_x)
            if not grow.any():
                continue
            w_int = quant.w_int.copy()
            shape = (-1,) + (1,) * (w_int.ndim - 1)
            per_row = np.broadcast_to(scale, (w_int.shape[0],)).reshape(shape)
            w_int[grow] = np.rint(layer.weight[grow] / per_row[grow]).astype(w_int.dtype)
            quant.scale, quant.w_int = scale, w_int
            report.rows.append(LayerRow(layer.name, {"bias_regridded_channels": int(grow.sum())}))
        report.modified = bool(report.rows)
        return report


class BiasQParamsPass(Pass):
    """ws.bias_qparams: each int32 bias and its scale s_x * s_w; a bias that still saturates is a warning."""

    name = "bias_qparams"
    changes_graph = False

    def call(self, ws: Workspace) -> PassReport:
        report = PassReport(self.name)
        for layer, s_x in _int_bias_layers(ws):
            b_int, bias_scale, saturated = int32_bias(layer.bias, s_x, ws.weight_quant[layer.name].scale)
            ws.bias_qparams[layer.name] = (b_int, bias_scale)
            if saturated:
                report.warnings.append(f"{layer.name}: {saturated} bias value(s) saturate int32 (bias scale s_x * s_w)")
        report.modified = bool(ws.bias_qparams)
        return report
