"""Quantize / dequantize / fake-quantize on numpy arrays (round half to even, like ONNX QuantizeLinear)."""

from __future__ import annotations

import numpy as np

__all__ = ["broadcast_scale", "quantize", "dequantize", "fake_quant", "sqnr_db"]


def broadcast_scale(scale: np.ndarray, ndim: int, axis: int = 0) -> np.ndarray:
    """Reshape a per-channel vector so it broadcasts along `axis` of an ndim-array."""
    scale = np.asarray(scale)
    if scale.size == 1:
        return scale.reshape(())
    shape = [1] * ndim
    shape[axis] = scale.size
    return scale.reshape(shape)


def quantize(x: np.ndarray, scale: np.ndarray, qmin: int, qmax: int, zero_point: int | np.ndarray = 0,
             axis: int = 0) -> np.ndarray:
    """Round-to-nearest onto the integer grid [qmin, qmax]; returns int64."""
    s = broadcast_scale(scale, x.ndim, axis)
    z = broadcast_scale(np.asarray(zero_point), x.ndim, axis)
    return np.clip(np.rint(x / s) + z, qmin, qmax).astype(np.int64)


def dequantize(q: np.ndarray, scale: np.ndarray, zero_point: int | np.ndarray = 0, axis: int = 0) -> np.ndarray:
    s = broadcast_scale(scale, q.ndim, axis)
    z = broadcast_scale(np.asarray(zero_point), q.ndim, axis)
    return (q - z) * s


def fake_quant(x: np.ndarray, scale: np.ndarray, qmin: int, qmax: int, zero_point: int | np.ndarray = 0,
               axis: int = 0) -> np.ndarray:
    return dequantize(quantize(x, scale, qmin, qmax, zero_point, axis), scale, zero_point, axis)


def sqnr_db(reference: np.ndarray, approx: np.ndarray) -> float:
    """10 log10(|ref|^2 / |ref - approx|^2); +inf when identical."""
    ref = np.asarray(reference, np.float64)
    noise = float(np.sum((ref - np.asarray(approx, np.float64)) ** 2))
    signal = float(np.sum(ref**2))
    if noise == 0:
        return float("inf")
    if signal == 0:
        return float("-inf")
    return 10.0 * np.log10(signal / noise)
