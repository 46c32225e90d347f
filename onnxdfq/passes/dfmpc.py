"""DF-MPC: data-free mixed-precision compensation (Chen et al., Pattern Recognition 2023, arXiv 2307.00498).

Layers are paired (l, l+1) along plain chains conv -> BN -> ReLU -> conv (`plan_pairs`): l is
quantized at the low width (2 bits = exact least-squares ternary {-1, 0, 1} * alpha_j per output
channel), l+1 and every unpaired layer at the high width. No data is used anywhere.

The per-layer math (BN re-estimation of the quantized layer, the next layer's gain, the paper's
closed form) is the numpy core `onnxdfq.passes.dfmpc_math`; this module plans the pairs and reads
and writes the graph.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from onnxdfq.config import DFMPCOptions
from onnxdfq.errors import OptionError
from onnxdfq.graph import layers as graph_layers
from onnxdfq.passes.base import LayerRow, Pass, PassReport, PostconditionError, WeightQuant, Workspace
from onnxdfq.passes.dfmpc_math import (
    DEFAULT_RHO,
    channel_correlation,
    compensate_mixed_precision,
    high_layer_gain,
)
from onnxdfq.passes.statistics import tensor_statistics
from onnxdfq.quant.scheme import BitWidthMap

__all__ = ["PairPlan", "MixedPrecisionPlan", "plan_pairs", "DFMPCPass"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PairPlan:
    low: str
    high: str


@dataclass(frozen=True)
class MixedPrecisionPlan:
    """Which layers are paired; every layer outside `low_layers` gets `high_bits`."""

    low_bits: int
    high_bits: int
    pairs: tuple[PairPlan, ...]
    unpaired: dict[str, str] = field(default_factory=dict)  # layer -> why it is in no pair

    @property
    def low_layers(self) -> set[str]:
        return {pair.low for pair in self.pairs}

    def bitmap(self) -> BitWidthMap:
        return BitWidthMap(self.high_bits, by_name={name: self.low_bits for name in self.low_layers})


LOW_ACTS = ("relu", "relu6", "none")  # activations a compensated pre-activation may feed


def _unpaired_reason(layer: graph_layers.Layer, next_layer: graph_layers.Layer | None, used: set[str],
                     bn_stats: dict, graph_inputs: set[str]) -> str | None:
    if layer.input_name in graph_inputs:
        return "stem (reads the network input)"
    if layer.name in used:
        return "high layer of the previous pair"
    if layer.op_type != "Conv":
        return f"{layer.op_type} (only convolutions are paired)"
    if layer.is_depthwise:
        return "depthwise (partner unclear)"
    if layer.name not in bn_stats:
        return "no output statistics (BN or prior)"
    if layer.act.kind not in LOW_ACTS:
        return f"{layer.act.kind} activation"
    if next_layer is None:
        return "its output does not feed a single layer (residual join, pooling, head)"
    return None


def plan_pairs(layers: list[graph_layers.Layer], graph, bn_stats: dict, low_bits: int,
               high_bits: int) -> MixedPrecisionPlan:
    """Greedy pairing in graph order: l is low when it is a non-depthwise conv with BN statistics
    whose (activated) output is read by exactly one other layer, l+1, which becomes high.
    Layers in no pair (stem, classifier, convs before residual joins, depthwise) stay high."""
    by_node = {id(layer.node): layer for layer in layers}
    outputs = {t.name for t in graph.outputs}
    graph_inputs = {t.name for t in graph.inputs}
    tensors = graph.tensors()
    pairs: list[PairPlan] = []
    unpaired: dict[str, str] = {}
    used: set[str] = set()
    for layer in layers:
        tensor = tensors.get(layer.act_output_name)
        consumer = graph_layers.single_consumer(tensor, outputs) if tensor is not None else None
        next_layer = by_node.get(id(consumer)) if consumer is not None else None
        if next_layer is not None and next_layer.input_name != layer.act_output_name:
            next_layer = None
        reason = _unpaired_reason(layer, next_layer, used, bn_stats, graph_inputs)
        if reason is None:
            pairs.append(PairPlan(layer.name, next_layer.name))
            used.update((layer.name, next_layer.name))
        elif layer.name not in used:
            unpaired[layer.name] = reason
    return MixedPrecisionPlan(low_bits, high_bits, tuple(pairs), unpaired)


class DFMPCPass(Pass):
    """Plan the pairs, quantize and compensate every low layer; run after BN folding (and CLE).

    The low layers' compensated integer weights go to ws.weight_quant and their dequantized
    weights and new biases into the graph (so bias correction sees no residual error in them);
    `plan` is left on the pass for the pipeline, which quantizes the remaining layers at the high width.

    .. versionadded:: 0.1
    """

    name = "dfmpc"

    def __init__(self, low_bits: int, high_bits: int, options: DFMPCOptions | None = None, **overrides: Any) -> None:
        if not 2 <= low_bits < high_bits <= 8:
            raise ValueError(f"DF-MPC needs 2 <= LOW < HIGH <= 8, got {low_bits}/{high_bits}")
        options = DFMPCOptions.from_mapping({**asdict(options or DFMPCOptions()), **overrides})
        if options.quantizer == "twn" and low_bits != 2:
            raise OptionError("DF-MPC quantizer twn is ternary: LOW must be 2 bits")
        self.low_bits, self.high_bits = low_bits, high_bits
        self.options = {k: v for k, v in asdict(options).items() if k != "high_gain"}
        self.high_gain = options.high_gain
        self.plan: MixedPrecisionPlan | None = None

    def ensures(self, ws: Workspace) -> None:
        for name in self.plan.low_layers if self.plan else ():
            quant = ws.weight_quant.get(name)
            if quant is None or not np.all(np.isfinite(quant.scale)) or np.any(quant.scale <= 0):
                raise PostconditionError(f"{name}: DF-MPC left no valid low-bit weights")

    def call(self, ws: Workspace) -> PassReport:
        layers = graph_layers.read_layers(ws.graph)
        plan = plan_pairs(layers, ws.graph, ws.channel_stats, self.low_bits, self.high_bits)
        stats = tensor_statistics(ws)
        report = PassReport(self.name, params={"low_bits": self.low_bits, "high_bits": self.high_bits,
                                               "high_gain": self.high_gain, **self.options})
        updates = []
        for layer in layers:
            if layer.name not in plan.low_layers:
                continue
            in_stats = stats.get(layer.input_name)
            if in_stats is None or in_stats.channels != layer.weight.shape[1] * layer.group:
                report.skipped[layer.name] = "no input statistics: plain low-bit weights, uncompensated"
                report.warnings.append(f"{layer.name}: no input statistics; plain low-bit weights, uncompensated")
                in_mean = np.zeros(layer.weight.shape[1] * layer.group)
                in_var = np.ones_like(in_mean)
                options = {**self.options, "reestimate": "none"}
            else:
                in_mean, in_var = in_stats.moments()
                options = self.options
            result = compensate_mixed_precision(layer.weight, layer.bias, ws.channel_stats[layer.name], in_mean, in_var,
                                                self.low_bits, group=layer.group, **options)
            updates.append((layer, result, in_var))
        by_name = {layer.name: layer for layer in layers}
        high_updates = []
        for layer, result, in_var in updates if self.high_gain else ():
            high = by_name[next(p.high for p in plan.pairs if p.low == layer.name)]
            if layer.group != 1 or high.group != 1 or high.op_type != "Conv" or stats.get(high.output_name) is None:
                continue
            rho = self.options["rho"] if isinstance(self.options["rho"], float) else DEFAULT_RHO
            corr = channel_correlation(layer.weight, result.quant.dequantized(), in_var, rho, layer.group)
            next_std = stats[high.output_name].moments()[1] ** 0.5
            gain = high_layer_gain(corr, ws.channel_stats[layer.name], (layer.act.lo, layer.act.hi), high.weight,
                                   next_std)
            out_mean = stats[high.output_name].moments()[0]
            bias = np.zeros(high.out_channels) if high.bias is None else high.bias.astype(np.float64)
            high_updates.append((high, gain, gain * (bias - out_mean) + out_mean))
        for layer, result, _ in updates:  # decide first, then write once
            quant = WeightQuant(self.low_bits, result.quant.scale, result.quant.w_int, True, "dfmpc")
            ws.weight_quant[layer.name] = quant
            graph_layers.write_weight(layer, quant.dequantized())
            graph_layers.write_bias(layer, result.bias)
            stats_fp = ws.channel_stats[layer.name]
            report.rows.append(LayerRow(layer.name, {
                "bits": self.low_bits, "pair_high": next(p.high for p in plan.pairs if p.low == layer.name),
                "sigma_ratio_mean": float(np.mean(result.estimated.std / np.maximum(stats_fp.std, 1e-30))),
                "mean_shift_max": float(np.max(np.abs(result.estimated.mean - stats_fp.mean))),
                "c_mean": float(np.mean(result.c)), "c_min": float(np.min(result.c)),
            }))
        for high, gain, bias in high_updates:
            graph_layers.write_weight(high, high.weight * gain.reshape((-1,) + (1,) * (high.weight.ndim - 1)))
            graph_layers.write_bias(high, bias)
            report.rows.append(LayerRow(high.name, {"high_gain_mean": float(np.mean(gain)),
                                                    "high_gain_min": float(np.min(gain))}))
        self.plan = plan
        ws.bit_widths = plan.bitmap()  # the weight pass quantizes every layer DF-MPC left at the high width
        report.params["pairs"] = [[p.low, p.high] for p in plan.pairs]
        report.params["unpaired"] = dict(plan.unpaired)
        report.skipped.update({name: f"not paired: {why}" for name, why in plan.unpaired.items()})
        report.modified = bool(updates)
        return report
