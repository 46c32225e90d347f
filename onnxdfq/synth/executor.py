"""Run an ONNX graph as differentiable torch ops (the synthetic-data generators need gradients).

``TorchGraph(model)`` is a ``torch.nn.Module``: float initializers become float32 buffers (so
``.to(device)`` moves them), integer initializers (shapes, pads, slice bounds) stay on the CPU as
int64 tensors. Every node must map to an op in :mod:`ops_nn` or :mod:`ops_tensor`; anything else
is rejected when the graph is built, naming every offending op type.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal, overload

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from onnxdfq.errors import UnsupportedModelError

from .ops_nn import NN_OPS
from .ops_tensor import TENSOR_OPS, NodeSpec, OpFn

__all__ = ["TorchGraph", "BatchNormInfo", "UnsupportedOpError", "SUPPORTED_OPS"]

logger = logging.getLogger(__name__)

_OPS: dict[str, OpFn] = {**NN_OPS, **TENSOR_OPS}
SUPPORTED_OPS: frozenset[str] = frozenset(_OPS) | {"Constant"}
_DEFAULT_DOMAINS = ("", "ai.onnx")

BNCapture = list[tuple[str, torch.Tensor]]


class UnsupportedOpError(UnsupportedModelError, ValueError):
    """The graph contains ops the torch executor cannot run."""


@dataclass(frozen=True)
class BatchNormInfo:
    """One BatchNormalization node: where its input comes from and its running statistics."""

    name: str
    input_name: str
    mean_name: str
    var_name: str
    eps: float


def _decode_attr(attr: onnx.AttributeProto) -> object:
    value = helper.get_attribute_value(attr)
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, onnx.TensorProto):
        return numpy_helper.to_array(value)
    if isinstance(value, list):
        return [v.decode() if isinstance(v, bytes) else v for v in value]
    return value


def _constant_value(node: onnx.NodeProto) -> np.ndarray:
    attrs = {a.name: _decode_attr(a) for a in node.attribute}
    for key in ("value", "value_float", "value_floats", "value_int", "value_ints"):
        if key in attrs:
            return np.asarray(attrs[key])
    raise UnsupportedOpError(f"Constant node {node.name!r}: only value / value_float(s) / value_int(s) are supported")


def _as_tensor(array: np.ndarray) -> torch.Tensor:
    if np.issubdtype(array.dtype, np.floating):
        return torch.from_numpy(np.array(array, dtype=np.float32, order="C", copy=True))
    if array.dtype == np.bool_:
        return torch.from_numpy(np.array(array, order="C", copy=True))
    return torch.from_numpy(np.array(array, dtype=np.int64, order="C", copy=True))


def _default_opset(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in _DEFAULT_DOMAINS:
            return entry.version
    return 1


def check_supported(graph: onnx.GraphProto) -> None:
    """Raise :class:`UnsupportedOpError` listing every op type the executor cannot run."""
    bad: dict[str, list[str]] = {}
    for node in graph.node:
        key = node.op_type if node.domain in _DEFAULT_DOMAINS else f"{node.domain}::{node.op_type}"
        if key not in SUPPORTED_OPS:
            bad.setdefault(key, []).append(node.name or node.output[0])
    if bad:
        detail = "; ".join(f"{op} (nodes: {', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"
                           for op, names in sorted(bad.items()))
        raise UnsupportedOpError(f"the torch executor does not support op type(s): {detail}")


class TorchGraph(torch.nn.Module):
    """A differentiable torch version of an ONNX graph.

    Parameters
    ----------
    model : onnx.ModelProto
        Any float model made of the ops in ``SUPPORTED_OPS`` (default ONNX domain only).

    Notes
    -----
    ``forward(*inputs)`` takes one tensor per graph input (graph inputs that are initializers
    are not counted) and returns a tuple with one tensor per graph output. With
    ``capture_bn_inputs=True`` it returns ``(outputs, captures)`` where ``captures`` lists
    ``(bn_name, bn_input)`` for every BatchNormalization node in graph order. BatchNormalization
    always runs in inference mode, from its running statistics.
    """

    def __init__(self, model: onnx.ModelProto) -> None:
        super().__init__()
        graph = model.graph
        check_supported(graph)
        opset = _default_opset(model)
        self._buffer_keys: dict[str, str] = {}
        self._host_consts: dict[str, torch.Tensor] = {}
        for init in graph.initializer:
            self._add_constant(init.name, numpy_helper.to_array(init))
        nodes: list[NodeSpec] = []
        for index, node in enumerate(graph.node):
            if node.op_type == "Constant":
                self._add_constant(node.output[0], _constant_value(node))
                continue
            nodes.append(NodeSpec(
                op_type=node.op_type,
                name=node.name or f"{node.op_type}_{index}",
                inputs=tuple(node.input),
                outputs=tuple(node.output),
                attrs={a.name: _decode_attr(a) for a in node.attribute},
                opset=opset,
            ))
        self._nodes = tuple(nodes)
        known = set(self._buffer_keys) | set(self._host_consts)
        self.input_names: tuple[str, ...] = tuple(i.name for i in graph.input if i.name not in known)
        self.output_names: tuple[str, ...] = tuple(o.name for o in graph.output)
        self.bn_layers: tuple[BatchNormInfo, ...] = tuple(
            BatchNormInfo(n.name, n.inputs[0], n.inputs[3], n.inputs[4], float(n.attrs.get("epsilon", 1e-5)))
            for n in self._nodes if n.op_type == "BatchNormalization"
        )
        self._release = self._release_schedule()
        logger.debug("TorchGraph: %d nodes, %d BatchNormalization", len(self._nodes), len(self.bn_layers))

    def _add_constant(self, name: str, array: np.ndarray) -> None:
        tensor = _as_tensor(np.asarray(array))
        if tensor.is_floating_point():
            key = f"const_{len(self._buffer_keys)}"
            self.register_buffer(key, tensor)
            self._buffer_keys[name] = key
        else:
            self._host_consts[name] = tensor

    def _release_schedule(self) -> tuple[tuple[str, ...], ...]:
        """For each node, the activations no later node (nor the graph output) reads."""
        last_use: dict[str, int] = {}
        for index, node in enumerate(self._nodes):
            for name in node.inputs:
                last_use[name] = index
        keep = set(self.output_names) | set(self._buffer_keys) | set(self._host_consts)
        schedule: list[list[str]] = [[] for _ in self._nodes]
        for name, index in last_use.items():
            if name and name not in keep:
                schedule[index].append(name)
        return tuple(tuple(names) for names in schedule)

    def constant(self, name: str) -> torch.Tensor:
        """The value of an initializer or Constant output (float ones on the module's device)."""
        if name in self._buffer_keys:
            return self._buffers[self._buffer_keys[name]]
        return self._host_consts[name]

    def is_constant(self, name: str) -> bool:
        return name in self._buffer_keys or name in self._host_consts

    def bn_running_stats(self) -> list[tuple[str, torch.Tensor, torch.Tensor, float]]:
        """``(name, running_mean, running_var, eps)`` for every BatchNormalization, in graph order."""
        return [(bn.name, self.constant(bn.mean_name), self.constant(bn.var_name), bn.eps) for bn in self.bn_layers]

    @overload
    def forward(self, *inputs: torch.Tensor, capture_bn_inputs: Literal[False] = ...) -> tuple[torch.Tensor, ...]: ...

    @overload
    def forward(
        self, *inputs: torch.Tensor, capture_bn_inputs: Literal[True]
    ) -> tuple[tuple[torch.Tensor, ...], BNCapture]: ...

    def forward(
        self, *inputs: torch.Tensor, capture_bn_inputs: bool = False
    ) -> tuple[torch.Tensor, ...] | tuple[tuple[torch.Tensor, ...], BNCapture]:
        if len(inputs) != len(self.input_names):
            raise ValueError(f"expected {len(self.input_names)} input(s) {self.input_names}, got {len(inputs)}")
        env: dict[str, torch.Tensor] = dict(zip(self.input_names, inputs, strict=True))
        captures: BNCapture = []
        for node, release in zip(self._nodes, self._release, strict=True):
            args = [self._lookup(env, name) if name else None for name in node.inputs]
            if capture_bn_inputs and node.op_type == "BatchNormalization":
                captures.append((node.name, args[0]))
            result = _OPS[node.op_type](node, args)
            results = result if isinstance(result, tuple) else (result,)
            for name, value in zip(node.outputs, results, strict=False):
                if name:
                    env[name] = value
            for name in release:
                env.pop(name, None)
        outputs = tuple(self._lookup(env, name) for name in self.output_names)
        return (outputs, captures) if capture_bn_inputs else outputs

    def _lookup(self, env: dict[str, torch.Tensor], name: str) -> torch.Tensor:
        if name in env:
            return env[name]
        if self.is_constant(name):
            return self.constant(name)
        raise KeyError(f"tensor {name!r} is not produced before it is used (graph not topologically sorted?)")
