"""--avg-act-bits: activation widths (4 or 8) chosen per tensor under an average-bits budget."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from test_bit_allocation import _edited

from models import run, vgg_model
from onnxdfq.graph import layers as graph_layers
from onnxdfq.graph import patterns, surgery
from onnxdfq.pipeline import quantize_model


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def test_switch_model_is_exact_off_and_fake_quantizes_on():
    model = vgg_model()
    graph = surgery.import_graph(model)
    layers = graph_layers.read_layers(graph)
    tensors = patterns.activation_tensors(graph, layers, {layer.name for layer in layers})
    switched, names, defaults = surgery.model_with_act_switches(graph, tensors, model)
    x = np.random.default_rng(0).standard_normal((4, 3, 16, 16)).astype(np.float32)
    session = _session(switched)
    np.testing.assert_allclose(session.run(None, {"input": x, **defaults})[0], run(model, x), rtol=1e-5, atol=1e-5)
    # the network input on a signed 4-bit grid: the same as the float model on inputs rounded in numpy
    scale, zero, lo, hi = 0.4, 1.0, -8.0, 7.0
    feeds = dict(defaults)
    for name, value in zip(names["input"], (1.0, scale, zero, lo, hi), strict=True):
        feeds[name] = np.array(value, np.float32)
    rounded = ((np.clip(np.round(x / scale) + zero, lo, hi) - zero) * scale).astype(np.float32)
    np.testing.assert_allclose(session.run(None, {"input": x, **feeds})[0], run(model, rounded), rtol=1e-5, atol=1e-5)


def _act_widths(result) -> dict[str, tuple[int, int]]:
    entry = next(p for p in result.report["passes"] if p["name"] == "act_width_allocation")
    return {name: (row["act_bits"], row["elements"]) for name, row in entry["layers"].items()}


def test_a_fragile_activation_gets_8_bits():
    """conv2's channel 0 made huge (BN beta +100) and conv3 made blind to it: the function barely changes, but the
    per-tensor grid of conv2's output now spans ~100, and at 4 bits its live channels round to zero."""
    blind = _edited(vgg_model(), {"conv3.weight": lambda w: w.__setitem__((slice(None), 0), 0.0)})
    fragile = _edited(blind, {"conv2.beta": lambda b: b.__setitem__(0, 100.0)})
    plain = _act_widths(quantize_model(blind, avg_act_bits=4.5, check=False))
    hurt = _act_widths(quantize_model(fragile, avg_act_bits=4.5, check=False))
    assert plain["conv2_relu"][0] == 4 and hurt["conv2_relu"][0] == 8


def test_act_budget_holds_in_the_file():
    result = quantize_model(vgg_model(), avg_act_bits=5, act_bits=8)
    widths = _act_widths(result)
    nodes = {node.name: node for node in result.model.graph.node}
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in result.model.graph.initializer}
    for tensor, (bits, _) in widths.items():
        assert f"{tensor}_QuantizeLinear" in nodes, tensor
        clip = nodes.get(f"{tensor}_Clip")
        if bits == 4:  # a 4-bit grid inside its uint8 container: 16 levels
            assert clip is not None and int(inits[clip.input[2]]) - int(inits[clip.input[1]]) == 15, tensor
        else:
            assert clip is None, tensor
    counted = sum(b * n for b, n in widths.values()) / sum(n for _, n in widths.values())
    assert counted <= 5.0 and {b for b, _ in widths.values()} == {4, 8}
    x = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)
    assert np.isfinite(_session(result.model).run(None, {"input": x})[0]).all()
