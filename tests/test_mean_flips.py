"""SQuant's mean-weighted flips where a BN-free model's input means come from prior images (squant_mean_flips)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxdfq
from onnxdfq.graph import layers as graph_layers
from onnxdfq.graph import surgery
from onnxdfq.graph.patterns import linear_streams
from onnxdfq.passes.squant import squant_mean_flips, squant_round
from onnxdfq.quant.gaussian import clipped_mean_scale_slope, clipped_normal_mean

QMIN, QMAX = -7, 7


def _case(seed: int, out_ch: int = 24, in_ch: int = 40, k: int = 1):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((out_ch, in_ch, k, k)).astype(np.float32)
    scale = np.abs(w).reshape(out_ch, -1).max(1).astype(np.float64) / QMAX
    mean = rng.gamma(1.0, 1.0, in_ch) * rng.choice([-1.0, 1.0], in_ch)  # mixed signs, some near zero
    return w, scale, mean


def _weighted_error(w, scale, q, mean):
    taps = w[0, 0].size
    x = w.astype(np.float64).reshape(len(w), -1) / scale[:, None]
    return (q.reshape(len(w), -1) - x) @ np.repeat(mean, taps), x


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("k", [1, 3])
def test_mean_flips_shrink_weighted_error_within_one_step(seed, k):
    w, scale, mean = _case(seed, k=k)
    start = squant_round(w, scale, QMIN, QMAX)
    q = squant_mean_flips(w, scale, start, mean, QMIN, QMAX)
    assert q.shape == start.shape and q.dtype == start.dtype
    before, x = _weighted_error(w, scale, start, mean)
    after, _ = _weighted_error(w, scale, q, mean)
    assert np.all(np.abs(after) <= np.abs(before) + 1e-9)
    # every weight within one step of x (SQuant's own bound) and on the grid
    assert np.all(np.abs(q.reshape(len(w), -1) - x) < 1.0) and q.min() >= QMIN and q.max() <= QMAX
    # with every channel movable, each row ends within half the largest |m| of zero
    assert np.all(np.abs(after) <= np.abs(mean).max() / 2 + 1e-9)
    # and the sum falls by far on these rows: plain SQuant balances the unweighted sum only
    assert np.abs(after).mean() < 0.5 * np.abs(before).mean()


def test_mean_flips_leave_zero_means_and_balanced_rows_alone():
    w, scale, _ = _case(0)
    start = squant_round(w, scale, QMIN, QMAX)
    assert np.array_equal(squant_mean_flips(w, scale, start, np.zeros(w.shape[1]), QMIN, QMAX), start)
    # one-hot means: only column 3's error counts. A row keeps its rounding unless SQuant moved that weight past
    # one half, and then exactly that weight returns to nearest (the one move that brings |E| under one half)
    mean = np.zeros(w.shape[1])
    mean[3] = 1.0
    q = squant_mean_flips(w, scale, start, mean, QMIN, QMAX)
    x = w[:, 3, 0, 0].astype(np.float64) / scale
    moved = np.abs(start[:, 3, 0, 0] - x) > 0.5
    assert moved.any() and not moved.all()
    expected = start.copy()
    expected[moved, 3, 0, 0] = np.clip(np.rint(x[moved]), QMIN, QMAX)
    assert np.array_equal(q, expected)


def test_clipped_mean_scale_slope_is_the_derivative_of_the_clipped_mean():
    m = np.array([-2.0, -0.3, 0.0, 1.5, 4.0, 7.0, 0.5, 2.0])
    s = np.array([1.0, 0.5, 2.0, 1.0, 3.0, 1.0, 0.0, 1.0])
    lo = np.array([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -np.inf])
    hi = np.array([6.0, 6.0, np.inf, 6.0, 6.0, 6.0, 6.0, np.inf])
    step = 1e-6
    numeric = (clipped_normal_mean(m, s * (1 + step), lo, hi) - clipped_normal_mean(m, s * (1 - step), lo, hi)) / (
        2 * step)
    slope = clipped_mean_scale_slope(m, s, lo, hi)
    np.testing.assert_allclose(slope, numeric, atol=1e-6)
    assert slope[6] == 0.0 and slope[7] == 0.0  # no spread; no clipping
    assert slope[2] == pytest.approx(2.0 / np.sqrt(2 * np.pi))  # ReLU of N(0, 4): mean s / sqrt(2 pi)


def test_mean_flips_reject_mismatched_means():
    w, scale, mean = _case(0)
    with pytest.raises(ValueError, match="channels"):
        squant_mean_flips(w, scale, squant_round(w, scale, QMIN, QMAX), mean[:-1], QMIN, QMAX)


def _stream_model(seed: int = 0) -> onnx.ModelProto:
    """x -> stem(Relu) -> [a: 1x1 no act, b: 1x1 no act] -> Add -> c (1x1, Relu) -> d (1x1): the Add is a
    linear stream (what an inverted residual's bottleneck is), c's input; d reads a Relu output."""
    rng = np.random.default_rng(seed)

    def conv(name, src, dst, out_ch, in_ch):
        inits = [numpy_helper.from_array((rng.standard_normal((out_ch, in_ch, 1, 1)) * 0.5).astype(np.float32),
                                         f"{name}.w"),
                 numpy_helper.from_array((rng.standard_normal(out_ch) * 0.5 + 0.3).astype(np.float32), f"{name}.b")]
        return helper.make_node("Conv", [src, f"{name}.w", f"{name}.b"], [dst], name=name), inits

    made = {name: conv(name, *args) for name, args in {
        "stem": ("x", "s0", 16, 3), "a": ("s", "a0", 12, 16), "b": ("s", "b0", 12, 16), "c": ("sum", "c0", 24, 12),
        "d": ("c1", "y", 10, 24)}.items()}
    nodes = [made["stem"][0], helper.make_node("Relu", ["s0"], ["s"]), made["a"][0], made["b"][0],
             helper.make_node("Add", ["a0", "b0"], ["sum"]), made["c"][0], helper.make_node("Relu", ["c0"], ["c1"]),
             made["d"][0]]
    inits = [init for _, pair in made.items() for init in pair[1]]
    graph = helper.make_graph(nodes, "streams", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10, 8, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    return model


def test_linear_streams_follow_activation_free_layers_through_sums():
    graph = surgery.import_graph(_stream_model())
    layers = graph_layers.read_layers(graph)
    streams = linear_streams(graph, layers)
    names = {layer.name: layer for layer in layers}
    assert streams[names["c"].input_name] == {"a", "b"}
    assert names["d"].input_name not in streams and names["a"].input_name not in streams


def _weight_pass(result) -> dict:
    return next(p for p in result.report["passes"] if p["name"] == "weight_quant")


def test_bn_free_stream_consumer_gets_mean_weighted_flips(tmp_path):
    path = tmp_path / "streams.onnx"
    onnx.save(_stream_model(), path)
    result = onnxdfq.quantize_model(str(path), method="squant", bits=4, act_bits=8)
    rows = _weight_pass(result)["layers"]
    assert rows["c"].get("mean_weighted_flips") == "stream"  # its input is the sum of two activation-free layers
    # a, b and d read ReLU outputs: balanced along how those means move with the prior's excitation
    assert all(rows[name].get("mean_weighted_flips") == "clipped" for name in ("a", "b", "d"))
    assert "mean_weighted_flips" not in rows["stem"]  # the network input's statistics are an assumption
    assert _weight_pass(result)["params"]["mean_weighted_flips"] == {"stream": 1, "clipped": 3}
    # statistics measured on the user's samples are trusted as they are: no flips
    np.savez(tmp_path / "samples.npz", x=np.random.default_rng(1).standard_normal((16, 3, 8, 8)).astype(np.float32))
    measured = onnxdfq.quantize_model(str(path), method="squant", bits=4, act_bits=8,
                                      calib=f"data:{tmp_path / 'samples.npz'}")
    assert "mean_weighted_flips" not in _weight_pass(measured)["params"]
    # nor does nearest rounding flip anything
    nearest = onnxdfq.quantize_model(str(path), method="nearest", bits=4, act_bits=8)
    assert "mean_weighted_flips" not in _weight_pass(nearest)["params"]


def test_summary_names_the_flipped_layers(tmp_path):
    from click.testing import CliRunner

    from onnxdfq.cli import main

    path = tmp_path / "streams.onnx"
    onnx.save(_stream_model(), path)
    result = CliRunner().invoke(main, ["quantize", str(path), "-o", str(tmp_path / "q.onnx"), "--bits", "4"])
    assert result.exit_code == 0, result.output
    assert "mean-weighted flips" in result.output and "1 layers reading linear streams, 3 reading ReLU" in result.output
