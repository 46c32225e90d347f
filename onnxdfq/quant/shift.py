"""The mean output shift that rounding a layer's weights causes, and the bias that cancels it.

The numpy core of analytic bias correction (onnxdfq.passes.bias_correction, Nagel et al. 2019),
also used by DF-MPC's mean re-estimation: with eps = W_q - W and E[x] per input channel, a conv's
output moves on average by sum_i (sum_taps eps[o, i, taps]) E[x_i].
"""

from __future__ import annotations

import numpy as np

__all__ = ["output_shift", "correct_bias"]


def output_shift(w_fp: np.ndarray, w_q: np.ndarray, in_mean: np.ndarray, group: int = 1) -> np.ndarray:
    """E[(W_q - W) x] per output channel for canonical weights [O, I/g, *k] and E[x] per input channel [I]."""
    eps = np.asarray(w_q, np.float64) - np.asarray(w_fp, np.float64)
    out_ch, in_per_group = eps.shape[0], eps.shape[1]
    in_mean = np.asarray(in_mean, np.float64).reshape(-1)
    if in_mean.size != in_per_group * group:
        raise ValueError(f"{in_mean.size} input means for a layer reading {in_per_group * group} channels")
    tap_sum = eps.reshape(group, out_ch // group, in_per_group, -1).sum(axis=3)
    return np.einsum("goi,gi->go", tap_sum, in_mean.reshape(group, in_per_group)).reshape(-1)


def correct_bias(w_fp: np.ndarray, w_q: np.ndarray, bias: np.ndarray | None, in_mean: np.ndarray,
                 group: int = 1) -> np.ndarray:
    """b - E[(W_q - W) x] in float64 (bias None counts as zeros); inputs are never modified.

    Parameters
    ----------
    w_fp, w_q : float and quantized (dequantized) canonical weights, [O, I/g, *k] or [O, I].
    bias : [O] or None.
    in_mean : E[x] per input channel, [I].
    group : the layer's group count (depthwise: I).
    """
    shift = output_shift(w_fp, w_q, in_mean, group)
    base = np.zeros(shift.shape) if bias is None else np.asarray(bias, np.float64).reshape(-1)
    return base - shift
