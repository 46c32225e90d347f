"""Small ONNX models built in code: the demo's model and the tests' fixtures (no binary files)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["ConvSpec", "build_chain", "demo_model", "calibrate_bn"]


class ConvSpec:
    """One conv -> [BN] -> [activation] stage of a chain."""

    def __init__(self, out_ch: int, kernel: int = 3, stride: int = 1, group: int | str = 1, bn: bool = True,
                 act: str = "relu", pads: list[int] | None = None, residual: bool = False) -> None:
        self.out_ch, self.kernel, self.stride, self.group = out_ch, kernel, stride, group
        self.bn, self.act, self.pads, self.residual = bn, act, pads, residual


def _act_nodes(act: str, src: str, dst: str, name: str, inits: list) -> list:
    if act == "relu":
        return [helper.make_node("Relu", [src], [dst], name=f"{name}_relu")]
    if act == "relu6":
        inits += [numpy_helper.from_array(np.array(0.0, np.float32), f"{name}_min"),
                  numpy_helper.from_array(np.array(6.0, np.float32), f"{name}_max")]
        return [helper.make_node("Clip", [src, f"{name}_min", f"{name}_max"], [dst], name=f"{name}_clip")]
    return [helper.make_node("Identity", [src], [dst], name=f"{name}_id")]


def build_chain(specs: list[ConvSpec], *, in_ch: int = 3, size: int = 16, classes: int = 10, seed: int = 0,
                channel_spread: float = 1.0, gemm_head: bool = True) -> onnx.ModelProto:
    """conv stages then GlobalAveragePool -> Flatten -> Gemm, random weights, BN with unit stats.

    `channel_spread` > 1 gives output channels weight magnitudes spread over that factor, the
    situation that breaks per-tensor quantization and that CLE repairs.
    """
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    current, channels = "input", in_ch
    for index, spec in enumerate(specs):
        name = f"conv{index}"
        group = channels if spec.group == "dw" else int(spec.group)
        out_ch = channels if spec.group == "dw" else spec.out_ch
        fan_in = channels // group * spec.kernel**2
        weight = rng.standard_normal((out_ch, channels // group, spec.kernel, spec.kernel)) * np.sqrt(2.0 / fan_in)
        weight *= np.exp(rng.uniform(-np.log(channel_spread), np.log(channel_spread), (out_ch, 1, 1, 1))) \
            if channel_spread > 1 else 1.0
        inits.append(numpy_helper.from_array(weight.astype(np.float32), f"{name}.weight"))
        inputs = [current, f"{name}.weight"]
        if not spec.bn:
            inits.append(numpy_helper.from_array((0.1 * rng.standard_normal(out_ch)).astype(np.float32),
                                                 f"{name}.bias"))
            inputs.append(f"{name}.bias")
        pads = spec.pads if spec.pads is not None else [spec.kernel // 2] * 4
        nodes.append(helper.make_node("Conv", inputs, [f"{name}_out"], name=name, group=group,
                                      kernel_shape=[spec.kernel] * 2, strides=[spec.stride] * 2, pads=pads))
        out = f"{name}_out"
        if spec.bn:
            for suffix, value in (("gamma", rng.uniform(0.5, 1.5, out_ch) * rng.choice([1, 1, 1, -1], out_ch)),
                                  ("beta", rng.normal(0.2, 0.5, out_ch)), ("mean", np.zeros(out_ch)),
                                  ("var", np.ones(out_ch))):
                inits.append(numpy_helper.from_array(value.astype(np.float32), f"{name}_bn.{suffix}"))
            nodes.append(helper.make_node("BatchNormalization", [out] + [f"{name}_bn.{s}" for s in
                                          ("gamma", "beta", "mean", "var")], [f"{name}_bn_out"],
                                          name=f"{name}_bn", epsilon=1e-5))
            out = f"{name}_bn_out"
        if spec.residual and out_ch == channels and spec.stride == 1:
            nodes.append(helper.make_node("Add", [out, current], [f"{name}_add"], name=f"{name}_add"))
            out = f"{name}_add"
        nodes += _act_nodes(spec.act, out, f"{name}_act", name, inits)
        current, channels = f"{name}_act", out_ch
    nodes.append(helper.make_node("GlobalAveragePool", [current], ["gap"], name="gap"))
    nodes.append(helper.make_node("Flatten", ["gap"], ["flat"], name="flatten", axis=1))
    head = rng.standard_normal((classes, channels)) * np.sqrt(1.0 / channels)
    inits.append(numpy_helper.from_array(head.astype(np.float32), "fc.weight"))
    inits.append(numpy_helper.from_array(np.zeros(classes, np.float32), "fc.bias"))
    if gemm_head:
        nodes.append(helper.make_node("Gemm", ["flat", "fc.weight", "fc.bias"], ["logits"], name="fc", transB=1))
    else:
        inits[-2] = numpy_helper.from_array(head.T.astype(np.float32), "fc.weight")
        nodes.append(helper.make_node("MatMul", ["flat", "fc.weight"], ["mm"], name="fc"))
        nodes.append(helper.make_node("Add", ["mm", "fc.bias"], ["logits"], name="fc_bias"))
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                             ["N", in_ch, size, size])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def calibrate_bn(model: onnx.ModelProto, inputs: np.ndarray) -> onnx.ModelProto:
    """Set every BN's running mean/var to the statistics its input really has on `inputs`.

    BN layers are calibrated in graph order, so each sees inputs produced by calibrated layers:
    the result's BN statistics are true for that input distribution, as in a trained network.
    """
    from onnxdfq.eval.session import make_session  # the one place sessions are made

    model = onnx.ModelProto.FromString(model.SerializeToString())
    inits = {init.name: init for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type != "BatchNormalization":
            continue
        probe = onnx.ModelProto.FromString(model.SerializeToString())
        probe.graph.output.append(helper.make_tensor_value_info(node.input[0], TensorProto.FLOAT, None))
        session = make_session(probe, "cpu")
        value = session.run([node.input[0]], {"input": inputs})[0]
        mean, var = value.mean(axis=(0, 2, 3)), value.var(axis=(0, 2, 3))
        inits[node.input[3]].CopyFrom(numpy_helper.from_array(mean.astype(np.float32), node.input[3]))
        inits[node.input[4]].CopyFrom(numpy_helper.from_array(var.astype(np.float32), node.input[4]))
    return model


def demo_model(seed: int = 0) -> onnx.ModelProto:
    """A MobileNet-like net: ReLU6, depthwise separable blocks, a residual block, a Gemm head,
    with output channels whose weight ranges spread over 20x, BN statistics calibrated on N(0, 1)."""
    specs = [ConvSpec(16, 3, 2, act="relu6"), ConvSpec(16, 3, 1, "dw", act="relu6"), ConvSpec(32, 1, act="relu6"),
             ConvSpec(32, 3, 2, "dw", act="relu6"), ConvSpec(48, 1, act="relu6"),
             ConvSpec(48, 3, 1, act="relu", residual=True), ConvSpec(64, 1, act="relu6")]
    model = build_chain(specs, size=32, classes=10, seed=seed, channel_spread=20.0)
    noise = np.random.default_rng(seed + 1).standard_normal((64, 3, 32, 32)).astype(np.float32)
    return calibrate_bn(model, noise)
