"""evaluate (top-1/top-5 on labelled data) and compare (fidelity of a quantized model to its parent)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from onnxdfq.errors import DataError, OptionError, UnsupportedModelError
from onnxdfq.eval.data import Dataset, open_dataset
from onnxdfq.eval.metrics import centered_cosine, cosine, sqnr_db, top1_agreement, topk_correct
from onnxdfq.eval.session import make_session, run_session
from onnxdfq.preprocessing import PRESETS, Preprocessing, from_metadata, resolve_preprocessing

__all__ = ["EvalResult", "evaluate", "compare", "input_spec", "random_inputs", "run_batched", "sample_dims",
           "DEFAULT_IMAGE_SIZE"]

DEFAULT_IMAGE_SIZE = 224  # spatial size for inputs whose H, W are dynamic and not given (--size)

Progress = Callable[[int], None]  # called with the number of samples just processed


@dataclass
class EvalResult:
    top1: float
    top5: float
    count: int
    seconds: float
    provider: str
    correct1: int = 0  # the exact counts behind top1/top5 (a sharded evaluation sums these)
    correct5: int = 0
    preprocessing: str | None = None  # how raw images were normalised, and where that came from

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def input_spec(session) -> tuple[str, list]:
    spec = session.get_inputs()[0]
    return spec.name, list(spec.shape)


def sample_dims(shape: list, size: tuple[int, int] | None = None) -> list[int]:
    """One sample's dims (batch axis excluded): static dims as they are, dynamic spatial dims from `size`
    or DEFAULT_IMAGE_SIZE (never 1: a 1x1 image tells nothing about a conv net), other dynamic dims 1."""
    dims = []
    for axis, dim in enumerate(shape[1:], 1):
        if isinstance(dim, int) and dim > 0:
            dims.append(dim)
        elif len(shape) == 4 and axis >= 2:
            dims.append(size[axis - 2] if size else DEFAULT_IMAGE_SIZE)
        else:
            dims.append(1)
    return dims


def run_batched(session, name: str, x: np.ndarray, outputs: list[str] | None = None) -> list[np.ndarray]:
    """session.run on `x`, split to the model's static batch size when it has one (exporters often
    write batch 1); the last chunk is padded with copies of its last sample and trimmed."""
    batch = session.get_inputs()[0].shape[0] if session.get_inputs()[0].name == name else None
    if not (isinstance(batch, int) and batch > 0) or batch == len(x):
        return run_session(session, outputs, {name: x})
    chunks: list[list[np.ndarray]] = []
    for start in range(0, len(x), batch):
        chunk = x[start:start + batch]
        real = len(chunk)
        if real < batch:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch - real, axis=0)])
        chunks.append([value[:real] for value in run_session(session, outputs, {name: np.ascontiguousarray(chunk)})])
    return [np.concatenate(parts) for parts in zip(*chunks, strict=True)]


def _spatial(shape: list) -> tuple[int, int] | None:
    if len(shape) == 4 and all(isinstance(d, int) and d > 0 for d in shape[2:]):
        return int(shape[2]), int(shape[3])
    return None


def _check_batch(x: np.ndarray, shape: list, data_name: str) -> None:
    expected = [d if isinstance(d, int) and d > 0 else None for d in shape]
    if x.ndim == 4 and len(expected) == 4 and x.shape[-1] == expected[1] and x.shape[1] != expected[1]:
        raise DataError(f"{data_name}: samples are channels-last {list(x.shape[1:])}; the model takes "
                        f"channels-first {shape[1:]} (store x as NCHW, or uint8 NHWC images)")
    if x.ndim != len(expected) or any(e is not None and e != got for e, got in zip(expected[1:], x.shape[1:],
                                                                                   strict=False)):
        raise DataError(f"{data_name}: samples of shape {list(x.shape[1:])} do not match the model input "
                        f"{shape[1:]} (use --size, or data made for this model)")


def _open(data: str | Dataset, session, mean, std, size, preprocess: str | None = None,
          input_range: tuple[float, float] | None = None, metadata_sessions: tuple = ()) -> Dataset:
    """The data set, with the preprocessing given (validated) or stored in the models' metadata; raw images
    (uint8 arrays, image files) with neither are refused: a guess would score a plausible wrong top-1."""
    if isinstance(data, Dataset):
        return data
    _, shape = input_spec(session)
    channels = shape[1] if len(shape) > 1 and isinstance(shape[1], int) else None
    if input_range is not None and (mean is not None or std is not None or preprocess is not None):
        raise OptionError("give the preprocessing once: --input-range and --mean/--std or --preprocess both say it")
    given = resolve_preprocessing(mean, std, preset=preprocess, input_range=input_range, channels=channels)
    dataset = open_dataset(data, size=size or _spatial(shape))
    preprocessing = given
    if preprocessing is None and dataset.raw:  # float arrays are model inputs already: never normalised twice
        preprocessing = next((stored for s in (*metadata_sessions, session)
                              if (stored := session_preprocessing(s)) is not None), None)
    if preprocessing is None and dataset.raw:
        raise DataError(f"{dataset.name} holds raw images (uint8 pixels) and no preprocessing is known for the model: "
                        f"give --mean/--std (0-1 scale), --input-range LO,HI or --preprocess {'|'.join(PRESETS)} "
                        "(a file written by onnxdfq quantize records it)")
    if preprocessing is not None:
        preprocessing.check_channels(channels)
        dataset.mean = np.asarray(preprocessing.mean, np.float32)
        dataset.std = np.asarray(preprocessing.std, np.float32)
        dataset.preprocessing = preprocessing
    return dataset


def session_preprocessing(session) -> Preprocessing | None:
    """The preprocessing recorded in a session's model metadata (what onnxdfq quantize writes), or None."""
    return from_metadata(session.get_modelmeta().custom_metadata_map)


def evaluate(model: Any, data: str | Dataset, *, mean: list[float] | None = None, std: list[float] | None = None,
             preprocess: str | None = None, input_range: tuple[float, float] | None = None,
             size: tuple[int, int] | None = None, batch_size: int = 100, limit: int | None = None,
             provider: str = "cpu", progress: Progress | None = None,
             on_count: Progress | None = None, offset: int = 0, threads: int | None = None) -> EvalResult:
    """Top-1 / top-5 accuracy (percent) of a classifier (path or ModelProto) on labelled data.

    The preprocessing of raw images (uint8 arrays, image files) is ``mean``/``std`` (0-1 scale),
    a ``preprocess`` preset (`onnxdfq.preprocessing.PRESETS`), ``input_range`` (pixel 0 -> lo, 1 -> hi) or
    what the model's metadata records (``onnxdfq quantize`` writes it); with none of them it is a DataError.

    `on_count` is told how many samples will be evaluated once the data is open (for a progress
    bar's total); `progress` after each batch. `offset` skips the first samples (then `limit` counts
    from there): a shard of the set whose batches, with `offset` a multiple of `batch_size`, are the
    same as a whole run's. `threads`: onnxruntime's intra-op threads (default: its own choice).
    """
    session = make_session(model, provider, threads=threads)
    name, shape = input_spec(session)
    dataset = _open(data, session, mean, std, size, preprocess, input_range)
    if not dataset.has_labels:
        raise DataError(f"{dataset.name}: has no labels ('y'); evaluation needs labelled data")
    if on_count:
        on_count(max(0, (dataset.count if limit is None else min(dataset.count, offset + limit)) - offset))
    correct1 = correct5 = seen = 0
    start = time.perf_counter()
    for x, y in dataset.batches(batch_size, limit, offset):
        _check_batch(x, shape, dataset.name)
        logits = run_batched(session, name, x)[0].reshape(len(x), -1)
        if not np.all(np.isfinite(logits)):
            raise UnsupportedModelError(f"the model produced NaN or inf outputs on {dataset.name}; refusing to "
                                        "score them (a broken or overflowing model)")
        bad = (y < 0) | (y >= logits.shape[1])
        if np.any(bad):
            raise DataError(f"{dataset.name}: label {int(y[bad][0])} is outside the model's "
                            f"{logits.shape[1]} classes (0..{logits.shape[1] - 1})")
        correct1 += topk_correct(logits, y, 1)
        correct5 += topk_correct(logits, y, 5)
        seen += len(y)
        if progress:
            progress(len(y))
    if seen == 0:
        raise DataError(f"{dataset.name}: no samples")
    return EvalResult(100.0 * correct1 / seen, 100.0 * correct5 / seen, seen, time.perf_counter() - start,
                      session.get_providers()[0], int(correct1), int(correct5),
                      dataset.preprocessing.describe() if dataset.preprocessing is not None else None)


def random_inputs(shape: list, count: int, seed: int = 0, size: tuple[int, int] | None = None) -> np.ndarray:
    dims = [count] + sample_dims(shape, size)
    return np.random.default_rng(seed).standard_normal(dims).astype(np.float32)


def _check_same_interface(ref_session, cand_session) -> None:
    ref_in, cand_in = ref_session.get_inputs(), cand_session.get_inputs()
    ref_out, cand_out = ref_session.get_outputs(), cand_session.get_outputs()
    if [i.name for i in ref_in] != [i.name for i in cand_in] or len(ref_out) != len(cand_out):
        raise DataError(f"the models do not match: inputs {[i.name for i in ref_in]} / {[i.name for i in cand_in]}, "
                        f"{len(ref_out)} / {len(cand_out)} outputs; compare a quantized model with its own parent")
    for a, b in zip(ref_in, cand_in, strict=True):
        if len(a.shape) != len(b.shape) or any(isinstance(x, int) and isinstance(y, int) and x != y
                                               for x, y in zip(a.shape, b.shape, strict=True)):
            raise DataError(f"the models do not match: input {a.name} is {a.shape} in one, {b.shape} in the other")


def _output_fidelity(name: str, ref: np.ndarray, cand: np.ndarray) -> dict[str, Any]:
    return {"name": name, "sqnr_db": sqnr_db(ref, cand), "cosine": cosine(ref, cand),
            "centered_cosine": centered_cosine(ref, cand), "reference_std": float(np.std(ref, dtype=np.float64))}


def compare(reference: Any, candidate: Any, *, data: str | None = None, random: int | None = None,
            prior: int | None = None,
            inputs: np.ndarray | None = None, mean: list[float] | None = None, std: list[float] | None = None,
            preprocess: str | None = None, input_range: tuple[float, float] | None = None,
            size: tuple[int, int] | None = None, batch_size: int = 100, limit: int | None = None,
            provider: str = "cpu", seed: int = 0, progress: Progress | None = None,
            lean: bool = False) -> dict[str, Any]:
    """Fidelity of candidate's outputs against reference's on `data`, on given `inputs`, on `prior` procedural
    images in the model's input space (the default, 64 of them, when none of the others is given; the
    preprocessing given, else the one either model's metadata records, else ImageNet's, said in
    ``inputs``), or on `random` N(0, 1) inputs: SQNR (dB), cosine and centered cosine per output (the
    top level repeats the first output's), top-1 agreement when the first output is a classifier's
    [N, classes]. `finite` is False when either model produced NaN or inf (then no figure is
    meaningful); ``inputs`` says what was fed."""
    ref_session = make_session(reference, provider, lean=lean)
    cand_session = make_session(candidate, provider, lean=lean)
    _check_same_interface(ref_session, cand_session)
    name, shape = input_spec(ref_session)
    described = None
    if inputs is None and data is None and random is None:
        inputs, described = _prior_inputs(reference, ref_session, cand_session, prior or 64, seed, size,
                                          resolve_preprocessing(mean, std, preset=preprocess, input_range=input_range))
    if inputs is not None:
        described = described or f"{len(inputs)} given inputs {list(inputs.shape[1:])}"
        batches = (inputs[start:start + batch_size] for start in range(0, len(inputs), batch_size))
    elif data is not None:
        dataset = _open(data, ref_session, mean, std, size, preprocess, input_range, (cand_session,))
        described = f"{data}" + (f" ({dataset.preprocessing.describe()})" if dataset.preprocessing else "")
        batches = (x for x, _ in dataset.batches(batch_size, limit))
    else:
        described = f"{random} samples of N(0,1) noise {sample_dims(shape, size)} (not images)"
        batches = (random_inputs(shape, min(batch_size, random - start), seed + start, size)
                   for start in range(0, random, batch_size))
    names = [out.name for out in ref_session.get_outputs()]
    ref_out: list[list[np.ndarray]] = []
    cand_out: list[list[np.ndarray]] = []
    for x in batches:
        _check_batch(x, shape, str(data or "inputs"))
        ref_out.append(run_batched(ref_session, name, x))
        cand_out.append(run_batched(cand_session, name, x))
        if progress:
            progress(len(x))
    refs = [np.concatenate(parts) for parts in zip(*ref_out, strict=True)]
    cands = [np.concatenate(parts) for parts in zip(*cand_out, strict=True)]
    count = len(refs[0]) if refs and refs[0].ndim else 0
    finite = all(np.all(np.isfinite(v)) for v in refs + cands)
    if not finite:
        return {"sqnr_db": float("-inf"), "cosine": float("nan"), "top1_agreement": None, "count": count,
                "finite": False, "outputs": [], "inputs": described}
    outputs = [_output_fidelity(n, r, c) for n, r, c in zip(names, refs, cands, strict=True)]
    first = refs[0]
    classifier = first.ndim == 2 and first.shape[1] > 1
    return {"sqnr_db": outputs[0]["sqnr_db"], "cosine": outputs[0]["cosine"],
            "top1_agreement": top1_agreement(first, cands[0]) if classifier else None, "count": count,
            "finite": True, "outputs": outputs, "inputs": described}


def _prior_inputs(reference: Any, ref_session, cand_session, count: int, seed: int, size: tuple[int, int] | None,
                  given: Preprocessing | None) -> tuple[np.ndarray, str]:
    """``count`` prior images at the model's size in its input space, as the quantize check makes them."""
    from onnxdfq.config import CalibSpec
    from onnxdfq.eval.check import probe_inputs  # check builds on this module
    from onnxdfq.graph.io import load_model

    space = given or session_preprocessing(cand_session) or session_preprocessing(ref_session)
    known = {"mean": space.mean, "std": space.std, "mean_std_source": space.source} if space else {}
    model = reference if hasattr(reference, "graph") else load_model(reference)
    return probe_inputs(model, CalibSpec(seed=seed, size=size, **known), None, count)
