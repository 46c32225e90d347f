"""`onnxdfq report`: the HTML page shows exactly what the JSON report holds."""

from __future__ import annotations

import json
import subprocess
import sys
from html.parser import HTMLParser

import numpy as np
import pytest

import onnxdfq
from onnxdfq.report_html import render_report


class _Elements(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.items: list[tuple[str, dict[str, str]]] = []

    def handle_starttag(self, tag, attrs):
        self.items.append((tag, {k: v or "" for k, v in attrs}))

    def find(self, tag: str, cls: str) -> list[dict[str, str]]:
        return [a for t, a in self.items if t == tag and a.get("class") == cls]


def _parse(page: str) -> _Elements:
    parser = _Elements()
    parser.feed(page)
    return parser


@pytest.fixture(scope="module")
def dfq_report(mobilenet):
    return onnxdfq.quantize_model(mobilenet, method="dfq", bits=6, act_bits=8, granularity="tensor").report


def test_charts_carry_the_report_numbers(dfq_report):
    page = _parse(render_report(dfq_report))
    layers = dfq_report["layers"]
    bars = {a["data-layer"]: a for a in page.find("rect", "sqnr")}
    assert set(bars) == set(layers)
    for name, attrs in bars.items():
        assert float(attrs["data-sqnr"]) == pytest.approx(layers[name]["weight_sqnr_db"])
        assert int(attrs["data-bits"]) == layers[name]["bits"] == 6
    acts = {a["data-tensor"]: a["data-source"] for a in page.find("g", "act")}
    assert acts == {k: v["source"] for k, v in dfq_report["activations"].items()}


def test_weight_range_chart_shows_cle_narrowing_mobilenet(dfq_report):
    page = _parse(render_report(dfq_report))
    spread = {(a["data-layer"], a["data-stage"]): float(a["data-spread"]) for a in page.find("g", "wr")}
    ranges = dfq_report["weight_ranges"]
    assert {layer for layer, _ in spread} == set(ranges["final"])
    top = max(max(v) for stage in ranges.values() for v in stage.values())
    for (layer, stage), value in spread.items():
        channel = np.asarray(ranges[stage][layer])
        assert value == pytest.approx(channel.max() / max(channel.min(), top * 1e-6), rel=1e-5)
    # CLE exists to shrink the channel spread: the median layer's live-channel spread must fall
    live = {stage: [np.max(v) / np.min(np.asarray(v)[np.asarray(v) > 1e-6 * np.max(v)])
                    for v in ranges[stage].values()] for stage in ("folded", "final")}
    assert np.median(live["final"]) < 0.5 * np.median(live["folded"])


def test_cli_report_roundtrip_and_bad_input(resnet20, tmp_path):
    cli = [sys.executable, "-m", "onnxdfq.cli"]
    report_json, page = tmp_path / "r.json", tmp_path / "r.html"
    subprocess.run(cli + ["quantize", str(resnet20), "-o", str(tmp_path / "q.onnx"), "--bits", "4", "--report",
                          str(report_json), "-q"], check=True)
    proc = subprocess.run(cli + ["report", str(report_json), "-o", str(page)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    parsed = _parse(page.read_text())
    assert len(parsed.find("rect", "sqnr")) == len(json.loads(report_json.read_text())["layers"]) == 20
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    proc = subprocess.run(cli + ["report", str(bad), "-o", str(tmp_path / "x.html")], capture_output=True, text=True)
    assert proc.returncode == 2 and "not a JSON report" in proc.stderr and not (tmp_path / "x.html").exists()
