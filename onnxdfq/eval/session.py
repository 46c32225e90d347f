"""onnxruntime sessions: the only place onnxruntime is imported (with eval/ as a whole)."""

from __future__ import annotations

import logging
import os
from typing import Any

import onnxruntime as ort

from onnxdfq.errors import ModelLoadError, OptionError, UnsupportedModelError

__all__ = ["PROVIDERS", "make_session", "available_providers", "check_loads", "fold_batchnorm_copy", "run_session"]

logger = logging.getLogger(__name__)

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}


def available_providers() -> list[str]:
    return list(ort.get_available_providers())


def make_session(model: Any, provider: str = "cpu", *, threads: int | None = None,
                 optimized_path: str | None = None, optimize: bool = True,
                 lean: bool = False) -> ort.InferenceSession:
    """An InferenceSession on exactly the provider asked for (never a silent CPU fallback).

    ``lean`` skips onnxruntime's pre-packed copy of the weights (a ResNet-50 session: 154 MB instead of
    260): for the short runs of quantization itself (statistics, the output check), not for evaluation.

    `model` is a path, serialized bytes or an onnx.ModelProto.
    """
    if provider == "openvino":  # not an onnxruntime provider: OpenVINO's own runtime, same session interface
        from onnxdfq.eval.openvino_session import OpenVINOSession

        return OpenVINOSession(model, threads=threads)
    if provider not in PROVIDERS:
        raise OptionError(f"--provider must be one of {', '.join(PROVIDERS)}, got {provider!r}")
    wanted = PROVIDERS[provider]
    if wanted not in ort.get_available_providers():
        raise OptionError(f"provider {provider} asked for but this onnxruntime has no {wanted} "
                          f"(available: {', '.join(ort.get_available_providers())}); "
                          "install onnxruntime-gpu and a CUDA driver for --provider cuda "
                          "(--provider tensorrt also needs TensorRT's libraries)")
    options = ort.SessionOptions()
    options.log_severity_level = 4  # fatal only: failures reach the user as one error line (run_session)
    if threads:
        options.intra_op_num_threads = threads
    if optimized_path:
        options.optimized_model_filepath = optimized_path
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if lean:
        options.add_session_config_entry("session.disable_prepacking", "1")
    if hasattr(model, "SerializeToString"):
        model = model.SerializeToString()
    elif isinstance(model, os.PathLike):
        model = str(model)
    providers = {"cpu": [wanted], "cuda": [wanted, "CPUExecutionProvider"],
                 "tensorrt": [wanted, "CUDAExecutionProvider", "CPUExecutionProvider"]}[provider]
    try:
        session = ort.InferenceSession(model, options, providers=providers)
    except Exception as exc:
        raise ModelLoadError(f"onnxruntime cannot load the model: {str(exc).splitlines()[0]}") from None
    if session.get_providers()[0] != wanted:
        raise OptionError(f"onnxruntime fell back to {session.get_providers()[0]} although {wanted} was asked for")
    return session


def run_session(session: ort.InferenceSession, outputs: list[str] | None, feeds: dict[str, Any]) -> list:
    """session.run, with onnxruntime's failures (a shape the model cannot take...) as one clear error."""
    try:
        return session.run(outputs, feeds)
    except Exception as exc:  # onnxruntime raises its own Fail / InvalidArgument / RuntimeException types
        shapes = ", ".join(f"{name} {list(getattr(value, 'shape', []))}" for name, value in feeds.items())
        raise UnsupportedModelError(
            f"onnxruntime could not run the model on {shapes}: {str(exc).splitlines()[0][:300]}; if the model "
            "expects another input size, give it with --size H,W") from None


def check_loads(model: Any) -> None:
    """Raise ModelLoadError unless onnxruntime (CPU) can build a session for the model."""
    make_session(model, "cpu")


def fold_batchnorm_copy(model: Any, path: str | os.PathLike) -> None:
    """Write ``model`` as onnxruntime's basic graph optimization leaves it: BatchNormalization folded
    into the Conv before it, constants folded, as many exporters and quantizers' pre-processing do.

    This is how most models reach users; tests and benchmarks use it to make BN-folded copies.
    """
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(path)
    if hasattr(model, "SerializeToString"):
        model = model.SerializeToString()
    elif isinstance(model, os.PathLike):
        model = str(model)
    ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
