#!/usr/bin/env python3
"""Top-1 and latency of FP32 and quantized models on onnxruntime execution providers, side by side.

Each model is evaluated on each provider (the session is checked to really run on it: onnxruntime
falls back to CPU silently, `make_session` refuses that), and latencies are interleaved per provider
(`measure_latency`), so ratios survive a noisy machine. A provider onnxruntime does not offer, or that
cannot build a session (TensorRT without its libraries), becomes a row with the error, not a crash.

usage: python tools/bench_providers.py --model NAME=PATH ... --data DATA --mean M --std S
       [--providers cpu,cuda,tensorrt] [--limit N] [--batches 1,64] [--out tools/results/providers]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

from onnxdfq.eval.latency import measure_latency
from onnxdfq.eval.runner import evaluate
from onnxdfq.eval.session import available_providers, make_session


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", required=True, help="NAME=PATH (repeatable; first = baseline)")
    parser.add_argument("--data", required=True)
    parser.add_argument("--mean", default=None)
    parser.add_argument("--std", default=None)
    parser.add_argument("--providers", default="cpu,cuda,tensorrt")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--out", default="tools/results/providers")
    args = parser.parse_args()
    models = dict(item.split("=", 1) for item in args.model)
    mean = [float(v) for v in args.mean.split(",")] if args.mean else None
    std = [float(v) for v in args.std.split(",")] if args.std else None
    rows, errors = [], {}
    for provider in args.providers.split(","):
        try:
            session = make_session(next(iter(models.values())), provider)
            used = session.get_providers()
        except Exception as exc:  # noqa: BLE001 - a provider that cannot run is a result, not a crash
            errors[provider] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
            print(f"{provider}: {errors[provider]}", flush=True)
            continue
        latency = {}
        for batch in (int(b) for b in args.batches.split(",")):
            latency[batch] = measure_latency(models, batch=batch, provider=provider, runs=20, rounds=5)
        for name, path in models.items():
            start = time.perf_counter()
            try:
                result = evaluate(path, args.data, mean=mean, std=std, limit=args.limit, provider=provider)
                top1, top5, error = result.top1, result.top5, None
            except Exception as exc:  # noqa: BLE001
                top1 = top5 = None
                error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
            row = {"provider": provider, "session_providers": used, "model": name, "top1": top1, "top5": top5,
                   "error": error, "eval_s": round(time.perf_counter() - start, 2)}
            for batch, table in latency.items():
                base = table[next(iter(models))]
                row[f"ms_b{batch}"] = round(table[name], 3)
                row[f"speedup_b{batch}"] = round(base / table[name], 3)
            rows.append(row)
            print(json.dumps(row), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"machine": platform.node(), "available_providers": available_providers(), "errors": errors,
            "data": args.data, "limit": args.limit}
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    batches = [int(b) for b in args.batches.split(",")]
    lines = [f"available providers: {', '.join(meta['available_providers'])}", ""]
    lines += [f"- {p}: {e}" for p, e in errors.items()]
    lines += ["", "| provider | model | top-1 | " + " | ".join(f"ms b{b} | x FP32 b{b}" for b in batches) + " |",
              "|---|---|---:|" + "---:|---:|" * len(batches)]
    for row in rows:
        top1 = f"{row['top1']:.2f}" if row["top1"] is not None else row["error"]
        lines.append(f"| {row['provider']} | {row['model']} | {top1} | "
                     + " | ".join(f"{row[f'ms_b{b}']} | {row[f'speedup_b{b}']:.2f}x" for b in batches) + " |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
