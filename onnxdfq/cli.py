"""Command line: quantize, eval, compare, synth, inspect, demo. The only module that prints."""

from __future__ import annotations

import functools
import io
import json
import logging
import signal
import sys
import tempfile
import time
from pathlib import Path

import click
import numpy as np

from onnxdfq.errors import DataError, FidelityError, OnnxDfqError, OptionError
from onnxdfq.preprocessing import PREPROCESS_HELP, resolve_preprocessing

logger = logging.getLogger("onnxdfq")


PROVIDER_CHOICES = ["cpu", "cuda", "tensorrt", "openvino"]
PROVIDER_HELP = ("onnxruntime execution provider: cpu, cuda or tensorrt (never a silent fallback to the CPU: an error "
                 "instead), or openvino (OpenVINO's CPU runtime; pip install 'onnxdfq[openvino]').")


def _terminate(signum, frame) -> None:
    raise SystemExit(128 + signum)  # unwinds like Ctrl-C: atomic writers remove their temporary files


def _friendly(func):
    """Turn onnxdfq errors into one line on stderr and exit status 2 (no traceback); SIGTERM exits cleanly."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        signal.signal(signal.SIGTERM, _terminate)
        try:
            return func(*args, **kwargs)
        except OnnxDfqError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(getattr(exc, "exit_code", 2))  # 2: bad input; 3: made, but failed its output check
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)

    return wrapper


def _floats(text: str | None, flag: str) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise OptionError(f"{flag} takes comma-separated numbers, got {text!r}") from None


def _size(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        parts = [int(v) for v in text.lower().replace("x", ",").split(",")]
    except ValueError:
        raise OptionError(f"--size takes N or H,W, got {text!r}") from None
    return (parts[0], parts[0]) if len(parts) == 1 else (parts[0], parts[1])


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(out)


def _progress(total: int | None, desc: str, quiet: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=True if quiet else None, file=sys.stderr, leave=False)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="onnxdfq")
@click.option("-v", "--verbose", is_flag=True, help="Log what every pass does.")
def main(verbose: bool) -> None:
    """onnxdfq: quantize ONNX models without data (BN folding, DFQ, SQuant, DF-MPC) to QDQ ONNX."""
    # the commands print the passes' warnings themselves (from the report); logging adds detail with -v
    logging.basicConfig(level=logging.INFO if verbose else logging.ERROR, format="%(levelname)s: %(message)s")


def _methods() -> list[str]:
    from onnxdfq.config import METHODS

    return sorted(METHODS)


@main.command()
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the quantized model (never the input).")
@click.option("--method", default=None, type=click.Choice(_methods()),
              help="[default: squant; gptq with --reconstruct below 8 bits, the better start to learn from] "
                   "squant (SQuant rounding + bias correction: the best W8A8 measured), nearest (round to nearest, "
                   "no correction), dfq (cross-layer equalization, high-bias absorption, bias correction: per-tensor "
                   "weights, depthwise nets), dfmpc (mixed precision --bits LOW/HIGH), gptq (GPTQ rounding through "
                   "each layer's input Hessian on generated samples, + bias correction: 4-bit weights; DFFG samples "
                   "from the BN statistics need the synth extra).")
@click.option("--bits", default="8", show_default=True,
              help="Weight bits 2..8, LOW/HIGH for dfmpc (e.g. 2/6), or auto: a width per layer chosen without data "
                   "under --avg-bits or --size-budget.")
@click.option("--avg-bits", type=float, default=None, metavar="B",
              help="With --bits auto: average weight bits over the parameters (e.g. 4.5).")
@click.option("--size-budget", type=float, default=None, metavar="F",
              help="With --bits auto: the output file at most this fraction of the FP32 file (e.g. 0.25); weights "
                   "packed (INT4 up to 4 bits, INT2 at 2 bits, which runs unfused in onnxruntime).")
@click.option("--sensitivity", type=click.Choice(["measured", "proxy"]), default="measured", show_default=True,
              help="With --bits auto: each layer's cost at each width measured at the output on calibration "
                   "samples (prior images unless --calib gives samples), or a proxy from weight noise and the "
                   "layer statistics, with no inference.")
@click.option("--dfmpc-pairs/--no-dfmpc-pairs", default=None,
              help="With --bits auto and measured sensitivity: DF-MPC's compensated pairs (a ternary low "
                   "layer, the next at a wider width, rescaled; layers with BN statistics only) are candidates "
                   "beside plain widths (default: on).")
@click.option("--avg-act-bits", type=float, default=None, metavar="B",
              help="Activations at 4 bits where they cost least and at --act-bits elsewhere, B bits on average "
                   "over the activation elements of one image; each activation's cost measured at the output on "
                   "calibration samples, like --bits auto's.")
@click.option("--act-bits", default="auto", show_default=True,
              help="Activation bits 2..8, 'none' (float), or auto: 8, and none (float) for dfmpc.")
@click.option("--dfmpc-opt", "dfmpc_opts", multiple=True, metavar="KEY=VALUE",
              help="DF-MPC option, repeatable: quantizer (corr|lsq|absmax|twn), refine_steps, sigma_model "
                   "(tap|regression|blend), low_rule (first|spatial|last), reestimate (none|mean|mean+std), rho "
                   "(number or fit), high_gain, high_correction (none|lsq), shortcut_corr, compensate, lambda1, "
                   "lambda2; defaults in onnxdfq.config.DFMPCOptions.")
@click.option("--granularity", type=click.Choice(["channel", "tensor", "per-channel", "per-tensor"]),
              default="channel", show_default=True,
              help="Weight scales per output channel or per tensor.")
@click.option("--cle/--no-cle", default=None, help="Cross-layer equalization (default: on for dfq).")
@click.option("--absorb-bias/--no-absorb-bias", default=None, help="High-bias absorption (default: on for dfq).")
@click.option("--bias-correction/--no-bias-correction", default=None,
              help="Analytic bias correction from the statistics (default: on for squant, dfq and dfmpc).")
@click.option("--squant-stages", default=None, help="SQuant stages, e.g. e,k,c (default: all).")
@click.option("--sigmas", type=click.FloatRange(0, min_open=True), default=None,
              help="Activation range = BN mean +- this many std (default 6; 4 below 6-bit activations).")
@click.option("--input-range", default=None, help="LO,HI of the network input (default -3,3).")
@click.option("--mean", default=None, help="Input preprocessing mean (0-1 scale), with --std: sets the input range "
                                           "exactly, and is written into the output for eval / compare.")
@click.option("--std", default=None, help="Input preprocessing std (0-1 scale), with --mean.")
@click.option("--preprocess", default=None, metavar="PRESET",
              help="Named preprocessing instead of --mean/--std: " + PREPROCESS_HELP + ".")
@click.option("--size", default=None,
              help="Image size N or H,W for models whose input size is dynamic (default: the model's, else 224).")
@click.option("--reduce-range", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
              help="7-bit weights where an 8-bit input is signed (avoids int16 saturation in x86 kernels).")
@click.option("--calib", default="auto", show_default=True,
              help="Statistics and activation ranges from: auto (bn when the model kept its BatchNormalization, "
                   "prior otherwise), bn (BN statistics, no data), prior[:auto|pink|dead_leaves|mixed|ensemble] "
                   "(procedural images in the model's input space, no data; auto: pink below 128 px, a pink/dead-"
                   "leaves ensemble from 128 px; give --mean/--std), synth:zeroq|dsg|dffg (samples "
                   "generated from the BN statistics; needs the synth extra), synth:invert (images the classifier "
                   "assigns to random classes: for a model without BN; auto keeps the prior's statistics and learns "
                   "on these for one under 128 px with --reconstruct or --method gptq), or data:PATH.npz (x float32 "
                   "NCHW preprocessed, or uint8 NHWC images with --mean/--std).")
@click.option("--calib-range", type=click.Choice(["mse", "percentile", "minmax"]), default="mse",
              show_default=True, help="Range estimator for --calib synth:/data: (MSE-optimal clipping at --act-bits).")
@click.option("--calib-samples", type=click.IntRange(1), default=None,
              help="Samples to generate (default 256; dffg on the CPU: 128 in 60 steps, under a minute for "
                   "ResNet-20) or to use from data: (default all).")
@click.option("--calib-percentile", type=click.FloatRange(50, 100, min_open=True), default=99.99, show_default=True,
              help="Percentile of |x| per side for --calib-range percentile.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of --calib synth:.")
@click.option("--synth-steps", type=click.IntRange(1), default=None,
              help="Generator steps per batch for generated samples (--calib synth:, and the DFFG or inverted samples "
                   "--reconstruct and --method gptq learn on; default: the method's, DFFG 60 on the CPU, and 180 for "
                   "the samples --reconstruct and gptq learn on from 128 px under 4-bit activations). MobileNet-V1 "
                   "--reconstruct W4A4: 50.00 % at 60 steps, 55.38 at 180; W4A8: 72.92 at 60, 71.38 at 180.")
@click.option("--synth-opt", "synth_opts", multiple=True, metavar="KEY=VALUE",
              help="Generator option, repeatable, for generated samples as --synth-steps (DFFG: alpha, keep, stride, "
                   "init=noise|pink|dead_leaves, blur SIGMA_PX, jitter PX, flip; see onnxdfq.synth.dffg). "
                   "EfficientNet-Lite0 W4A8 --method gptq: 74.42 % with the defaults, 78.17 with init=pink blur=1 "
                   "alpha=0.05 (natural-looking samples); MobileNet-V1: 72.08 and 70.77.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="Torch device that generates --calib synth: samples and runs --reconstruct.")
@click.option("--format", "fmt", type=click.Choice(["qdq", "qdq-packed", "fakequant"]), default="qdq",
              show_default=True,
              help="QDQ graph; QDQ with 4-/2-bit weights packed as INT4 (opset 21) / INT2 (opset 25) "
                   "initializers; or float weights already rounded (for runtimes without QDQ).")
@click.option("--target", type=click.Choice(["ort", "trt"]), default="ort", show_default=True,
              help="Runtime the QDQ layout is for: ort (onnxruntime CPU/CUDA, OpenVINO: uint8 activations) or trt "
                   "(TensorRT explicit quantization: symmetric int8 activations, zero point 0).")
@click.option("--quantize-outputs", is_flag=True,
              help="Also quantize tensors that leave the graph (logits, through Flatten/Reshape/Softmax); "
                   "by default they stay float, which costs no speed and keeps argmax exact.")
@click.option("--reconstruct", is_flag=True,
              help="Block reconstruction after the grids are decided (4 bits and below): each block's weight "
                   "roundings and activation step sizes are learnt so that its output matches FP32 on calibration "
                   "samples (DFFG samples for a model with BN; without BN, samples from inverting the classifier "
                   "under 128 px and prior images from 128 px up; --calib data: uses yours). "
                   "Needs the synth extra (PyTorch); --device cuda runs it on a GPU.")
@click.option("--reconstruct-steps", type=click.IntRange(0), default=None,
              help="Optimiser steps per block for --reconstruct (default 500; 1000 from 128 px up when every "
                   "activation is 8-bit: MobileNet-V1 W4A8 73.8-75.3 % against 72.9-73.0 at 500).")
@click.option("--reconstruct-samples", type=click.IntRange(1), default=None,
              help="Samples --reconstruct and --method gptq learn on (default 256; 128 from 128 px up, where more are "
                   "held in float16: MobileNet-V1 W4A8 at 256 73.2-74.1 % against 72.9-73.0, at 500 steps a block).")
@click.option("--reconstruct-loss", type=click.Choice(["fisher", "mse"]), default=None,
              help="--reconstruct's loss a block (default mse: every output channel's squared error alike). fisher "
                   "weights each channel's error, per sample, by how much it moves the FP32 model's prediction "
                   "(BRECQ's Fisher weighting, classes drawn from the model's own prediction: no labels): "
                   "EfficientNet-Lite0 W4A8 80.15 / 78.77 %% (seeds 0 / 1) against 79.38 / 78.92, MobileNet-V1 W4A8 "
                   "74.23 against 75.31, ResNet-20 W4A4 87.73 against 88.16.")
@click.option("--reconstruct-input-mix", type=click.FloatRange(0.0, 1.0), default=None, metavar="P",
              help="--reconstruct: the chance that each element of a block's input comes from the FP32 model while "
                   "it learns, else from the blocks already reconstructed (QDrop; 0: the quantized path only; "
                   "default 0.5 from 500 steps a block, 0 below: its noise needs the steps). At 0.5 "
                   "EfficientNet-Lite0 W4A8 scored 80.08 / 78.85 %% (seeds 0 / 1) against 79.38 / 78.92 at 0, "
                   "ResNet-20 W4A4 88.51 against 88.16, MobileNet-V1 W4A8 75.08 against 75.31.")
@click.option("--reconstruct-compile/--no-reconstruct-compile", default=None,
              help="--reconstruct: run each block's learning steps under torch.compile (needs a C++ compiler on the "
                   "CPU; a failure falls back to eager with a warning). Default: on the CPU for images from 128 px "
                   "at 500 steps a block or more, where MobileNet-V1's steps ran about 2x faster after 1-5 min of "
                   "compiling; off for small inputs (ResNet-20 at 32 px gains little) and on CUDA, where "
                   "it also replays each step as a CUDA graph but is not measured yet.")
@click.option("--pseudo-bn/--no-pseudo-bn", default=None,
              help="With --reconstruct on a model without BN: learn on DFFG samples matched to the statistics the "
                   "prior images measured (pseudo-BN) instead of on the prior images themselves (default: the "
                   "images; pseudo-BN measured +0.5 on a folded ResNet-20 W4A4, far worse at 224 px).")
@click.option("--first-last-bits", type=click.IntRange(2, 8), default=None, metavar="N",
              help="Keep the first layer (weights and input) and the last layer (weights and input) at N bits: "
                   "the protocol low-bit papers report (e.g. --bits 4 --act-bits 4 --first-last-bits 8).")
@click.option("--report", "report_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write a JSON report (per-layer bits, scales, SQNR, activation range sources, timings).")
@click.option("--allow-broken", is_flag=True,
              help="Write the output even when the check grades it broken (its output no longer follows the FP32 "
                   "model); without it such a run exits with status 3 and writes nothing.")
@click.option("--min-sqnr", type=float, default=None, metavar="DB",
              help="Exit with status 3, writing nothing, when an output's SQNR on the probe images is below DB.")
@click.option("-q", "--quiet", is_flag=True, help="Print only warnings and errors.")
@_friendly
def quantize(model: Path, output: Path, method: str | None, bits: str, avg_bits: float | None,
             size_budget: float | None, sensitivity: str, dfmpc_pairs: bool | None, avg_act_bits: float | None,
             act_bits: str, dfmpc_opts: tuple[str, ...],
             granularity: str,
             cle: bool | None, absorb_bias: bool | None, bias_correction: bool | None, squant_stages: str | None,
             sigmas: float,
             input_range: str | None, mean: str | None, std: str | None, preprocess: str | None, size: str | None,
             reduce_range: str, calib: str,
             calib_range: str, calib_samples: int | None, calib_percentile: float, seed: int, synth_steps: int | None,
             synth_opts: tuple[str, ...],
             device: str, fmt: str,
             target: str, quantize_outputs: bool, reconstruct: bool, reconstruct_steps: int | None,
             reconstruct_samples: int | None, reconstruct_loss: str | None,
             reconstruct_input_mix: float | None, reconstruct_compile: bool | None, pseudo_bn: bool | None,
             first_last_bits: int | None,
             report_path: Path | None,
             allow_broken: bool, min_sqnr: float | None, quiet: bool) -> None:
    """Quantize MODEL without data (or calibrated on --calib samples) and write a QDQ ONNX model to --output.

    The output is checked before it is written (ONNX checker, onnxruntime, fidelity against MODEL on
    prior images); the summary says how many layers and layer inputs are quantized and where the
    statistics came from.
    """
    from onnxdfq.graph.io import ensure_distinct_paths, ensure_writable
    from onnxdfq.pipeline import quantize_model, save_quantized

    ensure_distinct_paths(model, output)
    ensure_writable(output, "-o")
    if report_path is not None:
        ensure_distinct_paths(model, report_path)
        ensure_distinct_paths(output, report_path, what="--report path", other="the output model")
        ensure_writable(report_path, "--report")
    lohi = _floats(input_range, "--input-range") if input_range is not None else None
    if lohi is not None and len(lohi) != 2:
        raise OptionError(f"--input-range takes LO,HI with LO < HI, got {input_range!r}")
    options = dict(cle=cle, absorb_bias=absorb_bias, bias_correction=bias_correction, sigmas=sigmas,
                   input_range=lohi, fmt=fmt, target=target, quantize_outputs=quantize_outputs,
                   squant_stages=tuple(v.strip() for v in squant_stages.split(",")) if squant_stages else None,
                   dfmpc=_key_value_options(dfmpc_opts, "--dfmpc-opt") if dfmpc_opts else None,
                   reduce_range={"auto": "auto", "on": True, "off": False}[reduce_range],
                   calib=calib, calib_range=calib_range, calib_samples=calib_samples,
                   calib_percentile=calib_percentile, seed=seed, device=device,
                   synth_options=_synth_options(synth_opts, synth_steps),
                   mean=_floats(mean, "--mean"), std=_floats(std, "--std"), preprocess=preprocess, size=_size(size),
                   reconstruct=reconstruct or None, reconstruct_steps=reconstruct_steps,
                   reconstruct_samples=reconstruct_samples, reconstruct_loss=reconstruct_loss,
                   reconstruct_input_mix=reconstruct_input_mix, reconstruct_compile=reconstruct_compile,
                   pseudo_bn=pseudo_bn,
                   first_last_bits=first_last_bits,
                   avg_bits=avg_bits, size_budget=size_budget,
                   sensitivity=sensitivity if bits.strip().lower() == "auto" else None, dfmpc_pairs=dfmpc_pairs,
                   avg_act_bits=avg_act_bits)
    start = time.perf_counter()
    progress = _loss_bar("synth", quiet, "loss")
    progress.reconstruct = _block_bar(quiet)
    progress.allocation = _count_bar("sensitivity", "run", quiet)
    result = quantize_model(str(model), method=method, bits=bits, act_bits=act_bits, granularity=granularity,
                            calib_progress=progress,
                            **{k: v for k, v in options.items() if v is not None})
    report = result.report
    try:
        save_quantized(result, output, allow_broken=allow_broken, min_sqnr=min_sqnr)
    except FidelityError:
        report.update(output="not written", output_bytes=0)
        _print_outcome(report, model, quiet, start)
        raise
    if report_path is not None:
        report["timings_s"]["wall"] = round(time.perf_counter() - start, 4)
        _write_json_atomic(report, report_path)
    _print_outcome(report, model, quiet, start)


def _print_outcome(report: dict, model: Path, quiet: bool, start: float) -> None:
    """Warnings always (-q too), then the summary table and the notes unless quiet."""
    report["timings_s"]["wall"] = round(time.perf_counter() - start, 4)
    for warning in report["warnings"]:
        click.echo(f"warning: {warning}", err=True)
    if not quiet:
        click.echo(_summary(report, model))
        for note in report["speed_notes"]:
            click.echo(f"speed: {note}", err=True)
        if report["statistics"].get("hint"):
            click.echo(f"note: {report['statistics']['hint']}", err=True)


def _loss_bar(desc: str, quiet: bool, label: str = "BN loss"):
    """A progress callback (step, total, loss): a tqdm bar with the generator's loss (``label``: the BN loss, or
    inversion's cross-entropy) and the time left on a terminal; elsewhere (a log, CI) a line with the time left
    every 10 % of the steps."""
    from tqdm import tqdm

    state: dict = {}
    interactive = sys.stderr.isatty()

    def update(step: int, total: int, loss: float) -> None:
        if quiet:
            return
        if not interactive:
            _log_tenths(state, step, total, lambda left: f"{desc}: {step}/{total} steps, {label} {loss:.4g}, "
                                                         f"about {left:.0f} s left")
            return
        if "bar" not in state:
            state["bar"] = tqdm(total=total, desc=desc, unit="step", file=sys.stderr, leave=False,
                                bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} steps [{elapsed}<{remaining}] {postfix}")
        bar = state["bar"]
        bar.set_postfix_str(f"{label.replace(' ', '_')}={loss:.4g}", refresh=False)
        bar.update(step - bar.n)
        if step >= total:
            bar.close()

    return update


def _block_bar(quiet: bool):
    """A progress callback (block, blocks, first layer, step, steps) for --reconstruct: a tqdm bar per block with
    its time left on a terminal; elsewhere a line per block with the time left for the whole run."""
    from tqdm import tqdm

    state: dict = {}
    interactive = sys.stderr.isatty()

    def update(block: int, blocks: int, layer: str, step: int, steps: int) -> None:
        if quiet:
            return
        now = time.perf_counter()
        state.setdefault("start", now)
        if not interactive:
            if step >= steps and state.get("said") != block:
                state["said"] = block
                done = (block + 1) / blocks
                left = (now - state["start"]) / done * (1 - done)
                click.echo(f"reconstruct: block {block + 1}/{blocks} ({layer}) done, about {left:.0f} s left", err=True)
            return
        if state.get("block") != block:
            if "bar" in state:
                state["bar"].close()
            state["block"] = block
            state["bar"] = tqdm(total=steps, desc=f"reconstruct {block + 1}/{blocks} {layer}", unit="step",
                                file=sys.stderr, leave=False)
        bar = state["bar"]
        bar.update(step - bar.n)
        if step >= steps and block + 1 == blocks:
            bar.close()

    return update


def _log_tenths(state: dict, done: int, total: int, line) -> None:
    """Off a terminal (a log, CI): print ``line(seconds left)`` each time another tenth of the work is done."""
    now = time.perf_counter()
    state.setdefault("start", now)
    tenth = done * 10 // max(total, 1)
    if tenth > state.get("tenth", 0):
        state["tenth"] = tenth
        click.echo(line((now - state["start"]) / done * (total - done)), err=True)


def _count_bar(desc: str, unit: str, quiet: bool):
    """A progress callback (done, total): a tqdm bar on a terminal, a line every 10 % elsewhere."""
    from tqdm import tqdm

    state: dict = {}

    def update(done: int, total: int) -> None:
        if quiet:
            return
        if not sys.stderr.isatty():
            _log_tenths(state, done, total, lambda left: f"{desc}: {done}/{total} {unit}s, about {left:.0f} s left")
            return
        if "bar" not in state:
            state["bar"] = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, leave=False)
        state["bar"].update(done - state["bar"].n)
        if done >= total:
            state["bar"].close()

    return update


def _pass_entry(report: dict, name: str) -> dict | None:
    """The report entry of the pass called ``name`` (None when the run had no such pass)."""
    return next((p for p in report["passes"] if p["name"] == name), None)


def _allocation_rows(report: dict) -> list[list[str]]:
    """Summary rows for --bits auto: the budget, what was chosen, how many layers got each width."""
    entry = _pass_entry(report, "bit_allocation")
    if entry is None:
        return []
    p = entry["params"]
    counts: dict[int, int] = {}
    for row in entry["layers"].values():
        counts[row["bits"]] = counts.get(row["bits"], 0) + 1
    for bits in p["fixed"].values():
        counts[bits] = counts.get(bits, 0) + 1
    budget = f"{p['budget_value']:g} bits a weight" if p["budget"] == "avg_bits" else \
        f"{p['budget_value'] / 1024:.1f} KiB file"
    samples = (_pass_entry(report, "bit_allocation_samples") or {}).get("params", {})
    how = f"measured on {samples['samples']} {samples['source']} samples ({samples.get('runs', 0)} runs)" \
        if p["sensitivity"] == "measured" else "proxy (no inference)"
    rows = [["bit allocation", f"budget {budget}; {p['average_bits']:.2f} bits on average; sensitivity {how}"],
            ["layers per width", ", ".join(f"{b}-bit: {n}" for b, n in sorted(counts.items()))]]
    if p.get("dfmpc_pairs_offered"):
        chosen = p.get("dfmpc_pairs", [])
        rows.append(["DF-MPC pairs", f"{len(chosen)} of {p['dfmpc_pairs_offered']} offered chosen"
                     + "".join(f"; {low} {lb}-bit -> {high} {hb}-bit" for low, high, lb, hb in chosen[:4])
                     + ("; ..." if len(chosen) > 4 else "")])
    return rows


def _act_allocation_rows(report: dict) -> list[list[str]]:
    entry = _pass_entry(report, "act_width_allocation")
    if entry is None:
        return []
    p = entry["params"]
    samples = (_pass_entry(report, "act_width_allocation_samples") or {}).get("params", {})
    return [["activation widths", f"budget {p['budget_avg_act_bits']:g} bits an element; "
                                  f"{p['average_act_bits']:.2f} on average; {p['narrow_tensors']} of {p['tensors']} "
                                  f"tensors at {min(p['widths'])} bits; sensitivity measured on "
                                  f"{samples.get('samples', 0)} {samples.get('source', '')} samples "
                                  f"({samples.get('runs', 0)} runs)"]]


def _hessian_rows(report: dict) -> list[list[str]]:
    params = _pass_entry(report, "hessians")
    quant = _pass_entry(report, "weight_quant")
    if params is None:
        return []
    p = params["params"]
    ratios = [row["output_error_vs_nearest"] for row in (quant or {}).get("layers", {}).values()
              if "output_error_vs_nearest" in row]
    median = f"; layer output error vs nearest rounding: median {float(np.median(ratios)):.2f}" if ratios else ""
    return [["GPTQ Hessians", f"{p['layers']} layers on {p['samples']} {p['source']} samples, {p['seconds']:.1f} s"
                              f"{median}"]]


def _reconstruct_rows(report: dict) -> list[list[str]]:
    params = _pass_entry(report, "reconstruct")
    if params is None or "skipped" in params["params"]:
        return []
    blocks = list(params["layers"].values())
    before = sum(b["mse_before"] for b in blocks)
    after = sum(b["mse_after"] for b in blocks)
    p = params["params"]
    info = p.get("sample_info", {})
    generated = info.get("steps")  # the generator's steps a batch (they follow --act-bits)
    chosen = " ".join(f"{key}={value}" for key, value in info.get("options", {}).items())
    details = ", ".join(part for part in (f"{generated} generator steps" if generated else "", chosen) if part)
    source = f"{p['source']} samples" + (f" ({details})" if details else "")
    loss = p.get("loss", "mse") + (f" (weights {p['fisher_seconds']:.1f} s)" if p.get("fisher_seconds") else "")
    return [["reconstruction", f"{p['blocks']} blocks, {p['samples']} {source}, {p['steps']} steps "
                               f"a block, {loss} loss, inputs {p.get('input_mix', 0.0):g} FP32, "
                               f"{p['seconds']:.1f} s{' compiled' if p.get('compiled') else ''}; block output MSE "
                               f"summed {before:.4g} -> {after:.4g}"]]


def _dfmpc_rows(report: dict) -> list[list[str]]:
    """Summary rows for a DF-MPC run: the pairs, the unpaired layers, the weight storage."""
    params = (_pass_entry(report, "dfmpc") or {}).get("params")
    if params is None:
        return []
    pairs = params["pairs"]
    shown = ", ".join(f"{low}->{high}" for low, high in pairs[:3]) + (" ..." if len(pairs) > 3 else "")
    return [["DF-MPC pairs (low->high)", f"{len(pairs)}: {shown}" if pairs else "none"],
            ["DF-MPC unpaired (high)", f"{len(params['unpaired'])}: " + ", ".join(
                f"{name} ({why.split(' (')[0]})" for name, why in list(params["unpaired"].items())[:3])
             + (" ..." if len(params["unpaired"]) > 3 else "")],
            ["weight storage", f"{report['weight_storage_bytes'] / 1024:.1f} KiB at "
                               f"{report['average_weight_bits']:.2f} bits on average"]]


def _key_values(items: tuple[str, ...], flag: str) -> list[tuple[str, str]]:
    """Repeated FLAG KEY=VALUE options as stripped (key, value) pairs; a malformed one is an OptionError."""
    pairs = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise OptionError(f"{flag} takes KEY=VALUE, got {item!r}")
        pairs.append((key.strip(), value.strip()))
    return pairs


def _key_value_options(pairs: tuple[str, ...], flag: str) -> dict:
    """KEY=VALUE pairs of a repeatable ``flag`` (--dfmpc-opt, --synth-opt) -> numbers, booleans and strings."""
    options: dict = {}
    for key, text in _key_values(pairs, flag):
        if text.lower() in ("true", "on", "yes", "false", "off", "no"):
            options[key] = text.lower() in ("true", "on", "yes")
            continue
        try:
            options[key] = float(text)
        except ValueError:
            options[key] = text
    return options


def _synth_options(pairs: tuple[str, ...], steps: int | None) -> dict | None:
    """--synth-opt KEY=VALUE pairs and --synth-steps -> the generator's keyword options (whole numbers as int)."""
    options = {key: int(value) if isinstance(value, float) and value.is_integer() else value
               for key, value in _key_value_options(pairs, "--synth-opt").items()}
    if steps:
        options["steps"] = steps
    return options or None


def _write_json_atomic(data: dict, path: Path) -> None:
    from onnxdfq.graph.io import write_text_atomic

    write_text_atomic(json.dumps(data, indent=1), path)


def _mean_flip_rows(report: dict) -> list[list[str]]:
    params = (_pass_entry(report, "weight_quant") or {}).get("params", {})
    counts = params.get("mean_weighted_flips")
    if not counts:
        return []
    return [["mean-weighted flips", f"{counts.get('stream', 0)} layers reading linear streams, "
                                    f"{counts.get('clipped', 0)} reading ReLU outputs (prior means: rounded to "
                                    "need them less)"]]


def _summary(report: dict, model: Path) -> str:
    layers = report["layers"]
    sqnrs = [v["weight_sqnr_db"] for v in layers.values() if isinstance(v.get("weight_sqnr_db"), (int, float))]
    cfg = report["config"]
    rows = [
        ["model", str(model)],
        ["method", f"{cfg['method']}  W{'auto' if cfg.get('auto_bits') else cfg['bits']}"
                   f"{'/' + str(cfg['high_bits']) if cfg['high_bits'] else ''}"
                   f"  A{cfg['act_bits'] or 'fp32'}  {'per-channel' if cfg['per_channel'] else 'per-tensor'}"
                   f"{'  target ' + cfg['target'] if cfg.get('target', 'ort') != 'ort' else ''}"],
        ["layers quantized", f"{len(layers)}  (avg {report['average_weight_bits']:.2f} weight bits)"],
        ["layer inputs quantized", _coverage_line(report["layer_inputs"])],
        *_dfmpc_rows(report),
        *_allocation_rows(report),
        *_act_allocation_rows(report),
        ["layer statistics", _statistics_line(report["statistics"])],
        ["7-bit (reduce-range)", _names(report["reduced_range_layers"])],
        ["steps not run", ", ".join(f"{k} ({v})" for k, v in report["skipped"]["steps"].items()) or "-"],
        ["weight SQNR dB", f"min {min(sqnrs):.1f}  median {float(np.median(sqnrs)):.1f}" if sqnrs else "-"],
        *_mean_flip_rows(report),
        ["calibration", _calib_line(report.get("calibration", {}))],
        *_hessian_rows(report),
        *_reconstruct_rows(report),
        ["activation ranges", ", ".join(f"{k}: {v}" for k, v in sorted(report["activation_sources"].items()))
         or "none (float activations)"],
        *_fidelity_rows(report["fidelity"]),
        ["time", f"{report['timings_s']['total']:.2f} s quantize, {report['timings_s']['wall']:.2f} s with checks"],
        ["output", f"{report['output']}  ({report['output_bytes'] / 1e6:.2f} MB)" if report["output_bytes"]
         else "not written"],
    ]
    return _table(rows, ["", ""]).split("\n", 2)[2]


def _names(names: list[str], shown: int = 3) -> str:
    """'a, b, c (+12 more)' for a long list of layer names; '-' for none."""
    if not names:
        return "-"
    return ", ".join(names[:shown]) + (f" (+{len(names) - shown} more)" if len(names) > shown else "")


def _fidelity_rows(fidelity: dict) -> list[list[str]]:
    """One row per output (SQNR, cosine), top-1 agreement for a classifier, on what inputs."""
    rows = []
    for index, out in enumerate(fidelity["outputs"]):
        label = f"fidelity: {out['name']}" if len(fidelity["outputs"]) > 1 else "fidelity (output)"
        line = f"SQNR {out['sqnr_db']:.1f} dB  cosine {out['cosine']:.4f}  centered {out['centered_cosine']:.2f}"
        if not out.get("exercised", True):
            line += "  (not judged: the FP32 output is nearly constant on these inputs; check on real data)"
        if index == 0 and fidelity.get("top1_agreement") is not None:
            line += f"  top-1 agree {fidelity['top1_agreement']:.2f}"
        rows.append([label, line + (f"  {out['grade'].upper()}" if out.get("grade") in ("degraded", "broken") else "")])
    rows.append(["fidelity inputs", fidelity["inputs"]])
    rows.append(["fidelity grade", FIDELITY_GRADE_TEXT.get(fidelity.get("grade"), fidelity.get("grade", "-"))])
    return rows


FIDELITY_GRADE_TEXT = {"fine": "fine", "degraded": "degraded (SQNR under 10 dB: measure top-1 on real data)",
                       "broken": "BROKEN (the output no longer follows the FP32 model)",
                       "not judged": "not judged (no output moves on the probe inputs)"}


def _coverage_line(coverage: dict) -> str:
    line = f"{coverage['quantized']} of {coverage['total']}"
    reasons: dict[str, int] = {}
    for why in coverage["float"].values():
        reasons[why] = reasons.get(why, 0) + 1
    if reasons:
        line += "  (float: " + ", ".join(f"{count} {why}" for why, count in reasons.items()) + ")"
    return line


def _statistics_line(stats: dict) -> str:
    """Where the layers' per-channel statistics came from, with counts, e.g. 'BN 0 of 56; prior 56 (256 images)'."""
    parts = [f"BN {stats['bn_layers']} of {stats['layers']} layers"]
    others = {k: v for k, v in stats["layer_sources"].items() if k != "bn"}
    for name, count in sorted(others.items()):
        if name == "none":
            parts.append(f"propagated {count}")
        else:
            parts.append(f"{name} {count}")
    line = "; ".join(parts)
    if "samples" in stats:
        detail = (f"{stats['samples']} prior images ({PRIOR_NAMES.get(stats.get('method'), stats.get('method'))})"
                  if stats["source"].startswith("prior") else f"{stats['samples']} {stats['source']} samples")
        if "seconds" in stats:
            detail += f", made in {stats['seconds']:.1f} s"
        if stats.get("input_space"):
            detail += f", input space from {stats['input_space']}"
        line += f"  ({detail})"
    return line


PRIOR_NAMES = {"ensemble": "pink noise + dead leaves, per-channel std the larger of the two", "pink": "pink noise",
               "dead_leaves": "dead leaves", "mixed": "dead leaves and pink noise pooled"}


def _calib_line(calib: dict) -> str:
    if not calib:
        return "none (float activations)"
    if calib.get("source", "bn") == "bn" or calib.get("estimator") == "statistics":
        what = "BN statistics" if calib.get("source", "bn") == "bn" else f"{calib['source']} statistics"
        line = f"{what} (mean +- {calib.get('sigmas', 6):g} std)"
        if calib.get("calibrated_tensors"):
            line += (f"; {calib['calibrated_tensors']} tensor(s) they do not describe calibrated on "
                     f"{calib['calibrated_on']}")
        return line
    line = f"{calib['source']}, {calib['samples']} samples, {calib['estimator']} estimator (A{calib['act_bits']})"
    if "bn_loss" in calib:
        line += f", BN loss {calib['bn_loss']:.4g}"
    if "seconds" in calib:
        line += f", generated in {calib['seconds']:.1f} s"
    return line


def _apply(options: list):
    """Decorate with several click options at once (a list shared by commands)."""
    def decorate(func):
        for option in reversed(options):
            func = option(func)
        return func

    return decorate


def _preprocessing_options(what: str) -> list:
    """--mean/--std, --preprocess and --input-range: how raw --data images become model inputs."""
    return [
        click.option("--mean", default=None, help=f"Per-channel mean on the 0-1 scale for {what}, with --std, "
                                                  "e.g. 0.485,0.456,0.406."),
        click.option("--std", default=None, help="Per-channel std on the 0-1 scale, with --mean."),
        click.option("--preprocess", default=None, metavar="PRESET",
                     help="Named preprocessing instead of --mean/--std: " + PREPROCESS_HELP + "."),
        click.option("--input-range", default=None, metavar="LO,HI",
                     help="Map pixels linearly onto LO..HI instead (0 -> LO, 255 -> HI)."),
    ] if what else []


def _preprocessing_kwargs(mean: str | None, std: str | None, preprocess: str | None, input_range: str | None) -> dict:
    return {"mean": _floats(mean, "--mean"), "std": _floats(std, "--std"), "preprocess": preprocess,
            "input_range": _floats(input_range, "--input-range")}


def _eval_options(func):
    for option in reversed([
        click.option("--data", required=True, type=click.Path(path_type=Path),
                     help=".npz (x, y), CIFAR batch, folder with labels.txt, or class subfolders."),
        *_preprocessing_options("images"),
        click.option("--size", default=None, help="Resize images to N or H,W (default: the model's input size)."),
        click.option("--batch-size", default=100, show_default=True, type=click.IntRange(1),
                     help="Samples per inference call (a model with a fixed batch is run in its own chunks)."),
        click.option("--limit", default=None, type=click.IntRange(1), help="Use only the first N samples."),
        click.option("--provider", type=click.Choice(PROVIDER_CHOICES), default="cpu", show_default=True,
                     help=PROVIDER_HELP),
    ]):
        func = option(func)
    return func


@main.command("eval")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@_eval_options
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@_friendly
def eval_cmd(model: Path, data: Path, mean, std, preprocess, input_range, size, batch_size, limit, provider,
             as_json: bool) -> None:
    """Top-1 / top-5 accuracy of MODEL on labelled --data.

    Raw images need the model's preprocessing: --mean/--std, --preprocess or --input-range, or the one a
    file written by onnxdfq quantize records; without any, eval refuses rather than guess."""
    from onnxdfq.eval.runner import evaluate
    from onnxdfq.graph.io import load_model

    load_model(model)
    with _progress(None, "eval", as_json) as bar:

        def set_total(count: int) -> None:  # known once evaluate has opened the data (it opens it once)
            bar.total = count
            bar.refresh()

        result = evaluate(model, str(data), **_preprocessing_kwargs(mean, std, preprocess, input_range),
                          size=_size(size), batch_size=batch_size, limit=limit, provider=provider,
                          progress=bar.update, on_count=set_total)
    if as_json:
        click.echo(json.dumps(result.to_json()))
        return
    click.echo(f"{model}: {result.count} samples, {result.seconds:.1f} s on {result.provider}"
               + (f", preprocessing {result.preprocessing}" if result.preprocessing else ""))
    click.echo(f"top1={result.top1:.2f} top5={result.top5:.2f}")


@main.command()
@click.argument("reference", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("quantized", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--data", default=None, type=click.Path(path_type=Path), help="Inputs to compare on (labels unused).")
@click.option("--prior", "prior_n", default=None, type=click.IntRange(2),
              help="Compare on N prior images in the model's input space (the default, N=64, without --data): "
                   "what the quantize check uses.")
@click.option("--random", "random_n", default=None, type=click.IntRange(1),
              help="Compare on N samples of N(0,1) noise instead: not images, so SQNR reads lower than on "
                   "real data (a good MobileNet W8A8: 8 dB on noise, 16 dB on real images).")
@_apply(_preprocessing_options("--data images and --prior's input space"))
@click.option("--size", default=None, help="Resize --data images (or shape generated inputs) to N or H,W.")
@click.option("--batch-size", default=100, show_default=True, type=click.IntRange(1),
              help="Samples per inference call.")
@click.option("--limit", default=None, type=click.IntRange(1), help="Compare on the first N samples only.")
@click.option("--provider", type=click.Choice(PROVIDER_CHOICES), default="cpu", show_default=True, help=PROVIDER_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@_friendly
def compare(reference: Path, quantized: Path, data, prior_n, random_n, mean, std, preprocess, input_range, size,
            batch_size, limit, provider, as_json: bool) -> None:
    """Fidelity of QUANTIZED against its FP32 REFERENCE: SQNR of the outputs, cosine, top-1 agreement.

    Inputs: --data (real samples), else prior images at the model's size (--prior N, default 64), or
    N(0,1) noise with --random N."""
    from onnxdfq.eval.runner import compare as run_compare
    from onnxdfq.graph.io import load_model

    load_model(reference)
    load_model(quantized)
    chosen = [flag for flag, value in (("--data", data), ("--prior", prior_n), ("--random", random_n))
              if value is not None]
    if len(chosen) > 1:
        raise OptionError(f"compare on one kind of input: {' and '.join(chosen)} both given")
    if data is None and random_n is None and prior_n is None:
        prior_n = DEFAULT_COMPARE_PRIOR
    result = run_compare(reference, quantized, data=str(data) if data else None, random=random_n, prior=prior_n,
                         **_preprocessing_kwargs(mean, std, preprocess, input_range), size=_size(size),
                         batch_size=batch_size, limit=limit, provider=provider)
    if as_json:
        click.echo(json.dumps(result))
        return
    if not result["finite"]:
        raise DataError(f"the models produce NaN or inf on these {result['count']} samples; no fidelity figure")
    agreement = result["top1_agreement"]
    click.echo(f"inputs: {result['inputs']}")
    click.echo(f"samples={result['count']} sqnr_db={result['sqnr_db']:.2f} cosine={result['cosine']:.5f} "
               f"centered_cosine={result['outputs'][0]['centered_cosine']:.3f} "
               + (f"top1_agreement={100 * agreement:.2f}%" if agreement is not None else "(not a classifier output)"))
    for out in result["outputs"][1:]:  # more outputs (a detector's boxes, scores...)
        click.echo(f"  {out['name']}: sqnr_db={out['sqnr_db']:.2f} cosine={out['cosine']:.5f}")


DEFAULT_COMPARE_PRIOR = 64  # prior images compare uses without --data / --random



def _generator_options(items: tuple[str, ...]) -> dict:
    """--option KEY=VALUE pairs -> numeric keyword arguments of a generator (ints stay ints)."""
    options: dict = {}
    for key, value in _key_values(items, "--option"):
        try:
            options[key] = int(value) if value.lstrip("-").isdigit() else float(value)
        except ValueError:
            raise OptionError(f"--option {key}: {value!r} is not a number") from None
    return options


@main.command()
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--method", required=True, help="Generator: zeroq, dsg or dffg (match the BN statistics), or invert "
              "(inverts the classifier: for a model without BN).")
@click.option("-n", "--samples", default=256, show_default=True, type=click.IntRange(1), help="Samples to write.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The .npz to write: x (float32 NCHW, preprocessed model inputs) and meta (JSON).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="Torch device the generator runs on.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the initial noise (same seed, same samples).")
@click.option("--batch-size", type=click.IntRange(1), default=32, show_default=True,
              help="Images optimised together (BN statistics are matched per batch; DFFG takes the "
                   "gradient 8 images at a time at 224 px, so memory does not grow with it).")
@click.option("--steps", type=click.IntRange(1), default=None, help="Steps per batch (default: the method's).")
@click.option("-O", "--option", "options", multiple=True, metavar="KEY=VALUE",
              help="Generator option, repeatable, e.g. -O lr=0.2 (zeroq, dsg) or -O alpha=0.05 (dffg).")
@click.option("-q", "--quiet", is_flag=True, help="Print only errors.")
@_apply(_preprocessing_options("the box the samples are kept in (each channel's image of pixels 0..1; default: "
                               "the model's metadata, else unbounded)"))
@_friendly
def synth(model: Path, method: str, samples: int, output: Path, device: str, seed: int, batch_size: int,
          steps: int | None, options: tuple[str, ...], quiet: bool, mean: str | None, std: str | None,
          preprocess: str | None, input_range: str | None) -> None:
    """Generate calibration inputs for MODEL: samples whose BN-input statistics match its BN layers (zeroq, dsg,
    dffg), or images the classifier assigns to random classes (invert; for a model exported with BN folded).

    With the preprocessing known (--mean/--std, --preprocess, --input-range or the model's metadata) every
    sample stays inside the inputs real images can give; invert assumes ImageNet's when none is known."""
    from onnxdfq.graph.io import ensure_distinct_paths, ensure_writable, load_model, write_text_atomic

    ensure_distinct_paths(model, output)
    ensure_writable(output, "-o")
    if output.suffix != ".npz":
        raise OptionError(f"-o {output}: the output must be an .npz file")
    proto = load_model(model)
    try:
        from onnxdfq import synth as synth_pkg

        generator = synth_pkg.get_generator(method)
    except ImportError as exc:
        raise OptionError(f"onnxdfq synth needs torch: pip install -e \".[synth]\" torch==2.13.0 ({exc})") from None
    extra = _generator_options(options)
    from onnxdfq.eval.calibrate import ASSUMED_IMAGENET, IMAGENET_MEAN, IMAGENET_STD, model_preprocessing
    from onnxdfq.preprocessing import Preprocessing, pixel_box

    given = resolve_preprocessing(_floats(mean, "--mean"), _floats(std, "--std"), preset=preprocess,
                                  input_range=_floats(input_range, "--input-range"),
                                  channels=synth_pkg.input_sample_shape(proto)[0]) or model_preprocessing(proto)
    if given is None and generator.needs_pixel_box:
        given = Preprocessing(IMAGENET_MEAN, IMAGENET_STD, ASSUMED_IMAGENET)
    bounds = pixel_box(given.mean, given.std) if given is not None else None
    start = time.perf_counter()
    x = synth_pkg.generate(proto, method, samples, batch_size=batch_size, seed=seed, device=device, steps=steps,
                           progress=_loss_bar(f"synth {method}", quiet, "BN loss" if generator.needs_bn
                                              else "cross-entropy"), input_bounds=bounds, **extra)
    seconds = time.perf_counter() - start
    meta = {"model": str(model), "method": method, "samples": int(len(x)), "seed": seed, "batch_size": batch_size,
            "steps": steps or generator.default_steps, "options": extra, "device": device,
            "seconds": round(seconds, 3), "input_bounds": given.source if given is not None else "unbounded"}
    if generator.needs_bn:
        noise = np.random.default_rng(seed).standard_normal(x.shape).astype(np.float32)
        meta["bn_loss"] = synth_pkg.bn_statistics_loss(proto, x, device=device)
        meta["noise_bn_loss"] = synth_pkg.bn_statistics_loss(proto, noise, device=device)
    buffer = io.BytesIO()
    np.savez(buffer, x=x, meta=np.array(json.dumps(meta)))
    write_text_atomic(buffer.getvalue(), output)
    if not quiet:
        rows = [["samples", f"{len(x)} x {list(x.shape[1:])} float32 (preprocessed model inputs)"],
                ["method", f"{method}  steps {meta['steps']} per batch of {batch_size}, seed {seed}, {device}"
                 + (f"  ({', '.join(f'{k}={v}' for k, v in extra.items())})" if extra else "")],
                *([["BN loss", f"{meta['bn_loss']:.4g}  (Gaussian noise: {meta['noise_bn_loss']:.4g})"]]
                  if "bn_loss" in meta else []),
                ["input box", (f"[{x.min():.3g}, {x.max():.3g}], per channel from {given.source}" if given is not None
                               else "unbounded: give --mean/--std or --preprocess to keep samples inside what "
                                    "images can give")],
                ["time", f"{seconds:.1f} s"],
                ["output", str(output)]]
        click.echo(_table(rows, ["", ""]).split("\n", 2)[2])


@main.command()
@click.argument("report_json", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the HTML page.")
@_friendly
def report(report_json: Path, output: Path) -> None:
    """Turn a `quantize --report` JSON into an HTML page: weight ranges before/after CLE, weight SQNR
    and bit widths per layer, activation ranges and their sources."""
    from onnxdfq.graph.io import ensure_distinct_paths, ensure_writable, write_text_atomic
    from onnxdfq.report_html import render_report

    ensure_distinct_paths(report_json, output)
    try:
        data = json.loads(report_json.read_text())
    except FileNotFoundError:
        raise DataError(f"{report_json}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{report_json}: not a JSON report ({exc})") from None
    if not isinstance(data, dict) or "layers" not in data or "config" not in data:
        raise DataError(f"{report_json}: not an onnxdfq quantize report (no 'layers' / 'config')")
    page = render_report(data)
    ensure_writable(output, "-o")
    write_text_atomic(page, output)
    click.echo(f"wrote {output} ({len(page) / 1e3:.0f} kB, {len(data['layers'])} layers)")


@main.command()
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@_friendly
def inspect(model: Path) -> None:
    """A table of MODEL's quantizable layers (op, weight shape, BN kept, activation, channel range spread),
    with what each column means for quantization."""
    from onnxdfq.graph import layers as graph_layers
    from onnxdfq.graph import patterns, surgery
    from onnxdfq.graph.io import load_model, prepare_model
    from onnxdfq.passes.base import Workspace
    from onnxdfq.passes.fold_bn import FoldBatchNormPass
    from onnxdfq.quant.qparams import channel_absmax

    graph = surgery.import_graph(prepare_model(load_model(model)))
    graph_layers.ensure_node_names(graph)
    before = {layer.name: layer for layer in graph_layers.read_layers(graph)}
    ws = Workspace(graph=graph)
    FoldBatchNormPass()(ws)
    rows, wide = [], []
    for layer in graph_layers.read_layers(graph):
        ranges = channel_absmax(layer.weight)
        nonzero = ranges[ranges > 0]
        ratio = float(nonzero.max() / nonzero.min()) if nonzero.size else None
        spread = "-" if ratio is None else f"{ratio:.0f}x" if ratio >= 10 else f"{ratio:.1f}x"
        if ratio is not None and ratio > SPREAD_PER_TENSOR_LIMIT:
            wide.append(layer.name)
        kind = "depthwise" if layer.is_depthwise else (f"group {layer.group}" if layer.group > 1 else "")
        rows.append([layer.name, f"{layer.op_type} {kind}".strip(), "x".join(map(str, before[layer.name].weight.shape)),
                     "yes" if layer.name in ws.channel_stats else "no", layer.act.kind, spread])
    click.echo(_table(rows, ["layer", "op", "weight (canonical)", "BN", "activation", "channel range spread"]))
    with_bn = sum(1 for layer in before if layer in ws.channel_stats)
    click.echo(f"BatchNormalization statistics: {with_bn} of {len(before)} layers")
    click.echo("columns: weight (canonical) = [out, in/group, kh, kw] after BN folding; BN = a BatchNormalization "
               "follows the layer, so its statistics are known without data; channel range spread = largest / "
               "smallest max|w| over output channels (BN folded): with one per-tensor scale, a channel "
               f"{SPREAD_PER_TENSOR_LIMIT:g}x narrower than the widest gets under 1 of 127 levels and rounds to ~0.")
    if wide:
        click.echo(f"{len(wide)} layer(s) spread over {SPREAD_PER_TENSOR_LIMIT:g}x ({_names(wide)}): keep per-channel "
                   "weights (the default), or use --method dfq (cross-layer equalization) for --granularity "
                   "per-tensor.")
    if not with_bn:
        from onnxdfq.pipeline import EXPORT_WITH_BN_HINT

        click.echo(f"note: {EXPORT_WITH_BN_HINT.format(source='prior images by default')}")
    unhandled = patterns.unhandled_ops(graph)
    if unhandled:
        click.echo("not handled (left in float): " + ", ".join(f"{k} x{v}" for k, v in sorted(unhandled.items())))


SPREAD_PER_TENSOR_LIMIT = 127.0  # a channel this much narrower than the widest has < 1 level of a per-tensor 8-bit grid

DEMO_MEAN, DEMO_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# (method, bits, act_bits, granularity): each method at the widths where it is meant to be used
DEMO_JOBS = [("nearest", "8", "8", "channel"), ("squant", "8", "8", "channel"), ("dfq", "8", "8", "tensor"),
             ("nearest", "4", "8", "channel"), ("squant", "4", "8", "channel"), ("dfq", "4", "8", "channel"),
             ("dfmpc", "2/6", "none", "channel")]
GPTQ_DEMO_JOB = ("gptq", "4", "8", "channel")  # learns on DFFG samples: with the synth extra only


def demo_jobs() -> list[tuple[str, str, str, str]]:
    """The demo's runs: every method, gptq where torch is installed to generate its samples."""
    from onnxdfq.config import torch_available

    return DEMO_JOBS + ([GPTQ_DEMO_JOB] if torch_available() else [])


@main.command()
@click.option("--out-dir", default=None, type=click.Path(file_okay=False, path_type=Path),
              help="Keep the demo's quantized models here (default: a temporary folder).")
@click.option("--synthetic", is_flag=True,
              help="Also quantize a built-in synthetic MobileNet-like model and print its fidelity on N(0,1) inputs.")
@click.option("--samples", default=256, show_default=True, type=click.IntRange(8),
              help="N(0,1) inputs for the --synthetic fidelity table.")
@_friendly
def demo(out_dir: Path | None, synthetic: bool, samples: int) -> None:
    """Quantize a real model shipped with onnxdfq (CIFAR-10 ResNet-20) with every method, without data, and
    print its real top-1 on 1000 shipped CIFAR-10 test images against FP32; then what to try on your model."""
    from importlib.resources import files

    from tqdm import tqdm

    from onnxdfq.eval.runner import evaluate
    from onnxdfq.pipeline import quantize_model, save_quantized

    data_dir = files("onnxdfq.data")
    model, images = str(data_dir / "resnet20_cifar10.onnx"), str(data_dir / "cifar10_test1000.npz")
    work = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="onnxdfq-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    fp32 = evaluate(model, images, mean=list(DEMO_MEAN), std=list(DEMO_STD)).top1
    click.echo(f"model: CIFAR-10 ResNet-20 shipped with onnxdfq ({model}; BSD-2 weights, see LICENSE-resnet20)\n"
               f"data:  1000 CIFAR-10 test images, used only to measure top-1 (quantization sees no data)\n")
    rows = [["FP32", "-", "-", f"{fp32:.2f}", "-", f"{Path(model).stat().st_size / 1e6:.2f}", "fp32", "-"]]
    jobs = demo_jobs()
    for method, bits, act, gran in tqdm(jobs, desc="quantize + evaluate", file=sys.stderr, leave=False):
        began = time.perf_counter()
        fmt = "qdq" if bits == "8" else "qdq-packed"  # sub-byte weights stored packed: the file shrinks
        result = quantize_model(model, method=method, bits=bits, act_bits=act, granularity=gran, fmt=fmt,
                                mean=list(DEMO_MEAN), std=list(DEMO_STD))
        seconds = time.perf_counter() - began
        path = work / f"resnet20.{method}.w{bits.replace('/', '-')}a{act}.onnx"
        size = save_quantized(result, path)
        top1 = evaluate(str(path), images, mean=list(DEMO_MEAN), std=list(DEMO_STD)).top1
        rows.append([method, f"W{bits}A{act if act != 'none' else 'fp32'}", f"per-{gran}", f"{top1:.2f}",
                     f"{top1 - fp32:+.2f}", f"{size / 1e6:.2f}", fmt, f"{seconds:.1f}"])
    click.echo(_table(rows, ["method", "bits", "weights", "top-1 %", "vs FP32", "file MB", "format", "quantize s"]))
    if len(jobs) == len(DEMO_JOBS):
        click.echo("\ngptq skipped: it learns on DFFG samples, which need the synth extra (pip install "
                   "'onnxdfq[synth]' torch==2.13.0)")
    click.echo(f"\n{len(jobs)} models in {work}; {time.perf_counter() - start:.0f} s in all. Sub-8-bit weights "
               "are written packed (--format qdq-packed: INT4 initializers), so those files really shrink; the "
               "default --format qdq keeps int8 containers (larger, and fastest in onnxruntime).\n")
    click.echo("Next, on your own model (give its preprocessing; no data needed to quantize):\n"
               "  onnxdfq inspect model.onnx\n"
               "  onnxdfq quantize model.onnx -o model.q.onnx --method squant --bits 8 "
               "--mean 0.485,0.456,0.406 --std 0.229,0.224,0.225\n"
               "  onnxdfq quantize model.onnx -o model.w4.onnx --method squant --bits 4 --format qdq-packed "
               "--preprocess imagenet\n"
               "  onnxdfq eval model.q.onnx --data your_test.npz   # the preprocessing is read from the file")
    if synthetic:
        _synthetic_demo(work, samples)


def _synthetic_demo(work: Path, samples: int) -> None:
    """The built-in synthetic MobileNet-like model: every method and width, fidelity on N(0,1) inputs."""
    from tqdm import tqdm

    from onnxdfq.config import METHODS
    from onnxdfq.demo_models import demo_model
    from onnxdfq.eval.runner import compare as run_compare
    from onnxdfq.graph.io import save_model_atomic
    from onnxdfq.pipeline import quantize_model

    fp32 = demo_model()
    save_model_atomic(fp32, work / "demo.onnx")
    click.echo(f"\nsynthetic model: {work / 'demo.onnx'} (7 conv stages with ReLU6, depthwise, residual; "
               f"BN statistics calibrated on N(0,1) inputs)")
    settings = [("8", "8", "channel"), ("8", "8", "tensor"), ("4", "8", "channel"), ("3", "none", "channel")]
    rows = []
    # gptq learns on generated samples (torch): the real-model demo runs it
    jobs = [(m, s) for m in sorted(METHODS) for s in settings if m not in ("dfmpc", "gptq")] + \
        [("dfmpc", ("2/6", "none", "channel"))]
    for method, (bits, act, gran) in tqdm(jobs, desc="quantize", file=sys.stderr, leave=False):
        start = time.perf_counter()
        result = quantize_model(fp32, method=method, bits=bits, act_bits=act, granularity=gran)
        seconds = time.perf_counter() - start
        fid = run_compare(fp32, result.model, random=samples, seed=123)
        rows.append([method, f"W{bits}A{act if act != 'none' else 'fp32'}", gran, f"{fid['sqnr_db']:.1f}",
                     f"{fid['cosine']:.4f}", f"{100 * fid['top1_agreement']:.1f}", f"{1000 * seconds:.0f}"])
    click.echo(_table(rows, ["method", "bits", "weights", "SQNR dB", "cosine", "top-1 agree %", "quantize ms"]))
    click.echo(f"(fidelity against the FP32 model on {samples} N(0,1) inputs)")


@main.command()
@click.argument("models", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--method", "methods", default="nearest,squant", show_default=True,
              help="Comma-separated methods (nearest, squant, dfq, dfmpc).")
@click.option("--bits", default="8,4", show_default=True,
              help="Comma-separated weight widths; LOW/HIGH for dfmpc; auto for per-layer widths, one config per "
                   "--avg-bits / --size-budget value.")
@click.option("--avg-bits", "sweep_avg_bits", default=None, help="Comma-separated average weight bits for --bits auto.")
@click.option("--size-budget", "sweep_size_budgets", default=None,
              help="Comma-separated file-size fractions (packed) for --bits auto.")
@click.option("--act-bits", default="8", show_default=True, help="Comma-separated activation widths, or none.")
@click.option("--avg-act-bits", "sweep_avg_act_bits", default=None,
              help="Comma-separated activation budgets (4 or --act-bits per tensor, B bits an element on average): "
                   "one config per value for every config with quantized activations.")
@click.option("--granularity", default="channel", show_default=True, help="Comma-separated: channel, tensor.")
@click.option("--data", required=True, type=click.Path(path_type=Path), help="Labelled data to score every config on.")
@click.option("--mean", default=None, help="Per-channel mean on the 0-1 scale, with --std (also the models' input "
                                           "range); needed for raw images unless the models record it.")
@click.option("--std", default=None, help="Per-channel std on the 0-1 scale, with --mean.")
@click.option("--preprocess", default=None, metavar="PRESET",
              help="Named preprocessing instead of --mean/--std: " + PREPROCESS_HELP + ".")
@click.option("--limit", default=None, type=click.IntRange(1), help="Score on the first N samples only.")
@click.option("--batch-size", default=100, show_default=True, type=click.IntRange(1),
              help="Samples per inference call.")
@click.option("--shard-size", default=1000, show_default=True, type=click.IntRange(1),
              help="Samples per evaluation task (rounded up to a multiple of --batch-size).")
@click.option("--latency-runs", default=20, show_default=True, type=click.IntRange(0),
              help="Timed runs per round of the FP32-vs-quantized latency task (0: no latency).")
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for results.json/.md/.html and the models; rows already there are kept.")
@click.option("--address", default=None, help="Ray cluster address (e.g. 10.0.0.5:6379); default: a local Ray.")
@click.option("--workers", default=None, type=click.IntRange(1), help="CPUs of the local Ray (default: all).")
@click.option("--retry-failed", is_flag=True, help="Run again the configs whose rows hold an error.")
@click.option("-q", "--quiet", is_flag=True, help="Print only errors.")
@_friendly
def sweep(models, methods, bits, sweep_avg_bits, sweep_size_budgets, act_bits, sweep_avg_act_bits, granularity,
          data, mean, std,
          preprocess, limit, batch_size, shard_size, latency_runs, out_dir, address, workers, retry_failed,
          quiet) -> None:
    """Quantize and score every MODEL x --method x --bits x --act-bits on Ray (pip install -e ".[sweep]");
    writes OUT/results.json, results.md and results.html (top-1 vs size, Pareto front)."""
    from tqdm import tqdm

    from onnxdfq.sweep import EvalSpec, expand_grid, run_sweep

    def split(text: str) -> list[str]:
        return [item.strip() for item in text.split(",") if item.strip()]

    budgets = [("avg_bits", value) for value in _floats(sweep_avg_bits, "--avg-bits") or []] + \
        [("size_budget", value) for value in _floats(sweep_size_budgets, "--size-budget") or []]
    configs, skipped = expand_grid([str(m) for m in models], split(methods), split(bits), split(act_bits),
                                   split(granularity), budgets, _floats(sweep_avg_act_bits, "--avg-act-bits") or [])
    for key, reason in skipped:
        click.echo(f"skipped {key}: {reason}", err=True)
    if not configs:
        raise OptionError("no valid config in the grid (see the skipped lines above)")
    given = resolve_preprocessing(_floats(mean, "--mean"), _floats(std, "--std"), preset=preprocess)
    spec = EvalSpec(str(data), list(given.mean) if given else None, list(given.std) if given else None, limit,
                    batch_size, shard_size)
    bar = tqdm(total=0, desc="sweep", unit="config", disable=True if quiet else None, file=sys.stderr)

    def start(todo: int, reused: int) -> None:
        bar.total = todo
        bar.refresh()
        if reused and not quiet:
            click.echo(f"{reused} config(s) already in {out_dir}, kept", err=True)

    def finished(row: dict) -> None:
        bar.set_postfix_str(f"{row['key']}: " + ("error" if row["error"] else f"top1 {row['top1']:.2f}"))
        bar.update(1)

    with bar:
        results = run_sweep(configs, spec, out_dir, address=address, workers=workers, latency_runs=latency_runs,
                            retry_failed=retry_failed, on_start=start, on_row=finished)
    if not quiet:
        click.echo((out_dir / "results.md").read_text())
    failed = [row for row in results["rows"] if row.get("error")]
    click.echo(f"{len(results['rows'])} rows in {out_dir / 'results.json'}"
               + (f"; {len(failed)} failed" if failed else ""), err=True)


if __name__ == "__main__":
    main()
