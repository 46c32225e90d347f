"""An OpenVINO CPU runtime behind the slice of onnxruntime's session API that evaluation uses.

`make_session(model, "openvino")` returns one, so `onnxdfq eval --provider openvino`, `compare` and
the latency benchmark run the same QDQ file in OpenVINO (the optional extra: pip install openvino).
OpenVINO reads the QuantizeLinear/DequantizeLinear pairs and runs int8 kernels where it can.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np

from onnxdfq.errors import ModelLoadError, OptionError
from onnxdfq.graph.io import read_metadata

__all__ = ["OpenVINOSession"]


@dataclass(frozen=True)
class _Arg:
    name: str
    shape: list


def _shape(port: Any) -> list:
    return [dim.get_length() if dim.is_static else None for dim in port.get_partial_shape()]


class OpenVINOSession:
    """``run(outputs, feeds)``, ``get_inputs()``, ``get_outputs()``, ``get_providers()`` on OpenVINO's CPU plugin."""

    def __init__(self, model: Any, threads: int | None = None) -> None:
        try:
            import openvino as ov
        except ImportError:
            raise OptionError("--provider openvino needs OpenVINO: pip install 'onnxdfq[openvino]'") from None
        self._metadata = read_metadata(model)
        core = ov.Core()
        config = {"INFERENCE_NUM_THREADS": int(threads)} if threads else {}
        tmp = None
        try:
            if hasattr(model, "SerializeToString") or isinstance(model, bytes):
                data = model if isinstance(model, bytes) else model.SerializeToString()
                fd, tmp = tempfile.mkstemp(suffix=".onnx")
                with os.fdopen(fd, "wb") as handle:
                    handle.write(data)
                model = tmp
            self._compiled = core.compile_model(core.read_model(str(model)), "CPU", config)
        except Exception as exc:  # OpenVINO raises its own RuntimeError subclasses
            raise ModelLoadError(f"OpenVINO cannot load the model: {str(exc).strip().splitlines()[0]}") from None
        finally:
            if tmp is not None:
                os.remove(tmp)
        self._request = self._compiled.create_infer_request()
        self._inputs = [_Arg(port.any_name, _shape(port)) for port in self._compiled.inputs]
        self._outputs = [_Arg(port.any_name, _shape(port)) for port in self._compiled.outputs]

    def get_inputs(self) -> list[_Arg]:
        return list(self._inputs)

    def get_outputs(self) -> list[_Arg]:
        return list(self._outputs)

    def get_providers(self) -> list[str]:
        return ["OpenVINO CPU"]

    def get_modelmeta(self) -> SimpleNamespace:
        """The ONNX file's metadata_props, as onnxruntime's session gives them (custom_metadata_map)."""
        return SimpleNamespace(custom_metadata_map=dict(self._metadata))

    def run(self, outputs: list[str] | None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        result = self._request.infer(feeds)
        by_name = {port.any_name: np.array(value) for port, value in result.items()}
        return [by_name[name] for name in (outputs or [arg.name for arg in self._outputs])]
