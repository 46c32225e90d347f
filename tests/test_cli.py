"""The command line as a user runs it: happy paths and every kind of bad input."""

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

from models import model_with_unsupported_op, varied_chain


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "onnxdfq.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env={**os.environ, "PYTHONWARNINGS": "ignore"})


@pytest.fixture()
def small_model(tmp_path) -> Path:
    path = tmp_path / "small.onnx"
    onnx.save(varied_chain(0), path)
    return path


def assert_clean_failure(proc: subprocess.CompletedProcess, *, needle: str) -> None:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and needle.lower() in lines[0].lower(), proc.stderr


def test_quantize_eval_compare_roundtrip(resnet20, cifar_test, tmp_path):
    out, report = tmp_path / "r20.q.onnx", tmp_path / "r20.json"
    proc = cli("quantize", resnet20, "-o", out, "--method", "nearest", "--bits", "8", "--act-bits", "8",
               "--report", report)
    assert proc.returncode == 0, proc.stderr
    assert "fidelity" in proc.stdout and out.exists()
    data = json.loads(report.read_text())
    assert data["layers"] and data["activation_sources"]["bn"] == 19
    proc = cli("eval", out, "--data", cifar_test, "--mean", ",".join(map(str, CIFAR_MEAN)),
               "--std", ",".join(map(str, CIFAR_STD)), "--limit", "500")
    assert proc.returncode == 0, proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("top1=") and " top5=" in last
    assert float(last.split()[0].split("=")[1]) > 85
    proc = cli("compare", resnet20, out, "--random", "32", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["top1_agreement"] > 0.7
    assert not list(tmp_path.glob(".*.tmp"))


def test_inspect_lists_layers(small_model):
    proc = cli("inspect", small_model)
    assert proc.returncode == 0, proc.stderr
    assert "depthwise" in proc.stdout and "relu6" in proc.stdout and "conv5" in proc.stdout


def test_not_onnx(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_text("this is not a model")
    proc = cli("quantize", bad, "-o", tmp_path / "out.onnx")
    assert_clean_failure(proc, needle="bad.onnx")
    assert bad.read_text() == "this is not a model" and not (tmp_path / "out.onnx").exists()


def test_truncated_model(small_model, tmp_path):
    data = small_model.read_bytes()
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(data[: len(data) // 2])
    proc = cli("quantize", cut, "-o", tmp_path / "out.onnx")
    assert_clean_failure(proc, needle="cut.onnx")
    assert not (tmp_path / "out.onnx").exists()


def test_missing_file(tmp_path):
    assert_clean_failure(cli("quantize", tmp_path / "nope.onnx", "-o", tmp_path / "o.onnx"), needle="no such file")


@pytest.mark.parametrize("bits", ["1", "9", "2/6"])
def test_impossible_bits(small_model, tmp_path, bits):
    before = small_model.read_bytes()
    proc = cli("quantize", small_model, "-o", tmp_path / "o.onnx", "--bits", bits)
    assert_clean_failure(proc, needle="bits")
    assert small_model.read_bytes() == before and not (tmp_path / "o.onnx").exists()


def test_output_equal_to_input_is_refused(small_model):
    before = small_model.read_bytes()
    proc = cli("quantize", small_model, "-o", small_model)
    assert_clean_failure(proc, needle="input")
    assert small_model.read_bytes() == before


def test_existing_output_survives_a_failed_run(small_model, tmp_path):
    out = tmp_path / "o.onnx"
    out.write_bytes(b"previous result")
    proc = cli("quantize", small_model, "-o", out, "--act-bits", "77")
    assert_clean_failure(proc, needle="act-bits")
    assert out.read_bytes() == b"previous result"


def test_unknown_data_format(small_model, tmp_path):
    data = tmp_path / "data.csv"
    data.write_text("1,2,3")
    assert_clean_failure(cli("eval", small_model, "--data", data), needle="unknown data format")


def test_data_that_does_not_fit_the_model(small_model, tmp_path):
    data = tmp_path / "gray.npz"
    np.savez(data, x=np.zeros((4, 1, 17, 17), np.float32), y=np.zeros(4, np.int64))
    assert_clean_failure(cli("eval", small_model, "--data", data), needle="do not match the model input")


def test_cuda_asked_but_missing(small_model, tmp_path):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("CUDA is available here")
    data = tmp_path / "d.npz"
    np.savez(data, x=np.zeros((2, 3, 17, 17), np.float32), y=np.zeros(2, np.int64))
    assert_clean_failure(cli("eval", small_model, "--data", data, "--provider", "cuda"), needle="cuda")


def test_unhandled_op_warns_once_by_name(tmp_path):
    path = tmp_path / "sig.onnx"
    onnx.save(model_with_unsupported_op(), path)
    proc = cli("quantize", path, "-o", tmp_path / "sig.q.onnx")
    assert proc.returncode == 0, proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if "Sigmoid" in line]
    assert len(warnings) == 1


def test_demo_reports_real_top1_of_the_shipped_model(tmp_path, cifar_test):
    """The demo's figures are real: its FP32 row is ResNet-20 on the shipped 1000 images, and every quantized
    model it writes gives the top-1 it printed when evaluated again here. One run with --synthetic, which adds
    the synthetic model's fidelity table after the real one."""
    proc = cli("demo", "--out-dir", tmp_path, "--synthetic", "--samples", "32")
    assert proc.returncode == 0, proc.stderr
    real_part, synthetic_part = proc.stdout.split("synthetic model:")
    table = {}
    for line in real_part.splitlines():
        cells = line.split()
        if cells and cells[0] in ("FP32", "nearest", "squant", "dfq", "dfmpc", "gptq"):
            table[(cells[0], cells[1])] = float(cells[3])
    from onnxdfq.eval.runner import evaluate

    shipped = Path(onnxdfq_data()) / "cifar10_test1000.npz"
    fp32 = evaluate(str(Path(onnxdfq_data()) / "resnet20_cifar10.onnx"), str(shipped), mean=CIFAR_MEAN, std=CIFAR_STD)
    assert table[("FP32", "-")] == round(fp32.top1, 2) and fp32.count == 1000
    written = sorted(tmp_path.glob("resnet20.*.onnx"))
    from onnxdfq.cli import demo_jobs

    assert len(written) == len(demo_jobs()) and len(table) == len(demo_jobs()) + 1 >= 8
    w8 = evaluate(str(tmp_path / "resnet20.nearest.w8a8.onnx"), str(shipped), mean=CIFAR_MEAN, std=CIFAR_STD).top1
    assert table[("nearest", "W8A8")] == round(w8, 2) and w8 > fp32.top1 - 1.5
    assert table[("dfmpc", "W2/6Afp32")] > 70.0
    assert "onnxdfq quantize model.onnx" in real_part
    assert "written packed (--format qdq-packed" in real_part and "--format qdq-packed --preprocess" in real_part
    assert "SQNR" in synthetic_part


def onnxdfq_data() -> str:
    from importlib.resources import files

    return str(files("onnxdfq.data"))
