"""--bits auto: choose each layer's weight width, without data, under a size or average-bits budget.

Every quantizable layer gets each candidate width in turn, quantized as the run will quantize it (the method's
rounder, per-channel grids, and the analytic bias correction when its statistics came from BN). A correction
computed from statistics measured on prior images (a BN-folded model) or samples is left out of the candidates,
though the run still applies it: measured on those same images it is circular and looks better than it does on
real data (BN-folded MobileNet-V1, val1300: --avg-bits 5 75.92 % uncorrected against 74.54 corrected, --avg-bits 4
65.77 against 64.31; with BN kept the correction is independent of the images and is measured: 75.77 / 70.31
against 76.15 / 68.54 uncorrected). What that
costs is its *sensitivity*: the relative noise power it adds to the network's output when it alone is
quantized. Two ways to get it:

- ``measured``: run the float model on calibration samples (prior images, DFFG or data, as ``--calib``
  chooses) with that one layer's weights replaced (a callable the pipeline injects: this module stays numpy);
- ``proxy``: no inference at all: the layer's own relative output noise, from the weight error and the
  statistics engine's per-channel input moments, assuming relative noise reaches the output unchanged.

Quantization noise of different layers adds up in power at the output, so the widths minimise the summed
sensitivity under the budget (onnxdfq.quant.allocation: a multiple-choice knapsack, solved exactly).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from onnxdfq.config import AUTO_WIDTHS, SENSITIVITY_MODES
from onnxdfq.errors import OptionError
from onnxdfq.graph import layers as graph_layers
from onnxdfq.passes.base import LayerRow, Pass, PassReport, Workspace
from onnxdfq.passes.statistics import TensorStats, tensor_statistics
from onnxdfq.quant.allocation import allocate_widths, pareto_front, stored_bits
from onnxdfq.quant.qparams import weight_scale
from onnxdfq.quant.scheme import BitWidthMap, QuantScheme
from onnxdfq.quant.shift import correct_bias

__all__ = ["AUTO_WIDTHS", "SENSITIVITY_MODES", "Budget", "Candidate", "quantize_candidate", "proxy_noise",
           "BitAllocationPass"]

logger = logging.getLogger(__name__)

# a measured sensitivity below this is noise of the measurement itself (float32 logits); kept positive so the
# allocator still prefers the wider grid when two are equally harmless
NOISE_FLOOR = 1e-9


@dataclass(frozen=True)
class Budget:
    """What the widths must fit: ``avg_bits`` (grid bits per weight, over parameters) or ``size_bytes`` (the
    packed file, with ``overhead_bytes`` of it not weights)."""

    avg_bits: float | None = None
    size_bytes: float | None = None
    overhead_bytes: float = 0.0
    packed: bool = True
    int2: bool = False

    @property
    def kind(self) -> str:
        return "avg_bits" if self.avg_bits is not None else "size"

    def layer_sizes(self, params: np.ndarray, channels: np.ndarray, widths: Sequence[int]) -> np.ndarray:
        """[L, B]: grid bits (avg_bits) or file bits (size: weights and their zero points, in their containers)."""
        if self.kind == "avg_bits":
            return params[:, None] * np.asarray(widths, np.float64)[None, :]
        return np.stack([stored_bits(params, channels, int(b), self.packed, self.int2) for b in widths], axis=1)

    def total(self, params: np.ndarray) -> float:
        if self.kind == "avg_bits":
            return float(self.avg_bits * params.sum())
        return float((self.size_bytes - self.overhead_bytes) * 8)


@dataclass
class Candidate:
    """One layer at one width: its dequantized weight (canonical layout) and the bias the run would give it."""

    bits: int
    weight: np.ndarray  # float32, canonical [O, I/g, *k]
    bias: np.ndarray | None  # float32 [O]; None when the layer has none and nothing corrected it
    weight_sqnr_db: float


def quantize_candidate(layer: graph_layers.Layer, bits: int, rounder: Callable, *, per_channel: bool = True,
                       in_mean: np.ndarray | None = None) -> Candidate:
    """The layer quantized at ``bits`` as WeightQuantPass would, bias-corrected from ``in_mean`` if given."""
    scheme = QuantScheme(bits, signed=True, symmetric=True, per_channel=per_channel, axis=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-zero channels: WeightQuantPass reports them
        scale = weight_scale(layer.weight, scheme)
    w_int = rounder(layer.weight, scale, scheme.qmin, scheme.qmax)
    shape = [-1] + [1] * (layer.weight.ndim - 1)
    w_q = (np.asarray(w_int, np.float64) * (scale.reshape(shape) if scale.size > 1 else scale.reshape(()))) \
        .astype(np.float32)
    bias = layer.bias
    if in_mean is not None and layer.op_type != "MatMul":
        bias = correct_bias(layer.weight, w_q, layer.bias, in_mean, layer.group).astype(np.float32)
    err = np.sum((w_q.astype(np.float64) - layer.weight) ** 2)
    sqnr = 10 * np.log10(max(np.sum(layer.weight.astype(np.float64) ** 2), 1e-30) / max(err, 1e-30))
    return Candidate(bits, w_q, bias, float(sqnr))


def _per_input(layer: graph_layers.Layer, values: np.ndarray) -> np.ndarray:
    """[O, I/g]: the input-channel value each weight of output channel o multiplies (groups resolved)."""
    out_ch, in_per_group = layer.weight.shape[0], layer.weight.shape[1]
    group_of_out = np.arange(out_ch) // (out_ch // layer.group)
    return values[group_of_out[:, None] * in_per_group + np.arange(in_per_group)[None, :]]


def proxy_noise(layer: graph_layers.Layer, candidate: Candidate, in_stats: TensorStats | None,
                corrected: bool) -> float:
    """Relative noise power at the layer's own output: E|(W_q - W) x|^2 / E|W x + b|^2 over channels and
    positions, for independent inputs with the statistics engine's per-channel moments (unit moments when the
    input has none). A corrected bias removes the error's mean part."""
    out_ch, in_per_group = layer.weight.shape[0], layer.weight.shape[1]
    eps = (candidate.weight.astype(np.float64) - layer.weight).reshape(out_ch, in_per_group, -1)
    w = layer.weight.astype(np.float64).reshape(out_ch, in_per_group, -1)
    channels = in_per_group * layer.group
    if in_stats is not None and in_stats.channels == channels:
        mean, var = in_stats.moments()
    else:
        mean, var = np.zeros(channels), np.ones(channels)
    mean_i, var_i = _per_input(layer, mean), _per_input(layer, var)
    noise = np.einsum("oik,oi->", eps * eps, var_i)
    if not corrected:
        noise += float(np.sum(np.einsum("oik,oi->o", eps, mean_i) ** 2))
    out_mean = np.einsum("oik,oi->o", w, mean_i) + (0.0 if layer.bias is None else layer.bias.astype(np.float64))
    signal = np.einsum("oik,oi->", w * w, var_i) + float(np.sum(out_mean ** 2))
    return float(noise / max(signal, 1e-30))


Measure = Callable[[graph_layers.Layer, Candidate], float]


class BitAllocationPass(Pass):
    """Decide ws.bit_widths: the candidate width per layer with the least summed sensitivity under the budget.

    Layers whose width was fixed before (``--first-last-bits``) keep it and count against the budget.
    ``measure(layer, candidate)`` returns the measured relative output noise (None: the proxy).
    ``bias_correction`` corrects each candidate's bias before it is measured (see the module's docstring for when).
    """

    name = "bit_allocation"
    changes_graph = False

    def __init__(self, budget: Budget, rounder: Callable, *, widths: Sequence[int] = AUTO_WIDTHS,
                 per_channel: bool = True, bias_correction: bool = False, measure: Measure | None = None,
                 progress: Callable[[int, int], None] | None = None, cache: dict | None = None,
                 sensitivity: str | None = None) -> None:
        self.budget, self.rounder, self.widths = budget, rounder, tuple(sorted(set(int(b) for b in widths)))
        self.per_channel, self.bias_correction, self.measure, self.progress = \
            per_channel, bias_correction, measure, progress
        self.cache = cache  # sensitivities of an earlier run over the same graph (--size-budget's second plan)
        # "measured" with measure None: the measurements come from the cache
        self.sensitivity = sensitivity or ("measured" if measure is not None else "proxy")
        if self.sensitivity not in SENSITIVITY_MODES:
            raise ValueError(f"sensitivity must be one of {SENSITIVITY_MODES}, got {self.sensitivity!r}")

    def call(self, ws: Workspace) -> PassReport:
        layers = graph_layers.read_layers(ws.graph)
        fixed = dict(ws.bit_widths.by_name) if ws.bit_widths is not None else {}
        free = [layer for layer in layers if layer.name not in fixed]
        widths = self.widths
        params = np.array([layer.weight.size for layer in free], np.float64)
        channels = np.array([layer.out_channels for layer in free], np.float64)
        size = self.budget.layer_sizes(params, channels, widths)
        fixed_layers = [layer for layer in layers if layer.name in fixed]
        fixed_size = sum(float(self.budget.layer_sizes(np.array([x.weight.size], np.float64),
                                                       np.array([x.out_channels], np.float64), [fixed[x.name]])[0, 0])
                         for x in fixed_layers)
        all_params = float(sum(layer.weight.size for layer in layers))
        budget = self.budget.total(np.array([all_params])) - fixed_size
        if budget < float(size.min(axis=1).sum()) - 1e-9:  # before any measurement: a budget no plan meets
            raise BudgetError(self.budget, float(size.min(axis=1).sum()) + fixed_size, all_params)
        key = (tuple(layer.name for layer in free), widths, self.sensitivity)
        if self.cache is not None and self.cache.get("key") == key:
            noise, proxy, sqnr = (self.cache[name].copy() for name in ("noise", "proxy", "sqnr"))
        else:
            noise, proxy, sqnr = self._sensitivities(free, tensor_statistics(ws))
            if self.cache is not None:
                self.cache.update(key=key, noise=noise.copy(), proxy=proxy.copy(), sqnr=sqnr.copy())
        if self.sensitivity == "proxy":
            noise = np.maximum(proxy, NOISE_FLOOR)
        # a wider grid never costs more than a narrower one: measurement noise must not invert the order
        noise = np.minimum.accumulate(noise, axis=1)
        chosen = allocate_widths(noise, size, budget)  # feasible: checked above
        widths_of = {layer.name: widths[int(c)] for layer, c in zip(free, chosen.choice, strict=True)}
        ws.bit_widths = BitWidthMap(max(widths), {}, {**widths_of, **fixed})
        front = pareto_front(noise, size)
        report = PassReport(self.name, params={
            "budget": self.budget.kind, "budget_value": self.budget.avg_bits if self.budget.kind == "avg_bits"
            else self.budget.size_bytes, "sensitivity": self.sensitivity,
            "widths": list(widths), "fixed": fixed, "noise": chosen.noise,
            "average_bits": float(sum(widths_of[x.name] * x.weight.size for x in free) +
                                  sum(fixed[x.name] * x.weight.size for x in fixed_layers)) / max(all_params, 1.0),
            "pareto": [{"size": (s + fixed_size) / (all_params if self.budget.kind == "avg_bits" else 8.0),
                        "noise": n} for s, n in front],
            "chosen": {"size": (chosen.size + fixed_size) / (all_params if self.budget.kind == "avg_bits" else 8.0),
                       "noise": chosen.noise}}, modified=True)
        for row, layer in enumerate(free):
            report.rows.append(LayerRow(layer.name, {
                "bits": widths_of[layer.name], "params": int(layer.weight.size),
                "sensitivity": {int(b): float(noise[row, c]) for c, b in enumerate(widths)},
                "proxy": {int(b): float(proxy[row, c]) for c, b in enumerate(widths)},
                "candidate_weight_sqnr_db": {int(b): round(float(sqnr[row, c]), 3) for c, b in enumerate(widths)}}))
        return report


    def _sensitivities(self, free: list, stats: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """[L, B] measured noise (zeros without a measure), proxy noise and weight SQNR of every candidate."""
        widths = self.widths
        noise = np.zeros((len(free), len(widths)))
        proxy = np.zeros_like(noise)
        sqnr = np.zeros_like(noise)
        total_runs, done = len(free) * len(widths), 0
        for row, layer in enumerate(free):
            in_stats = stats.get(layer.input_name)
            usable = in_stats is not None and in_stats.channels == layer.weight.shape[1] * layer.group
            in_mean = in_stats.moments()[0] if (self.bias_correction and usable) else None
            for col, bits in enumerate(widths):
                cand = quantize_candidate(layer, bits, self.rounder, per_channel=self.per_channel, in_mean=in_mean)
                proxy[row, col] = proxy_noise(layer, cand, in_stats if usable else None, in_mean is not None)
                sqnr[row, col] = cand.weight_sqnr_db
                if self.measure is not None:
                    noise[row, col] = max(self.measure(layer, cand), NOISE_FLOOR)
                done += 1
                if self.progress is not None:
                    self.progress(done, total_runs)
        return noise, proxy, sqnr


class BudgetError(OptionError):
    """The budget is below what the narrowest candidate widths need."""

    def __init__(self, budget: Budget, smallest_bits: float, params: float) -> None:
        if budget.kind == "avg_bits":
            what = f"--avg-bits {budget.avg_bits:g} is below the narrowest plan ({smallest_bits / params:.3g} bits)"
        else:
            what = (f"--size-budget allows {budget.size_bytes / 1024:.1f} KiB but the narrowest plan needs "
                    f"{(smallest_bits / 8 + budget.overhead_bytes) / 1024:.1f} KiB")
        super().__init__(what + "; give a larger budget")
