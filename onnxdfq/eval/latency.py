"""Inference latency of several models measured side by side, so their ratio survives a noisy machine."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from onnxdfq.eval.runner import input_spec, random_inputs
from onnxdfq.eval.session import make_session

__all__ = ["measure_latency", "stable_latency"]


def measure_latency(models: dict[str, Any], *, batch: int = 1, runs: int = 20, rounds: int = 5,
                    warmup: int = 3, provider: str = "cpu", threads: int | None = None) -> dict[str, float]:
    """Median milliseconds per `session.run` of each model on the same random batch.

    The models take turns: `rounds` rounds, each running every model `runs` times, so load
    changes on a shared machine hit all of them alike. Sessions are built (and warmed up) first.
    """
    sessions = {key: make_session(model, provider, threads=threads) for key, model in models.items()}
    feeds = {}
    for key, session in sessions.items():
        name, shape = input_spec(session)
        feeds[key] = {name: random_inputs(shape, batch, seed=0)}
        for _ in range(warmup):
            session.run(None, feeds[key])
    samples: dict[str, list[float]] = {key: [] for key in sessions}
    for _ in range(rounds):
        for key, session in sessions.items():
            feed = feeds[key]
            for _ in range(runs):
                start = time.perf_counter()
                session.run(None, feed)
                samples[key].append((time.perf_counter() - start) * 1e3)
    return {key: float(np.median(values)) for key, values in samples.items()}


def stable_latency(models: dict[str, Any], *, runs: int = 20, tolerance: float = 0.05, tries: int = 4,
                   threads: int | None = None, provider: str = "cpu") -> dict[str, float]:
    """`measure_latency` again until two measurements in a row give ratios (each model against the first)
    within `tolerance` of each other, at most `tries` times; the measurement with the median ratio is kept.

    One interleaved measurement survives slow drifts of load but not a burst during one round: the repeat
    is what keeps a 10x "speedup" out of a results table.
    """
    first = next(iter(models))
    results: list[dict[str, float]] = []
    for _ in range(max(1, tries)):
        results.append(measure_latency(models, runs=runs, threads=threads, provider=provider))
        if len(results) >= 2 and all(
                abs(results[-1][first] / results[-1][k] - results[-2][first] / results[-2][k])
                <= tolerance * results[-2][first] / results[-2][k] for k in models):
            break
    if len(models) < 2:
        return results[-1]
    other = [k for k in models if k != first][0]
    order = sorted(range(len(results)), key=lambda i: results[i][first] / results[i][other])
    return results[order[len(order) // 2]]
