"""The torch executor (onnxdfq.synth.executor) against onnxruntime, and its error messages."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from conftest import asset  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from onnxdfq.synth.executor import TorchGraph, UnsupportedOpError  # noqa: E402

pytestmark = pytest.mark.torch

REAL_MODELS = {  # path relative to the shared assets (conftest.asset), input size
    "resnet20": ("cifar10/resnet20.onnx", 32),
    "resnet32": ("cifar10/resnet32.onnx", 32),
    "resnet44": ("cifar10/resnet44.onnx", 32),
    "resnet56": ("cifar10/resnet56.onnx", 32),
    "mobilenet_v1": ("imagenet/mobilenet_v1_0.75.onnx", 224),
}
INT64_MAX = np.iinfo(np.int64).max


def _init(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array), name)


def _ints(name: str, values: list[int]) -> onnx.TensorProto:
    return _init(name, np.array(values, dtype=np.int64))


def _floats(rng: np.random.Generator, name: str, *shape: int) -> onnx.TensorProto:
    return _init(name, rng.standard_normal(shape).astype(np.float32))


def _model(nodes: list, inits: list, shape: list[int], opset: int) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 7
    return model


def build_mobile_block() -> onnx.ModelProto:
    """Depthwise conv with TF-style asymmetric pads, BN, Clip(min/max inputs), Pad, Slice, pools, Gemm."""
    rng = np.random.default_rng(1)
    var = rng.uniform(0.5, 2.0, 4).astype(np.float32)
    inits = [
        _floats(rng, "dw_w", 4, 1, 3, 3), _floats(rng, "bn_s", 4), _floats(rng, "bn_b", 4),
        _floats(rng, "bn_m", 4), _init("bn_v", var),
        _init("lo", np.float32(0.0)), _init("hi", np.float32(6.0)),
        _floats(rng, "pw_w", 6, 4, 1, 1), _floats(rng, "pw_b", 6),
        _floats(rng, "dil_w", 6, 6, 3, 3),
        _ints("pads", [0, 0, 1, 0, 0, 0, 0, 1]), _init("pad_val", np.float32(0.5)),
        _ints("s_starts", [0, 1]), _ints("s_ends", [INT64_MAX, -1]), _ints("s_axes", [2, 3]),
        _ints("s_steps", [1, 1]),
        _ints("r_starts", [-1]), _ints("r_ends", [-INT64_MAX]), _ints("r_axes", [1]), _ints("r_steps", [-1]),
        _floats(rng, "ct_w", 12, 3, 2, 2),
        _floats(rng, "fc_w", 5, 3), _floats(rng, "fc_b", 5),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "dw_w"], ["dw"], group=4, pads=[0, 0, 1, 1], strides=[2, 2]),
        helper.make_node("BatchNormalization", ["dw", "bn_s", "bn_b", "bn_m", "bn_v"], ["bn"], epsilon=1e-3),
        helper.make_node("Clip", ["bn", "lo", "hi"], ["relu6"]),
        helper.make_node("Conv", ["relu6", "pw_w", "pw_b"], ["pw"]),
        helper.make_node("Conv", ["pw", "dil_w"], ["dil"], pads=[2, 2, 2, 2], dilations=[2, 2]),
        helper.make_node("LeakyRelu", ["dil"], ["lrelu"], alpha=0.1),
        helper.make_node("Pad", ["lrelu", "pads", "pad_val"], ["padded"], mode="constant"),
        helper.make_node("Slice", ["padded", "s_starts", "s_ends", "s_axes", "s_steps"], ["sliced"]),
        helper.make_node("Slice", ["sliced", "r_starts", "r_ends", "r_axes", "r_steps"], ["flipped"]),
        helper.make_node("MaxPool", ["flipped"], ["maxp"], kernel_shape=[2, 2], pads=[0, 0, 1, 1]),
        helper.make_node("AveragePool", ["flipped"], ["avgp"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Sigmoid", ["avgp"], ["sig"]),
        helper.make_node("Mul", ["maxp", "sig"], ["gated"]),
        helper.make_node("Sub", ["gated", "avgp"], ["diff"]),
        helper.make_node("Max", ["diff", "gated"], ["hi_part"]),
        helper.make_node("Min", ["diff", "gated"], ["lo_part"]),
        helper.make_node("Add", ["hi_part", "lo_part"], ["summed"]),
        helper.make_node("Concat", ["summed", "maxp"], ["cat"], axis=1),
        helper.make_node("ConvTranspose", ["cat", "ct_w"], ["up"], strides=[2, 2], pads=[0, 0, 1, 1]),
        helper.make_node("Relu", ["up"], ["up_relu"]),
        helper.make_node("GlobalAveragePool", ["up_relu"], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["flat"], axis=1),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["y"], transB=1, alpha=0.5, beta=2.0),
    ]
    return _model(nodes, inits, [2, 4, 9, 9], opset=13)


def build_shape_ops() -> onnx.ModelProto:
    """Constant, Shape/Gather/Unsqueeze/Concat feeding a dynamic Reshape, Transpose, MatMul, Div."""
    rng = np.random.default_rng(2)
    inits = [_floats(rng, "mm_w", 6, 4), _ints("zero", [0]), _ints("minus1", [-1]), _ints("ax0", [0])]
    nodes = [
        helper.make_node("Constant", [], ["two"], value=numpy_helper.from_array(np.float32(2.0))),
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Gather", ["shape", "zero"], ["batch"], axis=0),
        helper.make_node("Concat", ["batch", "minus1"], ["new_shape"], axis=0),
        helper.make_node("Reshape", ["x", "new_shape"], ["rows"]),
        helper.make_node("Div", ["rows", "two"], ["half"]),
        helper.make_node("Transpose", ["half"], ["cols"], perm=[1, 0]),
        helper.make_node("Unsqueeze", ["cols", "ax0"], ["cols3"]),
        helper.make_node("Identity", ["cols3"], ["ident"]),
        helper.make_node("Squeeze", ["ident", "ax0"], ["cols2"]),
        helper.make_node("Transpose", ["cols2"], ["back"]),
        helper.make_node("MatMul", ["back", "mm_w"], ["y"]),
    ]
    return _model(nodes, inits, [3, 2, 3], opset=13)


def build_legacy_attrs() -> onnx.ModelProto:
    """Opset 9 forms: Clip min/max, Pad pads/value and Slice starts/ends/axes as attributes."""
    nodes = [
        helper.make_node("Clip", ["x"], ["clipped"], min=-0.5, max=1.0),
        helper.make_node("Pad", ["clipped"], ["padded"], pads=[0, 0, 1, 2, 0, 0, 2, 1], value=-1.0),
        helper.make_node("Slice", ["padded"], ["sliced"], starts=[1, 0], ends=[4, 100], axes=[1, 3]),
        helper.make_node("AveragePool", ["sliced"], ["pooled"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["pooled"], ["flat"]),
        helper.make_node("Softmax", ["flat"], ["y"], axis=1),
    ]
    return _model(nodes, [], [2, 5, 6, 6], opset=9)


def build_activations() -> onnx.ModelProto:
    """Elementwise activations, variadic ops, reductions and Cast (opset 14 for HardSwish)."""
    rng = np.random.default_rng(3)
    inits = [_init("slope", rng.uniform(0.05, 0.3, (3, 1, 1)).astype(np.float32)), _init("one", np.float32(1.0)),
             _init("three", np.float32(3.0))]
    nodes = [
        helper.make_node("PRelu", ["x", "slope"], ["prelu"]),
        helper.make_node("Elu", ["prelu"], ["elu"], alpha=0.7),
        helper.make_node("Softplus", ["elu"], ["softplus"]),
        helper.make_node("HardSwish", ["x"], ["hswish"]),
        helper.make_node("HardSigmoid", ["x"], ["hsig"], alpha=0.3, beta=0.4),
        helper.make_node("Tanh", ["x"], ["tanh"]),
        helper.make_node("Mean", ["softplus", "hswish", "hsig"], ["mean3"]),
        helper.make_node("Sum", ["mean3", "tanh", "one"], ["sum3"]),
        helper.make_node("Abs", ["sum3"], ["abs"]),
        helper.make_node("Add", ["abs", "one"], ["abs1"]),
        helper.make_node("Log", ["abs1"], ["log"]),
        helper.make_node("Reciprocal", ["abs1"], ["recip"]),
        helper.make_node("Sqrt", ["abs1"], ["sqrt"]),
        helper.make_node("Pow", ["recip", "three"], ["cubed"]),
        helper.make_node("Neg", ["cubed"], ["neg"]),
        helper.make_node("Exp", ["neg"], ["exp"]),
        helper.make_node("Concat", ["log", "sqrt", "exp"], ["cat"], axis=1),
        helper.make_node("GlobalMaxPool", ["cat"], ["gmax"]),
        helper.make_node("ReduceMean", ["cat"], ["rmean"], axes=[2, 3], keepdims=1),
        helper.make_node("Cast", ["rmean"], ["rmean_f"], to=TensorProto.FLOAT),
        helper.make_node("Sub", ["gmax", "rmean_f"], ["y"]),
    ]
    return _model(nodes, inits, [2, 3, 5, 5], opset=14)


TINY_MODELS: dict[str, Callable[[], onnx.ModelProto]] = {
    "activations": build_activations,
    "mobile_block": build_mobile_block,
    "shape_ops": build_shape_ops,
    "legacy_attrs": build_legacy_attrs,
}


def _assert_matches_ort(model: onnx.ModelProto, x: np.ndarray) -> None:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (expected,) = session.run(None, {session.get_inputs()[0].name: x})
    with torch.no_grad():
        (actual,) = TorchGraph(model).eval()(torch.from_numpy(x))
    scale = float(np.abs(expected).max())
    np.testing.assert_allclose(actual.numpy(), expected, rtol=1e-4, atol=1e-4 * max(scale, 1e-6))


@pytest.mark.ort
@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_tiny_model_matches_onnxruntime(name: str) -> None:
    model = TINY_MODELS[name]()
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    x = np.random.default_rng(0).standard_normal(dims).astype(np.float32) * 2
    _assert_matches_ort(model, x)


@pytest.mark.ort
@pytest.mark.parametrize("name", sorted(REAL_MODELS))
def test_real_model_matches_onnxruntime(name: str) -> None:
    relative, size = REAL_MODELS[name]
    path = asset(relative)
    x = np.random.default_rng(0).standard_normal((2, 3, size, size)).astype(np.float32)
    _assert_matches_ort(onnx.load(str(path)), x)


def test_bn_inputs_and_running_stats_are_exposed_in_graph_order() -> None:
    model = build_mobile_block()
    graph = TorchGraph(model)
    x = torch.randn(2, 4, 9, 9, requires_grad=True)
    outputs, captures = graph(x, capture_bn_inputs=True)
    assert [name for name, _ in captures] == [bn.name for bn in graph.bn_layers]
    assert captures[0][1].shape == (2, 4, 4, 4)
    ((name, mean, var, eps),) = graph.bn_running_stats()
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    np.testing.assert_array_equal(mean.numpy(), inits["bn_m"])
    np.testing.assert_array_equal(var.numpy(), inits["bn_v"])
    assert eps == pytest.approx(1e-3)
    # the graph is differentiable end to end
    (outputs[0].sum() + captures[0][1].pow(2).sum()).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_unsupported_ops_are_all_named_at_construction() -> None:
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("Erf", ["r"], ["e"], name="erf_node"),
        helper.make_node("TopK", ["e", "k"], ["y", "idx"], name="topk_node"),
    ]
    graph = helper.make_graph(
        nodes, "bad", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=[_ints("k", [2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    with pytest.raises(UnsupportedOpError, match=r"Erf \(nodes: erf_node\).*TopK \(nodes: topk_node\)"):
        TorchGraph(model)
    assert issubclass(UnsupportedOpError, ValueError)


@pytest.mark.ort
@pytest.mark.parametrize("name", ["mobile_block", "shape_ops", "legacy_attrs"])
def test_tiny_model_compiles_into_one_graph(name: str) -> None:
    """Shapes, pads and clip bounds read from tensors are traced as constants, so torch.compile (what
    --reconstruct-compile runs each block's steps under) takes the whole graph without a break and computes
    what onnxruntime computes."""
    model = TINY_MODELS[name]()
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    x = np.random.default_rng(0).standard_normal(dims).astype(np.float32) * 2
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (expected,) = session.run(None, {session.get_inputs()[0].name: x})
    torch._dynamo.reset()
    compiled = torch.compile(TorchGraph(model).eval().forward, fullgraph=True, dynamic=False,
                             options={"layout_optimization": False})
    with torch.no_grad():
        (actual,) = compiled(torch.from_numpy(x))
    scale = max(float(np.abs(expected).max()), 1e-6)
    np.testing.assert_allclose(actual.numpy(), expected, rtol=1e-4, atol=1e-4 * scale)
