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

DF-MPC's pairs (passes/dfmpc.py: a low layer compensated in closed form, the next layer rescaled) are candidates
too, with measured sensitivities and BN statistics (compensated from prior statistics, a pair is circular on the
prior images like the bias correction: see BitAllocationPass._pair_plans). Each pair is one knapsack item whose
options are its two layers' plain widths and DF-MPC at a 2-bit low layer with the high layer at any wider width.
The pair is measured once with its high layer in float and the high layer's own noise at each width is added
(per-channel grids do not see DF-MPC's per-channel rescaling). Measured (squant, A8, full test sets): ResNet-20
--avg-bits 2.5 82.73 % with pairs against 78.44 without, ResNet-56 89.64 against 88.08, MobileNet-V1 --avg-bits 3
20.85 against 10.54; at --avg-bits 4 and up no pair is chosen. Low layers at 3 and 4 bits (DF-MPC's least-squares
grid) were offered too and measured worse on real images than the plain plan they displaced (MobileNet-V1
--avg-bits 4: 68.77 / 68.31 against 70.31), so only the ternary low layer is offered (PAIR_LOW_WIDTHS).
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
from onnxdfq.passes.dfmpc import DFMPCPass, plan_pairs
from onnxdfq.passes.statistics import TensorStats, tensor_statistics
from onnxdfq.quant.allocation import allocate_widths, pareto_front, stored_bits
from onnxdfq.quant.qparams import weight_scale
from onnxdfq.quant.scheme import BitWidthMap, QuantScheme
from onnxdfq.quant.shift import correct_bias

__all__ = ["AUTO_WIDTHS", "SENSITIVITY_MODES", "Budget", "Candidate", "quantize_candidate", "proxy_noise",
           "BitAllocationPass", "Option", "PAIR_LOW_WIDTHS"]

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


Measure = Callable[[Sequence[tuple[graph_layers.Layer, Candidate]]], float]  # swaps -> relative output noise
PAIR_LOW_WIDTHS = (2,)  # DF-MPC's low widths: its compensation is for ultra-low grids


@dataclass(frozen=True)
class Option:
    """One way to quantize an item: ``widths`` of its layers, and for a DF-MPC pair (``dfmpc``) its low layer
    compensated and its high layer rescaled (passes/dfmpc.py)."""

    widths: tuple[int, ...]
    dfmpc: bool = False


class BitAllocationPass(Pass):
    """Decide ws.bit_widths: the candidate width per layer with the least summed sensitivity under the budget.

    Layers whose width was fixed before (``--first-last-bits``) keep it and count against the budget.
    ``measure(swaps)`` returns the measured relative output noise with each (layer, candidate) swapped in (None:
    the proxy). ``bias_correction`` corrects each candidate's bias before it is measured (see the module's
    docstring for when). With ``pairs`` (a DFMPCPass: its options and compensation) and measured sensitivities,
    every DF-MPC pair (low, high) of the free layers is one item: its two layers' widths chosen together, plus
    DF-MPC's options (low compensated at PAIR_LOW_WIDTHS, high at any wider width); the chosen pairs go to
    ws.dfmpc_pairs for passes.dfmpc.AllocatedPairsPass. Pairs are offered only where the low layer's statistics
    came from BN (see `_pair_plans`).
    """

    name = "bit_allocation"
    changes_graph = False

    def __init__(self, budget: Budget, rounder: Callable, *, widths: Sequence[int] = AUTO_WIDTHS,
                 per_channel: bool = True, bias_correction: bool = False, measure: Measure | None = None,
                 progress: Callable[[int, int], None] | None = None, cache: dict | None = None,
                 sensitivity: str | None = None, pairs: DFMPCPass | None = None) -> None:
        self.budget, self.rounder, self.widths = budget, rounder, tuple(sorted(set(int(b) for b in widths)))
        self.per_channel, self.bias_correction, self.measure, self.progress = \
            per_channel, bias_correction, measure, progress
        self.cache = cache  # sensitivities of an earlier run over the same graph (--size-budget's second plan)
        # "measured" with measure None: the measurements come from the cache
        self.sensitivity = sensitivity or ("measured" if measure is not None else "proxy")
        if self.sensitivity not in SENSITIVITY_MODES:
            raise ValueError(f"sensitivity must be one of {SENSITIVITY_MODES}, got {self.sensitivity!r}")
        self.pairs = pairs

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
        pairs = self._pair_plans(ws, layers, free)
        pair_widths = tuple(b for b in widths if b in PAIR_LOW_WIDTHS and b < max(widths))
        key = (tuple(layer.name for layer in free), widths, self.sensitivity,
               tuple((p.low, p.high) for p in pairs))
        if self.cache is not None and self.cache.get("key") == key:
            noise, proxy, sqnr, pair_noise = (self.cache[name].copy()
                                              for name in ("noise", "proxy", "sqnr", "pair_noise"))
        else:
            stats = tensor_statistics(ws)
            noise, proxy, sqnr = self._sensitivities(free, stats, extra_runs=len(pairs) * len(pair_widths))
            pair_noise = self._pair_sensitivities(ws, layers, pairs, pair_widths, stats, done=noise.size)
            if self.cache is not None:
                self.cache.update(key=key, noise=noise.copy(), proxy=proxy.copy(), sqnr=sqnr.copy(),
                                  pair_noise=pair_noise.copy())
        if self.sensitivity == "proxy":
            noise = np.maximum(proxy, NOISE_FLOOR)
        # a wider grid never costs more than a narrower one: measurement noise must not invert the order
        noise = np.minimum.accumulate(noise, axis=1)
        items, options, item_noise, item_size = _items(free, pairs, pair_widths, widths, noise, size, pair_noise)
        chosen = allocate_widths(item_noise, item_size, budget)  # feasible: checked above
        pair_of = {p.low: p for p in pairs}
        widths_of: dict[str, int] = {}
        ws.dfmpc_pairs = []
        for members, opts, c in zip(items, options, chosen.choice, strict=True):
            option = opts[int(c)]
            widths_of.update({free[m].name: b for m, b in zip(members, option.widths, strict=True)})
            if option.dfmpc:  # a pair item's first member is its low layer
                ws.dfmpc_pairs.append((pair_of[free[members[0]].name], option.widths[0]))
        ws.bit_widths = BitWidthMap(max(widths), {}, {**widths_of, **fixed})
        front = pareto_front(item_noise, item_size)
        unit = all_params if self.budget.kind == "avg_bits" else 8.0
        report = PassReport(self.name, params={
            "budget": self.budget.kind, "budget_value": self.budget.avg_bits if self.budget.kind == "avg_bits"
            else self.budget.size_bytes, "sensitivity": self.sensitivity,
            "widths": list(widths), "fixed": fixed, "noise": chosen.noise,
            "average_bits": float(sum(widths_of[x.name] * x.weight.size for x in free) +
                                  sum(fixed[x.name] * x.weight.size for x in fixed_layers)) / max(all_params, 1.0),
            "dfmpc_pairs_offered": len(pairs),
            "dfmpc_pairs": [[p.low, p.high, bits, widths_of[p.high]] for p, bits in ws.dfmpc_pairs],
            "pareto": [{"size": (s + fixed_size) / unit, "noise": n} for s, n in front],
            "chosen": {"size": (chosen.size + fixed_size) / unit, "noise": chosen.noise}}, modified=True)
        chosen_pairs = {p.low for p, _ in ws.dfmpc_pairs}
        low_row = {p.low: i for i, p in enumerate(pairs)}
        for row, layer in enumerate(free):
            values = {
                "bits": widths_of[layer.name], "params": int(layer.weight.size),
                "sensitivity": {int(b): float(noise[row, c]) for c, b in enumerate(widths)},
                "proxy": {int(b): float(proxy[row, c]) for c, b in enumerate(widths)},
                "candidate_weight_sqnr_db": {int(b): round(float(sqnr[row, c]), 3) for c, b in enumerate(widths)}}
            if layer.name in low_row:  # its pair with the high layer float, the low one compensated
                values["dfmpc_sensitivity"] = {int(b): float(pair_noise[low_row[layer.name], c])
                                               for c, b in enumerate(pair_widths)}
            if layer.name in chosen_pairs:
                values["dfmpc"] = True
            report.rows.append(LayerRow(layer.name, values))
        return report

    def _pair_plans(self, ws: Workspace, layers: list, free: list) -> list:
        """DF-MPC's pairs among the free layers whose low layer has BN statistics. None without a DFMPCPass, or
        with proxy sensitivities (the compensation changes the weights on purpose, which a weight-noise proxy
        cannot score). Statistics measured on prior images are circular on them, as for the bias correction:
        offered on BN-folded MobileNet-V1 at --avg-bits 5, a pair compensated from prior statistics measured
        well on the prior images and was chosen, and the file scored 63.15 % (75.92 without pairs)."""
        if self.pairs is None or self.sensitivity != "measured":
            return []
        names = {layer.name for layer in free}
        plan = plan_pairs(layers, ws.graph, ws.channel_stats, 2, max(self.widths), self.pairs.low_rule)
        return [p for p in plan.pairs if p.low in names and p.high in names
                and ws.channel_stats[p.low].source == "bn"]

    def _pair_sensitivities(self, ws: Workspace, layers: list, pairs: list, pair_widths: tuple[int, ...],
                            stats: dict, done: int) -> np.ndarray:
        """[P, W]: each pair with its low layer compensated at each low width and its high layer rescaled, float."""
        noise = np.zeros((len(pairs), len(pair_widths)))
        if not pairs or self.measure is None:
            return noise
        by_name = {layer.name: layer for layer in layers}
        total = done + noise.size
        for row, pair in enumerate(pairs):
            for col, bits in enumerate(pair_widths):
                update = self.pairs.pair_update(ws, by_name, pair, bits, stats)
                low = update.low
                swaps = [(low, Candidate(bits, update.result.quant.dequantized().astype(np.float32),
                                         update.result.bias.astype(np.float32), 0.0))]
                if update.high is not None:
                    high, weight, bias, _ = update.high
                    # the high layer in float (bits 32): its own noise at each width is added per option (_items)
                    swaps.append((high, Candidate(32, weight.astype(np.float32), bias.astype(np.float32), 0.0)))
                noise[row, col] = max(self.measure(swaps), NOISE_FLOOR)
                done += 1
                if self.progress is not None:
                    self.progress(done, total)
        return noise

    def _sensitivities(self, free: list, stats: dict, extra_runs: int = 0
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """[L, B] measured noise (zeros without a measure), proxy noise and weight SQNR of every candidate."""
        widths = self.widths
        noise = np.zeros((len(free), len(widths)))
        proxy = np.zeros_like(noise)
        sqnr = np.zeros_like(noise)
        total_runs, done = len(free) * len(widths) + (extra_runs if self.measure is not None else 0), 0
        for row, layer in enumerate(free):
            in_stats = stats.get(layer.input_name)
            usable = in_stats is not None and in_stats.channels == layer.weight.shape[1] * layer.group
            in_mean = in_stats.moments()[0] if (self.bias_correction and usable) else None
            for col, bits in enumerate(widths):
                cand = quantize_candidate(layer, bits, self.rounder, per_channel=self.per_channel, in_mean=in_mean)
                proxy[row, col] = proxy_noise(layer, cand, in_stats if usable else None, in_mean is not None)
                sqnr[row, col] = cand.weight_sqnr_db
                if self.measure is not None:
                    noise[row, col] = max(self.measure([(layer, cand)]), NOISE_FLOOR)
                done += 1
                if self.progress is not None:
                    self.progress(done, total_runs)
        return noise, proxy, sqnr


def _items(free: list, pairs: list, pair_widths: tuple[int, ...], widths: tuple[int, ...], noise: np.ndarray,
           size: np.ndarray, pair_noise: np.ndarray) -> tuple[list, list, np.ndarray, np.ndarray]:
    """The knapsack's items: (member rows of ``free``, their options) with [items, options] noise and size, padded
    with noise inf. A pair's layers take any two widths (their noises add) or a DF-MPC option: its measured
    compensated pair plus the high layer's own noise at its width (per-channel grids do not see the high
    layer's per-channel rescaling)."""
    row_of = {layer.name: i for i, layer in enumerate(free)}
    paired = {row_of[p.low] for p in pairs} | {row_of[p.high] for p in pairs}
    items, options, noises, sizes = [], [], [], []
    for row in range(len(free)):
        if row not in paired:
            items.append((row,))
            options.append([Option((b,)) for b in widths])
            noises.append(noise[row])
            sizes.append(size[row])
    index = {b: c for c, b in enumerate(widths)}
    for p_row, pair in enumerate(pairs):
        low, high = row_of[pair.low], row_of[pair.high]
        opts = [Option((a, b)) for a in widths for b in widths]
        item_noise = [noise[low, index[a]] + noise[high, index[b]] for a, b in (o.widths for o in opts)]
        item_size = [size[low, index[a]] + size[high, index[b]] for a, b in (o.widths for o in opts)]
        for col, a in enumerate(pair_widths):
            for b in (b for b in widths if b > a):
                opts.append(Option((a, b), dfmpc=True))
                item_noise.append(pair_noise[p_row, col] + noise[high, index[b]])
                item_size.append(size[low, index[a]] + size[high, index[b]])
        items.append((low, high))
        options.append(opts)
        noises.append(np.asarray(item_noise))
        sizes.append(np.asarray(item_size))
    width = max(len(o) for o in options)
    noise_m = np.full((len(items), width), np.inf)
    size_m = np.zeros((len(items), width))
    for i, (n, s) in enumerate(zip(noises, sizes, strict=True)):
        noise_m[i, :len(n)], size_m[i, :len(s)], size_m[i, len(s):] = n, s, np.max(s)
    return items, options, noise_m, size_m


class BudgetError(OptionError):
    """The budget is below what the narrowest candidate widths need."""

    def __init__(self, budget: Budget, smallest_bits: float, params: float) -> None:
        if budget.kind == "avg_bits":
            what = f"--avg-bits {budget.avg_bits:g} is below the narrowest plan ({smallest_bits / params:.3g} bits)"
        else:
            what = (f"--size-budget allows {budget.size_bytes / 1024:.1f} KiB but the narrowest plan needs "
                    f"{(smallest_bits / 8 + budget.overhead_bytes) / 1024:.1f} KiB")
        super().__init__(what + "; give a larger budget")
