"""GPTQ rounding (--method gptq): the im2col rows against onnxruntime's convolution, the rounder's proven cases
(a diagonal Hessian is nearest rounding) and its gain in output error, streamed Hessians, and ResNet-20 at W3A8."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import CIFAR_MEAN, CIFAR_STD
from onnx import TensorProto, helper, numpy_helper

import onnxdfq
from onnxdfq.passes import gptq
from onnxdfq.passes.gptq import HessianAccumulator, LayerGeometry, gptq_round, layer_rows, output_error
from onnxdfq.quant.fake import quantize

CONVS = [  # (channels, outputs, group, kernel, attributes)
    (6, 4, 2, (3, 3), {"strides": [2, 1], "pads": [1, 0, 0, 1], "dilations": [1, 2]}),
    (8, 8, 8, (3, 3), {"auto_pad": "SAME_UPPER", "strides": [2, 2]}),  # depthwise, TF "SAME" (asymmetric)
    (5, 7, 1, (1, 1), {}),
    (4, 6, 1, (3,), {"strides": [2], "pads": [1, 1]}),
]


def _conv_model(channels, outputs, group, kernel, attrs, weight):
    spatial = [11] * len(kernel)
    node = helper.make_node("Conv", ["x", "w"], ["y"], group=group, **attrs)
    graph = helper.make_graph([node], "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                             [None, channels, *spatial])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(weight, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


@pytest.mark.parametrize("channels, outputs, group, kernel, attrs", CONVS)
def test_layer_rows_reproduce_onnxruntime_conv(channels, outputs, group, kernel, attrs):
    """rows @ w is the convolution: the rows are the patches the weight meets, in the weight's own order."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, channels, *[11] * len(kernel))).astype(np.float32)
    w = rng.standard_normal((outputs, channels // group, *kernel)).astype(np.float32)
    session = ort.InferenceSession(_conv_model(channels, outputs, group, kernel, attrs, w).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    expected = session.run(None, {"x": x})[0]  # [N, O, *S]
    rows = layer_rows(x, LayerGeometry("Conv", kernel, group, attrs))
    got = np.einsum("gnd,god->gno", rows, w.reshape(group, outputs // group, -1))
    expected = np.moveaxis(expected, 1, -1).reshape(-1, group, outputs // group).transpose(1, 0, 2)
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_diagonal_hessian_is_nearest_rounding():
    """With uncorrelated inputs no column's error can be moved anywhere cheaper: GPTQ is exactly nearest."""
    rng = np.random.default_rng(1)
    w = rng.standard_normal((16, 3, 3, 3))
    scale = np.abs(w).reshape(16, -1).max(axis=1) / 7
    hessian = np.diag(rng.uniform(0.1, 10.0, 27))[None]
    np.testing.assert_array_equal(gptq_round(w, scale, -7, 7, hessian, rows=1000), quantize(w, scale, -7, 7))


def test_gptq_lowers_the_output_error_of_correlated_inputs():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((4000, 48)) @ rng.standard_normal((48, 48))  # correlated inputs, as after a conv
    w = rng.standard_normal((32, 48))
    scale = np.abs(w).max(axis=1) / 7
    hessian = (x.T @ x)[None]
    ints = gptq_round(w, scale, -7, 7, hessian, rows=len(x))
    assert ints.min() >= -7 and ints.max() <= 7 and ints.dtype.kind == "i"
    w_gptq, w_near = ints * scale[:, None], quantize(w, scale, -7, 7) * scale[:, None]
    direct = np.sum(((w_gptq - w) @ x.T) ** 2)  # the error on the rows themselves, not through H
    assert output_error(w, w_gptq, hessian) == pytest.approx(direct, rel=1e-9)
    assert output_error(w, w_gptq, hessian) < 0.7 * output_error(w, w_near, hessian)


def test_grouped_gptq_rounds_each_group_through_its_own_hessian():
    """A depthwise layer: one Hessian per channel, each channel as if rounded alone."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((4, 1, 3, 3))
    scale = np.abs(w).reshape(4, -1).max(axis=1) / 7
    x = rng.standard_normal((4, 500, 9)) @ rng.standard_normal((4, 9, 9))
    hessians = np.matmul(x.transpose(0, 2, 1), x)
    together = gptq_round(w, scale, -7, 7, hessians, rows=500)
    for c in range(4):
        alone = gptq_round(w[c:c + 1], scale[c:c + 1], -7, 7, hessians[c:c + 1], rows=500)
        np.testing.assert_array_equal(together[c:c + 1], alone)


def test_streamed_hessian_equals_the_one_shot_sum(monkeypatch):
    """Accumulated a few samples at a time (the memory bound) or all at once: the same H."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((10, 8, 9, 9)).astype(np.float32)
    geometry = LayerGeometry("Conv", (3, 3), 2, {"pads": [1, 1, 1, 1]})
    rows = layer_rows(x, geometry).astype(np.float64)
    one_shot = np.matmul(rows.transpose(0, 2, 1), rows)
    monkeypatch.setattr(gptq, "PATCH_BYTES", 4 * 8 * 81 * 9 * 2)  # two samples' patches at a time
    streamed = HessianAccumulator(geometry)
    for start in range(0, 10, 5):
        streamed.add(x[start:start + 5])
    assert streamed.rows == 10 * 81
    np.testing.assert_allclose(streamed.hessian, one_shot, rtol=1e-5, atol=1e-6 * np.abs(one_shot).max())


def test_sparse_rows_get_the_wide_ridge():
    """Fewer rows than inputs (a classifier on pooled features): H is singular and the wide ridge applies."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((20, 64))
    w = rng.standard_normal((10, 64))
    scale = np.abs(w).max(axis=1) / 7
    hessian = (x.T @ x)[None]
    np.testing.assert_array_equal(gptq_round(w, scale, -7, 7, hessian, rows=20),
                                  gptq_round(w, scale, -7, 7, hessian, damp=gptq.SPARSE_DAMP))
    assert not np.array_equal(gptq_round(w, scale, -7, 7, hessian, rows=20),
                              gptq_round(w, scale, -7, 7, hessian, damp=gptq.DEFAULT_DAMP))


def _calib_file(cifar_train, path, count=256):
    data = np.load(cifar_train)
    x = (data["x"][:count].astype(np.float32) / 255 - np.float32(CIFAR_MEAN)) / np.float32(CIFAR_STD)
    np.savez(path, x=x.transpose(0, 3, 1, 2).astype(np.float32))
    return path


def test_resnet20_w3a8_gptq_beats_squant(resnet20, cifar_test, cifar_train, tmp_path):
    """Real ResNet-20, 256 training images as the samples, full test set: 90.58 % against SQuant's 89.42."""
    calib = f"data:{_calib_file(cifar_train, tmp_path / 'calib.npz')}"
    options = dict(bits=3, act_bits=8, mean=CIFAR_MEAN, std=CIFAR_STD)
    gptq_result = onnxdfq.quantize_model(resnet20, method="gptq", calib=calib, **options)
    squant = onnxdfq.quantize(resnet20, method="squant", calib=calib, **options)
    top1 = {name: onnxdfq.evaluate(model, str(cifar_test), mean=CIFAR_MEAN, std=CIFAR_STD, batch_size=500).top1
            for name, model in (("gptq", gptq_result.model), ("squant", squant))}
    assert top1["gptq"] >= 90.0 and top1["gptq"] >= top1["squant"] + 0.7, top1
    rows = next(p for p in gptq_result.report["passes"] if p["name"] == "weight_quant")["layers"]
    ratios = [row["output_error_vs_nearest"] for row in rows.values()]
    assert len(ratios) == 20 and np.median(ratios) < 0.5  # each layer's error on the samples, against nearest's
    assert {row["weight_range"] for row in rows.values()} == {"absmax"}  # only 4-bit GPTQ layers clip their range
    onnx.checker.check_model(gptq_result.model)


def test_gptq_without_torch_is_one_line(tmp_path):
    """A model with BN gets DFFG samples, which need the synth extra: one line naming the method, nothing written."""
    from conftest import cli_without_torch

    from models import basic_block_model

    model, out = tmp_path / "m.onnx", tmp_path / "m.q.onnx"
    onnx.save(basic_block_model(0), model)
    proc = cli_without_torch("quantize", model, "-o", out, "--bits", "4", "--method", "gptq")
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "--method gptq" in lines[0] and "torch" in lines[0].lower(), proc.stderr
    assert not out.exists()


def test_blocked_updates_give_the_column_by_column_result():
    """GPTQ's lazy batch updates are a reordering of the same arithmetic: any block size, the same integers."""
    rng = np.random.default_rng(6)
    x = rng.standard_normal((3000, 70)) @ rng.standard_normal((70, 70))
    w = rng.standard_normal((24, 70))
    scale = np.abs(w).max(axis=1) / 7
    hessian = (x.T @ x)[None]
    reference = gptq_round(w, scale, -7, 7, hessian, rows=len(x), block=1)
    for block in (8, 32, 128):
        np.testing.assert_array_equal(gptq_round(w, scale, -7, 7, hessian, rows=len(x), block=block), reference)
