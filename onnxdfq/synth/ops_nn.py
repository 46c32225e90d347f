"""Torch implementations of ONNX layer ops: convolutions, BatchNormalization, pooling, Gemm.

Same calling convention as :mod:`onnxdfq.synth.ops_tensor`. Spatial padding follows ONNX:
``pads = [b_0, b_1, .., e_0, e_1, ..]`` over the spatial axes; symmetric pads go to torch's
``padding=`` argument, asymmetric ones (TF "SAME" exports) are applied with ``F.pad`` first.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from onnxdfq.graph.geometry import resolve_pads

from .ops_tensor import NodeSpec, OpFn, torch_pads

__all__ = ["NN_OPS", "resolve_pads"]

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
_MAX_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_AVG_POOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


def _pad_spatial(x: torch.Tensor, pads: Sequence[int], value: float = 0.0) -> torch.Tensor:
    nd = x.dim() - 2
    return F.pad(x, torch_pads(pads, range(2, 2 + nd), x.dim()), mode="constant", value=value)


def _split_symmetric(pads: Sequence[int]) -> tuple[int, ...] | None:
    half = len(pads) // 2
    if list(pads[:half]) == list(pads[half:]):
        return tuple(pads[:half])
    return None


def _spatial_params(node: NodeSpec, nd: int) -> tuple[list[int], list[int]]:
    return list(node.attrs.get("strides", [1] * nd)), list(node.attrs.get("dilations", [1] * nd))


def _conv(node: NodeSpec, inputs: list[Any]) -> torch.Tensor:
    x, weight = inputs[0], inputs[1]
    bias = inputs[2] if len(inputs) > 2 else None
    nd = weight.dim() - 2
    strides, dilations = _spatial_params(node, nd)
    pads = resolve_pads(node.attrs, x.shape[2:], weight.shape[2:], strides, dilations)
    padding = _split_symmetric(pads)
    if padding is None:
        x, padding = _pad_spatial(x, pads), (0,) * nd
    return _CONV[nd](x, weight, bias, strides, padding, dilations, node.attrs.get("group", 1))


def _conv_transpose(node: NodeSpec, inputs: list[Any]) -> torch.Tensor:
    x, weight = inputs[0], inputs[1]
    bias = inputs[2] if len(inputs) > 2 else None
    nd = weight.dim() - 2
    if "output_shape" in node.attrs or node.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        raise NotImplementedError(f"ConvTranspose {node.name!r}: output_shape / SAME auto_pad are not supported")
    strides, dilations = _spatial_params(node, nd)
    pads = list(node.attrs.get("pads", [0] * (2 * nd))) if node.attrs.get("auto_pad") != "VALID" else [0] * (2 * nd)
    output_padding = list(node.attrs.get("output_padding", [0] * nd))
    y = _CONV_T[nd](x, weight, bias, strides, 0, output_padding, node.attrs.get("group", 1), dilations)
    # Removing pads from the full transposed output is exactly ONNX's definition (negative F.pad crops).
    return _pad_spatial(y, [-p for p in pads])


def _batch_norm(node: NodeSpec, inputs: list[Any]) -> torch.Tensor:
    x, scale, bias, mean, var = inputs[:5]
    return F.batch_norm(x, mean, var, scale, bias, training=False, eps=node.attrs.get("epsilon", 1e-5))


def _pool_params(node: NodeSpec, x: torch.Tensor) -> tuple[list[int], list[int], list[int], list[int], bool]:
    kernel = list(node.attrs["kernel_shape"])
    nd = len(kernel)
    strides, dilations = _spatial_params(node, nd)
    pads = resolve_pads(node.attrs, x.shape[2:], kernel, strides, dilations)
    return kernel, strides, dilations, pads, bool(node.attrs.get("ceil_mode", 0))


def _max_pool(node: NodeSpec, inputs: list[Any]) -> torch.Tensor:
    x = inputs[0]
    if len(node.outputs) > 1 and node.outputs[1]:
        raise NotImplementedError(f"MaxPool {node.name!r}: the Indices output is not supported")
    kernel, strides, dilations, pads, ceil_mode = _pool_params(node, x)
    if any(pads):
        x = _pad_spatial(x, pads, value=-math.inf)
    return _MAX_POOL[len(kernel)](x, kernel, strides, 0, dilations, ceil_mode=ceil_mode)


def _average_pool(node: NodeSpec, inputs: list[Any]) -> torch.Tensor:
    x = inputs[0]
    kernel, strides, dilations, pads, ceil_mode = _pool_params(node, x)
    if any(d != 1 for d in dilations):
        raise NotImplementedError(f"AveragePool {node.name!r}: dilations are not supported")
    pool = _AVG_POOL[len(kernel)]
    if not any(pads):
        return pool(x, kernel, strides, 0, ceil_mode=ceil_mode)
    padded = pool(_pad_spatial(x, pads), kernel, strides, 0, ceil_mode=ceil_mode)
    if node.attrs.get("count_include_pad", 0):
        return padded
    # Exclude the pads from the divisor: divide by the fraction of real elements in each window.
    ones = torch.ones((1, 1) + tuple(x.shape[2:]), dtype=x.dtype, device=x.device)
    coverage = pool(_pad_spatial(ones, pads), kernel, strides, 0, ceil_mode=ceil_mode)
    return padded / coverage


def _global_average_pool(node: NodeSpec, inputs: list[Any]) -> torch.Tensor:
    x = inputs[0]
    return x.mean(dim=tuple(range(2, x.dim())), keepdim=True)


def _global_max_pool(node: NodeSpec, inputs: list[Any]) -> torch.Tensor:
    x = inputs[0]
    return torch.amax(x, dim=tuple(range(2, x.dim())), keepdim=True)


def _gemm(node: NodeSpec, inputs: list[Any]) -> torch.Tensor:
    a, b = inputs[0], inputs[1]
    c = inputs[2] if len(inputs) > 2 else None
    if node.attrs.get("transA", 0):
        a = a.transpose(0, 1)
    if node.attrs.get("transB", 0):
        b = b.transpose(0, 1)
    y = node.attrs.get("alpha", 1.0) * (a @ b)
    if c is not None:
        y = y + node.attrs.get("beta", 1.0) * c
    return y


def _matmul(node: NodeSpec, inputs: list[Any]) -> torch.Tensor:
    return torch.matmul(inputs[0], inputs[1])


NN_OPS: dict[str, OpFn] = {
    "Conv": _conv,
    "ConvTranspose": _conv_transpose,
    "BatchNormalization": _batch_norm,
    "MaxPool": _max_pool,
    "AveragePool": _average_pool,
    "GlobalAveragePool": _global_average_pool,
    "GlobalMaxPool": _global_max_pool,
    "Gemm": _gemm,
    "MatMul": _matmul,
}
