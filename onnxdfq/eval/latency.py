"""Inference latency of several models measured side by side, so their ratio survives a noisy machine."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from onnxdfq.eval.runner import input_spec, random_inputs
from onnxdfq.eval.session import make_session

__all__ = ["measure_latency"]


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
