"""A new user's mistakes, each either the right result or one clear line with exit status 2 (3 for a model that
was made but fails its output check): preprocessing, fidelity grades, compare's inputs, reports, API, sweep."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from conftest import CIFAR_MEAN, CIFAR_STD

import onnxdfq
from onnxdfq.cli import main
from onnxdfq.errors import DataError, FidelityError, OptionError
from onnxdfq.preprocessing import PRESETS, from_metadata, resolve_preprocessing

MEAN, STD = ",".join(map(str, CIFAR_MEAN)), ",".join(map(str, CIFAR_STD))


def _run(*args) -> tuple[int, str]:
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert "Traceback" not in result.output
    return result.exit_code, result.output


def _one_error_line(args, needle: str, code: int = 2) -> str:
    exit_code, output = _run(*args)
    assert exit_code == code, output
    last = [line for line in output.splitlines() if line.strip()][-1]
    assert last.startswith("error: ") and needle in last, output
    return output


@pytest.fixture(scope="module")
def quantized_r20(resnet20, tmp_path_factory) -> Path:
    """ResNet-20 W8A8 quantized with its preprocessing given: the file records it."""
    out = tmp_path_factory.mktemp("q") / "r20.q.onnx"
    code, output = _run("quantize", resnet20, "-o", out, "--mean", MEAN, "--std", STD, "-q")
    assert code == 0, output
    return out


# --- preprocessing is never guessed ------------------------------------------------------------------------------

def test_eval_of_raw_images_without_preprocessing_refuses(resnet20, cifar_test):
    """Was: top1=39.60, exit 0."""
    _one_error_line(["eval", resnet20, "--data", cifar_test, "--limit", 100], "--preprocess imagenet|cifar")


def test_eval_of_a_quantized_file_needs_no_flags(resnet20, quantized_r20, cifar_test):
    meta = {p.key: p.value for p in onnx.load(quantized_r20, load_external_data=False).metadata_props}
    assert from_metadata(meta).mean == pytest.approx(CIFAR_MEAN)
    with_flags = onnxdfq.evaluate(str(quantized_r20), str(cifar_test), mean=CIFAR_MEAN, std=CIFAR_STD, limit=500)
    without = onnxdfq.evaluate(str(quantized_r20), str(cifar_test), limit=500)
    assert without.correct1 == with_flags.correct1 and without.top1 > 88.0
    assert "model metadata" in without.preprocessing
    preset = onnxdfq.evaluate(str(resnet20), str(cifar_test), preprocess="imagenet", limit=500)
    assert abs(preset.top1 - with_flags.top1) <= 1.0  # the FP32 parent, with the same preprocessing by name


def test_float_samples_are_never_normalised_again(quantized_r20, tmp_path):
    """Preprocessed float NCHW arrays are model inputs: the metadata must not be applied to them a second time."""
    x = np.random.default_rng(0).standard_normal((8, 3, 32, 32)).astype(np.float32)
    path = tmp_path / "float.npz"
    np.savez(path, x=x, y=np.zeros(8, np.int64))
    from onnxdfq.eval.data import open_dataset
    from onnxdfq.eval.runner import _open
    from onnxdfq.eval.session import make_session

    dataset = _open(str(path), make_session(str(quantized_r20)), None, None, None)
    assert dataset.preprocessing is None
    batch, _ = next(dataset.batches(8))
    np.testing.assert_array_equal(batch, next(open_dataset(path).batches(8))[0])


@pytest.mark.parametrize("flags, needle", [
    (["--mean", "0.5,0.5,0.5"], "--mean without --std"),
    (["--std", "0.2,0.2,0.2"], "--std without --mean"),
    (["--mean", "123.7,116.3,103.5", "--std", "58.4,57.1,57.4"], "look like the 0-255 scale"),
    (["--mean", "0.5,0.5", "--std", "0.2,0.2,0.2"], "2 mean values but 3 std values"),
    (["--mean", "0.5,0.5", "--std", "0.2,0.2"], "takes 3 input channels"),
    (["--preprocess", "imagenett"], "--preprocess takes imagenet|cifar"),
    (["--preprocess", "imagenet", "--mean", "0.5", "--std", "0.5"], "give the preprocessing once"),
])
def test_bad_preprocessing_is_one_line_everywhere(flags, needle, resnet20, cifar_test, tmp_path):
    """Was: a missing one silently became mean 0 / std 1 (91.6 -> 68.0 / 64.6), 0-255 values were accepted
    (71.8 %), and mismatched lengths were a traceback in quantize."""
    out = tmp_path / "q.onnx"
    _one_error_line(["quantize", resnet20, "-o", out, *flags], needle)
    assert not out.exists()
    _one_error_line(["eval", resnet20, "--data", cifar_test, "--limit", 10, *flags], needle)
    _one_error_line(["compare", resnet20, resnet20, "--data", cifar_test, "--limit", 10, *flags], needle)


def test_resolve_preprocessing_maps_the_input_range_and_presets():
    assert resolve_preprocessing(input_range=(-1.0, 1.0)).input_range == pytest.approx((-1.0, 1.0))
    assert resolve_preprocessing(preset="raw255").input_range == pytest.approx((0.0, 255.0))
    inception = resolve_preprocessing(preset="inception")
    assert inception.input_range == (-1.0, 1.0) and inception.source == "--preprocess inception"
    assert set(PRESETS) == {"imagenet", "cifar", "inception", "unit", "raw255"}
    assert resolve_preprocessing() is None
    with pytest.raises(OptionError, match="--std must be positive"):
        resolve_preprocessing([0.5], [0.0])
    # other tools' metadata on the 0-255 scale is read back on the 0-1 scale
    assert from_metadata({"mean": "[123.675, 116.28, 103.53]", "std": "58.395 57.12 57.375"}).mean == \
        pytest.approx(PRESETS["imagenet"][0])


def test_api_evaluate_refuses_raw_images_without_preprocessing(resnet20, cifar_test):
    with pytest.raises(DataError, match="raw images"):
        onnxdfq.evaluate(str(resnet20), str(cifar_test), limit=10)


# --- fidelity: degraded vs broken -----------------------------------------------------------------------------

@pytest.mark.slow
def test_broken_mobilenet_exits_3_while_recommended_runs_are_degraded_at_most(mobilenet, tmp_path):
    """MobileNet-V1 DF-MPC 2/6 (0.85 % top-1) is broken; the README's recommended 4/8 (72.2 %) and squant W4A8
    (67.3 %) are written with a "degraded" warning, which -q still prints."""
    out = tmp_path / "mb.onnx"
    output = _one_error_line(["quantize", mobilenet, "-o", out, "--method", "dfmpc", "--bits", "2/6",
                              "--preprocess", "inception", "-q"], "broken", code=3)
    assert "warning: BROKEN" in output and not out.exists()
    for flags in (["--method", "dfmpc", "--bits", "4/8"], ["--method", "squant", "--bits", "4"]):
        code, output = _run("quantize", mobilenet, "-o", out, *flags, "--preprocess", "inception", "-q")
        assert code == 0, output
        assert "warning: degraded" in output and "as expected at W4" in output and "BROKEN" not in output
        assert "fidelity grade" not in output  # -q: no summary, warnings only
        out.unlink()


def test_min_sqnr_fails_a_pipeline_below_its_own_line(resnet20, tmp_path):
    out = tmp_path / "q.onnx"
    output = _one_error_line(["quantize", resnet20, "-o", out, "--bits", "4", "--act-bits", "4", "--preprocess",
                              "imagenet", "--min-sqnr", "40"], "below --min-sqnr 40", code=3)
    assert "not written" in output and not out.exists()
    code, output = _run("quantize", resnet20, "-o", out, "--preprocess", "imagenet", "--min-sqnr", "15")
    assert code == 0 and out.exists(), output
    assert any(line.split()[:3] == ["fidelity", "grade", "fine"] for line in output.splitlines())


def test_fidelity_grades_are_in_the_report_and_8_bit_loss_is_called_unexpected():
    from onnxdfq.eval.check import check_stage
    from onnxdfq.eval.metrics import centered_cosine

    ref = np.random.default_rng(0).standard_normal((32, 10))
    assert centered_cosine(ref, ref + 5.0) == pytest.approx(1.0)  # a common offset is not a collapse
    collapsed = np.tile(ref.mean(axis=0), (32, 1)) + 0.01 * np.random.default_rng(1).standard_normal((32, 10))
    assert abs(centered_cosine(ref, collapsed)) < 0.15
    from tests.models import demo_model

    model = demo_model()
    result = onnxdfq.quantize_model(model, bits=8, act_bits=8)
    assert result.report["fidelity"]["grade"] in ("fine", "degraded")
    assert result.report["fidelity"]["outputs"][0]["grade"] == result.report["fidelity"]["grade"]
    _, warnings = check_stage(model, model, result.config.calib, None, "try x", "W8A8", narrow=False)
    assert warnings == []  # identical models: fine
    degraded = onnxdfq.quantize_model(model, method="nearest", bits=3, act_bits=8)  # 4 dB, centered cosine 0.7
    assert degraded.report["fidelity"]["grade"] == "degraded"
    assert any(w.startswith("degraded: ") and "as expected at W3A8" in w for w in degraded.report["warnings"])
    # the same loss where 8 bits were asked for is not expected, and says so
    _, warnings = check_stage(model, degraded.model, result.config.calib, None, "try x", "W8A8", narrow=False)
    assert len(warnings) == 1 and warnings[0].startswith("LOW FIDELITY") and "unexpected at W8A8" in warnings[0]


# --- compare -----------------------------------------------------------------------------------------------------

def test_compare_defaults_to_prior_images_and_says_so(resnet20, quantized_r20):
    """Was: N(0,1) noise without a word (a good MobileNet W8A8 read 8.22 dB there, 16 dB on real images)."""
    code, output = _run("compare", resnet20, quantized_r20)
    assert code == 0, output
    assert "64 prior images [3, 32, 32] (model metadata)" in output
    sqnr = float(output.split("sqnr_db=")[1].split()[0])
    assert sqnr > 20.0
    code, noise = _run("compare", resnet20, quantized_r20, "--random", 16)
    assert code == 0 and "N(0,1) noise" in noise and "(not images)" in noise
    _one_error_line(["compare", resnet20, quantized_r20, "--random", 16, "--prior", 16], "one kind of input")


# --- reports -----------------------------------------------------------------------------------------------------

def test_dfmpc_low_layers_carry_sqnr_scales_and_bits_everywhere(resnet20, tmp_path):
    """Was: None for the 2-bit layers' weight SQNR and scales, missing from the chart and the summary's min."""
    report_path, html = tmp_path / "r.json", tmp_path / "r.html"
    code, output = _run("quantize", resnet20, "-o", tmp_path / "q.onnx", "--method", "dfmpc", "--bits", "2/6",
                        "--preprocess", "imagenet", "--report", report_path)
    assert code == 0, output
    layers = json.loads(report_path.read_text())["layers"]
    low = {name: layer for name, layer in layers.items() if layer["bits"] == 2}
    assert low and all(isinstance(layer.get("weight_sqnr_db"), float) and layer["scale_min"] > 0
                       and layer["scale_max"] >= layer["scale_min"] for layer in layers.values())
    lowest = min(layer["weight_sqnr_db"] for layer in layers.values())
    assert lowest == min(layer["weight_sqnr_db"] for layer in low.values())  # the 2-bit layers are the worst
    assert f"min {lowest:.1f}" in output
    code, _ = _run("report", report_path, "-o", html)
    page = html.read_text()
    assert code == 0 and all(f'data-layer="{name}"' in page for name in low)


# --- API -----------------------------------------------------------------------------------------------------

def test_api_keywords_beside_config_are_an_error(resnet20):
    """Was: method and bits silently ignored in favour of config."""
    config = onnxdfq.make_config("squant", 4)
    with pytest.raises(OptionError, match="config= and method, bits"):
        onnxdfq.quantize_model(str(resnet20), method="dfq", bits=8, config=config)
    with pytest.raises(OptionError, match="config= and act_bits"):
        onnxdfq.quantize_model(str(resnet20), act_bits=4, config=config)


def test_save_quantized_takes_what_quantize_returns(resnet20, tmp_path):
    """Was: AttributeError: model."""
    model = onnxdfq.quantize(str(resnet20), preprocess="imagenet")
    size = onnxdfq.save_quantized(model, tmp_path / "q.onnx")
    assert size == os.path.getsize(tmp_path / "q.onnx") > 0
    with pytest.raises(OptionError, match="QuantResult or an onnx.ModelProto"):
        onnxdfq.save_quantized("model.onnx", tmp_path / "other.onnx")


def test_save_quantized_refuses_a_broken_result(tmp_path):
    from tests.models import demo_model

    result = onnxdfq.quantize_model(demo_model(), method="nearest", bits=2, act_bits=2)
    assert result.report["fidelity"]["grade"] == "broken"
    with pytest.raises(FidelityError, match="allow_broken"):
        onnxdfq.save_quantized(result, tmp_path / "q.onnx")
    assert not (tmp_path / "q.onnx").exists()
    assert onnxdfq.save_quantized(result, tmp_path / "q.onnx", allow_broken=True) > 0


# --- sweep -----------------------------------------------------------------------------------------------------

def test_sweep_typos_fail_before_any_work(resnet20, cifar_test, tmp_path):
    """Was: the typo 'skipped' with a note, exit 0, absent from results.json."""
    out = tmp_path / "out"
    _one_error_line(["sweep", resnet20, "--method", "nearest,squnt", "--data", cifar_test, "--mean", MEAN, "--std",
                     STD, "-o", out], "'squnt': unknown method")
    _one_error_line(["sweep", resnet20, "--bits", "8,9", "--data", cifar_test, "--mean", MEAN, "--std", STD,
                     "-o", out], "--bits 9")
    assert not out.exists()


def test_sweep_without_preprocessing_refuses_before_any_work(resnet20, cifar_test, tmp_path):
    """Was: a full table with FP32 at 40.10 and plausible deltas."""
    pytest.importorskip("ray")
    out = tmp_path / "out"
    _one_error_line(["sweep", resnet20, "--data", cifar_test, "--limit", 100, "-o", out], "raw images")
    assert not (out / "results.json").exists()


def test_sweep_results_use_the_umask(tmp_path):
    from onnxdfq.sweep import write_results

    old = os.umask(0o022)
    try:
        write_results(tmp_path, {"meta": {}, "fp32": {}, "rows": []})
    finally:
        os.umask(old)
    for name in ("results.json", "results.md", "results.html"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644
