"""Pass infrastructure: the workspace passes share, reports, and the Pass contract.

Modelled on onnx-ir's passes: `Pass.__call__` runs requires -> call -> ensures, and every pass
reports whether it actually changed anything.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["ChannelStats", "BNStats", "STAT_SOURCES", "WeightQuant", "ActRange", "LayerRow", "PassReport",
           "Workspace", "Pass",
           "PreconditionError", "PostconditionError"]

logger = logging.getLogger(__name__)


class PreconditionError(RuntimeError):
    pass


class PostconditionError(RuntimeError):
    pass


# where a layer's per-channel output statistics come from: a folded BatchNormalization (beta, |gamma|),
# procedural prior images (onnxdfq.synth.prior), or calibration samples (synthetic or user data)
STAT_SOURCES = ("bn", "prior", "samples")


@dataclass(frozen=True)
class ChannelStats:
    """Per-output-channel pre-activation mean and std of a layer's output, and where they came from.

    From a folded BatchNormalization they are (beta, |gamma|); a model exported with BN folded has
    none, and the pipeline measures them on prior images (or calibration samples) instead.
    """

    mean: np.ndarray  # float64
    std: np.ndarray  # float64
    source: str = "bn"

    def scaled(self, factor: np.ndarray) -> ChannelStats:
        """Statistics of the channel after its pre-activation is divided by `factor` (> 0)."""
        return ChannelStats(self.mean / factor, self.std / factor, self.source)

    def shifted(self, amount: np.ndarray) -> ChannelStats:
        """Statistics after `amount` is subtracted from the channel's pre-activation."""
        return ChannelStats(self.mean - amount, self.std, self.source)

    def replaced(self, mean: np.ndarray, std: np.ndarray) -> ChannelStats:
        return ChannelStats(mean, std, self.source)


BNStats = ChannelStats  # the name before statistics had other sources than BN


@dataclass
class WeightQuant:
    """Integer weights of one layer in canonical layout, with their per-channel scale."""

    bits: int
    scale: np.ndarray  # [O] (per-channel) or [1] (per-tensor)
    w_int: np.ndarray  # signed integers (int8 up to 8 bits from squant, int64 from nearest), canonical layout
    per_channel: bool
    method: str

    def dequantized(self) -> np.ndarray:
        shape = [-1] + [1] * (self.w_int.ndim - 1)
        scale = self.scale.reshape(shape) if self.scale.size > 1 else self.scale.reshape(())
        return (self.w_int * scale).astype(np.float32)


@dataclass
class ActRange:
    """Per-tensor activation range and where it came from (bn, propagated, input, calibration...)."""

    lo: float
    hi: float
    source: str


@dataclass
class LayerRow:
    layer: str
    values: dict[str, Any]


@dataclass
class PassReport:
    name: str
    params: dict[str, Any] = field(default_factory=dict)
    rows: list[LayerRow] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    modified: bool = False
    seconds: float = 0.0
    skipped: dict[str, str] = field(default_factory=dict)  # layer (or node) -> why this pass left it alone

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name, "params": self.params, "modified": self.modified,
            "seconds": round(self.seconds, 6), "warnings": self.warnings, "skipped": self.skipped,
            "layers": {row.layer: row.values for row in self.rows},
        }


@dataclass
class Workspace:
    """What the pipeline carries from pass to pass: the graph and everything learnt about it."""

    graph: Any  # onnx_graphsurgeon.Graph (kept untyped so that passes/ never imports graph libraries)
    channel_stats: dict[str, ChannelStats] = field(default_factory=dict)  # layer name -> stats of its output
    act_upper: dict[str, np.ndarray] = field(default_factory=dict)  # layer -> per-channel clip (CLE+ReLU6)
    weight_quant: dict[str, WeightQuant] = field(default_factory=dict)
    act_ranges: dict[str, ActRange] = field(default_factory=dict)  # tensor name -> range
    input_range: tuple[float, float] | None = None
    reduced_range: list[str] = field(default_factory=list)  # layers given 7-bit weights (see pipeline)
    weight_ranges: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # stage -> layer -> per-channel
    bit_widths: Any = None  # onnxdfq.quant.scheme.BitWidthMap when a pass planned per-layer widths (DF-MPC)
    dfmpc_pairs: list = field(default_factory=list)  # (passes.dfmpc.PairPlan, low bits) --bits auto chose
    act_qparams: dict[str, Any] = field(default_factory=dict)  # tensor -> quant.qparams.ActQParams
    act_widths: dict[str, int] = field(default_factory=dict)  # tensor -> activation bits where not the default
    float_model: Any = None  # the float graph before any weight is quantized (block reconstruction's targets)
    # layer -> (H = sum x x^T of its inputs [G, D, D], rows that built it): --method gptq (passes/gptq.py)
    hessians: dict[str, tuple[np.ndarray, int]] = field(default_factory=dict)
    # (spec label, samples, info) generated once for the stages that learn on samples (gptq, --reconstruct)
    learn_samples: Any = None
    bias_qparams: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # layer -> (int32, scale)
    emitted: Any = None  # the exported onnx.ModelProto (passes/emit.py)
    emitted_layers: list[Any] = field(default_factory=list)  # the layers as they were just before emission
    # what the statistics stage decided (pipeline): the resolved calibration, its samples' runner, BN count
    calib: Any = None
    observer: Any = None
    bn_layers: int = 0
    range_sigmas: float | None = None  # mean +- this many std for statistics ranges, once the source is known
    skipped: dict[str, str] = field(default_factory=dict)  # optional step or layer -> why it did not run
    reports: list[PassReport] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    # bumped by every pass that changed the graph or the statistics: cached tensor statistics
    # (onnxdfq.passes.statistics.tensor_statistics) are valid for one version only
    version: int = 0
    cache: dict[str, Any] = field(default_factory=dict)

    def touch(self) -> None:
        """Record that the graph or the channel statistics changed (drops cached statistics)."""
        self.version += 1
        self.cache.clear()


class Pass:
    """A step over the Workspace. Subclasses implement `call`; options go in `__init__`."""

    name = "pass"
    changes_graph = True  # False for passes that only read the graph (e.g. set activation ranges)

    def requires(self, ws: Workspace) -> None:  # noqa: B027 - optional hook
        """Raise PreconditionError if the workspace is not ready for this pass."""

    def ensures(self, ws: Workspace) -> None:  # noqa: B027 - optional hook
        """Raise PostconditionError if the pass left the workspace inconsistent."""

    def call(self, ws: Workspace) -> PassReport:
        raise NotImplementedError

    def __call__(self, ws: Workspace) -> PassReport:
        self.requires(ws)
        start = time.perf_counter()
        report = self.call(ws)
        report.seconds = time.perf_counter() - start
        if report.modified and self.changes_graph:
            ws.touch()
        self.ensures(ws)
        ws.reports.append(report)
        for message in report.warnings:
            logger.warning("%s: %s", report.name, message)
        return report
