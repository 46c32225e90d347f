"""--avg-act-bits: which activations run on a 4-bit grid, chosen without data under an average-bits budget.

Each activation that gets a Q/DQ pair is quantized alone, at each candidate width, on its own range for that width
(the narrower grid takes the range a uniform run at that width would take), and its *sensitivity* is what that
adds to the network's output: the relative noise power measured on calibration samples (prior images, or the
``--calib`` samples), with every weight in float. The widths then minimise the summed sensitivity with the
average width over the activation elements of one image within the budget: the same multiple-choice knapsack as
the weights' (onnxdfq.quant.allocation). Activation memory traffic is what a narrower grid saves, so elements,
not tensors, are counted. Tensors whose width was fixed before (``--first-last-bits``) keep it.

The measurement itself is a callable the pipeline injects (one forward pass each; this module stays numpy).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from onnxdfq.errors import OptionError
from onnxdfq.passes.base import ActRange, LayerRow, Pass, PassReport, Workspace
from onnxdfq.quant.allocation import allocate_widths
from onnxdfq.quant.qparams import ActQParams, activation_grid

__all__ = ["ActWidthAllocationPass", "ActBudgetError"]

NOISE_FLOOR = 1e-9  # as for the weights: below it, float32 noise of the measurement itself

ActMeasure = Callable[[str, ActQParams], float]  # (tensor, its grid) -> relative output noise


class ActWidthAllocationPass(Pass):
    """Choose ws.act_widths under ``avg_bits`` (bits per activation element of one image).

    ``ranges`` maps each candidate width below the widest to the ranges a uniform run at that width would take;
    the widest width uses ws.act_ranges. ``elements`` is each tensor's element count per image. The chosen
    narrower tensors get their width in ws.act_widths and their range in ws.act_ranges.
    """

    name = "act_width_allocation"
    changes_graph = False

    def __init__(self, avg_bits: float, widths: Sequence[int], ranges: dict[int, dict[str, ActRange]],
                 elements: dict[str, int], measure: ActMeasure, *, target: str = "ort",
                 progress: Callable[[int, int], None] | None = None) -> None:
        self.avg_bits, self.widths = float(avg_bits), tuple(sorted(set(int(b) for b in widths)))
        self.ranges, self.elements, self.measure = ranges, elements, measure
        self.target, self.progress = target, progress

    def _range(self, ws: Workspace, tensor: str, bits: int) -> ActRange:
        return ws.act_ranges[tensor] if bits == max(self.widths) else self.ranges[bits].get(tensor,
                                                                                            ws.act_ranges[tensor])

    def call(self, ws: Workspace) -> PassReport:
        fixed = {t: b for t, b in ws.act_widths.items() if t in ws.act_ranges}
        free = [t for t in ws.act_ranges if t not in fixed and t in self.elements]
        widths = self.widths
        elements = np.array([self.elements[t] for t in free], np.float64)
        size = elements[:, None] * np.asarray(widths, np.float64)[None, :]
        fixed_size = float(sum(self.elements.get(t, 0) * b for t, b in fixed.items()))
        total = float(elements.sum()) + float(sum(self.elements.get(t, 0) for t in fixed))
        budget = self.avg_bits * total - fixed_size
        if budget < float(size.min(axis=1).sum()) - 1e-9:
            raise ActBudgetError(self.avg_bits, (float(size.min(axis=1).sum()) + fixed_size) / max(total, 1.0))
        noise = np.zeros(size.shape)
        done, runs = 0, noise.size
        for row, tensor in enumerate(free):
            for col, bits in enumerate(widths):
                act_range = self._range(ws, tensor, bits)
                grid = activation_grid(act_range.lo, act_range.hi, bits, self.target)
                noise[row, col] = max(self.measure(tensor, grid), NOISE_FLOOR)
                done += 1
                if self.progress is not None:
                    self.progress(done, runs)
        # a wider grid never costs more than a narrower one: measurement noise must not invert the order
        noise = np.minimum.accumulate(noise, axis=1)
        chosen = allocate_widths(noise, size, budget)
        report = PassReport(self.name, modified=True)
        for row, tensor in enumerate(free):
            bits = widths[int(chosen.choice[row])]
            if bits != max(widths):
                ws.act_widths[tensor] = bits
                ws.act_ranges[tensor] = self._range(ws, tensor, bits)
            report.rows.append(LayerRow(tensor, {
                "act_bits": bits, "elements": int(self.elements[tensor]),
                "act_sensitivity": {int(b): float(noise[row, c]) for c, b in enumerate(widths)}}))
        narrow = [t for t in free if ws.act_widths.get(t, max(widths)) < max(widths)]
        report.params = {"budget_avg_act_bits": self.avg_bits, "widths": list(widths), "fixed": fixed,
                         "tensors": len(free), "narrow_tensors": len(narrow), "noise": chosen.noise,
                         "average_act_bits": (chosen.size + fixed_size) / max(total, 1.0)}
        return report


class ActBudgetError(OptionError):
    """The activation budget is below what the narrowest widths need."""

    def __init__(self, avg_bits: float, smallest: float) -> None:
        super().__init__(f"--avg-act-bits {avg_bits:g} is below the narrowest plan ({smallest:.3g} bits per "
                         "activation element); give a larger budget")
