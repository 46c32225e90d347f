"""Settings: one typed config for the API and the CLI, unknown options refused, identical files either way."""

from __future__ import annotations

import os
import subprocess
import sys

import onnx
import pytest

import onnxdfq
from models import varied_chain
from onnxdfq.config import METHODS, DFMPCOptions, make_config, valid_options
from onnxdfq.errors import OptionError


def test_unknown_options_are_refused_with_the_valid_ones(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(varied_chain(0), path)
    with pytest.raises(OptionError) as err:
        onnxdfq.quantize_model(str(path), sigmass=4.0, bias_corection=True)
    message = str(err.value)
    assert "bias_corection" in message and "sigmass" in message
    assert all(name in message for name in ("sigmas", "bias_correction", "calib"))


def test_unknown_dfmpc_option_is_refused():
    with pytest.raises(OptionError, match="lamda1.*valid: quantizer"):
        make_config("dfmpc", "2/6", dfmpc={"lamda1": 0.3})
    assert make_config("dfmpc", "2/6", dfmpc={"lambda1": 0.3}).dfmpc == DFMPCOptions(lambda1=0.3)


def test_config_is_frozen_and_method_defaults_live_in_one_place():
    config = make_config("dfmpc", "2/6")
    with pytest.raises(AttributeError):
        config.bits = 4  # type: ignore[misc]
    assert config.act_bits is None and METHODS["dfmpc"]["act_bits"] is None  # float activations, API and CLI
    assert make_config("squant", 4).act_bits == 8 and make_config("squant", 4).step("bias_correction")
    assert make_config("nearest", granularity="per-tensor").per_channel is False
    assert "granularity" in valid_options()


@pytest.mark.parametrize(("method", "bits"), [("nearest", "8"), ("squant", "4"), ("dfq", "6"), ("dfmpc", "2/6")])
def test_api_and_cli_write_identical_files(tmp_path, method, bits):
    path, out = tmp_path / "m.onnx", tmp_path / "m.q.onnx"
    onnx.save(varied_chain(1), path)
    proc = subprocess.run([sys.executable, "-m", "onnxdfq.cli", "quantize", str(path), "-o", str(out), "--method",
                           method, "--bits", bits, "-q"], capture_output=True, text=True,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stderr
    api = onnxdfq.quantize_model(str(path), method=method, bits=bits)
    assert out.read_bytes() == api.model.SerializeToString()


def test_cpu_synthesis_defaults_are_lighter_and_explicit_settings_win():
    """DFFG on a CPU: 128 samples in 60 steps (ResNet-20 W6A6 91.37 vs 91.38 with real images); a GPU keeps 256."""
    cpu = make_config(calib="synth:dffg").calib.synth_run()
    assert cpu == (128, {"steps": 60})
    assert make_config(calib="synth:dffg", device="cuda").calib.synth_run() == (256, {})
    chosen = make_config(calib="synth:dffg", calib_samples=64, synth_options={"steps": 10, "keep": 2}).calib
    assert chosen.synth_run() == (64, {"steps": 10, "keep": 2})
    assert make_config(calib="synth:zeroq").calib.synth_run() == (256, {})
