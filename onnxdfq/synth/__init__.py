"""Synthetic calibration data from BatchNorm statistics (ZeroQ, DSG, DFFG); needs the ``synth`` extra.

Importing this package does not import torch: the names below are resolved on first access
(PEP 562), so ``import onnxdfq.synth`` works without torch and only using a generator needs it.

Example
-------
>>> import onnx
>>> from onnxdfq import synth
>>> model = onnx.load("resnet20.onnx")                                 # doctest: +SKIP
>>> x = synth.generate(model, "dffg", 256, seed=0)                     # doctest: +SKIP
>>> synth.bn_statistics_loss(model, x)                                 # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .base import (
        Generator,
        available_methods,
        bn_statistics_loss,
        generate,
        get_generator,
        input_sample_shape,
        register_generator,
    )
    from .executor import SUPPORTED_OPS, BatchNormInfo, TorchGraph, UnsupportedOpError

__all__ = [
    "generate",
    "bn_statistics_loss",
    "available_methods",
    "get_generator",
    "register_generator",
    "input_sample_shape",
    "Generator",
    "TorchGraph",
    "BatchNormInfo",
    "UnsupportedOpError",
    "SUPPORTED_OPS",
]

_LAZY = {
    "generate": ".base",
    "bn_statistics_loss": ".base",
    "available_methods": ".base",
    "get_generator": ".base",
    "register_generator": ".base",
    "input_sample_shape": ".base",
    "Generator": ".base",
    "TorchGraph": ".executor",
    "BatchNormInfo": ".executor",
    "UnsupportedOpError": ".executor",
    "SUPPORTED_OPS": ".executor",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
