"""The statistics engine against Monte Carlo, op by op, and its cache.

Each case is a tiny graph whose input(s) the engine models as N(0, 1) clipped to +-3; the same
distribution is sampled, run through onnxruntime, and every tensor's per-channel mean and
variance compared with the engine's (clipped) moments.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxdfq.graph import layers as graph_layers
from onnxdfq.graph import surgery
from onnxdfq.passes.base import ChannelStats, Pass, PassReport, Workspace
from onnxdfq.passes.statistics import propagate_statistics, tensor_statistics

SAMPLES = 3000
RNG = np.random.default_rng(0)


def _w(*shape: int, scale: float = 0.4) -> np.ndarray:
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


@dataclass
class Case:
    name: str
    nodes: list
    inits: dict[str, np.ndarray]
    inputs: dict[str, list[int]]
    output: str
    check_var: bool = True

    def __str__(self) -> str:
        return self.name

    def model(self) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes, self.name,
            [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", *shape]) for n, shape in self.inputs.items()],
            [helper.make_tensor_value_info(self.output, TensorProto.FLOAT, None)],
            [numpy_helper.from_array(v, k) for k, v in self.inits.items()])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
        model.ir_version = 8
        return onnx.shape_inference.infer_shapes(model)


def _conv(name: str, src: str, dst: str, out_ch: int, in_ch: int, k: int = 3, group: int = 1) -> tuple[list, dict]:
    inits = {f"{name}.w": _w(out_ch, in_ch // group, k, k), f"{name}.b": _w(out_ch, scale=0.5)}
    return [helper.make_node("Conv", [src, f"{name}.w", f"{name}.b"], [dst], name=name, group=group)], inits


def _cases() -> list[Case]:
    conv, conv_inits = _conv("c", "x", "y", 4, 3)
    relu = helper.make_node("Relu", ["y"], ["r"], name="relu")
    clip = helper.make_node("Clip", ["y", "lo", "hi"], ["k"], name="clip")
    bounds = {"lo": np.array(0.0, np.float32), "hi": np.array(1.0, np.float32)}
    dw, dw_inits = _conv("d", "x", "z", 6, 3, group=3)
    pointwise, pointwise_inits = _conv("p", "x", "y", 4, 3, k=1)
    gemm_inits = {"g.w": _w(5, 12), "g.b": _w(5, scale=0.5)}
    slice_inits = {"s0": np.array([1], np.int64), "s1": np.array([3], np.int64), "ax": np.array([1], np.int64)}
    pad_inits = {"pads": np.array([0, 2, 0, 0, 0, 1, 0, 0], np.int64)}
    return [
        Case("conv", conv, conv_inits, {"x": [3, 6, 6]}, "y"),
        Case("depthwise_multiplier", dw, dw_inits, {"x": [3, 6, 6]}, "z"),
        Case("relu", conv + [relu], conv_inits, {"x": [3, 6, 6]}, "r"),
        Case("clip", conv + [clip], {**conv_inits, **bounds}, {"x": [3, 6, 6]}, "k"),
        Case("add_independent", [helper.make_node("Add", ["a", "b"], ["s"]), helper.make_node("Relu", ["s"], ["o"])],
             {}, {"a": [2, 3, 3], "b": [2, 3, 3]}, "o"),
        Case("add_constant", [helper.make_node("Add", ["x", "shift"], ["o"])],
             {"shift": np.array([0.5, -1.0, 2.0], np.float32).reshape(3, 1, 1)}, {"x": [3, 4, 4]}, "o"),
        Case("gemm", [helper.make_node("Gemm", ["x", "g.w", "g.b"], ["o"], transB=1)], gemm_inits,
             {"x": [12]}, "o"),
        Case("concat", pointwise + [relu, helper.make_node("Concat", ["r", "x"], ["o"], axis=1)], pointwise_inits,
             {"x": [3, 4, 4]}, "o"),
        Case("slice_channels", conv + [helper.make_node("Slice", ["y", "s0", "s1", "ax"], ["o"])],
             {**conv_inits, **slice_inits}, {"x": [3, 6, 6]}, "o"),
        Case("pad_channels", [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Pad", ["r", "pads"], ["o"])],
             pad_inits, {"x": [3, 4, 4]}, "o"),
        # pooling keeps the channel model: exact for the mean of an average, not for its variance
        Case("average_pool", conv + [relu, helper.make_node("GlobalAveragePool", ["r"], ["o"])], conv_inits,
             {"x": [3, 6, 6]}, "o", check_var=False),
        Case("reduce_mean_over_space", conv + [relu, helper.make_node("ReduceMean", ["r", "space"], ["o"])],
             {**conv_inits, "space": np.array([2, 3], np.int64)}, {"x": [3, 6, 6]}, "o", check_var=False),
    ]


def _monte_carlo(case: Case) -> tuple[np.ndarray, np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(case.model().SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {name: np.clip(RNG.standard_normal((SAMPLES, *shape)), -3, 3).astype(np.float32)
             for name, shape in case.inputs.items()}
    value = session.run([case.output], feeds)[0].astype(np.float64)
    per_channel = np.moveaxis(value, 1, 0).reshape(value.shape[1], -1)
    return per_channel.mean(axis=1), per_channel.var(axis=1)


@pytest.mark.parametrize("case", _cases(), ids=str)
def test_engine_moments_match_monte_carlo(case: Case):
    graph = surgery.import_graph(case.model())
    graph_layers.ensure_node_names(graph)
    ws = Workspace(graph=graph)
    stats = propagate_statistics(ws, graph_layers.read_layers(graph))
    assert case.output in stats, f"{case.name}: the engine gave no statistics for {case.output}"
    mean, var = stats[case.output].moments()
    mc_mean, mc_var = _monte_carlo(case)
    scale = np.sqrt(mc_var) + 1e-3
    # 3000 samples x spatial positions: the Monte Carlo error is well under 0.05 std
    np.testing.assert_allclose(mean, mc_mean, atol=0.06 * scale.max())
    if case.check_var:
        np.testing.assert_allclose(var, mc_var, rtol=0.08, atol=1e-3)


def test_layer_statistics_override_propagation_and_keep_their_source():
    case = _cases()[2]  # conv -> relu
    graph = surgery.import_graph(case.model())
    graph_layers.ensure_node_names(graph)
    ws = Workspace(graph=graph)
    layer = graph_layers.read_layers(graph)[0]
    ws.channel_stats[layer.name] = ChannelStats(np.array([1.0, -1.0, 0.0, 2.0]), np.ones(4), "prior")
    stats = tensor_statistics(ws)
    assert stats["y"].source == "prior"
    np.testing.assert_allclose(stats["y"].mean, [1.0, -1.0, 0.0, 2.0])
    assert stats["r"].source == "prior"  # through the Relu
    assert stats["r"].lo.min() == 0.0


class _Touch(Pass):
    name = "touch"

    def call(self, ws: Workspace) -> PassReport:
        return PassReport(self.name, modified=True)


def test_statistics_are_computed_once_per_graph_state():
    case = _cases()[2]
    graph = surgery.import_graph(case.model())
    ws = Workspace(graph=graph)
    first = tensor_statistics(ws)
    assert tensor_statistics(ws) is first  # cached: same graph state
    _Touch()(ws)  # a pass that changed the graph
    again = tensor_statistics(ws)
    assert again is not first
    np.testing.assert_allclose(again["y"].mean, first["y"].mean)
