"""Output sensitivity to one layer's weights: the model run on calibration samples with that layer swapped.

The model comes with every layer's weight and bias as graph inputs (onnxdfq.graph.surgery
.model_with_weight_inputs), so one onnxruntime session serves every (layer, width) pair: a swap is a feed,
not a new session. Each measurement is one forward pass over the samples.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from onnxdfq.eval.session import make_session, run_session

__all__ = ["OutputSensitivity", "per_sample_elements"]


class OutputSensitivity:
    """Relative output noise power of the model with some weights replaced, against its float outputs.

    noise = sum over outputs of mean((y - y_ref)^2) / var(y_ref), over every sample and output element.
    """

    def __init__(self, model: Any, defaults: dict[str, np.ndarray], samples: np.ndarray, *,
                 threads: int | None = None) -> None:
        self.session = make_session(model, "cpu", threads=threads)
        self.defaults = {name: np.ascontiguousarray(value, np.float32) for name, value in defaults.items()}
        self.input_name = next(i.name for i in self.session.get_inputs() if i.name not in self.defaults)
        shape = next(i.shape for i in self.session.get_inputs() if i.name == self.input_name)
        batch = shape[0] if shape and isinstance(shape[0], int) and shape[0] > 0 else None
        samples = np.ascontiguousarray(samples, np.float32)
        step = batch or len(samples)
        # a fixed-batch export takes exactly its batch: whole chunks only (the tail is dropped)
        self.chunks = [samples[i:i + step] for i in range(0, len(samples) - step + 1, step)] or [samples[:step]]
        self.runs = 0
        self.reference = self._outputs({})
        self.power = [float(np.var(ref)) or 1.0 for ref in self.reference]

    def _outputs(self, overrides: dict[str, np.ndarray]) -> list[np.ndarray]:
        feeds = {**self.defaults, **{k: np.ascontiguousarray(v, np.float32) for k, v in overrides.items()}}
        parts = [run_session(self.session, None, {**feeds, self.input_name: chunk}) for chunk in self.chunks]
        self.runs += 1
        return [np.concatenate([p[i] for p in parts]).astype(np.float64) for i in range(len(parts[0]))]

    def noise(self, overrides: dict[str, np.ndarray]) -> float:
        outputs = self._outputs(overrides)
        return float(sum(np.mean((y - ref) ** 2) / power
                         for y, ref, power in zip(outputs, self.reference, self.power, strict=True)))


def per_sample_elements(model: Any, tensors: list[str], samples: np.ndarray) -> dict[str, int]:
    """Elements of each of ``tensors`` per sample: one run of ``model`` (which outputs them) on one batch."""
    session = make_session(model, "cpu")
    first = session.get_inputs()[0]
    batch = first.shape[0] if first.shape and isinstance(first.shape[0], int) and first.shape[0] > 0 else 1
    chunk = np.ascontiguousarray(samples[:batch], np.float32)
    outputs = [o.name for o in session.get_outputs()]
    feeds = {first.name: chunk}
    known = {name: value for name, value in zip(outputs, run_session(session, None, feeds), strict=True)}
    known[first.name] = chunk  # the network input is no output of the model
    return {name: int(known[name].size // len(chunk)) for name in tensors if name in known}
