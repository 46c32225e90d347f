"""The package's layers import only downwards: quant <- config <- graph <- passes/synth <- eval <- pipeline <- cli.

ruff enforces this per subpackage (each one's ruff.toml bans what lies above it); this test also covers the
top-level modules, which share one folder, and imports made inside functions.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "onnxdfq"
RANK = {"errors": 0, "data": 0,
        "quant": 1, "preprocessing": 1.5, "config": 2, "graph": 3, "passes": 4, "synth": 4, "eval": 5, "demo_models": 6,
        "report_html": 6, "sweep_report": 6, "pipeline": 7, "sweep": 7.5, "cli": 8, "__init__": 9, "__main__": 9}


def _layer(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return parts[0]


def _imported_layers(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "onnxdfq" and len(parts) > 1 and parts[1] in RANK:
                found.add(parts[1])
    return found


def test_imports_only_go_down():
    violations = []
    for path in sorted(PACKAGE.rglob("*.py")):
        layer = _layer(path)
        for imported in _imported_layers(path):
            if imported == layer:
                continue
            same_rank = RANK[imported] == RANK[layer]
            if RANK[imported] > RANK[layer] or same_rank:
                violations.append(f"{path.relative_to(PACKAGE)} imports onnxdfq.{imported}")
    assert not violations, "\n".join(violations)


def test_the_check_sees_a_violation(tmp_path):
    """The checker itself: an upward import is found."""
    probe = tmp_path / "probe.py"
    probe.write_text("import onnxdfq.graph.io\n\ndef f():\n    from onnxdfq.pipeline import quantize_model\n")
    assert _imported_layers(probe) == {"graph", "pipeline"}
