"""Fold BatchNormalization into the layer before it, keeping its statistics.

For y = gamma * (W x + b - mu) / sqrt(var + eps) + beta, with k = gamma / sqrt(var + eps):
    W' = k * W   (per output channel)        b' = k * (b - mu) + beta
The folded layer's pre-activation output then has per-channel mean beta and std |gamma| on the
data the BN was trained on; later passes (CLE, bias correction, ranges, DF-MPC) use those.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from onnxdfq.graph import layers as graph_layers
from onnxdfq.graph import surgery
from onnxdfq.passes.base import ChannelStats, LayerRow, Pass, PassReport, Workspace

__all__ = ["FoldedLayer", "fold_batchnorm", "FoldBatchNormPass"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FoldedLayer:
    weight: np.ndarray
    bias: np.ndarray
    stats: ChannelStats


def fold_batchnorm(weight: np.ndarray, bias: np.ndarray | None, gamma: np.ndarray, beta: np.ndarray,
                   mean: np.ndarray, var: np.ndarray, eps: float) -> FoldedLayer:
    """Fold BN parameters into a weight of canonical layout [O, ...] (output channels first).

    Computed in float64 and returned as float32; inputs are never modified.
    """
    gamma64, beta64 = np.asarray(gamma, np.float64), np.asarray(beta, np.float64)
    k = gamma64 / np.sqrt(np.asarray(var, np.float64) + float(eps))
    w64 = np.asarray(weight, np.float64)
    b64 = np.zeros(w64.shape[0]) if bias is None else np.asarray(bias, np.float64)
    folded_w = w64 * k.reshape((-1,) + (1,) * (w64.ndim - 1))
    folded_b = k * (b64 - np.asarray(mean, np.float64)) + beta64
    return FoldedLayer(folded_w.astype(np.float32), folded_b.astype(np.float32),
                       ChannelStats(mean=beta64.copy(), std=np.abs(gamma64)))


class FoldBatchNormPass(Pass):
    """Fold every BatchNormalization whose input is the sole output of a Conv/Gemm/ConvTranspose."""

    name = "fold_bn"

    def call(self, ws: Workspace) -> PassReport:
        report = PassReport(self.name)
        graph = ws.graph
        outputs = {t.name for t in graph.outputs}
        for layer in graph_layers.read_layers(graph):
            bn = graph_layers.single_consumer(layer.node.outputs[0], outputs)
            if bn is None or bn.op != "BatchNormalization" or len(bn.outputs) != 1:
                continue
            if layer.op_type == "MatMul":
                report.skipped[bn.name] = "after a MatMul (left unfolded)"
                report.warnings.append(f"{layer.name}: BatchNormalization after MatMul left unfolded")
                continue
            params = [graph_layers.const_value(t) for t in bn.inputs[1:5]]
            if any(p is None for p in params):
                report.skipped[bn.name] = "parameters are not constants (left unfolded)"
                report.warnings.append(f"{bn.name}: BN parameters are not constants; left unfolded")
                continue
            gamma, beta, mean, var = (p.astype(np.float64).reshape(-1) for p in params)
            if gamma.size != layer.out_channels:
                continue
            folded = fold_batchnorm(layer.weight, layer.bias, gamma, beta, mean, var,
                                    float(bn.attrs.get("epsilon", 1e-5)))
            graph_layers.write_weight(layer, folded.weight)
            graph_layers.write_bias(layer, folded.bias)
            surgery.bypass_node(bn, layer.node)  # the layer now produces the BN's output tensor
            ws.channel_stats[layer.name] = folded.stats
            report.rows.append(LayerRow(layer.name, {"bn": bn.name}))
        if report.rows:
            graph.cleanup().toposort()
            report.modified = True
        report.params["folded"] = len(report.rows)
        return report
