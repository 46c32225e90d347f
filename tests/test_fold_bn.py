"""BN folding is exact: numpy core against the BN formula, and ORT outputs before/after on real and
generated graphs."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import SHARED_MODELS, asset
from hypothesis import given, settings
from hypothesis import strategies as st

from models import run, varied_chain
from onnxdfq.graph import layers as graph_layers
from onnxdfq.graph import surgery
from onnxdfq.graph.io import prepare_model
from onnxdfq.passes.base import Workspace
from onnxdfq.passes.fold_bn import FoldBatchNormPass, fold_batchnorm


def folded_float_model(model: onnx.ModelProto) -> tuple[onnx.ModelProto, Workspace]:
    model = prepare_model(model)
    ws = Workspace(graph=surgery.import_graph(model))
    graph_layers.ensure_node_names(ws.graph)
    FoldBatchNormPass()(ws)
    return surgery.export_model(ws.graph, model), ws


@given(out_ch=st.integers(1, 6), in_ch=st.integers(1, 5), k=st.sampled_from([1, 3]),
       seed=st.integers(0, 10_000))
@settings(max_examples=40, deadline=None)
def test_fold_core_matches_bn_formula(out_ch, in_ch, k, seed):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((out_ch, in_ch, k, k))
    b = rng.standard_normal(out_ch)
    gamma = rng.standard_normal(out_ch)  # includes negative gammas
    gamma[0] = 0.0 if out_ch > 2 else gamma[0]  # a dead channel
    beta, mean, var = rng.standard_normal(out_ch), rng.standard_normal(out_ch), rng.uniform(0.1, 2, out_ch)
    x = rng.standard_normal((in_ch, k, k))
    pre = np.einsum("oikl,ikl->o", w, x) + b
    expected = gamma * (pre - mean) / np.sqrt(var + 1e-5) + beta
    folded = fold_batchnorm(w, b, gamma, beta, mean, var, 1e-5)
    got = np.einsum("oikl,ikl->o", folded.weight.astype(np.float64), x) + folded.bias
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(folded.stats.std, np.abs(gamma))
    np.testing.assert_array_equal(folded.stats.mean, beta)
    assert not np.shares_memory(folded.weight, w)


@pytest.mark.parametrize("relative", SHARED_MODELS)
def test_folding_is_exact_on_shared_models(relative):
    model = onnx.load(str(asset(relative)))
    folded, ws = folded_float_model(model)
    assert not any(n.op_type == "BatchNormalization" for n in folded.graph.node)
    n_bn = sum(n.op_type == "BatchNormalization" for n in model.graph.node)
    assert len(ws.channel_stats) == n_bn
    shape = [d.dim_value or 2 for d in model.graph.input[0].type.tensor_type.shape.dim]
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    ref, got = run(model, x), run(folded, x)
    assert np.max(np.abs(got - ref)) <= 1e-4 * np.max(np.abs(ref))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_folding_is_exact_on_generated_graphs(seed):
    model = varied_chain(seed)
    folded, ws = folded_float_model(model)
    x = np.random.default_rng(seed).standard_normal((4, 3, 17, 17)).astype(np.float32)
    ref, got = run(model, x), run(folded, x)
    assert np.max(np.abs(got - ref)) <= 1e-4 * np.max(np.abs(ref))
    # negative gammas: the kept std is |gamma|
    assert all(np.all(stats.std >= 0) for stats in ws.channel_stats.values())


def test_folding_twice_reports_nothing_modified():
    model = prepare_model(varied_chain(0))
    ws = Workspace(graph=surgery.import_graph(model))
    assert FoldBatchNormPass()(ws).modified
    assert not FoldBatchNormPass()(ws).modified


def test_bn_stats_describe_the_preactivation():
    """The kept (beta, |gamma|) are the mean/std the BN output really has on its calibration data."""
    model = varied_chain(0)  # BN statistics calibrated on N(0, 1) inputs, 16 images
    folded, ws = folded_float_model(model)
    import onnxruntime as ort
    from onnx import TensorProto, helper

    layer = [lay for lay in graph_layers.read_layers(ws.graph) if lay.name == "conv2"][0]
    probe = onnx.ModelProto.FromString(folded.SerializeToString())
    probe.graph.output.append(helper.make_tensor_value_info(layer.output_name, TensorProto.FLOAT, None))
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((16, 3, 17, 17)).astype(np.float32)
    value = session.run([layer.output_name], {"input": x})[0]
    np.testing.assert_allclose(value.mean(axis=(0, 2, 3)), ws.channel_stats["conv2"].mean, atol=1e-3)
    np.testing.assert_allclose(value.std(axis=(0, 2, 3)), ws.channel_stats["conv2"].std, rtol=1e-3, atol=1e-4)
