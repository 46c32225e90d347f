"""DF-MPC: data-free mixed-precision compensation (Chen et al., Pattern Recognition 2023, arXiv 2307.00498).

Layers are paired (l, l+1) along plain chains conv -> BN -> ReLU [-> MaxPool] -> conv (`plan_pairs`;
in a bottleneck the 3x3 is low, the 1x1s high): the low layer is quantized at the low width (2 bits =
ternary {-1, 0, 1} * alpha_j per output channel, its support chosen for the output correlation),
its partner and every unpaired layer at the high width. No data is used anywhere.

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
from onnxdfq.graph import layers as graph_layers
from onnxdfq.passes.base import LayerRow, Pass, PassReport, PostconditionError, WeightQuant, Workspace
from onnxdfq.passes.dfmpc_math import (
    DEFAULT_RHO,
    HIGH_CORRECTIONS,
    LOW_QUANTIZERS,
    REESTIMATE,
    SIGMA_MODELS,
    channel_correlation,
    compensate_mixed_precision,
    correct_next_layer,
    correlated_sum_moments,
    high_layer_gain,
)
from onnxdfq.passes.statistics import tensor_statistics
from onnxdfq.quant.fake import sqnr_db
from onnxdfq.quant.scheme import BitWidthMap

__all__ = ["PairPlan", "PairUpdate", "MixedPrecisionPlan", "AllocatedPairsPass", "LOW_RULES", "DEFAULT_REFINE_STEPS",
           "plan_pairs", "DFMPCPass"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PairPlan:
    """low is quantized at the low width, high at the high width. `high_reads_low`: high reads low's
    (activated) output, possibly through `via` (a MaxPool), so it can compensate low; with
    low_rule="last" the high layer comes first in the block instead and compensates nothing."""

    low: str
    high: str
    via: str = ""
    high_reads_low: bool = True


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


@dataclass
class PairUpdate:
    """One pair decided: its low layer compensated at ``bits`` and the high layer's (layer, weight, bias, row)
    update, None when the high layer is left as it is."""

    pair: PairPlan
    bits: int
    low: graph_layers.Layer
    result: Any  # dfmpc_math.Compensation
    high: tuple | None


LOW_ACTS = ("relu", "relu6", "none")  # activations a compensated pre-activation may feed
LOW_RULES = ("first", "spatial", "last")  # which conv of a chain l -> l+1 is low (plan_pairs)
DEFAULT_REFINE_STEPS = 64  # coordinate-ascent steps of the ternary "corr" grid (converged on ResNet-56: 64 = 400)
POOLS_THROUGH = ("MaxPool",)  # channelwise, positively homogeneous: a pair may span one


def channel_bound(tensor, outputs: set[str]):
    """(the Min node, its per-channel upper bound [C] float64) when `tensor` feeds only a Min by a constant:
    what CLE writes for a ReLU6 it equalized (Relu -> Min(upper[C,1,1])); else (None, None)."""
    consumer = graph_layers.single_consumer(tensor, outputs)
    if consumer is None or consumer.op != "Min" or len(consumer.inputs) != 2 or consumer.inputs[0] is not tensor:
        return None, None
    upper = graph_layers.const_value(consumer.inputs[1])
    return (None, None) if upper is None else (consumer, np.asarray(upper, np.float64).reshape(-1))


def _low_reason(layer: graph_layers.Layer, bn_stats: dict, graph_inputs: set[str]) -> str | None:
    """Why `layer` cannot be a low layer at all (None: it can)."""
    if layer.input_name in graph_inputs:
        return "stem (reads the network input)"
    if layer.op_type != "Conv":
        return f"{layer.op_type} (only convolutions are paired)"
    if layer.is_depthwise:
        return "depthwise (partner unclear)"
    if layer.name not in bn_stats:
        return "no output statistics (BN or prior)"
    if layer.act.kind not in LOW_ACTS:
        return f"{layer.act.kind} activation"
    return None


def _next_layer(layer: graph_layers.Layer, by_node: dict, tensors: dict, outputs: set[str]
                ) -> tuple[graph_layers.Layer | None, str]:
    """The one layer that reads `layer`'s activated output, directly or through a per-channel bound (CLE's
    Min) and/or one MaxPool, and that pool's name."""
    tensor, via = tensors.get(layer.act_output_name), ""
    if tensor is not None and (bound := channel_bound(tensor, outputs)[0]) is not None:
        tensor = bound.outputs[0]
    consumer = graph_layers.single_consumer(tensor, outputs) if tensor is not None else None
    if consumer is not None and consumer.op in POOLS_THROUGH:
        via, tensor = consumer.name, consumer.outputs[0]
        consumer = graph_layers.single_consumer(tensor, outputs)
    next_layer = by_node.get(id(consumer)) if consumer is not None else None
    if next_layer is None or next_layer.input_name != tensor.name:
        return None, ""
    return next_layer, via


def _is_pointwise(layer: graph_layers.Layer) -> bool:
    return all(size == 1 for size in layer.weight.shape[2:])


def plan_pairs(layers: list[graph_layers.Layer], graph, bn_stats: dict, low_bits: int,
               high_bits: int, low_rule: str = "first") -> MixedPrecisionPlan:
    """Greedy pairing in graph order along chains l -> l+1 (l's activated output, possibly after a
    MaxPool, read by l+1 alone); `low_rule` says which of the two is low:
    - "first": l low, l+1 high (l+1 compensates l);
    - "spatial": the same, except that a 1x1 l whose l+1 is a spatial conv that can itself be low
      with a partner stays high, so that the spatial conv is low (the paper's bottleneck rule:
      1x1 high, 3x3 low);
    - "last": where l+1 ends the chain (its output feeds a residual join, a pool or the head) and can
      be low, l+1 is low and l high (which compensates nothing); else as "first".
    Layers in no pair (stem, classifier, shortcut projections, depthwise) stay high."""
    if low_rule not in LOW_RULES:
        raise ValueError(f"low_rule must be one of {', '.join(LOW_RULES)}, got {low_rule!r}")
    by_node = {id(layer.node): layer for layer in layers}
    outputs = {t.name for t in graph.outputs}
    graph_inputs = {t.name for t in graph.inputs}
    tensors = graph.tensors()
    chain = {layer.name: _next_layer(layer, by_node, tensors, outputs) for layer in layers}
    can_low = {layer.name: _low_reason(layer, bn_stats, graph_inputs) is None for layer in layers}
    pairs: list[PairPlan] = []
    unpaired: dict[str, str] = {}
    used: set[str] = set()
    for layer in layers:
        if layer.name in used:
            continue
        next_layer, via = chain[layer.name]
        reason = _low_reason(layer, bn_stats, graph_inputs)
        if reason is None and next_layer is None:
            reason = "its output does not feed a single layer (residual join, pooling, head)"
        if reason is None and next_layer.name in used:
            reason = "its next layer is already paired"
        if reason is None and low_rule == "spatial" and _is_pointwise(layer) and not _is_pointwise(next_layer) \
                and can_low[next_layer.name] and chain[next_layer.name][0] is not None:
            reason = "1x1 before a spatial conv that is low (low_rule='spatial')"
        if reason is None and low_rule == "last" and chain[next_layer.name][0] is None and can_low[next_layer.name]:
            pairs.append(PairPlan(next_layer.name, layer.name, via, high_reads_low=False))
            used.update((layer.name, next_layer.name))
        elif reason is None:
            pairs.append(PairPlan(layer.name, next_layer.name, via))
            used.update((layer.name, next_layer.name))
        else:
            unpaired[layer.name] = reason
    unpaired = {name: why for name, why in unpaired.items() if name not in used}
    return MixedPrecisionPlan(low_bits, high_bits, tuple(pairs), unpaired)


class DFMPCPass(Pass):
    """Plan the pairs, quantize and compensate every low layer; run after BN folding (and CLE).

    The low layers' compensated integer weights go to ws.weight_quant and their dequantized
    weights and new biases into the graph (so bias correction sees no residual error in them);
    `plan` is left on the pass for the pipeline, which quantizes the remaining layers at the high width.

    Options (defaults are the measured best, tools/results/dfmpc_ablation.md):
    quantizer : "corr" (default; ternary: the top-|w| support most correlated with the float output
        under the tap model; wider: the least-squares grid), "lsq" (the 0.1 default), "absmax", "twn".
    refine_steps : coordinate-ascent steps on that correlation for the "corr" grid; None (default)
        is DEFAULT_REFINE_STEPS for ternary low layers and 0 for wider ones.
    high_correction : "none" (default) or "lsq", the next layer's weights by least squares on the
        modelled second moments of the low layer's activated output (`correct_next_layer`).
    sigma_model : how sigma_hat is re-estimated (`reestimate_bn`); None (default) is "regression" when
        the grid was refined (refine_steps > 0) and "blend" otherwise. Checked against real data (used
        only to evaluate): with the refined ternary the low layers' output std, relative to the float
        model's, is off by exp(0.021-0.024) with "regression" and exp(0.061-0.076) with "blend"
        (mean |log| over the low layers of ResNet-20/44/56, 500 training images).
    low_rule : "spatial" (default: the bottleneck rule, 1x1 high / 3x3 low), "first", "last" (`plan_pairs`).
    shortcut_corr : branch/shortcut correlation at a residual join feeding a low layer (default 0).

    .. versionadded:: 0.1
    .. versionchanged:: 0.2 quantizer "corr", refine_steps, high_correction, low_rule, shortcut_corr;
       sigma_model None.
    """

    name = "dfmpc"

    def __init__(self, low_bits: int, high_bits: int, options: DFMPCOptions | None = None, **overrides: Any) -> None:
        """``options`` (onnxdfq.config.DFMPCOptions: the defaults live there); keyword ``overrides`` replace fields."""
        values = asdict(DFMPCOptions.from_mapping({**asdict(options or DFMPCOptions()), **overrides}))
        quantizer, reestimate, rho = values["quantizer"], values["reestimate"], values["rho"]
        compensate, lambda1, lambda2 = values["compensate"], values["lambda1"], values["lambda2"]
        sigma_model, high_gain, high_correction = values["sigma_model"], values["high_gain"], values["high_correction"]
        refine_steps, low_rule, shortcut_corr = values["refine_steps"], values["low_rule"], values["shortcut_corr"]
        if not 2 <= low_bits < high_bits <= 8:
            raise ValueError(f"DF-MPC needs 2 <= LOW < HIGH <= 8, got {low_bits}/{high_bits}")
        if quantizer not in LOW_QUANTIZERS or (quantizer == "twn" and low_bits != 2):
            raise ValueError(f"quantizer must be one of {', '.join(LOW_QUANTIZERS)} (twn: 2 bits only), "
                             f"got {quantizer!r}")
        if reestimate not in REESTIMATE:
            raise ValueError(f"reestimate must be one of {', '.join(REESTIMATE)}, got {reestimate!r}")
        self._refine_steps, self._sigma_model = refine_steps, sigma_model  # None: resolved per low width
        refine_steps, sigma_model = self._width_defaults(quantizer, low_bits)
        if sigma_model not in SIGMA_MODELS:
            raise ValueError(f"sigma_model must be one of {', '.join(SIGMA_MODELS)}, got {sigma_model!r}")
        if rho != "fit" and not (isinstance(rho, (int, float)) and 0.0 <= rho < 1.0):
            raise ValueError(f"rho must be in [0, 1) or 'fit', got {rho!r}")
        if high_correction not in HIGH_CORRECTIONS:
            raise ValueError(f"high_correction must be one of {', '.join(HIGH_CORRECTIONS)}, got {high_correction!r}")
        if not (isinstance(refine_steps, int) and refine_steps >= 0):
            raise ValueError(f"refine_steps must be an integer >= 0 or None, got {refine_steps!r}")
        if refine_steps and quantizer != "corr":
            raise ValueError("refine_steps refines the 'corr' quantizer's grid; set quantizer='corr'")
        if low_rule not in LOW_RULES:
            raise ValueError(f"low_rule must be one of {', '.join(LOW_RULES)}, got {low_rule!r}")
        if not -1.0 <= shortcut_corr <= 1.0:
            raise ValueError(f"shortcut_corr must be in [-1, 1], got {shortcut_corr!r}")
        rho = rho if rho == "fit" else float(rho)
        self.low_bits, self.high_bits = low_bits, high_bits
        self.options = {"quantizer": quantizer, "reestimate": reestimate, "rho": rho, "compensate": bool(compensate),
                        "lambda1": float(lambda1), "lambda2": float(lambda2), "sigma_model": sigma_model,
                        "refine_steps": refine_steps}
        self.high_gain = bool(high_gain)
        self.high_correction = high_correction
        self.low_rule = low_rule
        self.shortcut_corr = float(shortcut_corr)
        self.plan: MixedPrecisionPlan | None = None

    def _width_defaults(self, quantizer: str, bits: int) -> tuple[int, str]:
        """refine_steps and sigma_model at a low width, where the options left them to it (None)."""
        refine_steps = self._refine_steps
        if refine_steps is None:  # measured: +0.7 on ResNet-56 2/6, -1.8 on MobileNet-V1 4/8 (ablation)
            refine_steps = DEFAULT_REFINE_STEPS if quantizer == "corr" and bits == 2 else 0
        # a grid fitted to the tap model makes "tap" (and so "blend") biased: see the class doc
        sigma_model = self._sigma_model or ("regression" if refine_steps else "blend")
        return refine_steps, sigma_model

    def options_at(self, bits: int) -> dict[str, Any]:
        """The compensation options for a low layer at ``bits`` (--bits auto gives each pair its own width)."""
        if bits == self.low_bits:
            return self.options
        refine_steps, sigma_model = self._width_defaults(self.options["quantizer"], bits)
        return {**self.options, "refine_steps": refine_steps, "sigma_model": sigma_model}

    def ensures(self, ws: Workspace) -> None:
        for name in self.plan.low_layers if self.plan else ():
            quant = ws.weight_quant.get(name)
            if quant is None or not np.all(np.isfinite(quant.scale)) or np.any(quant.scale <= 0):
                raise PostconditionError(f"{name}: DF-MPC left no valid low-bit weights")

    def _input_moments(self, layer, in_stats, stats, graph) -> tuple[np.ndarray, np.ndarray]:
        """The low layer's input moments; with shortcut_corr, a residual join act(a + b) feeding it
        is re-summed with that correlation between a and b (`correlated_sum_moments`)."""
        moments = in_stats.moments()
        if self.shortcut_corr == 0.0:
            return moments
        act = graph_layers.producer(graph.tensors()[layer.input_name])
        if act is None or act.op not in ("Relu", "Clip"):
            return moments
        join = graph_layers.producer(act.inputs[0])
        if join is None or join.op != "Add" or len(join.inputs) != 2:
            return moments
        a, b = (stats.get(t.name) for t in join.inputs)
        if a is None or b is None or a.channels != in_stats.channels or b.channels != in_stats.channels:
            return moments
        (mean_a, var_a), (mean_b, var_b) = a.moments(), b.moments()
        return correlated_sum_moments(mean_a, var_a, mean_b, var_b, self.shortcut_corr, in_stats.lo, in_stats.hi)

    @staticmethod
    def _act_bounds(layer, tensors: dict, outputs: set[str]) -> tuple[float, float | np.ndarray]:
        """The low layer's activation as (lo, hi); hi per channel where CLE bounded it with a Min."""
        tensor = tensors.get(layer.act_output_name)
        upper = channel_bound(tensor, outputs)[1] if tensor is not None else None
        if upper is None or upper.size not in (1, layer.out_channels):
            return layer.act.lo, layer.act.hi
        return layer.act.lo, np.minimum(layer.act.hi, upper)

    def _high_update(self, layer, result, in_var, high, stats, ws, act: tuple,
                     pooled: bool = False) -> tuple | None:
        """(high layer, new weight, new bias, report row) for the high layer of `layer`'s pair, or None."""
        if not (self.high_gain or self.high_correction != "none"):
            return None
        if layer.group != 1 or high.group != 1 or high.op_type != "Conv" or stats.get(high.output_name) is None:
            return None
        rho = self.options["rho"] if isinstance(self.options["rho"], float) else DEFAULT_RHO
        w_q = result.quant.dequantized()
        weight = np.asarray(high.weight, np.float64)
        bias = np.zeros(high.out_channels) if high.bias is None else high.bias.astype(np.float64)
        row = {}
        if self.high_correction == "lsq" and not pooled:  # its model is per position: no pool between
            new_weight, bias = correct_next_layer(layer.weight, w_q, ws.channel_stats[layer.name],
                                                  act, in_var, rho, weight, bias)
            row["lsq_weight_change"] = float(np.linalg.norm(new_weight - weight) / max(np.linalg.norm(weight), 1e-30))
            weight = new_weight
        if self.high_gain:
            corr = channel_correlation(layer.weight, w_q, in_var, rho, layer.group)
            out_mean, out_var = stats[high.output_name].moments()
            gain = high_layer_gain(corr, ws.channel_stats[layer.name], act, weight,
                                   out_var**0.5)
            weight = weight * gain.reshape((-1,) + (1,) * (weight.ndim - 1))
            bias = gain * (bias - out_mean) + out_mean
            row.update(high_gain_mean=float(np.mean(gain)), high_gain_min=float(np.min(gain)))
        return high, weight, bias, row

    def pair_update(self, ws: Workspace, layers: dict[str, graph_layers.Layer], pair: PairPlan, bits: int,
                    stats: dict, report: PassReport | None = None) -> PairUpdate:
        """Pair ``pair`` with its low layer compensated at ``bits``: nothing is written (see `write`)."""
        layer = layers[pair.low]
        in_stats = stats.get(layer.input_name)
        options = self.options_at(bits)
        if in_stats is None or in_stats.channels != layer.weight.shape[1] * layer.group:
            if report is not None:
                report.skipped[layer.name] = "no input statistics: plain low-bit weights, uncompensated"
                report.warnings.append(f"{layer.name}: no input statistics; plain low-bit weights, uncompensated")
            in_mean = np.zeros(layer.weight.shape[1] * layer.group)
            in_var = np.ones_like(in_mean)
            options = {**options, "reestimate": "none"}
        else:
            in_mean, in_var = self._input_moments(layer, in_stats, stats, ws.graph)
        result = compensate_mixed_precision(layer.weight, layer.bias, ws.channel_stats[layer.name], in_mean, in_var,
                                            bits, group=layer.group, **options)
        high = None
        if pair.high_reads_low:
            tensors, outputs = ws.graph.tensors(), {t.name for t in ws.graph.outputs}
            high = self._high_update(layer, result, in_var, layers[pair.high], stats, ws,
                                     self._act_bounds(layer, tensors, outputs), pooled=bool(pair.via))
        return PairUpdate(pair, bits, layer, result, high)

    def write(self, ws: Workspace, updates: list[PairUpdate], report: PassReport) -> None:
        """Write the low layers' integers (ws.weight_quant) and compensated weights, and the high layers' updates."""
        for update in updates:
            layer, result, bits = update.low, update.result, update.bits
            quant = WeightQuant(bits, result.quant.scale, result.quant.w_int, True, "dfmpc")
            ws.weight_quant[layer.name] = quant
            graph_layers.write_weight(layer, quant.dequantized())
            graph_layers.write_bias(layer, result.bias)
            stats_fp = ws.channel_stats[layer.name]
            # the grid before the channel re-normalisation, against the float weights: what other layers report
            renorm = result.gain * result.c
            grid = result.quant.scale / np.where(renorm > 0, renorm, 1.0)
            w_grid = result.quant.w_int * grid.reshape((-1,) + (1,) * (layer.weight.ndim - 1))
            report.rows.append(LayerRow(layer.name, {
                "bits": bits, "weight_sqnr_db": round(sqnr_db(layer.weight, w_grid), 3),
                "scale_min": float(quant.scale.min()), "scale_max": float(quant.scale.max()),
                "pair_high": update.pair.high,
                "sigma_ratio_mean": float(np.mean(result.estimated.std / np.maximum(stats_fp.std, 1e-30))),
                "mean_shift_max": float(np.max(np.abs(result.estimated.mean - stats_fp.mean))),
                "c_mean": float(np.mean(result.c)), "c_min": float(np.min(result.c)),
            }))
        for update in updates:
            if update.high is not None:
                high, weight, bias, row = update.high
                graph_layers.write_weight(high, weight)
                graph_layers.write_bias(high, bias)
                report.rows.append(LayerRow(high.name, row))
        report.modified = bool(updates)

    def call(self, ws: Workspace) -> PassReport:
        layers = graph_layers.read_layers(ws.graph)
        plan = plan_pairs(layers, ws.graph, ws.channel_stats, self.low_bits, self.high_bits, self.low_rule)
        stats = tensor_statistics(ws)
        report = PassReport(self.name, params={"low_bits": self.low_bits, "high_bits": self.high_bits,
                                               "high_gain": self.high_gain,
                                               "high_correction": self.high_correction,
                                               "low_rule": self.low_rule, "shortcut_corr": self.shortcut_corr,
                                               **self.options})
        by_name = {layer.name: layer for layer in layers}
        # decide every pair first (the high updates read the float weights), then write once
        updates = [self.pair_update(ws, by_name, pair, self.low_bits, stats, report) for pair in plan.pairs]
        self.write(ws, updates, report)
        self.plan = plan
        ws.bit_widths = plan.bitmap()  # the weight pass quantizes every layer DF-MPC left at the high width
        report.params["pairs"] = [[p.low, p.high] for p in plan.pairs]
        report.params["pair_details"] = [{"low": p.low, "high": p.high, "via": p.via,
                                          "high_reads_low": p.high_reads_low} for p in plan.pairs]
        report.params["unpaired"] = dict(plan.unpaired)
        if not plan.pairs:  # every layer at the high width: say so, never a silent LOW/HIGH that is HIGH/HIGH
            reasons = sorted(set(plan.unpaired.values()))
            report.warnings.append(f"DF-MPC paired no layer: every layer stays at {self.high_bits} bits "
                                   f"({'; '.join(reasons[:3]) or 'no convolutions'})")
        report.skipped.update({name: f"not paired: {why}" for name, why in plan.unpaired.items()})
        return report


class AllocatedPairsPass(DFMPCPass):
    """Compensate the DF-MPC pairs that --bits auto chose (ws.dfmpc_pairs: (PairPlan, low bits)); every width is
    already in ws.bit_widths, so this only writes the pairs. Run where DFMPCPass runs, before WeightQuantPass."""

    name = "dfmpc_pairs"

    def __init__(self, options: DFMPCOptions | None = None) -> None:
        super().__init__(2, 8, options)

    def call(self, ws: Workspace) -> PassReport:
        report = PassReport(self.name, params={"pairs": [[p.low, p.high, bits] for p, bits in ws.dfmpc_pairs]})
        if not ws.dfmpc_pairs:
            return report
        by_name = {layer.name: layer for layer in graph_layers.read_layers(ws.graph)}
        stats = tensor_statistics(ws)
        updates = [self.pair_update(ws, by_name, pair, bits, stats, report) for pair, bits in ws.dfmpc_pairs]
        self.write(ws, updates, report)
        return report
