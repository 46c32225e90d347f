"""Moments of clipped normals, the data-free stand-in for activation statistics.

A channel is modelled as clip(X, lo, hi) with X ~ N(m, s^2): ReLU is lo = 0, ReLU6 is [0, 6].
With a = (lo - m) / s and b = (hi - m) / s:
    E[clip]   = lo Phi(a) + hi (1 - Phi(b)) + m (Phi(b) - Phi(a)) + s (phi(a) - phi(b))
    E[clip^2] = lo^2 Phi(a) + hi^2 (1 - Phi(b)) + m^2 P + 2 m s (phi(a) - phi(b))
                + s^2 (P + a phi(a) - b phi(b)),   P = Phi(b) - Phi(a)
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["normal_pdf", "normal_cdf", "clipped_normal_moments", "relu_mean", "clipped_normal_mean",
           "clipped_mean_scale_slope"]

_erf = np.vectorize(math.erf, otypes=[np.float64])


def normal_pdf(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, np.float64)
    with np.errstate(over="ignore"):
        return np.where(np.isfinite(z), np.exp(-0.5 * np.square(np.where(np.isfinite(z), z, 0.0)))
                        / math.sqrt(2 * math.pi), 0.0)


def normal_cdf(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, np.float64)
    return 0.5 * (1.0 + _erf(z / math.sqrt(2.0)))


def _times(bound: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """bound * weight with inf * 0 = 0 (an infinite bound is never reached)."""
    return np.where(weight == 0, 0.0, bound * np.where(weight == 0, 1.0, weight))


def clipped_normal_moments(m: np.ndarray, s: np.ndarray, lo: np.ndarray, hi: np.ndarray
                           ) -> tuple[np.ndarray, np.ndarray]:
    """Mean and variance of clip(N(m, s^2), lo, hi), elementwise, float64. s = 0 is a point mass."""
    with np.errstate(invalid="ignore", over="ignore"):
        return _clipped_normal_moments(*np.broadcast_arrays(*(np.asarray(v, np.float64)
                                                              for v in (m, s, lo, hi))))


def _standard_bounds(m: np.ndarray, s: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """a = (lo - m) / s and b = (hi - m) / s, infinite where the bound is (s = 0 is read as 1: callers mask it)."""
    safe_s = np.where(s > 0, s, 1.0)
    a = np.where(np.isfinite(lo), (lo - m) / safe_s, -np.inf)
    b = np.where(np.isfinite(hi), (hi - m) / safe_s, np.inf)
    return a, b


def _clipped_normal_moments(m: np.ndarray, s: np.ndarray, lo: np.ndarray, hi: np.ndarray
                            ) -> tuple[np.ndarray, np.ndarray]:
    a, b = _standard_bounds(m, s, lo, hi)
    cdf_a, cdf_b = normal_cdf(a), normal_cdf(b)
    pdf_a, pdf_b = normal_pdf(a), normal_pdf(b)
    inside = cdf_b - cdf_a
    a_pdf = np.where(np.isfinite(a), a * pdf_a, 0.0)
    b_pdf = np.where(np.isfinite(b), b * pdf_b, 0.0)
    mean = _times(lo, cdf_a) + _times(hi, 1.0 - cdf_b) + m * inside + s * (pdf_a - pdf_b)
    second = (_times(lo * np.where(np.isfinite(lo), lo, 1.0), cdf_a)
              + _times(hi * np.where(np.isfinite(hi), hi, 1.0), 1.0 - cdf_b)
              + m * m * inside + 2 * m * s * (pdf_a - pdf_b) + s * s * (inside + a_pdf - b_pdf))
    point = np.clip(m, lo, hi)
    mean = np.where(s > 0, mean, point)
    var = np.where(s > 0, np.maximum(second - mean * mean, 0.0), 0.0)
    return mean, var


def clipped_normal_mean(m: np.ndarray, s: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    return clipped_normal_moments(m, s, lo, hi)[0]


def relu_mean(m: np.ndarray, s: np.ndarray) -> np.ndarray:
    """E[max(X, 0)] for X ~ N(m, s^2): s phi(m/s) + m Phi(m/s)."""
    return clipped_normal_mean(m, s, 0.0, np.inf)


def clipped_mean_scale_slope(m: np.ndarray, s: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """d E[clip(m + k s Z, lo, hi)] / dk at k = 1: how a clipped channel's mean moves when its spread is off by a
    factor, s (phi(a) - phi(b)). 0 where s = 0 or both bounds are infinite (the mean of a Gaussian does not move)."""
    m, s, lo, hi = np.broadcast_arrays(*(np.asarray(v, np.float64) for v in (m, s, lo, hi)))
    with np.errstate(invalid="ignore", over="ignore"):
        a, b = _standard_bounds(m, s, lo, hi)
    return np.where(s > 0, s * (normal_pdf(a) - normal_pdf(b)), 0.0)
