"""Every setting of a quantization run, typed and frozen, with its default in one place.

`make_config` turns the flat keywords of `quantize_model` (and the CLI's options, which go through the
same function) into a `QuantConfig`, and refuses anything it does not know, naming what it knows:
a typo must not be a silently ignored setting. The per-method options are their own dataclasses
(`SQuantOptions`, `DFMPCOptions`, `CalibSpec`) so that each method's passes receive one typed object.

This module sits just above `onnxdfq.quant` (numpy only): passes, evaluation and the pipeline import it,
it imports none of them.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import numpy as np

from onnxdfq.errors import OptionError
from onnxdfq.preprocessing import Preprocessing, resolve_preprocessing
from onnxdfq.quant.range_estimators import ESTIMATORS, RangeEstimator, get_estimator
from onnxdfq.quant.scheme import parse_act_bits, parse_bits

__all__ = ["METHODS", "DEFAULT_METHOD", "DEFAULT_RECONSTRUCT_METHOD", "default_method", "FORMATS", "TARGETS",
           "GRANULARITIES", "CALIB_SOURCES", "SAMPLE_SOURCES", "PRIOR_GENERATORS", "DEFAULT_SIGMAS",
           "LOW_BIT_SIGMAS", "PRIOR_SIGMAS", "CalibSpec", "SQuantOptions", "DFMPCOptions", "QuantConfig",
           "make_config", "valid_options", "AUTO_WIDTHS", "SENSITIVITY_MODES", "AUTO_ACT_WIDTHS"]

# method -> its weight rounder and the defaults of its optional steps (None in QuantConfig: use these)
METHODS: dict[str, dict[str, Any]] = {
    "nearest": {"rounder": "nearest", "cle": False, "absorb_bias": False, "bias_correction": False, "act_bits": 8},
    # analytic bias correction on by default: the mean shift is what sinks depthwise nets at 4 bits
    # (MobileNet-V1 W4A8: 2.5 % pure SQuant, ~64 % with it); bias_correction=False gives the paper's SQuant
    "squant": {"rounder": "squant", "cle": False, "absorb_bias": False, "bias_correction": True, "act_bits": 8},
    # GPTQ rounding on generated samples (passes/gptq.py): MobileNet-V1 W4A8 70.62 % vs SQuant's 67.31
    "gptq": {"rounder": "gptq", "cle": False, "absorb_bias": False, "bias_correction": True, "act_bits": 8},
    "dfq": {"rounder": "nearest", "cle": True, "absorb_bias": True, "bias_correction": True, "act_bits": 8},
    # DF-MPC: bits LOW/HIGH, float activations unless asked (the paper's setting); see passes/dfmpc.py
    "dfmpc": {"rounder": "nearest", "cle": False, "absorb_bias": False, "bias_correction": True, "act_bits": None},
}
# the method a user who names none gets: the best W8A8 measured (bias correction is what nearest lacks):
# MobileNet-V1 76.54 vs 75.54 (nearest), BN-folded 76.62 vs 75.54; EfficientNet-Lite0 81.85 vs 81.69, folded
# 81.77 vs 81.62; the CIFAR ResNets within 0.2 either way (val1300 / full CIFAR-10 test set)
DEFAULT_METHOD = "squant"
# ... and with --reconstruct below 8 bits: GPTQ's rounding (on the samples reconstruction learns on anyway) is the
# better start. MobileNet-V1 W4A8 + reconstruct 72.92 / 73.00 (seeds 0/1) vs 70.46 from SQuant's; ResNet-20 W4A4
# 88.16 vs 88.11; BN-folded ResNet-20 W4A4 86.59 vs 87.14 (seed 0, within the 86.7-87.6 seed spread)
DEFAULT_RECONSTRUCT_METHOD = "gptq"
FORMATS = ("qdq", "qdq-packed", "fakequant")
# qdq: onnxruntime CPU (uint8 activations, so that its x86 kernels fuse QLinearConv);
# trt: TensorRT's explicit quantization (int8 symmetric activations, zero point 0, Q/DQ on both residual inputs)
TARGETS = ("ort", "trt")
GRANULARITIES = ("channel", "tensor")

DEFAULT_SIGMAS = 6.0  # BN-statistics activation range: mean +- this many std, 6 bits and up
LOW_BIT_SIGMAS = 4.0  # below 6 activation bits (see QuantConfig.bn_sigmas)
# ranges from prior-image statistics, 6 activation bits and up: every procedural prior understates the std real
# images give (EfficientNet-Lite0, median log ratio -0.3 to -0.7 per layer), and an 8-bit grid loses more to
# clipping than to coarser steps: DFQ per-tensor on the folded Lite0 81.46 % at 8 std vs 80.00 at 6, folded
# ResNet-56 93.31 vs 93.18 (below 6 bits the ranges are calibrated on the images instead: see pipeline)
PRIOR_SIGMAS = 8.0

# --- calibration -------------------------------------------------------------------------------------------
CALIB_SOURCES = ("auto", "bn", "prior", "synth", "data")
SAMPLE_SOURCES = ("prior", "synth", "data")  # the sources that run samples through the model
# onnxdfq.synth.prior; the first is the default: ensemble (pink + dead leaves) at 128 px and up, pink below
PRIOR_GENERATORS = ("auto", "pink", "dead_leaves", "mixed", "ensemble")
SYNTH_METHODS = ("zeroq", "dsg", "dffg", "invert")
BN_FREE_SYNTH_METHODS = ("invert",)  # generators that need no BN statistics (class-conditional inversion)
DEFAULT_SYNTH_SAMPLES = 256  # generated samples when calib_samples is not given
# generating on a CPU: DFFG's 150 steps for 256 samples took minutes on 2 shared cores; 60 steps for 128 samples
# calibrate ResNet-20 W6A6 to 91.37 (256 real training images: 91.38; 150 steps / 256 samples: 91.40)
CPU_SYNTH_DEFAULTS: dict[str, dict[str, int]] = {"dffg": {"samples": 128, "steps": 60}}
# the DFFG samples --reconstruct / gptq learn on from pipeline.LARGE_RECONSTRUCT_INPUT (128 px) up under activations
# of 4 bits or fewer take more steps (closer to the BN statistics): MobileNet-V1 W4A4 + reconstruct 50.00 -> 55.38 %
# at 180, W4A4 fl8 53.92 -> 58.00; at 8-bit activations they hurt (MobileNet-V1 W4A8 72.92 -> 71.38), and on
# ResNet-20 (32 px) they did not help (see pipeline.reconstruction_calib), so 60 stays there
LOW_ACT_SYNTH_STEPS = 180
LOW_ACT_BITS = 4
# the DFFG samples --reconstruct / gptq learn on from 128 px up start from the prior's pink images, take their sign
# steps on a gradient smoothed over 1 px, at half the step: samples as smooth as photographs instead of 35x rougher.
# EfficientNet-Lite0 W4A8 gptq 74.4 -> 78.2 % on 1040 of val1300 (260 real images: 78.9); see
# pipeline.reconstruction_calib for where they apply
NATURAL_DFFG_OPTIONS: dict[str, object] = {"init": "pink", "blur": 1.0, "alpha": 0.05}
DEFAULT_ESTIMATOR = "mse"
# block reconstruction (--reconstruct): optimiser steps per block and calibration samples. From 128 px up with every
# activation grid at 8 bits (only the roundings learn) a block takes twice the steps: MobileNet-V1 W4A8 on val1300
# 72.85 % -> 75.31 at 1000 (EfficientNet-Lite0 79.38 -> 79.15, within one sample set against another). 4-bit
# activations keep 500: their step sizes learn too, and twice the steps fit the 128 samples (MobileNet-V1 W4A4
# 56.62 -> 51.46 on the same samples, compiled); so do small inputs (ResNet-20 W4A4 takes 3 min)
DEFAULT_RECONSTRUCT_STEPS = 500
LARGE_RECONSTRUCT_STEPS = 1000
DEFAULT_RECONSTRUCT_SAMPLES = 256
# --reconstruct's loss a block: "fisher" weights each output channel's squared error, per sample, by the squared
# gradient of the FP32 model's log-likelihood of a class drawn from its own prediction (BRECQ's Fisher weighting
# with no label); "mse" weights them all alike, the default. One thread, val1300 / CIFAR-10 test: fisher moves
# EfficientNet-Lite0 W4A8 (500 steps a block) from 79.38 / 78.92 to 80.15 / 78.77 (seeds 0 / 1), MobileNet-V1 W4A8
# (1000 steps, seed 0) from 75.31 to 74.23 and ResNet-20 W4A4 from 88.16 to 87.73, so it is asked for, not chosen
RECONSTRUCT_LOSSES = ("fisher", "mse")
FISHER_DRAWS = 4
# QDrop's input mixing while a block learns: each element of its input comes from the FP32 path with this chance,
# else from the already reconstructed blocks (QDrop's and Genie's 0.5). One thread, 500 steps a block: EfficientNet-
# Lite0 W4A8 79.38 / 78.92 -> 80.08 / 78.85 (val1300, seeds 0 / 1), ResNet-20 W4A4 88.16 -> 88.51; MobileNet-V1
# W4A8 at 1000 steps 75.31 -> 75.08. Inside one sample set's spread on average, kept as the method's own setting.
# Its random inputs need steps: at 100 a block ResNet-20 W4A4 fell from 86.4-86.8 to 85.63 and the BN-folded one
# (inverted samples) to 82.92 against at least 83.83 (its test's floor), at 200 88.38 -> 88.10; so below
# MIXED_RECONSTRUCT_STEPS it is 0
RECONSTRUCT_INPUT_MIX = 0.5
MIXED_RECONSTRUCT_STEPS = 500
# torch.compile of the learning steps (--reconstruct-compile): by default on the CPU for inputs from
# LARGE_RECONSTRUCT_INPUT px and from this many steps a block. Compiling from a cold cache cost MobileNet-V1 1-1.5 min
# and EfficientNet-Lite0 5-6 min on two threads; the steps then take about half the time (MobileNet-V1, timed after
# compiling, one thread: 331 ms summed over its blocks against 696 eager; Lite0's reconstruction at 1000 steps a
# block 1606 s against 2284, compiling included), so it pays from a few hundred steps; ResNet-20 at 32 px gains none
# (see onnxdfq.synth.reconstruct.ReconstructOptions.compile and BENCHMARKS)
COMPILED_RECONSTRUCT_STEPS = 500
# --bits auto: the weight widths each layer may get, and how their cost at the output is found
AUTO_WIDTHS = (2, 3, 4, 5, 6, 8)
AUTO_ACT_WIDTHS = (4, 8)  # --avg-act-bits: each activation at 4 bits or at --act-bits
SENSITIVITY_MODES = ("measured", "proxy")


@dataclass(frozen=True)
class CalibSpec:
    """Where activation ranges (and missing per-channel statistics) come from (``--calib``).

    ``source`` is ``auto`` (the default: ``bn`` when most layers kept a BatchNormalization,
    ``prior`` otherwise), ``bn`` (BN statistics, no data), ``prior`` (procedural images,
    ``method`` = pink (default) | mixed | dead_leaves; no data), ``synth`` (``method`` samples generated
    on the fly from the BN statistics) or ``data`` (the ``.npz`` at ``path``). ``samples``: how
    many to generate (default 256) or use (default all). ``mean``/``std`` are the model's
    preprocessing (raw uint8 data files, the prior's input space); ``synth_options`` go to the
    generator (e.g. ``steps``, ``alpha``).
    """

    source: str = "auto"
    method: str | None = None
    path: str | None = None
    estimator: str = DEFAULT_ESTIMATOR
    samples: int | None = None
    percentile: float = 99.99
    seed: int = 0
    device: str = "cpu"
    batch_size: int = 32
    size: tuple[int, int] | None = None  # H, W for models whose image size is dynamic (--size)
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    synth_options: dict[str, Any] = field(default_factory=dict)
    mean_std_source: str = "--mean/--std"  # where mean/std came from (a --preprocess preset), for the report

    @classmethod
    def parse(cls, text: str | None, **options: Any) -> CalibSpec:
        """``auto``, ``bn``, ``prior[:GENERATOR]``, ``synth:METHOD`` or ``data:PATH.npz`` plus keyword
        options; OptionError if invalid."""
        text = (text or "auto").strip()
        kind, _, arg = text.partition(":")
        kind = kind.lower()
        if kind == "prior":
            arg = arg.lower() or PRIOR_GENERATORS[0]
        valid = kind in CALIB_SOURCES and (bool(arg) == (kind in SAMPLE_SOURCES))
        if not valid or (kind == "prior" and arg not in PRIOR_GENERATORS):
            raise OptionError(f"--calib takes auto, bn, prior[:{'|'.join(PRIOR_GENERATORS)}], synth:METHOD "
                              f"({', '.join(SYNTH_METHODS)}) or data:PATH.npz; got {text!r}")
        spec_fields = {"source": kind, "method": arg.lower() if kind in ("synth", "prior") else None,
                       "path": arg if kind == "data" else None}
        for key in ("mean", "std"):
            if options.get(key) is not None:
                options[key] = tuple(float(v) for v in np.ravel(options[key]))
        if options.get("size") is not None:
            options["size"] = tuple(int(v) for v in options["size"])
        spec = cls(**spec_fields, **{k: v for k, v in options.items() if v is not None})
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
        if self.std is not None and any(v <= 0 for v in self.std):
            raise OptionError(f"--std must be positive, got {list(self.std)}")

    @property
    def label(self) -> str:
        return {"auto": "auto", "bn": "bn", "prior": f"prior:{self.method}", "synth": f"synth:{self.method}",
                "data": "data"}[self.source]

    def resolved(self, source: str) -> CalibSpec:
        """This spec with ``auto`` decided (``prior`` gets its default generator)."""
        if source == self.source:
            return self
        return replace(self, source=source, method=PRIOR_GENERATORS[0] if source == "prior" else self.method)

    def sample_count(self) -> int:
        return self.samples or DEFAULT_SYNTH_SAMPLES

    def synth_run(self) -> tuple[int, dict[str, Any]]:
        """Samples to generate and the generator's options: what was asked, else the defaults (lighter on a CPU)."""
        cpu = CPU_SYNTH_DEFAULTS.get(self.method or "", {}) if self.device == "cpu" else {}
        options = dict(self.synth_options)
        if "steps" in cpu:
            options.setdefault("steps", cpu["steps"])
        return self.samples or cpu.get("samples", DEFAULT_SYNTH_SAMPLES), options

    def range_estimator(self) -> RangeEstimator:
        return get_estimator(self.estimator, percentile=self.percentile)


# --- per-method options ------------------------------------------------------------------------------------
SQUANT_STAGES = (("e",), ("e", "k"), ("e", "c"), ("e", "k", "c"))


@dataclass(frozen=True)
class SQuantOptions:
    """SQuant's flipping stages: element (always), kernel and channel (Guo et al. 2022)."""

    stages: tuple[str, ...] = ("e", "k", "c")

    def __post_init__(self) -> None:
        stages = tuple(self.stages)
        if stages not in SQUANT_STAGES:
            raise OptionError(f"--squant-stages takes {', '.join(','.join(s) for s in SQUANT_STAGES)}; "
                              f"got {','.join(map(str, stages))}")
        object.__setattr__(self, "stages", stages)


@dataclass(frozen=True)
class DFMPCOptions:
    """DF-MPC's knobs and their defaults (the one place for them; passes/dfmpc.py validates the values and
    passes/dfmpc_math.py says what each does). Measured: tools/results/dfmpc_ablation.md."""

    quantizer: str = "corr"  # ternary keeping the |w| with the best modelled output correlation; lsq, absmax, twn
    reestimate: str = "mean+std"  # which BN statistics of the low layer are re-estimated: none, mean, mean+std
    rho: float | str = 0.2  # correlation between the kernel taps of one input channel in V(u), or "fit"
    compensate: bool = False  # the paper's closed-form c on top of the re-estimation
    lambda1: float = 0.5  # weight of the bias term in the closed form (the paper's lambda1)
    lambda2: float = 0.0  # ridge term on c (the paper's lambda2)
    sigma_model: str | None = None  # tap, regression, blend; None: regression after the ascent, else blend
    high_gain: bool = True  # the next layer's per-channel gain restoring its output std
    high_correction: str = "none"  # "lsq": least-squares rewrite of the next layer (measured worse: off)
    refine_steps: int | None = None  # coordinate ascent of the corr grid; None: 64 for ternary layers, else 0
    low_rule: str = "spatial"  # which conv of a pair is low: first, spatial (1x1 high, 3x3 low), last
    shortcut_corr: float = 0.0  # branch/shortcut correlation at a residual join feeding a low layer

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | DFMPCOptions | None) -> DFMPCOptions:
        if isinstance(values, DFMPCOptions):
            return values
        values = dict(values or {})
        _known(values, cls, "DF-MPC option (--dfmpc-opt KEY=VALUE)")
        if isinstance(values.get("refine_steps"), float) and float(values["refine_steps"]).is_integer():
            values["refine_steps"] = int(values["refine_steps"])  # --dfmpc-opt parses numbers as floats
        return cls(**values)


# --- the run -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class QuantConfig:
    """Everything `quantize_model` needs, defaults resolved; build one with `make_config`."""

    method: str = DEFAULT_METHOD
    bits: int = 8
    high_bits: int | None = None  # LOW/HIGH mixed precision (DF-MPC)
    act_bits: int | None = 8
    per_channel: bool = True
    cle: bool | None = None  # None: the method's default
    absorb_bias: bool | None = None
    bias_correction: bool | None = None
    sigmas: float | None = None  # None: see bn_sigmas
    reduce_range: bool | str = "auto"  # see passes/qparams.py
    input_range: tuple[float, float] | None = None
    fmt: str = "qdq"
    target: str = "ort"
    quantize_outputs: bool = False  # Q/DQ on tensors that leave the graph (through Flatten, Reshape...) too
    calib: CalibSpec = field(default_factory=CalibSpec)  # activation ranges: BN statistics or samples
    squant: SQuantOptions = field(default_factory=SQuantOptions)
    dfmpc: DFMPCOptions = field(default_factory=DFMPCOptions)
    # the model's preprocessing as the user gave it (mean/std, a preset or the input range), validated;
    # written into the output's metadata so that eval / compare of the file need no flags
    preprocessing: Preprocessing | None = None
    # block reconstruction on calibration samples after the grids are decided (synth extra; see
    # onnxdfq.synth.reconstruct): learnt roundings and activation step sizes
    reconstruct: bool = False
    reconstruct_steps: int | None = None  # None: DEFAULT_RECONSTRUCT_STEPS (see pipeline.reconstruction_steps)
    reconstruct_samples: int | None = None  # None: DEFAULT_RECONSTRUCT_SAMPLES
    reconstruct_loss: str | None = None  # one of RECONSTRUCT_LOSSES; None: "mse"
    reconstruct_input_mix: float | None = None  # None: RECONSTRUCT_INPUT_MIX
    reconstruct_compile: bool | None = None  # None: see pipeline.reconstruction_compile
    # BN folded away: reconstruction learns on DFFG samples matched to the prior's statistics (pseudo-BN) instead
    # of on the prior images themselves (see pipeline.ReconstructStage; off: measured far worse at 224 px)
    pseudo_bn: bool = False
    # the first layer (weights and input) and the last layer (weights and input) at this width: the protocol
    # the low-bit literature reports; None: every layer at --bits / --act-bits
    first_last_bits: int | None = None
    # --bits auto: per-layer weight widths chosen under one budget, avg_bits (grid bits per weight, over
    # parameters) or size_budget (fraction of the FP32 file, packed); see onnxdfq.passes.bit_allocation
    auto_bits: bool = False
    avg_bits: float | None = None
    size_budget: float | None = None
    sensitivity: str = "measured"
    auto_widths: tuple[int, ...] = AUTO_WIDTHS
    dfmpc_pairs: bool = True  # DF-MPC's compensated low/high pairs are candidates too (measured sensitivities)
    # --avg-act-bits: activations at 4 bits or act_bits, averaging this many bits over the activation elements
    avg_act_bits: float | None = None

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

    def range_sigmas(self, source: str) -> float:
        """``bn_sigmas``, widened to PRIOR_SIGMAS for ranges from prior statistics (unless ``sigmas`` was given)."""
        if source == "prior" and self.sigmas is None and (self.act_bits is None or self.act_bits >= 6):
            return PRIOR_SIGMAS
        return self.bn_sigmas

    def prior_statistics_ranges(self, source: str) -> bool:
        """Whether activation ranges come from prior statistics (6 bits and up) rather than calibration on the
        prior images (below 6 bits, where the MSE estimator's trade-off on the images themselves measured far
        better: folded ResNet-56 W4A4 84.3 % vs 75.6 from statistics)."""
        return source == "prior" and self.act_bits is not None and self.act_bits >= 6

    def step(self, name: str) -> bool:
        """Whether the optional step ``name`` (cle, absorb_bias, bias_correction) runs."""
        value = getattr(self, name)
        return METHODS[self.method][name] if value is None else bool(value)

    @property
    def rounder(self) -> str:
        return METHODS[self.method]["rounder"]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# quantize_model's flat keywords that fill CalibSpec fields
CALIB_OPTIONS = {"calib_range": "estimator", "calib_samples": "samples", "calib_percentile": "percentile",
                 "seed": "seed", "device": "device", "calib_batch_size": "batch_size", "mean": "mean",
                 "std": "std", "synth_options": "synth_options", "size": "size"}
_DIRECT = ("cle", "absorb_bias", "bias_correction", "sigmas", "reduce_range", "input_range", "fmt", "target",
           "quantize_outputs", "reconstruct", "reconstruct_steps", "reconstruct_samples", "reconstruct_loss",
           "reconstruct_input_mix", "reconstruct_compile",
           "pseudo_bn", "first_last_bits",
           "avg_bits", "size_budget", "sensitivity", "auto_widths", "dfmpc_pairs",
           "avg_act_bits")
# every keyword make_config takes besides method, bits, act_bits and granularity
OPTIONS = (*_DIRECT, "calib", *CALIB_OPTIONS, "preprocess", "squant_stages", "dfmpc")


def valid_options() -> tuple[str, ...]:
    return ("method", "bits", "act_bits", "granularity", *OPTIONS)


def _known(values: dict[str, Any], cls: type, what: str) -> dict[str, Any]:
    names = [f.name for f in fields(cls)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise OptionError(f"unknown {what}: {', '.join(unknown)}; valid: {', '.join(names)}")
    return values


def default_method(bits: int | str | None = None, reconstruct: bool = False) -> str:
    """The method a user who names none gets: gptq as the start of --reconstruct below 8 bits, else squant."""
    if not reconstruct:
        return DEFAULT_METHOD
    try:
        low, high = parse_bits(8 if bits is None else bits)
    except ValueError:  # auto (widths decided later) or invalid (make_config names the error)
        return DEFAULT_METHOD
    return DEFAULT_RECONSTRUCT_METHOD if high is None and low < 8 else DEFAULT_METHOD  # LOW/HIGH is dfmpc's


def make_config(method: str = DEFAULT_METHOD, bits: int | str = 8, act_bits: int | str | None = "auto",
                granularity: str = "channel", **options: Any) -> QuantConfig:
    """A validated QuantConfig from `quantize_model`'s keywords; OptionError names any unknown one.

    ``act_bits="auto"`` is the method's default (8; float for dfmpc). ``granularity`` is "channel" or
    "tensor" ("per-channel" / "per-tensor" too). ``mean``/``std`` (both, 0-1 scale) or ``preprocess`` (a preset
    of `onnxdfq.preprocessing.PRESETS`) set ``input_range`` when it is not given.
    """
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise OptionError(f"unknown option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
                          f"valid options: {', '.join(valid_options())}")
    if method not in METHODS:
        raise OptionError(f"unknown method {method!r}; choose one of {', '.join(sorted(METHODS))}")
    if isinstance(act_bits, str) and act_bits.strip().lower() == "auto":
        act_bits = METHODS[method]["act_bits"]
    auto = isinstance(bits, str) and bits.strip().lower() == "auto"
    try:
        low, high = (8, None) if auto else parse_bits(bits)
        act = parse_act_bits(act_bits)
    except ValueError as exc:
        raise OptionError(str(exc)) from None
    if high is not None and method != "dfmpc":
        raise OptionError(f"--bits {bits}: LOW/HIGH mixed precision is for --method dfmpc; "
                          f"{method} takes a single width")
    if method == "dfmpc" and high is None:
        raise OptionError(f"--method dfmpc takes --bits LOW/HIGH (e.g. 2/6), got {bits}")
    if method == "dfmpc" and not 2 <= low < high <= 8:
        raise OptionError(f"--bits {bits}: DF-MPC needs 2 <= LOW < HIGH <= 8")
    if method == "dfmpc" and str(granularity).removeprefix("per-") == "tensor":
        # its compensation folds one gain per output channel into the low layers' scales
        raise OptionError("--method dfmpc quantizes per output channel: its compensation folds one gain per channel "
                          "into the low layers' scales; --granularity tensor is not supported")
    if options.get("dfmpc") and method != "dfmpc" and not (auto and options.get("dfmpc_pairs") is not False):
        raise OptionError(f"DF-MPC options apply to --method dfmpc (or --bits auto's DF-MPC pairs), not {method}")
    if options.get("squant_stages") and METHODS[method]["rounder"] != "squant":
        raise OptionError(f"--squant-stages applies to --method squant, not {method}")
    granularity = str(granularity).removeprefix("per-")  # users type per-channel / per-tensor
    if granularity not in GRANULARITIES:
        raise OptionError(f"--granularity must be 'channel' or 'tensor' (or per-channel / per-tensor), "
                          f"got {granularity!r}")
    if options.get("fmt", "qdq") not in FORMATS:
        raise OptionError(f"--format must be one of {', '.join(FORMATS)}, got {options['fmt']!r}")
    if options.get("target", "ort") not in TARGETS:
        raise OptionError(f"--target must be one of {', '.join(TARGETS)}, got {options['target']!r}")
    direct = {k: options[k] for k in _DIRECT if options.get(k) is not None}
    if "input_range" in direct:
        lo, hi = (float(v) for v in direct["input_range"])
        if not lo < hi:
            raise OptionError(f"--input-range takes LO,HI with LO < HI, got {direct['input_range']!r}")
        direct["input_range"] = (lo, hi)
    _check_reconstruct(direct, high)
    _check_auto_bits(direct, auto, method)
    _check_act_budget(direct, act)
    calib = _calib_spec(options)
    preprocessing = resolve_preprocessing(calib.mean, calib.std, preset=options.get("preprocess"),
                                          input_range=direct.get("input_range"))
    if preprocessing is not None and options.get("preprocess") is not None:  # a preset fills the prior's space
        calib = replace(calib, mean=preprocessing.mean, std=preprocessing.std, mean_std_source=preprocessing.source)
    if "input_range" not in direct and preprocessing is not None:
        direct["input_range"] = preprocessing.input_range
    squant = SQuantOptions(tuple(options["squant_stages"])) if options.get("squant_stages") else SQuantOptions()
    return QuantConfig(method=method, bits=low, high_bits=high, act_bits=act, per_channel=granularity == "channel",
                       auto_bits=auto, calib=calib, squant=squant,
                       dfmpc=DFMPCOptions.from_mapping(options.get("dfmpc")),
                       preprocessing=preprocessing, **direct)


def torch_available() -> bool:
    """Whether the synth extra's PyTorch can be imported (found, not imported: importing it takes seconds)."""
    return importlib.util.find_spec("torch") is not None


def _check_reconstruct(direct: dict[str, Any], high: int | None) -> None:
    """--reconstruct and --first-last-bits: values in range, and the synth extra (torch) at hand."""
    first_last = direct.get("first_last_bits")
    if first_last is not None and not 2 <= int(first_last) <= 8:
        raise OptionError(f"--first-last-bits must be in 2..8, got {first_last}")
    if first_last is not None and high is not None:
        raise OptionError("--first-last-bits sets uniform widths' ends; DF-MPC chooses its own pairs (--bits LOW/HIGH)")
    if direct.get("reconstruct_compile") is not None and not direct.get("reconstruct"):
        raise OptionError("--reconstruct-compile / --no-reconstruct-compile run --reconstruct's steps: give "
                          "--reconstruct")
    if direct.get("pseudo_bn") is not None and not direct.get("reconstruct"):
        raise OptionError("--pseudo-bn / --no-pseudo-bn choose --reconstruct's samples: give --reconstruct")
    loss = direct.get("reconstruct_loss")
    if loss is not None and loss not in RECONSTRUCT_LOSSES:
        raise OptionError(f"--reconstruct-loss must be one of {', '.join(RECONSTRUCT_LOSSES)}, got {loss!r}")
    mix = direct.get("reconstruct_input_mix")
    if mix is not None and not 0.0 <= float(mix) <= 1.0:
        raise OptionError(f"--reconstruct-input-mix must be in 0..1, got {mix}")
    for key, least in (("reconstruct_steps", 0), ("reconstruct_samples", 1)):
        if direct.get(key) is not None and int(direct[key]) < least:
            raise OptionError(f"--{key.replace('_', '-')} must be >= {least}, got {direct[key]}")
    if direct.get("reconstruct"):
        if not torch_available():
            raise OptionError("--reconstruct runs on PyTorch, which is not installed: pip install "
                              "'onnxdfq[synth]' torch==2.13.0 (the pin takes the CPU build)")


def _check_act_budget(direct: dict[str, Any], act_bits: int | None) -> None:
    """--avg-act-bits: activations at 4 bits or --act-bits, on average within the budget."""
    if direct.get("avg_act_bits") is None:
        return
    value = float(direct["avg_act_bits"])
    low = min(AUTO_ACT_WIDTHS)
    if act_bits is None or direct.get("fmt") == "fakequant":
        raise OptionError("--avg-act-bits chooses activation widths: it needs quantized activations (--act-bits) "
                          "and a QDQ format")
    if act_bits <= low:
        raise OptionError(f"--avg-act-bits chooses between {low} bits and --act-bits: give --act-bits above {low}, "
                          f"got {act_bits}")
    if not low <= value <= act_bits:
        raise OptionError(f"--avg-act-bits must be between {low} and --act-bits ({act_bits}), got {value:g}")
    direct["avg_act_bits"] = value


def _check_auto_bits(direct: dict[str, Any], auto: bool, method: str) -> None:
    """--bits auto takes exactly one budget (--avg-bits or --size-budget); the budgets need --bits auto."""
    budgets = [key for key in ("avg_bits", "size_budget") if direct.get(key) is not None]
    if not auto:
        if budgets:
            raise OptionError(f"--{budgets[0].replace('_', '-')} is a budget for per-layer widths: give --bits auto")
        if direct.get("dfmpc_pairs") is not None:
            raise OptionError("--dfmpc-pairs / --no-dfmpc-pairs choose --bits auto's candidates: give --bits auto")
        return
    if len(budgets) != 1:
        raise OptionError("--bits auto needs one budget: --avg-bits N (grid bits per weight, e.g. 4.5) or "
                          "--size-budget F (fraction of the FP32 file, packed, e.g. 0.25)")
    if method == "dfmpc":
        raise OptionError("--bits auto chooses one width per layer with the method's rounding; DF-MPC pairs its "
                          "own LOW/HIGH layers: use --method squant (default), nearest or dfq")
    widths = tuple(sorted({int(b) for b in direct.get("auto_widths") or AUTO_WIDTHS}))
    if not all(2 <= b <= 8 for b in widths):
        raise OptionError(f"candidate widths must be in 2..8, got {list(widths)}")
    direct["auto_widths"] = widths
    if direct.get("avg_bits") is not None:
        value = float(direct["avg_bits"])
        if not widths[0] <= value <= widths[-1]:
            raise OptionError(f"--avg-bits must be between {widths[0]} and {widths[-1]} (the candidate widths), "
                              f"got {value:g}")
        direct["avg_bits"] = value
    if direct.get("size_budget") is not None:
        value = float(direct["size_budget"])
        if not 0 < value <= 1:
            raise OptionError(f"--size-budget is a fraction of the FP32 file in (0, 1], got {value:g}")
        direct["size_budget"] = value
        fmt = direct.get("fmt", "qdq")
        if fmt == "fakequant":
            raise OptionError("--size-budget counts the packed QDQ file; --format fakequant stores float weights")
        direct["fmt"] = "qdq-packed"  # the budget counts packed weights: the file must hold them packed
    if direct.get("sensitivity", "measured") not in SENSITIVITY_MODES:
        raise OptionError(f"--sensitivity must be one of {', '.join(SENSITIVITY_MODES)}, "
                          f"got {direct['sensitivity']!r}")


def _calib_spec(options: dict[str, Any]) -> CalibSpec:
    calib = options.get("calib")
    spec_fields = {name: options[key] for key, name in CALIB_OPTIONS.items() if options.get(key) is not None}
    if isinstance(calib, CalibSpec):
        if spec_fields:
            raise OptionError(f"calib is a CalibSpec; set {', '.join(spec_fields)} on it, not beside it")
        return calib
    return CalibSpec.parse(calib, **spec_fields)
