"""evaluate (top-1/top-5 on labelled data) and compare (fidelity of a quantized model to its parent)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from onnxdfq.errors import DataError
from onnxdfq.eval.data import Dataset, open_dataset
from onnxdfq.eval.metrics import cosine, sqnr_db, top1_agreement, topk_correct
from onnxdfq.eval.session import make_session

__all__ = ["EvalResult", "evaluate", "compare", "input_spec", "random_inputs"]

Progress = Callable[[int], None]  # called with the number of samples just processed


@dataclass
class EvalResult:
    top1: float
    top5: float
    count: int
    seconds: float
    provider: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def input_spec(session) -> tuple[str, list]:
    spec = session.get_inputs()[0]
    return spec.name, list(spec.shape)


def _spatial(shape: list) -> tuple[int, int] | None:
    if len(shape) == 4 and all(isinstance(d, int) and d > 0 for d in shape[2:]):
        return int(shape[2]), int(shape[3])
    return None


def _check_batch(x: np.ndarray, shape: list, data_name: str) -> None:
    expected = [d if isinstance(d, int) and d > 0 else None for d in shape]
    if x.ndim != len(expected) or any(e is not None and e != got for e, got in zip(expected[1:], x.shape[1:],
                                                                                   strict=False)):
        raise DataError(f"{data_name}: samples of shape {list(x.shape[1:])} do not match the model input "
                        f"{shape[1:]} (use --size, or data made for this model)")


def _open(data: str | Dataset, session, mean, std, size) -> Dataset:
    if isinstance(data, Dataset):
        return data
    _, shape = input_spec(session)
    channels = shape[1] if len(shape) > 1 and isinstance(shape[1], int) else None
    return open_dataset(data, mean=mean, std=std, size=size or _spatial(shape), channels=channels)


def evaluate(model: Any, data: str | Dataset, *, mean: list[float] | None = None, std: list[float] | None = None,
             size: tuple[int, int] | None = None, batch_size: int = 100, limit: int | None = None,
             provider: str = "cpu", progress: Progress | None = None,
             on_count: Progress | None = None) -> EvalResult:
    """Top-1 / top-5 accuracy (percent) of a classifier (path or ModelProto) on labelled data.

    `on_count` is told how many samples will be evaluated once the data is open (for a progress
    bar's total); `progress` after each batch.
    """
    session = make_session(model, provider)
    name, shape = input_spec(session)
    dataset = _open(data, session, mean, std, size)
    if not dataset.has_labels:
        raise DataError(f"{dataset.name}: has no labels ('y'); evaluation needs labelled data")
    if on_count:
        on_count(dataset.count if limit is None else min(dataset.count, limit))
    correct1 = correct5 = seen = 0
    start = time.perf_counter()
    for x, y in dataset.batches(batch_size, limit):
        _check_batch(x, shape, dataset.name)
        logits = session.run(None, {name: x})[0].reshape(len(x), -1)
        correct1 += topk_correct(logits, y, 1)
        correct5 += topk_correct(logits, y, 5)
        seen += len(y)
        if progress:
            progress(len(y))
    if seen == 0:
        raise DataError(f"{dataset.name}: no samples")
    return EvalResult(100.0 * correct1 / seen, 100.0 * correct5 / seen, seen, time.perf_counter() - start,
                      session.get_providers()[0])


def random_inputs(shape: list, count: int, seed: int = 0) -> np.ndarray:
    dims = [count] + [d if isinstance(d, int) and d > 0 else 1 for d in shape[1:]]
    return np.random.default_rng(seed).standard_normal(dims).astype(np.float32)


def compare(reference: Any, candidate: Any, *, data: str | None = None, random: int | None = None,
            mean: list[float] | None = None, std: list[float] | None = None, size: tuple[int, int] | None = None,
            batch_size: int = 100, limit: int | None = None, provider: str = "cpu", seed: int = 0,
            progress: Progress | None = None) -> dict[str, float]:
    """SQNR (dB), cosine similarity and top-1 agreement of candidate's outputs against reference's."""
    ref_session = make_session(reference, provider)
    cand_session = make_session(candidate, provider)
    name, shape = input_spec(ref_session)
    if data is not None:
        dataset = _open(data, ref_session, mean, std, size)
        batches = (x for x, _ in dataset.batches(batch_size, limit))
    else:
        count = random or 64
        batches = (random_inputs(shape, min(batch_size, count - start), seed + start)
                   for start in range(0, count, batch_size))
    ref_out, cand_out = [], []
    for x in batches:
        _check_batch(x, shape, str(data or "random"))
        ref_out.append(ref_session.run(None, {name: x})[0])
        cand_out.append(cand_session.run(None, {name: x})[0])
        if progress:
            progress(len(x))
    ref, cand = np.concatenate(ref_out), np.concatenate(cand_out)
    if not np.all(np.isfinite(cand)):
        return {"sqnr_db": float("-inf"), "cosine": float("nan"), "top1_agreement": 0.0, "count": len(ref),
                "finite": False}
    return {"sqnr_db": sqnr_db(ref, cand), "cosine": cosine(ref, cand),
            "top1_agreement": top1_agreement(ref, cand), "count": len(ref), "finite": True}
