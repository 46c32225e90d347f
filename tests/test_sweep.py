"""onnxdfq sweep: the pure parts (grid, shards, exact combination, Pareto front, tables) without Ray, then
real sweeps on a local Ray and through a Ray head started here (`pytest.importorskip("ray")`)."""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import onnx
import pytest
from conftest import CIFAR_MEAN, CIFAR_STD

import onnxdfq
from onnxdfq.errors import OptionError
from onnxdfq.sweep import ShardCounts, SweepConfig, combine_shards, expand_grid, shard_ranges
from onnxdfq.sweep_report import pareto_front, render_html, render_markdown

MEAN, STD = ",".join(map(str, CIFAR_MEAN)), ",".join(map(str, CIFAR_STD))


# --- without Ray -------------------------------------------------------------------------------------------------

def test_grid_skips_invalid_combinations_and_says_why():
    configs, skipped = expand_grid(["a/r20.onnx"], ["nearest", "dfmpc"], ["8", "2/6", "8"], ["8", "none"])
    assert [c.key for c in configs] == ["r20 nearest W8A8 channel", "r20 nearest W8Anone channel",
                                        "r20 dfmpc W2/6A8 channel", "r20 dfmpc W2/6Anone channel"]
    reasons = dict(skipped)
    assert "LOW/HIGH" in reasons["r20 dfmpc W8A8 channel"]  # dfmpc with a single width
    assert "single width" in reasons["r20 nearest W2/6A8 channel"]  # the others with LOW/HIGH
    assert configs[2].file_name == "r20.dfmpc.w2-6a8.channel.onnx"


def test_grid_refuses_two_models_with_one_name():
    with pytest.raises(OptionError, match="two models named"):
        expand_grid(["a/m.onnx", "b/m.onnx"], ["nearest"], ["8"], ["8"])


@pytest.mark.parametrize(("count", "shard", "batch"), [(1000, 1000, 100), (1000, 300, 100), (1050, 250, 100),
                                                        (7, 1, 3), (99, 1000, 100)])
def test_shards_cover_the_set_on_batch_boundaries(count, shard, batch):
    ranges = shard_ranges(count, shard, batch)
    assert ranges[0][0] == 0 and ranges[-1][1] == count
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))
    assert all(start % batch == 0 for start, _ in ranges)
    assert shard_ranges(0, shard, batch) == []


def test_combination_sums_counts_not_percentages():
    shards = [ShardCounts(99, 100, 100), ShardCounts(1, 2, 3)]  # 99 % and 33 %: the mean would say 66 %
    combined = combine_shards(shards)
    assert combined["correct1"] == 100 and combined["samples"] == 103
    assert combined["top1"] == 100.0 * 100 / 103


def test_pareto_front():
    points = [(1.0, 50.0), (2.0, 60.0), (2.0, 55.0), (3.0, 59.0), (0.5, 10.0), (2.0, 60.0)]
    assert pareto_front(points) == [4, 0, 1, 5]


def test_tables_show_failed_rows():
    ok = {"key": "m nearest W8A8 channel", "model": "m", "method": "nearest", "bits": "8", "act_bits": "8",
          "granularity": "channel", "error": None, "top1": 90.0, "top5": 99.0, "fp32_top1": 91.0, "quantize_s": 0.5,
          "bytes": 300_000, "packed_bytes": None, "latency_ratio": 0.6}
    bad = {**ok, "key": "m squant W4A8 channel", "method": "squant", "bits": "4", "error": "ModelLoadError: boom"}
    results = {"meta": {"eval": {"data": "d.npz", "limit": 10}}, "fp32": {"m": {"top1": 91.0, "top5": 99.5,
                                                                              "samples": 10, "bytes": 1_000_000}},
               "rows": [ok, bad]}
    md = render_markdown(results)
    assert "| m | nearest | W8A8 | channel | 90.00 | -1.00 |" in md and "error: ModelLoadError: boom" in md
    page = render_html(results)
    assert page.count("<circle") == 1 and "Pareto front" in page and "1 config(s) failed" in page


def test_without_ray_the_error_names_the_extra(monkeypatch, tmp_path):
    from onnxdfq.sweep import EvalSpec, run_sweep

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    config = SweepConfig(str(tmp_path / "m.onnx"), "nearest", "8", "8", "channel")
    with pytest.raises(OptionError, match=r'pip install -e "\.\[sweep\]"'):
        run_sweep([config], EvalSpec(str(tmp_path)), tmp_path / "out")


def test_evaluation_shards_sum_to_the_whole_run(resnet20, cifar_test):
    whole = onnxdfq.evaluate(str(resnet20), str(cifar_test), mean=CIFAR_MEAN, std=CIFAR_STD, limit=250)
    parts = [onnxdfq.evaluate(str(resnet20), str(cifar_test), mean=CIFAR_MEAN, std=CIFAR_STD, limit=stop - start,
                              offset=start) for start, stop in shard_ranges(250, 100, 100)]
    combined = combine_shards([ShardCounts(p.correct1, p.correct5, p.count) for p in parts])
    assert (combined["correct1"], combined["samples"], combined["top1"]) == (whole.correct1, 250, whole.top1)


# --- on Ray ------------------------------------------------------------------------------------------------------

def sweep_cli(*args, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """The installed command (not `python -m`, which would import an onnxdfq in `cwd` in the driver too)."""
    return subprocess.run([str(Path(sys.executable).parent / "onnxdfq"), "sweep", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, timeout=600,
                          env={**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})})


@pytest.fixture(scope="module")
def two_config_sweep(resnet20, cifar_test, tmp_path_factory):
    """nearest and squant W4A8 on the first 300 test images, in 100-image shards, on a local Ray."""
    pytest.importorskip("ray")
    out = tmp_path_factory.mktemp("sweep")
    args = (resnet20, "--method", "nearest,squant", "--bits", "4", "--act-bits", "8", "--data", cifar_test,
            "--mean", MEAN, "--std", STD, "--limit", 300, "--shard-size", 100, "--latency-runs", 2, "--workers", 2,
            "-o", out)
    proc = sweep_cli(*args)
    assert proc.returncode == 0, proc.stderr
    return out, args


@pytest.mark.slow
def test_sweep_rows_equal_evaluate_on_the_written_files(two_config_sweep, cifar_test):
    out, _ = two_config_sweep
    results = json.loads((out / "results.json").read_text())
    assert [row["key"] for row in results["rows"]] == ["resnet20 nearest W4A8 channel", "resnet20 squant W4A8 channel"]
    for row in results["rows"]:
        assert row["error"] is None
        direct = onnxdfq.evaluate(str(out / row["file"]), str(cifar_test), mean=CIFAR_MEAN, std=CIFAR_STD, limit=300)
        assert (row["top1"], row["top5"], row["correct1"], row["samples"]) == (direct.top1, direct.top5,
                                                                                direct.correct1, 300)
        assert row["packed_bytes"] < row["bytes"] < row["fp32_bytes"] and row["latency_ratio"] > 0
    assert "Pareto front" in (out / "results.html").read_text() and (out / "results.md").exists()


@pytest.mark.slow
def test_a_second_run_recomputes_nothing(two_config_sweep):
    out, args = two_config_sweep
    before = (out / "results.json").read_text()
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "models").iterdir()}
    proc = sweep_cli(*args)
    assert proc.returncode == 0, proc.stderr
    assert "2 config(s) already" in proc.stderr
    after = json.loads((out / "results.json").read_text())
    assert after["rows"] == json.loads(before)["rows"]
    assert stamps == {p.name: p.stat().st_mtime_ns for p in (out / "models").iterdir()}


def test_a_failing_config_is_a_row_and_the_sweep_goes_on(resnet20, cifar_test, tmp_path):
    """(11-14 s here, most of it Ray starting and stopping: not marked slow.)"""
    pytest.importorskip("ray")
    (tmp_path / "broken.onnx").write_bytes(b"not an onnx file")
    decoy = tmp_path / "onnxdfq"  # run from a folder with another onnxdfq: the workers must not import it
    decoy.mkdir()
    (decoy / "__init__.py").write_text("raise ImportError('the decoy onnxdfq in the current directory')\n")
    out = tmp_path / "out"
    proc = sweep_cli("broken.onnx", resnet20, "--method", "nearest", "--bits", "8", "--data", cifar_test, "--mean",
                     MEAN, "--std", STD, "--limit", 100, "--latency-runs", 0, "--workers", 2, "-o", "out",
                     cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = {row["model"]: row for row in json.loads((out / "results.json").read_text())["rows"]}
    assert rows["broken"]["error"] and "top1" not in rows["broken"]
    assert rows["resnet20"]["error"] is None and rows["resnet20"]["samples"] == 100
    assert "1 failed" in proc.stderr


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture()
def ray_head(tmp_path):
    """A Ray head on 127.0.0.1 (its own process group, ended in teardown): its address, and the environment
    a driver needs for it (Ray >= 2.5x clusters authenticate with a token; this one gets its own)."""
    pytest.importorskip("ray")
    port = _free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    ray_cli = Path(sys.executable).parent / "ray"
    log = (tmp_path / "ray_head.log").open("w")
    head = subprocess.Popen([str(ray_cli), "start", "--head", "--block", f"--port={port}",
                             "--node-ip-address=127.0.0.1", "--num-cpus=2", "--include-dashboard=false",
                             "--disable-usage-stats"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env=env)
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:  # ready when a driver can connect
            probe = subprocess.run([sys.executable, "-c", f"import ray; ray.init(address={address!r}); ray.shutdown()"],
                                   capture_output=True, timeout=60, env=env)
            if probe.returncode == 0 or time.monotonic() > deadline or head.poll() is not None:
                break
            time.sleep(1)
        assert probe.returncode == 0, probe.stderr.decode()[-2000:]
        yield address, env
    finally:
        # the head and every process it started (they stay in its group). A graceful stop drains for up to
        # 30 s; killing is enough here, but then the head's /tmp/ray/ray_current_cluster stays behind, and a
        # later ray.init() without an address would try to join that dead cluster: remove it if it is ours
        os.killpg(head.pid, 9)
        head.wait(timeout=30)
        current = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
        if current.exists() and current.read_text().strip().endswith(f":{port}"):  # it may name another local IP
            current.unlink()
            head.wait()
        log.close()
        current = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"  # left behind: a plain ray.init()
        if current.exists() and current.read_text().strip().endswith(f":{port}"):  # would try the dead head
            current.unlink()


@pytest.mark.slow
def test_the_sweep_runs_on_a_cluster_through_address(ray_head, resnet20, cifar_test, tmp_path):
    address, env = ray_head
    out = tmp_path / "out"
    proc = sweep_cli(resnet20, "--method", "nearest", "--bits", "8", "--data", cifar_test, "--mean", MEAN, "--std",
                     STD, "--limit", 200, "--latency-runs", 0, "--address", address, "-o", out, env=env)
    assert proc.returncode == 0, proc.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["meta"]["ray"]["address"] == address
    row = results["rows"][0]
    direct = onnxdfq.evaluate(str(out / row["file"]), str(cifar_test), mean=CIFAR_MEAN, std=CIFAR_STD, limit=200)
    assert row["error"] is None and row["top1"] == direct.top1


def test_config_options_name_the_row_and_the_file():
    config = SweepConfig("m/resnet20.onnx", "nearest", "4", "8", "channel", (("bias_correction", True),))
    assert config.key == "resnet20 nearest +bias_correction W4A8 channel"
    assert config.file_name == "resnet20.nearest.+bias_correction.w4a8.channel.onnx"
    assert SweepConfig("m/resnet20.onnx", "nearest", "4", "8", "channel").key == "resnet20 nearest W4A8 channel"


def test_per_model_data_options_and_latency_alone(resnet20, cifar_test, tmp_path):
    """The benchmark's way of running a sweep (tools/bench.py): each model scored on its own data, rows with
    extra quantize_model options, latency measured with the node to itself until two ratios agree."""
    pytest.importorskip("ray")
    from onnxdfq.sweep import EvalSpec, run_sweep

    twin = tmp_path / "twin20.onnx"  # a second model name with its own data spec (a shorter --limit)
    twin.write_bytes(Path(resnet20).read_bytes())
    configs = [SweepConfig(str(resnet20), "nearest", "4", "8", "channel", (("bias_correction", True),)),
               SweepConfig(str(twin), "nearest", "8", "8", "channel")]
    specs = {"resnet20": EvalSpec(str(cifar_test), CIFAR_MEAN, CIFAR_STD, limit=200),
             "twin20": EvalSpec(str(cifar_test), CIFAR_MEAN, CIFAR_STD, limit=100)}
    results = run_sweep(configs, specs, tmp_path / "out", workers=2, latency_runs=2, latency_alone=True,
                        latency_tolerance=0.5)
    rows = {row["model"]: row for row in results["rows"]}
    assert rows["resnet20"]["key"] == "resnet20 nearest +bias_correction W4A8 channel"
    for name, limit in (("resnet20", 200), ("twin20", 100)):
        row = rows[name]
        assert row["error"] is None and row["samples"] == limit and row["latency_ratio"] > 0
        direct = onnxdfq.evaluate(str(tmp_path / "out" / row["file"]), str(cifar_test), mean=CIFAR_MEAN,
                                  std=CIFAR_STD, limit=limit)
        assert row["correct1"] == direct.correct1
    # the option reached quantize_model: the file is the one the API writes with it
    with_bc = onnxdfq.quantize_model(resnet20, method="nearest", bits=4, act_bits=8, bias_correction=True,
                                     mean=CIFAR_MEAN, std=CIFAR_STD).model
    written = onnx.load(str(tmp_path / "out" / rows["resnet20"]["file"]))
    assert {i.name: i.raw_data for i in written.graph.initializer} == \
        {i.name: i.raw_data for i in with_bc.graph.initializer}
    with pytest.raises(OptionError, match="no evaluation data for twin20"):
        run_sweep(configs, {"resnet20": specs["resnet20"]}, tmp_path / "other")


def test_grid_expands_auto_widths_per_budget():
    configs, skipped = expand_grid(["a/r20.onnx"], ["squant", "dfmpc"], ["4", "auto"], ["8"],
                                   budgets=[("avg_bits", 4.5), ("size_budget", 0.2)])
    keys = [c.key for c in configs]
    assert keys == ["r20 squant W4A8 channel", "r20 squant avg_bits=4.5 WautoA8 channel",
                    "r20 squant size_budget=0.2 WautoA8 channel"]
    assert len({c.file_name for c in configs}) == 3
    assert any("dfmpc" in key for key, _ in skipped)
    with pytest.raises(OptionError, match="needs budgets"):
        expand_grid(["a/r20.onnx"], ["squant"], ["auto"], ["8"])


def test_grid_expands_activation_budgets():
    configs, skipped = expand_grid(["a/r20.onnx"], ["squant"], ["8"], ["8", "none"], act_budgets=[5.0, 6.0])
    assert [c.key for c in configs] == ["r20 squant avg_act_bits=5.0 W8A8 channel",
                                        "r20 squant avg_act_bits=6.0 W8A8 channel", "r20 squant W8Anone channel"]
    _, skipped = expand_grid(["a/r20.onnx"], ["squant"], ["8"], ["4"], act_budgets=[5.0])
    assert skipped and "above 4" in skipped[0][1]


def test_a_size_budget_row_reports_the_packed_file_it_wrote(tmp_path):
    from onnxdfq.sweep import quantize_task

    demo = str(Path(onnxdfq.__file__).parent / "data" / "resnet20_cifar10.onnx")
    config = SweepConfig(demo, "squant", "auto", "8", "channel", (("size_budget", 0.17), ("sensitivity", "proxy")))
    row = quantize_task(config, str(tmp_path / config.file_name), CIFAR_MEAN, CIFAR_STD)
    assert "error" not in row, row
    assert row["packed_bytes"] == row["bytes"] == (tmp_path / config.file_name).stat().st_size
    assert row["bytes"] <= 0.17 * Path(demo).stat().st_size


def test_rows_name_the_budget_they_were_planned_under():
    from onnxdfq.sweep_report import _label

    assert _label({"bits": "auto", "act_bits": "8", "options": {"avg_bits": 4.5}}) == "WautoA8 avg-bits 4.5"
    assert _label({"bits": "8", "act_bits": "8", "options": {"avg_act_bits": 6.0}}) == "W8A8 avg-act-bits 6"
    assert _label({"bits": "4", "act_bits": "none"}) == "W4Afp32"
