"""Graph patterns the passes look for: which activation tensors to quantize, residual joins."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxdfq.graph.layers import Layer, activation_after, const_value

__all__ = ["JOIN_OPS", "OUTPUT_PASSTHROUGH_OPS", "activation_tensors", "output_bound_tensors", "unhandled_ops",
           "HANDLED_OPS"]

JOIN_OPS = ("Add",)
# ops the pipeline understands: layers it quantizes, activations it models, and data movement it
# propagates statistics through; anything else passes through in float with a warning
HANDLED_OPS = {
    "Conv", "ConvTranspose", "Gemm", "MatMul", "BatchNormalization", "Relu", "Clip", "LeakyRelu", "Add",
    "Min", "Max", "Slice", "Pad", "Concat", "GlobalAveragePool", "AveragePool", "MaxPool", "GlobalMaxPool",
    "Flatten", "Reshape", "Squeeze", "Unsqueeze", "Identity", "Dropout", "Constant", "Shape", "Gather",
}


# ops between a network's last layer and its outputs that do not make a tensor any less "the output":
# a Q/DQ before them quantizes the logits all the same
OUTPUT_PASSTHROUGH_OPS = ("Flatten", "Reshape", "Squeeze", "Unsqueeze", "Identity", "Transpose", "Softmax",
                          "LogSoftmax")


def output_bound_tensors(graph: gs.Graph) -> set[str]:
    """Graph outputs and every tensor that reaches one only through OUTPUT_PASSTHROUGH_OPS.

    Quantizing those (e.g. MobileNet's logits before its Reshape) costs accuracy for no speed:
    nothing after them runs in integers. Measured on a BN-folded MobileNet-V1 (W8A8, val1300),
    an 8-bit grid on the logits alone took top-1 from 75.38 to 45.23.
    """
    bound = {t.name for t in graph.outputs}
    for node in reversed(graph.nodes):  # imported graphs are topologically sorted
        if node.op not in OUTPUT_PASSTHROUGH_OPS or not node.outputs or not node.inputs:
            continue
        if all(t.name in bound for t in node.outputs):
            data = node.inputs[0]
            if all(consumer.op in OUTPUT_PASSTHROUGH_OPS and all(t.name in bound for t in consumer.outputs)
                   for consumer in data.outputs):
                bound.add(data.name)
    return bound


def unhandled_ops(graph: gs.Graph) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in graph.nodes:
        if node.op not in HANDLED_OPS:
            counts[node.op] = counts.get(node.op, 0) + 1
    return counts


def activation_tensors(graph: gs.Graph, layers: list[Layer], quantized: set[str], *,
                       quantize_outputs: bool = False) -> list[str]:
    """Tensors that get a QuantizeLinear/DequantizeLinear pair, in graph order.

    The data input of every quantized layer, every quantized layer's output after its
    activation, and the inputs and (post-activation) outputs of residual Adds: that is what
    onnxruntime needs to fuse Conv -> QLinearConv and Add -> QLinearAdd. Graph outputs stay float,
    and so (unless ``quantize_outputs``) do the tensors that reach them only through Flatten,
    Reshape, Softmax and the like (``output_bound_tensors``).
    """
    graph_outputs = {t.name for t in graph.outputs}
    outputs = graph_outputs if quantize_outputs else output_bound_tensors(graph)
    wanted: list[str] = []
    seen: set[str] = set()

    def add(name: str) -> None:
        if name and name not in seen and name not in outputs:
            seen.add(name)
            wanted.append(name)

    for layer in layers:
        if layer.name not in quantized:
            continue
        add(layer.input_name)
        add(layer.act_output_name)
    tensors = graph.tensors()
    for node in graph.nodes:
        # a residual join adds two computed tensors; an Add with a constant (a bias, or shape arithmetic
        # such as ShuffleNet's channel split) is not one
        if node.op in JOIN_OPS and all(const_value(t) is None for t in node.inputs):
            for tensor in node.inputs:
                add(tensor.name)
            act = activation_after(node.outputs[0], graph_outputs)
            add(act.node.outputs[0].name if act.node is not None else node.outputs[0].name)
    return [name for name in wanted if name in tensors and not isinstance(tensors[name], gs.Constant)
            and _is_float(tensors[name])]


def _is_float(tensor: gs.Tensor) -> bool:
    """True unless shape inference says the tensor is not floating point (int64 shape math, bool masks)."""
    if tensor.dtype is None:
        return True
    try:
        return bool(np.issubdtype(np.dtype(tensor.dtype), np.floating))
    except TypeError:  # an ONNX type numpy has no dtype for (e.g. bfloat16): float by name
        return "float" in str(tensor.dtype).lower()
