"""Deployment targets: --target trt is TensorRT's explicit-quantization layout, with ORT-equal accuracy."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import CIFAR_MEAN, CIFAR_STD
from onnx import numpy_helper

import onnxdfq
from onnxdfq.eval.runner import evaluate


def _initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}


def test_trt_layout_is_symmetric_int8_with_float_biases(resnet20):
    result = onnxdfq.quantize_model(resnet20, bits=8, act_bits=8, target="trt")
    model, inits = result.model, _initializers(result.model)
    quantize_nodes = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    activation_zero_points = [inits[n.input[2]] for n in quantize_nodes if n.input[2] in inits]
    assert activation_zero_points and all(z.dtype == np.int8 and np.all(z == 0) for z in activation_zero_points)
    assert not [name for name, value in inits.items() if value.dtype == np.uint8]
    assert not [name for name in inits if name.endswith("bias_quantized")]  # biases stay float
    assert not result.report["reduced_range_layers"]  # 7-bit weights are an x86 onnxruntime matter
    producers = {out: node for node in model.graph.node for out in node.output}
    adds = [n for n in model.graph.node if n.op_type == "Add" and len(n.input) == 2
            and all(name not in inits for name in n.input)]
    assert len(adds) == 9
    for add in adds:  # TensorRT fuses a residual Add into the conv only with Q/DQ on both inputs
        assert all(producers[name].op_type == "DequantizeLinear" for name in add.input), add.name
    assert "int32_bias" in result.report["skipped"]["steps"]
    assert any("--target trt" in note for note in result.report["speed_notes"])


def test_ort_layout_is_unchanged_by_the_target_option(resnet20):
    default = onnxdfq.quantize(resnet20, bits=8, act_bits=8)
    explicit = onnxdfq.quantize(resnet20, bits=8, act_bits=8, target="ort")
    assert default.SerializeToString() == explicit.SerializeToString()
    assert any(v.dtype == np.int32 for v in _initializers(default).values())


def test_trt_and_ort_agree_on_resnet20(resnet20, cifar_test):
    ort = onnxdfq.quantize(resnet20, bits=8, act_bits=8)
    trt = onnxdfq.quantize(resnet20, bits=8, act_bits=8, target="trt")
    top1 = [evaluate(m, cifar_test, mean=CIFAR_MEAN, std=CIFAR_STD, limit=2000).top1 for m in (ort, trt)]
    assert abs(top1[0] - top1[1]) <= 0.6, top1  # 12 images: symmetric int8 gives ReLU outputs 7 bits


def test_unknown_target_is_refused(resnet20):
    with pytest.raises(onnxdfq.OnnxDfqError, match="--target must be one of ort, trt"):
        onnxdfq.quantize(resnet20, target="tensorrt")


@pytest.mark.slow
def test_trt_accuracy_matches_ort_on_full_sets(resnet20, cifar_test, mobilenet, val1300):
    """The TensorRT layout's top-1, run in onnxruntime, next to the default layout's. Measured: ResNet-20 W8A8
    91.62 vs 91.76 (full CIFAR-10 test set; ResNet-56 93.19 vs 93.23 in three times the time); MobileNet-V1
    W8A8 75.69 vs 75.31 (val1300: 5 images). Symmetric int8 leaves ReLU outputs 7 bits, which moves single
    images either way; a wrong grid would cost points."""
    for model, data, norm, tol in ((resnet20, cifar_test, {"mean": CIFAR_MEAN, "std": CIFAR_STD}, 0.25),
                                   (mobilenet, val1300, {"mean": [0.5] * 3, "std": [0.5] * 3}, 0.5)):
        top1 = [evaluate(onnxdfq.quantize(model, bits=8, act_bits=8, target=t), data, **norm).top1
                for t in ("ort", "trt")]
        assert abs(top1[0] - top1[1]) <= tol, (model, top1)
