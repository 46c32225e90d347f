"""Graph patterns the passes look for: which activation tensors to quantize, residual joins."""

from __future__ import annotations

import onnx_graphsurgeon as gs

from onnxdfq.graph.layers import Layer, activation_after

__all__ = ["JOIN_OPS", "activation_tensors", "unhandled_ops", "HANDLED_OPS"]

JOIN_OPS = ("Add",)
# ops the pipeline understands: layers it quantizes, activations it models, and data movement it
# propagates statistics through; anything else passes through in float with a warning
HANDLED_OPS = {
    "Conv", "ConvTranspose", "Gemm", "MatMul", "BatchNormalization", "Relu", "Clip", "LeakyRelu", "Add",
    "Min", "Max", "Slice", "Pad", "Concat", "GlobalAveragePool", "AveragePool", "MaxPool", "GlobalMaxPool",
    "Flatten", "Reshape", "Squeeze", "Unsqueeze", "Identity", "Dropout", "Constant", "Shape", "Gather",
}


def unhandled_ops(graph: gs.Graph) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in graph.nodes:
        if node.op not in HANDLED_OPS:
            counts[node.op] = counts.get(node.op, 0) + 1
    return counts


def activation_tensors(graph: gs.Graph, layers: list[Layer], quantized: set[str]) -> list[str]:
    """Tensors that get a QuantizeLinear/DequantizeLinear pair, in graph order.

    The data input of every quantized layer, every quantized layer's output after its
    activation, and the inputs and (post-activation) outputs of residual Adds: that is what
    onnxruntime needs to fuse Conv -> QLinearConv and Add -> QLinearAdd. Graph outputs stay float.
    """
    outputs = {t.name for t in graph.outputs}
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
        if node.op in JOIN_OPS and all(not isinstance(t, gs.Constant) for t in node.inputs):
            for tensor in node.inputs:
                add(tensor.name)
            act = activation_after(node.outputs[0], outputs)
            add(act.node.outputs[0].name if act.node is not None else node.outputs[0].name)
    return [name for name in wanted if name in tensors and not isinstance(tensors[name], gs.Constant)]
