"""The layer view: one record per quantizable layer, read from and written back to a gs graph.

Weights are presented in one canonical layout, output channels first: Conv [O, I/g, *k],
Gemm/MatMul [O, I]. `stored_out_axis` remembers where the output axis lives in the initializer
(Gemm with transB=0 and MatMul store [I, O]; ConvTranspose stores [I, O/g, *k]).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

__all__ = ["ACT_OPS", "LAYER_OPS", "Activation", "Layer", "read_layers", "write_weight", "write_bias",
           "stored_weight", "single_consumer", "producer", "const_value", "ensure_node_names", "activation_after"]

logger = logging.getLogger(__name__)

LAYER_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
ACT_OPS = ("Relu", "Clip", "LeakyRelu")


@dataclass(frozen=True)
class Activation:
    """The elementwise op right after a layer: kind is relu, relu6, clip, leaky or none."""

    kind: str
    lo: float = -np.inf
    hi: float = np.inf
    node: gs.Node | None = None
    alpha: float = 0.0  # LeakyRelu slope

    @property
    def positively_homogeneous(self) -> bool:
        """f(s x) = s f(x) for s > 0: what CLE needs to move a scale through the activation."""
        return self.kind in ("relu", "none", "leaky")


@dataclass
class Layer:
    """A quantizable layer. `weight` is canonical [O, I/g, *k] / [O, I] float32."""

    name: str
    op_type: str
    node: gs.Node
    weight: np.ndarray
    bias: np.ndarray | None
    group: int
    stored_out_axis: int
    input_name: str
    output_name: str  # the layer's own output (pre-activation)
    act: Activation
    act_output_name: str  # output after the activation (== output_name when act.kind == "none")

    @property
    def out_channels(self) -> int:
        return self.weight.shape[0]

    @property
    def is_depthwise(self) -> bool:
        return self.op_type == "Conv" and self.group > 1 and self.weight.shape[1] == 1


def ensure_node_names(graph: gs.Graph) -> None:
    """Give every node a unique, stable name (reports and bit-width maps key on node names)."""
    seen: set[str] = set()
    for index, node in enumerate(graph.nodes):
        name = node.name or f"{node.op}_{index}"
        while name in seen:
            name = f"{name}_{index}"
        node.name = name
        seen.add(name)


def producer(tensor: gs.Tensor) -> gs.Node | None:
    return tensor.inputs[0] if tensor.inputs else None


def single_consumer(tensor: gs.Tensor, graph_outputs: set[str]) -> gs.Node | None:
    if tensor.name in graph_outputs or len(tensor.outputs) != 1:
        return None
    return tensor.outputs[0]


def const_value(tensor: gs.Tensor) -> np.ndarray | None:
    """The tensor's value when it is a constant: an initializer, a Constant node's output, or either behind
    Identity nodes (PyTorch's TorchScript exporter shares equal initializers that way, e.g. zero biases)."""
    for _ in range(16):  # Identity chains are short; the bound keeps a malformed graph from looping
        if isinstance(tensor, gs.Constant):
            return np.asarray(tensor.values)
        node = producer(tensor)
        if node is not None and node.op == "Constant" and "value" in node.attrs:
            return np.asarray(node.attrs["value"].values)
        if node is None or node.op != "Identity" or not node.inputs:
            return None
        tensor = node.inputs[0]
    return None


def activation_after(tensor: gs.Tensor, graph_outputs: set[str]) -> Activation:
    node = single_consumer(tensor, graph_outputs)
    if node is None or node.op not in ACT_OPS:
        return Activation("none")
    if node.op == "Relu":
        return Activation("relu", 0.0, np.inf, node)
    if node.op == "LeakyRelu":
        return Activation("leaky", -np.inf, np.inf, node, float(node.attrs.get("alpha", 0.01)))
    lo, hi = -np.inf, np.inf
    if "min" in node.attrs or "max" in node.attrs:  # opset < 11 Clip
        lo, hi = float(node.attrs.get("min", -np.inf)), float(node.attrs.get("max", np.inf))
    else:
        for position, default in ((1, -np.inf), (2, np.inf)):
            if len(node.inputs) > position and node.inputs[position].name:
                value = const_value(node.inputs[position])
                if value is None or value.size != 1:
                    return Activation("none")  # data-dependent clip bounds: not an activation we model
                if position == 1:
                    lo = float(value.reshape(-1)[0])
                else:
                    hi = float(value.reshape(-1)[0])
            elif position == 1:
                lo = default
    kind = "relu6" if (lo == 0.0 and hi == 6.0) else ("relu" if lo == 0.0 and hi == np.inf else "clip")
    return Activation(kind, lo, hi, node)


def _canonical_weight(node: gs.Node, weight: np.ndarray) -> tuple[np.ndarray, int, int]:
    """(canonical weight, stored_out_axis, group)."""
    if node.op == "Conv":
        return weight, 0, int(node.attrs.get("group", 1))
    if node.op == "ConvTranspose":
        group = int(node.attrs.get("group", 1))
        if group != 1:
            raise ValueError("grouped ConvTranspose")
        return np.swapaxes(weight, 0, 1), 1, 1
    if node.op == "Gemm":
        if int(node.attrs.get("transB", 0)):
            return weight, 0, 1
        return weight.T, 1, 1
    return weight.T, 1, 1  # MatMul x @ W with W [I, O]


def _is_layer(node: gs.Node) -> bool:
    if node.op not in LAYER_OPS or len(node.inputs) < 2:
        return False
    weight = const_value(node.inputs[1])
    if weight is None or weight.dtype.kind != "f":
        return False
    if node.op in ("Gemm", "MatMul") and weight.ndim != 2:
        return False
    if node.op == "Gemm" and int(node.attrs.get("transA", 0)):
        return False
    if node.op == "Gemm" and float(node.attrs.get("alpha", 1.0)) != 1.0:
        return False
    if node.op == "MatMul" and const_value(node.inputs[0]) is not None:
        return False
    return True


def read_layers(graph: gs.Graph) -> list[Layer]:
    """Every Conv/ConvTranspose/Gemm/MatMul with a constant float weight, in graph order."""
    outputs = {t.name for t in graph.outputs}
    layers: list[Layer] = []
    for node in graph.nodes:
        if not _is_layer(node):
            continue
        raw = const_value(node.inputs[1])
        try:
            weight, stored_axis, group = _canonical_weight(node, raw.astype(np.float32))
        except ValueError as exc:
            logger.warning("layer %s skipped: %s not supported", node.name, exc)
            continue
        bias = None
        if len(node.inputs) > 2 and node.inputs[2].name:
            bias_value = const_value(node.inputs[2])
            if bias_value is None:
                continue
            bias = bias_value.astype(np.float32).reshape(-1)
            if node.op == "Gemm" and bias.size != weight.shape[0]:
                continue  # broadcast-shaped Gemm C we do not model
            if node.op == "Gemm" and float(node.attrs.get("beta", 1.0)) != 1.0:
                continue
        out = node.outputs[0]
        act = activation_after(out, outputs)
        layers.append(Layer(
            name=node.name, op_type=node.op, node=node, weight=weight, bias=bias, group=group,
            stored_out_axis=stored_axis, input_name=node.inputs[0].name, output_name=out.name, act=act,
            act_output_name=act.node.outputs[0].name if act.node is not None else out.name,
        ))
    return layers


def _stored_layout(layer: Layer, weight: np.ndarray) -> np.ndarray:
    if layer.op_type == "ConvTranspose":
        return np.swapaxes(weight, 0, 1)
    if layer.stored_out_axis == 1 and layer.op_type in ("Gemm", "MatMul"):
        return weight.T
    return weight


def stored_weight(layer: Layer, weight: np.ndarray) -> np.ndarray:
    """A canonical-layout weight of ``layer`` in the layout its initializer stores (float32, contiguous)."""
    return np.ascontiguousarray(_stored_layout(layer, np.asarray(weight, np.float32)))


def write_weight(layer: Layer, weight: np.ndarray) -> None:
    """Replace the layer's weight initializer (canonical layout in, stored layout written)."""
    if weight.shape != layer.weight.shape:
        raise ValueError(f"{layer.name}: weight shape {weight.shape} != {layer.weight.shape}")
    stored = np.ascontiguousarray(_stored_layout(layer, weight.astype(np.float32)))
    # a fresh Constant, so weights shared with another node are never changed behind its back
    layer.node.inputs[1] = gs.Constant(f"{layer.name}.weight", stored)
    layer.weight = weight.astype(np.float32)


def write_bias(layer: Layer, bias: np.ndarray) -> None:
    """Set (or add) the layer's bias; Gemm/Conv take it as input 2, MatMul gets an Add after it."""
    bias = np.asarray(bias, np.float32).reshape(-1)
    if bias.size != layer.out_channels:
        raise ValueError(f"{layer.name}: bias size {bias.size} != {layer.out_channels}")
    const = gs.Constant(f"{layer.name}.bias", bias)
    if layer.op_type == "MatMul":
        raise ValueError(f"{layer.name}: MatMul has no bias input; convert it with graph.surgery first")
    if len(layer.node.inputs) > 2:
        layer.node.inputs[2] = const
    else:
        layer.node.inputs.append(const)
    layer.bias = bias
