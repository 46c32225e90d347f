"""The quantization pipeline as data: `build_passes(config)` lists the passes in the order they run.

    fold BN -> statistics (BN, or measured on prior images / samples when layers have none)
    -> [CLE] -> [high-bias absorption] -> [activation ranges -> activation grids]
    -> [DF-MPC: low layers quantized and compensated] -> weights (nearest | SQuant) -> [bias-safe weight scales]
    -> [bias correction] -> [int32 biases] -> emit (writes only) -> check (checker, onnxruntime, fidelity)

`quantize_model` is the Python API behind `onnxdfq quantize`; `save_quantized` writes its result atomically.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from onnxdfq.config import (
    AUTO_ACT_WIDTHS,
    BN_FREE_SYNTH_METHODS,
    METHODS,
    SAMPLE_SOURCES,
    CalibSpec,
    QuantConfig,
    default_method,
    make_config,
    torch_available,
)
from onnxdfq.errors import FidelityError, OptionError, UnsupportedModelError
from onnxdfq.graph import io as graph_io
from onnxdfq.graph import layers as graph_layers
from onnxdfq.graph import patterns, surgery
from onnxdfq.passes.act_ranges import BNRangePass
from onnxdfq.passes.base import LayerRow, Pass, PassReport, Workspace
from onnxdfq.passes.bias_absorption import BiasAbsorptionPass
from onnxdfq.passes.bias_correction import AnalyticBiasCorrectionPass
from onnxdfq.passes.calib_ranges import CalibrationRangePass, SampleObserver
from onnxdfq.passes.channel_stats import MeasureChannelStatsPass
from onnxdfq.passes.cle import CrossLayerEqualizationPass, share_min_ranges
from onnxdfq.passes.dfmpc import AllocatedPairsPass, DFMPCPass
from onnxdfq.passes.emit import EmitPass
from onnxdfq.passes.fold_bn import FoldBatchNormPass
from onnxdfq.passes.qparams import ActivationQParamsPass, BiasQParamsPass, BiasSafeWeightsPass
from onnxdfq.passes.statistics import layer_stat_counts
from onnxdfq.passes.weight_quant import WeightQuantPass
from onnxdfq.preprocessing import Preprocessing, from_metadata

__all__ = ["METHODS", "QuantConfig", "QuantResult", "build_passes", "make_config", "quantize", "quantize_model",
           "save_quantized"]

logger = logging.getLogger(__name__)


@dataclass
class QuantResult:
    model: Any  # onnx.ModelProto
    report: dict[str, Any]
    config: QuantConfig | None = None  # the settings it was made with (defaults resolved)


def build_passes(config: QuantConfig, template: Any, progress: Any = None, *, fp32_bytes: int | None = None,
                 size_overhead: float | None = None, sensitivity_cache: dict | None = None) -> list[Pass]:
    """The passes of one run, in order. ``template`` is the prepared FP32 ModelProto (samples run
    through it; the output keeps its metadata); ``progress(step, total, loss)`` follows sample generation.
    ``fp32_bytes`` (the user's file) and ``size_overhead`` (its non-weight bytes, None: estimated) size
    --size-budget; ``sensitivity_cache`` keeps --bits auto's measurements for a second run over the same model."""
    grids = config.act_bits is not None and config.fmt != "fakequant"
    # TensorRT's explicit quantization takes float biases (it folds them into its own kernels) and has no
    # int16-saturating x86 kernels to avoid: int32 biases and 7-bit weights are onnxruntime CPU's needs
    int_bias = grids and config.target == "ort"
    reduce_range = False if config.target == "trt" and config.reduce_range == "auto" else config.reduce_range
    passes: list[Pass] = [FoldBatchNormPass(), WeightRangesPass("folded"),
                          StatisticsStage(config, template, progress)]
    if config.first_last_bits is not None:
        passes.append(FirstLastWidthsPass(config))
    if config.step("cle"):
        passes.append(CrossLayerEqualizationPass(act_sigmas=config.bn_sigmas))
    if config.step("absorb_bias"):
        passes.append(BiasAbsorptionPass())
    passes.append(WeightRangesPass("final"))
    if config.auto_bits:
        passes.append(BitAllocationStage(config, template, progress, fp32_bytes=fp32_bytes, overhead=size_overhead,
                                         cache=sensitivity_cache))
    if config.act_bits is not None:
        passes.append(ActWidthAllocationStage(config, template, progress) if config.avg_act_bits is not None
                      else ActivationRangeStage(config, template, progress))
    if grids:
        passes.append(ActivationQParamsPass(config.act_bits, config.target))
    if config.reconstruct:
        passes.append(SnapshotFloatPass(template))
    if config.method == "dfmpc":
        try:
            passes.append(DFMPCPass(config.bits, config.high_bits, config.dfmpc))
        except ValueError as exc:
            raise OptionError(f"DF-MPC options: {exc}") from None
    elif config.auto_bits and config.dfmpc_pairs:
        passes.append(AllocatedPairsPass(config.dfmpc))
    if config.rounder == "gptq":
        passes.append(HessianStage(config, template, progress))
    passes.append(WeightQuantPass(config.bits, per_channel=config.per_channel, method=config.rounder,
                                  stages=config.squant.stages, reduce_range=reduce_range,
                                  act_bits=config.act_bits))
    if int_bias:
        passes.append(BiasSafeWeightsPass())
    if config.step("bias_correction"):
        passes.append(AnalyticBiasCorrectionPass())
    if config.reconstruct:
        passes.append(ReconstructStage(config, template, progress))
    if int_bias:
        passes.append(BiasQParamsPass())
    # a size budget counts 2-bit weights at 2 bits: they are stored in INT2 (run unfused, see graph/packing.py)
    passes.append(EmitPass(template, config.fmt, int2=config.size_budget is not None))
    return passes


class WeightRangesPass(Pass):
    """Record max |w| per output channel of every layer (the spread CLE is there to shrink) for the report."""

    changes_graph = False

    def __init__(self, stage: str) -> None:
        self.stage = stage
        self.name = f"weight_ranges_{stage}"

    def call(self, ws: Workspace) -> PassReport:
        ws.weight_ranges[self.stage] = {
            layer.name: np.abs(layer.weight.reshape(layer.weight.shape[0], -1)).max(axis=1).astype(float).tolist()
            for layer in graph_layers.read_layers(ws.graph) if layer.weight.size}
        return PassReport(self.name)


class StatisticsStage(Pass):
    """Decide where statistics come from (--calib auto: BN when at least half the layers kept it, else the
    prior) and measure them, on prior images or samples, for every layer without BN."""

    name = "statistics"
    changes_graph = False

    def __init__(self, config: QuantConfig, template: Any, progress: Any = None) -> None:
        self.config, self.template, self.progress = config, template, progress

    def call(self, ws: Workspace) -> PassReport:
        config = self.config
        layers = graph_layers.read_layers(ws.graph)
        if not layers:
            raise UnsupportedModelError("no quantizable layer (Conv, ConvTranspose, Gemm, MatMul with a "
                                        "constant weight) in the model")
        ws.bn_layers = layer_stat_counts(ws, layers).get("bn", 0)
        ws.calib = config.calib.resolved(_statistics_source(config, ws.bn_layers, len(layers)))
        ws.range_sigmas = config.range_sigmas(ws.calib.source)
        report = PassReport(self.name, params={"source": ws.calib.label, "bn_layers": ws.bn_layers,
                                               "layers": len(layers)})
        if ws.calib.source not in SAMPLE_SOURCES or not _needs_statistics(config):
            return report
        ws.observer = _sample_observer(self.template, ws.calib, config, self.progress)
        if ws.calib.source == "synth" and (config.reconstruct or config.rounder == "gptq"):
            from onnxdfq.eval.calibrate import input_shape

            spec = reconstruction_calib(config, ws.calib, input_shape(self.template, ws.calib.size))
            if spec.samples == ws.observer.count:  # the same generator run (same seed): learn on these samples
                ws.learn_samples = (spec, ws.observer.samples, dict(ws.observer.info))
        if ws.calib.source == "prior" or ws.bn_layers * 2 < len(layers):
            # with no graph change ahead, the activation tensors to calibrate are observed in the same run
            # with no graph change ahead, sample ranges are observed in the same run; prior images give
            # statistics only (ranges then come from them, as from BN), so they need nothing more
            graph_stays = not (config.step("cle") or config.step("absorb_bias")) and config.act_bits is not None
            prefetch = patterns.activation_tensors(ws.graph, layers, {layer.name for layer in layers},
                                                   quantize_outputs=config.quantize_outputs) \
                if graph_stays and not config.prior_statistics_ranges(ws.calib.source) else []
            MeasureChannelStatsPass(ws.observer, "prior" if ws.calib.source == "prior" else "samples",
                                    prefetch=prefetch,
                                    histogram=bool(prefetch) and ws.calib.range_estimator().needs_histogram)(ws)
        return report


class ActivationRangeStage(Pass):
    """A range for every tensor that gets a Q/DQ: statistics first, samples where there are some, and the
    prior for whatever neither reaches (after SiLU, GELU, LayerNorm, gates...)."""

    name = "activation_ranges"
    changes_graph = False

    def __init__(self, config: QuantConfig, template: Any, progress: Any = None, *, release: bool = True) -> None:
        self.config, self.template, self.progress = config, template, progress
        self.release = release  # False: another range pass follows on the same samples (--avg-act-bits)

    def call(self, ws: Workspace) -> PassReport:
        config, calib = self.config, ws.calib
        layers = graph_layers.read_layers(ws.graph)
        tensors = patterns.activation_tensors(ws.graph, layers, {layer.name for layer in layers},
                                              quantize_outputs=config.quantize_outputs)
        BNRangePass(tensors, sigmas=config.range_sigmas(calib.source))(ws)
        # samples (synthetic or real data) calibrate every range on the float graph as it stands now (folded,
        # after CLE); prior images do not look like data, so for 6-bit grids and up their per-channel statistics
        # feed the engine instead, like BN's, and only the tensors it cannot describe are calibrated on them
        # (below). MSE clipping on the images themselves made EfficientNet-Lite0's linear bottlenecks and
        # residual sums 0.4x as wide as the BN ranges and clipped real activations (W8A8 80.4 vs 81.7 %)
        if ws.observer is not None and not config.prior_statistics_ranges(calib.source):
            CalibrationRangePass(tensors, ws.observer, calib, config.act_bits)(ws)
        missing = [name for name in tensors if name not in ws.act_ranges]
        if missing:
            if calib.source == "prior" and ws.observer is not None:
                prior, fallback = calib, ws.observer
            else:
                prior = calib.resolved("prior")
                fallback = _sample_observer(self.template, prior, config, self.progress)
            if config.prior_statistics_ranges(prior.source):  # a few tensors (after GELU, LayerNorm...) only
                fallback = fallback.subset(FALLBACK_IMAGES)
            CalibrationRangePass(missing, fallback, prior, config.act_bits)(ws)
        shared = share_min_ranges(ws)  # Relu -> Min(per-channel bound) from CLE / absorption: one range
        if ws.observer is not None and self.release:  # no pass reads the samples after this one
            ws.observer.release()
        return PassReport(self.name, params={"tensors": len(tensors), "prior_fallback": len(missing),
                                             "shared_min_ranges": len(shared)})


class FirstLastWidthsPass(Pass):
    """--first-last-bits N: the first layer's weights and input, and the last layer's weights and input, at N bits
    (the protocol the low-bit literature reports: those two layers are small and the most sensitive)."""

    name = "first_last_widths"
    changes_graph = False

    def __init__(self, config: QuantConfig) -> None:
        self.config = config

    def call(self, ws: Workspace) -> PassReport:
        from onnxdfq.quant.scheme import BitWidthMap

        bits = int(self.config.first_last_bits)
        layers = graph_layers.read_layers(ws.graph)
        ends = [layers[0], layers[-1]] if len(layers) > 1 else layers[:1]
        ws.bit_widths = (ws.bit_widths or BitWidthMap(self.config.bits)).with_names({x.name: bits for x in ends})
        if self.config.act_bits is not None:
            ws.act_widths.update({x.input_name: bits for x in ends})
        return PassReport(self.name, params={"bits": bits, "layers": [x.name for x in ends]},
                          modified=True)


# samples the sensitivity of each (layer, width) is measured on: one forward pass each (MobileNet-V1 at 224 px,
# 28 layers x 6 widths x 32 images); below 128 px more, they are cheap
SENSITIVITY_SAMPLES = 64
LARGE_SENSITIVITY_SAMPLES = 32


class BitAllocationStage(Pass):
    """--bits auto: measure every layer's sensitivity at every candidate width on calibration samples (prior
    images, or the run's own samples), then choose the widths under the budget (passes/bit_allocation.py)."""

    name = "bit_allocation_samples"
    changes_graph = False

    def __init__(self, config: QuantConfig, template: Any, progress: Any = None, *, fp32_bytes: int | None = None,
                 overhead: float | None = None, cache: dict | None = None) -> None:
        self.config, self.template, self.progress = config, template, progress
        self.fp32_bytes, self.overhead = fp32_bytes, overhead
        self.cache = {} if cache is None else cache

    def call(self, ws: Workspace) -> PassReport:
        from onnxdfq.passes.bit_allocation import BitAllocationPass
        from onnxdfq.passes.weight_quant import get_rounder

        config = self.config
        layers = graph_layers.read_layers(ws.graph)
        budget = allocation_budget(config, self.fp32_bytes or self.template.ByteSize(), layers, self.overhead)
        rounder = get_rounder(config.rounder, stages=config.squant.stages)
        measure = runner = None
        if config.sensitivity == "measured" and "noise" not in self.cache:
            measure, runner, self.cache["info"] = self._measurer(ws, layers)
        step = BitAllocationPass(budget, rounder, widths=config.auto_widths, per_channel=config.per_channel,
                                 # a correction from BN statistics is independent of the samples and is measured;
                                 # one from the prior's (or samples') statistics is circular on them: left out
                                 bias_correction=config.step("bias_correction") and ws.calib.source == "bn",
                                 measure=measure,
                                 progress=getattr(self.progress, "allocation", None), cache=self.cache,
                                 sensitivity=config.sensitivity,
                                 pairs=AllocatedPairsPass(config.dfmpc) if config.dfmpc_pairs else None)
        step(ws)
        if runner is not None:
            self.cache["info"]["runs"] = runner.runs
        return PassReport(self.name, params={"sensitivity": config.sensitivity, **self.cache.get("info", {})})

    def _measurer(self, ws: Workspace, layers: list) -> tuple[Any, Any, dict[str, Any]]:
        """The measure callable the pass takes, the runner behind it (its forward-pass count) and what it ran on."""
        from onnxdfq.eval.sensitivity import OutputSensitivity

        samples, label = sensitivity_samples(ws, self.config, self.template, self.progress)
        model, names, defaults = surgery.model_with_weight_inputs(ws.graph, layers, self.template)
        runner = OutputSensitivity(model, defaults, samples)

        def measure(swaps: list) -> float:
            feeds = {}
            for layer, candidate in swaps:
                weight_name, bias_name = names[layer.name]
                feeds[weight_name] = graph_layers.stored_weight(layer, candidate.weight)
                if bias_name is not None and candidate.bias is not None:
                    feeds[bias_name] = candidate.bias
            return runner.noise(feeds)

        return measure, runner, {"samples": int(len(samples)), "source": label}


def sensitivity_samples(ws: Workspace, config: QuantConfig, template: Any, progress: Any = None
                        ) -> tuple[np.ndarray, str]:
    """The samples sensitivities are measured on (the run's own samples, else prior images) and their label."""
    from onnxdfq.eval.calibrate import calibration_samples, input_shape

    shape = input_shape(template, ws.calib.size)
    count = LARGE_SENSITIVITY_SAMPLES if len(shape) == 3 and min(shape[1:]) >= 128 else SENSITIVITY_SAMPLES
    if ws.observer is not None and ws.observer.samples is not None:
        return ws.observer.subset(count).samples, ws.calib.label
    if "sensitivity_samples" in ws.cache:  # --bits auto and --avg-act-bits measure on the same images
        return ws.cache["sensitivity_samples"]
    spec = ws.calib if ws.calib.source in SAMPLE_SOURCES else ws.calib.resolved("prior")
    spec = replace(spec, samples=min(spec.samples or count, count))
    samples, _ = calibration_samples(template, spec, progress, input_range=config.input_range)
    ws.cache["sensitivity_samples"] = (samples, spec.label)
    return samples, spec.label


class ActWidthAllocationStage(Pass):
    """--avg-act-bits: the activation ranges at every candidate width (as uniform runs at those widths would take
    them), then each activation's sensitivity at each width measured on calibration samples, and the widths chosen
    under the budget (passes/act_allocation.py). Takes ActivationRangeStage's place."""

    name = "act_width_allocation_samples"
    changes_graph = False

    def __init__(self, config: QuantConfig, template: Any, progress: Any = None) -> None:
        self.config, self.template, self.progress = config, template, progress

    def call(self, ws: Workspace) -> PassReport:
        from onnxdfq.eval.sensitivity import OutputSensitivity, per_sample_elements
        from onnxdfq.passes.act_allocation import ActWidthAllocationPass

        config = self.config
        widths = tuple(sorted({*AUTO_ACT_WIDTHS, config.act_bits}))
        ranges = {}
        for bits in widths[:-1]:  # the narrower grids' own ranges (MSE clipping or sigmas at that width)
            ActivationRangeStage(replace(config, act_bits=bits), self.template, self.progress, release=False)(ws)
            ranges[bits], ws.act_ranges = dict(ws.act_ranges), {}
        ActivationRangeStage(config, self.template, self.progress, release=False)(ws)
        tensors = list(ws.act_ranges)
        samples, label = sensitivity_samples(ws, config, self.template, self.progress)
        model, names, defaults = surgery.model_with_act_switches(ws.graph, tensors, self.template)
        runner = OutputSensitivity(model, defaults, samples)
        elements = per_sample_elements(surgery.model_with_outputs(ws.graph, tensors, self.template), tensors, samples)

        def measure(tensor: str, grid: Any) -> float:
            lo, hi = grid.own_levels()
            gate, scale, zero, low, high = names[tensor]
            return runner.noise({gate: np.array(1.0, np.float32), scale: np.array(grid.scale, np.float32),
                                 zero: np.array(grid.zero_point, np.float32),
                                 low: np.array(lo, np.float32), high: np.array(hi, np.float32)})

        ActWidthAllocationPass(config.avg_act_bits, widths, ranges, elements, measure, target=config.target,
                               progress=getattr(self.progress, "allocation", None))(ws)
        if ws.observer is not None:
            ws.observer.release()
        return PassReport(self.name, params={"samples": int(len(samples)), "source": label, "runs": runner.runs})


def allocation_budget(config: QuantConfig, fp32_bytes: int, layers: list, overhead: float | None = None) -> Any:
    """The --bits auto budget. A size budget counts the packed file: ``overhead`` bytes of it are not weights
    (None: estimated from the FP32 file and the QDQ nodes each layer and activation brings)."""
    from onnxdfq.passes.bit_allocation import Budget

    if config.avg_bits is not None:
        return Budget(avg_bits=config.avg_bits)
    fp32 = float(fp32_bytes)
    if overhead is None:
        weights = sum(4.0 * layer.weight.size for layer in layers)
        channels = sum(layer.out_channels for layer in layers)
        # deliberately generous (per output channel a weight scale, an int32 bias and its scale, ~13 B; per layer
        # its DequantizeLinear nodes, ~900 B; per activation grid a Q/DQ pair, ~800 B): the first plan fits, and
        # quantize_model plans again with the written file's exact overhead
        acts = len(layers) if config.act_bits is not None else 0
        overhead = max(fp32 - weights, 0.0) + 13.0 * channels + 900.0 * len(layers) + 800.0 * acts
    return Budget(size_bytes=config.size_budget * fp32, overhead_bytes=overhead, packed=True, int2=True)


class SnapshotFloatPass(Pass):
    """Keep the float graph as it stands before any weight is quantized (folded, equalized: the FP32 function),
    for block reconstruction's targets."""

    name = "snapshot_float"
    changes_graph = False

    def __init__(self, template: Any) -> None:
        self.template = template

    def call(self, ws: Workspace) -> PassReport:
        ws.float_model = surgery.export_model(ws.graph, self.template)
        return PassReport(self.name)


def learning_samples(ws: Workspace, config: QuantConfig, template: Any, progress: Any = None
                     ) -> tuple[np.ndarray, dict, Any]:
    """The samples the learning stages share (GPTQ's Hessians, --reconstruct), generated once per run: the run's own
    samples (data, synth, prior), DFFG for a model whose statistics came from BN (see reconstruction_calib)."""
    from onnxdfq.eval.calibrate import calibration_samples, input_shape

    spec = reconstruction_calib(config, ws.calib, input_shape(template, ws.calib.size),
                                invert=_inversion_by_default(config, ws.calib, template))
    if ws.learn_samples is not None and ws.learn_samples[0] == spec:
        return ws.learn_samples[1], ws.learn_samples[2], spec
    try:
        samples, info = calibration_samples(template, spec, progress, input_range=config.input_range)
    except UnsupportedModelError as exc:
        who = "--reconstruct" if config.rounder != "gptq" else "--method gptq"
        raise UnsupportedModelError(f"{who} learns on {spec.label} samples: {exc}; or give samples with --calib "
                                    "data:PATH.npz") from None
    ws.learn_samples = (spec, samples, info)
    return samples, info, spec


class HessianStage(Pass):
    """--method gptq: every layer's input Hessian (sum x x^T over its input rows) on generated samples, run through
    the float graph as it stands (folded, equalized), for WeightQuantPass's GPTQ rounding (passes/gptq.py)."""

    name = "hessians"
    changes_graph = False

    def __init__(self, config: QuantConfig, template: Any, progress: Any = None) -> None:
        self.config, self.template, self.progress = config, template, progress

    def call(self, ws: Workspace) -> PassReport:
        from onnxdfq.eval.calibrate import stream_tensors
        from onnxdfq.passes.gptq import HessianAccumulator, LayerGeometry

        samples, info, spec = learning_samples(ws, self.config, self.template, self.progress)
        layers, skipped = {}, []
        for layer in graph_layers.read_layers(ws.graph):
            if layer.name in ws.weight_quant:  # DF-MPC's low layers hold their integers already
                continue
            geometry = LayerGeometry(layer.op_type, tuple(layer.weight.shape[2:]), layer.group, dict(layer.node.attrs))
            transposed_input = layer.op_type == "Gemm" and layer.node.attrs.get("transA", 0)
            if geometry.supported and not transposed_input:
                layers[layer.name] = (layer.input_name, geometry)
            else:
                skipped.append(layer.name)
        start = time.perf_counter()
        tensors = sorted({tensor for tensor, _ in layers.values()})
        accumulators = {name: HessianAccumulator(geometry) for name, (_, geometry) in layers.items()}

        def accumulate(values: dict[str, np.ndarray]) -> None:
            for name, (tensor, _) in layers.items():
                accumulators[name].add(values[tensor])

        stream_tensors(surgery.model_with_outputs(ws.graph, tensors, self.template), tensors, samples, accumulate)
        # float32 until the rounding (which works in float64 one layer at a time)
        ws.hessians = {name: (acc.hessian, acc.rows) for name, acc in accumulators.items() if acc.hessian is not None}
        accumulators.clear()
        report = PassReport(self.name, params={"samples": int(len(samples)), "source": spec.label,
                                               "layers": len(ws.hessians), "seconds": round(time.perf_counter() -
                                                                                            start, 3),
                                               "sample_info": {k: v for k, v in info.items() if k != "groups"}})
        if skipped:
            report.warnings.append(f"no Hessian for {len(skipped)} layer(s) ({', '.join(skipped[:5])}): SQuant rounds "
                                   "them")
        if spec.source == "prior":
            report.warnings.append("--method gptq measured its Hessians on prior images (no BN statistics to generate "
                                   "samples from): on the BN-folded ResNet-20 W4A4 they gave 81.9-82.1 % against "
                                   "SQuant's 81.33, on MobileNet-V1 W4A8 65-68 against SQuant's 67.31 (68.7-70.5 on "
                                   "DFFG samples); check top-1, or give samples with --calib data: or synth:invert")
        return report


class ReconstructStage(Pass):
    """--reconstruct: learn each block's roundings and activation step sizes on calibration samples
    (onnxdfq.synth.reconstruct), then write them into the grids the emitter reads."""

    name = "reconstruct"
    changes_graph = False

    def __init__(self, config: QuantConfig, template: Any, progress: Any = None) -> None:
        self.config, self.template, self.progress = config, template, progress

    def call(self, ws: Workspace) -> PassReport:
        from onnxdfq.eval.calibrate import calibration_samples, input_shape
        from onnxdfq.quant.scheme import QuantScheme
        from onnxdfq.synth import reconstruct as rec

        config = self.config
        widths = [config.bits, config.act_bits or 8, config.first_last_bits or 8]
        # (reduce-range's 7-bit layers are 8-bit requests)
        if config.high_bits is None and not config.auto_bits and min(widths) >= 8:
            ws.skipped["reconstruct"] = ("every grid is 8-bit: nothing to gain (ResNet-20 W8A8 91.81 % without, "
                                         "91.66 with it)")
            return PassReport(self.name, params={"skipped": ws.skipped["reconstruct"]})
        spec = reconstruction_calib(config, ws.calib, input_shape(self.template, ws.calib.size))
        source_model = self.template
        pseudo_bn = spec.source == "prior" and config.pseudo_bn and ws.float_model is not None
        if pseudo_bn:
            # --pseudo-bn, BN folded away: DFFG matching the statistics the prior images measured on each conv (the
            # classifier's logits carry none, as in a model with BN). Measured against the prior images themselves:
            # BN-folded ResNet-20 W4A4 80.66 % vs 80.18 (81.33 without reconstruction); BN-folded MobileNet-V1 W4A8
            # (50 steps) 9.08 vs 53.38 (60.54 without), as DFFG misleads it at 224 px with BN too: off by default
            convs = {layer.name for layer in graph_layers.read_layers(ws.graph) if layer.op_type == "Conv"}
            source_model = surgery.model_with_pseudo_bn(ws.float_model, {
                name: (st.mean, st.std) for name, st in ws.channel_stats.items()
                if st.source == "prior" and name in convs})
            spec = replace(spec, source="synth", method="dffg")
        if pseudo_bn:
            samples, info = calibration_samples(source_model, spec, self.progress, input_range=config.input_range)
        else:
            samples, info, spec = learning_samples(ws, config, self.template, self.progress)
        weights = {}
        for layer in graph_layers.read_layers(ws.graph):
            quant = ws.weight_quant.get(layer.name)
            if quant is None:
                continue
            scheme = QuantScheme(quant.bits, signed=True, symmetric=True)
            weights[layer.name] = rec.WeightGrid(np.asarray(quant.scale, np.float64), np.asarray(quant.w_int),
                                                 scheme.qmin, scheme.qmax, swap_axes=layer.stored_out_axis == 1)
        acts = {}
        for name, grid in ws.act_qparams.items():
            scheme = QuantScheme(grid.bits, signed=grid.signed, symmetric=grid.dtype == "int8")
            acts[name] = rec.ActGrid(grid.scale, grid.zero_point, scheme.qmin, scheme.qmax)
        large = large_input(samples.shape[1:])
        steps = reconstruction_steps(config, samples.shape[1:], [grid.bits for grid in ws.act_qparams.values()])
        from onnxdfq.config import FISHER_DRAWS

        loss = reconstruction_loss(config)
        mix = reconstruction_input_mix(config, steps)
        compiled = reconstruction_compile(config, samples.shape[1:], steps, spec.device)
        options = rec.ReconstructOptions(steps=steps, device=spec.device, seed=spec.seed, input_mix=mix,
                                         compile=compiled,
                                         fisher_draws=FISHER_DRAWS if loss == "fisher" else 0,
                                         store_half=large and len(samples) > LARGE_RECONSTRUCT_SAMPLES)
        quant_model = surgery.export_model(ws.graph, self.template)
        result = rec.reconstruct(ws.float_model, quant_model, samples, weights, acts, options=options,
                                 progress=getattr(self.progress, "reconstruct", None))
        for name, ints in result.w_int.items():
            old = ws.weight_quant[name]
            ws.weight_quant[name] = replace(old, w_int=ints.astype(old.w_int.dtype if old.w_int.dtype.kind == "i"
                                                                   else np.int64))
        if result.biases:
            layers = {layer.name: layer for layer in graph_layers.read_layers(ws.graph)}
            for name, bias in result.biases.items():
                graph_layers.write_bias(layers[name], bias)
        for name, scale in result.act_scales.items():
            ws.act_qparams[name] = replace(ws.act_qparams[name], scale=float(scale))
        ws.float_model = None
        label = f"{spec.label} (pseudo-BN: prior statistics)" if source_model is not self.template else spec.label
        report = PassReport(self.name, params={"samples": result.samples, "source": label, "steps":
                                               steps, "loss": loss, "fisher_seconds": round(result.fisher_seconds, 3),
                                               "input_mix": mix, "compiled": result.compiled,
                                               "blocks": len(result.blocks),
                                               "sample_info": {k: v for k, v in info.items() if k != "groups"},
                                               "seconds": round(result.seconds, 3)}, modified=True)
        if spec.source == "synth" and info.get("input_bounds", "").startswith("unbounded"):
            report.warnings.append(f"--reconstruct learnt on {spec.label} samples not kept inside the input's range: "
                                   "no preprocessing is known, so pixels drift out of what images give and the "
                                   "input grid widens for them (ResNet-20 W4A4 86.75 % against 87.51 kept inside); "
                                   "give --mean/--std or --preprocess")
        if spec.source == "synth" and large:
            report.warnings.append(f"--reconstruct learnt on {spec.label} samples at {samples.shape[2]} px: from "
                                   "GPTQ's start it lifts MobileNet-V1 W4A8 to 73.77-75.31 % (67.31 without, val1300; "
                                   "72.85-73.00 at 500 steps a block) and EfficientNet-Lite0 W4A8 to 78.23-80.62, "
                                   "mean 79.67 over six runs (76.69 without), but one run against another moves "
                                   "top-1 by up to 2.4 points; check top-1 on real data, or "
                                   "give real images with --calib data:PATH.npz")
        if result.compile_error:
            report.warnings.append(f"--reconstruct-compile: torch.compile failed, so the steps ran eager (same "
                                   f"results, slower): {result.compile_error}")
        if spec.source == "prior":
            report.warnings.append("--reconstruct learnt on prior images: on the BN-folded ResNet-20 W4A4 that "
                                   "measured worse than no reconstruction (80.18 vs 81.33 %; 87.34-87.67 on samples "
                                   "from inverting the classifier, the default under 128 px); check top-1 on real "
                                   "data, or give samples like the real inputs with --calib data:PATH.npz or "
                                   "synth:invert")
        for block in result.blocks:
            report.rows.append(LayerRow(block.name, {"layers": block.layers, "activations": len(block.acts),
                                                     "mse_before": block.loss_before, "mse_after": block.loss_after,
                                                     "flipped": block.flipped, "seconds": round(block.seconds, 3)}))
        return report


# from this image side up reconstruction takes fewer samples by default: it holds each block's float and quantized
# inputs and its targets for every sample (MobileNet-V1's first block at 112 px: 0.3 MB a sample and tensor), in
# float16 when asked for more. 256 samples at W4A8 (--reconstruct-samples 256): MobileNet-V1 73.23 / 74.00 (seeds
# 0, 1; 4.0 GB peak in float32) and 74.08 (float16, 3.3 GB) against 72.85-73.00 at 128, but EfficientNet-Lite0
# 78.69 (4.6 GB) against 79.38, so 128 stays (all at 500 steps a block, before LARGE_RECONSTRUCT_STEPS)
LARGE_RECONSTRUCT_INPUT = 128
LARGE_RECONSTRUCT_SAMPLES = 128


def large_input(sample_shape: tuple[int, ...]) -> bool:
    """An image input (C, H, W) from LARGE_RECONSTRUCT_INPUT px on its shorter side."""
    return len(sample_shape) == 3 and min(sample_shape[1:]) >= LARGE_RECONSTRUCT_INPUT


def reconstruction_steps(config: QuantConfig, sample_shape: tuple[int, ...], act_bits: list[int]) -> int:
    """Optimiser steps a block: the user's, else LARGE_RECONSTRUCT_STEPS for images from LARGE_RECONSTRUCT_INPUT
    px whose activation grids are all 8-bit (see config.LARGE_RECONSTRUCT_STEPS), else DEFAULT_RECONSTRUCT_STEPS."""
    from onnxdfq.config import DEFAULT_RECONSTRUCT_STEPS, LARGE_RECONSTRUCT_STEPS

    if config.reconstruct_steps is not None:
        return config.reconstruct_steps
    fine = min(act_bits, default=8) >= 8
    return LARGE_RECONSTRUCT_STEPS if large_input(sample_shape) and fine else DEFAULT_RECONSTRUCT_STEPS


def reconstruction_input_mix(config: QuantConfig, steps: int) -> float:
    """QDrop's input mixing chance: the user's, else RECONSTRUCT_INPUT_MIX from MIXED_RECONSTRUCT_STEPS steps a block
    and 0 below (its random inputs need the steps: see config.RECONSTRUCT_INPUT_MIX)."""
    from onnxdfq.config import MIXED_RECONSTRUCT_STEPS, RECONSTRUCT_INPUT_MIX

    if config.reconstruct_input_mix is not None:
        return float(config.reconstruct_input_mix)
    return RECONSTRUCT_INPUT_MIX if steps >= MIXED_RECONSTRUCT_STEPS else 0.0


def reconstruction_compile(config: QuantConfig, sample_shape: tuple[int, ...], steps: int, device: str) -> bool:
    """Whether the learning steps run under torch.compile: the user's choice, else on the CPU for images from
    LARGE_RECONSTRUCT_INPUT px at COMPILED_RECONSTRUCT_STEPS steps a block or more, where the fused fake
    quantization repays the compiling (see config.COMPILED_RECONSTRUCT_STEPS); on CUDA only when asked."""
    from onnxdfq.config import COMPILED_RECONSTRUCT_STEPS

    if config.reconstruct_compile is not None:
        return bool(config.reconstruct_compile)
    return device == "cpu" and large_input(sample_shape) and steps >= COMPILED_RECONSTRUCT_STEPS


def reconstruction_loss(config: QuantConfig) -> str:
    """The loss a block learns on: the user's, else "mse" (see config.RECONSTRUCT_LOSSES for the measurements)."""
    return config.reconstruct_loss or "mse"


def reconstruction_calib(config: QuantConfig, calib: Any, input_shape: tuple[int, ...] = (), *,
                         invert: bool = False) -> Any:
    """The samples reconstruction learns on: the run's own samples (data, synth, prior), DFFG for a model whose
    statistics came from BN (its generator matches the BN statistics, no data; for inputs from LARGE_RECONSTRUCT_INPUT
    px with NATURAL_DFFG_OPTIONS, and LOW_ACT_SYNTH_STEPS a batch on the CPU under activations of LOW_ACT_BITS or
    fewer), and with ``invert``
    samples from inverting the classifier instead of the prior's images (see _inversion_by_default)."""
    from onnxdfq.config import DEFAULT_RECONSTRUCT_SAMPLES, LOW_ACT_BITS, LOW_ACT_SYNTH_STEPS, NATURAL_DFFG_OPTIONS

    count = config.reconstruct_samples or DEFAULT_RECONSTRUCT_SAMPLES
    large = large_input(input_shape)
    low_act = config.act_bits is not None and config.act_bits <= LOW_ACT_BITS
    if config.reconstruct_samples is None and large:
        count = LARGE_RECONSTRUCT_SAMPLES
    if calib.source == "data":
        return replace(calib, samples=config.reconstruct_samples or calib.samples)
    if calib.source == "prior" and invert:
        return replace(calib, source="synth", method="invert", samples=count)
    if calib.source in ("synth", "prior"):
        return replace(calib, samples=count)
    spec = replace(calib, source="synth", method="dffg", samples=count)
    if large:  # natural-looking samples (config.NATURAL_DFFG_OPTIONS); the user's own options win key by key
        spec = replace(spec, synth_options={**NATURAL_DFFG_OPTIONS, **spec.synth_options})
    # measured on 224-px models only: on ResNet-20 (32 px) 180 steps gave 88.25 / 88.42 against 88.16 / 88.37 at the
    # defaults, and at 128 samples and 100 steps a block 85.33 against 86.39-86.76
    if large and spec.device == "cpu" and "steps" not in spec.synth_options and low_act:
        spec = replace(spec, synth_options={**spec.synth_options, "steps": LOW_ACT_SYNTH_STEPS})
    return spec


# images that calibrate the tensors no statistics describe, when the prior's statistics give every other range:
# every such tensor is fetched from onnxruntime with a histogram pass (ConvNeXt-tiny, 113 of them at 224 px:
# 35 s on 128 images)
FALLBACK_IMAGES = 32


def _load(model_or_path: Any) -> tuple[Any, str]:
    if isinstance(model_or_path, (str, os.PathLike)):
        return graph_io.load_model(model_or_path), str(model_or_path)
    name = getattr(getattr(model_or_path, "graph", None), "name", "") or "model"
    return model_or_path, f"<in-memory ModelProto: graph {name!r}>"


def quantize_model(model_or_path: Any, *, method: str | None = None, bits: int | str | None = None,
                   act_bits: int | str | None = "auto", granularity: str | None = None,
                   config: QuantConfig | None = None, check: bool = True, calib_progress: Any = None,
                   **options: Any) -> QuantResult:
    """Quantize an FP32 ONNX model without data; returns the QDQ model and a JSON-able report.

    Parameters
    ----------
    model_or_path : path to an .onnx file, or an onnx.ModelProto (not modified).
    method : "squant" (default: SQuant rounding + bias correction), "nearest", "dfq", "dfmpc" or "gptq"
        (see onnxdfq.config.METHODS); with reconstruct=True below 8 bits the default is "gptq", the better start.
    bits : weight bit width 2..8 (default 8), or "LOW/HIGH" for DF-MPC.
    act_bits : activation bit width 2..8, None for float activations, "auto" for the method's default
        (8; float for dfmpc).
    granularity : "channel" (per output channel weights, default) or "tensor" ("per-channel", "per-tensor" too).
    config : a QuantConfig instead of the keywords above and the options (from `onnxdfq.config.make_config`);
        giving both is an OptionError, never a silent choice between them.
    check : run the output check (ONNX checker, an onnxruntime session, fidelity against the FP32
        model on prior images): report["fidelity"] and warnings; NaN/inf outputs raise.
    calib_progress : callable(step, total, bn_loss) while calibration samples are generated.
    options : cle, absorb_bias, bias_correction (bools overriding the method's defaults),
        sigmas (BN range width, default 6, or 4 for activations below 6 bits), input_range ((lo, hi) of
        the network input), fmt ("qdq", "qdq-packed" or "fakequant"), target ("ort" or "trt"),
        quantize_outputs (Q/DQ on tensors that leave the graph too; default False), squant_stages,
        dfmpc (dict of DF-MPC options); statistics and calibration: calib ("auto" default: "bn" when most
        layers kept BN, else "prior"; "bn", "prior[:pink|mixed|dead_leaves]", "synth:METHOD" or
        "data:PATH.npz"), calib_range ("mse", "percentile", "minmax"), calib_samples, calib_percentile,
        seed, device, calib_batch_size, synth_options (dict for the generator), mean/std (the model's
        preprocessing, 0-1 scale: the input range, the prior's input space, raw uint8 data files),
        size ((H, W) for a dynamic image size); block reconstruction: reconstruct, reconstruct_steps,
        reconstruct_samples, reconstruct_loss ("mse", the default, or "fisher"),
        reconstruct_input_mix (0..1; default 0.5 from 500 steps a block, else 0), reconstruct_compile (torch.compile
        the learning steps; default: on the CPU from 128 px and 500 steps a block), pseudo_bn, first_last_bits.
        An unknown option is an OptionError naming the valid ones.
    """
    if config is None:
        config = make_config(method or default_method(bits, bool(options.get("reconstruct"))),
                             8 if bits is None else bits, act_bits, granularity or "channel", **options)
    else:
        beside = [name for name, value in (("method", method), ("bits", bits), ("granularity", granularity))
                  if value is not None] + (["act_bits"] if act_bits != "auto" else []) + sorted(options)
        if beside:
            raise OptionError(f"quantize_model got config= and {', '.join(beside)}; the config already holds "
                              "every setting: put them in it (onnxdfq.config.make_config)")
    timings: dict[str, float] = {}
    start = time.perf_counter()
    model, source = _load(model_or_path)
    fp32_bytes = model.ByteSize()  # what --size-budget is a fraction of: the file as the user has it
    model = graph_io.prepare_model(model)
    preprocessing = _check_preprocessing(model, config)
    timings["load"] = time.perf_counter() - start
    overhead = None
    sensitivity_cache: dict[str, Any] = {}  # a second --size-budget attempt reuses the measured sensitivities
    for _attempt in range(SIZE_BUDGET_ATTEMPTS):
        ws = Workspace(graph=surgery.import_graph(model), input_range=config.input_range)
        graph_layers.ensure_node_names(ws.graph)
        unhandled = patterns.unhandled_ops(ws.graph)
        if unhandled:
            ws.warnings.append("ops onnxdfq does not model run in float between the quantized layers: "
                               + ", ".join(f"{op} (x{count})" for op, count in sorted(unhandled.items())))
        for step in build_passes(config, model, calib_progress, fp32_bytes=fp32_bytes, size_overhead=overhead,
                                 sensitivity_cache=sensitivity_cache):
            step(ws)
        if config.size_budget is None:
            break
        limit, size = config.size_budget * fp32_bytes, ws.emitted.ByteSize()
        if size <= limit and (overhead is not None or size >= limit * (1 - SIZE_BUDGET_SLACK)):
            break
        # what is not weights was estimated: plan again with this file's exact figure (the sensitivities are
        # kept), leaving room for the few bytes a different plan's INT2 guards add
        overhead = size - _weight_file_bytes(ws) + SIZE_BUDGET_MARGIN
        logger.info("--size-budget: %d B against %d B; allocating again with %d B of overhead", size, limit, overhead)
    else:
        raise OptionError(f"--size-budget {config.size_budget:g}: the file is {ws.emitted.ByteSize()} bytes, above "
                          f"{config.size_budget * fp32_bytes:.0f}; give a larger budget")
    timings["total"] = time.perf_counter() - start
    for pass_report in ws.reports:
        timings[pass_report.name] = timings.get(pass_report.name, 0.0) + pass_report.seconds
    if preprocessing is not None:  # eval / compare of the written file need no flags
        graph_io.set_metadata(ws.emitted, preprocessing.metadata())
    report = _build_report(ws, config, source, timings)
    report["preprocessing"] = preprocessing.describe() if preprocessing is not None else None
    report["speed_notes"] = speed_notes(config, report, float_output_convs(ws, config))
    if check:
        from onnxdfq.eval.check import check_stage

        start = time.perf_counter()
        report["fidelity"], warnings = check_stage(model, ws.emitted, config.calib, config.input_range,
                                                   fidelity_advice(config, report), *_width_setting(config))
        report["warnings"] += warnings
        report["timings_s"]["check"] = round(time.perf_counter() - start, 6)
    return QuantResult(ws.emitted, report, config)


SIZE_BUDGET_ATTEMPTS = 3
SIZE_BUDGET_SLACK = 0.01  # a first plan this far under the budget is planned again with the exact overhead
SIZE_BUDGET_MARGIN = 512.0  # bytes: INT2 guards (a Reshape and its shape, ~100 B each) of a different plan


def _weight_file_bytes(ws: Workspace) -> float:
    """Bytes the quantized weights and their zero points take in the packed file, as the allocation counts them."""
    from onnxdfq.quant.allocation import stored_bits

    layers = {layer.name: layer for layer in ws.emitted_layers}
    return sum(stored_bits(q.w_int.size, layers[name].out_channels, q.bits, packed=True, int2=True) / 8
               for name, q in ws.weight_quant.items() if name in layers)


def _check_preprocessing(model: Any, config: QuantConfig) -> Preprocessing | None:
    """The preprocessing to record in the output: what the user gave (checked against the input's channels),
    else what the model's own metadata says; None when neither (the prior then assumes ImageNet's, and says so)."""
    given = config.preprocessing
    if given is None:
        return from_metadata({prop.key: prop.value for prop in model.metadata_props})
    _, shape = graph_io.model_input(model, "quantization")
    given.check_channels(shape[1] if len(shape) == 4 and isinstance(shape[1], int) else None)
    return given


def _width_setting(config: QuantConfig) -> tuple[str, bool]:
    """'W4A8'-style name of the widths asked for, and whether any is under 8 bits (lower fidelity expected)."""
    weights = f"{config.bits}/{config.high_bits}" if config.high_bits else str(config.bits)
    if config.auto_bits:
        weights = f"auto({config.avg_bits:g} avg)" if config.avg_bits is not None else \
            f"auto({config.size_budget:g} of FP32)"
    narrow = config.auto_bits or config.bits < 8 or (config.act_bits is not None and config.act_bits < 8)
    return f"W{weights}A{config.act_bits or 'fp32'}", narrow


def fidelity_failure(report: dict[str, Any], *, allow_broken: bool = False,
                     min_sqnr: float | None = None) -> str | None:
    """Why the checked result must not be written (a broken output, or an SQNR under ``min_sqnr``), or None."""
    fidelity = report.get("fidelity")
    if not fidelity:
        return None  # check=False: nothing was judged
    if fidelity.get("grade") == "broken" and not allow_broken:
        return ("the quantized model is broken (its output no longer follows the FP32 model on the probe images; "
                "see the BROKEN warning): nothing written; --allow-broken (allow_broken=True) writes it anyway")
    worst = fidelity.get("min_sqnr_db")
    if min_sqnr is not None and worst is not None and worst < min_sqnr:
        return (f"output SQNR {worst:.1f} dB is below --min-sqnr {min_sqnr:g} dB on {fidelity['inputs']}: "
                "nothing written")
    return None


def fidelity_advice(config: QuantConfig, report: dict[str, Any]) -> str:
    """What to try when the output check finds low fidelity: only what this run did not already do."""
    tries = []
    if config.high_bits is not None and config.bits < config.high_bits - 1:
        tries.append(f"a wider low width (--bits {min(config.bits + 2, config.high_bits - 1)}/{config.high_bits})")
    elif config.high_bits is not None:  # the low width is as wide as it gets: one width for all layers
        tries.append(f"--method squant --bits {config.high_bits}")
    elif config.bits < 8 or (config.act_bits is not None and config.act_bits < 8):
        tries.append("more bits")
    if config.high_bits is None:
        tries.append(f"--method {'/'.join(m for m in ('squant', 'dfq') if m != config.method)}")
    if not config.per_channel:
        tries.append("--granularity channel")
    # under 4-bit activations both measured large gains (val1300 / CIFAR-10 test), under 8-bit ones little or a loss:
    # MobileNet-V1 W4A4 35.54 -> 37.77 (fl8), 40.92 (--reconstruct); EfficientNet-Lite0 W4A4 46.77 -> 61.23
    # (--reconstruct); ResNet-20 W4A4 84.76 -> 88.30 (fl8), 87.51 (--reconstruct); MobileNet-V1 W4A8 fl8 +0.3,
    # --reconstruct -0.85
    if config.high_bits is None and config.act_bits is not None and config.act_bits <= 4:
        if config.first_last_bits is None:
            tries.append("--first-last-bits 8")
        if not config.reconstruct and torch_available():
            tries.append("--reconstruct")
    statistics = report.get("statistics", {})
    if config.method == "dfmpc" and statistics.get("source", "").startswith("prior") \
            and statistics.get("method") != "dead_leaves":
        tries.append("--calib prior:dead_leaves")  # MobileNet-V1 4/8: 67.8 % vs 65.2 with the ensemble
    return "try " + ", ".join(tries)


def save_quantized(result: QuantResult | Any, path: str | os.PathLike, *, allow_broken: bool = False,
                   min_sqnr: float | None = None) -> int:
    """Write a quantized model to ``path`` atomically, checked again from the file (ONNX checker and an
    onnxruntime session) before it replaces anything; returns the file's size in bytes.

    ``result`` is what `quantize_model` returns (its report gets the output's path and size) or the
    onnx.ModelProto that `quantize` returns. A result whose output check graded it broken is refused
    (FidelityError, nothing written) unless ``allow_broken``; ``min_sqnr`` refuses one whose output SQNR
    on the probe images is lower.
    """
    from onnxdfq.eval.session import check_loads

    if not isinstance(result, QuantResult):
        if not hasattr(result, "graph"):
            raise OptionError(f"save_quantized takes what quantize_model or quantize returns (a QuantResult or an "
                              f"onnx.ModelProto), got {type(result).__name__}")
        graph_io.save_model_atomic(result, path, validate=check_loads)
        return os.path.getsize(path)
    failure = fidelity_failure(result.report, allow_broken=allow_broken, min_sqnr=min_sqnr)
    if failure:
        raise FidelityError(failure)
    graph_io.save_model_atomic(result.model, path, validate=check_loads)
    size = os.path.getsize(path)
    result.report["output"] = str(path)
    result.report["output_bytes"] = size
    return size


# how to keep BatchNormalization in an export, for the message printed when a model has none
EXPORT_WITH_BN_HINT = ("this model has no BatchNormalization left (folded at export); its statistics come from "
                       "{source}. To give onnxdfq the real ones, export with BN kept: torch.onnx.export(..., "
                       "do_constant_folding=False) (TorchScript) or torch.onnx.export(..., dynamo=True, "
                       "optimize=False), and skip onnxruntime/onnxsim pre-optimization")


def _sample_observer(model: Any, calib: CalibSpec, config: QuantConfig, progress: Any) -> SampleObserver:
    """Calibration samples for ``calib`` (prior images, synthetic or user data) and their runner."""
    from onnxdfq.eval.calibrate import calibration_samples, collect_moments, collect_statistics

    samples, info = calibration_samples(model, calib, progress, input_range=config.input_range)
    groups = info.pop("groups", None)
    return SampleObserver(samples, collect_statistics, model, info, collect_moments=collect_moments, groups=groups)


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


# --calib auto on a model without BN that learns (--reconstruct, --method gptq) below this many pixels a side:
# statistics and ranges from the prior's images as for every method, and the learning stages' samples from
# inverting the classifier (synth:invert). BN-folded CIFAR ResNets W4A4, full test sets: --reconstruct ResNet-20
# 85.8-86.6 % (80.18 on prior images, 81.33 without), ResNet-56 88.2-88.4 (83.43 without); gptq over two seeds
# ResNet-20/32/44/56 82.89/85.20/84.32/85.97 against 82.60/85.31/84.44/83.72 on prior images (noise but for
# ResNet-56). Inverted samples as the statistics too helped ResNet-20 and -32 (gptq 86.22, 86.47) and cost
# ResNet-44 and -56 0.7-0.8, so they stay the prior's. At 224 px inversion costs minutes on a CPU and measured no
# better than the prior (folded EfficientNet-Lite0 W4A8 SQuant 74.54 on 32 inverted images, 74.46 on the prior)
INVERSION_MAX_INPUT = 128


def _inversion_by_default(config: QuantConfig, calib: CalibSpec, template: Any) -> bool:
    """Whether a run whose --calib auto resolved to the prior (no BN) learns (GPTQ's Hessians, --reconstruct) on
    synth:invert samples: the images are small, the model is a classifier the torch executor runs, and torch is
    installed."""
    from onnxdfq.eval.calibrate import input_shape

    learns = config.reconstruct or config.rounder == "gptq"
    if config.calib.source != "auto" or calib.source != "prior" or not learns or config.pseudo_bn:
        return False
    try:
        shape = input_shape(template, calib.size)
    except UnsupportedModelError:
        return False
    small = len(shape) == 3 and min(shape[1:]) < INVERSION_MAX_INPUT
    return small and _classifier_output(template) and torch_available()


def _classifier_output(model: Any) -> bool:
    """The first graph output holds class scores: [N, K] (or [N, K, 1, 1]) with K >= 2 known."""
    dims = [d.dim_value if d.HasField("dim_value") else None for d in model.graph.output[0].type.tensor_type.shape.dim]
    if len(dims) < 2 or any(d != 1 for d in dims[2:]):
        return False
    return dims[1] is not None and dims[1] >= 2


def _statistics_source(config: QuantConfig, with_bn: int, layer_count: int) -> str:
    """Resolve --calib auto (bn when at least half the layers kept BN, else prior); refuse what cannot work."""
    source = config.calib.source
    if source == "auto":
        return "bn" if with_bn and with_bn * 2 >= layer_count else "prior"
    if source == "bn" and not with_bn and _needs_statistics(config):
        raise UnsupportedModelError("--calib bn: the model has no BatchNormalization (folded at export), so there "
                                    "are no BN statistics to read; use --calib prior (the default for such models) "
                                    "or data:PATH.npz")
    if source == "synth" and not with_bn and config.calib.method not in BN_FREE_SYNTH_METHODS:
        raise UnsupportedModelError(f"--calib synth:{config.calib.method} matches BN statistics, and the model has no "
                                    "BatchNormalization (folded at export); use --calib synth:invert (generated by "
                                    "inverting the classifier), prior or data:PATH.npz")
    return source


def _statistics_summary(ws: Workspace, layers: list) -> dict:
    """Where each layer's statistics came from, how many layers kept BN, and the samples used."""
    summary: dict[str, Any] = {"source": ws.calib.label, "layers": len(layers), "bn_layers": ws.bn_layers,
                               "layer_sources": layer_stat_counts(ws, layers)}
    if ws.observer is not None:
        summary.update({"samples": ws.observer.count, "model_runs": ws.observer.runs,
                        **ws.observer.info})
    if not summary["bn_layers"]:
        source = {"prior": "prior images", "synth": f"{ws.calib.label} samples", "data": "your samples"}
        summary["hint"] = EXPORT_WITH_BN_HINT.format(source=source.get(ws.calib.source, ws.calib.label))
    return summary


def quantize(model_or_path: Any, *, method: str | None = None, bits: int | str | None = None,
             act_bits: int | str | None = "auto", granularity: str | None = None, **options: Any):
    """Like `quantize_model`, returning only the onnx.ModelProto (write it with `save_quantized`)."""
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


def float_output_convs(ws: Workspace, config: QuantConfig) -> list[str]:
    """Quantized convolutions whose output stays float (it leaves the graph): onnxruntime has no fused kernel
    for them, so their weights are dequantized at every inference (a Gemm or MatMul head fuses anyway)."""
    if config.act_bits is None or config.quantize_outputs:
        return []
    bound = patterns.output_bound_tensors(ws.graph)

    def leaves(tensor) -> bool:  # the conv's output, or that of the one activation after it
        return tensor.name in bound or (len(tensor.outputs) == 1 and tensor.outputs[0].op in graph_layers.ACT_OPS
                                        and tensor.outputs[0].outputs[0].name in bound)

    return [node.name for node in ws.graph.nodes  # after emission: the weights are behind DequantizeLinear
            if node.op == "Conv" and node.name in ws.weight_quant and leaves(node.outputs[0])]


def speed_notes(config: QuantConfig, report: dict[str, Any], float_heads: list[str] | tuple = ()) -> list[str]:
    """What a user who picked a slow layout for onnxruntime should know, and the faster equivalent.

    Measured with onnxruntime 1.32 on CPU (BENCHMARKS.md): weight-only QDQ runs every DequantizeLinear at
    every inference (0.15-0.5x FP32); the TensorRT layout has float biases, so onnxruntime fuses no
    QLinearConv (0.2-0.6x); fake-quant files are plain FP32 graphs.
    """
    notes = []
    if config.fmt == "fakequant":
        notes.append("--format fakequant writes float weights already rounded: FP32 speed and size; it is for "
                     "runtimes without QDQ support. For int8 kernels: --format qdq --act-bits 8")
    elif config.act_bits is None:
        notes.append("float activations (weight-only QDQ): onnxruntime dequantizes every weight at every inference, "
                     "0.15-0.5x FP32 speed on CPU; this saves file size (see --format qdq-packed), not time. For "
                     "int8 kernels add --act-bits 8 (W8A8 ran 1.2-2x FP32 on CPU here)")
    if config.fmt == "qdq-packed" and config.act_bits is not None and report.get("passes") and any(
            p["params"].get("packed_layers") for p in report["passes"]):
        notes.append("packed INT4 weights: onnxruntime's CPU QLinearConv takes int8 weights only, so it dequantizes "
                     "the packed ones at every inference (ResNet-56 W4A8 ran 0.5x FP32; OpenVINO 0.7x); packing saves "
                     "file size. For speed: --format qdq (the same 4-bit grid in int8 containers)")
    if config.target == "trt" and config.act_bits is not None:
        notes.append("--target trt lays the file out for TensorRT (float biases, int8 activations); onnxruntime's "
                     "CPU EP fuses none of its convolutions (0.2-0.6x FP32). For onnxruntime or OpenVINO use "
                     "--target ort")
    if report.get("passes") and any(p["params"].get("integer_min_nodes") for p in report["passes"]):
        notes.append("cross-layer equalization keeps ReLU6 exact with per-channel Min nodes, which onnxruntime "
                     "runs unfused (MobileNet dfq W8A8: about FP32 speed vs 1.3-1.6x for nearest); use --method "
                     "nearest or squant per-channel where 8-bit per-channel accuracy suffices")
    if float_heads and config.fmt == "qdq" and config.target == "ort":
        notes.append(f"the output convolution {', '.join(float_heads)} keeps a float output, so onnxruntime "
                     "dequantizes its weights at every inference; --quantize-outputs quantizes its output too and "
                     "it fuses (MobileNet-V1 nearest W8A8: 1.54x -> 1.84x FP32 at batch 1, top-1 75.31 -> 75.46 "
                     "on val1300; dfq per-tensor 1.06x -> 1.19x, 76.85 -> 76.46): check the accuracy")
    return notes


def _skipped(ws: Workspace, config: QuantConfig) -> dict[str, Any]:
    """Optional steps that did not run and why, and per pass the layers it left alone and why."""
    steps = {}
    for name in ("cle", "absorb_bias", "bias_correction"):
        if not config.step(name):
            steps[name] = "turned off" if getattr(config, name) is False else f"not part of {config.method}"
    if config.act_bits is None:
        steps["activation_quantization"] = "float activations asked for"
    if config.target == "trt" and config.act_bits is not None:
        steps["int32_bias"] = "TensorRT target: biases stay float"
    per_pass = {r.name: dict(r.skipped) for r in ws.reports if r.skipped}
    return {"steps": {**steps, **ws.skipped}, "layers": per_pass}


def weight_storage(weight_quant: dict) -> tuple[float | None, int]:
    """Average weight bits over every quantized weight, and their packed size in bytes (the one formula)."""
    total_bits = sum(q.bits * q.w_int.size for q in weight_quant.values())
    count = sum(q.w_int.size for q in weight_quant.values())
    return (total_bits / count if count else None), int(np.ceil(total_bits / 8))


def _calibration_summary(ws: Workspace, config: QuantConfig) -> dict[str, Any]:
    """Where the activation ranges came from: statistics (BN or prior images, mean +- sigmas std), and the
    samples that calibrated the rest."""
    if config.act_bits is None:
        return {}
    calibrated = next((r.params for r in ws.reports if r.name == CalibrationRangePass.name), None)
    source = ws.calib.source if ws.calib is not None else "bn"
    if source != "bn" and not config.prior_statistics_ranges(source) and calibrated is not None:
        return calibrated
    summary: dict[str, Any] = {"source": "bn" if source == "bn" else ws.calib.label,
                               "sigmas": ws.range_sigmas or config.bn_sigmas, "estimator": "statistics"}
    if calibrated is not None:
        summary["calibrated_tensors"] = sum(1 for r in ws.reports if r.name == CalibrationRangePass.name
                                            for _ in r.rows)
        summary["calibrated_on"] = calibrated["source"]
    if ws.observer is not None:
        summary["samples"] = ws.observer.count
    return summary


def _build_report(ws: Workspace, config: QuantConfig, source: str, timings: dict[str, float]) -> dict:
    layers: dict[str, dict[str, Any]] = {}
    for name, quant in ws.weight_quant.items():
        layers[name] = {"bits": quant.bits, "per_channel": quant.per_channel, "method": quant.method,
                        "scales": np.ravel(quant.scale).astype(float).tolist(),
                        "bn_stats": name in ws.channel_stats}
    for pass_report in ws.reports:
        for row in pass_report.rows:
            if row.layer in layers:
                layers[row.layer].update({k: v for k, v in row.values.items() if k not in ("bits",)})
    activations = {name: {"lo": r.lo, "hi": r.hi, "source": r.source} for name, r in ws.act_ranges.items()}
    sources: dict[str, int] = {}
    for item in activations.values():
        sources[item["source"]] = sources.get(item["source"], 0) + 1
    average_bits, storage = weight_storage(ws.weight_quant)
    final_layers = ws.emitted_layers
    return _jsonable({
        "model": source,
        "config": config.to_json(),
        "layers": layers,
        "activations": activations,
        "activation_sources": sources,
        "calibration": _calibration_summary(ws, config),
        "reduced_range_layers": ws.reduced_range,
        "weight_ranges": ws.weight_ranges,
        "average_weight_bits": average_bits,
        "weight_storage_bytes": storage,
        "statistics": _statistics_summary(ws, final_layers),
        "layer_inputs": _layer_input_coverage(ws, final_layers, config),
        "skipped": _skipped(ws, config),
        "passes": [r.to_json() for r in ws.reports],
        "warnings": ws.warnings + [w for r in ws.reports for w in r.warnings],
        "timings_s": {k: round(v, 6) for k, v in timings.items()},
    })
