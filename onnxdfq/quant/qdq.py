"""Turn the workspace's quantization decisions into a QDQ (or fake-quant) ONNX model.

Weights: int8 container, per output channel (axis of the stored layout) or per tensor, zero point
0, only the levels of their own grid. Biases: int32 with scale s_x * s_w when the layer input is
quantized; a channel whose weights are tiny next to its bias gets a coarser weight grid so that
its bias fits. Activations: per tensor, uint8 (zero point 0 when the range starts at 0, e.g. after
ReLU, so onnxruntime drops the ReLU and fuses QLinearConv; a signed range keeps its affine grid with
the zero point near 128); a grid narrower than 8 bits gets a Clip in front of its QuantizeLinear so
that only its own levels occur.
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
_BIAS_HEADROOM = 2.0**30  # a regridded channel keeps |b_int| at half the int32 range
SIGNED_TO_UNSIGNED = 128  # int8 level q is uint8 level q + 128


def _bias_safe_weights(w_int: np.ndarray, scale: np.ndarray, weight: np.ndarray, bias: np.ndarray,
                       s_x: float) -> tuple[np.ndarray, np.ndarray, int]:
    """Weight scale (and integers) with the channels whose int32 bias would saturate regridded.

    The bias is stored as b / (s_x * s_w) in int32. A channel whose weights are tiny next to its
    bias (gamma ~ 0 after BN folding, or cut to zero by CLE) has a tiny s_w, and that quotient
    leaves int32: the bias would be clipped. Its weights matter far less than its bias there
    (|w x| / |b| < 2^14 * fan_in / 2^31), so such a channel gets the smallest scale that holds
    its bias, and its weights are rounded again on that coarser grid (all-zero ones stay zero).
    Returns the scale, the integers and how many channels changed.
    """
    scale = np.asarray(scale, np.float64)
    if scale.size == 1:  # per tensor: the scale is shared with every channel
        return scale, w_int, 0
    need = np.abs(np.asarray(bias, np.float64)) / (s_x * _BIAS_HEADROOM)
    grow = need > scale
    if not grow.any():
        return scale, w_int, 0
    scale = np.where(grow, need, scale)
    w_int = w_int.copy()
    shape = (-1,) + (1,) * (w_int.ndim - 1)
    w_int[grow] = np.rint(weight[grow] / scale[grow].reshape(shape)).astype(w_int.dtype)
    return scale, w_int, int(grow.sum())


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
        weight_scale, w_int = quant.scale, quant.w_int
        int_bias = layer.bias is not None and layer.input_name in act_qparams
        if int_bias:
            s_x = act_qparams[layer.input_name][0]
            weight_scale, w_int, regridded = _bias_safe_weights(w_int, weight_scale, layer.weight, layer.bias, s_x)
            if regridded:
                row["bias_regridded_channels"] = regridded
        surgery.dequantize_weight(graph, layer, w_int, weight_scale)
        width = packing.packed_type(quant.bits) if fmt == "qdq-packed" else None
        if width is not None:
            to_pack[f"{layer.name}.weight_quantized"] = width
        if int_bias:
            bias_scale = s_x * np.broadcast_to(weight_scale, (layer.out_channels,)).astype(np.float64)
            wanted = np.rint(layer.bias / bias_scale)
            saturated = int(np.count_nonzero((wanted < _INT32.min) | (wanted > _INT32.max)))
            if saturated:
                report.warnings.append(f"{name}: {saturated} bias value(s) saturate int32 (bias scale s_x * s_w)")
            b_int = np.clip(wanted, _INT32.min, _INT32.max).astype(np.int32)
            surgery.dequantize_bias(graph, layer, b_int, bias_scale)
            row["bias"] = "int32"
        report.rows.append(LayerRow(name, row))

    for name, (scale, zero_point, scheme) in act_qparams.items():
        tensor = tensors.get(name)
        if tensor is None:
            continue
        clip = None
        if scheme.bits < 8:
            clip = ((scheme.qmin - zero_point) * scale, (scheme.qmax - zero_point) * scale)
        # every activation is stored as uint8: a signed grid is the same grid with its zero point moved up by
        # 128, and onnxruntime's CPU kernels fuse Conv -> QLinearConv only when input and output types agree
        # (u8 in, s8 out stayed a float Conv on 54 of EfficientNet-B0's 81 convs)
        stored_zero_point = zero_point + SIGNED_TO_UNSIGNED if scheme.signed else zero_point
        surgery.insert_activation_qdq(graph, tensor, scale, stored_zero_point, np.uint8, clip)
        report.rows.append(LayerRow(name, {"act_scale": scale, "act_zero_point": stored_zero_point,
                                           "act_dtype": "uint8", "act_signed_grid": scheme.signed,
                                           "act_bits": scheme.bits, "source": ws.act_ranges[name].source}))
    moved = surgery.integer_channel_min(graph)
    if moved:
        report.params["integer_min_nodes"] = moved
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
