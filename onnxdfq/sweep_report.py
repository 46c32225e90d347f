"""A sweep's results.json as a Markdown table and an HTML page (accuracy vs size per model, inline SVG).

Pure rendering: dicts in, text out; `pareto_front` is the one decision made here (which configs no
other config beats on both size and top-1).
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from typing import Any

__all__ = ["pareto_front", "render_markdown", "render_html", "row_size"]

# the SVG plot's geometry, in pixels
WIDTH, HEIGHT, MARGIN = 640, 360, 56


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points (size, accuracy) that no other point dominates, by increasing size.

    A point is dominated when another is no larger and no less accurate, and strictly better in one.
    Equal points are all on the front.
    """
    front = []
    for i, (size, acc) in enumerate(points):
        dominated = any(s <= size and a >= acc and (s < size or a > acc)
                        for j, (s, a) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: (points[i][0], -points[i][1]))


def row_size(row: dict[str, Any]) -> int | None:
    """The size a deployment stores: the packed file when the weights pack (<= 4 bits), else the file."""
    return row.get("packed_bytes") or row.get("bytes")


def _mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:.3f}"


def _label(row: dict[str, Any]) -> str:
    act = "fp32" if row["act_bits"] == "none" else row["act_bits"]
    budgets = "".join(f" {key.replace('_', '-')} {value:g}" for key, value in row.get("options", {}).items()
                      if key in ("avg_bits", "size_budget", "avg_act_bits"))  # which budget a row was planned under
    return f"W{row['bits']}A{act}{budgets}"


def _ok(rows: list[dict]) -> list[dict]:
    return [row for row in rows if not row.get("error")]


def render_markdown(results: dict[str, Any]) -> str:
    meta, rows, fp32 = results.get("meta", {}), results.get("rows", []), results.get("fp32", {})
    data = meta.get("eval", {})
    limit = data.get("limit")
    out = ["# Sweep results", "",
           f"Data: `{data.get('data')}`{f' (first {limit} samples)' if limit else ''}; top-1/top-5 in percent, "
           "each the exact count over all evaluation shards. Size: the QDQ .onnx; packed: the same with INT4 "
           "weight initializers (`--format qdq-packed`) where the weights have <= 4 bits. Latency ratio: "
           "quantized / FP32 median latency at batch 1 (onnxruntime CPU, one thread, taking turns; below 1 is "
           "faster).", ""]
    if fp32:
        out += ["| model | FP32 top-1 | top-5 | samples | size MB |", "|---|---:|---:|---:|---:|"]
        for name, ref in fp32.items():
            if ref.get("error"):
                out.append(f"| {name} | error: {ref['error']} | | | |")
            else:
                out.append(f"| {name} | {ref['top1']:.2f} | {ref['top5']:.2f} | {ref['samples']} | "
                           f"{_mb(ref.get('bytes'))} |")
        out.append("")
    out += ["| model | method | W/A | granularity | top-1 | vs FP32 | top-5 | quantize s | size MB | packed MB "
            "| latency ratio |", "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        head = f"| {row['model']} | {row['method']} | {_label(row)} | {row['granularity']} |"
        if row.get("error"):
            out.append(f"{head} error: {row['error'].replace('|', '/')} | | | | | | |")
            continue
        delta = "-" if row.get("fp32_top1") is None else f"{row['top1'] - row['fp32_top1']:+.2f}"
        ratio = "-" if row.get("latency_ratio") is None else f"{row['latency_ratio']:.2f}"
        out.append(f"{head} {row['top1']:.2f} | {delta} | {row['top5']:.2f} | {row['quantize_s']:.2f} | "
                   f"{_mb(row['bytes'])} | {_mb(row.get('packed_bytes'))} | {ratio} |")
    return "\n".join(out) + "\n"


def _scale(lo: float, hi: float, span: tuple[float, float]):
    if hi <= lo:
        lo, hi = lo - 1, hi + 1
    return lambda v: span[0] + (v - lo) / (hi - lo) * (span[1] - span[0])


def _plot(name: str, rows: list[dict], fp32: dict[str, Any]) -> str:
    """One model's accuracy (y) against log size (x); the Pareto front joined and filled."""
    points = [(float(row_size(row)), float(row["top1"])) for row in rows]
    front = pareto_front(points)
    sizes = [p[0] for p in points] + ([fp32["bytes"]] if fp32.get("bytes") else [])
    accs = [p[1] for p in points] + ([fp32["top1"]] if fp32.get("top1") is not None else [])
    x = _scale(math.log10(min(sizes)) - 0.05, math.log10(max(sizes)) + 0.05, (MARGIN, WIDTH - 20))
    y = _scale(min(accs) - 1, max(accs) + 1, (HEIGHT - MARGIN, 20))
    svg = [f'<svg width="{WIDTH}" height="{HEIGHT}" xmlns="http://www.w3.org/2000/svg" font-size="11">',
           f'<line x1="{MARGIN}" y1="{HEIGHT - MARGIN}" x2="{WIDTH - 20}" y2="{HEIGHT - MARGIN}" stroke="black"/>',
           f'<line x1="{MARGIN}" y1="20" x2="{MARGIN}" y2="{HEIGHT - MARGIN}" stroke="black"/>',
           f'<text x="{WIDTH / 2}" y="{HEIGHT - 14}" text-anchor="middle">size MB (log; packed where the weights '
           'pack)</text>',
           f'<text x="14" y="{HEIGHT / 2}" transform="rotate(-90 14 {HEIGHT / 2})" text-anchor="middle">'
           'top-1 %</text>']
    for value in (min(accs), max(accs)):
        svg.append(f'<text x="{MARGIN - 4}" y="{y(value) + 4:.1f}" text-anchor="end">{value:.1f}</text>')
    for value in (min(sizes), max(sizes)):
        svg.append(f'<text x="{x(math.log10(value)):.1f}" y="{HEIGHT - MARGIN + 14}" text-anchor="middle">'
                   f'{value / 1e6:.3f}</text>')
    if fp32.get("top1") is not None:
        svg.append(f'<line x1="{MARGIN}" x2="{WIDTH - 20}" y1="{y(fp32["top1"]):.1f}" y2="{y(fp32["top1"]):.1f}" '
                   f'stroke="gray" stroke-dasharray="4 3"/><text x="{WIDTH - 22}" y="{y(fp32["top1"]) - 4:.1f}" '
                   f'text-anchor="end" fill="gray">FP32 {fp32["top1"]:.2f}</text>')
    line = " ".join(f"{x(math.log10(points[i][0])):.1f},{y(points[i][1]):.1f}" for i in front)
    svg.append(f'<polyline points="{line}" fill="none" stroke="#c33" stroke-width="1.5"/>')
    for i, row in enumerate(rows):
        cx, cy = x(math.log10(points[i][0])), y(points[i][1])
        on_front = i in front
        title = html.escape(f"{row['method']} {_label(row)} {row['granularity']}: top-1 {row['top1']:.2f}, "
                            f"{points[i][0] / 1e6:.3f} MB{' (Pareto front)' if on_front else ''}")
        svg.append(f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="4" fill="{"#c33" if on_front else "white"}" '
                   f'stroke="#c33"><title>{title}</title></circle>'
                   f'<text x="{cx + 6:.1f}" y="{cy - 5:.1f}">{html.escape(row["method"] + " " + _label(row))}</text>')
    svg.append("</svg>")
    return f"<h2>{html.escape(name)}</h2>\n" + "\n".join(svg)


def render_html(results: dict[str, Any]) -> str:
    """A self-contained page: per model, accuracy vs size with the Pareto front (filled, joined)."""
    rows = _ok(results.get("rows", []))
    by_model: dict[str, list[dict]] = {}
    for row in rows:
        if row_size(row):
            by_model.setdefault(row["model"], []).append(row)
    body = [_plot(name, model_rows, results.get("fp32", {}).get(name, {})) for name, model_rows in by_model.items()]
    failed = len(results.get("rows", [])) - len(rows)
    note = f"<p>{failed} config(s) failed; see results.md.</p>" if failed else ""
    return ("<!doctype html><html><head><meta charset='utf-8'><title>onnxdfq sweep</title></head><body>"
            "<h1>onnxdfq sweep: top-1 vs size</h1><p>Filled points joined in red: the Pareto front (no other "
            "config is both smaller and more accurate). Dashed: FP32.</p>" + note + "\n".join(body)
            + "</body></html>\n")
