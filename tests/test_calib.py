"""Calibrated activation ranges: the numpy estimators, `--calib data:` / `synth:` through the
pipeline and the CLI, and the errors a user can run into."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import CIFAR_MEAN, CIFAR_STD

from models import no_bn_model, varied_chain
from onnxdfq.config import CalibSpec
from onnxdfq.errors import DataError, OptionError, UnsupportedModelError
from onnxdfq.quant.range_estimators import (
    MinMaxEstimator,
    MSEEstimator,
    PercentileEstimator,
    TensorObserver,
    get_estimator,
    quantization_mse,
)

MEAN, STD = ",".join(map(str, CIFAR_MEAN)), ",".join(map(str, CIFAR_STD))


def observe(values: np.ndarray, chunks: int = 3) -> TensorObserver:
    observer = TensorObserver()
    for part in np.array_split(values, chunks):
        observer.observe_range(part)
    for part in np.array_split(values, chunks):
        observer.observe_histogram(part)
    return observer


def _reference_fake_quant_mse(x: np.ndarray, lo: float, hi: float, bits: int) -> float:
    """Plain affine fake quantization (scale, zero point, round, clip) and its mean squared error."""
    scale = (hi - lo) / (2**bits - 1)
    zero_point = np.round(-lo / scale)
    q = np.clip(np.round(x / scale) + zero_point, 0, 2**bits - 1)
    return float(np.mean(((q - zero_point) * scale - x) ** 2))


# --- estimators (numpy only) ---------------------------------------------------------------

def test_minmax_and_histogram_cover_every_value() -> None:
    x = np.random.default_rng(0).standard_normal(10_000).astype(np.float32) * 3 + 1
    x[:100] = 0.0
    observer = observe(x)
    assert (observer.lo, observer.hi) == (float(x.min()), float(x.max()))
    assert observer.zeros == 100 and observer.counts.sum() + observer.zeros == x.size
    assert MinMaxEstimator().estimate(observer, 8) == (float(x.min()), float(x.max()))


def test_percentile_matches_numpy_per_side() -> None:
    rng = np.random.default_rng(1)
    x = np.concatenate([np.abs(rng.standard_normal(50_000)) * 2.0, -np.abs(rng.standard_normal(50_000)) * 0.5])
    lo, hi = PercentileEstimator(99.0).estimate(observe(x), 8)
    assert hi == pytest.approx(np.percentile(x[x > 0], 99.0), rel=0.01)
    assert lo == pytest.approx(-np.percentile(-x[x < 0], 99.0), rel=0.01)
    relu = np.maximum(x, 0)  # half zeros: they count as the lowest values of the positive side
    _, relu_hi = PercentileEstimator(99.0).estimate(observe(relu), 8)
    assert relu_hi == pytest.approx(np.percentile(relu, 99.0), rel=0.01)
    assert PercentileEstimator(99.0).estimate(observe(relu), 8)[0] == 0.0


def test_quantization_mse_agrees_with_plain_fake_quant() -> None:
    x = np.random.default_rng(2).standard_normal(200_000)
    observer = observe(x)
    for bits in (4, 8):
        for factor in (0.3, 0.6, 1.0):
            lo, hi = factor * observer.lo, factor * observer.hi
            predicted = quantization_mse(observer.centres(), observer.counts, np.array([lo]), np.array([hi]), bits)
            assert predicted[0] / x.size == pytest.approx(_reference_fake_quant_mse(x, lo, hi, bits), rel=0.1)


def test_mse_clips_harder_at_low_bit_widths_and_beats_minmax() -> None:
    x = np.random.default_rng(3).laplace(size=200_000)
    observer = observe(x)
    ranges = {bits: MSEEstimator().estimate(observer, bits) for bits in (3, 4, 8)}
    assert ranges[3][1] < ranges[4][1] < ranges[8][1] <= observer.hi
    for bits in (4, 8):
        chosen = _reference_fake_quant_mse(x, *ranges[bits], bits)
        assert chosen < _reference_fake_quant_mse(x, observer.lo, observer.hi, bits)
        # a brute-force scan over the same family finds nothing clearly better
        scan = min(_reference_fake_quant_mse(x, c * observer.lo, c * observer.hi, bits)
                   for c in np.linspace(0.05, 1.0, 60))
        assert chosen <= 1.05 * scan


def test_degenerate_tensors() -> None:
    zeros = observe(np.zeros(1000))
    for name in ("minmax", "percentile", "mse"):
        assert get_estimator(name).estimate(zeros, 8) == (0.0, 0.0)
    with pytest.raises(ValueError, match="unknown range estimator"):
        get_estimator("kl")
    with pytest.raises(ValueError, match="observe_range"):
        TensorObserver().observe_histogram(np.ones(3))


def test_calib_spec_parsing() -> None:
    assert CalibSpec.parse(None).source == "auto"
    assert CalibSpec.parse("prior").label == "prior:auto"  # pink or the ensemble, by image size
    assert CalibSpec.parse("prior:ENSEMBLE").label == "prior:ensemble"
    spec = CalibSpec.parse("synth:DFFG", samples=64, estimator="percentile", percentile=99.9)
    assert (spec.source, spec.method, spec.label, spec.sample_count()) == ("synth", "dffg", "synth:dffg", 64)
    assert CalibSpec.parse("data:x.npz", mean=[0.5, 0.5, 0.5]).mean == (0.5, 0.5, 0.5)
    for text in ("synth", "data:", "bn:x", "imagenet:x.npz"):
        with pytest.raises(OptionError, match="--calib takes"):
            CalibSpec.parse(text)
    with pytest.raises(OptionError, match="--calib-range"):
        CalibSpec.parse("data:x.npz", estimator="kl")


# --- pipeline ------------------------------------------------------------------------------

def test_data_calibration_fills_every_range_and_reports_it(tmp_path: Path) -> None:
    import onnxdfq

    model = varied_chain(0)
    samples = np.random.default_rng(0).standard_normal((24, 3, 17, 17)).astype(np.float32)
    path = tmp_path / "calib.npz"
    np.savez(path, x=samples)
    bn = onnxdfq.quantize_model(model, bits=8, act_bits=8).report
    for estimator in ("minmax", "percentile", "mse"):
        report = onnxdfq.quantize_model(model, bits=8, act_bits=8, calib=f"data:{path}", calib_range=estimator,
                                        calib_samples=16).report
        assert set(report["activations"]) == set(bn["activations"])
        assert set(report["activation_sources"]) == {"calib:data"}
        assert report["calibration"]["samples"] == 16 and report["calibration"]["estimator"] == estimator
        rows = next(p for p in report["passes"] if p["name"] == "act_ranges_calib")["layers"]
        for name, row in rows.items():
            observed_lo, observed_hi = min(row["observed_lo"], 0.0), max(row["observed_hi"], 0.0)
            assert observed_lo - 1e-6 <= row["lo"] <= 0.0 <= row["hi"] <= observed_hi + 1e-6, name
    # minmax on the input is exactly the range of the samples used
    report = onnxdfq.quantize_model(model, bits=8, act_bits=8, calib=f"data:{path}", calib_range="minmax",
                                    calib_samples=16).report
    first = report["activations"][model.graph.input[0].name]
    assert (first["lo"], first["hi"]) == pytest.approx((samples[:16].min(), samples[:16].max()))


def test_known_input_range_beats_calibration_for_the_input(tmp_path: Path) -> None:
    import onnxdfq

    model = varied_chain(0)
    path = tmp_path / "calib.npz"
    np.savez(path, x=np.random.default_rng(0).standard_normal((8, 3, 17, 17)).astype(np.float32) * 5)
    report = onnxdfq.quantize_model(model, calib=f"data:{path}", input_range=(-1.0, 1.0)).report
    first = report["activations"][model.graph.input[0].name]
    assert (first["lo"], first["hi"], first["source"]) == (-1.0, 1.0, "input")


def test_raw_uint8_data_needs_the_preprocessing(tmp_path: Path) -> None:
    import onnxdfq

    model = varied_chain(0)
    path = tmp_path / "raw.npz"
    np.savez(path, x=np.random.default_rng(0).integers(0, 256, (8, 17, 17, 3), dtype=np.uint8),
             y=np.zeros(8, np.int64))
    with pytest.raises(DataError, match="--mean"):
        onnxdfq.quantize_model(model, calib=f"data:{path}")
    report = onnxdfq.quantize_model(model, calib=f"data:{path}", mean=[0.5] * 3, std=[0.25] * 3).report
    assert report["calibration"]["samples"] == 8
    assert report["config"]["input_range"] == [-2.0, 2.0]
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, x=np.zeros((4, 3, 8, 8), np.float32))
    with pytest.raises(DataError, match="do not fit the model input"):
        onnxdfq.quantize_model(model, calib=f"data:{wrong}")


def test_synth_calibration_on_a_model_without_bn_is_a_clear_error() -> None:
    pytest.importorskip("torch")
    import onnxdfq

    with pytest.raises(UnsupportedModelError, match="no BatchNormalization"):
        onnxdfq.quantize_model(no_bn_model(), calib="synth:dffg", calib_samples=4)


@pytest.mark.torch
def test_synth_calibration_on_the_fly_is_reproducible() -> None:
    pytest.importorskip("torch")
    import onnxdfq

    model = varied_chain(0)
    options = dict(calib="synth:dffg", calib_samples=8, synth_options={"steps": 4, "keep": 2}, seed=3)
    calls: list[int] = []
    first = onnxdfq.quantize_model(model, calib_progress=lambda step, total, loss: calls.append(step), **options)
    again = onnxdfq.quantize_model(model, **options)
    assert first.report["activations"] == again.report["activations"]
    assert calls == [1, 2, 3, 4]
    calib = first.report["calibration"]
    assert calib["source"] == "synth:dffg" and calib["samples"] == 8 and calib["bn_loss"] > 0


def test_real_data_calibration_keeps_resnet20_accuracy(resnet20, cifar_test, cifar_train) -> None:
    import onnxdfq

    result = onnxdfq.quantize_model(resnet20, bits=8, act_bits=8, calib=f"data:{cifar_train}", calib_samples=64,
                                    mean=CIFAR_MEAN, std=CIFAR_STD)
    assert result.report["calibration"]["samples"] == 64
    top1 = onnxdfq.evaluate(result.model, str(cifar_test), mean=CIFAR_MEAN, std=CIFAR_STD, limit=500).top1
    assert top1 > 89.0


# --- CLI -----------------------------------------------------------------------------------

def cli(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "onnxdfq.cli", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})


def assert_clean_failure(proc: subprocess.CompletedProcess, needle: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and needle.lower() in lines[0].lower(), proc.stderr


@pytest.mark.torch
def test_cli_synth_then_quantize_on_its_samples(resnet20, tmp_path: Path) -> None:
    pytest.importorskip("torch")
    out = tmp_path / "synth.npz"
    proc = cli("synth", resnet20, "--method", "dffg", "-n", "8", "--batch-size", "4", "--steps", "3",
               "-O", "keep=2", "--seed", "1", "-o", out)
    assert proc.returncode == 0, proc.stderr
    assert "BN loss" in proc.stdout and "Gaussian noise" in proc.stdout
    with np.load(out) as data:
        assert data["x"].shape == (8, 3, 32, 32) and data["x"].dtype == np.float32
        meta = json.loads(str(data["meta"]))
    assert meta["method"] == "dffg" and meta["samples"] == 8 and meta["bn_loss"] < meta["noise_bn_loss"]
    assert not list(tmp_path.glob(".*.tmp"))
    report = tmp_path / "r.json"
    proc = cli("quantize", resnet20, "-o", tmp_path / "q.onnx", "--calib", f"data:{out}", "--calib-range",
               "percentile", "--report", report)
    assert proc.returncode == 0, proc.stderr
    assert "data, 8 samples, percentile estimator" in proc.stdout
    calib = json.loads(report.read_text())["calibration"]
    assert calib["source"] == "data" and calib["estimator"] == "percentile" and calib["percentile"] == 99.99


@pytest.mark.torch
def test_cli_synth_keeps_samples_in_the_preprocessing_box(resnet20, tmp_path: Path) -> None:
    pytest.importorskip("torch")
    out = tmp_path / "boxed.npz"
    proc = cli("synth", resnet20, "--method", "dffg", "-n", "8", "--batch-size", "8", "--steps", "20",
               "-O", "keep=1", "--preprocess", "imagenet", "-o", out)
    assert proc.returncode == 0, proc.stderr
    assert "per channel from --preprocess imagenet" in proc.stdout
    lows = (np.zeros(3) - (0.485, 0.456, 0.406)) / np.array((0.229, 0.224, 0.225))
    highs = (np.ones(3) - (0.485, 0.456, 0.406)) / np.array((0.229, 0.224, 0.225))
    with np.load(out) as data:
        x = data["x"]
        assert json.loads(str(data["meta"]))["input_bounds"] == "--preprocess imagenet"
    assert (x >= lows.reshape(1, 3, 1, 1) - 1e-5).all() and (x <= highs.reshape(1, 3, 1, 1) + 1e-5).all()
    assert x.min() < lows.min() + 0.05  # the box binds: 20 steps already push pixels to its edge
    assert_clean_failure(cli("synth", resnet20, "--method", "dffg", "-n", "4", "--mean", "0.5",
                             "-o", tmp_path / "bad.npz"), needle="--std")
    assert not (tmp_path / "bad.npz").exists()


def test_synth_bounds_follow_the_known_preprocessing(resnet20) -> None:
    """Generated samples are boxed by the preprocessing the user gave or the model records, never by an assumed
    one: an assumed ImageNet box on a model trained otherwise would distort every sample."""
    from onnxdfq.config import CalibSpec
    from onnxdfq.eval.calibrate import synth_input_bounds

    model = onnx.load(str(resnet20))
    del model.metadata_props[:]
    spec = CalibSpec(source="synth", method="dffg")
    bounds, source = synth_input_bounds(model, spec, None)
    assert bounds is None and source.startswith("unbounded")
    (lows, highs), source = synth_input_bounds(model, spec, (-1.0, 1.0))
    assert source == "--input-range" and np.allclose(lows, -1.0) and np.allclose(highs, 1.0)
    spec = CalibSpec(source="synth", method="dffg", mean=(0.5, 0.4, 0.3), std=(0.25, 0.2, 0.1))
    (lows, highs), _ = synth_input_bounds(model, spec, None)
    np.testing.assert_allclose(lows, [-2.0, -2.0, -3.0])
    np.testing.assert_allclose(highs, [2.0, 3.0, 7.0])


def test_cli_quantize_on_raw_training_images(resnet20, cifar_train, tmp_path: Path) -> None:
    proc = cli("quantize", resnet20, "-o", tmp_path / "q.onnx", "--calib", f"data:{cifar_train}",
               "--calib-samples", "32", "--mean", MEAN, "--std", STD)
    assert proc.returncode == 0, proc.stderr
    assert "data, 32 samples, mse estimator (A8)" in proc.stdout
    assert_clean_failure(cli("quantize", resnet20, "-o", tmp_path / "q2.onnx", "--calib", f"data:{cifar_train}"),
                         needle="--mean")


@pytest.mark.parametrize("calib,needle", [("imagenet", "--calib takes"), ("data:missing.npz", "no such file")])
def test_cli_bad_calib_option(resnet20, tmp_path: Path, calib: str, needle: str) -> None:
    assert_clean_failure(cli("quantize", resnet20, "-o", tmp_path / "q.onnx", "--calib", calib), needle=needle)
    assert not (tmp_path / "q.onnx").exists()


@pytest.mark.torch
def test_cli_synth_errors(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    plain = tmp_path / "plain.onnx"
    onnx.save(no_bn_model(), plain)
    assert_clean_failure(cli("synth", plain, "--method", "dffg", "-n", "4", "-o", tmp_path / "s.npz"),
                         needle="no BatchNormalization")
    assert_clean_failure(cli("quantize", plain, "-o", tmp_path / "q.onnx", "--calib", "synth:zeroq"),
                         needle="no BatchNormalization")
    model = tmp_path / "m.onnx"
    onnx.save(varied_chain(0), model)
    assert_clean_failure(cli("synth", model, "--method", "dffg", "-o", tmp_path / "s.txt"), needle=".npz")
    assert not list(tmp_path.glob("s.*"))
