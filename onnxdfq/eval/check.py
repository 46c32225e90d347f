"""The output check: does the quantized model load in onnxruntime, and how close is it to its parent?

The fidelity probe runs both models on prior images in the model's input space (the same
procedural images the data-free statistics use; N(0, 1) noise for inputs that are not images),
so its figures mean something: SQNR and cosine per output, top-1 agreement only for a classifier's
[N, classes] output. A model with NaN or inf outputs is refused; one below FIDELITY_FLOOR_DB gets a
loud warning rather than a quiet "success". An output that the probe inputs do not exercise (its
FP32 values nearly constant on them: a text detector shown noise) is named instead of judged.
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

__all__ = ["FIDELITY_FLOOR_DB", "PROBE_SAMPLES", "probe_inputs", "check_quantized", "check_stage"]

logger = logging.getLogger(__name__)

FIDELITY_FLOOR_DB = 10.0  # output noise above a tenth of the signal power: say so loudly
PROBE_SAMPLES = 16
# an output whose FP32 values barely move over the probe inputs says nothing about fidelity (a text detector
# shown noise images answers ~1e-9 everywhere): its SQNR is reported but not judged
SILENT_OUTPUT_STD = 1e-4


def probe_inputs(model: Any, spec: CalibSpec, input_range: tuple[float, float] | None,
                 count: int = PROBE_SAMPLES) -> tuple[np.ndarray, str]:
    """``count`` inputs for the fidelity probe and a description of them."""
    shape = input_shape(model, spec.size)
    if len(shape) == 3:
        space = prior_input_space(model, spec, input_range)
        return prior_images(count, shape, space, seed=spec.seed + 1), f"{count} prior images {list(shape)}"
    x = np.random.default_rng(spec.seed).standard_normal((count, *shape)).astype(np.float32)
    return x, f"{count} N(0,1) inputs {list(shape)}"


def check_quantized(fp32: Any, quantized: Any, spec: CalibSpec, input_range: tuple[float, float] | None,
                    count: int = PROBE_SAMPLES) -> dict[str, Any]:
    """Load ``quantized`` in onnxruntime and compare it with ``fp32`` on probe inputs (the comparison's own
    session is the load check: a model onnxruntime cannot load raises ModelLoadError there).

    Raises UnsupportedModelError when either model's outputs are not finite. The result has
    ``inputs`` (what was fed), ``low_fidelity`` (an output below FIDELITY_FLOOR_DB) and compare's
    figures.
    """
    x, description = probe_inputs(fp32, spec, input_range, count)
    result = compare(fp32, quantized, inputs=x, batch_size=count)
    if not result["finite"]:
        raise UnsupportedModelError(f"the quantized model (or its FP32 parent) produces NaN or inf on {description}; "
                                    "nothing written")
    result["inputs"] = description
    for out in result["outputs"]:
        out["exercised"] = bool(out["reference_std"] > SILENT_OUTPUT_STD)
    judged = [float(out["sqnr_db"]) for out in result["outputs"] if out["exercised"]]
    result["low_fidelity"] = bool(judged and min(judged) < FIDELITY_FLOOR_DB)
    result["unexercised"] = [out["name"] for out in result["outputs"] if not out["exercised"]]
    return result


def check_stage(fp32: Any, quantized: Any, spec: CalibSpec, input_range: tuple[float, float] | None,
                advice: str) -> tuple[dict[str, Any], list[str]]:
    """The output check of every quantize run: the ONNX checker, an onnxruntime session and the fidelity
    probe; returns the probe's figures and the warnings a user must see (low fidelity, outputs not judged).
    ``advice`` ends the low-fidelity warning: what to try next (`pipeline.fidelity_advice`)."""
    check_model(quantized)
    probe = check_quantized(fp32, quantized, spec, input_range)
    warnings = []
    if probe["unexercised"]:
        warnings.append(f"fidelity unknown for {', '.join(probe['unexercised'])}: the FP32 output barely moves on "
                        f"{probe['inputs']}; check on real inputs: onnxdfq compare MODEL QUANTIZED --data ...")
    if probe["low_fidelity"]:
        worst = min(out["sqnr_db"] for out in probe["outputs"] if out["exercised"])
        warnings.append(f"LOW FIDELITY: output SQNR {worst:.1f} dB < {FIDELITY_FLOOR_DB:g} dB on {probe['inputs']}: "
                        f"expect a large accuracy loss; {advice}")
    return probe, warnings
