"""onnx-graphsurgeon edits: QuantizeLinear/DequantizeLinear insertion and model export."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxdfq.graph.layers import Layer

__all__ = ["import_graph", "export_model", "insert_activation_qdq", "dequantize_weight", "dequantize_bias",
           "insert_channel_min", "integer_channel_min", "replace_activation", "set_channel_bound", "bypass_node",
           "model_with_outputs", "model_with_moments", "model_with_weight_inputs", "MOMENT_OUTPUTS",
           "model_with_act_switches", "ACT_SWITCH_INPUTS", "model_with_pseudo_bn"]


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
                          dtype: type, levels: tuple[int, int] | None = None) -> gs.Variable:
    """tensor -> QuantizeLinear -> [Clip(levels)] -> DequantizeLinear -> every former consumer.

    `levels` keeps a narrower-than-8-bit grid inside its own stored levels: QuantizeLinear saturates
    only at the container's limits. The Clip runs on the integers (quantization is monotone, so it equals
    clipping the float tensor at those levels first), which leaves onnxruntime's QLinearConv fusion intact:
    a float Clip in front of the QuantizeLinear kept the producing Conv in float (W4A4 ran 0.33x FP32).
    Graph outputs keep the float tensor.
    """
    consumers = list(tensor.outputs)
    base = tensor.name
    scale_c = gs.Constant(f"{base}_scale", np.array(scale, np.float32))
    zp_c = gs.Constant(f"{base}_zero_point", np.array(zero_point, dtype))
    quantized = gs.Variable(f"{base}_quantized", dtype=dtype)
    dequantized = gs.Variable(f"{base}_dequantized", dtype=np.float32, shape=tensor.shape)
    graph.nodes.append(gs.Node("QuantizeLinear", f"{base}_QuantizeLinear",
                               inputs=[tensor, scale_c, zp_c], outputs=[quantized]))
    if levels is not None:
        on_grid = gs.Variable(f"{base}_quantized_on_grid", dtype=dtype)
        graph.nodes.append(gs.Node("Clip", f"{base}_Clip", inputs=[
            quantized, gs.Constant(f"{base}_level_lo", np.array(levels[0], dtype)),
            gs.Constant(f"{base}_level_hi", np.array(levels[1], dtype))], outputs=[on_grid]))
        quantized = on_grid
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


def _constant_value(tensor: gs.Tensor) -> np.ndarray | None:
    return np.asarray(tensor.values) if isinstance(tensor, gs.Constant) else None


def integer_channel_min(graph: gs.Graph) -> int:
    """Q -> DQ -> Min(., upper) -> Q -> DQ becomes Q -> Min(., quantized upper) -> DQ (same grid).

    CLE keeps ReLU6 exact as Relu + a per-channel Min; quantized, that Min would run in float
    between a DequantizeLinear and a QuantizeLinear on the same grid, which costs more than the
    convolution it follows. Quantization is monotone, so Q(min(x, u)) = min(Q(x), Q(u)): the Min
    runs on the integers instead (onnxruntime has uint8/int8 Min), with identical results, and
    both convolutions around it still fuse. Returns how many Min nodes moved.
    """
    moved = 0
    for node in list(graph.nodes):
        if node.op != "Min" or len(node.inputs) != 2 or len(node.outputs) != 1:
            continue
        upper = _constant_value(node.inputs[1])
        source, sink = node.inputs[0], node.outputs[0]
        if upper is None or len(source.inputs) != 1 or len(sink.outputs) != 1:
            continue
        dq, q = source.inputs[0], sink.outputs[0]
        if dq.op != "DequantizeLinear" or q.op != "QuantizeLinear" or len(dq.inputs) < 3 or len(q.inputs) < 3:
            continue
        grid = [_constant_value(t) for t in (*dq.inputs[1:3], *q.inputs[1:3])]
        if any(v is None or v.size != 1 for v in grid) or grid[0] != grid[2] or grid[1] != grid[3]:
            continue
        scale, zero_point = float(grid[0]), grid[1]
        info = np.iinfo(zero_point.dtype)
        # QuantizeLinear's rounding (half to even) and saturation
        levels = np.clip(np.rint(upper.astype(np.float32) / np.float32(scale)) + int(zero_point), info.min, info.max)
        node.inputs[0] = dq.inputs[0]
        node.inputs[1] = gs.Constant(f"{node.name}.upper_quantized", levels.astype(zero_point.dtype))
        quantized = q.outputs[0]
        q.outputs.clear()
        node.outputs[0] = quantized
        if not source.outputs:
            dq.outputs.clear()
        moved += 1
    return moved


def replace_activation(node: gs.Node, op: str) -> None:
    """Turn an activation node into another single-input op in place (e.g. Clip(0, 6) -> Relu)."""
    # gs's SynchronizedList does not take slice deletion; pop so producer/consumer links stay in sync
    while len(node.inputs) > 1:
        node.inputs.pop()
    node.op = op
    node.attrs = {}


def set_channel_bound(graph: gs.Graph, pair, upper: np.ndarray, *, sort: bool = True) -> np.ndarray:
    """Bound the activation between an equalization pair (graph.patterns.EqualizePair) per channel.

    Clip(0, c) becomes Relu -> Min(upper[C,1,1]); an existing Min gets its constant replaced. Keeps
    the graph in topological order (pass sort=False when setting many bounds, then toposort once).
    Updates the pair and returns the bound as float64 [C].
    """
    upper = np.asarray(upper, np.float64).reshape(-1)
    if pair.min_node is not None:
        const = pair.min_node.inputs[1]
        old_shape = np.asarray(const.values).shape
        rank = len(pair.layer1.node.outputs[0].shape or (0, 0, 0, 0))
        shape = old_shape if np.prod(old_shape) == upper.size else (-1,) + (1,) * max(rank - 2, 0)
        const.values = upper.astype(np.float32).reshape(shape)
    else:
        act_node = pair.layer1.act.node
        replace_activation(act_node, "Relu")
        tensor = act_node.outputs[0]
        insert_channel_min(graph, tensor, upper, f"{pair.layer1.name}_channel_min")
        pair.min_node = tensor.outputs[0]
        pair.act_kind = "relu"
        if sort:
            graph.toposort()
    pair.upper = upper
    return upper


def bypass_node(node: gs.Node, producer: gs.Node) -> None:
    """Remove ``node`` (one input from ``producer``, one output) by making ``producer`` write its output."""
    out = node.outputs[0]
    node.outputs.clear()
    node.inputs.clear()  # left dangling: the next graph.cleanup() drops it
    producer.outputs[0] = out


def model_with_outputs(graph: gs.Graph, tensors: list[str], template: onnx.ModelProto) -> onnx.ModelProto:
    """A ModelProto of a copy of ``graph`` whose outputs are its own plus ``tensors`` (inputs excepted)."""
    copy = graph.copy()
    by_name = copy.tensors()
    inputs = {t.name for t in copy.inputs}
    extra = []
    for name in tensors:
        tensor = by_name[name]
        if name in inputs or tensor in copy.outputs:
            continue
        if tensor.dtype is None:
            tensor.dtype = np.float32
        extra.append(tensor)
    copy.outputs = list(copy.outputs) + extra
    return export_model(copy, template)


def model_with_weight_inputs(graph: gs.Graph, layers: list[Layer], template: onnx.ModelProto
                             ) -> tuple[onnx.ModelProto, dict[str, tuple[str, str | None]], dict[str, np.ndarray]]:
    """A ModelProto of a copy of ``graph`` in which every layer's weight and bias are graph inputs, so that one
    onnxruntime session can run the model with any layer's weights swapped (sensitivity measurements).

    Conv and Gemm layers without a bias get a zero bias input (a bias-corrected candidate needs one).
    Returns the model, layer -> (weight input, bias input or None for MatMul) and the float values to feed.
    """
    copy = graph.copy()
    nodes = {node.name: node for node in copy.nodes}
    names: dict[str, tuple[str, str | None]] = {}
    values: dict[str, np.ndarray] = {}
    new_inputs = []
    for layer in layers:
        node = nodes[layer.name]
        weight = gs.Variable(f"{layer.name}/weight_input", dtype=np.float32, shape=list(node.inputs[1].shape))
        values[weight.name] = np.asarray(node.inputs[1].values, np.float32)
        node.inputs[1] = weight
        new_inputs.append(weight)
        bias_name = None
        if layer.op_type != "MatMul":
            bias = gs.Variable(f"{layer.name}/bias_input", dtype=np.float32, shape=[layer.out_channels])
            values[bias.name] = np.zeros(layer.out_channels, np.float32) if layer.bias is None else \
                np.asarray(layer.bias, np.float32)
            if len(node.inputs) > 2:
                node.inputs[2] = bias
            else:
                node.inputs.append(bias)
            new_inputs.append(bias)
            bias_name = bias.name
        names[layer.name] = (weight.name, bias_name)
    copy.inputs = list(copy.inputs) + new_inputs
    copy.cleanup()
    return export_model(copy, template), names, values


PSEUDO_BN_EPS = 1e-5


def model_with_pseudo_bn(model: onnx.ModelProto, stats: dict[str, tuple[np.ndarray, np.ndarray]]
                         ) -> onnx.ModelProto:
    """A copy of ``model`` with an identity BatchNormalization after each named node's output that carries that
    output's per-channel (mean, std) as its running statistics: scale sqrt(var + eps) and bias mean undo the
    normalisation, so the function is unchanged, and generators that match BN statistics (onnxdfq.synth) can
    match these instead on a model whose BN was folded away."""
    out = onnx.ModelProto.FromString(model.SerializeToString())
    graph = out.graph
    nodes = list(graph.node)
    del graph.node[:]
    for node in nodes:
        if node.name not in stats or not node.output:
            graph.node.append(node)
            continue
        mean, std = (np.asarray(v, np.float64).reshape(-1) for v in stats[node.name])
        var = std ** 2
        raw = f"{node.output[0]}/pseudo_bn_input"
        names = [f"{node.name}/pseudo_bn_{kind}" for kind in ("scale", "bias", "mean", "var")]
        values = (np.sqrt(var + PSEUDO_BN_EPS), mean, mean, var)
        graph.initializer.extend(onnx.numpy_helper.from_array(v.astype(np.float32), n) for n, v in zip(names, values,
                                                                                                      strict=True))
        bn = onnx.helper.make_node("BatchNormalization", [raw, *names], [node.output[0]],
                                   name=f"{node.name}/pseudo_bn", epsilon=PSEUDO_BN_EPS)
        node.output[0] = raw
        graph.node.append(node)  # appending copies the message: rename first
        graph.node.append(bn)
    return out


# the graph inputs `model_with_act_switches` gives every switched tensor, in this order
ACT_SWITCH_INPUTS = ("gate", "scale", "zero", "lo", "hi")


def model_with_act_switches(graph: gs.Graph, tensors: list[str], template: onnx.ModelProto
                            ) -> tuple[onnx.ModelProto, dict[str, tuple[str, ...]], dict[str, np.ndarray]]:
    """A ModelProto of a copy of ``graph`` in which every tensor of ``tensors`` can be fake-quantized on demand:
    x -> x + gate * ((clip(round(x / scale) + zero, lo, hi) - zero) * scale - x), with the five scalars graph
    inputs (``ACT_SWITCH_INPUTS``). The defaults (gate 0) leave the model exact; feeding one tensor's gate 1 and its
    grid measures what quantizing that activation alone costs. Float ops only, so any width runs.
    Returns the model, tensor -> its five input names, and the default feeds."""
    copy = graph.copy()
    by_name = copy.tensors()
    names: dict[str, tuple[str, ...]] = {}
    values: dict[str, np.ndarray] = {}
    new_inputs = []
    defaults = {"gate": 0.0, "scale": 1.0, "zero": 0.0, "lo": -3.0e38, "hi": 3.0e38}
    for index, name in enumerate(tensors):
        tensor = by_name[name]
        consumers = list(tensor.outputs)
        switch = {kind: gs.Variable(f"{name}/switch_{kind}", dtype=np.float32, shape=[]) for kind in ACT_SWITCH_INPUTS}
        for kind, var in switch.items():
            values[var.name] = np.array(defaults[kind], np.float32)
        new_inputs.extend(switch.values())
        names[name] = tuple(switch[kind].name for kind in ACT_SWITCH_INPUTS)

        def step(op: str, a, b, tag: str, k: int = index):
            out = gs.Variable(f"act_switch{k}/{tag}", dtype=np.float32)
            copy.nodes.append(gs.Node(op, f"act_switch{k}/{tag}_{op}", inputs=[a, b] if b is not None else [a],
                                      outputs=[out]))
            return out

        q = step("Round", step("Div", tensor, switch["scale"], "div"), None, "round")
        q = step("Min", step("Max", step("Add", q, switch["zero"], "shift"), switch["lo"], "lo"), switch["hi"], "hi")
        fake = step("Mul", step("Sub", q, switch["zero"], "unshift"), switch["scale"], "dequant")
        switched = step("Add", tensor, step("Mul", step("Sub", fake, tensor, "error"), switch["gate"], "gated"), "out")
        for node in consumers:
            for i, value in enumerate(node.inputs):
                if value is tensor:
                    node.inputs[i] = switched
        if tensor in copy.outputs:
            copy.outputs = [switched if t is tensor else t for t in copy.outputs]
    copy.inputs = list(copy.inputs) + new_inputs
    copy.toposort()
    return export_model(copy, template), names, values


# what `model_with_moments` adds per observed tensor (graph outputs named <tensor>/<KIND>)
MOMENT_OUTPUTS = ("mean", "meansq")


def model_with_moments(graph: gs.Graph, tensors: list[str], template: onnx.ModelProto) -> onnx.ModelProto | None:
    """A ModelProto of a copy of ``graph`` that outputs, for each tensor [N, C, ...] of ``tensors``, its
    per-sample, per-channel mean and mean of squares over the positions ([N, C]), as ``<tensor>/mean`` and
    ``<tensor>/meansq``.

    onnxruntime reduces the activations where they are made, so a statistics run over images at 224 px
    returns a few floats per channel instead of every activation of every image. The reductions are
    global average pools, which onnxruntime runs in its blocked NCHWc layout beside the convolutions:
    EfficientNet-Lite0, 64 images at 224 px, 1.1 s against 0.45 s for the plain network, where ReduceMean,
    or any elementwise op other than the square, made it reorder every observed tensor (3.3-4 s).
    None when a tensor's rank is unknown (the caller fetches the tensors themselves instead).
    """
    copy = graph.copy()
    by_name = copy.tensors()
    outputs = []
    for name in tensors:
        tensor = by_name[name]
        rank = len(tensor.shape) if tensor.shape is not None else None
        if rank is None or rank < 2:
            return None
        squared = gs.Variable(f"{name}/squared", dtype=np.float32)
        copy.nodes.append(gs.Node("Mul", f"{name}/Mul_moments", inputs=[tensor, tensor], outputs=[squared]))
        for kind, source in (("mean", tensor), ("meansq", squared)):
            result = gs.Variable(f"{name}/{kind}", dtype=np.float32)
            if rank == 2:  # [N, C]: one position per channel
                copy.nodes.append(gs.Node("Identity", f"{name}/{kind}_node", inputs=[source], outputs=[result]))
            else:
                pooled = gs.Variable(f"{name}/{kind}_pooled", dtype=np.float32)
                copy.nodes.append(gs.Node("GlobalAveragePool", f"{name}/{kind}_node", inputs=[source],
                                          outputs=[pooled]))
                copy.nodes.append(gs.Node("Flatten", f"{name}/{kind}_flat", attrs={"axis": 1}, inputs=[pooled],
                                          outputs=[result]))
            outputs.append(result)
    copy.outputs = outputs
    return export_model(copy, template)
