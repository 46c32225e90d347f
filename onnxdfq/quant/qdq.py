"""Turn the workspace's quantization decisions into a QDQ (or fake-quant) ONNX model.

Weights: int8 container, per output channel (axis of the stored layout) or per tensor, zero point
0, only the levels of their own grid. Biases: int32 with scale s_x * s_w when the layer input is
quantized. Activations: per tensor, uint8 (zero point 0 when the range starts at 0, e.g. after
ReLU, so onnxruntime drops the ReLU and fuses QLinearConv) or int8; a grid narrower than 8 bits
gets a Clip in front of its QuantizeLinear so that only its own levels occur.
"""

from __future__ import annotations

import logging

import numpy as np

from onnxdfq.graph import layers as graph_layers
from onnxdfq.graph import packing, surgery
from onnxdfq.passes.base import LayerRow, PassReport, Workspace
from onnxdfq.quant.qparams import activation_qparams
from onnxdfq.quant.scheme import QuantScheme

__all__ = ["FORMATS", "activation_scheme", "emit_model"]

logger = logging.getLogger(__name__)

FORMATS = ("qdq", "qdq-packed", "fakequant")
_INT32 = np.iinfo(np.int32)


def activation_scheme(lo: float, bits: int) -> QuantScheme:
    """uint8-style grid for non-negative tensors, signed affine grid otherwise."""
    return QuantScheme(bits, signed=lo < 0, symmetric=False, per_channel=False)


def emit_model(ws: Workspace, template, act_bits: int | None, fmt: str = "qdq") -> tuple[object, PassReport]:
    """Write weights (and activation Q/DQ pairs) into the graph and export a ModelProto."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    report = PassReport("emit", params={"format": fmt, "act_bits": act_bits})
    graph = ws.graph
    layers = {layer.name: layer for layer in graph_layers.read_layers(graph)}
    tensors = graph.tensors()
    act_qparams: dict[str, tuple[float, int, QuantScheme]] = {}
    if act_bits is not None and fmt != "fakequant":
        for name, act_range in ws.act_ranges.items():
            scheme = activation_scheme(act_range.lo, act_bits)
            scale, zero_point = activation_qparams(act_range.lo, act_range.hi, scheme)
            act_qparams[name] = (scale, zero_point, scheme)

    to_pack: dict[str, int] = {}
    for name, quant in ws.weight_quant.items():
        layer = layers.get(name)
        if layer is None:
            report.warnings.append(f"{name}: layer vanished before emission; left in float")
            continue
        row: dict[str, object] = {"bits": quant.bits}
        if fmt == "fakequant":
            graph_layers.write_weight(layer, quant.dequantized())
            report.rows.append(LayerRow(name, row))
            continue
        surgery.dequantize_weight(graph, layer, quant.w_int, quant.scale)
        width = packing.packed_type(quant.bits) if fmt == "qdq-packed" else None
        if width is not None:
            to_pack[f"{layer.name}.weight_quantized"] = width
        if layer.bias is not None and layer.input_name in act_qparams:
            s_x = act_qparams[layer.input_name][0]
            bias_scale = s_x * np.broadcast_to(quant.scale, (layer.out_channels,)).astype(np.float64)
            b_int = np.clip(np.rint(layer.bias / bias_scale), _INT32.min, _INT32.max).astype(np.int32)
            surgery.dequantize_bias(graph, layer, b_int, bias_scale)
            row["bias"] = "int32"
        report.rows.append(LayerRow(name, row))

    for name, (scale, zero_point, scheme) in act_qparams.items():
        tensor = tensors.get(name)
        if tensor is None:
            continue
        dtype = np.int8 if scheme.signed else np.uint8
        clip = None
        if scheme.bits < 8:
            clip = ((scheme.qmin - zero_point) * scale, (scheme.qmax - zero_point) * scale)
        surgery.insert_activation_qdq(graph, tensor, scale, zero_point, dtype, clip)
        report.rows.append(LayerRow(name, {"act_scale": scale, "act_zero_point": zero_point,
                                           "act_dtype": "int8" if scheme.signed else "uint8",
                                           "act_bits": scheme.bits, "source": ws.act_ranges[name].source}))
    model = surgery.export_model(graph, template)
    if to_pack:
        model, packed = packing.pack_weights(model, to_pack)
        for row in report.rows:
            width = packed.get(f"{row.layer}.weight_quantized")
            if width is not None:
                row.values["storage"] = f"int{width}"
        report.params["packed_layers"] = len(packed)
    report.modified = True
    return model, report
