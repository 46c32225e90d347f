"""The one place where scales and zero points are computed.

Symmetric weights:   scale = max|w| / qmax            (per output channel or per tensor), zp = 0
Affine activations:  scale = (hi - lo) / (qmax - qmin),  zp = round(qmin - lo / scale)
The range is first widened to contain 0 so that zero (padding, ReLU) is exactly representable.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import numpy as np

from onnxdfq.quant.fake import fake_quant
from onnxdfq.quant.scheme import QuantScheme

__all__ = ["TINY_SCALE", "weight_scale", "activation_qparams", "channel_absmax", "ActQParams", "activation_grid",
           "bias_safe_weight_scale", "int32_bias", "SIGNED_TO_UNSIGNED"]

logger = logging.getLogger(__name__)

# a scale for all-zero channels: any positive value quantizes zeros exactly; this one avoids 0-division
TINY_SCALE = 1e-8


def channel_absmax(w: np.ndarray, axis: int = 0) -> np.ndarray:
    """max |w| over every axis but `axis`, shape [w.shape[axis]]."""
    moved = np.moveaxis(np.abs(w), axis, 0)
    return moved.reshape(moved.shape[0], -1).max(axis=1)


def weight_scale(w: np.ndarray, scheme: QuantScheme, absmax: np.ndarray | None = None) -> np.ndarray:
    """Symmetric scale, shape [C] for per-channel (C = w.shape[scheme.axis]) or [1] per-tensor.

    `absmax` overrides the range (e.g. a clipped range); zero-range channels get TINY_SCALE and a
    RuntimeWarning instead of a division by zero.
    """
    if absmax is None:
        absmax = channel_absmax(w, scheme.axis) if scheme.per_channel else np.array([np.abs(w).max()])
    absmax = np.asarray(absmax, dtype=np.float64)
    zero = absmax <= 0
    if zero.any():
        warnings.warn(f"{int(zero.sum())} all-zero weight channel(s): scale set to {TINY_SCALE}",
                      RuntimeWarning, stacklevel=2)
    return np.where(zero, TINY_SCALE, absmax / scheme.qmax)


def mse_weight_absmax(w: np.ndarray, scheme: QuantScheme, ratios: np.ndarray | None = None) -> np.ndarray:
    """The clipped range alpha * max|w| per channel (per tensor for a per-tensor scheme) whose grid gives the least
    squared error under nearest rounding, alpha searched over ``ratios`` (default 0.50 to 1.00 in steps of 0.02):
    the search GPTQ's reference quantizer offers (its ``mse`` option). Shape as `channel_absmax`."""
    ratios = np.linspace(0.5, 1.0, 26) if ratios is None else np.asarray(ratios, np.float64)
    w = np.asarray(w, np.float64)
    flat = np.moveaxis(w, scheme.axis, 0).reshape(w.shape[scheme.axis], -1) if scheme.per_channel else w.reshape(1, -1)
    absmax = channel_absmax(flat)
    best, best_error = absmax.copy(), np.full(absmax.shape, np.inf)
    for ratio in ratios:  # a few candidates, each vectorised over every weight
        scale = np.where(absmax > 0, ratio * absmax / scheme.qmax, 1.0)
        error = ((fake_quant(flat, scale, scheme.qmin, scheme.qmax) - flat) ** 2).sum(axis=1)
        better = error < best_error
        best_error = np.where(better, error, best_error)
        best = np.where(better, ratio * absmax, best)
    return best


def activation_qparams(lo: float, hi: float, scheme: QuantScheme) -> tuple[float, int]:
    """Per-tensor affine (scale, zero_point) for a tensor observed in [lo, hi]."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if scheme.symmetric and scheme.signed:
        bound = max(-lo, hi)
        return (bound / scheme.qmax if bound > 0 else TINY_SCALE), 0
    if hi - lo <= 0:
        return TINY_SCALE, (0 if not scheme.signed else 0)
    scale = (hi - lo) / (scheme.qmax - scheme.qmin)
    zero_point = int(np.clip(np.round(scheme.qmin - lo / scale), scheme.qmin, scheme.qmax))
    return float(scale), zero_point


# --- activation and bias decisions (made before any Q/DQ node exists; the emitter only writes them) ---------
SIGNED_TO_UNSIGNED = 128  # int8 level q is uint8 level q + 128
INT32 = np.iinfo(np.int32)
BIAS_HEADROOM = 2.0**30  # a regridded weight scale keeps |b_int| at half the int32 range


@dataclass(frozen=True)
class ActQParams:
    """One activation tensor's grid and how it is stored.

    ``zero_point`` is the grid's own (signed grid: around 0; unsigned: 0..); ``stored_zero_point`` and
    ``dtype`` are what the QuantizeLinear node holds. ``levels`` bounds a grid narrower than its 8-bit
    container to its own stored levels (an integer Clip between QuantizeLinear and DequantizeLinear).
    """

    scale: float
    zero_point: int
    bits: int
    signed: bool
    dtype: str  # "uint8" or "int8"
    stored_zero_point: int
    levels: tuple[int, int] | None

    def own_levels(self) -> tuple[int, int]:
        """The grid's own integer range (around ``zero_point``, before the storage shift)."""
        shift = self.stored_zero_point - self.zero_point
        if self.levels is not None:
            return self.levels[0] - shift, self.levels[1] - shift
        return (-(2 ** (self.bits - 1)), 2 ** (self.bits - 1) - 1) if self.signed else (0, 2 ** self.bits - 1)


def activation_grid(lo: float, hi: float, bits: int, target: str = "ort") -> ActQParams:
    """The grid of a tensor observed in [lo, hi].

    ``ort``: a non-negative tensor gets an unsigned grid with zero point 0 (onnxruntime drops the ReLU
    and fuses QLinearConv), a signed one an affine grid; both are stored as uint8, a signed grid with
    its zero point moved up by 128, because onnxruntime's CPU kernels fuse Conv -> QLinearConv only
    when input and output types agree (u8 in, s8 out stayed a float Conv on 54 of EfficientNet-B0's
    81 convs). ``trt``: TensorRT's explicit quantization takes symmetric int8 only (zero point 0).
    """
    if target == "trt":
        scheme = QuantScheme(bits, signed=True, symmetric=True, per_channel=False)
        scale, zero_point = activation_qparams(lo, hi, scheme)
        dtype, stored = "int8", zero_point
    else:
        scheme = QuantScheme(bits, signed=lo < 0, symmetric=False, per_channel=False)
        scale, zero_point = activation_qparams(lo, hi, scheme)
        dtype, stored = "uint8", zero_point + SIGNED_TO_UNSIGNED if scheme.signed else zero_point
    levels = None
    if bits < 8:  # the grid's own levels in storage: a signed grid stored as uint8 sits 128 up
        shift = stored - zero_point
        levels = (scheme.qmin + shift, scheme.qmax + shift)
    return ActQParams(float(scale), int(zero_point), bits, scheme.signed, dtype, int(stored), levels)


def bias_safe_weight_scale(scale: np.ndarray, bias: np.ndarray, s_x: float) -> tuple[np.ndarray, np.ndarray]:
    """A weight scale whose int32 bias b / (s_x * s_w) cannot saturate, and the channels it grew.

    A channel whose weights are tiny next to its bias (gamma ~ 0 after BN folding, or cut to zero by
    CLE) has a tiny s_w, and that quotient leaves int32: the bias would be clipped. Its weights matter
    far less than its bias there (|w x| / |b| < 2^14 * fan_in / 2^31), so it gets the smallest scale
    that holds its bias with 2x headroom (bias correction may still move the bias). A per-tensor
    scale is shared, so it grows for the neediest channel (as onnxruntime's own quantizer does).
    """
    scale = np.asarray(scale, np.float64)
    need = np.abs(np.asarray(bias, np.float64)) / (s_x * BIAS_HEADROOM)
    if scale.size == 1:
        worst = float(need.max()) if need.size else 0.0
        grow = np.full(need.shape, worst > scale.item())
        return (np.array([worst]) if worst > scale.item() else scale), grow
    grow = need > scale
    return np.where(grow, need, scale), grow


def int32_bias(bias: np.ndarray, s_x: float, weight_scale: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """The int32 bias on scale s_x * s_w (per channel), and how many values had to be clipped."""
    bias = np.asarray(bias, np.float64)
    bias_scale = s_x * np.broadcast_to(np.asarray(weight_scale, np.float64), bias.shape)
    wanted = np.rint(bias / bias_scale)
    saturated = int(np.count_nonzero((wanted < INT32.min) | (wanted > INT32.max)))
    return np.clip(wanted, INT32.min, INT32.max).astype(np.int32), bias_scale, saturated
