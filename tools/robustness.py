#!/usr/bin/env python3
"""Quantize every .onnx in a folder as a new user would (the CLI, default settings) and tabulate what happened.

    python tools/robustness.py /tmp/tv_models /tmp/wild_models [--method squant] [--bits 8] [--act-bits 8]
    python tools/robustness.py /tmp/tv_models --only shufflenet   # rerun some; other rows kept from the JSON

For each model: exit status, the error line if any, how many layer inputs were quantized out of
how many (and why not the rest), the fidelity figure on prior images, BN layers found, and the
wall time. Writes tools/results/robustness.md (and .json). The corpus itself is not committed
(tools/export_torchvision.py makes the torchvision part of it).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TIME = Path("/usr/bin/time")  # GNU time -v: the run's peak resident memory


def run_one(path: Path, args, work: Path) -> dict:
    out, report = work / f"{path.stem}.q.onnx", work / f"{path.stem}.json"
    command = [sys.executable, "-m", "onnxdfq.cli", "quantize", str(path), "-o", str(out), "--report", str(report),
               "--method", args.method, "--bits", args.bits, "--act-bits", args.act_bits, "-q"]
    if TIME.exists():
        command = [str(TIME), "-v", *command]
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
    row = {"model": path.name, "exit": proc.returncode, "seconds": round(time.perf_counter() - start, 1)}
    stderr, _, timing = proc.stderr.partition("\tCommand being timed:")
    peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", timing)
    if peak:
        row["peak_mb"] = int(peak.group(1)) // 1024
    if proc.returncode != 0:
        lines = [line for line in (stderr or proc.stdout).splitlines()
                 if line.strip() and not line.startswith("Command exited with non-zero status")]
        row["error"] = lines[-1][:300] if lines else "?"
        return row
    data = json.loads(report.read_text())
    coverage = data["layer_inputs"]
    reasons: dict[str, int] = {}
    for why in coverage["float"].values():
        reasons[why] = reasons.get(why, 0) + 1
    row.update(inputs=f"{coverage['quantized']}/{coverage['total']}", float_reasons=reasons,
               bn_layers=data["statistics"]["bn_layers"], layers=data["statistics"]["layers"],
               sqnr_db=round(min(o["sqnr_db"] for o in data["fidelity"]["outputs"]), 1),
               unexercised=data["fidelity"].get("unexercised", []),
               fidelity_inputs=data["fidelity"]["inputs"], low_fidelity=data["fidelity"]["low_fidelity"],
               grade=data["fidelity"].get("grade"),
               warnings=len(data["warnings"]))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", type=Path, nargs="+")
    parser.add_argument("--only", nargs="*", default=None, help="rerun models whose file name contains one of these")
    parser.add_argument("--method", default="squant")  # the CLI's default
    parser.add_argument("--bits", default="8")
    parser.add_argument("--act-bits", default="8")
    parser.add_argument("--timeout", type=int, default=900)
    parser.add_argument("--out", type=Path, default=ROOT / "tools" / "results" / "robustness")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="onnxdfq-robust-"))
    json_path = args.out.with_suffix(".json")
    kept = {row["model"]: row for row in json.loads(json_path.read_text())} if args.only and json_path.exists() else {}
    for path in sorted(p for folder in args.folders for p in folder.glob("*.onnx")):
        if args.only and not any(s in path.name for s in args.only):
            continue
        kept[path.name] = run_one(path, args, work)
        print(json.dumps(kept[path.name]), flush=True)
    rows = sorted(kept.values(), key=lambda row: row["model"])
    json_path.write_text(json.dumps(rows, indent=1))
    ok = sum(r["exit"] == 0 for r in rows)
    lines = [f"# Robustness corpus: `onnxdfq quantize --method {args.method} --bits {args.bits} --act-bits "
             f"{args.act_bits}` (tools/robustness.py)", "",
             f"{ok} of {len(rows)} models quantized with exit 0. Fidelity: the lowest output SQNR against FP32 on "
             "32 prior images at the model's size, and the check's grade. The torchvision exports have random "
             "weights (a shape and op check, not accuracy: ViT's zero-initialised head gives a constant output); "
             "the OCR and detection models from PyPI packages (rapidocr-onnxruntime, ddddocr) are trained.", "",
             "| model | exit | layer inputs quantized | BN layers | SQNR dB | seconds | peak MB | note |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        if r["exit"]:
            lines.append(f"| {r['model']} | {r['exit']} | - | - | - | {r['seconds']} | {r.get('peak_mb', '-')} | "
                         f"{r['error']} |")
            continue
        notes = [f"{n} {why}" for why, n in r["float_reasons"].items()]
        if r.get("unexercised"):
            notes.append("output not exercised by the prior images (FP32 output nearly constant): fidelity not judged")
        elif r.get("grade") not in (None, "fine"):
            notes.append(r["grade"])
        lines.append(f"| {r['model']} | 0 | {r['inputs']} | {r['bn_layers']}/{r['layers']} | {r['sqnr_db']} | "
                     f"{r['seconds']} | {r.get('peak_mb', '-')} | {'; '.join(notes)} |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
