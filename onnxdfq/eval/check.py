"""The output check: does the quantized model load in onnxruntime, and how close is it to its parent?

The fidelity probe runs both models on prior images in the model's input space (the same
procedural images the data-free statistics use; N(0, 1) noise for inputs that are not images),
so its figures mean something: SQNR, cosine and centered cosine per output, top-1 agreement only
for a classifier's [N, classes] output. A model with NaN or inf outputs is refused. Every output
the probe exercises gets a grade:

- ``broken``: the output no longer follows the input as the FP32 one does (centered cosine below
  BROKEN_CENTERED_COSINE): near chance on real data. ``quantize`` writes such a file only when asked
  (``--allow-broken``; ``save_quantized(..., allow_broken=True)``);
- ``degraded``: SQNR below FIDELITY_FLOOR_DB, expected at low widths (each bit fewer costs about 6 dB),
  unexpected at 8 bits, and worded accordingly;
- ``fine`` otherwise.

An output that the probe inputs do not exercise (its FP32 values nearly constant on them: a text
detector shown noise) is named instead of judged.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from onnxdfq.config import CalibSpec
from onnxdfq.errors import UnsupportedModelError
from onnxdfq.eval.calibrate import input_shape, prior_input_space
from onnxdfq.eval.runner import compare
from onnxdfq.graph.io import check_model
from onnxdfq.synth.prior import prior_images

__all__ = ["FIDELITY_FLOOR_DB", "BROKEN_CENTERED_COSINE", "PROBE_SAMPLES", "GRADES", "probe_inputs", "grade_output",
           "check_quantized", "check_stage"]

logger = logging.getLogger(__name__)

FIDELITY_FLOOR_DB = 10.0  # output noise above a tenth of the signal power: degraded
# below this the quantized output's input-dependent part is unrelated to the FP32 one: broken. On 64 prior images
# every measured run with >= 57 % real top-1 read >= 0.28, every run <= 36 % read <= 0.08 (metrics.centered_cosine)
BROKEN_CENTERED_COSINE = 0.15
PROBE_BATCH_PIXELS = 8 * 224 * 224
PROBE_SAMPLES = 32  # 16 left the centered cosine of a 35 %-top-1 MobileNet at 0.15, on the line
GRADES = ("fine", "degraded", "broken")
# an output whose FP32 values barely move over the probe inputs says nothing about fidelity (a text detector
# shown noise images answers ~1e-9 everywhere): its SQNR is reported but not judged
SILENT_OUTPUT_STD = 1e-4


def probe_inputs(model: Any, spec: CalibSpec, input_range: tuple[float, float] | None,
                 count: int = PROBE_SAMPLES) -> tuple[np.ndarray, str]:
    """``count`` inputs for the fidelity probe and a description of them."""
    shape = input_shape(model, spec.size)
    if len(shape) == 3:
        space = prior_input_space(model, spec, input_range)
        return (prior_images(count, shape, space, seed=spec.seed + 1),
                f"{count} prior images {list(shape)} ({space.source})")
    x = np.random.default_rng(spec.seed).standard_normal((count, *shape)).astype(np.float32)
    return x, f"{count} N(0,1) inputs {list(shape)}"


def grade_output(out: dict[str, Any]) -> str:
    """fine, degraded or broken for one output of `compare` (see the module doc)."""
    if out["centered_cosine"] < BROKEN_CENTERED_COSINE or not np.isfinite(out["centered_cosine"]):
        return "broken"
    return "degraded" if out["sqnr_db"] < FIDELITY_FLOOR_DB else "fine"


def check_quantized(fp32: Any, quantized: Any, spec: CalibSpec, input_range: tuple[float, float] | None,
                    count: int = PROBE_SAMPLES) -> dict[str, Any]:
    """Load ``quantized`` in onnxruntime and compare it with ``fp32`` on probe inputs (the comparison's own
    session is the load check: a model onnxruntime cannot load raises ModelLoadError there).

    Raises UnsupportedModelError when either model's outputs are not finite. The result has
    ``inputs`` (what was fed), a ``grade`` per exercised output and the worst of them (``grade``),
    ``low_fidelity`` (an output below FIDELITY_FLOOR_DB) and compare's figures.
    """
    x, description = probe_inputs(fp32, spec, input_range, count)
    # batches of PROBE_BATCH_PIXELS: 32 images at 224 px in one batch held two sessions' activations at once
    batch = int(np.clip(PROBE_BATCH_PIXELS // max(int(np.prod(x.shape[2:])), 1), 1, count)) if x.ndim == 4 else count
    result = compare(fp32, quantized, inputs=x, batch_size=batch, lean=True)
    if not result["finite"]:
        raise UnsupportedModelError(f"the quantized model (or its FP32 parent) produces NaN or inf on {description}; "
                                    "nothing written")
    result["inputs"] = description
    for out in result["outputs"]:
        out["exercised"] = bool(out["reference_std"] > SILENT_OUTPUT_STD)
        out["grade"] = grade_output(out) if out["exercised"] else "not judged"
    judged = [out for out in result["outputs"] if out["exercised"]]
    result["low_fidelity"] = any(out["sqnr_db"] < FIDELITY_FLOOR_DB for out in judged)
    result["grade"] = max((out["grade"] for out in judged), key=GRADES.index, default="not judged")
    result["min_sqnr_db"] = min((float(out["sqnr_db"]) for out in judged), default=None)
    result["unexercised"] = [out["name"] for out in result["outputs"] if not out["exercised"]]
    return result


def check_stage(fp32: Any, quantized: Any, spec: CalibSpec, input_range: tuple[float, float] | None,
                advice: str, setting: str = "", narrow: bool = False) -> tuple[dict[str, Any], list[str]]:
    """The output check of every quantize run: the ONNX checker, an onnxruntime session and the fidelity
    probe; returns the probe's figures and the warnings a user must see (broken, degraded, not judged).
    ``advice`` ends the warning: what to try next (`pipeline.fidelity_advice`); ``setting`` names the widths
    asked for (e.g. W4A8) and ``narrow`` says whether any is under 8 bits, where a lower SQNR is expected."""
    check_model(quantized)
    probe = check_quantized(fp32, quantized, spec, input_range)
    warnings = []
    if probe["unexercised"]:
        warnings.append(f"fidelity unknown for {', '.join(probe['unexercised'])}: the FP32 output barely moves on "
                        f"{probe['inputs']}; check on real inputs: onnxdfq compare MODEL QUANTIZED --data ...")
    judged = [out for out in probe["outputs"] if out["exercised"]]
    broken = [out for out in judged if out["grade"] == "broken"]
    if broken:
        worst = min(broken, key=lambda out: out["centered_cosine"])
        warnings.append(f"BROKEN: output {worst['name']} no longer follows the FP32 model (centered cosine "
                        f"{worst['centered_cosine']:.2f} < {BROKEN_CENTERED_COSINE:g}, SQNR {worst['sqnr_db']:.1f} dB "
                        f"on {probe['inputs']}): expect near-chance accuracy{' at ' + setting if setting else ''}; "
                        f"{advice}")
    elif probe["low_fidelity"]:
        worst_db = probe["min_sqnr_db"]
        if narrow:
            warnings.append(f"degraded: output SQNR {worst_db:.1f} dB < {FIDELITY_FLOOR_DB:g} dB on {probe['inputs']}, "
                            f"as expected at {setting or 'these widths'} (each bit fewer costs about 6 dB); measure "
                            f"top-1 on real data (onnxdfq eval) before deploying; {advice}")
        else:
            warnings.append(f"LOW FIDELITY: output SQNR {worst_db:.1f} dB < {FIDELITY_FLOOR_DB:g} dB on "
                            f"{probe['inputs']}, unexpected at {setting or '8 bits'}: expect a large accuracy loss; "
                            f"{advice}")
    return probe, warnings
