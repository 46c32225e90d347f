"""Tiny models built in code for the tests (no binary fixtures)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxdfq.demo_models import ConvSpec, build_chain, calibrate_bn, demo_model

__all__ = ["ConvSpec", "build_chain", "calibrate_bn", "demo_model", "varied_chain", "no_bn_model",
           "model_with_unsupported_op", "run"]


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
