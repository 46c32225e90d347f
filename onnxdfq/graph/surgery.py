"""onnx-graphsurgeon edits: QuantizeLinear/DequantizeLinear insertion and model export."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxdfq.graph.layers import Layer

__all__ = ["import_graph", "export_model", "insert_activation_qdq", "dequantize_weight", "dequantize_bias",
           "insert_channel_min", "replace_activation"]


def import_graph(model: onnx.ModelProto) -> gs.Graph:
    return gs.import_onnx(model)


def export_model(graph: gs.Graph, template: onnx.ModelProto) -> onnx.ModelProto:
    """Export the graph with the template's IR version, metadata and (raised) opset."""
    graph.cleanup().toposort()
    model = gs.export_onnx(graph, do_type_check=False)
    model.ir_version = template.ir_version
    model.producer_name = "onnxdfq"
    for prop in template.metadata_props:
        model.metadata_props.add(key=prop.key, value=prop.value)
    domains = {imp.domain for imp in model.opset_import}
    for imp in template.opset_import:
        if imp.domain not in domains:
            model.opset_import.add(domain=imp.domain, version=imp.version)
    return model


def insert_activation_qdq(graph: gs.Graph, tensor: gs.Variable, scale: float, zero_point: int,
                          dtype: type, clip: tuple[float, float] | None = None) -> gs.Variable:
    """tensor -> [Clip] -> QuantizeLinear -> DequantizeLinear -> every former consumer.

    `clip` keeps a narrower-than-8-bit grid inside its own levels: QuantizeLinear saturates only
    at the container's limits. Graph outputs keep the float tensor.
    """
    consumers = list(tensor.outputs)
    base = tensor.name
    scale_c = gs.Constant(f"{base}_scale", np.array(scale, np.float32))
    zp_c = gs.Constant(f"{base}_zero_point", np.array(zero_point, dtype))
    source: gs.Tensor = tensor
    if clip is not None:
        clipped = gs.Variable(f"{base}_clipped", dtype=np.float32)
        graph.nodes.append(gs.Node("Clip", f"{base}_Clip", inputs=[
            tensor, gs.Constant(f"{base}_clip_lo", np.array(clip[0], np.float32)),
            gs.Constant(f"{base}_clip_hi", np.array(clip[1], np.float32))], outputs=[clipped]))
        source = clipped
    quantized = gs.Variable(f"{base}_quantized", dtype=dtype)
    dequantized = gs.Variable(f"{base}_dequantized", dtype=np.float32, shape=tensor.shape)
    graph.nodes.append(gs.Node("QuantizeLinear", f"{base}_QuantizeLinear",
                               inputs=[source, scale_c, zp_c], outputs=[quantized]))
    graph.nodes.append(gs.Node("DequantizeLinear", f"{base}_DequantizeLinear",
                               inputs=[quantized, scale_c, zp_c], outputs=[dequantized]))
    for node in consumers:
        for index, value in enumerate(node.inputs):
            if value is tensor:
                node.inputs[index] = dequantized
    return dequantized


def _stored(layer: Layer, canonical: np.ndarray) -> np.ndarray:
    if layer.op_type == "ConvTranspose":
        return np.swapaxes(canonical, 0, 1)
    if layer.stored_out_axis == 1:
        return canonical.T
    return canonical


def dequantize_weight(graph: gs.Graph, layer: Layer, w_int: np.ndarray, scale: np.ndarray,
                      dtype: type = np.int8) -> None:
    """Store the integer weight and feed the layer through a (per-channel) DequantizeLinear."""
    stored = np.ascontiguousarray(_stored(layer, w_int)).astype(dtype)
    per_channel = np.asarray(scale).size > 1
    scale_arr = np.asarray(scale, np.float32).reshape(-1) if per_channel else np.array(
        np.asarray(scale).reshape(-1)[0], np.float32)
    zero = np.zeros(scale_arr.shape, dtype)
    out = gs.Variable(f"{layer.name}.weight_dequantized", dtype=np.float32, shape=list(stored.shape))
    attrs = {"axis": layer.stored_out_axis} if per_channel else {}
    graph.nodes.append(gs.Node("DequantizeLinear", f"{layer.name}.weight_DequantizeLinear", attrs=attrs,
                               inputs=[gs.Constant(f"{layer.name}.weight_quantized", stored),
                                       gs.Constant(f"{layer.name}.weight_scale", scale_arr),
                                       gs.Constant(f"{layer.name}.weight_zero_point", zero)],
                               outputs=[out]))
    layer.node.inputs[1] = out


def dequantize_bias(graph: gs.Graph, layer: Layer, b_int: np.ndarray, scale: np.ndarray) -> None:
    """int32 bias with scale s_x * s_w (what onnxruntime folds into QLinearConv / QGemm)."""
    out = gs.Variable(f"{layer.name}.bias_dequantized", dtype=np.float32, shape=[b_int.size])
    graph.nodes.append(gs.Node("DequantizeLinear", f"{layer.name}.bias_DequantizeLinear", attrs={"axis": 0},
                               inputs=[gs.Constant(f"{layer.name}.bias_quantized", b_int.astype(np.int32)),
                                       gs.Constant(f"{layer.name}.bias_scale",
                                                   np.asarray(scale, np.float32).reshape(-1)),
                                       gs.Constant(f"{layer.name}.bias_zero_point",
                                                   np.zeros(b_int.size, np.int32))],
                               outputs=[out]))
    layer.node.inputs[2] = out


def insert_channel_min(graph: gs.Graph, tensor: gs.Variable, upper: np.ndarray, name: str) -> gs.Variable:
    """tensor -> Min(tensor, upper[C,1,1]) -> consumers: a per-channel clip that stays exact after CLE."""
    consumers = list(tensor.outputs)
    out = gs.Variable(f"{tensor.name}_min", dtype=np.float32, shape=tensor.shape)
    shape = (-1,) + (1,) * (len(tensor.shape) - 2 if tensor.shape else 2)
    graph.nodes.append(gs.Node("Min", name, inputs=[
        tensor, gs.Constant(f"{name}.upper", np.asarray(upper, np.float32).reshape(shape))], outputs=[out]))
    for node in consumers:
        for index, value in enumerate(node.inputs):
            if value is tensor:
                node.inputs[index] = out
    return out


def replace_activation(node: gs.Node, op: str) -> None:
    """Turn an activation node into another single-input op in place (e.g. Clip(0, 6) -> Relu)."""
    # gs's SynchronizedList does not take slice deletion; pop so producer/consumer links stay in sync
    while len(node.inputs) > 1:
        node.inputs.pop()
    node.op = op
    node.attrs = {}
