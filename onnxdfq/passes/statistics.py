"""The statistics engine: per-channel statistics of every tensor, from explicit sources, once per graph state.

Every tensor is modelled per channel as clip(N(mean, var), lo, hi), tagged with its source:
- ``bn`` / ``prior`` / ``samples``: a layer's output whose pre-activation statistics are known
  (``ws.channel_stats``): from a folded BatchNormalization (beta, |gamma|), or measured on
  procedural prior images or calibration samples where the model has no BN (most exports);
- ``input``: the network input, N(0, 1) clipped to ``input_range`` (default +-3, i.e.
  standardised images), or uniform over the given range;
- ``propagated``: everything else, pushed through the graph op by op:
  - a layer without statistics propagates its input moments linearly (independent inputs):
    mean = b + sum W m,  var = sum W^2 v;
  - Relu / Clip / Min / Max with constants tighten (lo, hi) and keep the Gaussian;
  - Add sums the true (clipped) moments into a new Gaussian, with lo and hi summed;
  - Slice / Pad along channels select channels or add constant channels; pooling (also as
    ReduceMean / ReduceMax over space), Flatten, Reshape and Identity keep the channel
    statistics (an average or a max of values never leaves their range);
  - anything else is unknown: its tensors get no statistics.

:func:`tensor_statistics` is what passes call: it propagates once per workspace version (every
pass that changes the graph or the channel statistics bumps it) and hands the same dict to every
reader until then (activation ranges, bias correction, DF-MPC's re-estimation).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from onnxdfq.graph import layers as graph_layers
from onnxdfq.passes.base import Workspace
from onnxdfq.quant.gaussian import clipped_normal_moments

__all__ = ["DEFAULT_INPUT_RANGE", "TensorStats", "linear_moments", "propagate_statistics", "tensor_statistics",
           "invalidate", "layer_stat_counts"]

logger = logging.getLogger(__name__)

DEFAULT_INPUT_RANGE = (-3.0, 3.0)  # standardised inputs: +-3 std
_CACHE_KEY = "tensor_statistics"


@dataclass(frozen=True)
class TensorStats:
    """Per-channel clip(N(mean, var), lo, hi) model of a tensor; `source` says where it came from."""

    mean: np.ndarray
    var: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    source: str

    @property
    def channels(self) -> int:
        return self.mean.size

    def clipped(self, lo: np.ndarray | float, hi: np.ndarray | float, source: str | None = None) -> TensorStats:
        new_lo = np.maximum(self.lo, lo)
        new_hi = np.minimum(self.hi, hi)
        return TensorStats(self.mean, self.var, np.minimum(new_lo, new_hi), new_hi, source or self.source)

    def moments(self) -> tuple[np.ndarray, np.ndarray]:
        """True mean and variance of the clipped channels."""
        return clipped_normal_moments(self.mean, np.sqrt(self.var), self.lo, self.hi)

    def select(self, index: np.ndarray) -> TensorStats:
        return TensorStats(self.mean[index], self.var[index], self.lo[index], self.hi[index], self.source)

    def range(self, sigmas: float) -> tuple[float, float]:
        std = np.sqrt(self.var)
        lo = np.minimum(np.maximum(self.mean - sigmas * std, self.lo), self.hi)
        hi = np.maximum(np.minimum(self.mean + sigmas * std, self.hi), self.lo)
        return min(float(lo.min()), 0.0), max(float(hi.max()), 0.0)


def _stats(mean, var, lo=-np.inf, hi=np.inf, source="propagated") -> TensorStats:
    mean = np.asarray(mean, np.float64).reshape(-1)
    shape = mean.shape
    return TensorStats(mean, np.broadcast_to(np.asarray(var, np.float64), shape).copy(),
                       np.broadcast_to(np.asarray(lo, np.float64), shape).copy(),
                       np.broadcast_to(np.asarray(hi, np.float64), shape).copy(), source)


def linear_moments(weight: np.ndarray, bias: np.ndarray | None, group: int, in_mean: np.ndarray,
                   in_var: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Output mean/var of a layer (canonical weight [O, I/g, *k]) for independent inputs."""
    out_ch, in_per_group = weight.shape[0], weight.shape[1]
    w = weight.reshape(out_ch, in_per_group, -1).astype(np.float64)
    group_of_out = np.arange(out_ch) // (out_ch // group)
    in_index = group_of_out[:, None] * in_per_group + np.arange(in_per_group)[None, :]
    mean = np.einsum("oik,oi->o", w, in_mean[in_index])
    var = np.einsum("oik,oi->o", w * w, in_var[in_index])
    if bias is not None:
        mean = mean + bias
    return mean, var


def _const(tensor) -> np.ndarray | None:
    return graph_layers.const_value(tensor)


def _channel_const(value: np.ndarray, channels: int) -> np.ndarray | None:
    """A constant that broadcasts against [N, C, ...] per channel ([C,1,1], [1,C,1,1], scalar), or None."""
    value = np.asarray(value, np.float64)
    if value.size == 1:
        return np.full(channels, float(value.reshape(-1)[0]))
    if value.ndim >= 3 and value.shape[-3] == channels and value.size == channels:
        return value.reshape(-1)
    return None


def _shape(tensor) -> list | None:
    shape = getattr(tensor, "shape", None)
    return list(shape) if shape is not None else None


def _through_op(node, stats_in: list[TensorStats | None]) -> TensorStats | None:  # noqa: C901
    op = node.op
    first = stats_in[0] if stats_in else None
    if op in ("Relu",):
        return first.clipped(0.0, np.inf) if first else None
    if op == "Clip":
        act = graph_layers.activation_after(node.inputs[0], set()) if first else None
        if first is None or act is None or act.node is not node:
            return None
        return first.clipped(act.lo, act.hi)
    if op in ("Min", "Max") and len(node.inputs) == 2 and first is not None:
        value = _const(node.inputs[1])
        bound = _channel_const(value, first.channels) if value is not None else None
        if bound is None:
            return None
        return first.clipped(-np.inf, bound) if op == "Min" else first.clipped(bound, np.inf)
    if op in ("Identity", "Dropout", "GlobalAveragePool", "AveragePool", "MaxPool", "GlobalMaxPool"):
        return first
    if op in ("ReduceMean", "ReduceMax") and first is not None:  # global pooling as the dynamo exporter writes it
        axes = node.attrs.get("axes")
        if axes is None and len(node.inputs) > 1 and node.inputs[1].name:
            axes = _const(node.inputs[1])
        rank = len(_shape(node.inputs[0]) or [])
        if axes is not None and rank > 2 and 1 not in {int(a) % rank for a in np.ravel(axes)}:
            return first  # reduced over space only: each channel keeps its statistics' range
    if op in ("Flatten", "Reshape", "Squeeze", "Unsqueeze"):
        if first is None:
            return None
        in_shape, out_shape = _shape(node.inputs[0]), _shape(node.outputs[0])
        if in_shape is None or out_shape is None or len(in_shape) < 2 or len(out_shape) < 2:
            return first if (out_shape and len(out_shape) >= 2 and out_shape[1] == first.channels) else None
        if out_shape[1] == in_shape[1]:
            return first
        spatial = in_shape[2:]
        if all(isinstance(d, int) for d in spatial) and out_shape[1] == in_shape[1] * int(np.prod(spatial)):
            repeat = int(np.prod(spatial))
            return TensorStats(*(np.repeat(a, repeat) for a in (first.mean, first.var, first.lo, first.hi)),
                               first.source)
        return None
    if op == "Add" and len(stats_in) == 2:
        a, b = stats_in
        if a is not None and b is None:
            value = _const(node.inputs[1])
            shift = _channel_const(value, a.channels) if value is not None else None
            return None if shift is None else TensorStats(a.mean + shift, a.var, a.lo + shift, a.hi + shift,
                                                          a.source)
        if a is None or b is None or a.channels != b.channels:
            return None
        (ma, va), (mb, vb) = a.moments(), b.moments()
        return _stats(ma + mb, va + vb, a.lo + b.lo, a.hi + b.hi)
    if op == "Slice" and first is not None:
        starts, ends = _const(node.inputs[1]), _const(node.inputs[2])
        axes = _const(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3].name else None
        steps = _const(node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4].name else None
        if starts is None or ends is None:
            return None
        axes = np.arange(len(starts)) if axes is None else axes
        steps = np.ones(len(starts), np.int64) if steps is None else steps
        result = first
        for start, end, axis, step in zip(starts, ends, axes, steps, strict=False):
            if int(axis) == 1:
                index = np.arange(result.channels)[slice(int(start), int(min(end, 2**62)), int(step))]
                result = result.select(index)
        return result
    if op == "Pad" and first is not None:
        pads = _const(node.inputs[1]) if len(node.inputs) > 1 else np.asarray(node.attrs.get("pads", []))
        mode = node.attrs.get("mode", "constant")
        if isinstance(mode, bytes):
            mode = mode.decode()
        if pads is None or mode != "constant":
            return None
        rank = len(pads) // 2
        value = _const(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2].name else np.zeros(1)
        fill = float(np.asarray(value).reshape(-1)[0]) if value is not None and np.size(value) else 0.0
        before, after = (int(pads[1]), int(pads[1 + rank])) if rank > 1 else (0, 0)
        lo, hi = np.minimum(first.lo, fill), np.maximum(first.hi, fill)
        grown = TensorStats(first.mean, first.var, lo, hi, first.source)
        if before or after:
            zeros = _stats(np.full(before, fill), 0.0, fill, fill)
            tail = _stats(np.full(after, fill), 0.0, fill, fill)
            grown = TensorStats(*(np.concatenate([getattr(zeros, f), getattr(grown, f), getattr(tail, f)])
                                  for f in ("mean", "var", "lo", "hi")), "propagated")
        return grown
    if op == "Concat" and all(s is not None for s in stats_in) and int(node.attrs.get("axis", 1)) == 1:
        return TensorStats(*(np.concatenate([getattr(s, f) for s in stats_in]) for f in ("mean", "var", "lo", "hi")),
                           "propagated")
    return None


def propagate_statistics(ws: Workspace, layers: list[graph_layers.Layer],
                         input_range: tuple[float, float] | None = None) -> dict[str, TensorStats]:
    """Per-channel statistics of every tensor that can be described without data."""
    graph = ws.graph
    by_node = {id(layer.node): layer for layer in layers}
    stats: dict[str, TensorStats] = {}
    lo, hi = input_range or ws.input_range or DEFAULT_INPUT_RANGE
    for tensor in graph.inputs:
        shape = _shape(tensor)
        channels = shape[1] if shape and len(shape) > 1 and isinstance(shape[1], int) else 1
        if input_range or ws.input_range:
            mean, var = (lo + hi) / 2.0, (hi - lo) ** 2 / 12.0  # uniform over the given range
        else:
            mean, var = 0.0, 1.0
        stats[tensor.name] = _stats(np.full(channels, mean), var, lo, hi, "input")
    for node in graph.nodes:
        layer = by_node.get(id(node))
        if layer is not None:
            if layer.name in ws.channel_stats:
                known = ws.channel_stats[layer.name]
                stats[node.outputs[0].name] = _stats(known.mean, known.std**2, source=known.source)
                continue
            source = stats.get(layer.input_name)
            if source is not None:
                in_mean, in_var = source.moments()
                if layer.group == 1 and in_mean.size != layer.weight.shape[1] and in_mean.size == 1:
                    in_mean = np.full(layer.weight.shape[1], in_mean[0])
                    in_var = np.full(layer.weight.shape[1], in_var[0])
                if in_mean.size == layer.weight.shape[1] * layer.group:
                    mean, var = linear_moments(layer.weight, layer.bias, layer.group, in_mean, in_var)
                    stats[node.outputs[0].name] = _stats(mean, var, source="propagated")
            continue
        inputs = [stats.get(t.name) for t in node.inputs if t.name]
        result = _through_op(node, inputs)
        if result is not None and node.outputs:
            stats[node.outputs[0].name] = result
    return stats


def tensor_statistics(ws: Workspace) -> dict[str, TensorStats]:
    """Statistics of every tensor of the workspace's graph as it stands (cached per ``ws.version``).

    Treat the result as read-only: it is shared by every pass until the graph changes.
    """
    cached = ws.cache.get(_CACHE_KEY)
    if cached is not None and cached[0] == ws.version:
        return cached[1]
    stats = propagate_statistics(ws, graph_layers.read_layers(ws.graph))
    ws.cache[_CACHE_KEY] = (ws.version, stats)
    return stats


def invalidate(ws: Workspace) -> None:
    """Drop the cached tensor statistics after ``ws.channel_stats`` changed without a graph change."""
    ws.cache.pop(_CACHE_KEY, None)


def layer_stat_counts(ws: Workspace, layers: list[graph_layers.Layer]) -> dict[str, int]:
    """How many layers have output statistics from each source (``none`` for those without)."""
    counts: dict[str, int] = {}
    for layer in layers:
        known = ws.channel_stats.get(layer.name)
        key = known.source if known is not None else "none"
        counts[key] = counts.get(key, 0) + 1
    return counts
