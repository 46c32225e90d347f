"""DFQ: cross-layer equalization, high-bias absorption and analytic bias correction.

Cores against plain-loop references and a numpy conv; graph passes against onnxruntime on
generated and shared models; bias correction on real CIFAR-10 images; the MobileNet-V1
per-tensor regression on real ImageNet images (slow).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import asset
from hypothesis import given, settings
from hypothesis import strategies as st

from onnxdfq import demo_models as builders
from onnxdfq.graph import io as graph_io
from onnxdfq.graph import layers as graph_layers
from onnxdfq.graph import surgery
from onnxdfq.passes.base import BNStats, Workspace
from onnxdfq.passes.bias_absorption import BiasAbsorptionPass, absorb_bias, absorption_amount
from onnxdfq.passes.bias_correction import AnalyticBiasCorrectionPass, correct_bias
from onnxdfq.passes.cle import (
    CrossLayerEqualizationPass,
    equalize_pair,
    find_pairs,
    input_channel_ranges,
    output_channel_ranges,
    silence_dead_channels,
)
from onnxdfq.passes.fold_bn import FoldBatchNormPass
from onnxdfq.passes.weight_quant import WeightQuantPass
from onnxdfq.quant.scheme import BitWidthMap

RESNET20 = "cifar10/resnet20.onnx"  # shared models, relative to the assets folder (conftest.asset)
MOBILENET = "imagenet/mobilenet_v1_0.75.onnx"
CIFAR_MEAN, CIFAR_STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
RTOL = 1e-4  # FP32 parity of an exact rewrite, relative to the largest logit


# ---------------------------------------------------------------- numpy references

def _conv2d(x: np.ndarray, w: np.ndarray, b: np.ndarray | None, group: int = 1, stride: int = 1,
            pads: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """Reference NCHW conv (float64): pads (top, left, bottom, right), default 'same' for odd kernels."""
    k_h, k_w = w.shape[2:]
    top, left, bottom, right = pads if pads is not None else (k_h // 2, k_w // 2, k_h // 2, k_w // 2)
    xp = np.pad(np.asarray(x, np.float64), ((0, 0), (0, 0), (top, bottom), (left, right)))
    win = np.lib.stride_tricks.sliding_window_view(xp, (k_h, k_w), axis=(2, 3))[:, :, ::stride, ::stride]
    n, c, h, w_out = win.shape[:4]
    out_ch, in_per_group = w.shape[:2]
    win = win.reshape(n, group, in_per_group, h, w_out, k_h, k_w)
    wg = np.asarray(w, np.float64).reshape(group, out_ch // group, in_per_group, k_h, k_w)
    y = np.einsum("ngihwyx,goiyx->ngohw", win, wg, optimize=True).reshape(n, out_ch, h, w_out)
    return y if b is None else y + np.asarray(b, np.float64).reshape(1, -1, 1, 1)


def _mean_conv_output(x: np.ndarray, w: np.ndarray, b: np.ndarray | None, stride: int,
                      pads: tuple[int, int, int, int]) -> np.ndarray:
    """Per-channel mean of a (group 1) conv's output, exactly, by linearity: each tap's weight times
    the mean of the (zero-padded, strided) input it reads."""
    k_h, k_w = w.shape[2:]
    top, left, bottom, right = pads
    xp = np.pad(np.asarray(x, np.float64), ((0, 0), (0, 0), (top, bottom), (left, right)))
    win = np.lib.stride_tricks.sliding_window_view(xp, (k_h, k_w), axis=(2, 3))[:, :, ::stride, ::stride]
    tap_mean = win.mean(axis=(0, 2, 3))  # [C, kh, kw]
    out = np.einsum("oiyx,iyx->o", np.asarray(w, np.float64), tap_mean)
    return out if b is None else out + b


def _layer_apply(x: np.ndarray, w: np.ndarray, b: np.ndarray | None, group: int) -> np.ndarray:
    if w.ndim == 2:
        return x @ w.T.astype(np.float64) + (0.0 if b is None else b)
    return _conv2d(x, w, b, group)


def _reference_equalize(w1, b1, w2, group2):
    """Plain loops over channels."""
    w1, w2 = np.array(w1, np.float64), np.array(w2, np.float64)
    b1 = None if b1 is None else np.array(b1, np.float64)
    out2, in_pg = w2.shape[:2]
    out_pg = out2 // group2
    scales = np.ones(w1.shape[0])
    for i in range(w1.shape[0]):
        g, j = divmod(i, in_pg)
        r1 = np.abs(w1[i]).max()
        r2 = np.abs(w2[g * out_pg:(g + 1) * out_pg, j]).max()
        if r1 > 0 and r2 > 0:
            scales[i] = np.sqrt(r1 / r2)
        w1[i] /= scales[i]
        if b1 is not None:
            b1[i] /= scales[i]
        w2[g * out_pg:(g + 1) * out_pg, j] *= scales[i]
    return w1, b1, w2, scales


def _reference_correct(w_fp, w_q, bias, in_mean, group):
    out_ch, in_pg = w_fp.shape[:2]
    new = np.array(bias, np.float64)
    for o in range(out_ch):
        g = o // (out_ch // group)
        for j in range(in_pg):
            new[o] -= float(np.sum(w_q[o, j] - w_fp[o, j])) * in_mean[g * in_pg + j]
    return new


# ---------------------------------------------------------------- cases: (w1, b1, w2, group2, input)

LAYER_KINDS = ["conv", "depthwise", "depthwise_mult", "grouped", "gemm"]


def _case(kind: str, seed: int, spread: float = 30.0):
    rng = np.random.default_rng(seed)
    channels = 6
    w1 = rng.standard_normal((channels, 3, 3, 3)) * np.exp(rng.uniform(-1, 1, (channels, 1, 1, 1)) * np.log(spread))
    w1[rng.integers(channels)] *= 0.0 if seed % 3 == 0 else 1.0  # a dead channel now and then
    b1 = rng.normal(0.5, 1.0, channels)
    x = rng.standard_normal((2, 3, 7, 7))
    if kind == "gemm":
        w1 = w1.reshape(channels, -1)[:, :5]
        x = rng.standard_normal((4, 5))
        return w1, b1, rng.standard_normal((4, channels)), 1, x
    shapes = {"conv": ((5, channels, 3, 3), 1), "depthwise": ((channels, 1, 3, 3), channels),
              "depthwise_mult": ((2 * channels, 1, 3, 3), channels), "grouped": ((4, channels // 2, 1, 1), 2)}
    shape, group2 = shapes[kind]
    return w1, b1, rng.standard_normal(shape), group2, x


@pytest.mark.parametrize("kind", LAYER_KINDS)
@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), dtype=st.sampled_from([np.float32, np.float64]))
def test_equalize_pair_matches_loops_and_equalizes(kind, seed, dtype):
    w1, b1, w2, group2, _ = _case(kind, seed)
    w1, b1, w2 = w1.astype(dtype), b1.astype(dtype), w2.astype(dtype)
    before = (w1.copy(), w2.copy())
    result = equalize_pair(w1, b1, w2, group2=group2, eps=0.0)
    ref_w1, ref_b1, ref_w2, ref_scale = _reference_equalize(w1, b1, w2, group2)
    rtol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(result.scale, ref_scale, rtol=rtol)
    np.testing.assert_allclose(result.w1, ref_w1, rtol=rtol, atol=1e-30)
    np.testing.assert_allclose(result.w2, ref_w2, rtol=rtol, atol=1e-30)
    np.testing.assert_allclose(result.b1, ref_b1, rtol=rtol)
    np.testing.assert_array_equal(w1, before[0])  # inputs untouched
    np.testing.assert_array_equal(w2, before[1])
    r1, r2 = output_channel_ranges(result.w1), input_channel_ranges(result.w2, group2)
    live = (output_channel_ranges(w1) > 0) & (input_channel_ranges(w2, group2) > 0)
    np.testing.assert_allclose(r1[live], r2[live], rtol=1e-6)


def _two_layers(x, w1, b1, w2, group2, upper):
    hidden = np.minimum(np.maximum(_layer_apply(x, w1, b1, 1), 0.0), np.reshape(upper, (1, -1) + (1,) * (x.ndim - 2)))
    return _layer_apply(hidden, w2, None, group2)


@pytest.mark.parametrize("kind", LAYER_KINDS)
@pytest.mark.parametrize("act", ["relu", "relu6"])
def test_equalize_pair_preserves_function(kind, act):
    for seed in range(4):
        w1, b1, w2, group2, x = _case(kind, seed)
        upper = 6.0 if act == "relu6" else np.inf

        result = equalize_pair(w1, b1, w2, group2=group2)
        reference = _two_layers(x, w1, b1, w2, group2, np.full(w1.shape[0], upper))
        after = _two_layers(x, result.w1, result.b1, result.w2, group2, upper / result.scale)
        np.testing.assert_allclose(after, reference, rtol=1e-9, atol=1e-9 * np.abs(reference).max())


@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_absorption_and_silencing_are_exact_inside_their_domain(kind):
    w1, b1, w2, group2, x = _case(kind, 7)
    b2 = np.random.default_rng(1).standard_normal(w2.shape[0])
    pre = _layer_apply(x, w1, b1, 1)
    axes = (0,) + tuple(range(2, pre.ndim))
    mean, std = pre.mean(axis=axes), pre.std(axis=axes)
    amount = absorption_amount(mean, std, sigmas=3.0, upper=np.full(mean.size, 6.0))
    amount = np.minimum(amount, pre.min(axis=axes).clip(0))  # stay inside the exact domain
    result = absorb_bias(b1, w2, b2, amount, group2=group2)
    shape = (1, -1) + (1,) * (pre.ndim - 2)

    def second(hidden, bias):
        if w2.ndim == 2:
            return hidden @ w2.T + bias
        return _conv2d(hidden, w2, bias, group2, pads=(0, 0, 0, 0))  # no padding: exact everywhere

    reference = second(np.minimum(np.maximum(pre, 0), 6.0), b2)
    shifted = pre - amount.reshape(shape)
    after = second(np.minimum(np.maximum(shifted, 0), (6.0 - amount).reshape(shape)), result.b2)
    np.testing.assert_allclose(after, reference, rtol=1e-9, atol=1e-9 * np.abs(reference).max())
    np.testing.assert_allclose(result.b1, b1 - amount)

    dead = np.zeros(w1.shape[0], bool)
    dead[1] = True
    w1_dead = w1.copy()
    w1_dead[1] = 0.0
    pre_dead = _layer_apply(x, w1_dead, b1, 1)
    cut = silence_dead_channels(w1_dead, b1, w2, b2, dead, np.maximum(b1, 0.0), group2=group2)
    reference = second(np.maximum(pre_dead, 0), b2)
    after = second(np.maximum(_layer_apply(x, cut.w1, cut.b1, 1), 0), cut.b2)
    np.testing.assert_allclose(after, reference, rtol=1e-9, atol=1e-9 * np.abs(reference).max())


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), group=st.sampled_from([1, 2, 6]))
def test_correct_bias_matches_loops(seed, group):
    rng = np.random.default_rng(seed)
    in_ch, out_ch = 6, 6
    w_fp = rng.standard_normal((out_ch, in_ch // group, 3, 3))
    w_q = np.round(w_fp * 4) / 4
    bias, in_mean = rng.standard_normal(out_ch), rng.uniform(0, 2, in_ch)
    new = correct_bias(w_fp, w_q, bias, in_mean, group)
    np.testing.assert_allclose(new, _reference_correct(w_fp, w_q, bias, in_mean, group), rtol=1e-12)
    np.testing.assert_allclose(correct_bias(w_fp, w_q, None, in_mean, group) + bias, new, rtol=1e-12)
    # the correction cancels the mean shift for inputs whose per-channel mean is in_mean (spatially
    # constant samples, so that every output position sees the same mean)
    x = np.broadcast_to(rng.standard_normal((64, in_ch, 1, 1)), (64, in_ch, 5, 5))
    x = x - x.mean(axis=(0, 2, 3)).reshape(1, -1, 1, 1) + in_mean.reshape(1, -1, 1, 1)
    shift = (_conv2d(x, w_q, new, group, pads=(0, 0, 0, 0))
             - _conv2d(x, w_fp, bias, group, pads=(0, 0, 0, 0))).mean(axis=(0, 2, 3))
    np.testing.assert_allclose(shift, 0.0, atol=1e-9)


# ---------------------------------------------------------------- graph passes against onnxruntime

def _workspace(model: onnx.ModelProto) -> Workspace:
    model = graph_io.prepare_model(model)
    ws = Workspace(graph=surgery.import_graph(model))
    graph_layers.ensure_node_names(ws.graph)
    FoldBatchNormPass()(ws)
    return ws


def _run(model: onnx.ModelProto, x: np.ndarray, outputs: list[str] | None = None) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(outputs, {session.get_inputs()[0].name: x.astype(np.float32)})


def _relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(a).max())


def _cifar(count: int) -> np.ndarray:
    data = np.load(asset("cifar10/test.npz"))
    x = data["x"][:count].astype(np.float32) / 255.0
    return ((x - CIFAR_MEAN) / CIFAR_STD).transpose(0, 3, 1, 2).astype(np.float32)


def _generated(kind: str) -> onnx.ModelProto:
    if kind == "demo":
        return builders.demo_model()
    act = "relu6" if kind == "relu6" else "relu"
    specs = [builders.ConvSpec(16, 3, act=act), builders.ConvSpec(16, 3, 1, "dw", act=act),
             builders.ConvSpec(24, 1, act=act), builders.ConvSpec(24, 3, 2, "dw", act=act),
             builders.ConvSpec(32, 1, act=act), builders.ConvSpec(32, 3, act=act)]
    model = builders.build_chain(specs, size=16, channel_spread=20.0, seed=3)
    return builders.calibrate_bn(model, np.random.default_rng(0).standard_normal((32, 3, 16, 16)).astype(np.float32))


MODELS = [pytest.param("relu", id="chain-relu"), pytest.param("relu6", id="chain-relu6"),
          pytest.param("demo", id="demo"),
          pytest.param(RESNET20, id="resnet20"), pytest.param(MOBILENET, id="mobilenet")]


def _load(which: str) -> onnx.ModelProto:
    return onnx.load(str(asset(which))) if which.endswith(".onnx") else _generated(which)


def _inputs(model: onnx.ModelProto, count: int = 4) -> np.ndarray:
    dims = [d.dim_value or 1 for d in model.graph.input[0].type.tensor_type.shape.dim]
    return np.random.default_rng(0).standard_normal([count] + dims[1:]).astype(np.float32)


@pytest.mark.ort
@pytest.mark.parametrize("which", MODELS)
def test_cle_preserves_fp32_function(which):
    model = _load(which)
    x = _inputs(model)
    ws = _workspace(model)
    report = CrossLayerEqualizationPass()(ws)
    assert report.params["pairs"] > 0 and report.modified
    after = surgery.export_model(ws.graph, model)
    onnx.checker.check_model(after)
    assert _relative(_run(model, x)[0], _run(after, x)[0]) < RTOL
    clips = [node for node in ws.graph.nodes if node.op == "Clip"]
    for pair in find_pairs(ws.graph, graph_layers.read_layers(ws.graph)):
        if pair.layer1.name in ws.act_upper:  # ReLU6 became Relu -> Min(6 / s)
            assert pair.min_node is not None and pair.act_kind == "relu"
            assert pair.layer1.act.node not in clips


@pytest.mark.ort
@pytest.mark.parametrize("which", MODELS)
def test_cle_and_absorption_keep_fp32_function(which):
    """Absorption is exact where pre-activations stay above mean - 3 std and away from zero padding,
    so on data that follows the BN statistics the logits move a little, the predictions do not."""
    model = _load(which)
    if which == RESNET20:
        x = _cifar(64)
    elif which != MOBILENET:
        x = np.random.default_rng(0).standard_normal((32, 3, 16 if which != "demo" else 32,
                                                      16 if which != "demo" else 32)).astype(np.float32)
    else:
        from onnxdfq.eval.data import open_dataset

        x = next(open_dataset(asset("imagenet/val1300"), mean=[0.5] * 3, std=[0.5] * 3,
                              size=(224, 224)).batches(16, 16))[0]
    ws = _workspace(model)
    CrossLayerEqualizationPass()(ws)
    exact = surgery.export_model(ws.graph, model)
    report = BiasAbsorptionPass()(ws)
    after = surgery.export_model(ws.graph, model)
    reference, equalized, absorbed = _run(model, x)[0], _run(exact, x)[0], _run(after, x)[0]
    assert _relative(reference, equalized) < RTOL
    assert len(report.rows) == len(find_pairs(ws.graph, graph_layers.read_layers(ws.graph)))
    assert _relative(reference, absorbed) < 0.25  # MobileNet-V1 on 16 real images: 0.10
    assert np.mean(reference.argmax(1) == absorbed.argmax(1)) >= 0.85


def test_absorption_exact_without_padding():
    """1x1 convs (no padding) and statistics whose mean - 3 std is each channel's observed minimum:
    every pre-activation is inside the exact domain, so absorption (ReLU6 included) is exact."""
    specs = [builders.ConvSpec(16, 1, act="relu6"), builders.ConvSpec(16, 1, act="relu"), builders.ConvSpec(8, 1)]
    x = np.random.default_rng(0).standard_normal((16, 3, 8, 8)).astype(np.float32)
    model = builders.calibrate_bn(builders.build_chain(specs, size=8, seed=5), x)
    for init in model.graph.initializer:  # high biases: most channels stay well above zero
        if init.name in ("conv0_bn.beta", "conv1_bn.beta"):
            init.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(init) + 4.0, init.name))
    ws = _workspace(model)
    folded = surgery.export_model(ws.graph, model)
    layers = graph_layers.read_layers(ws.graph)
    names = [layer.output_name for layer in layers if layer.name in ws.channel_stats]
    for name in names:
        folded.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    lowest = dict(zip(names, (v.min(axis=(0, 2, 3)) for v in _run(folded, x, names)), strict=True))
    for layer in layers:
        if layer.name in ws.channel_stats:
            ws.channel_stats[layer.name] = BNStats(lowest[layer.output_name] + 3.0, np.ones(layer.out_channels))
    report = BiasAbsorptionPass()(ws)
    assert report.params["absorbed_pairs"] == 2
    assert any(node.op == "Min" for node in ws.graph.nodes)  # the ReLU6 pair now clips per channel
    after = surgery.export_model(ws.graph, model)
    assert _relative(_run(model, x)[0], _run(after, x)[0]) < RTOL


def test_cle_idempotent_and_pipeline_keys():
    model = _generated("relu")
    ws = _workspace(model)
    first = CrossLayerEqualizationPass(max_sweeps=100)(ws)
    assert first.params["converged"]
    second = CrossLayerEqualizationPass(max_sweeps=100)(ws)
    assert abs(second.params["scale_min"] - 1) < 1e-4 and abs(second.params["scale_max"] - 1) < 1e-4
    from onnxdfq.pipeline import METHODS, quantize_model

    assert METHODS["dfq"] == {"rounder": "nearest", "cle": True, "absorb_bias": True, "bias_correction": True,
                               "act_bits": 8}
    names = [p["name"] for p in quantize_model(model, method="nearest", cle=True).report["passes"]]
    assert "cle" in names and "absorb_bias" not in names and "bias_correction" not in names
    report = quantize_model(_generated("relu6"), method="dfq", granularity="tensor").report
    names = [p["name"] for p in report["passes"]]
    assert names.index("cle") < names.index("absorb_bias") < names.index("weight_quant") < names.index(
        "bias_correction")
    correction = next(p for p in report["passes"] if p["name"] == "bias_correction")
    skipped = {k: v for k, v in correction["layers"].items() if not v["bias_corrected"]}
    assert "conv0" in skipped and skipped["conv0"]["bias_skip"].startswith("input statistics")


# ---------------------------------------------------------------- bias correction on real data

@pytest.mark.ort
def test_bias_correction_reduces_mean_shift_on_cifar(resnet20):
    model = onnx.load(str(resnet20))
    ws = _workspace(model)
    CrossLayerEqualizationPass()(ws)
    BiasAbsorptionPass()(ws)
    WeightQuantPass(BitWidthMap(4), per_channel=False)(ws)
    before = {layer.name: (layer.weight.astype(np.float64), None if layer.bias is None else layer.bias.copy())
              for layer in graph_layers.read_layers(ws.graph)}
    report = AnalyticBiasCorrectionPass()(ws)
    corrected = [row.layer for row in report.rows if row.values["bias_corrected"]]
    skipped = {row.layer: row.values["bias_skip"] for row in report.rows if not row.values["bias_corrected"]}
    assert len(corrected) >= 9 and "conv1" in skipped  # stem (network input) and post-Add layers skipped
    layers = {layer.name: layer for layer in graph_layers.read_layers(ws.graph)}
    float_model = surgery.export_model(ws.graph, model)  # corrected biases, float weights
    inputs = [layers[name].input_name for name in corrected]
    for name in inputs:
        float_model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    values = _run(float_model, _cifar(300), inputs)
    improved = 0
    for name, x in zip(corrected, values, strict=True):
        layer, (w_fp, bias) = layers[name], before[name]
        if layer.op_type != "Conv":
            continue
        stride = int(layer.node.attrs.get("strides", [1, 1])[0])
        pads = layer.node.attrs.get("pads", [1, 1, 1, 1])
        pads = (pads[0], pads[1], pads[2], pads[3])
        w_q = ws.weight_quant[name].dequantized().astype(np.float64)
        assert layer.group == 1
        reference = _mean_conv_output(x, w_fp, bias, stride, pads)
        shift_q = _mean_conv_output(x, w_q, bias, stride, pads) - reference
        shift_c = _mean_conv_output(x, w_q, layer.bias, stride, pads) - reference
        assert np.linalg.norm(shift_c) < np.linalg.norm(shift_q), name
        improved += 1
    assert improved >= 9


# ---------------------------------------------------------------- regression: MobileNet-V1 per-tensor

@pytest.mark.slow
def test_mobilenet_per_tensor_w8a8_dfq_recovers(mobilenet, val1300):
    from onnxdfq import evaluate, quantize_model

    nearest = quantize_model(str(mobilenet), method="nearest", bits=8, act_bits=8, granularity="tensor").model
    assert evaluate(nearest, str(val1300), mean=[0.5] * 3, std=[0.5] * 3, limit=300).top1 < 5.0
    dfq = quantize_model(str(mobilenet), method="dfq", bits=8, act_bits=8, granularity="tensor").model
    assert evaluate(dfq, str(val1300), mean=[0.5] * 3, std=[0.5] * 3).top1 >= 75.85
