"""Time the DFQ passes (CLE, high-bias absorption, analytic bias correction) on the shared models.

    python tools/bench_dfq.py [--repeats 3] [--out tools/results]

Loading, BN folding and weight quantization are set up outside the timed region; each pass is
timed by its own PassReport (wall time of `call`), best of `repeats` fresh runs. Writes
dfq_bench.md to the output folder.
"""

from __future__ import annotations

import argparse
import os
import platform
from pathlib import Path

import onnx

from onnxdfq.graph import io as graph_io
from onnxdfq.graph import layers as graph_layers
from onnxdfq.graph import surgery
from onnxdfq.passes.base import Workspace
from onnxdfq.passes.bias_absorption import BiasAbsorptionPass
from onnxdfq.passes.bias_correction import AnalyticBiasCorrectionPass
from onnxdfq.passes.cle import CrossLayerEqualizationPass
from onnxdfq.passes.fold_bn import FoldBatchNormPass
from onnxdfq.passes.weight_quant import WeightQuantPass
from onnxdfq.quant.scheme import BitWidthMap

ASSETS = Path(__file__).resolve().parents[2] / "shared" / "assets"
MODELS = {
    "MobileNet-V1 0.75": ASSETS / "imagenet" / "mobilenet_v1_0.75.onnx",
    "ResNet-56": ASSETS / "cifar10" / "resnet56.onnx",
}
TARGET_S = 1.0  # the three passes together, per model


def run_once(model: onnx.ModelProto) -> dict[str, float | int]:
    ws = Workspace(graph=surgery.import_graph(model))
    graph_layers.ensure_node_names(ws.graph)
    FoldBatchNormPass()(ws)
    cle = CrossLayerEqualizationPass()(ws)
    absorb = BiasAbsorptionPass()(ws)
    WeightQuantPass(BitWidthMap(8), per_channel=False)(ws)
    correct = AnalyticBiasCorrectionPass()(ws)
    return {"cle": cle.seconds, "absorb": absorb.seconds, "correct": correct.seconds,
            "total": cle.seconds + absorb.seconds + correct.seconds, "pairs": cle.params["pairs"],
            "sweeps": cle.params["sweeps"], "absorbed": absorb.params["absorbed_pairs"],
            "corrected": correct.params["corrected"], "skipped": correct.params["skipped"]}


def bench(path: Path, repeats: int) -> dict[str, float | int]:
    model = graph_io.prepare_model(graph_io.load_model(path))
    runs = [run_once(model) for _ in range(repeats)]
    best = dict(runs[0])
    for key in ("cle", "absorb", "correct", "total"):
        best[key] = min(run[key] for run in runs)
    return best


def to_markdown(results: dict[str, dict[str, float | int]], repeats: int) -> str:
    lines = [
        "# DFQ pass timings",
        "",
        f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores visible, load average "
        f"{os.getloadavg()[0]:.1f} (other jobs share the machine: times are upper bounds); "
        f"best of {repeats} runs; target: CLE + absorption + correction well under {TARGET_S:.0f} s.",
        "",
        "| model | CLE ms | absorption ms | bias correction ms | total ms | pairs | sweeps | absorbed "
        "| corrected / skipped |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in results.items():
        lines.append(f"| {name} | {1000 * row['cle']:.1f} | {1000 * row['absorb']:.1f} | {1000 * row['correct']:.1f} "
                     f"| {1000 * row['total']:.1f} | {row['pairs']} | {row['sweeps']} | {row['absorbed']} "
                     f"| {row['corrected']} / {row['skipped']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args()
    results = {name: bench(path, args.repeats) for name, path in MODELS.items() if path.exists()}
    if not results:
        raise SystemExit(f"no model found under {ASSETS}")
    text = to_markdown(results, args.repeats)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "dfq_bench.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
