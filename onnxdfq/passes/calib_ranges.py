"""Activation ranges from calibration samples (synthetic or real) instead of BN statistics.

The pass exports the workspace's float graph as it stands (BN folded, after CLE / absorption,
before weight quantization) with every tensor to calibrate added as a graph output, hands it
and the samples to a ``collect`` function (onnxruntime lives in ``onnxdfq.eval.calibrate``; the
pipeline injects it, so this module stays numpy-only), and reduces each tensor's observer with a
range estimator (``onnxdfq.quant.range_estimators``). The network input keeps its known range
when one was given (``--mean/--std`` or ``--input-range``): samples cannot know it better.

Tensors computed by a layer without BN and with no BN layer downstream (the classifier head:
e.g. MobileNet's logits, quantized before Reshape/Softmax) are not constrained by BN-statistics
matching: synthetic samples give them a far too narrow range (MobileNet-V1 logits: [-7, 12] on
DFFG samples vs about [-30, 33] from BN propagation, which cut top-1 from 75 to 29). When the
workspace already holds a range for such a tensor (the pipeline runs the BN range pass first),
the union of both is kept.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np

from onnxdfq.config import CalibSpec
from onnxdfq.graph import layers as graph_layers
from onnxdfq.graph.patterns import tensors_after_layers, tensors_without_bn_downstream
from onnxdfq.graph.surgery import model_with_moments, model_with_outputs
from onnxdfq.passes.base import ActRange, LayerRow, Pass, PassReport, Workspace
from onnxdfq.quant.range_estimators import TensorObserver

__all__ = ["CalibrationRangePass", "Collector", "SampleObserver"]

logger = logging.getLogger(__name__)

# collect(model with the tensors as outputs, tensor names, samples, histogram=..., channels=...) -> observers
Collector = Callable[..., dict[str, TensorObserver]]


class SampleObserver:
    """Calibration samples and what was observed on them, for one state of the float graph.

    ``observe`` exports the workspace's graph with the tensors as outputs, runs ``collect`` over
    the samples (onnxruntime; injected so this module stays numpy-only) and caches the observers
    against ``ws.version``: passes that ask again before the graph changes (the channel
    statistics, then the activation ranges, on a model without CLE) get them without a rerun.
    """

    def __init__(self, samples: np.ndarray, collect: Collector, template: Any,
                 info: dict[str, Any] | None = None, collect_moments: Collector | None = None,
                 groups: np.ndarray | None = None) -> None:
        self.samples = samples
        self.groups = groups  # the generator of each sample, for an ensemble of image priors
        self.collect = collect
        self.collect_moments = collect_moments  # ranges and channel moments reduced in the graph (no histograms)
        self.template = template
        self.info = info or {}
        self.runs = 0  # how often the samples went through the model (for the report)
        self._version: int | None = None
        self._observers: dict[str, TensorObserver] = {}
        self._histogram = False
        self._ranges = False

    @property
    def count(self) -> int:
        """How many samples this observer ran (also after `release`)."""
        return self._count if self.samples is None else len(self.samples)

    def release(self) -> None:
        """Drop the samples and what was observed on them once no pass needs them (128 images at 224 px: 77 MB)."""
        self._count = self.count
        self.samples, self._observers, self._version = None, {}, None

    def subset(self, limit: int) -> SampleObserver:
        """An observer of at most ``limit`` of these samples, evenly spaced (every generator of an ensemble kept)."""
        if len(self.samples) <= limit:
            return self
        index = np.linspace(0, len(self.samples) - 1, limit).round().astype(int)
        return SampleObserver(self.samples[index], self.collect, self.template, {**self.info, "subset": limit},
                              self.collect_moments, None if self.groups is None else self.groups[index])

    def observe(self, ws: Workspace, tensors: list[str], *, histogram: bool = False,
                channels: set[str] | frozenset[str] = frozenset(), ranges: bool = True) -> dict[str, TensorObserver]:
        """Observers of ``tensors``: their ranges (unless ``ranges`` is False), histograms too with ``histogram``,
        per-channel moments for ``channels``. Moments alone (``ranges=False``) are reduced inside the model
        (``collect_moments``), which neither copies nor keeps any activation."""
        fresh = (self._version == ws.version and (self._histogram or not histogram)
                 and (self._ranges or not ranges))
        covered = fresh and all(name in self._observers for name in tensors) and all(
            self._observers[name].channel_sum is not None for name in channels)
        if not covered:
            reduced = (model_with_moments(ws.graph, tensors, self.template)
                       if self.collect_moments is not None and not (histogram or ranges) else None)
            moments = reduced is not None
            if moments:  # serialized once, the ModelProto dropped: one copy of the weights less during the run
                payload, reduced = reduced.SerializeToString(), None
                self._observers = self.collect_moments(payload, tensors, self.samples)
            else:
                model = model_with_outputs(ws.graph, tensors, self.template)
                self._observers = self.collect(model, tensors, self.samples, histogram=histogram,
                                               channels=frozenset(channels))
            self._version, self._histogram, self._ranges = ws.version, histogram, not moments
            self.runs += 1
        return {name: self._observers[name] for name in tensors}


class CalibrationRangePass(Pass):
    """Set the range of every tensor in ``tensors`` from observed values on calibration samples.

    Parameters
    ----------
    tensors : names of the tensors that get a Q/DQ pair (``patterns.activation_tensors``).
    observer : the samples and the model runner (``SampleObserver``).
    spec : the calibration settings (estimator, percentile, source label).
    bits : the activation bit width the ranges are for (the MSE estimator depends on it).
    """

    name = "act_ranges_calib"
    changes_graph = False

    def __init__(self, tensors: list[str], observer: SampleObserver, spec: CalibSpec, bits: int) -> None:
        self.tensors = tensors
        self.observer = observer
        self.spec = spec
        self.bits = bits

    def call(self, ws: Workspace) -> PassReport:
        estimator = self.spec.range_estimator()
        params = {"source": self.spec.label, "samples": self.observer.count,
                  "estimator": estimator.name, "act_bits": self.bits, **self.observer.info}
        if estimator.name == "percentile":
            params["percentile"] = self.spec.percentile
        report = PassReport(self.name, params=params)
        observers = self.observer.observe(ws, self.tensors, histogram=estimator.needs_histogram)
        inputs = {t.name for t in ws.graph.inputs}
        layers = graph_layers.read_layers(ws.graph)
        bn_layers = {layer.node.name for layer in layers if layer.name in ws.channel_stats
                     and ws.channel_stats[layer.name].source == "bn"}
        plain_layers = {layer.node.name for layer in layers if layer.node.name not in bn_layers}
        head = (tensors_without_bn_downstream(ws.graph, bn_layers) & tensors_after_layers(ws.graph, plain_layers)
                if bn_layers else set())
        source = f"calib:{self.spec.label}"
        widened = []
        for name in self.tensors:
            observer = observers[name]
            if name in inputs and ws.input_range is not None:
                lo, hi, how = ws.input_range[0], ws.input_range[1], "input"
            else:
                (lo, hi), how = estimator.estimate(observer, self.bits), source
                prior = ws.act_ranges.get(name)
                if name in head and prior is not None and (prior.lo < lo or prior.hi > hi):
                    lo, hi, how = min(lo, prior.lo), max(hi, prior.hi), f"{source}+{prior.source}"
                    widened.append(name)
            ws.act_ranges[name] = ActRange(float(lo), float(hi), how)
            report.rows.append(LayerRow(name, {"lo": float(lo), "hi": float(hi), "source": how,
                                               "observed_lo": observer.lo, "observed_hi": observer.hi}))
        if widened:
            report.warnings.append(f"{len(widened)} head tensor(s) without BN kept their wider data-free "
                                   f"range (BN matching does not constrain them): {', '.join(widened[:8])}")
        report.modified = bool(report.rows)
        logger.info("calibrated %d activation ranges on %d samples (%s, %s)", len(report.rows),
                    self.observer.count, self.spec.label, estimator.name)
        return report
