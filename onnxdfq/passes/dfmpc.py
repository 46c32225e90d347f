"""DF-MPC: data-free mixed-precision compensation (Chen et al., Pattern Recognition 2023, arXiv 2307.00498).

Layers are paired (l, l+1) along plain chains conv -> BN -> ReLU -> conv (`plan_pairs`): l is
quantized at the low width (2 bits = exact least-squares ternary {-1, 0, 1} * alpha_j per output
channel), l+1 and every unpaired layer at the high width. No data is used anywhere.

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

import logging
from dataclasses import dataclass, field

import numpy as np

from onnxdfq.graph import layers as graph_layers
from onnxdfq.passes.act_ranges import propagate_statistics
from onnxdfq.passes.base import BNStats, LayerRow, Pass, PassReport, PostconditionError, WeightQuant, Workspace
from onnxdfq.passes.bias_correction import output_shift
from onnxdfq.quant.gaussian import clipped_normal_moments
from onnxdfq.quant.qparams import TINY_SCALE, channel_absmax
from onnxdfq.quant.scheme import BitWidthMap, QuantScheme

__all__ = ["DEFAULT_LAMBDA1", "DEFAULT_LAMBDA2", "DEFAULT_RHO", "LowBitWeights", "PairPlan", "MixedPrecisionPlan",
           "Compensation", "ternarize_lsq", "quantize_low", "tap_variance", "fit_rho", "reestimate_bn",
           "dfmpc_coefficients", "compensate_mixed_precision", "plan_pairs", "DFMPCPass"]

logger = logging.getLogger(__name__)

DEFAULT_LAMBDA1 = 0.5  # weight of the bias term in the closed form (the paper's lambda1)
DEFAULT_LAMBDA2 = 0.0  # ridge term on c (the paper's lambda2)
DEFAULT_RHO = 0.2  # correlation between the kernel taps of one input channel in V(u)
RHO_GRID = np.linspace(0.0, 0.9, 46)  # candidates for rho="fit"
SCALE_GRID = np.linspace(0.2, 1.0, 81)  # clip ratios (of max|w|) searched for 3..8-bit low layers
LOW_QUANTIZERS = ("lsq", "absmax", "twn")  # least-squares grid, max|w| grid, TWN ternary (0.7 mean|w|)
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
    q = np.clip(np.rint(w[:, None, :] / scales[:, :, None]), scheme.qmin, scheme.qmax)
    err = np.sum((q * scales[:, :, None] - w[:, None, :]) ** 2, axis=2)
    pick = np.argmin(err, axis=1)
    rows = np.arange(w.shape[0])
    return LowBitWeights(q[rows, pick].astype(np.int64).reshape(w_fp.shape), scales[rows, pick])


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


def high_layer_gain(corr: np.ndarray, stats: BNStats, act: tuple[float, float], w_next: np.ndarray,
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
    """D_q + kappa^2 max(gamma^2 - D, 0): see `reestimate_bn`."""
    w, var = _grouped_inputs(w_fp, group, in_var)
    wq, _ = _grouped_inputs(w_q, group, in_var)
    diag_fp = np.einsum("ock,oc->o", w * w, var)
    diag_q = np.einsum("ock,oc->o", wq * wq, var)
    kappa = np.where(diag_fp > 0, np.einsum("ock,oc->o", w * wq, var) / np.where(diag_fp > 0, diag_fp, 1.0), 1.0)
    return diag_q + kappa**2 * np.maximum(np.asarray(std, np.float64) ** 2 - diag_fp, 0.0)


def reestimate_bn(w_fp: np.ndarray, w_q: np.ndarray, stats: BNStats, in_mean: np.ndarray, in_var: np.ndarray,
                  rho: float, group: int = 1, sigma_model: str = "blend") -> BNStats:
    """Pre-activation mean and std of the quantized layer's channels, without data.

    mu_hat = beta + E[(Wq - W) x]. sigma_hat by `sigma_model`:
    - "tap": gamma sqrt(V(Wq) / V(W)) (module doc), inputs independent across channels;
    - "regression": the float variance gamma^2 = D + O splits into D = sum_{c,k} W^2 v_c, each input
      value with itself (exact), and O, the covariances between different channels and taps,
      unknown but fixed by gamma. Writing Wq = kappa W + noise (kappa the v-weighted regression
      coefficient), the noise adds to D only: sigma_hat^2 = D_q + kappa^2 (gamma^2 - D);
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
        return BNStats(mu_hat, tap_std)
    reg_std = np.sqrt(_regression_variance(w_fp, w_q, std, in_var, group))
    return BNStats(mu_hat, reg_std if sigma_model == "regression" else np.sqrt(tap_std * reg_std))


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
    estimated: BNStats  # (mu_hat, sigma_hat) of the plain quantized layer


def compensate_mixed_precision(w_fp: np.ndarray, bias: np.ndarray | None, stats: BNStats, in_mean: np.ndarray,
                               in_var: np.ndarray, bits: int, *, group: int = 1, quantizer: str = "lsq",
                               reestimate: str = "mean+std", rho: float | str = DEFAULT_RHO,
                               compensate: bool = False, lambda1: float = DEFAULT_LAMBDA1,
                               lambda2: float = DEFAULT_LAMBDA2, sigma_model: str = "blend") -> Compensation:
    """Quantize a BN-folded layer [O, ...] to `bits` and compensate it per channel (module doc).

    reestimate : "none", "mean" or "mean+std" (which BN statistics are re-estimated).
    rho : tap correlation for V, or "fit" (`fit_rho`).
    """
    if reestimate not in REESTIMATE:
        raise ValueError(f"reestimate must be one of {', '.join(REESTIMATE)}, got {reestimate!r}")
    w = np.asarray(w_fp, np.float64)
    b = np.zeros(w.shape[0]) if bias is None else np.asarray(bias, np.float64)
    quant = quantize_low(w, bits, quantizer)
    w_q = quant.dequantized()
    rho_value = fit_rho(w, in_var, stats.std, group) if rho == "fit" else float(rho)
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


@dataclass(frozen=True)
class PairPlan:
    low: str
    high: str


@dataclass(frozen=True)
class MixedPrecisionPlan:
    """Which layers are paired; every layer outside `low_layers` gets `high_bits`."""

    low_bits: int
    high_bits: int
    pairs: tuple[PairPlan, ...]
    unpaired: dict[str, str] = field(default_factory=dict)  # layer -> why it is in no pair

    @property
    def low_layers(self) -> set[str]:
        return {pair.low for pair in self.pairs}

    def bitmap(self) -> BitWidthMap:
        return BitWidthMap(self.high_bits, by_name={name: self.low_bits for name in self.low_layers})


LOW_ACTS = ("relu", "relu6", "none")  # activations a compensated pre-activation may feed


def _unpaired_reason(layer: graph_layers.Layer, next_layer: graph_layers.Layer | None, used: set[str],
                     bn_stats: dict, graph_inputs: set[str]) -> str | None:
    if layer.input_name in graph_inputs:
        return "stem (reads the network input)"
    if layer.name in used:
        return "high layer of the previous pair"
    if layer.op_type != "Conv":
        return f"{layer.op_type} (only convolutions are paired)"
    if layer.is_depthwise:
        return "depthwise (partner unclear)"
    if layer.name not in bn_stats:
        return "no BN statistics"
    if layer.act.kind not in LOW_ACTS:
        return f"{layer.act.kind} activation"
    if next_layer is None:
        return "its output does not feed a single layer (residual join, pooling, head)"
    return None


def plan_pairs(layers: list[graph_layers.Layer], graph, bn_stats: dict, low_bits: int,
               high_bits: int) -> MixedPrecisionPlan:
    """Greedy pairing in graph order: l is low when it is a non-depthwise conv with BN statistics
    whose (activated) output is read by exactly one other layer, l+1, which becomes high.
    Layers in no pair (stem, classifier, convs before residual joins, depthwise) stay high."""
    by_node = {id(layer.node): layer for layer in layers}
    outputs = {t.name for t in graph.outputs}
    graph_inputs = {t.name for t in graph.inputs}
    tensors = graph.tensors()
    pairs: list[PairPlan] = []
    unpaired: dict[str, str] = {}
    used: set[str] = set()
    for layer in layers:
        tensor = tensors.get(layer.act_output_name)
        consumer = graph_layers.single_consumer(tensor, outputs) if tensor is not None else None
        next_layer = by_node.get(id(consumer)) if consumer is not None else None
        if next_layer is not None and next_layer.input_name != layer.act_output_name:
            next_layer = None
        reason = _unpaired_reason(layer, next_layer, used, bn_stats, graph_inputs)
        if reason is None:
            pairs.append(PairPlan(layer.name, next_layer.name))
            used.update((layer.name, next_layer.name))
        elif layer.name not in used:
            unpaired[layer.name] = reason
    return MixedPrecisionPlan(low_bits, high_bits, tuple(pairs), unpaired)


class DFMPCPass(Pass):
    """Plan the pairs, quantize and compensate every low layer; run after BN folding (and CLE).

    The low layers' compensated integer weights go to ws.weight_quant and their dequantized
    weights and new biases into the graph (so bias correction sees no residual error in them);
    `plan` is left on the pass for the pipeline, which quantizes the remaining layers at the high width.

    .. versionadded:: 0.1
    """

    name = "dfmpc"

    def __init__(self, low_bits: int, high_bits: int, *, quantizer: str = "lsq", reestimate: str = "mean+std",
                 rho: float | str = DEFAULT_RHO, compensate: bool = False, lambda1: float = DEFAULT_LAMBDA1,
                 lambda2: float = DEFAULT_LAMBDA2, sigma_model: str = "blend", high_gain: bool = True) -> None:
        if not 2 <= low_bits < high_bits <= 8:
            raise ValueError(f"DF-MPC needs 2 <= LOW < HIGH <= 8, got {low_bits}/{high_bits}")
        if quantizer not in LOW_QUANTIZERS or (quantizer == "twn" and low_bits != 2):
            raise ValueError(f"quantizer must be one of {', '.join(LOW_QUANTIZERS)} (twn: 2 bits only), "
                             f"got {quantizer!r}")
        if reestimate not in REESTIMATE:
            raise ValueError(f"reestimate must be one of {', '.join(REESTIMATE)}, got {reestimate!r}")
        if sigma_model not in SIGMA_MODELS:
            raise ValueError(f"sigma_model must be one of {', '.join(SIGMA_MODELS)}, got {sigma_model!r}")
        if rho != "fit" and not (isinstance(rho, (int, float)) and 0.0 <= rho < 1.0):
            raise ValueError(f"rho must be in [0, 1) or 'fit', got {rho!r}")
        rho = rho if rho == "fit" else float(rho)
        self.low_bits, self.high_bits = low_bits, high_bits
        self.options = {"quantizer": quantizer, "reestimate": reestimate, "rho": rho, "compensate": bool(compensate),
                        "lambda1": float(lambda1), "lambda2": float(lambda2), "sigma_model": sigma_model}
        self.high_gain = bool(high_gain)
        self.plan: MixedPrecisionPlan | None = None

    def ensures(self, ws: Workspace) -> None:
        for name in self.plan.low_layers if self.plan else ():
            quant = ws.weight_quant.get(name)
            if quant is None or not np.all(np.isfinite(quant.scale)) or np.any(quant.scale <= 0):
                raise PostconditionError(f"{name}: DF-MPC left no valid low-bit weights")

    def call(self, ws: Workspace) -> PassReport:
        layers = graph_layers.read_layers(ws.graph)
        plan = plan_pairs(layers, ws.graph, ws.bn_stats, self.low_bits, self.high_bits)
        stats = propagate_statistics(ws, layers)
        report = PassReport(self.name, params={"low_bits": self.low_bits, "high_bits": self.high_bits,
                                               "high_gain": self.high_gain, **self.options})
        updates = []
        for layer in layers:
            if layer.name not in plan.low_layers:
                continue
            in_stats = stats.get(layer.input_name)
            if in_stats is None or in_stats.channels != layer.weight.shape[1] * layer.group:
                report.warnings.append(f"{layer.name}: no input statistics; plain low-bit weights, uncompensated")
                in_mean = np.zeros(layer.weight.shape[1] * layer.group)
                in_var = np.ones_like(in_mean)
                options = {**self.options, "reestimate": "none"}
            else:
                in_mean, in_var = in_stats.moments()
                options = self.options
            result = compensate_mixed_precision(layer.weight, layer.bias, ws.bn_stats[layer.name], in_mean, in_var,
                                                self.low_bits, group=layer.group, **options)
            updates.append((layer, result, in_var))
        by_name = {layer.name: layer for layer in layers}
        high_updates = []
        for layer, result, in_var in updates if self.high_gain else ():
            high = by_name[next(p.high for p in plan.pairs if p.low == layer.name)]
            if layer.group != 1 or high.group != 1 or high.op_type != "Conv" or stats.get(high.output_name) is None:
                continue
            rho = self.options["rho"] if isinstance(self.options["rho"], float) else DEFAULT_RHO
            corr = channel_correlation(layer.weight, result.quant.dequantized(), in_var, rho, layer.group)
            next_std = stats[high.output_name].moments()[1] ** 0.5
            gain = high_layer_gain(corr, ws.bn_stats[layer.name], (layer.act.lo, layer.act.hi), high.weight, next_std)
            out_mean = stats[high.output_name].moments()[0]
            bias = np.zeros(high.out_channels) if high.bias is None else high.bias.astype(np.float64)
            high_updates.append((high, gain, gain * (bias - out_mean) + out_mean))
        for layer, result, _ in updates:  # decide first, then write once
            quant = WeightQuant(self.low_bits, result.quant.scale, result.quant.w_int, True, "dfmpc")
            ws.weight_quant[layer.name] = quant
            graph_layers.write_weight(layer, quant.dequantized())
            graph_layers.write_bias(layer, result.bias)
            stats_fp = ws.bn_stats[layer.name]
            report.rows.append(LayerRow(layer.name, {
                "bits": self.low_bits, "pair_high": next(p.high for p in plan.pairs if p.low == layer.name),
                "sigma_ratio_mean": float(np.mean(result.estimated.std / np.maximum(stats_fp.std, 1e-30))),
                "mean_shift_max": float(np.max(np.abs(result.estimated.mean - stats_fp.mean))),
                "c_mean": float(np.mean(result.c)), "c_min": float(np.min(result.c)),
            }))
        for high, gain, bias in high_updates:
            graph_layers.write_weight(high, high.weight * gain.reshape((-1,) + (1,) * (high.weight.ndim - 1)))
            graph_layers.write_bias(high, bias)
            report.rows.append(LayerRow(high.name, {"high_gain_mean": float(np.mean(gain)),
                                                    "high_gain_min": float(np.min(gain))}))
        self.plan = plan
        report.params["pairs"] = [[p.low, p.high] for p in plan.pairs]
        report.params["unpaired"] = dict(plan.unpaired)
        sizes = {layer.name: layer.weight.size for layer in layers}
        bits = {name: self.low_bits if name in plan.low_layers else self.high_bits for name in sizes}
        total = sum(sizes.values())
        report.params["average_weight_bits"] = sum(bits[n] * sizes[n] for n in sizes) / total if total else None
        report.params["weight_storage_bytes"] = int(np.ceil(sum(bits[n] * sizes[n] for n in sizes) / 8))
        report.modified = bool(updates)
        return report
