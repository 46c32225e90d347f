"""Write the workspace's decisions into the graph and export a QDQ (or fake-quant) ModelProto.

Nothing is decided here (see passes/qparams.py): weights go in as their integers and scales
(int8 container, per output channel or per tensor, zero point 0, optionally packed to int4/int2),
int32 biases with their scales, and a QuantizeLinear -> DequantizeLinear pair on every activation
with a grid (a grid narrower than its container gets a Clip in front, so only its own levels occur).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from onnxdfq.graph import layers as graph_layers
from onnxdfq.graph import packing, surgery
from onnxdfq.passes.base import LayerRow, Pass, PassReport, Workspace

__all__ = ["EmitPass"]

logger = logging.getLogger(__name__)


class EmitPass(Pass):
    """ws -> ws.emitted (an onnx.ModelProto built on ``template``'s metadata)."""

    name = "emit"
    changes_graph = False  # the last step: nothing reads the graph after it

    def __init__(self, template: Any, fmt: str = "qdq", int2: bool = False) -> None:
        self.template, self.fmt, self.int2 = template, fmt, int2

    def call(self, ws: Workspace) -> PassReport:
        report = PassReport(self.name, params={"format": self.fmt})
        graph = ws.graph
        layers = {layer.name: layer for layer in graph_layers.read_layers(graph)}
        ws.emitted_layers = list(layers.values())  # afterwards weights are DequantizeLinear outputs, no layer reads
        to_pack: dict[str, int] = {}
        for name, quant in ws.weight_quant.items():
            layer = layers.get(name)
            if layer is None:
                report.skipped[name] = "vanished before emission (left in float)"
                report.warnings.append(f"{name}: layer vanished before emission; left in float")
                continue
            row: dict[str, object] = {"bits": quant.bits}
            if self.fmt == "fakequant":
                graph_layers.write_weight(layer, quant.dequantized())
                report.rows.append(LayerRow(name, row))
                continue
            surgery.dequantize_weight(graph, layer, quant.w_int, quant.scale)
            width = packing.packed_type(quant.bits, self.int2) if self.fmt == "qdq-packed" else None
            if width is not None:
                to_pack[f"{layer.name}.weight_quantized"] = width
            if name in ws.bias_qparams:
                surgery.dequantize_bias(graph, layer, *ws.bias_qparams[name])
                row["bias"] = "int32"
            report.rows.append(LayerRow(name, row))
        if self.fmt != "fakequant":
            tensors = graph.tensors()
            for name, grid in ws.act_qparams.items():
                if name in tensors:
                    surgery.insert_activation_qdq(graph, tensors[name], grid.scale, grid.stored_zero_point,
                                                  np.dtype(grid.dtype).type, grid.levels)
            moved = surgery.integer_channel_min(graph)
            if moved:
                report.params["integer_min_nodes"] = moved
        model = surgery.export_model(graph, self.template)
        if to_pack:
            model, packed = packing.pack_weights(model, to_pack)
            for row in report.rows:
                width = packed.get(f"{row.layer}.weight_quantized")
                if width is not None:
                    row.values["storage"] = f"int{width}"
            report.params["packed_layers"] = len(packed)
            guarded = packing.guard_int2_fusion(model)
            if guarded:
                report.params["int2_unfused_layers"] = guarded
        if self.fmt == "qdq-packed":  # the smallest file: nothing only readers use
            report.params["slimmed_bytes"] = packing.slim(model)
        ws.emitted = model
        report.modified = True
        return report
