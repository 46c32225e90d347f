"""DF-MPC closed-form numpy core (no ONNX): low-bit quantization, BN re-estimation, the high-layer
gain and the paper's compensation coefficients (Chen et al., Pattern Recognition 2023, arXiv 2307.00498).

Pure functions over numpy arrays; the graph side (pairing, reading and writing layers) is
`onnxdfq.passes.dfmpc`. The low layer l of a pair (l, l+1) is quantized at the low width (2 bits =
ternary {-1, 0, 1} * alpha_j per output channel: `ternarize_lsq`, the exact least-squares one, or
`quantize_correlated`, the one whose output is most correlated with the float layer's under the
tap model of `tap_variance`, then refined by coordinate ascent; measured +1.8 points on ResNet-56 2/6).

Everything works on BN-folded weights: channel j of l has pre-activation N(beta_j, gamma_j^2) with
its float weights W (the statistics kept by FoldBatchNormPass). With quantized weights Wq they
move; they are re-estimated from the per-channel mean m_c and variance v_c of the layer's input,
propagated from the BN statistics (`act_ranges.propagate_statistics`: ReLU moments, residual sums):
    mu_hat_j    = beta_j + sum_c (sum_k (Wq - W)[j, c, k]) m_c
    sigma_hat_j = see `reestimate_bn` ("tap", "regression" or their geometric mean "blend", default)
and l is re-normalised, Wq' = g Wq, b' = g (b - mu_hat) + beta, g = gamma / sigma_hat, so that its
quantized channels have mean beta_j and std gamma_j again; g folds into alpha_j (free, per channel).
The next layer l+1 then gets a per-output-channel gain (`high_layer_gain`) for the correlation
between channels that the quantization noise of l removes, folded into l+1's float weights before
they are quantized at the high width.

The paper's closed form is `dfmpc_coefficients`: with X = W_j, y = b_j (the float layer) and
Xh = Wq'_j, yh = b'_j,
    c_j = argmin_{c >= 0} ||c Xh - X||^2 + l1 (c yh - y)^2 + l2 c^2,   l1 = 0.5, l2 = 0,
folded as Wq'' = c Wq', b'' = c b' (an exact rewrite of an explicit Mul by c after the layer).
Measured on ResNet-56 2/6 it lowers accuracy (it pulls the scale back towards the least-squares
one, c = 1 exactly when nothing was re-estimated), so `compensate` defaults to False; the
re-estimation is what recovers accuracy (tools/results/dfmpc_ablation.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from onnxdfq.passes.base import ChannelStats
from onnxdfq.quant.gaussian import clipped_normal_moments, normal_cdf, normal_pdf
from onnxdfq.quant.qparams import TINY_SCALE, channel_absmax
from onnxdfq.quant.scheme import QuantScheme
from onnxdfq.quant.shift import output_shift

__all__ = ["DEFAULT_LAMBDA1", "DEFAULT_LAMBDA2", "DEFAULT_RHO", "RHO_GRID", "SCALE_GRID", "LOW_QUANTIZERS",
           "TWN_THRESHOLD", "REESTIMATE", "SIGMA_MODELS", "LowBitWeights", "Compensation", "ternarize_lsq",
           "quantize_low", "tap_variance", "fit_rho", "channel_correlation", "high_layer_gain", "reestimate_bn",
           "dfmpc_coefficients", "compensate_mixed_precision", "ternarize_corr", "refine_levels", "rescale_levels",
           "quantize_correlated", "HERMITE_TERMS", "LSQ_RIDGE",
           "HIGH_CORRECTIONS",
           "output_covariance", "hermite_coefficients", "activated_covariance", "correct_next_layer",
           "correlated_sum_moments"]

DEFAULT_LAMBDA1 = 0.5  # weight of the bias term in the closed form (the paper's lambda1)
DEFAULT_LAMBDA2 = 0.0  # ridge term on c (the paper's lambda2)
DEFAULT_RHO = 0.2  # correlation between the kernel taps of one input channel in V(u)
RHO_GRID = np.linspace(0.0, 0.9, 46)  # candidates for rho="fit"
SCALE_GRID = np.linspace(0.2, 1.0, 81)  # clip ratios (of max|w|) searched for 3..8-bit low layers
LOW_BLOCK_ELEMENTS = 1 << 22  # candidates x weights per block of the grid search (32 MB of float64)
LOW_QUANTIZERS = ("lsq", "absmax", "twn", "corr")  # least-squares grid, max|w| grid, TWN ternary (0.7 mean|w|),
# the grid most correlated with the float output under the tap model (`quantize_correlated`)
TWN_THRESHOLD = 0.7  # Li et al. 2016: threshold 0.7 mean|w|
REESTIMATE = ("none", "mean", "mean+std")  # which BN statistics of the low layer are re-estimated


@dataclass(frozen=True)
class LowBitWeights:
    """Integer weights [O, ...] on a symmetric grid and their per-channel scale [O]."""

    w_int: np.ndarray
    scale: np.ndarray

    def dequantized(self) -> np.ndarray:
        return self.w_int * self.scale.reshape((-1,) + (1,) * (self.w_int.ndim - 1))


def ternarize_lsq(w_fp: np.ndarray) -> LowBitWeights:
    """Exact least-squares ternary {-1, 0, 1} * alpha_j per output channel (canonical [O, ...]).

    For a support of the k largest |w|, the best alpha is their mean and the squared error is
    |w|^2 - (sum of the top-k |w|)^2 / k, so k maximises (sum of top-k |w|)^2 / k.
    """
    w = np.asarray(w_fp, np.float64)
    flat = np.abs(w.reshape(w.shape[0], -1))
    order = np.argsort(-flat, axis=1, kind="stable")
    csum = np.cumsum(np.take_along_axis(flat, order, axis=1), axis=1)
    count = np.arange(1, flat.shape[1] + 1)
    best = np.argmax(csum**2 / count, axis=1)  # k - 1
    alpha = csum[np.arange(flat.shape[0]), best] / (best + 1)
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.broadcast_to(np.arange(flat.shape[1]), flat.shape), axis=1)
    keep = (rank <= best[:, None]) & (flat > 0)
    w_int = (np.sign(w.reshape(flat.shape)) * keep).astype(np.int64).reshape(w.shape)
    dead = alpha <= 0
    return LowBitWeights(w_int, np.where(dead, TINY_SCALE, alpha))


def ternarize_corr(w_fp: np.ndarray, in_var: np.ndarray, rho: float) -> LowBitWeights:
    """Ternary {-1, 0, 1} * alpha_j whose output is most correlated with the float layer's, per channel j.

    Canonical group-1 weights [O, C, *k]; inputs as in `tap_variance` (variance v_c, tap correlation
    rho). For a support T of the k largest |w_j| with signs t, the squared correlation of W_j x and
    t x is <W, t>^2 / (<W, W> <t, t>) with <u, u'> = sum_c v_c (rho S_c(u) S_c(u') + (1 - rho) sum_k u u'),
    S_c the sum over taps; k maximises it (per channel: the thresholds differ). Both inner products
    grow by one term per added element, so every k is scored with cumulative sums. alpha is the
    v-weighted least-squares scale on that support. rho = 0 and equal v give `ternarize_lsq`.
    """
    w = np.asarray(w_fp, np.float64)
    out_ch, in_ch = w.shape[0], w.shape[1]
    flat = w.reshape(out_ch, -1)
    channel = np.repeat(np.arange(in_ch), flat.shape[1] // in_ch)  # input channel of each element
    var = np.asarray(in_var, np.float64).reshape(-1)[channel]
    order = np.argsort(-np.abs(flat), axis=1, kind="stable")
    w_sorted = np.take_along_axis(flat, order, axis=1)
    sign, ch_sorted = np.sign(w_sorted), channel[order]
    v_sorted = var[order]
    tap_sum = w.reshape(out_ch, in_ch, -1).sum(axis=2)  # S_c(W) [O, C]
    s_w = np.take_along_axis(tap_sum, ch_sorted, axis=1)
    cross = np.cumsum(v_sorted * (rho * s_w * sign + (1.0 - rho) * np.abs(w_sorted)), axis=1)
    running = _running_channel_sum(sign, ch_sorted)
    auto = np.cumsum(v_sorted * (rho * (2.0 * running * sign + sign * sign) + (1.0 - rho) * sign * sign), axis=1)
    score = np.where(auto > 0, np.maximum(cross, 0.0) ** 2 / np.where(auto > 0, auto, 1.0), -1.0)
    best = np.argmax(score, axis=1)
    keep_sorted = (np.arange(flat.shape[1])[None, :] <= best[:, None]) & (w_sorted != 0)
    keep = np.zeros_like(keep_sorted)
    np.put_along_axis(keep, order, keep_sorted, axis=1)
    w_int = (np.sign(flat) * keep).astype(np.int64)
    weighted = keep * var[None, :]
    den = weighted.sum(axis=1)
    alpha = np.where(den > 0, (weighted * np.abs(flat)).sum(axis=1) / np.where(den > 0, den, 1.0), 0.0)
    return LowBitWeights(w_int.reshape(w.shape), np.where(alpha > 0, alpha, TINY_SCALE))


def _running_channel_sum(values: np.ndarray, channel: np.ndarray) -> np.ndarray:
    """Per row, the sum of ``values`` at the earlier positions of the same channel ([O, n] both, exclusive).

    A cumulative sum within each channel's positions, taken in channel order (a stable sort keeps the
    positions in order) and put back: [O, n] arrays only. The one-hot form ([O, n, C]) took 9.7 GB for
    a 512 x 512 x 3 x 3 layer (a CIFAR VGG-16; DF-MPC 2/6 peaked at 19 GB)."""
    order = np.argsort(channel, axis=1, kind="stable")
    grouped = np.take_along_axis(channel, order, axis=1)
    inclusive = np.cumsum(np.take_along_axis(values, order, axis=1), axis=1)
    positions = np.arange(channel.shape[1])[None, :]
    first = np.ones(grouped.shape, bool)
    first[:, 1:] = grouped[:, 1:] != grouped[:, :-1]
    start = np.maximum.accumulate(np.where(first, positions, 0), axis=1)  # where each position's channel starts
    before = np.where(start > 0, np.take_along_axis(inclusive, np.maximum(start - 1, 0), axis=1), 0)
    exclusive = inclusive - np.take_along_axis(values, order, axis=1) - before
    result = np.empty_like(exclusive)
    np.put_along_axis(result, order, exclusive, axis=1)
    return result


def refine_levels(w_fp: np.ndarray, w_int: np.ndarray, in_var: np.ndarray, rho: float, qmax: int,
                  steps: int) -> np.ndarray:
    """Coordinate ascent on the tap-model correlation <W, t>^2 / <t, t> of integer weights t (`ternarize_corr`).

    Each step moves, in every output channel at once, the one element by +-1 (within [-qmax, qmax])
    that raises the channel's score most, if any does; at most `steps` steps. The score is
    scale-free, so any grid (top-|w| ternary, the least-squares grid) is a starting point; the
    search leaves top-|w| supports. Group-1 canonical [O, C, *k] weights; returns the new w_int.
    """
    w = np.asarray(w_fp, np.float64)
    out_ch, in_ch = w.shape[0], w.shape[1]
    flat = w.reshape(out_ch, -1)
    taps = flat.shape[1] // in_ch
    t = np.asarray(w_int, np.float64).reshape(out_ch, -1).copy()
    var = np.repeat(np.asarray(in_var, np.float64).reshape(-1), taps)[None, :]
    lin = var * (rho * np.repeat(w.reshape(out_ch, in_ch, taps).sum(axis=2), taps, axis=1) + (1 - rho) * flat)
    rows = np.arange(out_ch)
    for _ in range(steps):
        s_t = np.repeat(t.reshape(out_ch, in_ch, taps).sum(axis=2), taps, axis=1)
        cross = np.sum(lin * t, axis=1, keepdims=True)
        auto = np.sum(var * (rho * s_t * t + (1 - rho) * t * t), axis=1, keepdims=True)
        base = _score(cross, auto)
        best_gain, best_idx, best_step = np.zeros(out_ch), np.zeros(out_ch, np.int64), np.zeros(out_ch)
        for delta in (-1.0, 1.0):  # over the two moves, not over weights
            new_cross = cross + lin * delta
            new_auto = auto + var * (rho * (2 * s_t * delta + 1.0) + (1 - rho) * (2 * t * delta + 1.0))
            gain = np.where(np.abs(t + delta) <= qmax, _score(new_cross, new_auto) - base, -np.inf)
            idx = np.argmax(gain, axis=1)
            better = gain[rows, idx] > best_gain
            best_gain = np.where(better, gain[rows, idx], best_gain)
            best_idx, best_step = np.where(better, idx, best_idx), np.where(better, delta, best_step)
        move = best_gain > 1e-12 * np.maximum(base[:, 0], 1e-30)
        if not move.any():
            break
        t[rows[move], best_idx[move]] += best_step[move]
    return t.astype(np.int64).reshape(w.shape)


def _score(cross: np.ndarray, auto: np.ndarray) -> np.ndarray:
    """max(<W, t>, 0)^2 / <t, t> (0 where <t, t> = 0)."""
    return np.where(auto > 0, np.maximum(cross, 0.0) ** 2 / np.where(auto > 0, auto, 1.0), 0.0)


def rescale_levels(w_fp: np.ndarray, w_int: np.ndarray, in_var: np.ndarray) -> LowBitWeights:
    """Integer weights with their input-variance-weighted least-squares scale per output channel (group 1)."""
    flat = np.asarray(w_fp, np.float64).reshape(w_fp.shape[0], -1)
    t = np.asarray(w_int, np.float64).reshape(flat.shape)
    var = np.repeat(np.asarray(in_var, np.float64).reshape(-1), flat.shape[1] // w_fp.shape[1])[None, :]
    den = np.sum(var * t * t, axis=1)
    alpha = np.where(den > 0, np.sum(var * t * flat, axis=1) / np.where(den > 0, den, 1.0), 0.0)
    return LowBitWeights(np.asarray(w_int, np.int64), np.where(alpha > 0, alpha, TINY_SCALE))


def quantize_correlated(w_fp: np.ndarray, bits: int, in_var: np.ndarray, rho: float, refine_steps: int = 0,
                        group: int = 1) -> LowBitWeights:
    """The "corr" quantizer: the grid whose output best correlates with the float layer's (tap model).

    2 bits: `ternarize_corr`; 3..8 bits: the least-squares grid. Then `refine_steps` steps of
    `refine_levels` and the v-weighted least-squares scale. Grouped layers: the least-squares grid.
    """
    if group != 1:
        return quantize_low(w_fp, bits, "lsq")
    start = ternarize_corr(w_fp, in_var, rho) if bits == 2 else quantize_low(w_fp, bits, "lsq")
    if refine_steps <= 0:
        return start
    qmax = QuantScheme(bits).qmax
    return rescale_levels(w_fp, refine_levels(w_fp, start.w_int, in_var, rho, qmax, refine_steps), in_var)


def _ternarize_twn(w_fp: np.ndarray) -> LowBitWeights:
    flat = np.asarray(w_fp, np.float64).reshape(w_fp.shape[0], -1)
    keep = np.abs(flat) > TWN_THRESHOLD * np.abs(flat).mean(axis=1, keepdims=True)
    count = keep.sum(axis=1)
    alpha = np.where(count > 0, (np.abs(flat) * keep).sum(axis=1) / np.maximum(count, 1), TINY_SCALE)
    return LowBitWeights((np.sign(flat) * keep).astype(np.int64).reshape(w_fp.shape), alpha)


def quantize_low(w_fp: np.ndarray, bits: int, method: str = "lsq") -> LowBitWeights:
    """Per-channel symmetric grid of `bits` (2 = ternary) for the low layer of a pair.

    "lsq": the least-squares grid (exact for ternary; for 3..8 bits the scale minimising the
    rounding MSE over clip ratios SCALE_GRID of max|w|); "absmax": scale max|w| / qmax;
    "twn": ternary with TWN's threshold (2 bits only).
    """
    scheme = QuantScheme(bits)
    if method not in LOW_QUANTIZERS:
        raise ValueError(f"unknown low-bit quantizer {method!r}; choose one of {', '.join(LOW_QUANTIZERS)}")
    if method == "corr":
        raise ValueError("the 'corr' quantizer needs input statistics: call quantize_correlated")
    if method == "twn":
        if bits != 2:
            raise ValueError("the TWN quantizer is ternary (2 bits) only")
        return _ternarize_twn(w_fp)
    if method == "lsq" and bits == 2:
        return ternarize_lsq(w_fp)
    w = np.asarray(w_fp, np.float64).reshape(w_fp.shape[0], -1)
    absmax = channel_absmax(w)
    ratios = SCALE_GRID if method == "lsq" else np.ones(1)
    scales = np.maximum(absmax[:, None] * ratios[None, :] / scheme.qmax, TINY_SCALE)  # [O, R]
    w_int = np.empty(w.shape, np.int64)
    chosen = np.empty(w.shape[0])
    # blocks of output channels: the candidates x weights array stays near LOW_BLOCK_ELEMENTS, whatever the layer
    step = max(1, LOW_BLOCK_ELEMENTS // max(len(ratios) * w.shape[1], 1))
    for start in range(0, w.shape[0], step):
        block, scale = w[start:start + step], scales[start:start + step]
        q = np.clip(np.rint(block[:, None, :] / scale[:, :, None]), scheme.qmin, scheme.qmax)
        pick = np.argmin(np.sum((q * scale[:, :, None] - block[:, None, :]) ** 2, axis=2), axis=1)
        rows = np.arange(len(block))
        w_int[start:start + step], chosen[start:start + step] = q[rows, pick], scale[rows, pick]
    return LowBitWeights(w_int.reshape(w_fp.shape), chosen)


def _grouped_inputs(weight: np.ndarray, group: int, per_input: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(weight as [O, I/g, taps] float64, per-input-channel values gathered to [O, I/g])."""
    out_ch, in_per_group = weight.shape[0], weight.shape[1]
    w = np.asarray(weight, np.float64).reshape(out_ch, in_per_group, -1)
    group_of_out = np.arange(out_ch) // (out_ch // group)
    index = group_of_out[:, None] * in_per_group + np.arange(in_per_group)[None, :]
    return w, np.asarray(per_input, np.float64).reshape(-1)[index]



def tap_variance(u: np.ndarray, in_var: np.ndarray, rho: float | np.ndarray, group: int = 1) -> np.ndarray:
    """V(u_j) = sum_c v_c (rho (sum_k u[j,c,k])^2 + (1 - rho) sum_k u[j,c,k]^2), per output channel j.

    The output variance of u for inputs independent across channels whose kernel taps have
    variance v_c and pairwise correlation rho.
    """
    w, var = _grouped_inputs(u, group, in_var)
    summed = w.sum(axis=2) ** 2
    squared = (w * w).sum(axis=2)
    return np.einsum("oc,oc->o", var, rho * summed + (1.0 - rho) * squared)


def fit_rho(w_fp: np.ndarray, in_var: np.ndarray, target_std: np.ndarray, group: int = 1,
            grid: np.ndarray = RHO_GRID) -> float:
    """The rho whose V(W_j) best matches gamma_j^2 in log space, up to a common factor.

    A data-free self-calibration: the float layer's output std gamma_j is known for every
    channel, so the tap correlation of the layer's input can be read off its own weights.
    """
    target = np.log(np.maximum(np.asarray(target_std, np.float64) ** 2, 1e-30))
    live = np.asarray(target_std) > 0
    best, best_err = float(grid[0]), np.inf
    for rho in grid:
        model = np.log(np.maximum(tap_variance(w_fp, in_var, rho, group), 1e-30))
        resid = (model - target)[live]
        err = float(np.var(resid)) if resid.size else 0.0
        if err < best_err:
            best, best_err = float(rho), err
    return best


def channel_correlation(w_fp: np.ndarray, w_q: np.ndarray, in_var: np.ndarray, rho: float,
                        group: int = 1) -> np.ndarray:
    """r_j = corr(W_j . x, Wq_j . x) per output channel under the tap model of `tap_variance`."""
    w, var = _grouped_inputs(w_fp, group, in_var)
    wq, _ = _grouped_inputs(w_q, group, in_var)
    cross = np.einsum("oc,oc->o", var, rho * w.sum(axis=2) * wq.sum(axis=2) + (1.0 - rho) * (w * wq).sum(axis=2))
    norm = np.sqrt(tap_variance(w_fp, in_var, rho, group) * tap_variance(w_q, in_var, rho, group))
    return np.where(norm > 0, cross / np.where(norm > 0, norm, 1.0), 1.0)


def high_layer_gain(corr: np.ndarray, stats: ChannelStats, act: tuple[float, float | np.ndarray], w_next: np.ndarray,
                    next_std: np.ndarray) -> np.ndarray:
    """Per-output-channel gain sigma'/sigma_hat' that restores the next (high) layer's output std.

    The re-normalised low layer keeps each channel's mean and std, but only a fraction r_j
    (`channel_correlation`) of channel j is the float signal; the rest, its quantization noise,
    is taken as uncorrelated across channels and taps. The next layer's float output variance
    sigma'^2 (its BN statistics) is D + O: D = sum_{c,k} W2[o,c,k]^2 Var(h_c), the part from each
    input value with itself, exact for h = act(N(beta, gamma^2)), and O the rest, made of
    covariances between different channels and taps. The noise keeps D and scales O by the
    product of the two channels' r, here the square of the W2-weighted mean r:
        sigma_hat'^2 = D + r_bar^2 (sigma'^2 - D),  r_bar = sum_c a_c r_c / sum_c a_c,
        a_c = |sum_k W2[o, c, k]| std(h_c).
    Group-1 next layers only (the caller leaves depthwise/grouped ones alone).
    """
    _, var_h = clipped_normal_moments(stats.mean, stats.std, act[0], act[1])
    w2 = np.asarray(w_next, np.float64).reshape(w_next.shape[0], w_next.shape[1], -1)
    diag = np.einsum("ock,c->o", w2 * w2, var_h)
    total = np.asarray(next_std, np.float64) ** 2
    weight = np.abs(w2.sum(axis=2)) * np.sqrt(var_h)[None, :]
    norm = weight.sum(axis=1)
    r_bar = np.where(norm > 0, weight @ np.clip(corr, 0.0, 1.0) / np.where(norm > 0, norm, 1.0), 1.0)
    off = np.maximum(total - diag, 0.0)
    var_q = np.minimum(diag, total) + r_bar**2 * off
    live = (var_q > 0) & (total > 0)
    return np.where(live, np.sqrt(np.where(live, total, 1.0) / np.where(live, var_q, 1.0)), 1.0)


SIGMA_MODELS = ("tap", "regression", "blend")


def _regression_variance(w_fp: np.ndarray, w_q: np.ndarray, std: np.ndarray, in_var: np.ndarray,
                         group: int) -> np.ndarray:
    """kappa^2 gamma^2 + sum (Wq - kappa W)^2 v: see `reestimate_bn`."""
    w, var = _grouped_inputs(w_fp, group, in_var)
    wq, _ = _grouped_inputs(w_q, group, in_var)
    diag_fp = np.einsum("ock,oc->o", w * w, var)
    kappa = np.where(diag_fp > 0, np.einsum("ock,oc->o", w * wq, var) / np.where(diag_fp > 0, diag_fp, 1.0), 1.0)
    noise = np.einsum("ock,oc->o", (wq - kappa[:, None, None] * w) ** 2, var)
    return kappa**2 * np.asarray(std, np.float64) ** 2 + noise


def reestimate_bn(w_fp: np.ndarray, w_q: np.ndarray, stats: ChannelStats, in_mean: np.ndarray, in_var: np.ndarray,
                  rho: float, group: int = 1, sigma_model: str = "blend") -> ChannelStats:
    """Pre-activation mean and std of the quantized layer's channels, without data.

    mu_hat = beta + E[(Wq - W) x]. sigma_hat by `sigma_model`:
    - "tap": gamma sqrt(V(Wq) / V(W)) (module doc), inputs independent across channels;
    - "regression": Wq = kappa W + E, kappa the v-weighted regression coefficient, so that E is
      v-orthogonal to W. The kappa W part keeps the float output's variance, gamma^2, whatever the
      covariances between input channels and taps are; E's part is taken as independent of it and
      across inputs: sigma_hat^2 = kappa^2 gamma^2 + sum_{c,k} E^2 v_c. (An earlier version clamped the
      cross-input covariance O = gamma^2 - sum W^2 v at 0. O is negative in many trained channels
      (38-48 % of MobileNet-V1's early pointwise ones, 80 % of its last one under prior statistics)
      and the clamp then inflated sigma_hat, shrinking live channels by 1.3-1.7x: BN-folded
      MobileNet-V1 4/8 went from 46.31 to 60.54 top-1 without it);
    - "blend": the geometric mean of the two (measured on ResNet-56 with real inputs, "tap" is
      ~3 % high and "regression" ~5 % low).
    """
    if sigma_model not in SIGMA_MODELS:
        raise ValueError(f"sigma_model must be one of {', '.join(SIGMA_MODELS)}, got {sigma_model!r}")
    mu_hat = np.asarray(stats.mean, np.float64) + output_shift(w_fp, w_q, in_mean, group)
    std = np.asarray(stats.std, np.float64)
    v_fp = tap_variance(w_fp, in_var, rho, group)
    v_q = tap_variance(w_q, in_var, rho, group)
    ratio = np.where(v_fp > 0, v_q / np.where(v_fp > 0, v_fp, 1.0), 1.0)
    tap_std = std * np.sqrt(ratio)
    if sigma_model == "tap":
        return ChannelStats(mu_hat, tap_std)
    reg_std = np.sqrt(_regression_variance(w_fp, w_q, std, in_var, group))
    return ChannelStats(mu_hat, reg_std if sigma_model == "regression" else np.sqrt(tap_std * reg_std))


def dfmpc_coefficients(x_fp: np.ndarray, y_fp: np.ndarray, x_hat: np.ndarray, y_hat: np.ndarray,
                       lambda1: float = DEFAULT_LAMBDA1, lambda2: float = DEFAULT_LAMBDA2) -> np.ndarray:
    """c_j = argmin_{c >= 0} ||c Xh_j - X_j||^2 + l1 (c yh_j - y_j)^2 + l2 c^2, float64, per row j.

    x_fp, x_hat : [O, n] weights (any trailing shape is flattened); y_fp, y_hat : [O] biases.
    The unconstrained minimiser (Xh.X + l1 yh y) / (Xh.Xh + l1 yh^2 + l2) is clamped at 0, which
    is the constrained minimiser since the objective is a convex quadratic in c. A row whose
    denominator is 0 (nothing to scale) gets c = 1.
    """
    x = np.asarray(x_fp, np.float64).reshape(len(y_fp), -1)
    xh = np.asarray(x_hat, np.float64).reshape(len(y_fp), -1)
    y, yh = np.asarray(y_fp, np.float64), np.asarray(y_hat, np.float64)
    num = np.einsum("on,on->o", xh, x) + lambda1 * yh * y
    den = np.einsum("on,on->o", xh, xh) + lambda1 * yh * yh + lambda2
    c = np.where(den > 0, num / np.where(den > 0, den, 1.0), 1.0)
    return np.maximum(c, 0.0)


@dataclass(frozen=True)
class Compensation:
    """A compensated low-bit layer: integer weights, per-channel scale and bias, and the diagnostics."""

    quant: LowBitWeights
    bias: np.ndarray  # [O] float64
    gain: np.ndarray  # gamma / sigma_hat, per channel (1 without std re-estimation)
    c: np.ndarray  # the closed-form coefficient (1 without compensation)
    estimated: ChannelStats  # (mu_hat, sigma_hat) of the plain quantized layer


def compensate_mixed_precision(w_fp: np.ndarray, bias: np.ndarray | None, stats: ChannelStats, in_mean: np.ndarray,
                               in_var: np.ndarray, bits: int, *, group: int = 1, quantizer: str = "lsq",
                               reestimate: str = "mean+std", rho: float | str = DEFAULT_RHO,
                               compensate: bool = False, lambda1: float = DEFAULT_LAMBDA1,
                               lambda2: float = DEFAULT_LAMBDA2, sigma_model: str = "blend",
                               refine_steps: int = 0) -> Compensation:
    """Quantize a BN-folded layer [O, ...] to `bits` and compensate it per channel (module doc).

    reestimate : "none", "mean" or "mean+std" (which BN statistics are re-estimated).
    rho : tap correlation for V, or "fit" (`fit_rho`).
    refine_steps : coordinate-ascent steps of the "corr" quantizer (`quantize_correlated`).
    """
    if reestimate not in REESTIMATE:
        raise ValueError(f"reestimate must be one of {', '.join(REESTIMATE)}, got {reestimate!r}")
    w = np.asarray(w_fp, np.float64)
    b = np.zeros(w.shape[0]) if bias is None else np.asarray(bias, np.float64)
    rho_value = fit_rho(w, in_var, stats.std, group) if rho == "fit" else float(rho)
    if quantizer == "corr":
        quant = quantize_correlated(w, bits, in_var, rho_value, refine_steps, group)
    else:
        quant = quantize_low(w, bits, quantizer)
    w_q = quant.dequantized()
    estimated = reestimate_bn(w, w_q, stats, in_mean, in_var, rho_value, group, sigma_model)
    gain = np.ones(w.shape[0])
    if reestimate == "mean+std":
        live = (estimated.std > 0) & (stats.std > 0)
        gain = np.where(live, stats.std / np.where(live, estimated.std, 1.0), 1.0)
    new_bias = b.copy()
    if reestimate != "none":
        new_bias = gain * (b - estimated.mean) + stats.mean
    scale = quant.scale * gain
    c = np.ones(w.shape[0])
    if compensate:
        x_hat = quant.w_int.reshape(w.shape[0], -1) * scale[:, None]
        c = dfmpc_coefficients(w.reshape(w.shape[0], -1), b, x_hat, new_bias, lambda1, lambda2)
        scale, new_bias = scale * c, new_bias * c
    w_int = quant.w_int
    off = scale <= 0
    if off.any():  # c = 0: the channel is switched off
        w_int = np.where(off.reshape((-1,) + (1,) * (w.ndim - 1)), 0, w_int)
        scale = np.where(off, TINY_SCALE, scale)
    return Compensation(LowBitWeights(w_int, scale), new_bias, gain, c, estimated)


# ---------------------------------------------------------------- the next layer's least-squares correction

HERMITE_TERMS = 12  # terms of the Hermite series for the covariance of two activated Gaussians
LSQ_RIDGE = 1e-3  # ridge on E[hq hq^T] (relative to its mean diagonal) in the next layer's regression
HIGH_CORRECTIONS = ("none", "lsq")  # the next layer's weights: as they are, or least-squares corrected


def output_covariance(w_a: np.ndarray, w_b: np.ndarray, in_var: np.ndarray, rho: float) -> np.ndarray:
    """Cov(W_a x, W_b x) [O_a, O_b] at one position under the tap model of `tap_variance` (group 1).

    sum_c v_c (rho S_a[i, c] S_b[j, c] + (1 - rho) sum_k W_a[i, c, k] W_b[j, c, k]), S = sum over taps.
    """
    a = np.asarray(w_a, np.float64).reshape(w_a.shape[0], w_a.shape[1], -1)
    b = np.asarray(w_b, np.float64).reshape(w_b.shape[0], w_b.shape[1], -1)
    var = np.asarray(in_var, np.float64).reshape(-1)
    summed = np.einsum("ic,jc,c->ij", a.sum(axis=2), b.sum(axis=2), var)
    taps = np.einsum("ick,jck,c->ij", a, b, var)
    return rho * summed + (1.0 - rho) * taps


def hermite_coefficients(mean: np.ndarray, std: np.ndarray, lo: float | np.ndarray, hi: float | np.ndarray,
                         terms: int = HERMITE_TERMS) -> np.ndarray:
    """f_n = E[clip(m + s u, lo, hi) He_n(u)] / sqrt(n!), n = 1..terms, per channel: [terms, C].

    For u, w standard normal with correlation r, Cov(f(u), g(w)) = sum_n r^n f_n g_n (Mehler).
    With a = (bound - m) / s: f_1 = s (Phi(a_hi) - Phi(a_lo)) and, for n >= 2,
    n! ^ 1/2 f_n = s (He_{n-2}(a_lo) phi(a_lo) - He_{n-2}(a_hi) phi(a_hi)) (Gaussian integration by parts).
    """
    m, s = np.asarray(mean, np.float64), np.asarray(std, np.float64)
    safe = np.where(s > 0, s, 1.0)
    lo, hi = np.broadcast_to(np.asarray(lo, np.float64), m.shape), np.broadcast_to(np.asarray(hi, np.float64), m.shape)
    with np.errstate(invalid="ignore"):  # per-channel bounds (CLE's Min): infinite ones give +-inf
        a_lo = np.where(np.isfinite(lo), (lo - m) / safe, -np.inf)
        a_hi = np.where(np.isfinite(hi), (hi - m) / safe, np.inf)
    coef = np.zeros((terms,) + m.shape)
    coef[0] = s * (normal_cdf(a_hi) - normal_cdf(a_lo))
    pdf = [np.where(np.isfinite(a), normal_pdf(a), 0.0) for a in (a_lo, a_hi)]
    a_fin = [np.where(np.isfinite(a), a, 0.0) for a in (a_lo, a_hi)]
    he_prev, he = [np.zeros(m.shape)] * 2, [np.ones(m.shape)] * 2  # He_{-1}, He_0
    factorial = 1.0
    for n in range(2, terms + 1):
        factorial *= n
        coef[n - 1] = s * (he[0] * pdf[0] - he[1] * pdf[1]) / np.sqrt(factorial)
        k = n - 2  # He_{k+1} = a He_k - k He_{k-1}
        he, he_prev = [a_fin[i] * he[i] - k * he_prev[i] for i in range(2)], he
    return np.where(s > 0, coef, 0.0)


def activated_covariance(corr: np.ndarray, coef_a: np.ndarray, coef_b: np.ndarray) -> np.ndarray:
    """Cov(f(z_a), g(z_b)) [C_a, C_b] from the pre-activation correlation [C_a, C_b] (Mehler series)."""
    corr = np.clip(np.asarray(corr, np.float64), -1.0, 1.0)
    power = np.ones_like(corr)
    out = np.zeros_like(corr)
    for n in range(coef_a.shape[0]):  # over series terms, not weights
        power = power * corr
        out += power * np.outer(coef_a[n], coef_b[n])
    return out


def _correlation(cov: np.ndarray, var_a: np.ndarray, var_b: np.ndarray) -> np.ndarray:
    norm = np.sqrt(np.outer(var_a, var_b))
    return np.where(norm > 0, cov / np.where(norm > 0, norm, 1.0), 0.0)


def correct_next_layer(w_fp: np.ndarray, w_q: np.ndarray, stats: ChannelStats, act: tuple[float, float | np.ndarray],
                       in_var: np.ndarray, rho: float, w_next: np.ndarray, b_next: np.ndarray | None,
                       ridge: float = LSQ_RIDGE) -> tuple[np.ndarray, np.ndarray]:
    """W_next', b_next' minimising E||W_next h + b_next - (W_next' hq + b_next')||^2, float64.

    h = act(W x + b) is the float low layer's activated output, hq the re-normalised quantized one
    (both with pre-activation mean beta_j and std gamma_j). Per kernel tap of the next layer, with
    h and hq at one position, the minimiser is W_next'[:, :, k] = W_next[:, :, k] M,
        M = E_c[h hq^T] E_c[hq hq^T]^-1    (centred second moments; the regression of h on hq),
    b_next' = b_next + sum_k W_next[:, :, k] (E h - M E hq): the whole next layer compensates,
    not one gain per channel. The pre-activation correlations come from the tap model
    (`output_covariance` of W and Wq over the propagated input variance), their stds from the BN
    statistics, and the activation maps them through `hermite_coefficients` (exact variances on the
    diagonal). Group-1 layers; w_next canonical [O, C, *k].
    """
    cov_zz = output_covariance(w_fp, w_fp, in_var, rho)
    cov_qq = output_covariance(w_q, w_q, in_var, rho)
    cov_zq = output_covariance(w_fp, w_q, in_var, rho)
    d_z, d_q = np.diag(cov_zz), np.diag(cov_qq)
    mean, std = np.asarray(stats.mean, np.float64), np.asarray(stats.std, np.float64)
    coef = hermite_coefficients(mean, std, act[0], act[1])
    h_mean, h_var = clipped_normal_moments(mean, std, act[0], act[1])
    cross = activated_covariance(_correlation(cov_zq, d_z, d_q), coef, coef)  # [h, hq]
    auto = activated_covariance(_correlation(cov_qq, d_q, d_q), coef, coef)
    auto[np.diag_indices_from(auto)] = h_var
    auto += ridge * max(float(np.mean(h_var)), 1e-30) * np.eye(len(h_var))
    mix = np.linalg.solve(auto, cross.T).T  # M = cross auto^-1 (auto symmetric)
    w2 = np.asarray(w_next, np.float64)
    w_new = np.einsum("oc...,cd->od...", w2, mix)
    shift = h_mean - mix @ h_mean
    base = np.zeros(w2.shape[0]) if b_next is None else np.asarray(b_next, np.float64)
    return w_new, base + w2.reshape(w2.shape[0], w2.shape[1], -1).sum(axis=2) @ shift


def correlated_sum_moments(mean_a: np.ndarray, var_a: np.ndarray, mean_b: np.ndarray, var_b: np.ndarray,
                           corr: float, lo: float, hi: float) -> tuple[np.ndarray, np.ndarray]:
    """Mean and variance of clip(a + b, lo, hi), a + b ~ N(m_a + m_b, v_a + v_b + 2 corr sqrt(v_a v_b)).

    The residual join of a block, a + b with a the branch and b the shortcut, with a correlation
    between them per channel (the statistics engine takes them as independent, corr = 0).
    """
    var = np.asarray(var_a, np.float64) + np.asarray(var_b, np.float64) \
        + 2.0 * corr * np.sqrt(np.asarray(var_a, np.float64) * np.asarray(var_b, np.float64))
    mean = np.asarray(mean_a, np.float64) + np.asarray(mean_b, np.float64)
    return clipped_normal_moments(mean, np.sqrt(np.maximum(var, 0.0)), lo, hi)
