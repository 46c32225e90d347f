"""The quantization pipeline: load -> fold BN -> [no BN: statistics measured on prior images] ->
[CLE, absorption] -> activation ranges -> weights (nearest | SQuant | DF-MPC) -> [bias correction]
-> emit. `quantize` is the Python API behind `onnxdfq quantize`."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from onnxdfq.errors import OptionError, UnsupportedModelError
from onnxdfq.graph import io as graph_io
from onnxdfq.graph import layers as graph_layers
from onnxdfq.graph import patterns, surgery
from onnxdfq.passes.act_ranges import DEFAULT_SIGMAS, BNRangePass
from onnxdfq.passes.base import Workspace
from onnxdfq.passes.bias_absorption import BiasAbsorptionPass
from onnxdfq.passes.bias_correction import AnalyticBiasCorrectionPass
from onnxdfq.passes.calib_ranges import SAMPLE_SOURCES, CalibrationRangePass, CalibSpec, SampleObserver
from onnxdfq.passes.channel_stats import MeasureChannelStatsPass
from onnxdfq.passes.cle import CrossLayerEqualizationPass, share_min_ranges
from onnxdfq.passes.dfmpc import DFMPCPass
from onnxdfq.passes.fold_bn import FoldBatchNormPass
from onnxdfq.passes.statistics import layer_stat_counts
from onnxdfq.passes.weight_quant import WeightQuantPass, get_rounder
from onnxdfq.quant import qdq
from onnxdfq.quant.scheme import BitWidthMap, parse_act_bits, parse_bits

__all__ = ["METHODS", "QuantConfig", "QuantResult", "quantize", "quantize_model"]

logger = logging.getLogger(__name__)

LOW_BIT_SIGMAS = 4.0  # BN range width for activation grids below 6 bits (QuantConfig.bn_sigmas)

# method -> (weight rounder, default CLE, default bias absorption, default bias correction)
METHODS: dict[str, dict[str, Any]] = {
    "nearest": {"rounder": "nearest", "cle": False, "absorb_bias": False, "bias_correction": False},
    # analytic bias correction on by default: the mean shift is what sinks depthwise nets at 4 bits
    # (MobileNet-V1 W4A8: 2.5 % pure SQuant, ~64 % with it); --no-bias-correction gives the paper's SQuant
    "squant": {"rounder": "squant", "cle": False, "absorb_bias": False, "bias_correction": True},
    "dfq": {"rounder": "nearest", "cle": True, "absorb_bias": True, "bias_correction": True},
    # DF-MPC: --bits LOW/HIGH, float activations unless asked (the paper's setting); see passes/dfmpc.py
    "dfmpc": {"rounder": "nearest", "cle": False, "absorb_bias": False, "bias_correction": True,
              "act_bits": "none"},
}


@dataclass(frozen=True)
class QuantConfig:
    """Everything `quantize` needs; the CLI converts its options into one of these."""

    method: str = "nearest"
    bits: int = 8
    high_bits: int | None = None  # LOW/HIGH mixed precision (DF-MPC)
    act_bits: int | None = 8
    per_channel: bool = True
    cle: bool | None = None  # None: the method's default
    absorb_bias: bool | None = None
    bias_correction: bool | None = None
    sigmas: float | None = None  # None: see bn_sigmas
    reduce_range: bool | str = "auto"  # see _reduce_range
    input_range: tuple[float, float] | None = None
    fmt: str = "qdq"
    quantize_outputs: bool = False  # Q/DQ on tensors that leave the graph (through Flatten, Reshape...) too
    calib: CalibSpec = field(default_factory=CalibSpec)  # activation ranges: BN statistics or samples
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def bn_sigmas(self) -> float:
        """Width of BN-statistics activation ranges, mean +- this many std.

        6 std keeps 8-bit grids clear of clipping; a 4-bit grid has too few levels for that much
        tail: measured with SQuant W4A4, 4 std gives ResNet-20 82.6 vs 78.0 and ResNet-56 79.9 vs
        69.7 (2000 test images), while 6-bit activations do not care (91.0 either way).
        """
        if self.sigmas is not None:
            return float(self.sigmas)
        return DEFAULT_SIGMAS if self.act_bits is None or self.act_bits >= 6 else LOW_BIT_SIGMAS

    def step(self, name: str) -> bool:
        value = getattr(self, name)
        return METHODS[self.method][name] if value is None else bool(value)


@dataclass
class QuantResult:
    model: Any  # onnx.ModelProto
    report: dict[str, Any]
    config: QuantConfig | None = None  # the settings it was made with (defaults resolved)


def _config_from(method: str, bits: int | str, act_bits: int | str | None, granularity: str,
                 **options: Any) -> QuantConfig:
    if method not in METHODS:
        raise OptionError(f"unknown method {method!r}; choose one of {', '.join(sorted(METHODS))}")
    try:
        low, high = parse_bits(bits)
        act = parse_act_bits(act_bits)
    except ValueError as exc:
        raise OptionError(str(exc)) from None
    if high is not None and method != "dfmpc":
        raise OptionError(f"--bits {bits}: LOW/HIGH mixed precision is for --method dfmpc; "
                          f"{method} takes a single width")
    if method == "dfmpc" and high is None:
        raise OptionError(f"--method dfmpc takes --bits LOW/HIGH (e.g. 2/6), got {bits}")
    if options.get("dfmpc") and method != "dfmpc":
        raise OptionError(f"DF-MPC options apply to --method dfmpc, not {method}")
    if method == "dfmpc":
        try:
            DFMPCPass(low, high, **(options.get("dfmpc") or {}))
        except (TypeError, ValueError) as exc:
            raise OptionError(f"DF-MPC options: {exc}") from None
    if options.get("squant_stages") and METHODS[method]["rounder"] != "squant":
        raise OptionError(f"--squant-stages applies to --method squant, not {method}")
    if options.get("squant_stages"):
        stages = tuple(options["squant_stages"])
        if stages[0] != "e" or not set(stages) <= {"e", "k", "c"}:
            raise OptionError(f"--squant-stages takes e, e,k, e,c or e,k,c; got {','.join(stages)}")
    granularity = granularity.removeprefix("per-")  # users type per-channel / per-tensor
    if granularity not in ("channel", "tensor"):
        raise OptionError(f"--granularity must be 'channel' or 'tensor', got {granularity!r}")
    if method == "dfmpc" and granularity == "tensor":  # its gains live in the low layers' per-channel scales
        raise OptionError("--method dfmpc quantizes per output channel: its compensation folds one gain per channel "
                          "into the low layers' scales; --granularity tensor is not supported")
    options = dict(options)
    options["calib"] = _calib_spec(options)
    known = {f for f in QuantConfig.__dataclass_fields__} - {"method", "bits", "high_bits", "act_bits",
                                                              "per_channel", "options"}
    direct = {k: v for k, v in options.items() if k in known}
    extra = {k: v for k, v in options.items() if k not in known}
    return QuantConfig(method=method, bits=low, high_bits=high, act_bits=act,
                       per_channel=granularity == "channel", options=extra, **direct)


# quantize_model options that describe the calibration (see passes/calib_ranges.CalibSpec)
_CALIB_OPTIONS = {"calib_range": "estimator", "calib_samples": "samples", "calib_percentile": "percentile",
                  "seed": "seed", "device": "device", "calib_batch_size": "batch_size", "mean": "mean",
                  "std": "std", "synth_options": "synth_options", "size": "size"}


def _calib_spec(options: dict[str, Any]) -> CalibSpec:
    """Pop the calibration options (calib, calib_range, ...) into a CalibSpec; mean/std also set
    input_range when it is not given."""
    calib = options.pop("calib", None)
    fields = {name: options.pop(key) for key, name in _CALIB_OPTIONS.items() if key in options}
    if isinstance(calib, CalibSpec):
        return calib
    if fields.get("std") is not None and np.any(np.asarray(fields["std"], np.float64) <= 0):
        raise OptionError(f"--std must be positive, got {fields['std']}")
    if options.get("input_range") is None and fields.get("mean") is not None:
        mean = np.ravel(np.asarray(fields["mean"], np.float64))
        std = np.ravel(np.asarray(fields.get("std", 1.0), np.float64))
        options["input_range"] = (float(np.min((0 - mean) / std)), float(np.max((1 - mean) / std)))
    return CalibSpec.parse(calib, **fields)


def _load(model_or_path: Any) -> tuple[Any, str]:
    if isinstance(model_or_path, (str, os.PathLike)):
        return graph_io.load_model(model_or_path), str(model_or_path)
    name = getattr(getattr(model_or_path, "graph", None), "name", "") or "model"
    return model_or_path, f"<in-memory ModelProto: graph {name!r}>"


def quantize_model(model_or_path: Any, *, method: str = "nearest", bits: int | str = 8,
                   act_bits: int | str | None = 8, granularity: str = "channel",
                   **options: Any) -> QuantResult:
    """Quantize an FP32 ONNX model without data; returns the QDQ model and a JSON-able report.

    Parameters
    ----------
    model_or_path : path to an .onnx file, or an onnx.ModelProto (not modified).
    method : "nearest" (round to nearest) and the methods registered in METHODS.
    bits : weight bit width 2..8, or "LOW/HIGH" for DF-MPC.
    act_bits : activation bit width 2..8, or None for float activations.
    granularity : "channel" (per output channel weights, default) or "tensor" ("per-channel", "per-tensor" too).
    options : cle, absorb_bias, bias_correction (bools overriding the method's defaults),
        sigmas (BN range width, default 6, or 4 for activations below 6 bits), input_range ((lo, hi) of
        the network input), fmt ("qdq", "qdq-packed" or "fakequant"), quantize_outputs (Q/DQ on
        tensors that leave the graph too; default False); statistics and calibration: calib ("auto"
        default: "bn" when most layers kept BN, else "prior"; "bn", "prior[:pink|mixed|dead_leaves]",
        "synth:METHOD" or "data:PATH.npz"), calib_range ("mse", "percentile", "minmax"), calib_samples,
        calib_percentile, seed, device, synth_options (dict for the generator), mean/std (the model's
        preprocessing, 0-1 scale: the input range, the prior's input space, raw uint8 data files),
        size ((H, W) for a dynamic image size), calib_progress (callable(step, total, bn_loss) while
        samples are generated).
    """
    calib_progress = options.pop("calib_progress", None)  # (step, total, BN loss) while generating samples
    config = _config_from(method, bits, act_bits, granularity, **options)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    model, source = _load(model_or_path)
    model = graph_io.prepare_model(model)
    ws = Workspace(graph=surgery.import_graph(model), input_range=config.input_range)
    graph_layers.ensure_node_names(ws.graph)
    timings["load"] = time.perf_counter() - start

    unhandled = patterns.unhandled_ops(ws.graph)
    if unhandled:
        ws.warnings.append("ops onnxdfq does not model run in float between the quantized layers: "
                           + ", ".join(f"{op} (x{count})" for op, count in sorted(unhandled.items())))
    FoldBatchNormPass()(ws)
    folded_layers = graph_layers.read_layers(ws.graph)
    ranges_folded = _channel_ranges(folded_layers)
    bn_layers = layer_stat_counts(ws, folded_layers).get("bn", 0)
    calib = config.calib.resolved(_statistics_source(config, bn_layers, len(folded_layers)))
    observer = _measure_statistics(model, ws, folded_layers, bn_layers, calib, config, calib_progress)
    if config.step("cle"):
        CrossLayerEqualizationPass(act_sigmas=config.bn_sigmas)(ws)
    if config.step("absorb_bias"):
        BiasAbsorptionPass()(ws)
    layers = graph_layers.read_layers(ws.graph)
    ws.weight_ranges = {"folded": ranges_folded, "final": _channel_ranges(layers)}
    if not layers:
        raise UnsupportedModelError("no quantizable layer (Conv, ConvTranspose, Gemm, MatMul with a "
                                    "constant weight) in the model")

    if config.act_bits is not None:
        _activation_ranges(model, ws, layers, calib, observer, config, calib_progress)
    bitmap, low_layers = BitWidthMap(config.bits), set()
    if config.method == "dfmpc":  # low layers quantized and compensated here, the rest at the high width
        dfmpc = DFMPCPass(config.bits, config.high_bits, **config.options.get("dfmpc", {}))
        dfmpc(ws)
        bitmap, low_layers = dfmpc.plan.bitmap(), dfmpc.plan.low_layers
    bitmap = _reduce_range(bitmap, layers, ws, config)
    rounder_name = METHODS[config.method]["rounder"]
    rounder = get_rounder(rounder_name, stages=config.options.get("squant_stages"))
    WeightQuantPass(bitmap, per_channel=config.per_channel, method=rounder_name, rounder=rounder,
                    skip=low_layers)(ws)
    if config.step("bias_correction"):
        AnalyticBiasCorrectionPass()(ws)
    emitted, emit_report = qdq.emit_model(ws, model, config.act_bits, config.fmt)
    ws.reports.append(emit_report)
    timings["total"] = time.perf_counter() - start
    for pass_report in ws.reports:
        timings[pass_report.name] = pass_report.seconds
    report = _build_report(ws, config, source, timings)
    report["statistics"] = _statistics_summary(ws, folded_layers, bn_layers, calib, observer)
    report["layer_inputs"] = _layer_input_coverage(ws, layers, config)
    return QuantResult(emitted, report, config)


# how to keep BatchNormalization in an export, for the message printed when a model has none
EXPORT_WITH_BN_HINT = ("this model has no BatchNormalization left (folded at export); its statistics come from "
                       "prior images. To give onnxdfq the real ones, export with BN kept: torch.onnx.export(..., "
                       "do_constant_folding=False) (TorchScript) or torch.onnx.export(..., dynamo=True, "
                       "optimize=False), and skip onnxruntime/onnxsim pre-optimization")


def _measure_statistics(model: Any, ws: Workspace, layers: list, bn_layers: int, calib: CalibSpec,
                        config: QuantConfig, progress: Any) -> SampleObserver | None:
    """The samples of a prior / synth / data run; layers without BN get their statistics measured on them."""
    if calib.source not in SAMPLE_SOURCES or not _needs_statistics(config):
        return None
    observer = _sample_observer(model, calib, config, progress)
    if calib.source == "prior" or bn_layers * 2 < len(layers):
        # with no graph change ahead, the activation tensors to calibrate are observed in the same run
        graph_stays = not (config.step("cle") or config.step("absorb_bias")) and config.act_bits is not None
        prefetch = patterns.activation_tensors(ws.graph, layers, {layer.name for layer in layers},
                                               quantize_outputs=config.quantize_outputs) if graph_stays else []
        MeasureChannelStatsPass(observer, "prior" if calib.source == "prior" else "samples", prefetch=prefetch,
                                histogram=bool(prefetch) and calib.range_estimator().needs_histogram)(ws)
    return observer


def _activation_ranges(model: Any, ws: Workspace, layers: list, calib: CalibSpec, observer: SampleObserver | None,
                       config: QuantConfig, progress: Any) -> None:
    """A range for every tensor that gets a Q/DQ: statistics first, samples where there are some, and the
    prior for whatever neither reaches (after SiLU, GELU, LayerNorm, gates...)."""
    tensors = patterns.activation_tensors(ws.graph, layers, {layer.name for layer in layers},
                                          quantize_outputs=config.quantize_outputs)
    BNRangePass(tensors, sigmas=config.bn_sigmas)(ws)
    if observer is not None:  # samples run through the float graph as it stands now (folded, after CLE)
        CalibrationRangePass(tensors, observer, calib, config.act_bits)(ws)
    missing = [name for name in tensors if name not in ws.act_ranges]
    if missing:
        if calib.source == "prior" and observer is not None:
            prior, fallback = calib, observer
        else:
            prior = calib.resolved("prior")
            fallback = _sample_observer(model, prior, config, progress)
        CalibrationRangePass(missing, fallback, prior, config.act_bits)(ws)
    share_min_ranges(ws)  # Relu -> Min(per-channel bound) from CLE / absorption: one range


def _sample_observer(model: Any, calib: CalibSpec, config: QuantConfig, progress: Any) -> SampleObserver:
    """Calibration samples for ``calib`` (prior images, synthetic or user data) and their runner."""
    from onnxdfq.eval.calibrate import calibration_samples, collect_statistics

    samples, info = calibration_samples(model, calib, progress, input_range=config.input_range)
    return SampleObserver(samples, collect_statistics, model, info)


def _layer_input_coverage(ws: Workspace, layers: list, config: QuantConfig) -> dict:
    """How many quantized layers read a quantized input (what makes an int8 kernel possible), and why not."""
    unquantized = {}
    for layer in layers:
        if config.act_bits is None:
            unquantized[layer.name] = "float activations asked for"
        elif layer.input_name not in ws.act_ranges:
            unquantized[layer.name] = "no range for its input"
    return {"quantized": len(layers) - len(unquantized), "total": len(layers), "float": unquantized}


def _needs_statistics(config: QuantConfig) -> bool:
    """Whether any step reads per-channel statistics (ranges, CLE's floor, absorption, bias correction, DF-MPC)."""
    return (config.act_bits is not None or config.method == "dfmpc"
            or any(config.step(name) for name in ("cle", "absorb_bias", "bias_correction")))


def _statistics_source(config: QuantConfig, with_bn: int, layer_count: int) -> str:
    """Resolve --calib auto (bn when at least half the layers kept BN, else prior); refuse what cannot work."""
    source = config.calib.source
    if source == "auto":
        return "bn" if with_bn and with_bn * 2 >= layer_count else "prior"
    if source == "bn" and not with_bn and _needs_statistics(config):
        raise UnsupportedModelError("--calib bn: the model has no BatchNormalization (folded at export), so there "
                                    "are no BN statistics to read; use --calib prior (the default for such models) "
                                    "or data:PATH.npz")
    if source == "synth" and not with_bn:
        raise UnsupportedModelError(f"--calib synth:{config.calib.method} matches BN statistics, and the model has no "
                                    "BatchNormalization (folded at export); use --calib prior or data:PATH.npz")
    return source


def _statistics_summary(ws: Workspace, layers: list, bn_layers: int, calib: CalibSpec,
                        observer: SampleObserver | None) -> dict:
    """Where each layer's statistics came from, how many layers kept BN, and the samples used."""
    summary: dict[str, Any] = {"source": calib.label, "layers": len(layers),
                               "bn_layers": bn_layers,
                               "layer_sources": layer_stat_counts(ws, layers)}
    if observer is not None:
        summary.update({"samples": int(len(observer.samples)), "model_runs": observer.runs, **observer.info})
    if not summary["bn_layers"]:
        summary["hint"] = EXPORT_WITH_BN_HINT
    return summary


def _channel_ranges(layers: list) -> dict[str, list[float]]:
    """max |w| per output channel of every layer: the spread CLE is there to shrink (for the report)."""
    return {layer.name: np.abs(layer.weight.reshape(layer.weight.shape[0], -1)).max(axis=1).astype(float).tolist()
            for layer in layers if layer.weight.size}


def _reduce_range(bitmap: BitWidthMap, layers: list, ws: Workspace, config: QuantConfig) -> BitWidthMap:
    """7-bit weights for layers whose 8-bit input is signed (config.reduce_range = "auto").

    onnxruntime's x86 kernels without VNNI shift int8 activations to uint8 and add pairs of
    uint8 x int8 products in int16 (vpmaddubsw), which saturates for large |w|: measured on
    ResNet-20 W8A8, the stem conv alone costs 0.9 top-1. |w_int| <= 63 cannot saturate.
    ReLU outputs (uint8, zero point 0) are small and keep the full 8-bit weight grid.
    """
    mode = config.reduce_range
    if mode is False or config.act_bits != 8:
        return bitmap
    updates = {}
    for layer in layers:
        if bitmap.bits_for(layer.name, layer.op_type) != 8:
            continue
        act_range = ws.act_ranges.get(layer.input_name)
        if mode is True or (act_range is not None and act_range.lo < 0):
            updates[layer.name] = 7
    ws.reduced_range = sorted(updates)
    return bitmap.with_names(updates) if updates else bitmap


def quantize(model_or_path: Any, *, method: str = "nearest", bits: int | str = 8,
             act_bits: int | str | None = 8, granularity: str = "channel", **options: Any):
    """Like `quantize_model`, returning only the onnx.ModelProto."""
    return quantize_model(model_or_path, method=method, bits=bits, act_bits=act_bits,
                          granularity=granularity, **options).model


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return str(value)
    return value


def _build_report(ws: Workspace, config: QuantConfig, source: str, timings: dict[str, float]) -> dict:
    layers: dict[str, dict[str, Any]] = {}
    for name, quant in ws.weight_quant.items():
        layers[name] = {"bits": quant.bits, "per_channel": quant.per_channel, "method": quant.method,
                        "scales": quant.scale.astype(float).tolist(),
                        "bn_stats": name in ws.channel_stats}
    for pass_report in ws.reports:
        for row in pass_report.rows:
            if row.layer in layers:
                layers[row.layer].update({k: v for k, v in row.values.items() if k not in ("bits",)})
    activations = {name: {"lo": r.lo, "hi": r.hi, "source": r.source} for name, r in ws.act_ranges.items()}
    sources: dict[str, int] = {}
    for item in activations.values():
        sources[item["source"]] = sources.get(item["source"], 0) + 1
    weight_bits = [q.bits * q.w_int.size for q in ws.weight_quant.values()]
    weight_count = sum(q.w_int.size for q in ws.weight_quant.values())
    return _jsonable({
        "model": source,
        "config": {k: v for k, v in asdict(config).items()},
        "layers": layers,
        "activations": activations,
        "activation_sources": sources,
        "calibration": next((r.params for r in ws.reports if r.name == CalibrationRangePass.name),
                            {"source": "bn", "sigmas": config.bn_sigmas} if config.act_bits is not None else {}),
        "reduced_range_layers": ws.reduced_range,
        "weight_ranges": ws.weight_ranges,
        "average_weight_bits": (sum(weight_bits) / weight_count) if weight_count else None,
        "passes": [r.to_json() for r in ws.reports],
        "warnings": ws.warnings + [w for r in ws.reports for w in r.warnings],
        "timings_s": {k: round(v, 6) for k, v in timings.items()},
    })
