"""Quantization grid, qparams, bit-width parsing and the layer view."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from models import gemm_matmul_model, varied_chain
from onnxdfq.graph import layers as graph_layers
from onnxdfq.graph import surgery
from onnxdfq.graph.io import prepare_model
from onnxdfq.passes.base import Workspace
from onnxdfq.passes.fold_bn import FoldBatchNormPass
from onnxdfq.quant.fake import dequantize, quantize
from onnxdfq.quant.qparams import activation_qparams, mse_weight_absmax, weight_scale
from onnxdfq.quant.scheme import QuantScheme, parse_act_bits, parse_bits


@pytest.mark.parametrize("bits,levels", [(2, [-1, 0, 1]), (3, list(range(-3, 4))), (8, list(range(-127, 128)))])
def test_signed_symmetric_grid_levels(bits, levels):
    scheme = QuantScheme(bits)
    assert list(range(scheme.qmin, scheme.qmax + 1)) == levels


@given(w=hnp.arrays(np.float64, hnp.array_shapes(min_dims=2, max_dims=4, max_side=5),
                    elements=st.floats(-10, 10, allow_subnormal=False)),
       bits=st.integers(2, 8))
@settings(max_examples=80, deadline=None)
def test_round_trip_error_within_half_step(w, bits):
    scheme = QuantScheme(bits)
    with np.errstate(all="ignore"), pytest.warns(RuntimeWarning) if not np.all(
            np.abs(w).reshape(w.shape[0], -1).max(1) > 0) else _nullcontext():
        scale = weight_scale(w, scheme)
    q = quantize(w, scale, scheme.qmin, scheme.qmax)
    assert q.min() >= scheme.qmin and q.max() <= scheme.qmax
    err = np.abs(dequantize(q, scale) - w)
    assert np.all(err <= scale.reshape((-1,) + (1,) * (w.ndim - 1)) / 2 + 1e-12)


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_zero_channel_gets_a_warning_not_a_division_by_zero():
    w = np.zeros((2, 3))
    w[1] = [1, -2, 3]
    with pytest.warns(RuntimeWarning, match="all-zero"):
        scale = weight_scale(w, QuantScheme(8))
    assert np.all(np.isfinite(scale)) and scale[1] == pytest.approx(3 / 127)


@pytest.mark.parametrize("lo,hi,signed", [(0.0, 5.0, False), (-1.0, 3.0, True), (0.5, 2.0, False)])
def test_activation_qparams_keep_zero_exact_and_cover_range(lo, hi, signed):
    scheme = QuantScheme(8, signed=signed, symmetric=False, per_channel=False)
    scale, zp = activation_qparams(lo, hi, scheme)
    assert scheme.qmin <= zp <= scheme.qmax
    assert (scheme.qmin - zp) * scale <= min(lo, 0) + 1e-9
    assert (scheme.qmax - zp) * scale >= hi - scale


@pytest.mark.parametrize("text,expected", [("8", (8, None)), ("2/6", (2, 6)), (" 4 ", (4, None))])
def test_parse_bits(text, expected):
    assert parse_bits(text) == expected


@pytest.mark.parametrize("text", ["1", "9", "6/2", "4/4", "x", "2/9", "0"])
def test_parse_bits_rejects(text):
    with pytest.raises(ValueError):
        parse_bits(text)


def test_parse_act_bits():
    assert parse_act_bits("none") is None and parse_act_bits("6") == 6
    with pytest.raises(ValueError):
        parse_act_bits("12")


def test_layer_view_of_varied_chain():
    model = prepare_model(varied_chain(0))
    ws = Workspace(graph=surgery.import_graph(model))
    FoldBatchNormPass()(ws)
    layers = {layer.name: layer for layer in graph_layers.read_layers(ws.graph)}
    assert layers["conv0"].act.kind == "relu6" and layers["conv0"].node.attrs["pads"] == [0, 0, 1, 1]
    assert layers["conv1"].is_depthwise and layers["conv1"].weight.shape == (8, 1, 3, 3)
    assert layers["conv3"].group == 3 and layers["conv3"].act.kind == "none"
    assert layers["conv4"].act.kind == "none"  # followed by the residual Add, not an activation
    assert layers["fc"].op_type == "Gemm" and layers["fc"].weight.shape == (10, 16)
    assert set(ws.channel_stats) == {f"conv{i}" for i in range(6)}


def test_layer_view_canonicalises_stored_in_out_weights():
    model = prepare_model(gemm_matmul_model())
    graph = surgery.import_graph(model)
    layers = {layer.name: layer for layer in graph_layers.read_layers(graph)}
    assert layers["gemm"].weight.shape == (16, 12) and layers["gemm"].stored_out_axis == 1
    assert layers["matmul"].weight.shape == (5, 16) and layers["matmul"].act.kind == "none"
    assert layers["gemm"].act.kind == "relu"


def test_mobilenet_layer_view(mobilenet):
    import onnx

    graph = surgery.import_graph(prepare_model(onnx.load(str(mobilenet))))
    layers = graph_layers.read_layers(graph)
    assert len(layers) == 28
    assert sum(layer.is_depthwise for layer in layers) == 13
    head = layers[-1]
    assert head.op_type == "Conv" and head.weight.shape[2:] == (1, 1) and head.bias is not None


def _grid_error(w2d: np.ndarray, absmax: np.ndarray, scheme: QuantScheme) -> np.ndarray:
    scale = np.where(absmax > 0, absmax / scheme.qmax, 1.0)[:, None]
    return ((np.clip(np.rint(w2d / scale), scheme.qmin, scheme.qmax) * scale - w2d) ** 2).sum(axis=1)


def test_mse_weight_range_is_the_best_candidate_per_channel():
    """The clipped range equals a channel-by-channel search over the same candidates (a plain loop here), clips
    heavy-tailed channels and leaves uniform ones near max |w|; a dead channel stays at 0."""
    rng = np.random.default_rng(0)
    w = np.concatenate([rng.laplace(size=(6, 8, 3, 3)), rng.uniform(-1, 1, size=(6, 8, 3, 3)),
                        np.zeros((1, 8, 3, 3))])
    scheme = QuantScheme(4, signed=True, symmetric=True)
    ratios = np.linspace(0.5, 1.0, 26)
    got = mse_weight_absmax(w, scheme)
    flat = w.reshape(len(w), -1)
    absmax = np.abs(flat).max(axis=1)
    for c in range(len(w)):
        errors = [_grid_error(flat[c:c + 1], np.array([r * absmax[c]]), scheme)[0] for r in ratios]
        assert got[c] == pytest.approx(ratios[int(np.argmin(errors))] * absmax[c])
    ratio = got[:12] / absmax[:12]
    assert ratio[:6].mean() < 0.95 and ratio[:6].mean() < ratio[6:].mean() and got[12] == 0, ratio
    assert np.all(_grid_error(flat, got, scheme) <= _grid_error(flat, absmax, scheme))
    per_tensor = mse_weight_absmax(w, QuantScheme(4, signed=True, symmetric=True, per_channel=False))
    assert per_tensor.shape == (1,) and 0.5 * np.abs(w).max() <= per_tensor[0] <= np.abs(w).max()
