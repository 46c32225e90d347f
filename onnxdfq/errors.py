"""User-facing errors: the CLI prints their message as one line and exits non-zero."""

__all__ = ["OnnxDfqError", "ModelLoadError", "UnsupportedModelError", "DataError", "OptionError", "FidelityError"]


class OnnxDfqError(Exception):
    """Base class for every error onnxdfq reports to a user without a traceback."""


class ModelLoadError(OnnxDfqError):
    """The file is missing, not ONNX, truncated or fails the ONNX checker."""


class UnsupportedModelError(OnnxDfqError):
    """The model parses but cannot be quantized as asked (no float weights, already QDQ, no BN...)."""


class DataError(OnnxDfqError):
    """An evaluation / calibration data set is missing, of unknown format or does not fit the model."""


class OptionError(OnnxDfqError):
    """An option value that cannot be honoured (bit widths, paths, method combinations)."""


class FidelityError(OnnxDfqError):
    """The quantized model was made but fails its output check (broken, or under --min-sqnr): nothing written.
    The CLI exits with status 3 for it, so a pipeline can tell it from bad input (2)."""

    exit_code = 3
