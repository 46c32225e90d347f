"""Tiny models built in code for the tests (no binary fixtures)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxdfq.demo_models import ConvSpec, build_chain, calibrate_bn, demo_model

__all__ = ["ConvSpec", "build_chain", "calibrate_bn", "demo_model", "varied_chain", "no_bn_model",
           "model_with_unsupported_op", "run", "vgg_model", "basic_block_model", "bottleneck_model"]


def varied_chain(seed: int = 0) -> onnx.ModelProto:
    """Depthwise, grouped, asymmetric pads, ReLU6, residual, negative gammas, a 1x1 conv head path."""
    specs = [ConvSpec(8, 3, 2, act="relu6", pads=[0, 0, 1, 1]), ConvSpec(8, 3, 1, "dw", act="relu6"),
             ConvSpec(12, 1, act="relu"), ConvSpec(12, 3, 1, group=3, act="none"),
             ConvSpec(12, 3, 1, act="relu", residual=True), ConvSpec(16, 5, 1, act="relu6")]
    model = build_chain(specs, size=17, seed=seed, channel_spread=5.0)
    noise = np.random.default_rng(seed).standard_normal((16, 3, 17, 17)).astype(np.float32)
    return calibrate_bn(model, noise)


def no_bn_model(seed: int = 0) -> onnx.ModelProto:
    specs = [ConvSpec(8, 3, bn=False, act="relu"), ConvSpec(8, 3, bn=False, act="relu", residual=True)]
    return build_chain(specs, size=12, seed=seed, gemm_head=False)


def model_with_unsupported_op() -> onnx.ModelProto:
    """conv -> relu -> Sigmoid (not handled) -> conv -> gap -> flatten -> gemm."""
    model = build_chain([ConvSpec(8, 3, act="relu"), ConvSpec(8, 3, act="relu")], size=12)
    graph = model.graph
    for node in graph.node:
        if node.name == "conv1":
            node.input[0] = "sig"
    index = [i for i, n in enumerate(graph.node) if n.name == "conv1"][0]
    graph.node.insert(index, helper.make_node("Sigmoid", ["conv0_act"], ["sig"], name="sigmoid"))
    onnx.checker.check_model(model)
    return model


def run(model, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    data = model.SerializeToString() if hasattr(model, "SerializeToString") else str(model)
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def gemm_matmul_model() -> onnx.ModelProto:
    """Flatten -> Gemm(transB=0) -> Relu -> MatMul: layers whose weights are stored [I, O]."""
    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array(rng.standard_normal((12, 16)).astype(np.float32), "g.w"),
             numpy_helper.from_array(rng.standard_normal(16).astype(np.float32), "g.b"),
             numpy_helper.from_array(rng.standard_normal((16, 5)).astype(np.float32), "m.w")]
    nodes = [helper.make_node("Flatten", ["input"], ["flat"], name="flatten"),
             helper.make_node("Gemm", ["flat", "g.w", "g.b"], ["g"], name="gemm"),
             helper.make_node("Relu", ["g"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "m.w"], ["logits"], name="matmul")]
    graph = helper.make_graph(nodes, "gm", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 2, 2])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 5])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


class _Net:
    """A tiny graph under construction: conv-BN(-activation) stages, pools, residual adds, a Gemm head.
    Random He-scaled weights; BN gammas in [0.5, 1.5] with some negative, betas N(0.2, 0.5)."""

    def __init__(self, in_ch: int, size: int, seed: int) -> None:
        self.rng, self.size, self.in_ch = np.random.default_rng(seed), size, in_ch
        self.nodes, self.inits, self.channels = [], [], {"input": in_ch}

    def conv(self, name: str, src: str, out_ch: int, kernel: int = 3, stride: int = 1, act: str | None = "relu") -> str:
        in_ch = self.channels[src]
        weight = self.rng.standard_normal((out_ch, in_ch, kernel, kernel)) * np.sqrt(2.0 / (in_ch * kernel**2))
        gamma = self.rng.uniform(0.5, 1.5, out_ch) * self.rng.choice([1, 1, 1, -1], out_ch)
        for suffix, value in (("weight", weight), ("gamma", gamma), ("beta", self.rng.normal(0.2, 0.5, out_ch)),
                              ("mean", np.zeros(out_ch)), ("var", np.ones(out_ch))):
            self.inits.append(numpy_helper.from_array(value.astype(np.float32), f"{name}.{suffix}"))
        self.nodes.append(helper.make_node("Conv", [src, f"{name}.weight"], [f"{name}_out"], name=name,
                                           kernel_shape=[kernel] * 2, strides=[stride] * 2, pads=[kernel // 2] * 4))
        self.nodes.append(helper.make_node("BatchNormalization", [f"{name}_out"] + [f"{name}.{s}" for s in
                                           ("gamma", "beta", "mean", "var")], [f"{name}_bn"], name=f"{name}_bn"))
        out = f"{name}_bn"
        if act == "relu":
            self.nodes.append(helper.make_node("Relu", [out], [f"{name}_relu"], name=f"{name}_relu"))
            out = f"{name}_relu"
        self.channels[out] = out_ch
        return out

    def maxpool(self, name: str, src: str) -> str:
        self.nodes.append(helper.make_node("MaxPool", [src], [name], name=name, kernel_shape=[2, 2], strides=[2, 2]))
        self.channels[name] = self.channels[src]
        return name

    def add_relu(self, name: str, a: str, b: str) -> str:
        self.nodes.append(helper.make_node("Add", [a, b], [f"{name}_add"], name=f"{name}_add"))
        self.nodes.append(helper.make_node("Relu", [f"{name}_add"], [f"{name}_relu"], name=f"{name}_relu"))
        self.channels[f"{name}_relu"] = self.channels[a]
        return f"{name}_relu"

    def finish(self, src: str, classes: int = 10) -> onnx.ModelProto:
        channels = self.channels[src]
        self.nodes.append(helper.make_node("GlobalAveragePool", [src], ["gap"], name="gap"))
        self.nodes.append(helper.make_node("Flatten", ["gap"], ["flat"], name="flatten", axis=1))
        head = self.rng.standard_normal((classes, channels)) * np.sqrt(1.0 / channels)
        self.inits += [numpy_helper.from_array(head.astype(np.float32), "fc.weight"),
                       numpy_helper.from_array(np.zeros(classes, np.float32), "fc.bias")]
        self.nodes.append(helper.make_node("Gemm", ["flat", "fc.weight", "fc.bias"], ["logits"], name="fc", transB=1))
        graph = helper.make_graph(self.nodes, "net", [helper.make_tensor_value_info(
            "input", TensorProto.FLOAT, ["N", self.in_ch, self.size, self.size])],
            [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])], self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
        model.ir_version = 8
        onnx.checker.check_model(model)
        noise = np.random.default_rng(0).standard_normal((32, self.in_ch, self.size, self.size)).astype(np.float32)
        return calibrate_bn(model, noise)


def vgg_model(seed: int = 0) -> onnx.ModelProto:
    """Plain VGG-style chain: (conv-BN-ReLU x2, MaxPool) x3 then GAP -> Flatten -> Gemm; convs conv0..conv5."""
    net = _Net(3, 16, seed)
    current = "input"
    for stage, width in enumerate((8, 16, 24)):
        current = net.conv(f"conv{2 * stage}", current, width)
        current = net.conv(f"conv{2 * stage + 1}", current, width)
        current = net.maxpool(f"pool{stage}", current)
    return net.finish(current)


def basic_block_model(seed: int = 0) -> onnx.ModelProto:
    """ResNet-18-style: stem, a strided basic block with a 1x1 projection shortcut (`b1.proj`), then a
    basic block with an identity shortcut; each block is conv1 (3x3-BN-ReLU), conv2 (3x3-BN) + shortcut, ReLU."""
    net = _Net(3, 16, seed)
    stem = net.conv("stem", "input", 8)
    branch = net.conv("b1.conv2", net.conv("b1.conv1", stem, 16, stride=2), 16, act=None)
    block1 = net.add_relu("b1", branch, net.conv("b1.proj", stem, 16, kernel=1, stride=2, act=None))
    branch = net.conv("b2.conv2", net.conv("b2.conv1", block1, 16), 16, act=None)
    return net.finish(net.add_relu("b2", branch, block1))


def bottleneck_model(seed: int = 0) -> onnx.ModelProto:
    """ResNet-50-style: stem, a bottleneck 1x1-3x3-1x1 (`b1.conv1..3`) with a 1x1 projection shortcut,
    then a bottleneck with an identity shortcut (`b2.*`)."""
    net = _Net(3, 16, seed)
    current = net.conv("stem", "input", 8)
    for block, proj in (("b1", True), ("b2", False)):
        mid = net.conv(f"{block}.conv2", net.conv(f"{block}.conv1", current, 8, kernel=1), 8)
        branch = net.conv(f"{block}.conv3", mid, 32, kernel=1, act=None)
        shortcut = net.conv(f"{block}.proj", current, 32, kernel=1, act=None) if proj else current
        current = net.add_relu(block, branch, shortcut)
    return net.finish(current)
