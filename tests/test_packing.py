"""`--format qdq-packed`: 4-/2-bit weights in INT4 / INT2 initializers, same function, smaller file."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import CIFAR_MEAN, CIFAR_STD
from onnx import numpy_helper

import onnxdfq
from onnxdfq.graph.packing import pack_weights, packed_type


def _run_unoptimized(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """The QDQ graph's reference semantics (no kernel fusion), so two encodings can be compared exactly."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def _weights(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {i.name: i for i in model.graph.initializer if i.name.endswith(".weight_quantized")}


def test_packed_type_choice():
    assert [packed_type(b) for b in (2, 3, 4, 5, 8)] == [4, 4, 4, None, None]


@pytest.mark.parametrize(("bits", "dtype", "opset"), [(4, onnx.TensorProto.INT4, 21), (3, onnx.TensorProto.INT4, 21),
                                                      (2, onnx.TensorProto.INT4, 21)])
def test_packed_model_computes_the_same_function(resnet20, bits, dtype, opset):
    plain = onnxdfq.quantize(resnet20, bits=bits, act_bits=8)
    packed = onnxdfq.quantize(resnet20, bits=bits, act_bits=8, fmt="qdq-packed")
    onnx.checker.check_model(packed, full_check=True)
    assert max(i.version for i in packed.opset_import if i.domain in ("", "ai.onnx")) >= opset
    plain_w, packed_w = _weights(plain), _weights(packed)
    assert set(plain_w) == set(packed_w) and len(packed_w) == 20
    for name, tensor in packed_w.items():
        assert tensor.data_type == dtype, name
        np.testing.assert_array_equal(numpy_helper.to_array(tensor).astype(np.int8),
                                      numpy_helper.to_array(plain_w[name]))
    x = np.random.default_rng(0).standard_normal((8, 3, 32, 32)).astype(np.float32)
    np.testing.assert_array_equal(_run_unoptimized(packed, x), _run_unoptimized(plain, x))


def test_packing_leaves_wider_layers_alone(resnet20):
    """7/8-bit layers keep int8; nothing to pack at 8 bits means the model is the plain QDQ one."""
    packed = onnxdfq.quantize(resnet20, bits=8, act_bits=8, fmt="qdq-packed")
    assert all(t.data_type == onnx.TensorProto.INT8 for t in _weights(packed).values())
    assert max(i.version for i in packed.opset_import if i.domain in ("", "ai.onnx")) < 21


def test_pack_rejects_values_outside_the_type():
    node = onnx.helper.make_node("DequantizeLinear", ["w", "s", "z"], ["y"], axis=0)
    graph = onnx.helper.make_graph([node], "g", [], [onnx.helper.make_tensor_value_info("y", 1, [2, 2])], initializer=[
        numpy_helper.from_array(np.array([[8, 0], [0, 1]], np.int8), "w"),
        numpy_helper.from_array(np.ones(2, np.float32), "s"), numpy_helper.from_array(np.zeros(2, np.int8), "z")])
    with pytest.raises(ValueError, match="outside the 4-bit range"):
        pack_weights(onnx.helper.make_model(graph), {"w": 4})


@pytest.mark.slow
def test_int4_resnet56_file_is_small_and_as_accurate(resnet56, cifar_test, tmp_path):
    plain_path, packed_path = tmp_path / "plain.onnx", tmp_path / "packed.onnx"
    onnx.save(onnxdfq.quantize(resnet56, bits=4, act_bits=8), plain_path)
    onnx.save(onnxdfq.quantize(resnet56, bits=4, act_bits=8, fmt="qdq-packed"), packed_path)
    assert packed_path.stat().st_size < 0.20 * resnet56.stat().st_size
    kwargs = dict(mean=CIFAR_MEAN, std=CIFAR_STD, limit=2000, batch_size=250)
    plain = onnxdfq.evaluate(str(plain_path), str(cifar_test), **kwargs).top1
    packed = onnxdfq.evaluate(str(packed_path), str(cifar_test), **kwargs).top1
    assert abs(plain - packed) <= 0.1 and packed > 88.0
