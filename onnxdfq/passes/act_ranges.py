"""Activation ranges without data, from the statistics engine (``onnxdfq.passes.statistics``).

A tensor's range is the union over its channels of [max(mean - n std, lo), min(mean + n std, hi)],
widened to contain 0; the network input keeps its explicit bounds.
"""

from __future__ import annotations

import logging

import numpy as np

from onnxdfq.config import DEFAULT_SIGMAS  # mean +- 6 std: a Gaussian channel but for 2e-9 of its mass
from onnxdfq.passes.base import ActRange, LayerRow, Pass, PassReport, Workspace
from onnxdfq.passes.statistics import (
    DEFAULT_INPUT_RANGE,
    TensorStats,
    linear_moments,
    propagate_statistics,
    tensor_statistics,
)

__all__ = ["DEFAULT_SIGMAS", "DEFAULT_INPUT_RANGE", "TensorStats", "propagate_statistics", "BNRangePass",
           "linear_moments"]

logger = logging.getLogger(__name__)


class BNRangePass(Pass):
    """Set the range of every tensor in `tensors` from propagated BN statistics."""

    name = "act_ranges_bn"
    changes_graph = False

    def __init__(self, tensors: list[str], sigmas: float = DEFAULT_SIGMAS) -> None:
        self.tensors = tensors
        self.sigmas = sigmas

    def call(self, ws: Workspace) -> PassReport:
        report = PassReport(self.name, params={"sigmas": self.sigmas,
                                               "input_range": list(ws.input_range or DEFAULT_INPUT_RANGE)})
        stats = tensor_statistics(ws)
        missing = []
        for name in self.tensors:
            tensor_stats = stats.get(name)
            if tensor_stats is None:
                missing.append(name)
                continue
            # the input's bounds are explicit (or the documented default): use them as they are
            lo, hi = tensor_stats.range(np.inf if tensor_stats.source == "input" else self.sigmas)
            ws.act_ranges[name] = ActRange(lo, hi, tensor_stats.source)
            report.rows.append(LayerRow(name, {"lo": lo, "hi": hi, "source": tensor_stats.source}))
        report.params["without_statistics"] = missing  # the pipeline calibrates them on prior images
        report.modified = bool(report.rows)
        return report
