"""Torch implementations of ONNX elementwise, activation and tensor-manipulation ops.

Every op is a function ``op(node, inputs) -> Tensor | tuple[Tensor, ...]``: ``node`` is the
parsed :class:`NodeSpec` (attributes already decoded), ``inputs`` are the input tensors in ONNX
order, with ``None`` for an omitted optional input. Integer tensors (shapes, indices, pads) live
on the CPU; ops that need them as Python ints call :func:`to_ints`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["NodeSpec", "OpFn", "TENSOR_OPS", "to_ints", "normalize_axis", "torch_pads"]


@dataclass(frozen=True)
class NodeSpec:
    """One ONNX node with its attributes decoded to Python values."""

    op_type: str
    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    attrs: dict[str, Any] = field(default_factory=dict)
    opset: int = 13


OpFn = Callable[[NodeSpec, list[Any]], Any]


# Shapes, pads and clip bounds are fixed by the graph (and the batch size): under torch.compile they are read
# once while tracing and baked into the graph, where reading a tensor's values would otherwise break it
@torch.compiler.assume_constant_result
def _tensor_ints(value: torch.Tensor) -> list[int]:
    return [int(v) for v in value.reshape(-1).tolist()]


@torch.compiler.assume_constant_result
def _tensor_float(value: torch.Tensor) -> float:
    return float(value.reshape(-1)[0])


def to_ints(value: torch.Tensor | Sequence[int]) -> list[int]:
    """A 0-d/1-d integer tensor (or a sequence) as a list of Python ints."""
    if isinstance(value, torch.Tensor):
        return _tensor_ints(value)
    return [int(v) for v in value]


def to_float(value: torch.Tensor | float) -> float:
    """A one-element tensor (or a number) as a Python float."""
    return _tensor_float(value) if isinstance(value, torch.Tensor) else float(value)


def normalize_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def torch_pads(onnx_pads: Sequence[int], axes: Sequence[int], rank: int) -> list[int]:
    """ONNX pads ``[b_0, b_1, .., e_0, e_1, ..]`` over ``axes`` -> torch's ``F.pad`` tuple.

    ``F.pad`` lists (begin, end) pairs from the LAST dimension backwards; dimensions in front of
    the first padded one are left out.
    """
    half = len(onnx_pads) // 2
    per_axis = {normalize_axis(a, rank): (onnx_pads[i], onnx_pads[i + half]) for i, a in enumerate(axes)}
    first = min([a for a, p in per_axis.items() if p != (0, 0)] or [rank])
    flat: list[int] = []
    for axis in range(rank - 1, first - 1, -1):
        flat.extend(per_axis.get(axis, (0, 0)))
    return flat


def _attr_or_input(node: NodeSpec, inputs: list[Any], attr: str, index: int) -> Any:
    if attr in node.attrs:
        return node.attrs[attr]
    return inputs[index] if len(inputs) > index else None


# ---------------------------------------------------------------- elementwise and activations
def _div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if not a.is_floating_point() and not b.is_floating_point():
        return torch.div(a, b, rounding_mode="trunc")
    return a / b


def _binary(fn: Callable[[Any, Any], torch.Tensor]) -> OpFn:
    return lambda node, inputs: fn(inputs[0], inputs[1])


def _variadic(fn: Callable[[Any, Any], torch.Tensor]) -> OpFn:
    return lambda node, inputs: functools.reduce(fn, [t for t in inputs if t is not None])


def _unary(fn: Callable[[torch.Tensor], torch.Tensor]) -> OpFn:
    return lambda node, inputs: fn(inputs[0])


def _scalar_bound(value: Any) -> float | None:
    if isinstance(value, torch.Tensor):
        return to_float(value) if value.numel() == 1 else None
    return None if value is None else float(value)


def _clip(node: NodeSpec, inputs: list[Any]) -> torch.Tensor:
    x = inputs[0]
    low = _scalar_bound(_attr_or_input(node, inputs, "min", 1))
    high = _scalar_bound(_attr_or_input(node, inputs, "max", 2))
    if low is not None and high is not None and x.is_floating_point():
        return F.hardtanh(x, low, high)  # one fused kernel forward and backward (ReLU6)
    return torch.clamp(x, min=low, max=high)


def _leaky_relu(node: NodeSpec, inputs: list[Any]) -> torch.Tensor:
    return F.leaky_relu(inputs[0], node.attrs.get("alpha", 0.01))


def _prelu(node: NodeSpec, inputs: list[Any]) -> torch.Tensor:
    x, slope = inputs[0], inputs[1]
    return torch.where(x >= 0, x, x * slope)


def _elu(node: NodeSpec, inputs: list[Any]) -> torch.Tensor:
    return F.elu(inputs[0], node.attrs.get("alpha", 1.0))


def _mean(node: NodeSpec, inputs: list[Any]) -> torch.Tensor:
    present = [t for t in inputs if t is not None]
    return functools.reduce(torch.add, present) / len(present)


def _hard_sigmoid(node: NodeSpec, inputs: list[Any]) -> torch.Tensor:
    alpha, beta = node.attrs.get("alpha", 0.2), node.attrs.get("beta", 0.5)
    return torch.clamp(alpha * inputs[0] + beta, 0.0, 1.0)


def _softmax(node: NodeSpec, inputs: list[Any]) -> torch.Tensor:
    x = inputs[0]
    if node.opset >= 13:
        return F.softmax(x, dim=node.attrs.get("axis", -1))
    axis = normalize_axis(node.attrs.get("axis", 1), x.dim())  # opset < 13: coerce to 2-D
    flat = x.reshape(math.prod(x.shape[:axis]), -1)
    return F.softmax(flat, dim=1).reshape(x.shape)


# ---------------------------------------------------------------- shape manipulation
def _flatten(node: NodeSpec, inputs: list[Any]) -> torch.Tensor:
    x = inputs[0]
    axis = normalize_axis(node.attrs.get("axis", 1), x.dim())
    return x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))


def _reshape(node: NodeSpec, inputs: list[Any]) -> torch.Tensor:
    x, shape = inputs[0], to_ints(inputs[1])
    if not node.attrs.get("allowzero", 0):
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return x.reshape(shape)


def _transpose(node: NodeSpec, inputs: list[Any]) -> torch.Tensor:
    x = inputs[0]
    perm = node.attrs.get("perm", list(range(x.dim() - 1, -1, -1)))
    return x.permute(*perm)


def _concat(node: NodeSpec, inputs: list[Any]) -> torch.Tensor:
    return torch.cat([t for t in inputs if t is not None], dim=node.attrs["axis"])


def _shape(node: NodeSpec, inputs: list[Any]) -> torch.Tensor:
    dims = list(inputs[0].shape)
    start, end = node.attrs.get("start", 0), node.attrs.get("end", len(dims))
    return torch.tensor(dims[start:end], dtype=torch.int64)


def _gather(node: NodeSpec, inputs: list[Any]) -> torch.Tensor:
    data, indices = inputs[0], inputs[1]
    axis = normalize_axis(node.attrs.get("axis", 0), data.dim())
    indices = torch.remainder(indices.to(data.device, torch.int64), data.shape[axis])
    picked = torch.index_select(data, axis, indices.reshape(-1))
    return picked.reshape(data.shape[:axis] + indices.shape + data.shape[axis + 1 :])


def _unsqueeze(node: NodeSpec, inputs: list[Any]) -> torch.Tensor:
    x = inputs[0]
    axes = to_ints(_attr_or_input(node, inputs, "axes", 1))
    rank = x.dim() + len(axes)
    for axis in sorted(normalize_axis(a, rank) for a in axes):
        x = x.unsqueeze(axis)
    return x


def _squeeze(node: NodeSpec, inputs: list[Any]) -> torch.Tensor:
    x = inputs[0]
    axes = _attr_or_input(node, inputs, "axes", 1)
    if axes is None:
        return x.squeeze()
    for axis in sorted((normalize_axis(a, x.dim()) for a in to_ints(axes)), reverse=True):
        x = x.squeeze(axis)
    return x


def _slice(node: NodeSpec, inputs: list[Any]) -> torch.Tensor:
    x = inputs[0]
    starts = to_ints(_attr_or_input(node, inputs, "starts", 1))
    ends = to_ints(_attr_or_input(node, inputs, "ends", 2))
    axes_in = _attr_or_input(node, inputs, "axes", 3)
    steps_in = inputs[4] if len(inputs) > 4 else None
    axes = to_ints(axes_in) if axes_in is not None else list(range(len(starts)))
    steps = to_ints(steps_in) if steps_in is not None else [1] * len(starts)
    for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
        axis = normalize_axis(axis, x.dim())
        begin, stop, stride = slice(start, end, step).indices(x.shape[axis])
        if stride > 0:
            index = [slice(None)] * axis + [slice(begin, stop, stride)]
            x = x[tuple(index)]
        else:
            picks = torch.arange(begin, stop, stride, device=x.device)
            x = torch.index_select(x, axis, picks)
    return x


_PAD_MODES = {"constant": "constant", "reflect": "reflect", "edge": "replicate"}


def _pad(node: NodeSpec, inputs: list[Any]) -> torch.Tensor:
    x = inputs[0]
    pads = to_ints(_attr_or_input(node, inputs, "pads", 1))
    value_in = node.attrs.get("value", inputs[2] if len(inputs) > 2 else None)
    value = to_float(value_in) if value_in is not None else 0.0
    axes_in = inputs[3] if len(inputs) > 3 else None
    axes = to_ints(axes_in) if axes_in is not None else list(range(x.dim()))
    onnx_mode = node.attrs.get("mode", "constant")
    if onnx_mode not in _PAD_MODES:
        raise NotImplementedError(f"Pad {node.name!r}: mode {onnx_mode!r} is not supported")
    mode = _PAD_MODES[onnx_mode]
    flat = torch_pads(pads, axes, x.dim())
    if mode == "constant":
        return F.pad(x, flat, mode=mode, value=value)
    return F.pad(x, flat, mode=mode)


def _cast(node: NodeSpec, inputs: list[Any]) -> torch.Tensor:
    to = node.attrs["to"]
    if to in (1, 10, 11, 16):  # FLOAT, FLOAT16, DOUBLE, BFLOAT16: the executor computes in float32
        return inputs[0].to(torch.float32)
    if to == 9:  # BOOL
        return inputs[0].to(torch.bool)
    return inputs[0].to(torch.int64)


def _reduce_mean(node: NodeSpec, inputs: list[Any]) -> torch.Tensor:
    x = inputs[0]
    axes = _attr_or_input(node, inputs, "axes", 1)
    keepdims = bool(node.attrs.get("keepdims", 1))
    if axes is None:
        return x.mean(dim=tuple(range(x.dim())), keepdim=keepdims)
    return x.mean(dim=tuple(to_ints(axes)), keepdim=keepdims)


def _identity(node: NodeSpec, inputs: list[Any]) -> torch.Tensor:
    return inputs[0]


TENSOR_OPS: dict[str, OpFn] = {
    "Add": _binary(torch.add),
    "Sub": _binary(torch.sub),
    "Mul": _binary(torch.mul),
    "Div": _binary(_div),
    "Pow": _binary(torch.pow),
    "Min": _variadic(torch.minimum),
    "Max": _variadic(torch.maximum),
    "Sum": _variadic(torch.add),
    "Mean": _mean,
    "Relu": _unary(F.relu),
    "Sigmoid": _unary(torch.sigmoid),
    "Tanh": _unary(torch.tanh),
    "HardSwish": _unary(F.hardswish),
    "Exp": _unary(torch.exp),
    "Sqrt": _unary(torch.sqrt),
    "Neg": _unary(torch.neg),
    "Abs": _unary(torch.abs),
    "Log": _unary(torch.log),
    "Reciprocal": _unary(torch.reciprocal),
    "Softplus": _unary(F.softplus),
    "PRelu": _prelu,
    "Elu": _elu,
    "LeakyRelu": _leaky_relu,
    "HardSigmoid": _hard_sigmoid,
    "Clip": _clip,
    "Softmax": _softmax,
    "Flatten": _flatten,
    "Reshape": _reshape,
    "Transpose": _transpose,
    "Concat": _concat,
    "Shape": _shape,
    "Gather": _gather,
    "Unsqueeze": _unsqueeze,
    "Squeeze": _squeeze,
    "Slice": _slice,
    "Pad": _pad,
    "Cast": _cast,
    "ReduceMean": _reduce_mean,
    "Identity": _identity,
    "Dropout": _identity,  # inference: the mask output is not supported
}
