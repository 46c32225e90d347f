"""Activation range estimators for calibration: min-max, percentile and MSE-optimal clipping.

Statistics only (numpy, no model I/O). Calibration streams batches of one tensor's values into a
:class:`TensorObserver` in two passes over the data: the first records the running min and max,
the second a histogram of ``BINS`` equal bins over ``[min, max]`` (exact zeros counted apart,
since ReLU outputs put half their mass there and zero is always exactly representable). An
estimator turns the observer into a per-tensor range ``(lo, hi)``:

- ``minmax``: ``(min, max)``.
- ``percentile``: the ``p``-th percentile of the positive values and the ``(100 - p)``-th of the
  negative ones, each side taken on its own (``p = 99.99`` by default); zeros count in both.
- ``mse``: the range ``(c * min, c * max)``, c in (0, 1], that minimises the expected squared
  error of ``bits``-bit affine quantization over the histogram:

      E(c) = sum_{bins inside} n_b * s(c)^2 / 12  +  sum_{bins outside} n_b * (x_b - clip_c(x_b))^2

  with ``s(c) = c * (max - min') / (2^bits - 1)`` (``min' = min(min, 0)``): rounding noise of a
  uniform quantizer inside the range, squared clipping error outside it (x_b = bin centre).
  All ``CANDIDATES`` values of c are evaluated at once (candidates x bins).
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

__all__ = ["BINS", "CANDIDATES", "ESTIMATORS", "TensorObserver", "RangeEstimator", "MinMaxEstimator",
           "PercentileEstimator", "MSEEstimator", "get_estimator", "quantization_mse"]

logger = logging.getLogger(__name__)

BINS = 2048  # histogram bins over [min, max]; the MSE search resolves ranges to about 1/BINS
CANDIDATES = 200  # clipping factors c tried by the MSE estimator, linear in (0, 1]
# a batch's values beyond this many go into the histogram at an even stride (an odd one, so it does not
# lock onto rows or channels): 1M samples a batch (about 500 a bin) pin every bin's share far below what
# moves an estimator, and ImageNet-sized tensors (10M values a batch) no longer dominate calibration
# time (folded MobileNet-V1: 20 s of 48 s before); min/max stay exact. CIFAR-sized batches are below it.
HISTOGRAM_SAMPLE_CAP = 1 << 20


class TensorObserver:
    """Running min/max (pass 1) and a histogram over that range (pass 2) of one tensor.

    Pass 1 also accumulates per-channel moments (axis 1 of [N, C, ...]) in float64: the mean and
    std a BatchNormalization would have recorded on the same values.
    """

    def __init__(self, bins: int = BINS) -> None:
        self.bins = bins
        self.lo = np.inf
        self.hi = -np.inf
        self.count = 0
        self.zeros = 0
        self.counts: np.ndarray | None = None
        self.channel_sum: np.ndarray | None = None
        self.channel_sumsq: np.ndarray | None = None
        self.channel_count = 0
        self.sample_mean: np.ndarray | None = None  # per-sample channel moments [N, C] (from_moments only)
        self.sample_meansq: np.ndarray | None = None

    @classmethod
    def from_moments(cls, sample_mean: np.ndarray, sample_meansq: np.ndarray) -> TensorObserver:
        """An observer of per-channel moments only, from per-sample, per-channel means of x and x^2 ([N, C], every
        sample with the same number of positions): what an in-graph reduction returns. It holds no range
        (lo = inf, hi = -inf): ranges come from the statistics, or from a histogram run."""
        observer = cls()
        observer.count = int(sample_mean.size)
        observer.channel_sum = sample_mean.sum(axis=0)
        observer.channel_sumsq = sample_meansq.sum(axis=0)
        observer.channel_count = len(sample_mean)
        observer.sample_mean, observer.sample_meansq = sample_mean, sample_meansq
        return observer

    @property
    def channel_mean(self) -> np.ndarray | None:
        if self.channel_sum is None or not self.channel_count:
            return None
        return self.channel_sum / self.channel_count

    @property
    def channel_std(self) -> np.ndarray | None:
        mean = self.channel_mean
        if mean is None:
            return None
        return np.sqrt(np.maximum(self.channel_sumsq / self.channel_count - mean * mean, 0.0))

    @property
    def has_histogram(self) -> bool:
        return self.counts is not None

    def observe_range(self, values: np.ndarray, *, channels: bool = False) -> None:
        """Pass 1: widen the running range to cover ``values`` (any shape); with ``channels`` also
        accumulate per-channel moments (axis 1)."""
        if values.size:
            self.lo = min(self.lo, float(values.min()))
            self.hi = max(self.hi, float(values.max()))
            self.count += values.size
            if channels and values.ndim >= 2:
                self._observe_channels(values)

    def _observe_channels(self, values: np.ndarray) -> None:
        count = values.shape[1]
        axes = (0,) + tuple(range(2, values.ndim))
        if self.channel_sum is None or self.channel_sum.size != count:
            self.channel_sum, self.channel_sumsq, self.channel_count = np.zeros(count), np.zeros(count), 0
        # float64 accumulators; squares in the values' precision (exact to 1e-7 each)
        self.channel_sum += values.sum(axis=axes, dtype=np.float64)
        self.channel_sumsq += np.square(values).sum(axis=axes, dtype=np.float64)
        self.channel_count += values.size // count

    def observe_histogram(self, values: np.ndarray) -> None:
        """Pass 2: add ``values`` to the histogram over the range of pass 1 (nonzero values only)."""
        if not np.isfinite(self.lo):
            raise ValueError("observe_histogram needs observe_range on the same data first")
        if self.counts is None:
            self.counts = np.zeros(self.bins, np.int64)
        flat = values.reshape(-1)
        if flat.size > HISTOGRAM_SAMPLE_CAP:
            flat = flat[::(flat.size // HISTOGRAM_SAMPLE_CAP) | 1]
        nonzero = flat[flat != 0]
        self.zeros += flat.size - nonzero.size
        if nonzero.size and self.hi > self.lo:
            index = ((nonzero.astype(np.float64) - self.lo) * (self.bins / (self.hi - self.lo))).astype(np.int64)
            np.clip(index, 0, self.bins - 1, out=index)
            self.counts += np.bincount(index, minlength=self.bins)

    def centres(self) -> np.ndarray:
        edges = np.linspace(self.lo, self.hi, self.bins + 1)
        return 0.5 * (edges[:-1] + edges[1:])


@dataclass(frozen=True)
class RangeEstimator(ABC):
    """Turns a :class:`TensorObserver` into a per-tensor range ``(lo, hi)`` (which contains 0)."""

    name = "estimator"
    needs_histogram = True

    @abstractmethod
    def estimate(self, observer: TensorObserver, bits: int) -> tuple[float, float]:
        """The range for a ``bits``-bit activation grid."""


@dataclass(frozen=True)
class MinMaxEstimator(RangeEstimator):
    name = "minmax"
    needs_histogram = False

    def estimate(self, observer: TensorObserver, bits: int) -> tuple[float, float]:
        return min(observer.lo, 0.0), max(observer.hi, 0.0)


@dataclass(frozen=True)
class PercentileEstimator(RangeEstimator):
    """Per side: ``hi`` = the ``percentile`` of the values >= 0, ``lo`` = that of -values <= 0."""

    percentile: float = 99.99
    name = "percentile"

    def __post_init__(self) -> None:
        if not 50.0 < self.percentile <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], got {self.percentile}")

    def estimate(self, observer: TensorObserver, bits: int) -> tuple[float, float]:
        centres, counts = observer.centres(), observer.counts
        fraction = self.percentile / 100.0
        hi = _side_quantile(centres[centres > 0], counts[centres > 0], observer.zeros, fraction, observer.hi)
        lo = -_side_quantile(-centres[centres < 0][::-1], counts[centres < 0][::-1], observer.zeros, fraction,
                             -observer.lo)
        return min(lo, 0.0), max(hi, 0.0)


def _side_quantile(magnitudes: np.ndarray, counts: np.ndarray, zeros: int, fraction: float, edge: float) -> float:
    """The ``fraction`` quantile of {0 (x zeros), magnitudes (x counts)}; ``edge`` caps it (bin centres)."""
    total = zeros + int(counts.sum())
    if total == 0 or counts.sum() == 0:
        return 0.0
    cumulative = zeros + np.cumsum(counts)
    index = int(np.searchsorted(cumulative, fraction * total, side="left"))
    if index >= magnitudes.size or fraction >= 1.0:
        return float(edge)
    return float(min(magnitudes[index], edge))


def quantization_mse(centres: np.ndarray, counts: np.ndarray, lo: np.ndarray, hi: np.ndarray,
                     bits: int) -> np.ndarray:
    """Expected squared error of a ``bits``-bit affine grid on [lo_k, hi_k] for each candidate k.

    ``centres``/``counts``: histogram [B]; ``lo``/``hi``: candidate ranges [K] (lo <= 0 <= hi).
    Rounding noise s^2/12 for the values inside, squared clipping error for those outside.
    """
    step = (hi - lo) / (2**bits - 1)  # [K]
    x = centres[None, :]
    clipped = np.clip(x, lo[:, None], hi[:, None])
    inside = (x >= lo[:, None]) & (x <= hi[:, None])
    error = np.where(inside, (step**2 / 12.0)[:, None], (x - clipped) ** 2)
    return error @ counts.astype(np.float64)


@dataclass(frozen=True)
class MSEEstimator(RangeEstimator):
    """The range (c * min, c * max) minimising :func:`quantization_mse` over c in (0, 1]."""

    candidates: int = CANDIDATES
    name = "mse"

    def estimate(self, observer: TensorObserver, bits: int) -> tuple[float, float]:
        lo, hi = min(observer.lo, 0.0), max(observer.hi, 0.0)
        if hi - lo <= 0 or observer.counts is None or observer.counts.sum() == 0:
            return lo, hi
        factors = np.arange(1, self.candidates + 1) / self.candidates
        errors = quantization_mse(observer.centres(), observer.counts, factors * lo, factors * hi, bits)
        best = float(factors[int(np.argmin(errors))])
        return best * lo, best * hi


ESTIMATORS = {"minmax": MinMaxEstimator, "percentile": PercentileEstimator, "mse": MSEEstimator}


def get_estimator(name: str, *, percentile: float | None = None) -> RangeEstimator:
    """The estimator called ``name`` (``minmax``, ``percentile`` or ``mse``)."""
    if name not in ESTIMATORS:
        raise ValueError(f"unknown range estimator {name!r}; choose one of {', '.join(ESTIMATORS)}")
    if name == "percentile" and percentile is not None:
        return PercentileEstimator(percentile)
    return ESTIMATORS[name]()
