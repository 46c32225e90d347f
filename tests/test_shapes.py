"""Models as exporters write them: a static batch of 1, dynamic image sizes."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from conftest import CIFAR_MEAN, CIFAR_STD

import onnxdfq
from models import demo_model
from onnxdfq.cli import main
from onnxdfq.eval.calibrate import input_shape
from onnxdfq.eval.runner import DEFAULT_IMAGE_SIZE, sample_dims

MEAN, STD = ",".join(map(str, CIFAR_MEAN)), ",".join(map(str, CIFAR_STD))


def with_input_dims(model: onnx.ModelProto, dims: list[int | str]) -> onnx.ModelProto:
    """A copy whose input has these dims (ints static, strings symbolic); outputs get the batch dim too."""
    copy = onnx.ModelProto.FromString(model.SerializeToString())
    del copy.graph.value_info[:]
    for dim, value in zip(copy.graph.input[0].type.tensor_type.shape.dim, dims, strict=True):
        dim.Clear()
        if isinstance(value, int):
            dim.dim_value = value
        else:
            dim.dim_param = value
    for output in copy.graph.output:
        first = output.type.tensor_type.shape.dim[0]
        first.Clear()
        if isinstance(dims[0], int):
            first.dim_value = dims[0]
        else:
            first.dim_param = dims[0]
    onnx.checker.check_model(copy)
    return copy


def test_sample_dims_never_make_one_pixel_images():
    assert sample_dims(["N", 3, "H", "W"]) == [3, DEFAULT_IMAGE_SIZE, DEFAULT_IMAGE_SIZE]
    assert sample_dims(["N", 3, "H", "W"], (64, 48)) == [3, 64, 48]
    assert sample_dims([1, 3, 32, 32]) == [3, 32, 32]


def test_dynamic_image_size_calibrates_at_the_given_size(tmp_path):
    model = with_input_dims(demo_model(), ["N", 3, "H", "W"])
    assert input_shape(model) == (3, DEFAULT_IMAGE_SIZE, DEFAULT_IMAGE_SIZE)
    assert input_shape(model, (40, 40)) == (3, 40, 40)
    result = onnxdfq.quantize_model(model, size=(40, 40), calib="prior", calib_samples=16)
    assert result.report["statistics"]["samples"] == 16


def test_fixed_batch_resnet20_quantizes_evaluates_and_compares(resnet20, cifar_test, tmp_path):
    fixed = tmp_path / "resnet20_b1.onnx"
    onnx.save(with_input_dims(onnx.load(resnet20), [1, 3, 32, 32]), fixed)
    runner = CliRunner()
    out = tmp_path / "q.onnx"
    quantized = runner.invoke(main, ["quantize", str(fixed), "-o", str(out), "--mean", MEAN, "--std", STD, "-q"])
    assert quantized.exit_code == 0, quantized.output

    def top1(model) -> float:
        result = runner.invoke(main, ["eval", str(model), "--data", str(cifar_test), "--mean", MEAN, "--std", STD,
                                      "--limit", "300", "--json"])
        assert result.exit_code == 0, result.output
        return json.loads(result.output.strip().splitlines()[-1])["top1"]

    dynamic_q = tmp_path / "dyn.q.onnx"
    onnx.save(onnxdfq.quantize(str(resnet20), mean=CIFAR_MEAN, std=CIFAR_STD), dynamic_q)
    assert top1(fixed) == top1(resnet20)
    assert top1(out) == pytest.approx(top1(dynamic_q), abs=0.34)  # one image of 300 either way
    compared = runner.invoke(main, ["compare", str(fixed), str(out), "--random", "20", "--json"])
    assert compared.exit_code == 0, compared.output
    assert json.loads(compared.output)["count"] == 20


def test_run_batched_pads_the_last_chunk(tmp_path):
    from onnxdfq.eval.runner import run_batched
    from onnxdfq.eval.session import make_session

    model = with_input_dims(demo_model(), [4, 3, 32, 32])
    x = np.random.default_rng(0).standard_normal((10, 3, 32, 32)).astype(np.float32)
    session = make_session(model)
    out = run_batched(session, "input", x)[0]
    reference = make_session(with_input_dims(demo_model(), ["N", 3, 32, 32])).run(None, {"input": x})[0]
    assert out.shape == (10, 10)
    np.testing.assert_allclose(out, reference, rtol=1e-5, atol=1e-5)


def _needs_8x8() -> onnx.ModelProto:
    """[N, 3, H, W] declared dynamic, but a Reshape to 4*8*8 features only works for 8x8 images."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(2)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "c.w"),
             numpy_helper.from_array(np.array([0, 256], np.int64), "flat"),  # 0: the batch dim as it is
             numpy_helper.from_array(rng.standard_normal((10, 256)).astype(np.float32), "g.w")]
    nodes = [helper.make_node("Conv", ["input", "c.w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Reshape", ["r", "flat"], ["f"]),
             helper.make_node("Gemm", ["f", "g.w"], ["logits"], transB=1)]
    graph = helper.make_graph(nodes, "needs8", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                              ["N", 3, "H", "W"])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def test_a_size_the_model_cannot_take_is_a_clear_error(tmp_path):
    path = tmp_path / "needs8.onnx"
    onnx.save(_needs_8x8(), path)
    result = CliRunner().invoke(main, ["quantize", str(path), "-o", str(tmp_path / "q.onnx")])
    assert result.exit_code == 2 and "could not run the model" in result.output and "--size" in result.output
    assert not (tmp_path / "q.onnx").exists()
    ok = CliRunner().invoke(main, ["quantize", str(path), "-o", str(tmp_path / "q.onnx"), "--size", "8", "-q"])
    assert ok.exit_code == 0, ok.output


def test_shape_arithmetic_and_constant_adds_get_no_qdq():
    """An Add with a constant operand is no residual join; int64 tensors never get Q/DQ (ShuffleNet's split)."""
    import onnx_graphsurgeon as gs

    from onnxdfq.graph import layers as graph_layers
    from onnxdfq.graph import patterns, surgery

    model = _needs_8x8()
    shift = onnx.helper.make_node("Constant", [], ["shift"], value=onnx.numpy_helper.from_array(
        np.float32(0.5).reshape(1), "shift_value"))
    add = onnx.helper.make_node("Add", ["r", "shift"], ["r_shifted"])
    shape = onnx.helper.make_node("Shape", ["r_shifted"], ["r_shape"])
    count = onnx.helper.make_node("Add", ["r_shape", "r_shape"], ["doubled"])  # int64 arithmetic
    model.graph.node.insert(2, shift)
    model.graph.node.insert(3, add)
    model.graph.node.insert(4, shape)
    model.graph.node.insert(5, count)
    model.graph.node[6].input[0] = "r_shifted"
    model.graph.output.append(onnx.helper.make_tensor_value_info("doubled", onnx.TensorProto.INT64, [4]))
    model = onnx.shape_inference.infer_shapes(model)
    graph = surgery.import_graph(model)
    graph_layers.ensure_node_names(graph)
    layers = graph_layers.read_layers(graph)
    tensors = patterns.activation_tensors(graph, layers, {layer.name for layer in layers})
    assert "shift" not in tensors and "r_shifted" not in tensors  # Add(r, constant) is no join
    assert "r_shape" not in tensors and "doubled" not in tensors
    assert {"input", "r", "f"} <= set(tensors)  # the layers' inputs and outputs still are
    assert isinstance(graph.tensors()["shift"], gs.Variable)  # a Constant node's output, not an initializer


def test_run_time_zero_biases_of_unoptimized_dynamo_exports_are_folded():
    """torch.onnx.export(..., dynamo=True, optimize=False) keeps BN but computes each Conv's zero bias at run
    time as Expand(CastLike(0, x), shape): folded at load, so the layers (and their BN) are found."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(5)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(np.array([4], np.int64), "bias_shape"),
             numpy_helper.from_array(rng.uniform(0.5, 2, 4).astype(np.float32), "gamma"),
             numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "beta"),
             numpy_helper.from_array(np.zeros(4, np.float32), "mean"),
             numpy_helper.from_array(np.ones(4, np.float32), "var")]
    nodes = [helper.make_node("Constant", [], ["zero"], value=numpy_helper.from_array(np.array(0.0, np.float64))),
             helper.make_node("CastLike", ["zero", "input"], ["zero_like"]),
             helper.make_node("Expand", ["zero_like", "bias_shape"], ["bias"]),
             helper.make_node("Conv", ["input", "w", "bias"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["b"]),
             helper.make_node("Relu", ["b"], ["logits"])]
    graph = helper.make_graph(nodes, "dynamo_like", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                                   [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 4, 8, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    result = onnxdfq.quantize_model(model, calib="bn")
    assert result.report["statistics"]["layers"] == 1 and result.report["statistics"]["bn_layers"] == 1
    x = np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32)
    from tests.models import run

    assert np.isfinite(run(result.model, x)).all()


def test_compare_reports_every_output_and_no_top1_for_feature_maps(tmp_path):
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["input", "w"], ["a"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["a"], ["b"])],
        "two_outputs", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 4, 8, 8]),
         helper.make_tensor_value_info("b", TensorProto.FLOAT, ["N", 4, 8, 8])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path, out = tmp_path / "two.onnx", tmp_path / "two.q.onnx"
    onnx.save(model, path)
    runner = CliRunner()
    assert runner.invoke(main, ["quantize", str(path), "-o", str(out), "-q"]).exit_code == 0
    result = runner.invoke(main, ["compare", str(path), str(out), "--random", "8"])
    assert result.exit_code == 0, result.output
    assert "not a classifier output" in result.output and "  b: sqnr_db=" in result.output
