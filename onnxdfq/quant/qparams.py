"""The one place where scales and zero points are computed.

Symmetric weights:   scale = max|w| / qmax            (per output channel or per tensor), zp = 0
Affine activations:  scale = (hi - lo) / (qmax - qmin),  zp = round(qmin - lo / scale)
The range is first widened to contain 0 so that zero (padding, ReLU) is exactly representable.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np

from onnxdfq.quant.scheme import QuantScheme

__all__ = ["TINY_SCALE", "weight_scale", "activation_qparams", "channel_absmax"]

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
