"""Graph patterns the passes look for: which activation tensors to quantize, residual joins."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from onnxdfq.graph.layers import Layer, activation_after, const_value, single_consumer

__all__ = ["tensors_without_bn_downstream", "tensors_after_layers", "FIRST_OPS", "SECOND_OPS",
           "EqualizePair", "find_pairs", "JOIN_OPS", "OUTPUT_PASSTHROUGH_OPS", "activation_tensors",
           "output_bound_tensors", "unhandled_ops", "HANDLED_OPS", "linear_streams"]

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

    They stay float by default: nothing after them runs in integers, and an 8-bit grid on logits
    is coarse (measured once on a BN-folded MobileNet-V1, W8A8 val1300: 75.38 -> 45.23 with an early
    range estimate; with BN statistics now 75.31 -> 75.46). A Conv head quantized this way fuses into
    QLinearConv, which is faster in onnxruntime (pipeline.speed_notes says so).
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
    """Ops the passes do not model, with their counts (global pooling written as ReduceMean/ReduceMax over the
    spatial axes, as PyTorch's dynamo exporter writes it, is modelled)."""
    counts: dict[str, int] = {}
    for node in graph.nodes:
        if node.op not in HANDLED_OPS and not _spatial_reduce(node):
            counts[node.op] = counts.get(node.op, 0) + 1
    return counts


def _spatial_reduce(node: gs.Node) -> bool:
    """ReduceMean / ReduceMax over axes that do not include the channel axis (1) of an [N, C, ...] tensor."""
    if node.op not in ("ReduceMean", "ReduceMax") or not node.inputs:
        return False
    axes = node.attrs.get("axes")
    if axes is None and len(node.inputs) > 1 and node.inputs[1].name:
        axes = const_value(node.inputs[1])
    shape = getattr(node.inputs[0], "shape", None)
    rank = len(shape) if shape is not None else 0
    return axes is not None and rank > 2 and 1 not in {int(a) % rank for a in np.ravel(axes)}


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


# --- reachability ----------------------------------------------------------------------------------------------
def tensors_without_bn_downstream(graph: gs.Graph, bn_layers: set[str]) -> set[str]:
    """Names of the tensors from which no layer in ``bn_layers`` (layer = node name) is reachable."""
    consumers: dict[str, list[gs.Node]] = {}
    for node in graph.nodes:
        for tensor in node.inputs:
            consumers.setdefault(tensor.name, []).append(node)
    memo: dict[str, bool] = {}

    def reaches_bn(name: str) -> bool:
        if name not in memo:
            memo[name] = False  # cycles cannot occur in ONNX; this also bounds the recursion
            memo[name] = any(node.name in bn_layers or any(reaches_bn(out.name) for out in node.outputs)
                             for node in consumers.get(name, []))
        return memo[name]

    return {name for name in graph.tensors() if not reaches_bn(name)}


def tensors_after_layers(graph: gs.Graph, layer_nodes: set[str]) -> set[str]:
    """Names of the outputs of the nodes in ``layer_nodes`` and of every tensor computed from them."""
    found: set[str] = set()
    for node in graph.nodes:  # imported graphs are in topological order
        if node.name in layer_nodes or any(t.name in found for t in node.inputs):
            found.update(t.name for t in node.outputs)
    return found


# ops a linear stream passes through unchanged in its per-channel mean's meaning (sums of streams, reshapes)
STREAM_OPS = ("Add", "Identity", "Reshape", "Flatten")


def linear_streams(graph: gs.Graph, layers: list[Layer]) -> dict[str, set[str]]:
    """Tensors computed from the outputs of activation-free layers by sums and reshapes alone, each with the
    layers it comes from: the linear bottlenecks and residual streams of inverted-residual networks.

    A BN-folded layer's output mean there is its BatchNorm's beta, which training barely moves when every
    consumer is another normalised layer, so statistics measured on prior images mostly carry the prior's
    own offset on these tensors (see ``squant_mean_flips``).
    """
    by_node = {id(layer.node): layer for layer in layers if layer.act.kind == "none"}
    found: dict[str, set[str]] = {}
    for node in graph.nodes:  # imported graphs are in topological order
        layer = by_node.get(id(node))
        if layer is not None:
            found[layer.output_name] = {layer.name}
            continue
        if node.op not in STREAM_OPS or not node.outputs:
            continue
        data = [t for t in node.inputs[:1 if node.op == "Reshape" else None]  # Reshape's shape is no data
                if t.name and not isinstance(t, gs.Constant)]
        if data and all(t.name in found for t in data):
            found[node.outputs[0].name] = set().union(*(found[t.name] for t in data))
    return found


# --- cross-layer equalization pairs ---------------------------------------------------------------------------
FIRST_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")  # layer 1: output channels on the canonical axis 0
SECOND_OPS = ("Conv", "Gemm", "MatMul")  # layer 2: takes layer 1's (activated) output as its data input


@dataclass
class EqualizePair:
    """layer1 -> [activation] -> [Min(per-channel upper)] -> layer2, with layer2 the only consumer."""

    layer1: Layer
    layer2: Layer
    act_kind: str  # relu, relu6, clip (lower bound 0), leaky or none
    upper: np.ndarray | None = None  # per-channel upper bound of the activation (Clip max or Min constant)
    min_node: object | None = None  # the Min node that already carries a per-channel bound
    cumulative: np.ndarray | None = field(default=None, repr=False)  # product of the applied scales

    @property
    def channels(self) -> int:
        return self.layer1.out_channels


def _min_bound(node, tensor, channels: int) -> np.ndarray | None:
    """The per-channel constant of Min(tensor, const) when it broadcasts per channel, else None."""
    if node is None or node.op != "Min" or len(node.inputs) != 2 or node.inputs[0] is not tensor:
        return None
    const = node.inputs[1]
    if not hasattr(const, "values") or len(const.outputs) != 1:  # only an unshared initializer can follow
        return None
    value = np.asarray(const.values, np.float64)
    if value.size == 1:
        return np.full(channels, float(value.reshape(-1)[0]))
    if value.ndim >= 3 and value.shape[-3] == channels and value.size == channels:
        return value.reshape(-1)
    return None


def _pair_after(layer1: Layer, layer_of: dict[int, Layer],
                outputs: set[str]) -> EqualizePair | None:
    if layer1.op_type not in FIRST_OPS:
        return None
    act = layer1.act
    channels = layer1.out_channels
    upper = None
    if act.kind in ("none", "relu", "leaky"):
        pass
    elif act.kind in ("relu6", "clip") and act.lo == 0.0 and 0.0 < act.hi < np.inf:
        upper = np.full(channels, act.hi)
    else:
        return None
    tensor = act.node.outputs[0] if act.node is not None else layer1.node.outputs[0]
    consumer = single_consumer(tensor, outputs)
    min_node = None
    if act.kind == "relu" and consumer is not None and consumer.op == "Min":
        upper = _min_bound(consumer, tensor, channels)
        if upper is None or not np.all(upper > 0):
            return None
        min_node = consumer
        tensor = consumer.outputs[0]
        consumer = single_consumer(tensor, outputs)
    layer2 = layer_of.get(id(consumer)) if consumer is not None else None
    if layer2 is None or layer2.op_type not in SECOND_OPS or layer2.node.inputs[0] is not tensor:
        return None
    if layer2.weight.shape[1] * layer2.group != channels or layer2.out_channels % layer2.group:
        return None
    return EqualizePair(layer1, layer2, act.kind, upper, min_node)


def find_pairs(graph, layers: list[Layer]) -> list[EqualizePair]:
    """Every equalizable pair, in graph order.

    Layer 1's output goes, through nothing, Relu, LeakyRelu, Clip(0, c) or Relu -> Min(per-channel
    constant), to layer 2 (Conv, depthwise included, Gemm or MatMul) as its only consumer.
    Residual joins, concatenations and pooling break pairs.
    """
    outputs = {t.name for t in graph.outputs}
    layer_of = {id(layer.node): layer for layer in layers}
    pairs = []
    for layer in layers:
        pair = _pair_after(layer, layer_of, outputs)
        if pair is not None:
            pairs.append(pair)
    return pairs
