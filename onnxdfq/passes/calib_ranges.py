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
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from onnxdfq.errors import OptionError
from onnxdfq.graph import layers as graph_layers
from onnxdfq.graph import surgery
from onnxdfq.passes.base import ActRange, LayerRow, Pass, PassReport, Workspace
from onnxdfq.quant.range_estimators import ESTIMATORS, RangeEstimator, TensorObserver, get_estimator

__all__ = ["CALIB_SOURCES", "DEFAULT_SYNTH_SAMPLES", "CalibSpec", "CalibrationRangePass", "Collector"]

logger = logging.getLogger(__name__)

CALIB_SOURCES = ("bn", "synth", "data")
DEFAULT_SYNTH_SAMPLES = 256  # generated samples when --calib-samples is not given
DEFAULT_ESTIMATOR = "mse"

# collect(model with the tensors as outputs, tensor names, samples, histogram=...) -> observers
Collector = Callable[..., dict[str, TensorObserver]]


@dataclass(frozen=True)
class CalibSpec:
    """Where activation ranges come from (``--calib``) and how they are estimated.

    ``source`` is ``bn`` (BN statistics, no data), ``synth`` (``method`` samples generated on
    the fly from the BN statistics) or ``data`` (the ``.npz`` at ``path``). ``samples``: how
    many to generate (default 256) or use (default all). ``mean``/``std`` preprocess raw uint8
    data files; ``synth_options`` go to the generator (e.g. ``steps``, ``alpha``).
    """

    source: str = "bn"
    method: str | None = None
    path: str | None = None
    estimator: str = DEFAULT_ESTIMATOR
    samples: int | None = None
    percentile: float = 99.99
    seed: int = 0
    device: str = "cpu"
    batch_size: int = 32
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    synth_options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str | None, **options: Any) -> CalibSpec:
        """``bn``, ``synth:METHOD`` or ``data:PATH.npz`` plus keyword options; OptionError if invalid."""
        text = (text or "bn").strip()
        kind, _, arg = text.partition(":")
        kind = kind.lower()
        if kind not in CALIB_SOURCES or (kind == "bn" and arg) or (kind != "bn" and not arg):
            raise OptionError(f"--calib takes bn, synth:METHOD (zeroq, dsg, dffg) or data:PATH.npz; got {text!r}")
        fields = {"source": kind, "method": arg.lower() if kind == "synth" else None,
                  "path": arg if kind == "data" else None}
        for key in ("mean", "std"):
            if options.get(key) is not None:
                options[key] = tuple(float(v) for v in np.ravel(options[key]))
        spec = cls(**fields, **{k: v for k, v in options.items() if v is not None})
        spec.validate()
        return spec

    def validate(self) -> None:
        if self.estimator not in ESTIMATORS:
            raise OptionError(f"--calib-range must be one of {', '.join(ESTIMATORS)}, got {self.estimator!r}")
        if self.samples is not None and self.samples < 1:
            raise OptionError(f"--calib-samples must be >= 1, got {self.samples}")
        if not 50.0 < self.percentile <= 100.0:
            raise OptionError(f"--calib-percentile must be in (50, 100], got {self.percentile}")
        if self.device not in ("cpu", "cuda"):
            raise OptionError(f"--device must be cpu or cuda, got {self.device!r}")

    @property
    def label(self) -> str:
        return {"bn": "bn", "synth": f"synth:{self.method}", "data": "data"}[self.source]

    def sample_count(self) -> int:
        return self.samples or DEFAULT_SYNTH_SAMPLES

    def range_estimator(self) -> RangeEstimator:
        return get_estimator(self.estimator, percentile=self.percentile)


def model_with_outputs(graph: Any, tensors: list[str], template: Any) -> Any:
    """A ModelProto of a copy of ``graph`` whose outputs are its own plus ``tensors`` (inputs excepted)."""
    copy = graph.copy()
    by_name = copy.tensors()
    inputs = {t.name for t in copy.inputs}
    extra = []
    for name in tensors:
        tensor = by_name[name]
        if name in inputs or tensor in copy.outputs:
            continue
        if tensor.dtype is None:
            tensor.dtype = np.float32
        extra.append(tensor)
    copy.outputs = list(copy.outputs) + extra
    return surgery.export_model(copy, template)


def tensors_without_bn_downstream(graph: Any, bn_layers: set[str]) -> set[str]:
    """Names of the tensors from which no layer in ``bn_layers`` (layer = node name) is reachable."""
    consumers: dict[str, list[Any]] = {}
    for node in graph.nodes:
        for tensor in node.inputs:
            consumers.setdefault(tensor.name, []).append(node)
    memo: dict[str, bool] = {}

    def reaches_bn(name: str) -> bool:
        if name not in memo:
            memo[name] = False  # cycles cannot occur in ONNX; this also bounds the recursion
            memo[name] = any(node.name in bn_layers or any(reaches_bn(out.name) for out in node.outputs)
                             for node in consumers.get(name, []))
        return memo[name]

    return {name for name in graph.tensors() if not reaches_bn(name)}


def tensors_after_layers(graph: Any, layer_nodes: set[str]) -> set[str]:
    """Names of the outputs of the nodes in ``layer_nodes`` and of every tensor computed from them."""
    found: set[str] = set()
    for node in graph.nodes:  # imported graphs are in topological order
        if node.name in layer_nodes or any(t.name in found for t in node.inputs):
            found.update(t.name for t in node.outputs)
    return found


class CalibrationRangePass(Pass):
    """Set the range of every tensor in ``tensors`` from observed values on calibration samples.

    Parameters
    ----------
    tensors : names of the tensors that get a Q/DQ pair (``patterns.activation_tensors``).
    samples : model inputs, float32 [N, ...], already preprocessed.
    collect : runs the float model (see ``onnxdfq.eval.calibrate.collect_statistics``).
    spec : the calibration settings (estimator, percentile, source label).
    bits : the activation bit width the ranges are for (the MSE estimator depends on it).
    template : the ModelProto whose IR version / opsets the exported float graph takes.
    info : extra facts for the report (e.g. the generator's time and BN loss).
    """

    name = "act_ranges_calib"
    changes_graph = False

    def __init__(self, tensors: list[str], samples: np.ndarray, collect: Collector, spec: CalibSpec, bits: int,
                 template: Any, info: dict[str, Any] | None = None) -> None:
        self.tensors = tensors
        self.samples = samples
        self.collect = collect
        self.spec = spec
        self.bits = bits
        self.template = template
        self.info = info or {}

    def call(self, ws: Workspace) -> PassReport:
        estimator = self.spec.range_estimator()
        params = {"source": self.spec.label, "samples": int(len(self.samples)), "estimator": estimator.name,
                  "act_bits": self.bits, **self.info}
        if estimator.name == "percentile":
            params["percentile"] = self.spec.percentile
        report = PassReport(self.name, params=params)
        model = model_with_outputs(ws.graph, self.tensors, self.template)
        observers = self.collect(model, self.tensors, self.samples, histogram=estimator.needs_histogram)
        inputs = {t.name for t in ws.graph.inputs}
        layers = graph_layers.read_layers(ws.graph)
        bn_layers = {layer.node.name for layer in layers if layer.name in ws.channel_stats}
        plain_layers = {layer.node.name for layer in layers if layer.name not in ws.channel_stats}
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
        logger.info("calibrated %d activation ranges on %d samples (%s, %s)", len(report.rows), len(self.samples),
                    self.spec.label, estimator.name)
        return report
