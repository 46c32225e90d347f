"""QDQ emission: structure, onnxruntime fusion, grid levels, models without BN, unhandled ops."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

import onnxdfq
from models import gemm_matmul_model, model_with_unsupported_op, no_bn_model, run, varied_chain
from onnxdfq.eval.metrics import sqnr_db


def optimized_ops(model: onnx.ModelProto, tmp_path) -> dict[str, int]:
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    counts: dict[str, int] = {}
    for node in onnx.load(str(tmp_path / "optimized.onnx")).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def weight_ints(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    return {name: value for name, value in inits.items() if name.endswith(".weight_quantized")}


def test_resnet20_qdq_structure_and_fusion(resnet20, tmp_path):
    result = onnxdfq.quantize_model(resnet20, method="nearest", bits=8, act_bits=8)
    model = result.model
    onnx.checker.check_model(model)
    ops = [n.op_type for n in model.graph.node]
    assert "BatchNormalization" not in ops
    ints = weight_ints(model)
    assert len(ints) == 20 and all(v.dtype == np.int8 for v in ints.values())
    biases = [i for i in model.graph.initializer if i.name.endswith(".bias_quantized")]
    assert biases and all(b.data_type == onnx.TensorProto.INT32 for b in biases)
    for node in model.graph.node:  # per-channel weight scales along the output axis
        if node.op_type == "DequantizeLinear" and node.name.endswith("weight_DequantizeLinear"):
            assert [a.i for a in node.attribute if a.name == "axis"] == [0]
    fused = optimized_ops(model, tmp_path)
    assert fused.get("QLinearConv", 0) == 19, fused  # every conv runs as an int8 kernel
    assert fused.get("Conv", 0) == 0


def test_mobilenet_qdq_fuses_depthwise_and_relu6(mobilenet, tmp_path):
    model = onnxdfq.quantize(mobilenet, method="nearest", bits=8, act_bits=8)
    fused = optimized_ops(model, tmp_path)
    assert fused.get("QLinearConv", 0) >= 27, fused  # the 1x1 classifier keeps float logits
    assert fused.get("Clip", 0) == 0  # ReLU6 absorbed into the uint8 range


def test_float_conv_head_is_named_and_quantize_outputs_fuses_it(mobilenet, tmp_path):
    """MobileNet's 1x1 classifier keeps float logits, so onnxruntime runs it as DequantizeLinear + float Conv at
    every inference; the summary names it, and --quantize-outputs makes it a QLinearConv too."""
    plain = onnxdfq.quantize_model(mobilenet, method="nearest", bits=8, act_bits=8, check=False)
    assert any("conv_preds" in note and "--quantize-outputs" in note for note in plain.report["speed_notes"])
    assert optimized_ops(plain.model, tmp_path).get("Conv", 0) == 1
    fused = onnxdfq.quantize_model(mobilenet, method="nearest", bits=8, act_bits=8, quantize_outputs=True, check=False)
    assert not any("--quantize-outputs" in note for note in fused.report["speed_notes"])
    ops = optimized_ops(fused.model, tmp_path)
    assert ops.get("Conv", 0) == 0 and ops.get("QLinearConv", 0) == 28, ops


def test_dfq_channel_min_runs_on_integers(mobilenet, tmp_path, monkeypatch):
    """CLE's per-channel Min (exact ReLU6) moves between Q and DQ: same outputs, every conv still fuses."""
    from onnxdfq.graph import surgery

    model = onnxdfq.quantize(mobilenet, method="dfq", bits=8, act_bits=8)
    producers = {out: node for node in model.graph.node for out in node.output}
    mins = [node for node in model.graph.node if node.op_type == "Min"]
    assert len(mins) >= 20
    assert all(producers[node.input[0]].op_type == "QuantizeLinear" for node in mins)  # integer inputs
    fused = optimized_ops(model, tmp_path)
    # every conv but the classifier, whose output (the logits, through Reshape) stays float
    assert fused.get("QLinearConv", 0) == 27 and fused.get("Conv", 0) == 1, fused

    monkeypatch.setattr(surgery, "integer_channel_min", lambda graph: 0)  # the float Min, as before
    float_min = onnxdfq.quantize(mobilenet, method="dfq", bits=8, act_bits=8)
    float_producers = {out: node.op_type for node in float_min.graph.node for out in node.output}
    assert {float_producers[n.input[0]] for n in float_min.graph.node if n.op_type == "Min"} == {"DequantizeLinear"}
    x = np.random.default_rng(0).standard_normal((4, 3, 224, 224)).astype(np.float32)
    np.testing.assert_array_equal(run(model, x), run(float_min, x))


@pytest.mark.parametrize("bits", [2, 3, 4, 6])
def test_narrow_weight_grid_uses_only_its_levels(bits):
    model = onnxdfq.quantize(varied_chain(1), bits=bits, act_bits=8)
    qmax = 2 ** (bits - 1) - 1
    for name, value in weight_ints(model).items():
        assert value.min() >= -qmax and value.max() <= qmax, name
        assert value.max() == qmax or value.min() == -qmax  # the grid is used to its edge


@pytest.mark.parametrize("act_bits", [4, 6])
def test_narrow_activation_grid_uses_only_its_levels(act_bits):
    result = onnxdfq.quantize_model(varied_chain(1), bits=8, act_bits=act_bits)
    model = result.model
    emitted = next(p for p in result.report["passes"] if p["name"] == "act_qparams")["layers"]
    initializers = {i.name for i in model.graph.initializer}
    # what each activation DequantizeLinear reads: the stored levels after the integer Clip of a narrow grid
    quant_outputs = [n.input[0] for n in model.graph.node if n.op_type == "DequantizeLinear"
                     and n.input[0] not in initializers]
    base = {name: name.removesuffix("_on_grid").removesuffix("_quantized") for name in quant_outputs}
    signed = {name: emitted[base[name]]["act_signed_grid"] for name in quant_outputs}
    probe = onnx.ModelProto.FromString(model.SerializeToString())
    for name in quant_outputs:
        probe.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    x = (3 * np.random.default_rng(0).standard_normal((8, 3, 17, 17))).astype(np.float32)
    values = session.run(quant_outputs, {"input": x})
    zps = {n.input[0]: numpy_helper.to_array([i for i in model.graph.initializer if i.name == n.input[2]][0])
           for n in model.graph.node if n.op_type == "DequantizeLinear"}
    for name, value in zip(quant_outputs, values, strict=True):
        zero = int(zps[name])
        assert value.dtype == np.uint8  # activations are stored as uint8 (signed grids shifted by 128)
        first = 128 - 2 ** (act_bits - 1) if signed[name] else 0  # the grid's lowest level in storage
        assert first <= value.min() and value.max() <= first + 2**act_bits - 1, (name, zero)


def test_quantized_model_stays_close_to_fp32():
    fp32 = varied_chain(2)
    x = np.random.default_rng(5).standard_normal((32, 3, 17, 17)).astype(np.float32)
    ref = run(fp32, x)
    w8a8 = run(onnxdfq.quantize(fp32, bits=8, act_bits=8), x)
    w4 = run(onnxdfq.quantize(fp32, bits=4, act_bits=None), x)
    assert sqnr_db(ref, w8a8) > 20
    assert sqnr_db(ref, w8a8) > sqnr_db(ref, w4)  # fewer bits, more noise: the grid is really used


def test_model_without_bn_quantizes_and_reports_range_sources():
    fp32 = no_bn_model()
    result = onnxdfq.quantize_model(fp32, bits=8, act_bits=8)
    sources = result.report["activation_sources"]
    # no BN: the layers' statistics come from the image prior, and the ranges from them
    assert sources["prior"] == 3 and set(sources) <= {"prior", "propagated", "input"}
    assert sum(sources.values()) == len(result.report["activations"])
    assert result.report["statistics"]["layer_sources"] == {"prior": 3}  # 2 convs and the head
    propagated = onnxdfq.quantize_model(fp32, bits=8, act_bits=8, calib="prior", input_range=(-2.0, 2.0))
    assert propagated.report["activation_sources"].get("input") == 1  # a known input range is kept
    x = np.random.default_rng(0).standard_normal((16, 3, 12, 12)).astype(np.float32)
    assert sqnr_db(run(fp32, x), run(result.model, x)) > 15


def test_gemm_and_matmul_weights_quantized_along_stored_out_axis():
    fp32 = gemm_matmul_model()
    result = onnxdfq.quantize_model(fp32, bits=8, act_bits=None)
    for node in result.model.graph.node:
        if node.op_type == "DequantizeLinear":
            assert [a.i for a in node.attribute if a.name == "axis"] == [1]
    x = np.random.default_rng(0).standard_normal((8, 3, 2, 2)).astype(np.float32)
    assert sqnr_db(run(fp32, x), run(result.model, x)) > 30


def test_unhandled_op_passes_through_with_a_named_warning():
    fp32 = model_with_unsupported_op()
    result = onnxdfq.quantize_model(fp32, bits=8, act_bits=8)
    assert any("Sigmoid" in w for w in result.report["warnings"])
    assert [n for n in result.model.graph.node if n.op_type == "Sigmoid"]
    x = np.random.default_rng(0).standard_normal((4, 3, 12, 12)).astype(np.float32)
    assert sqnr_db(run(fp32, x), run(result.model, x)) > 15


def test_report_has_per_layer_details(resnet20):
    report = onnxdfq.quantize_model(resnet20, bits=8, act_bits=8).report
    layer = report["layers"]["layer1.0.conv1"]
    assert layer["bits"] == 8 and len(layer["scales"]) == 16 and layer["weight_sqnr_db"] > 30
    assert report["activations"]["input"]["source"] == "input"
    assert report["reduced_range_layers"] == ["conv1"]  # the only layer with a signed 8-bit input
    assert report["timings_s"]["total"] > 0


def test_input_model_is_not_modified(resnet20):
    model = onnx.load(str(resnet20))
    before = model.SerializeToString()
    onnxdfq.quantize(model, bits=4, act_bits=8)
    assert model.SerializeToString() == before


def test_already_quantized_model_is_rejected(resnet20):
    q = onnxdfq.quantize(resnet20)
    with pytest.raises(onnxdfq.OnnxDfqError, match="already quantized"):
        onnxdfq.quantize(q)


def _gemm_with_channel_3(weight_factor: float, bias: float) -> tuple[onnx.ModelProto, np.ndarray, np.ndarray]:
    """gemm_matmul_model with the Gemm's output channel 3 scaled by `weight_factor` and given `bias`."""
    model = gemm_matmul_model()
    inits = {t.name: t for t in model.graph.initializer}
    w, b = numpy_helper.to_array(inits["g.w"]).copy(), numpy_helper.to_array(inits["g.b"]).copy()
    w[:, 3] *= weight_factor
    b[3] = bias
    inits["g.w"].CopyFrom(numpy_helper.from_array(w, "g.w"))
    inits["g.b"].CopyFrom(numpy_helper.from_array(b, "g.b"))
    return model, w, b


def test_all_zero_weight_channel_keeps_its_bias():
    """CLE leaves dead channels with all-zero weights and a placeholder scale (1e-8); their int32
    bias b / (s_x * s_w) would saturate. The channel gets a scale that holds its bias instead."""
    model, w, b = _gemm_with_channel_3(weight_factor=0.0, bias=5.0)
    result = onnxdfq.quantize_model(model, method="nearest", bits=8, act_bits=8)
    values = {i.name: numpy_helper.to_array(i) for i in result.model.graph.initializer}
    bias = values["gemm.bias_quantized"].astype(np.float64) * values["gemm.bias_scale"]
    np.testing.assert_allclose(bias, b, rtol=1e-3, atol=1e-3)
    assert np.all(values["gemm.weight_quantized"][:, 3] == 0)
    assert not [w for w in result.report["warnings"] if "saturate" in w]
    x = np.random.default_rng(0).uniform(-1, 1, (64, 3, 2, 2)).astype(np.float32)
    fp32, quant = run(model, x), run(result.model, x)
    assert np.abs(quant - fp32).max() < 0.05 * np.abs(fp32).max()


def test_tiny_weight_channel_keeps_its_bias():
    """Weights of 1e-7 next to a bias of 5 (gamma ~ 0 after folding): regridded, bias intact."""
    model, w, b = _gemm_with_channel_3(weight_factor=1e-7, bias=5.0)
    result = onnxdfq.quantize_model(model, method="nearest", bits=8, act_bits=8)
    values = {i.name: numpy_helper.to_array(i) for i in result.model.graph.initializer}
    bias = values["gemm.bias_quantized"].astype(np.float64) * values["gemm.bias_scale"]
    np.testing.assert_allclose(bias, b, rtol=1e-3, atol=1e-3)
    regrid = [p for p in result.report["passes"] if p["name"] == "bias_safe_weights"][0]
    assert regrid["layers"]["gemm"]["bias_regridded_channels"] == 1
    chosen = np.asarray(result.report["layers"]["gemm"]["scales"], np.float32)
    other = np.arange(16) != 3  # the other channels keep the grid weight quantization chose
    np.testing.assert_array_equal(values["gemm.weight_scale"][other], chosen[other])
    nearest_scale = np.abs(w[:, 3]).max() / 127  # what the weights alone would get
    assert chosen[3] == values["gemm.weight_scale"][3] > 10 * nearest_scale  # coarser, so that 5 / (s_x * s_w) fits


def test_per_tensor_scale_grows_until_every_bias_fits():
    """Per tensor the scale is shared: it grows for the channel whose bias needs it (onnxruntime's quantizer
    does the same), where the emitter used to clip that bias and warn."""
    model, w, b = _gemm_with_channel_3(weight_factor=0.0, bias=5.0)
    w[:, :3] *= 1e-7
    w[:, 4:] *= 1e-7
    inits = {t.name: t for t in model.graph.initializer}
    inits["g.w"].CopyFrom(numpy_helper.from_array(w, "g.w"))
    result = onnxdfq.quantize_model(model, method="nearest", bits=8, act_bits=8, granularity="tensor")
    values = {i.name: numpy_helper.to_array(i) for i in result.model.graph.initializer}
    bias = values["gemm.bias_quantized"].astype(np.float64) * values["gemm.bias_scale"]
    np.testing.assert_allclose(bias, b, rtol=1e-3, atol=1e-3)
    assert values["gemm.weight_scale"].size == 1 and values["gemm.weight_scale"] > 10 * np.abs(w).max() / 127
    assert not [w for w in result.report["warnings"] if "saturate" in w]


def _float_clip_layout(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same model with each narrow grid's integer Clip (Q -> Clip -> DQ) moved in front of its
    QuantizeLinear as a float Clip at the grid's edge values (the layout the emitter used to write)."""
    out = onnx.ModelProto.FromString(model.SerializeToString())
    inits = {i.name: numpy_helper.to_array(i) for i in out.graph.initializer}
    producer = {o: n for n in out.graph.node for o in n.output}
    for clip in [n for n in out.graph.node if n.op_type == "Clip" and n.input[0] in producer
                 and producer[n.input[0]].op_type == "QuantizeLinear"]:
        q = producer[clip.input[0]]
        scale, zp = float(inits[q.input[1]]), int(inits[q.input[2]])
        lo, hi = ((int(inits[name]) - zp) * scale for name in clip.input[1:3])
        bounds = [numpy_helper.from_array(np.array(v, np.float32), f"{clip.name}_f{i}") for i, v in enumerate((lo, hi))]
        out.graph.initializer.extend(bounds)
        float_clip = onnx.helper.make_node("Clip", [q.input[0], bounds[0].name, bounds[1].name], [f"{clip.name}_float"])
        q.input[0] = float_clip.output[0]
        for node in out.graph.node:  # the DequantizeLinear now reads the QuantizeLinear directly
            node.input[:] = [q.output[0] if name == clip.output[0] else name for name in node.input]
        out.graph.node.remove(clip)
        out.graph.node.insert(list(out.graph.node).index(q), float_clip)
    return out


def test_narrow_grids_clip_on_integers_with_identical_outputs_and_fused_convs(resnet20):
    """A4: the grid's levels are kept by an integer Clip between Q and DQ, which equals a float Clip in front
    (quantization is monotone) and, unlike it, leaves every Conv fused into QLinearConv (0.41x -> 1.4x FP32)."""
    model = onnxdfq.quantize(resnet20, bits=4, act_bits=4)
    reference = _float_clip_layout(model)
    assert sum(n.op_type == "Clip" for n in reference.graph.node) == sum(n.op_type == "Clip" for n in model.graph.node)
    x = np.random.default_rng(3).standard_normal((64, 3, 32, 32)).astype(np.float32)
    np.testing.assert_array_equal(run(model, x), run(reference, x))
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(Path(tempfile.mkdtemp()) / "optimized.onnx")
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node]
    assert ops.count("QLinearConv") == 19 and "Conv" not in ops


def test_global_pooling_written_as_reduce_mean_is_not_an_unhandled_op():
    """PyTorch's dynamo exporter writes the global average pool as ReduceMean over H, W: modelled, no warning."""
    import onnx_graphsurgeon as gs
    from onnx import TensorProto, helper, numpy_helper

    from onnxdfq.graph.patterns import unhandled_ops

    inits = [numpy_helper.from_array(np.ones((4, 3, 1, 1), np.float32), "w"),
             numpy_helper.from_array(np.array([2, 3], np.int64), "axes"),
             numpy_helper.from_array(np.array([1], np.int64), "channel_axes")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"]),
             helper.make_node("ReduceMean", ["y", "axes"], ["pooled"], keepdims=0),
             helper.make_node("ReduceMean", ["y", "channel_axes"], ["mixed"], keepdims=0)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("pooled", TensorProto.FLOAT, [1, 4]),
                               helper.make_tensor_value_info("mixed", TensorProto.FLOAT, [1, 8, 8])], inits)
    model = onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))
    assert unhandled_ops(gs.import_onnx(model)) == {"ReduceMean": 1}  # the one over channels only
