"""Hessian-guided rounding (GPTQ, Frantar et al. 2022, after Optimal Brain Quantization) on generated samples.

A layer's output error on inputs ``x`` is ``||(W_q - W) x||^2``; summed over samples it is
``tr(E H E^T)`` with ``E = W_q - W`` and ``H = sum x x^T`` (for a convolution, ``x`` runs over the
input patches, ``D = C/g * kernel`` long, one ``H`` per group). GPTQ rounds the input columns one
after another and spreads each column's rounding error over the columns not yet rounded, in the
direction ``H`` says is cheapest (the Cholesky factor of ``H^-1``): every output channel at once,
the grid (per-channel scale) fixed in advance.

Without data, ``H`` comes from samples the model's own statistics produced (DFFG for a model with
BN). Measured on MobileNet-V1 W4A8 (val1300; FP32 76.85): SQuant 67.31 %, GPTQ on 256 DFFG samples
70.62 (real images as the samples: 68.54; procedural prior images: 65.2-67.7, worse than SQuant).

Everything here is numpy over arrays: the pipeline feeds the layer inputs it fetched from
onnxruntime to :class:`HessianAccumulator` and calls :func:`gptq_round` with the result.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from onnxdfq.graph.geometry import resolve_pads

__all__ = ["LayerGeometry", "HessianAccumulator", "layer_rows", "gptq_round", "output_error", "DEFAULT_DAMP",
           "SPARSE_DAMP"]

logger = logging.getLogger(__name__)

# Ridge on H, as a fraction of its mean diagonal: GPTQ's 1 %. MobileNet-V1 W4A8: 70.08 % at 0.01, 69.54 at 0.1,
# 69.15 at 0.001 (conv_preds left to SQuant in all three)
DEFAULT_DAMP = 0.01
# ... and where fewer rows than columns were seen (a classifier on pooled features: 256 samples, 768 inputs), H is
# singular and a small ridge fits the samples' noise: MobileNet-V1's conv_preds at 1.0 gave 70.62 against 70.08
SPARSE_DAMP = 1.0
# bytes of patches built at once while accumulating (the im2col copy of a batch is kernel-size times its input)
PATCH_BYTES = 256 << 20
# output_error reads a float32 H in float64 slices of this many columns rather than one whole [D, D] copy
OUTPUT_ERROR_COLUMNS = 1024


@dataclass(frozen=True)
class LayerGeometry:
    """What turns a layer's input tensor into the rows its weight multiplies."""

    op_type: str  # Conv, Gemm or MatMul
    kernel: tuple[int, ...] = ()
    group: int = 1
    attrs: dict[str, Any] = field(default_factory=dict)  # the Conv node's strides, dilations, pads / auto_pad

    @property
    def supported(self) -> bool:
        return self.op_type in ("Gemm", "MatMul") or (self.op_type == "Conv" and len(self.kernel) in (1, 2, 3))


def layer_rows(x: np.ndarray, geometry: LayerGeometry) -> np.ndarray:
    """The input rows of one layer, ``[G, rows, D]``: the patches a convolution's weight meets (im2col, in the
    weight's own order C/g then kernel), or the last axis of a Gemm/MatMul input."""
    x = np.asarray(x, np.float32)
    if geometry.op_type != "Conv":
        return x.reshape(1, -1, x.shape[-1])
    nd = len(geometry.kernel)
    spatial = x.shape[2:]
    strides = list(geometry.attrs.get("strides", [1] * nd))
    dilations = list(geometry.attrs.get("dilations", [1] * nd))
    pads = resolve_pads(geometry.attrs, spatial, geometry.kernel, strides, dilations)
    x = np.pad(x, [(0, 0), (0, 0)] + [(pads[i], pads[i + nd]) for i in range(nd)])
    extent = [(k - 1) * d + 1 for k, d in zip(geometry.kernel, dilations, strict=True)]
    windows = sliding_window_view(x, extent, axis=tuple(range(2, 2 + nd)))  # [N, C, *O_full, *extent]
    index = (slice(None), slice(None)) + tuple(slice(None, None, s) for s in strides) + \
        tuple(slice(None, None, d) for d in dilations)
    windows = windows[index]  # [N, C, *O, *K]
    n, channels = windows.shape[:2]
    out_axes = tuple(range(2, 2 + nd))
    kernel_axes = tuple(range(2 + nd, 2 + 2 * nd))
    rows = windows.transpose((0, *out_axes, 1, *kernel_axes))  # [N, *O, C, *K]
    group = geometry.group
    rows = rows.reshape(-1, group, (channels // group) * int(np.prod(geometry.kernel)))
    return np.ascontiguousarray(rows.transpose(1, 0, 2))


class HessianAccumulator:
    """``H = sum x x^T`` over every input row of one layer, one ``[D, D]`` per group, summed in place in float32:
    each block's product is a float32 matrix product over thousands of rows already, and a float64 sum held every
    layer's Hessian at twice the size until the rounding (a BN-folded ResNet-18 at 224 px peaked at 2.0 GB)."""

    def __init__(self, geometry: LayerGeometry) -> None:
        self.geometry = geometry
        self.hessian: np.ndarray | None = None
        self.rows = 0

    def add(self, x: np.ndarray) -> None:
        x = np.asarray(x)
        per_sample = 4 * int(np.prod(x.shape[1:])) * int(np.prod(self.geometry.kernel or (1,)))
        step = max(1, PATCH_BYTES // max(per_sample, 1))
        for start in range(0, len(x), step):
            rows = layer_rows(x[start:start + step], self.geometry)
            block = np.matmul(rows.transpose(0, 2, 1), rows, dtype=np.float32)
            if self.hessian is None:
                self.hessian = block
            else:
                self.hessian += block
            self.rows += rows.shape[1]


def _inverse_factor(hessian: np.ndarray, damp: float) -> np.ndarray:
    """Upper Cholesky factor U of (H + ridge)^-1 per group (H^-1 = U^T U), the ridge grown until it factors.

    H^-1 is never formed: with J the reversal of the column order, chol(J H J) = L gives H = (J L J)(J L J)^T with
    J L J upper triangular, so U = (J L J)^-1 = J L^-1 J. One factorisation and one triangular inverse, at most
    two float64 [D, D] at a time (inverting H and factoring H^-1 held five: 850 MB on a 4608-input layer).
    """
    diag = np.diagonal(hessian, axis1=1, axis2=2).astype(np.float64)
    dead = diag <= 0  # inputs the samples never reached: their columns round to nearest, nothing spreads to them
    scale = np.where(dead.all(axis=1), 1.0, diag.mean(axis=1))
    index = np.arange(hessian.shape[-1])
    for factor in (1.0, 10.0, 100.0):
        reversed_h = np.array(hessian[:, ::-1, ::-1], np.float64)
        reversed_h[:, index, index] += ((damp * factor * scale)[:, None] + dead)[:, ::-1]
        try:
            lower = np.linalg.cholesky(reversed_h)
        except np.linalg.LinAlgError:
            continue
        del reversed_h
        inverse = np.linalg.inv(lower)
        del lower
        return inverse[:, ::-1, ::-1].copy()
    raise np.linalg.LinAlgError("the layer's input Hessian does not factor even with a 100x ridge")


def gptq_round(w: np.ndarray, scale: np.ndarray, qmin: int, qmax: int, hessian: np.ndarray, rows: int | None = None,
               *, damp: float | None = None, block: int = 128) -> np.ndarray:
    """Integers for ``w`` (canonical ``[O, ...]``) on the grid ``scale`` (``[O]`` or ``[1]``), rounded column by
    column with each column's error spread over the rest through ``hessian`` (``[G, D, D]``, G groups of
    O/G output channels, D = prod(w.shape[1:])). ``rows`` (how many input rows built H) picks the ridge:
    DEFAULT_DAMP, or SPARSE_DAMP when H is singular (rows < D). With H diagonal this is nearest rounding.
    ``block`` columns are rounded between two matrix updates of the rest (any value gives the same integers)."""
    hessian = np.asarray(hessian)  # float32 as accumulated: _inverse_factor takes its float64 copy
    groups, depth = hessian.shape[0], hessian.shape[-1]
    out = w.shape[0]
    if out % groups or int(np.prod(w.shape[1:])) != depth:
        raise ValueError(f"weight {w.shape} does not match a Hessian of {groups} group(s) of {depth} inputs")
    if damp is None:
        damp = SPARSE_DAMP if rows is not None and rows < depth else DEFAULT_DAMP
    work = np.asarray(w, np.float64).reshape(groups, out // groups, depth).copy()
    steps = np.broadcast_to(np.asarray(scale, np.float64).reshape(-1), (out,)).reshape(groups, out // groups)
    steps = np.maximum(steps, np.finfo(np.float64).tiny)  # all-zero channels: their weights stay exact zeros
    upper = _inverse_factor(hessian, damp)
    q = np.empty_like(work)
    for begin in range(0, depth, block):
        # columns one at a time inside a block (each vectorised over every group and output channel); the block's
        # errors reach the columns after it in one matrix product (GPTQ's lazy batch: the same arithmetic, but
        # ResNet-50's 4608-column layers no longer sweep [512, 4608] once per column)
        end = min(begin + block, depth)
        part = work[:, :, begin:end]
        errors = np.empty_like(part)
        for col in range(end - begin):
            column = part[:, :, col]
            q[:, :, begin + col] = np.clip(np.rint(column / steps), qmin, qmax)
            errors[:, :, col] = (column - q[:, :, begin + col] * steps) / upper[:, begin + col, begin + col][:, None]
            part[:, :, col + 1:] -= errors[:, :, col, None] * upper[:, None, begin + col, begin + col + 1:end]
        if end < depth:
            work[:, :, end:] -= np.matmul(errors, upper[:, begin:end, end:])
    return q.reshape(w.shape).astype(np.int64)


def output_error(w: np.ndarray, w_q: np.ndarray, hessian: np.ndarray) -> float:
    """``tr(E H E^T)`` summed over groups: the squared output error on the rows that built ``hessian``."""
    groups, depth = hessian.shape[0], hessian.shape[-1]
    err = (np.asarray(w_q, np.float64) - np.asarray(w, np.float64)).reshape(groups, -1, depth)
    total = 0.0
    for start in range(0, depth, OUTPUT_ERROR_COLUMNS):
        part = np.asarray(hessian[:, :, start:start + OUTPUT_ERROR_COLUMNS], np.float64)
        # a matrix product: einsum's three operands ran naively
        total += float(np.sum(np.matmul(err, part) * err[:, :, start:start + OUTPUT_ERROR_COLUMNS]))
    return total
