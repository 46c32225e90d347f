#!/usr/bin/env python3
"""Models as users have them: BN-folded copies of the shared models, data-free, next to the BN-kept files.

Each shared model is folded the way exporters and pre-processing tools fold it (onnxruntime's
basic graph optimization: BatchNormalization merged into the Conv), then quantized with the
default settings (``--calib auto``: BN statistics when the file kept them, the image prior
otherwise) and evaluated on the full labelled set. The prior's cost (image generation, the
statistics run and the range calibration) is the quantization time of the folded rows, measured
in the same run as the BN-kept one.

    python tools/bench_folded.py                 # writes tools/results/folded.md and folded.json
    python tools/bench_folded.py --limit 1000    # a quick look
    python tools/bench_folded.py --only efficientnet_lite0 --update   # re-run one model, keep the other rows

A second table, ``--study``, compares prior generators by the per-layer statistics they give
(distance to the true BN statistics of the BN-kept file) and by DF-MPC 2/6 top-1 on 2000 images.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

import onnxdfq
from onnxdfq.eval.runner import evaluate
from onnxdfq.eval.session import fold_batchnorm_copy

ROOT = Path(__file__).resolve().parents[1]
ASSETS = Path(os.environ.get("ONNXDFQ_ASSETS", ROOT.parent / "shared" / "assets"))
CIFAR = {"data": "cifar10/test.npz", "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
IMAGENET = {"data": "imagenet/val1300", "mean": [0.5] * 3, "std": [0.5] * 3}
LITE0 = {"data": "imagenet/val1300", "mean": [0.498] * 3, "std": [0.502] * 3}
MODELS = {"resnet56": ("cifar10/resnet56.onnx", CIFAR), "resnet20": ("cifar10/resnet20.onnx", CIFAR),
          "mobilenet_v1_0.75": ("imagenet/mobilenet_v1_0.75.onnx", IMAGENET),
          "efficientnet_lite0": ("imagenet/efficientnet_lite0.onnx", LITE0)}
# (model, method, bits, act_bits, granularity): the bars and a few neighbours; "default" is the
# method a user who names none gets (onnxdfq.config.DEFAULT_METHOD)
ROWS = [("resnet56", "nearest", "8", "8", "channel"), ("resnet56", "squant", "4", "8", "channel"),
        ("resnet56", "dfq", "8", "8", "tensor"), ("resnet56", "dfmpc", "2/6", "none", "channel"),
        ("resnet56", "nearest", "4", "4", "channel"),
        ("resnet20", "nearest", "8", "8", "channel"), ("resnet20", "squant", "4", "8", "channel"),
        ("resnet20", "dfmpc", "2/6", "none", "channel"), ("resnet20", "squant", "4", "4", "channel"),
        ("mobilenet_v1_0.75", "default", "8", "8", "channel"),
        ("mobilenet_v1_0.75", "nearest", "8", "8", "channel"), ("mobilenet_v1_0.75", "dfq", "8", "8", "tensor"),
        ("mobilenet_v1_0.75", "squant", "4", "8", "channel"), ("mobilenet_v1_0.75", "dfmpc", "4/8", "none", "channel"),
        ("efficientnet_lite0", "default", "8", "8", "channel"),
        ("efficientnet_lite0", "nearest", "8", "8", "channel"), ("efficientnet_lite0", "squant", "8", "8", "channel"),
        ("efficientnet_lite0", "dfq", "8", "8", "tensor"), ("efficientnet_lite0", "squant", "4", "8", "channel"),
        ("efficientnet_lite0", "dfmpc", "4/8", "none", "channel")]


def default_method() -> str:
    from onnxdfq import config

    return getattr(config, "DEFAULT_METHOD", "nearest")  # an older checkout (--out for a baseline) had nearest


def quantize_and_eval(path: Path, spec: dict, method: str, bits: str, act: str, gran: str,
                      limit: int | None, **options) -> dict:
    method = default_method() if method == "default" else method
    start = time.perf_counter()
    result = onnxdfq.quantize_model(str(path), method=method, bits=bits, act_bits=None if act == "none" else act,
                                    granularity=gran, mean=spec["mean"], std=spec["std"], check=False, **options)
    seconds = time.perf_counter() - start
    top1 = evaluate(result.model, str(ASSETS / spec["data"]), mean=spec["mean"], std=spec["std"],
                    batch_size=250, limit=limit).top1
    stats = result.report["statistics"]
    return {"top1": round(top1, 2), "quantize_s": round(seconds, 2), "source": stats["source"],
            "bn_layers": stats["bn_layers"], "layers": stats["layers"],
            "prior": stats.get("method") if stats["source"].startswith("prior") else None,
            "prior_s": stats.get("seconds") if stats["source"].startswith("prior") else None}


def bench(args) -> None:
    work = Path(tempfile.mkdtemp(prefix="onnxdfq-folded-"))
    out = ROOT / "tools" / "results"
    before_path = out / f"{args.before}.json"
    before = {_key(r): r for r in json.loads(before_path.read_text())["rows"]} if before_path.exists() else {}
    rows = []
    previous = {}
    if args.update and (out / f"{args.out}.json").exists():  # the rows not re-run stay as they were
        previous = {_key(r): r for r in json.loads((out / f"{args.out}.json").read_text())["rows"]}
    for model, method, bits, act, gran in ROWS:
        if args.only and model not in args.only:
            if (model, method, bits, act, gran) in previous:
                rows.append(previous[(model, method, bits, act, gran)])
            continue
        rel, spec = MODELS[model]
        folded = work / f"{model}_folded.onnx"
        if not folded.exists():
            fold_batchnorm_copy(str(ASSETS / rel), folded)
            left = sum(n.op_type == "BatchNormalization" for n in onnx.load(folded).graph.node)
            assert left == 0, f"{model}: {left} BN left after folding"
        kept = quantize_and_eval(ASSETS / rel, spec, method, bits, act, gran, args.limit)
        fold = quantize_and_eval(folded, spec, method, bits, act, gran, args.limit)
        row = {"model": model, "method": method, "resolved_method": default_method() if method == "default" else method,
               "bits": bits, "act": act, "granularity": gran, "kept": kept, "folded": fold}
        rows.append(row)
        print(json.dumps(row), flush=True)
    (out / f"{args.out}.json").write_text(json.dumps({"limit": args.limit, "rows": rows}, indent=1))
    lines = ["# BN-folded models, data-free (tools/bench_folded.py)", "",
             f"Full test sets{'' if args.limit is None else f' (first {args.limit})'}; onnxruntime CPU; "
             "folded with onnxruntime's basic graph optimization; default `--calib auto` "
             "(BN statistics when kept, the image prior otherwise). Quantize seconds (in-process, no output "
             "check) include the prior's image generation and statistics run (2-core machine, shared). "
             f"\"before\": the same rows in `{args.before}.json` (the code before the engine's rework)"
             + ("; \"default\" was nearest there" if any(r["method"] == "default" for r in rows) else "") + ".",
             "", "| model | method | W/A | weights | BN kept top-1 | folded top-1 | folded before | "
             "folded statistics | quantize s kept / folded |", "|---|---|---|---|---:|---:|---:|---|---:|"]
    for r in rows:
        a = "fp32" if r["act"] == "none" else r["act"]
        old = before.get(_key(r))
        before_cell = f"{old['folded']['top1']:.2f}" if old else "-"
        method = r["method"] + (f" ({r['resolved_method']})" if r["method"] == "default" else "")
        lines.append(f"| {r['model']} | {method} | W{r['bits']}A{a} | per-{r['granularity']} | "
                     f"{r['kept']['top1']:.2f} | {r['folded']['top1']:.2f} | {before_cell} | "
                     f"{r['folded']['source']}{'/' + r['folded']['prior'] if r['folded'].get('prior') else ''} "
                     f"({r['folded']['bn_layers']}/{r['folded']['layers']} BN) | "
                     f"{r['kept']['quantize_s']:.1f} / {r['folded']['quantize_s']:.1f} |")
    (out / f"{args.out}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _key(row: dict) -> tuple:
    return row["model"], row["method"], row["bits"], row["act"], row["granularity"]


class _StudyModel:
    """A shared model for a prior study: its BN-folded copy (file and graph), its true BN statistics from
    the BN-kept file (computed once), and its input space."""

    def __init__(self, name: str) -> None:
        from onnxdfq.graph import layers as graph_layers
        from onnxdfq.graph import surgery
        from onnxdfq.passes.base import Workspace
        from onnxdfq.passes.fold_bn import FoldBatchNormPass
        from onnxdfq.synth.prior import InputSpace

        rel, self.spec = MODELS[name]
        self.kept_path = ASSETS / rel
        self.work = Path(tempfile.mkdtemp(prefix="onnxdfq-prior-"))
        self.folded_path = self.work / "folded.onnx"
        fold_batchnorm_copy(str(self.kept_path), self.folded_path)
        self.folded = onnx.load(self.folded_path)
        self.space = InputSpace(tuple(self.spec["mean"]), tuple(self.spec["std"]))
        ws = Workspace(graph=surgery.import_graph(onnx.load(self.kept_path)))
        graph_layers.ensure_node_names(ws.graph)
        FoldBatchNormPass()(ws)
        self.true_stats = {layer.output_name: ws.channel_stats[layer.name]
                           for layer in graph_layers.read_layers(ws.graph) if layer.name in ws.channel_stats}

    def stat_errors(self, x: np.ndarray) -> tuple[float, float]:
        """(mean error, log-std error) of the statistics measured on x in the folded model against the
        true BN statistics: per layer the median over live channels, averaged over layers."""
        from onnxdfq.eval.calibrate import collect_statistics
        from onnxdfq.graph import layers as graph_layers
        from onnxdfq.graph import surgery
        from onnxdfq.passes.base import Workspace
        from onnxdfq.passes.calib_ranges import SampleObserver
        from onnxdfq.passes.channel_stats import MeasureChannelStatsPass

        probe = Workspace(graph=surgery.import_graph(self.folded))
        graph_layers.ensure_node_names(probe.graph)
        MeasureChannelStatsPass(SampleObserver(x, collect_statistics, self.folded), "samples")(probe)
        mean_err, std_err = [], []
        for layer in graph_layers.read_layers(probe.graph):
            if layer.output_name not in self.true_stats:
                continue
            bn, measured = self.true_stats[layer.output_name], probe.channel_stats[layer.name]
            live = bn.std > 1e-3
            mean_err.append(np.median(np.abs(measured.mean - bn.mean)[live] / bn.std[live]))
            std_err.append(np.median(np.abs(np.log(measured.std[live] / bn.std[live]))))
        return float(np.mean(mean_err)), float(np.mean(std_err))


def study_mobilenet(args) -> None:
    """Prior generators on folded MobileNet-V1 (224 x 224, ReLU6, depthwise): statistics and DF-MPC 4/8."""
    from onnxdfq.synth.prior import DEFAULT_PRIOR_SAMPLES, PRIOR_GENERATORS, prior_images

    study_model = _StudyModel("mobilenet_v1_0.75")
    spec, folded_path = study_model.spec, study_model.folded_path
    count = DEFAULT_PRIOR_SAMPLES
    lines = ["# Image prior generators on MobileNet-V1 (tools/bench_folded.py --study mobilenet)", "",
             f"BN-folded MobileNet-V1 0.75 (224 x 224), {count} images each, errors as in the ResNet-56 table. "
             "DF-MPC 4/8 (float activations) top-1 on val1300 with `--calib prior:GENERATOR` (the same images).", "",
             "| images | mean error (std) | log-std error | DF-MPC 4/8 top-1 |", "|---|---:|---:|---:|"]
    for generator in PRIOR_GENERATORS:
        x = prior_images(count, (3, 224, 224), study_model.space, generator=generator, seed=0)
        mean_err, std_err = study_model.stat_errors(x)
        top1 = quantize_and_eval(folded_path, spec, "dfmpc", "4/8", "none", "channel", args.limit,
                                 calib=f"prior:{generator}")
        lines.append(f"| prior:{generator}{' (default)' if generator == 'pink' else ''} | {mean_err:.3f} | "
                     f"{std_err:.3f} | {top1['top1']:.2f} |")
        print(lines[-1], flush=True)
    kept = quantize_and_eval(study_model.kept_path, spec, "dfmpc", "4/8", "none", "channel", args.limit)
    lines.append(f"| BN kept, BN statistics (reference) | 0 | 0 | {kept['top1']:.2f} |")
    (ROOT / "tools" / "results" / "prior_study_mobilenet.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def study(args) -> None:
    """Prior generators on folded ResNet-56: statistics error against the true BN, and DF-MPC top-1."""
    from onnxdfq.synth.prior import dead_leaves, pink_noise

    study_model = _StudyModel("resnet56")
    spec, folded_path, work, space = study_model.spec, study_model.folded_path, study_model.work, study_model.space
    count = 256
    real = np.load(ASSETS / "cifar10/train5000.npz")["x"][:count].transpose(0, 3, 1, 2).astype(np.float32) / 255
    variants = {
        "pink alpha 1.5 (default)": pink_noise(count, 3, 32, 32, seed=0, alpha=1.5),
        "pink alpha 1.0": pink_noise(count, 3, 32, 32, seed=0, alpha=1.0),
        "pink alpha 2.0": pink_noise(count, 3, 32, 32, seed=0, alpha=2.0),
        "dead leaves": dead_leaves(count, 3, 32, 32, seed=0),
        "mixed (half each)": np.concatenate([dead_leaves(count // 2, 3, 32, 32, seed=0),
                                             pink_noise(count // 2, 3, 32, 32, seed=1, alpha=1.5)]),
        "real training images (reference, not data-free)": real,
    }
    lines = ["# Image prior generators (tools/bench_folded.py --study)", "",
             f"BN-folded ResNet-56, {count} images each. Statistics error: per layer, the median over channels of "
             "|measured mean - BN beta| / |gamma| and of |log(measured std / |gamma|)|, averaged over layers. "
             "DF-MPC 2/6 (float activations) top-1 on the first 2000 test images, statistics from the images.", "",
             "| images | mean error (std) | log-std error | DF-MPC 2/6 top-1 |", "|---|---:|---:|---:|"]
    for name, images in variants.items():
        x = space.apply(images)
        mean_err, std_err = study_model.stat_errors(x)
        npz = work / "x.npz"
        np.savez(npz, x=x)
        top1 = quantize_and_eval(folded_path, spec, "dfmpc", "2/6", "none", "channel", 2000, calib=f"data:{npz}")
        lines.append(f"| {name} | {mean_err:.3f} | {std_err:.3f} | {top1['top1']:.2f} |")
        print(lines[-1], flush=True)
    (ROOT / "tools" / "results" / "prior_study.md").write_text("\n".join(lines) + "\n")

    # activation ranges: generator, sample count and estimator, where ranges matter (6 and 4 bits)
    lines += ["", "Activation ranges from the prior on the folded ResNet-56, nearest per-channel weights, first 2000 "
              "test images (each row: statistics and ranges from those images).", "",
              "| images | count | estimator | W8A8 | W6A6 | W4A4 |", "|---|---:|---|---:|---:|---:|"]
    settings = [("pink", 256, "mse"), ("pink", 64, "mse"), ("pink", 1024, "mse"), ("pink", 256, "percentile"),
                ("pink", 256, "minmax"), ("mixed", 256, "mse"), ("dead_leaves", 256, "mse")]
    for generator, count, estimator in settings:
        cells = []
        for bits in ("8", "6", "4"):
            row = quantize_and_eval(folded_path, spec, "nearest", bits, bits, "channel", 2000,
                                    calib=f"prior:{generator}", calib_samples=count, calib_range=estimator)
            cells.append(f"{row['top1']:.2f}")
        lines.append(f"| prior:{generator} | {count} | {estimator} | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    npz = work / "real.npz"
    np.savez(npz, x=space.apply(real))
    real_rows = [quantize_and_eval(folded_path, spec, "nearest", b, b, "channel", 2000, calib=f"data:{npz}")
                 for b in ("8", "6", "4")]
    cells = [f"{row['top1']:.2f}" for row in real_rows]
    lines.append(f"| real training images (reference) | {count} | mse | " + " | ".join(cells) + " |")
    cells = [f"{quantize_and_eval(study_model.kept_path, spec, 'nearest', b, b, 'channel', 2000)['top1']:.2f}"
             for b in ("8", "6", "4")]
    lines.append("| BN kept, BN statistics (reference) | - | - | " + " | ".join(cells) + " |")
    (ROOT / "tools" / "results" / "prior_study.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--only", nargs="*", default=None, help="models to run (default: all)")
    parser.add_argument("--update", action="store_true", help="with --only: keep the other models' rows of the "
                                                               "results file instead of dropping them")
    parser.add_argument("--out", default="folded", help="results file stem in tools/results (default folded)")
    parser.add_argument("--before", default="folded_before", help="results stem whose folded top-1 is 'before'")
    parser.add_argument("--study", nargs="?", const="resnet56", choices=["resnet56", "mobilenet"],
                        help="compare prior generators instead (on the folded ResNet-56, or MobileNet-V1)")
    args = parser.parse_args()
    if args.study:
        {"resnet56": study, "mobilenet": study_mobilenet}[args.study](args)
    else:
        bench(args)


if __name__ == "__main__":
    main()
