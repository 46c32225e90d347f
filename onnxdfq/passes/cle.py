"""Cross-layer equalization (Nagel et al. 2019, "Data-Free Quantization Through Weight Equalization
and Bias Correction", section 4.1), depthwise chains and exact per-channel ReLU6 included.

For two layers with a positively homogeneous activation f (f(s x) = s f(x), s > 0) between them,
scaling output channel i of layer 1 by 1/s_i and input channel i of layer 2 by s_i keeps the
function. With r1_i = max|W1[i]| and r2_i = max|W2[:, i]|, s_i = sqrt(r1_i / r2_i) makes both
ranges sqrt(r1_i r2_i): the per-channel ranges that per-tensor quantization has to cover move
closer together. Every pair of a network is equalized in turn, in sweeps, until the scales stop
moving.

A clip to [0, c] (ReLU6) is not positively homogeneous, but clip(x / s, 0, c / s) = clip(x, 0, c) / s:
the pass rewrites Clip(0, c) as Relu followed by Min with the per-channel constant c / s, which
keeps the FP32 function exactly.

Two additions to the paper, both measured on the shared MobileNet-V1 (W8A8 per-tensor, val1300):
- dead channels (weight range <= RANGE_EPS of the layer's largest) are cut out of the pair
  (`silence_dead_channels`) instead of equalized: equalizing them divides their bias and BN
  statistics by s -> 1e-7 and blows activation ranges up to 1e7 (top-1 0 %);
- s_i is floored so that channel i's activation estimate (BN mean + n std, capped by the clip)
  stays within its tensor's pre-CLE range: without the floor, per-tensor activation ranges grow
  from 6 to ~100 after CLE (76.00 % with floor off vs 76.46 % with it, FP32 76.85 %).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from onnxdfq.graph import layers as graph_layers
from onnxdfq.graph import surgery
from onnxdfq.graph.patterns import EqualizePair, find_pairs
from onnxdfq.passes.act_ranges import DEFAULT_SIGMAS
from onnxdfq.passes.base import ActRange, LayerRow, Pass, PassReport, PostconditionError, Workspace

__all__ = ["RANGE_EPS", "EqualizeResult", "EqualizePair", "output_channel_ranges", "input_channel_ranges",
           "channel_scales", "equalize_pair", "input_channel_shift", "activation_value", "SilenceResult",
           "silence_dead_channels", "find_pairs", "set_channel_upper", "share_min_ranges", "CrossLayerEqualizationPass"]

logger = logging.getLogger(__name__)

# a channel whose weight range is below this fraction of its layer's largest is dead and keeps s = 1:
# folded BN leaves such channels (MobileNet-V1 has 22, at 1e-6..1e-14) with a constant output but
# BN statistics that claim std |gamma|; equalizing them would inflate those statistics (and the
# activation ranges built on them) by 1/s, up to 1e7
RANGE_EPS = 1e-5


@dataclass(frozen=True)
class EqualizeResult:
    """Equalized arrays (float64, input layouts) and the per-channel scale s that was applied."""

    w1: np.ndarray
    b1: np.ndarray | None
    w2: np.ndarray
    scale: np.ndarray  # [C]: W1[i] /= s_i, b1[i] /= s_i, W2[:, i] *= s_i


def _grouped_view(w2: np.ndarray, group2: int) -> np.ndarray:
    """Canonical [O, I/g, *k] as [g, O/g, I/g, taps]: input channel i is [i // (I/g), :, i % (I/g), :]."""
    out_ch, in_per_group = w2.shape[0], w2.shape[1]
    if out_ch % group2:
        raise ValueError(f"{out_ch} output channels do not split into {group2} groups")
    return w2.reshape(group2, out_ch // group2, in_per_group, -1)


def _abs_max(array: np.ndarray, axis: int | tuple[int, ...]) -> np.ndarray:
    """max|a| along axis as max(max a, -min a): two reductions, no |a| temporary."""
    return np.maximum(array.max(axis=axis), -array.min(axis=axis))


def output_channel_ranges(w1: np.ndarray) -> np.ndarray:
    """r1_i = max|W1[i, ...]| for a canonical weight [O, ...]."""
    return _abs_max(np.asarray(w1, np.float64).reshape(w1.shape[0], -1), 1)


def input_channel_ranges(w2: np.ndarray, group2: int = 1) -> np.ndarray:
    """r2_i = max|W2[:, i, ...]| over the output channels that read input channel i ([I] for [O, I/g, *k]).

    For a depthwise W2 [C, 1, k, k] (group C) input channel i is read by output channel i only.
    """
    return _abs_max(_grouped_view(np.asarray(w2, np.float64), group2), (1, 3)).reshape(-1)


def channel_scales(w1: np.ndarray, w2: np.ndarray, *, group2: int = 1, eps: float = RANGE_EPS,
                   min_scale: np.ndarray | None = None) -> np.ndarray:
    """s_i = sqrt(r1_i / r2_i) (1 for dead or unread channels), floored at min_scale; see equalize_pair."""
    r1 = output_channel_ranges(w1)
    r2 = input_channel_ranges(w2, group2)
    if r1.shape != r2.shape:
        raise ValueError(f"layer 1 has {r1.size} output channels, layer 2 reads {r2.size}")
    live = (r1 > eps * max(float(r1.max(initial=0.0)), np.finfo(np.float64).tiny)) \
        & (r2 > eps * max(float(r2.max(initial=0.0)), np.finfo(np.float64).tiny))
    scale = np.ones_like(r1)
    scale[live] = np.sqrt(r1[live] / r2[live])
    if min_scale is not None:
        scale[live] = np.maximum(scale[live], np.broadcast_to(np.asarray(min_scale, np.float64), r1.shape)[live])
    return scale


def _apply_scales(w1: np.ndarray, b1: np.ndarray | None, w2: np.ndarray, scale: np.ndarray, group2: int) -> None:
    """In place on float64 working copies: W1[i] /= s_i, b1[i] /= s_i, W2[:, i] *= s_i."""
    w1 /= scale.reshape((-1,) + (1,) * (w1.ndim - 1))
    if b1 is not None:
        b1 /= scale
    view = _grouped_view(w2, group2)  # a view: reshape of a contiguous array
    view *= scale.reshape(group2, 1, -1, 1)


def equalize_pair(w1: np.ndarray, b1: np.ndarray | None, w2: np.ndarray, *, group2: int = 1,
                  eps: float = RANGE_EPS, min_scale: np.ndarray | None = None) -> EqualizeResult:
    """Equalize the ranges of layer 1's output channels and layer 2's input channels.

    Parameters
    ----------
    w1 : canonical weight of layer 1, output channels first: Conv [C, I/g, *k], Gemm [C, I].
    b1 : layer 1's bias [C], or None.
    w2 : canonical weight of layer 2: Conv [O, C/group2, *k] (depthwise: [C*m, 1, k, k] with
        group2 = C), Gemm/MatMul [O, C].
    group2 : layer 2's group count.
    eps : ranges at or below eps times the layer's largest are treated as zero; such channels
        (dead or unread) get s = 1 instead of a division by zero.
    min_scale : optional per-channel floor on s (see CrossLayerEqualizationPass: it keeps layer 1's
        activations from growing past their tensor's range); None for the paper's s.

    Returns
    -------
    EqualizeResult with s = sqrt(r1 / r2): W1[i] / s_i, b1[i] / s_i, W2[:, i] * s_i, all float64.
    Inputs are never modified.
    """
    scale = channel_scales(w1, w2, group2=group2, eps=eps, min_scale=min_scale)
    new_w1 = np.array(w1, np.float64)
    new_b1 = None if b1 is None else np.array(b1, np.float64)
    new_w2 = np.array(w2, np.float64)
    _apply_scales(new_w1, new_b1, new_w2, scale, group2)
    return EqualizeResult(new_w1, new_b1, new_w2, scale)


def input_channel_shift(w2: np.ndarray, value: np.ndarray, group2: int = 1) -> np.ndarray:
    """sum_{i, taps} W2[o, i, taps] value_i per output channel o: what a constant input adds to layer 2."""
    w2_64 = np.asarray(w2, np.float64)
    value = np.asarray(value, np.float64).reshape(-1)
    if value.size != w2_64.shape[1] * group2:
        raise ValueError(f"{value.size} input values for a layer reading {w2_64.shape[1] * group2} channels")
    tap_sum = _grouped_view(w2_64, group2).sum(axis=3)
    return np.einsum("goi,gi->go", tap_sum, value.reshape(group2, -1)).reshape(-1)


def activation_value(kind: str, pre: np.ndarray, upper: np.ndarray | None = None, alpha: float = 0.0) -> np.ndarray:
    """f(pre) for the activations CLE moves scales through (relu, relu6/clip with lower bound 0, leaky, none)."""
    pre = np.asarray(pre, np.float64)
    if kind == "none":
        return pre
    if kind == "leaky":
        return np.where(pre >= 0, pre, alpha * pre)
    out = np.maximum(pre, 0.0)
    return out if upper is None else np.minimum(out, upper)


@dataclass(frozen=True)
class SilenceResult:
    """Arrays after dead channels were cut out of a pair (float64)."""

    w1: np.ndarray
    b1: np.ndarray | None
    w2: np.ndarray
    b2: np.ndarray
    dead: np.ndarray  # [C] bool


def silence_dead_channels(w1: np.ndarray, b1: np.ndarray | None, w2: np.ndarray, b2: np.ndarray | None,
                          dead: np.ndarray, constant: np.ndarray, *, group2: int = 1) -> SilenceResult:
    """Cut channels whose layer-1 weights are (numerically) zero out of the pair.

    Such a channel outputs the constant f(b1_i) (`constant`); layer 2 gets that constant in its bias
    (b2 += sum_{taps} W2[:, i] f(b1_i)) and W1[i], b1[i], W2[:, i] become 0. Exact where layer 2 does
    not read zero padding, and everywhere when f(b1_i) = 0 (a dead ReLU channel).
    """
    dead = np.asarray(dead, bool).reshape(-1)
    value = np.where(dead, np.asarray(constant, np.float64).reshape(-1), 0.0)
    new_b2 = (np.zeros(w2.shape[0]) if b2 is None else np.asarray(b2, np.float64)) \
        + input_channel_shift(w2, value, group2)
    new_w1 = np.where(dead.reshape((-1,) + (1,) * (w1.ndim - 1)), 0.0, np.asarray(w1, np.float64))
    new_b1 = None if b1 is None else np.where(dead, 0.0, np.asarray(b1, np.float64))
    view = _grouped_view(np.asarray(w2, np.float64), group2)
    new_w2 = np.where(dead.reshape(group2, 1, -1, 1), 0.0, view).reshape(w2.shape)
    return SilenceResult(new_w1, new_b1, new_w2, new_b2, dead)


def set_channel_upper(ws: Workspace, pair: EqualizePair, upper: np.ndarray, *, sort: bool = True) -> None:
    """Give the activation between the pair the per-channel upper bound `upper` (exact ReLU6 after CLE),
    and record it in ws.act_upper[layer1] (see graph.surgery.set_channel_bound for the graph edit)."""
    upper = surgery.set_channel_bound(ws.graph, pair, upper, sort=sort)
    ws.act_upper[pair.layer1.name] = upper.copy()


def share_min_ranges(ws: Workspace) -> list[str]:
    """Give each Relu output followed by a per-channel Min the range of the Min's output.

    The QDQ graph quantizes both (Conv -> Relu -> Q/DQ -> Min -> Q/DQ): the Relu output's own
    range ignores the bound, so its grid would be coarser than it needs to be; values above the
    Min output's range are clipped right after anyway. Run after the activation ranges are set;
    returns the tensors whose range changed.
    """
    changed = []
    outputs = {t.name for t in ws.graph.outputs}
    for layer in graph_layers.read_layers(ws.graph):
        if layer.name not in ws.act_upper or layer.act.node is None:
            continue
        relu_out = layer.act.node.outputs[0]
        min_node = graph_layers.single_consumer(relu_out, outputs)
        if min_node is None or min_node.op != "Min" or not min_node.outputs:
            continue
        bounded = ws.act_ranges.get(min_node.outputs[0].name)
        if bounded is None or relu_out.name not in ws.act_ranges:
            continue
        ws.act_ranges[relu_out.name] = ActRange(bounded.lo, bounded.hi, bounded.source)
        changed.append(relu_out.name)
    return changed


class CrossLayerEqualizationPass(Pass):
    """Equalize every pair found by `find_pairs`, sweeping until max|s - 1| < tol (or max_sweeps).

    Weights are equalized in float64 and written once at the end; ws.channel_stats of every layer 1 is
    divided by its cumulative scale, and per-channel activation bounds follow it (see module doc).

    .. versionadded:: 0.1
    """

    name = "cle"

    def __init__(self, max_sweeps: int = 20, tol: float = 1e-6, eps: float = RANGE_EPS,
                 act_sigmas: float | None = DEFAULT_SIGMAS) -> None:
        if max_sweeps < 1:
            raise ValueError("max_sweeps must be >= 1")
        self.max_sweeps = max_sweeps
        self.tol = tol
        self.eps = eps
        self.act_sigmas = act_sigmas

    def _silence(self, ws: Workspace, pairs: list[EqualizePair], weights: dict[str, np.ndarray],
                 biases: dict[str, np.ndarray | None]) -> dict[str, int]:
        """Cut dead layer-1 channels (range <= eps * the layer's largest) out of every pair, in graph order.

        Equalizing them would scale them by 1/s with s -> 0: their bias and their (wrong: a constant
        channel has no spread, but BN still says std |gamma|) statistics would grow without bound.
        """
        silenced: dict[str, int] = {}
        for pair in pairs:
            first, second = pair.layer1.name, pair.layer2.name
            ranges = output_channel_ranges(weights[first])
            dead = ranges <= self.eps * max(float(ranges.max(initial=0.0)), np.finfo(np.float64).tiny)
            if not np.any(dead):
                continue
            pre = np.zeros(pair.channels) if biases[first] is None else biases[first]
            constant = activation_value(pair.act_kind, pre, pair.upper, pair.layer1.act.alpha)
            if biases[second] is None and np.any(constant[dead] != 0):
                if pair.layer2.op_type == "MatMul":
                    continue  # no bias to take the constant
            result = silence_dead_channels(weights[first], biases[first], weights[second], biases[second],
                                           dead, constant, group2=pair.layer2.group)
            weights[first], biases[first], weights[second] = result.w1, result.b1, result.w2
            if biases[second] is not None or np.any(result.b2 != 0):
                biases[second] = result.b2
            if first in ws.channel_stats:
                stats = ws.channel_stats[first]
                ws.channel_stats[first] = stats.replaced(np.where(dead, 0.0, stats.mean),
                                                         np.where(dead, 0.0, stats.std))
            silenced[first] = int(dead.sum())
        return silenced

    def _scale_floor(self, ws: Workspace, pair: EqualizePair) -> np.ndarray | None:
        """Smallest cumulative s per channel that keeps channel i's activation inside the tensor's range.

        Channel i's post-activation upper estimate is hi_i = min(mean_i + n std_i, upper_i) from its
        BN statistics (n = act_sigmas); after CLE it is hi_i / s_i. Per-tensor activation grids cover
        max_i hi_i, so s_i >= hi_i / max_j hi_j keeps that range (and the grid) where it was.
        """
        stats = ws.channel_stats.get(pair.layer1.name)
        if self.act_sigmas is None or stats is None:
            return None
        sigmas = ws.range_sigmas or self.act_sigmas  # the activation ranges' own width (wider on prior statistics)
        high = stats.mean + sigmas * stats.std
        if pair.act_kind in ("none", "leaky"):
            high = np.maximum(np.abs(high), np.abs(stats.mean - sigmas * stats.std))
        if pair.upper is not None:
            high = np.minimum(high, pair.upper)
        high = np.maximum(high, 0.0)
        top = float(high.max(initial=0.0))
        return high / top if top > 0 else None

    def ensures(self, ws: Workspace) -> None:
        for layer in graph_layers.read_layers(ws.graph):
            if not np.all(np.isfinite(layer.weight)) or (layer.bias is not None
                                                         and not np.all(np.isfinite(layer.bias))):
                raise PostconditionError(f"cle: {layer.name} has non-finite weights after equalization")

    def call(self, ws: Workspace) -> PassReport:
        report = PassReport(self.name, params={"max_sweeps": self.max_sweeps, "tol": self.tol,
                                               "act_sigmas": self.act_sigmas})
        layers = graph_layers.read_layers(ws.graph)
        pairs = find_pairs(ws.graph, layers)
        report.params["pairs"] = len(pairs)
        if not pairs:
            report.params["sweeps"] = 0
            return report
        involved = {p.name: p for pair in pairs for p in (pair.layer1, pair.layer2)}
        weights = {name: np.array(p.weight, np.float64) for name, p in involved.items()}  # owned copies
        biases = {name: None if p.bias is None else np.array(p.bias, np.float64)
                  for name, p in involved.items()}
        silenced = self._silence(ws, pairs, weights, biases)
        floors = {}
        for pair in pairs:
            pair.cumulative = np.ones(pair.channels)
            floors[pair.layer1.name] = self._scale_floor(ws, pair)
        sweeps, change = 0, np.inf
        while sweeps < self.max_sweeps and change >= self.tol:
            sweeps += 1
            change = 0.0
            for pair in pairs:
                first, second = pair.layer1.name, pair.layer2.name
                floor = floors[first]
                scale = channel_scales(weights[first], weights[second], group2=pair.layer2.group, eps=self.eps,
                                       min_scale=None if floor is None else floor / pair.cumulative)
                _apply_scales(weights[first], biases[first], weights[second], scale, pair.layer2.group)
                pair.cumulative = pair.cumulative * scale
                change = max(change, float(np.max(np.abs(scale - 1.0))))
        converged = change < self.tol
        if not converged:
            logger.info("cle: scales still moved by %.3g after %d sweeps", change, sweeps)
        self._write(ws, pairs, weights, biases)
        all_scales = np.concatenate([pair.cumulative for pair in pairs])
        for pair in pairs:
            report.rows.append(LayerRow(pair.layer1.name, {
                "cle_next": pair.layer2.name, "cle_act": pair.act_kind,
                "cle_scale_min": float(pair.cumulative.min()), "cle_scale_max": float(pair.cumulative.max()),
                "cle_dead_channels": silenced.get(pair.layer1.name, 0),
            }))
        report.params.update({"sweeps": sweeps, "converged": converged, "last_change": change,
                              "scale_min": float(all_scales.min()), "scale_max": float(all_scales.max())})
        report.params["dead_channels"] = sum(silenced.values())
        report.modified = bool(np.any(all_scales != 1.0)) or bool(silenced)
        logger.debug("cle: %d pairs, %d sweeps, scales in [%.3g, %.3g]", len(pairs), sweeps,
                     all_scales.min(), all_scales.max())
        return report

    @staticmethod
    def _write(ws: Workspace, pairs: list[EqualizePair], weights: dict[str, np.ndarray],
               biases: dict[str, np.ndarray | None]) -> None:
        written: set[str] = set()
        for pair in pairs:
            for layer in (pair.layer1, pair.layer2):
                if layer.name in written:
                    continue
                written.add(layer.name)
                graph_layers.write_weight(layer, weights[layer.name].astype(np.float32))
                if biases[layer.name] is not None:
                    graph_layers.write_bias(layer, biases[layer.name].astype(np.float32))
            name = pair.layer1.name
            if name in ws.channel_stats:
                ws.channel_stats[name] = ws.channel_stats[name].scaled(pair.cumulative)
            if pair.upper is not None and np.any(pair.cumulative != 1.0):
                set_channel_upper(ws, pair, pair.upper / pair.cumulative, sort=False)
        ws.graph.toposort()
