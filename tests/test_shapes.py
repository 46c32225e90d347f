"""Models as exporters write them: a static batch of 1, dynamic image sizes."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

import onnxdfq
from onnxdfq.cli import main
from onnxdfq.eval.calibrate import input_shape
from onnxdfq.eval.runner import DEFAULT_IMAGE_SIZE, sample_dims
from tests.conftest import CIFAR_MEAN, CIFAR_STD
from tests.models import demo_model

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
