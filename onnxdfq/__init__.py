"""onnxdfq: data-free quantization of ONNX models (BN folding, DFQ, SQuant, DF-MPC, QDQ export)."""

from onnxdfq.config import QuantConfig, make_config
from onnxdfq.errors import OnnxDfqError
from onnxdfq.pipeline import QuantResult, quantize, quantize_model, save_quantized

__all__ = ["OnnxDfqError", "QuantConfig", "QuantResult", "make_config", "quantize", "quantize_model", "save_quantized",
           "evaluate", "compare"]
__version__ = "0.1.0"


def evaluate(*args, **kwargs):
    """Top-1/top-5 of a model on labelled data; see onnxdfq.eval.runner.evaluate."""
    from onnxdfq.eval.runner import evaluate as _evaluate

    return _evaluate(*args, **kwargs)


def compare(*args, **kwargs):
    """Fidelity of a quantized model against its FP32 parent; see onnxdfq.eval.runner.compare."""
    from onnxdfq.eval.runner import compare as _compare

    return _compare(*args, **kwargs)
