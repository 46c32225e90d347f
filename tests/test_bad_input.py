"""Bad input, as a user would give it: one clear error line, a non-zero exit, nothing lost, nothing left behind."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import pickle
import signal
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from onnxdfq import cli
from onnxdfq.cli import main
from onnxdfq.errors import DataError
from onnxdfq.eval.data import open_dataset
from onnxdfq.graph.io import save_model_atomic
from tests.models import demo_model


@pytest.fixture()
def model_path(tmp_path: Path) -> Path:
    path = tmp_path / "model.onnx"
    onnx.save(demo_model(), path)
    return path


@pytest.fixture()
def labelled(tmp_path: Path) -> Path:
    path = tmp_path / "data.npz"
    rng = np.random.default_rng(0)
    np.savez(path, x=rng.integers(0, 255, (20, 32, 32, 3), dtype=np.uint8), y=rng.integers(0, 10, 20))
    return path


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _fails_cleanly(args: list[str], needle: str, watched: list[Path] = ()) -> None:
    before = {p: _digest(p) for p in watched if p.exists()}
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines[-1].startswith("error: ") and needle in lines[-1], result.output
    assert "Traceback" not in result.output
    for path, digest in before.items():
        assert _digest(path) == digest, f"{path} changed"


def _no_temp_files(folder: Path) -> None:
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp")]


@pytest.mark.parametrize("case", ["report_is_output", "missing_output_folder", "output_folder_is_a_file",
                                  "missing_report_folder", "std_zero", "act_bits_zero", "bits_nine"])
def test_quantize_refuses(case: str, model_path: Path, tmp_path: Path):
    out = tmp_path / "q.onnx"
    args = ["quantize", model_path, "-o", out]
    needle = {
        "report_is_output": "--report path",
        "missing_output_folder": "does not exist",
        "output_folder_is_a_file": "does not exist",
        "missing_report_folder": "does not exist",
        "std_zero": "--std must be positive",
        "act_bits_zero": "--act-bits",
        "bits_nine": "between 2 and 8",
    }[case]
    if case == "report_is_output":
        args += ["--report", out]
    elif case == "missing_output_folder":
        args[3] = tmp_path / "nowhere" / "q.onnx"
    elif case == "output_folder_is_a_file":
        args[3] = model_path / "q.onnx"
    elif case == "missing_report_folder":
        args += ["--report", tmp_path / "nowhere" / "r.json"]
    elif case == "std_zero":
        args += ["--mean", "0.5", "--std", "0"]
    elif case == "act_bits_zero":
        args += ["--act-bits", "0"]
    elif case == "bits_nine":
        args += ["--bits", "9"]
    _fails_cleanly(args, needle, [model_path])
    assert not out.exists()
    _no_temp_files(tmp_path)


@pytest.mark.parametrize("label", [-1, 10])
def test_eval_refuses_labels_outside_the_classes(label: int, model_path: Path, tmp_path: Path):
    path = tmp_path / "bad_labels.npz"
    y = np.zeros(8, np.int64)
    y[3] = label
    np.savez(path, x=np.zeros((8, 32, 32, 3), np.uint8), y=y)
    _fails_cleanly(["eval", model_path, "--data", path, "--preprocess", "unit"], "outside the model's 10 classes")


def test_eval_refuses_channels_last_float_samples(model_path: Path, tmp_path: Path):
    path = tmp_path / "nhwc.npz"
    np.savez(path, x=np.zeros((4, 32, 32, 3), np.float32), y=np.zeros(4, np.int64))
    _fails_cleanly(["eval", model_path, "--data", path], "channels-last")
    _fails_cleanly(["quantize", model_path, "-o", tmp_path / "q.onnx", "--calib", f"data:{path}"], "channels-last")


def test_eval_refuses_a_model_that_outputs_nan(tmp_path: Path, labelled: Path):
    model = demo_model()
    for init in model.graph.initializer:
        if init.name.endswith("weight") and "fc" in init.name:
            values = onnx.numpy_helper.to_array(init).copy()
            values[0, 0] = np.nan
            init.CopyFrom(onnx.numpy_helper.from_array(values, init.name))
    path = tmp_path / "nan.onnx"
    onnx.save(model, path)
    _fails_cleanly(["eval", path, "--data", labelled, "--preprocess", "unit"], "NaN or inf")


def test_quantize_refuses_nan_weights(tmp_path: Path):
    model = demo_model()
    init = next(i for i in model.graph.initializer if i.name.endswith("weight"))
    values = onnx.numpy_helper.to_array(init).copy()
    values.flat[0] = np.nan
    init.CopyFrom(onnx.numpy_helper.from_array(values, init.name))
    path = tmp_path / "nan.onnx"
    onnx.save(model, path)
    _fails_cleanly(["quantize", path, "-o", tmp_path / "q.onnx"], "NaN or inf in 1 weight", [path])
    assert not (tmp_path / "q.onnx").exists()


def test_a_broken_quantization_exits_3_and_writes_nothing_unless_allowed(model_path: Path, tmp_path: Path):
    out = tmp_path / "w2a2.onnx"
    args = ["quantize", str(model_path), "-o", str(out), "--method", "nearest", "--bits", "2", "--act-bits", "2"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 3, result.output
    assert "BROKEN" in result.output and "prior images" in result.output and "at W2A2" in result.output
    assert "more bits" in result.output and "--method squant/dfq" in result.output
    assert "--granularity channel" not in result.output  # already per-channel: not worth suggesting
    assert result.output.splitlines()[-1].startswith("error: ") and "--allow-broken" in result.output
    assert not out.exists()
    _no_temp_files(tmp_path)
    allowed = CliRunner().invoke(main, [*args, "--allow-broken"])
    assert allowed.exit_code == 0 and out.exists() and "BROKEN" in allowed.output


def test_low_fidelity_advice_names_only_what_was_not_tried():
    from onnxdfq.config import make_config
    from onnxdfq.pipeline import fidelity_advice

    per_tensor = fidelity_advice(make_config("dfq", 4, 4, "tensor"), {})
    assert "more bits" in per_tensor and "--method squant," in per_tensor  # not its own method again
    assert "--granularity channel" in per_tensor
    dfmpc = fidelity_advice(make_config("dfmpc", "4/8", None, "channel"),
                            {"statistics": {"source": "prior:auto", "method": "ensemble"}})
    assert "--bits 6/8" in dfmpc and "--calib prior:dead_leaves" in dfmpc and "granularity" not in dfmpc
    with_bn = fidelity_advice(make_config("dfmpc", "4/8", None, "channel"), {"statistics": {"source": "bn"}})
    assert "--calib" not in with_bn
    assert "--bits 7/8" in fidelity_advice(make_config("dfmpc", "6/8", None, "channel"), {})
    assert fidelity_advice(make_config("dfmpc", "7/8", None, "channel"), {}) == "try --method squant --bits 8"
    assert fidelity_advice(make_config("squant", 8, 8, "channel"), {}) == "try --method dfq"
    # under 4-bit activations: the literature's 8-bit ends and reconstruction, unless this run already had them
    w4a4 = fidelity_advice(make_config("squant", 4, 4, "channel"), {})
    assert "--first-last-bits 8" in w4a4
    assert ("--reconstruct" in w4a4) == (importlib.util.find_spec("torch") is not None)
    done = fidelity_advice(make_config("squant", 4, 4, "channel", first_last_bits=8, reconstruct=True), {})
    assert "--first-last-bits" not in done and "--reconstruct" not in done and "more bits" in done
    w4a8 = fidelity_advice(make_config("squant", 4, 8, "channel"), {})  # measured: little or a loss there
    assert "--first-last-bits" not in w4a8 and "--reconstruct" not in w4a8


def test_an_output_the_probe_does_not_exercise_is_named_not_judged(tmp_path: Path):
    model = demo_model()  # its classifier zeroed, as ViT's head is at initialisation: constant logits
    for init in model.graph.initializer:
        if init.name.startswith("fc") and init.name.endswith("weight"):
            init.CopyFrom(onnx.numpy_helper.from_array(np.zeros_like(onnx.numpy_helper.to_array(init)), init.name))
    path = tmp_path / "constant.onnx"
    onnx.save(model, path)
    result = CliRunner().invoke(main, ["quantize", str(path), "-o", str(tmp_path / "q.onnx")])
    assert result.exit_code == 0, result.output
    assert "fidelity unknown for logits" in result.output and "LOW FIDELITY" not in result.output


def test_compare_refuses_mismatched_models(model_path: Path, tmp_path: Path):
    from tests.models import gemm_matmul_model

    other = tmp_path / "other.onnx"
    onnx.save(gemm_matmul_model(), other)
    _fails_cleanly(["compare", model_path, other], "do not match")


class _CreatesAFile:
    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_a_data_file_is_never_executed(tmp_path: Path, model_path: Path):
    victim = tmp_path / "created_by_pickle"
    crafted = tmp_path / "data_batch_1"
    crafted.write_bytes(pickle.dumps({b"data": _CreatesAFile(str(victim)), b"labels": [0]}, protocol=2))
    # the exploit is real: plain pickle.load would create the file
    with pytest.raises(DataError, match="refusing to load"):
        open_dataset(crafted)
    assert not victim.exists()
    _fails_cleanly(["eval", model_path, "--data", crafted], "refusing to load")
    assert not victim.exists()


def test_a_real_cifar_python_batch_still_reads(tmp_path: Path):
    batch = {b"batch_label": b"testing batch 1 of 1", b"labels": [3, 8, 0],
             b"data": np.arange(3 * 3072, dtype=np.int64).astype(np.uint8).reshape(3, 3072),
             b"filenames": [b"a.png", b"b.png", b"c.png"]}
    path = tmp_path / "test_batch"
    path.write_bytes(pickle.dumps(batch, protocol=2))
    dataset = open_dataset(path)
    x, y = next(dataset.batches(3))
    assert x.shape == (3, 3, 32, 32) and y.tolist() == [3, 8, 0]


def test_sigterm_during_save_leaves_nothing(tmp_path: Path):
    out = tmp_path / "q.onnx"
    previous = signal.signal(signal.SIGTERM, cli._terminate)
    try:
        with pytest.raises(SystemExit):
            save_model_atomic(demo_model(), out, validate=lambda tmp: os.kill(os.getpid(), signal.SIGTERM))
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert not out.exists()
    _no_temp_files(tmp_path)


def test_outputs_follow_the_umask(model_path: Path, tmp_path: Path):
    out, report = tmp_path / "q.onnx", tmp_path / "r.json"
    old = os.umask(0o022)
    try:
        result = CliRunner().invoke(main, ["quantize", str(model_path), "-o", str(out), "--report", str(report), "-q"])
    finally:
        os.umask(old)
    assert result.exit_code == 0, result.output
    assert (out.stat().st_mode & 0o777) == 0o644 and (report.stat().st_mode & 0o777) == 0o644
