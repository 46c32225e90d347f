"""A self-contained HTML page (inline SVG, no scripts, no dependencies) from a `quantize --report` JSON.

Three pictures a user looks at before trusting a quantized model: per-channel weight ranges of
every layer before and after cross-layer equalization, per-layer weight SQNR with its bit width,
and every activation range with where it came from (BN statistics, propagation, calibration).
"""

from __future__ import annotations

import html
import math
from typing import Any

__all__ = ["render_report"]

BIT_COLORS = {2: "#d62728", 3: "#ff7f0e", 4: "#bcbd22", 5: "#17becf", 6: "#2ca02c", 7: "#1f77b4", 8: "#4c4c9d"}
SOURCE_COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]
WIDTH, HEIGHT, PAD_L, PAD_B, PAD_T = 960, 280, 60, 90, 16
STYLE = """body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1000px}
table{border-collapse:collapse;font-size:13px;margin:8px 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}.warn{color:#a40}
svg text{font-size:11px;fill:#333}.legend span{display:inline-block;width:12px;height:12px;margin:0 4px 0 12px}"""


def _esc(value: Any) -> str:
    return html.escape(str(value))


def _fmt(value: Any, digits: int = 3) -> str:
    if isinstance(value, float):
        return f"{value:.{digits}g}" if math.isfinite(value) else str(value)
    return _esc(value)


def _axis_labels(names: list[str], x_of, step: float) -> str:
    every = max(1, math.ceil(len(names) / 60))  # at most ~60 labels
    return "".join(
        f'<text transform="translate({x_of(i) + step / 2:.1f},{HEIGHT - PAD_B + 6}) rotate(60)">{_esc(n[:24])}</text>'
        for i, n in enumerate(names) if i % every == 0)


def _log_y(lo: float, hi: float):
    span = math.log10(hi) - math.log10(lo)
    return lambda v: PAD_T + (HEIGHT - PAD_B - PAD_T) * (1 - (math.log10(max(v, lo)) - math.log10(lo)) / span)


def _weight_range_chart(ranges: dict[str, dict[str, list[float]]]) -> str:
    """Per layer: min..max of the per-channel max|w| (log scale), folded (grey) and final (blue)."""
    final = ranges.get("final", {})
    names = list(final)
    if not names:
        return "<p>No weight ranges in this report.</p>"
    stages = [("folded", "#999"), ("final", "#1f77b4")]
    top = max(max(v) for stage, _ in stages for v in ranges.get(stage, {}).values() if v)
    floor = top * 1e-6
    y = _log_y(floor, top * 1.5)
    step = (WIDTH - PAD_L - 10) / len(names)
    parts = []
    for i, name in enumerate(names):
        for k, (stage, color) in enumerate(stages):
            values = sorted(v for v in ranges.get(stage, {}).get(name, []))
            if not values:
                continue
            x = PAD_L + i * step + step * (0.3 + 0.4 * k)
            low, mid, high = values[0], values[len(values) // 2], values[-1]
            parts.append(f'<g class="wr" data-layer="{_esc(name)}" data-stage="{stage}" data-spread="'
                         f'{high / max(low, floor):.6g}"><title>{_esc(name)} ({stage}): channel ranges '
                         f'{low:.3g} .. {high:.3g}, median {mid:.3g}</title>'
                         f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{y(low):.1f}" y2="{y(high):.1f}" stroke="{color}" '
                         f'stroke-width="{max(1.5, step * 0.3):.1f}"/>'
                         f'<line x1="{x - step * 0.2:.1f}" x2="{x + step * 0.2:.1f}" y1="{y(mid):.1f}" '
                         f'y2="{y(mid):.1f}" stroke="#000"/></g>')
    ticks = "".join(f'<text x="4" y="{y(10.0 ** e) + 4:.1f}">1e{e}</text>'
                    f'<line x1="{PAD_L}" x2="{WIDTH}" y1="{y(10.0 ** e):.1f}" y2="{y(10.0 ** e):.1f}" stroke="#eee"/>'
                    for e in range(math.ceil(math.log10(floor)), math.floor(math.log10(top * 1.5)) + 1))
    return (f'<svg width="{WIDTH}" height="{HEIGHT}" role="img">{ticks}{"".join(parts)}'
            f'{_axis_labels(names, lambda i: PAD_L + i * step, step)}</svg>'
            '<div class="legend"><span style="background:#999"></span>after BN folding'
            '<span style="background:#1f77b4"></span>as quantized (after CLE / absorption when enabled)'
            ' &nbsp; bar: smallest to largest per-channel max|w|, tick: median</div>')


def _sqnr_chart(layers: dict[str, dict]) -> str:
    names = [n for n, v in layers.items() if isinstance(v.get("weight_sqnr_db"), (int, float))]
    if not names:
        return "<p>No weight SQNR in this report.</p>"
    top = max(max(layers[n]["weight_sqnr_db"] for n in names), 1.0) * 1.1
    step = (WIDTH - PAD_L - 10) / len(names)

    def y(v: float) -> float:
        return PAD_T + (HEIGHT - PAD_B - PAD_T) * (1 - max(v, 0.0) / top)

    bars = []
    for i, name in enumerate(names):
        sqnr, bits = layers[name]["weight_sqnr_db"], layers[name].get("bits")
        x = PAD_L + i * step
        bars.append(f'<rect class="sqnr" data-layer="{_esc(name)}" data-sqnr="{sqnr}" data-bits="{bits}" '
                    f'x="{x + step * 0.1:.1f}" y="{y(sqnr):.1f}" width="{step * 0.8:.1f}" '
                    f'height="{y(0) - y(sqnr):.1f}" fill="{BIT_COLORS.get(bits, "#777")}">'
                    f'<title>{_esc(name)}: {sqnr:.1f} dB at {bits} bits</title></rect>')
    ticks = "".join(f'<text x="4" y="{y(v) + 4:.1f}">{v:.0f} dB</text>'
                    f'<line x1="{PAD_L}" x2="{WIDTH}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="#eee"/>'
                    for v in range(0, int(top) + 1, 10))
    used = sorted({layers[n].get("bits") for n in names if layers[n].get("bits") in BIT_COLORS})
    legend = "".join(f'<span style="background:{BIT_COLORS[b]}"></span>{b}-bit' for b in used)
    return (f'<svg width="{WIDTH}" height="{HEIGHT}" role="img">{ticks}{"".join(bars)}'
            f'{_axis_labels(names, lambda i: PAD_L + i * step, step)}</svg><div class="legend">{legend}</div>')


def _activation_chart(activations: dict[str, dict]) -> str:
    names = list(activations)
    if not names:
        return "<p>Float activations: no activation ranges.</p>"
    sources = sorted({a["source"] for a in activations.values()})
    colors = {s: SOURCE_COLORS[i % len(SOURCE_COLORS)] for i, s in enumerate(sources)}
    lo = min(min(a["lo"] for a in activations.values()), 0.0)
    hi = max(max(a["hi"] for a in activations.values()), 1e-6)
    row_h = 12
    height = PAD_T + row_h * len(names) + 30
    left, right = 230, WIDTH - 20

    def x(v: float) -> float:
        return left + (right - left) * (v - lo) / (hi - lo)

    rows = []
    for i, name in enumerate(names):
        a = activations[name]
        top = PAD_T + i * row_h
        rows.append(f'<g class="act" data-tensor="{_esc(name)}" data-source="{_esc(a["source"])}">'
                    f'<text x="4" y="{top + 9}">{_esc(name[:36])}</text>'
                    f'<rect x="{x(a["lo"]):.1f}" y="{top + 1}" width="{max(x(a["hi"]) - x(a["lo"]), 1):.1f}" '
                    f'height="{row_h - 3}" fill="{colors[a["source"]]}"><title>{_esc(name)}: '
                    f'[{a["lo"]:.4g}, {a["hi"]:.4g}] from {_esc(a["source"])}</title></rect></g>')
    zero = f'<line x1="{x(0):.1f}" x2="{x(0):.1f}" y1="{PAD_T}" y2="{height - 24}" stroke="#000"/>'
    scale = (f'<text x="{left}" y="{height - 8}">{lo:.3g}</text>'
             f'<text x="{right - 40}" y="{height - 8}">{hi:.3g}</text>')
    legend = "".join(f'<span style="background:{colors[s]}"></span>{_esc(s)}' for s in sources)
    return (f'<svg width="{WIDTH}" height="{height}" role="img">{"".join(rows)}{zero}{scale}</svg>'
            f'<div class="legend">{legend}</div>')


def _pareto_chart(entry: dict[str, Any]) -> str:
    """--bits auto: the least summed output noise reachable at each size (log scale), the chosen plan in red."""
    params = entry["params"]
    front = [(p["size"], p["noise"]) for p in params.get("pareto", []) if p["noise"] > 0]
    if len(front) < 2:
        return "<p>No trade-off curve in this report.</p>"
    chosen = (params["chosen"]["size"], params["chosen"]["noise"])
    xs = [x for x, _ in front] + [chosen[0]]
    x_lo, x_hi = min(xs), max(xs)
    y = _log_y(min(n for _, n in front) / 1.5, max(n for _, n in front) * 1.5)

    def x(v: float) -> float:
        return PAD_L + (WIDTH - PAD_L - 20) * (v - x_lo) / max(x_hi - x_lo, 1e-12)

    unit = "average weight bits" if params["budget"] == "avg_bits" else "weight bytes in the file"
    line = " ".join(f"{x(a):.1f},{y(b):.1f}" for a, b in front)
    ticks = "".join(f'<text x="{x(v):.1f}" y="{HEIGHT - PAD_B + 16}" text-anchor="middle">{_fmt(float(v))}</text>'
                    for v in (x_lo + (x_hi - x_lo) * k / 4 for k in range(5)))
    return (f'<svg width="{WIDTH}" height="{HEIGHT}" role="img"><polyline points="{line}" fill="none" '
            f'stroke="#1f77b4" stroke-width="2"/><circle cx="{x(chosen[0]):.1f}" cy="{y(chosen[1]):.1f}" r="6" '
            f'fill="#d62728"/>{ticks}<text x="{WIDTH / 2}" y="{HEIGHT - PAD_B + 34}" text-anchor="middle">{unit}'
            f'</text><text x="4" y="{PAD_T + 10}">summed output noise (log)</text></svg>'
            f'<p>Chosen: {_fmt(float(chosen[0]))} ({unit}), noise {_fmt(float(chosen[1]))}; sensitivity '
            f'{_esc(params["sensitivity"])}.</p>')


def _allocation_section(report: dict[str, Any]) -> str:
    entry = next((p for p in report.get("passes", []) if p.get("name") == "bit_allocation"), None)
    if entry is None:
        return ""
    rows = [[name, row["params"], f"{row['bits']} (DF-MPC)" if row.get("dfmpc") else row["bits"],
             row["sensitivity"].get(str(row["bits"]), row["sensitivity"].get(row["bits"])),
             *(row["sensitivity"].get(str(b), row["sensitivity"].get(b)) for b in (2, 4, 8)),
             _first(row.get("dfmpc_sensitivity"))]
            for name, row in entry["layers"].items()]
    return ("<h2>Bit allocation (--bits auto)</h2><p>Each layer's sensitivity is the relative output noise it adds "
            "when quantized alone at a width; the widths minimise their sum under the budget. The curve is the "
            "trade-off between size and that sum; the red point is this file.</p>" + _pareto_chart(entry)
            + _table(["layer", "params", "bits", "sensitivity at its bits", "at 2 bits", "at 4 bits", "at 8 bits",
                      "DF-MPC pair at 2 bits (low layer compensated, high float)"], rows))


def _act_allocation_section(report: dict[str, Any]) -> str:
    entry = next((p for p in report.get("passes", []) if p.get("name") == "act_width_allocation"), None)
    if entry is None:
        return ""
    p = entry["params"]
    rows = [[name, row["elements"], row["act_bits"], *(row["act_sensitivity"].get(str(b), row["act_sensitivity"].get(b))
                                                       for b in p["widths"])]
            for name, row in entry["layers"].items()]
    return (f"<h2>Activation widths (--avg-act-bits {p['budget_avg_act_bits']:g})</h2><p>Each activation's "
            "sensitivity is the relative output noise it adds when it alone is quantized at a width (weights float); "
            f"the widths minimise their sum with {p['average_act_bits']:.2f} bits per element on average.</p>"
            + _table(["tensor", "elements per image", "bits", *(f"at {b} bits" for b in p["widths"])], rows))


def _first(values: dict | None) -> Any:
    return next(iter(values.values())) if values else None


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def render_report(report: dict[str, Any]) -> str:
    """The HTML page for one `quantize --report` JSON (a dict)."""
    cfg = report.get("config", {})
    layers = report.get("layers", {})
    bits = f"{cfg.get('bits')}" + (f"/{cfg['high_bits']}" if cfg.get("high_bits") else "")
    if cfg.get("auto_bits"):
        bits = f"auto (--avg-bits {cfg['avg_bits']:g})" if cfg.get("avg_bits") is not None else \
            f"auto (--size-budget {cfg['size_budget']:g})"
    fidelity = report.get("fidelity") or {}
    stats = report.get("statistics") or {}
    summary = [
        ["model", report.get("model", "")], ["method", cfg.get("method", "")], ["weight bits", bits],
        ["activation bits", cfg.get("act_bits") or "fp32"],
        ["granularity", "per-channel" if cfg.get("per_channel", True) else "per-tensor"],
        ["average weight bits", report.get("average_weight_bits")],
        ["activation range sources", ", ".join(f"{k}: {v}" for k, v in report.get("activation_sources", {}).items())
         or "-"],
        ["7-bit layers (reduce-range)", ", ".join(report.get("reduced_range_layers", [])) or "-"],
        ["layer statistics", f"BN on {stats['bn_layers']} of {stats['layers']} layers; sources "
         + ", ".join(f"{k}: {v}" for k, v in stats.get("layer_sources", {}).items()) if stats else "-"],
        ["fidelity inputs", fidelity.get("inputs", "-")],
        ["steps not run", ", ".join(f"{k} ({v})" for k, v in (report.get("skipped") or {}).get("steps", {}).items())
         or "-"],
        ["speed notes", " / ".join(report.get("speed_notes") or []) or "-"],
        ["quantize time s", report.get("timings_s", {}).get("total")],
        ["output", f"{report.get('output', '-')} ({report.get('output_bytes', 0) / 1e6:.2f} MB)"],
    ]
    layer_rows = [[name, v.get("bits"), "channel" if v.get("per_channel") else "tensor", v.get("weight_sqnr_db"),
                   v.get("scale_min"), v.get("scale_max"),
                   (f"{v['cle_scale_min']:.3g}..{v['cle_scale_max']:.3g}" if "cle_scale_min" in v else "-"),
                   "yes" if v.get("bias_corrected") else "-", v.get("storage", "int8")]
                  for name, v in layers.items()]
    warnings = "".join(f'<li class="warn">{_esc(w)}</li>' for w in report.get("warnings", []))
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>onnxdfq report: {_esc(report.get('model', ''))}"
        f"</title><style>{STYLE}</style></head><body><h1>onnxdfq quantization report</h1>"
        f"{_table(['', ''], summary)}"
        + ("<h2>Fidelity against FP32</h2>" + _table(
            ["output", "SQNR dB", "cosine", "top-1 agreement"],
            [[out["name"], out["sqnr_db"], out["cosine"], fidelity.get("top1_agreement") if i == 0 else None]
             for i, out in enumerate(fidelity.get("outputs", []))]) if fidelity.get("outputs") else "")
        + (f"<h2>Warnings</h2><ul>{warnings}</ul>" if warnings else "")
        + "<h2>Weight ranges per output channel</h2><p>Per-tensor and low-bit grids suffer when one layer's "
        "channels span orders of magnitude; cross-layer equalization narrows the bars.</p>"
        + _weight_range_chart(report.get("weight_ranges", {}))
        + _allocation_section(report)
        + _act_allocation_section(report)
        + "<h2>Weight SQNR per layer</h2>" + _sqnr_chart(layers)
        + "<h2>Activation ranges</h2>" + _activation_chart(report.get("activations", {}))
        + "<h2>Layers</h2>"
        + _table(["layer", "bits", "scale", "weight SQNR dB", "scale min", "scale max", "CLE scales",
                  "bias corrected", "storage"], layer_rows)
        + "</body></html>\n")
