"""Calibration data and activation statistics: the onnxruntime side of `--calib synth:|data:`.

- :func:`calibration_samples` turns a :class:`~onnxdfq.passes.calib_ranges.CalibSpec` into model
  inputs: generated on the fly (``synth:METHOD``, needs the ``synth`` extra) or read from an
  ``.npz`` (``data:PATH``).
- :func:`collect_statistics` runs a float model whose graph outputs include every tensor to
  calibrate and streams their values into :class:`~onnxdfq.quant.range_estimators.TensorObserver`
  objects (two passes when the estimator needs a histogram).

Calibration ``.npz`` files: ``x`` float32 NCHW, already preprocessed (what the model eats; this
is what ``onnxdfq synth`` writes), used as is. Raw data sets in the evaluation format (``x``
uint8 NHWC) are accepted too when the preprocessing ``mean``/``std`` are given: pixels are
scaled to [0, 1], normalised and resized to the model's input size.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from onnxdfq.config import CalibSpec
from onnxdfq.errors import DataError, UnsupportedModelError
from onnxdfq.eval.data import open_dataset
from onnxdfq.eval.runner import run_batched, sample_dims
from onnxdfq.eval.session import make_session, run_session
from onnxdfq.graph.io import model_input
from onnxdfq.graph.surgery import MOMENT_OUTPUTS
from onnxdfq.preprocessing import PRESETS, Preprocessing, from_metadata, pixel_box
from onnxdfq.quant.range_estimators import TensorObserver
from onnxdfq.synth.prior import InputSpace, default_prior_count, prior_image_set, resolve_generator

__all__ = ["calibration_samples", "load_samples", "synthesize", "collect_statistics", "collect_moments", "input_shape",
           "model_preprocessing", "prior_input_space", "prior_samples"]

logger = logging.getLogger(__name__)

SynthProgress = Callable[[int, int, float], None]  # (step, total, batch BN loss), as synth.generate


def input_shape(model: Any, size: tuple[int, int] | None = None) -> tuple[int, ...]:
    """The single input's shape without the batch axis (e.g. (3, 32, 32)).

    Dynamic spatial dims of an image input [N, C, H, W] take ``size`` (``--size``) or
    DEFAULT_IMAGE_SIZE; any other dynamic dim is an error that says which.
    """
    name, shape = model_input(model, "calibration")
    resolved = tuple(sample_dims(shape, size))
    unknown = [axis for axis, d in enumerate(shape[1:], 1) if d is None and not (len(shape) == 4 and axis >= 2)]
    if unknown:
        raise UnsupportedModelError(f"calibration needs static input dims (batch and image size excepted); "
                                    f"{name!r} has dynamic axes {unknown}")
    return resolved


def load_samples(path: str | Path, shape: tuple[int, ...], *, limit: int | None = None,
                 mean: list[float] | None = None, std: list[float] | None = None) -> np.ndarray:
    """Model inputs from an ``.npz``: float ``x`` as is, uint8 ``x`` (NHWC) preprocessed with mean/std."""
    path = Path(path)
    if path.suffix != ".npz":
        raise DataError(f"{path}: calibration data must be an .npz with an array 'x'")
    size = tuple(shape[1:3]) if len(shape) == 3 else None
    open_dataset(path)  # validates the file (a DataError names what is wrong)
    with np.load(path, allow_pickle=False) as data:
        raw = data["x"]
    if raw.dtype == np.uint8:
        if mean is None or std is None:
            raise DataError(f"{path}: 'x' holds raw uint8 images; give the model's preprocessing with --mean and "
                            "--std (or store float32 NCHW inputs that are already preprocessed)")
        dataset = open_dataset(path, mean=mean, std=std, size=size, channels=shape[0])
        x = np.concatenate([batch for batch, _ in dataset.batches(256, limit)])
    else:
        x = np.asarray(raw[:limit] if limit else raw, np.float32)
    if tuple(x.shape[1:]) != tuple(shape):
        raise DataError(f"{path}: samples of shape {list(x.shape[1:])} do not fit the model input {list(shape)}")
    if not np.isfinite(x).all():
        raise DataError(f"{path}: 'x' contains NaN or inf")
    return x


# ImageNet's preprocessing: what most image classifiers expect, assumed (with a warning) when nothing is known
IMAGENET_MEAN, IMAGENET_STD = PRESETS["imagenet"]
ASSUMED_IMAGENET = "assumed: ImageNet mean/std (give --mean/--std)"


def model_preprocessing(model: Any) -> Preprocessing | None:
    """The preprocessing a ModelProto's metadata records (onnxdfq's own keys or the common mean/std ones)."""
    return from_metadata({p.key: p.value for p in getattr(model, "metadata_props", [])})


def prior_input_space(model: Any, spec: CalibSpec, input_range: tuple[float, float] | None) -> InputSpace:
    """How [0, 1] images map into the model's input: --mean/--std, --input-range, metadata, else ImageNet's."""
    if spec.mean is not None:
        return InputSpace(tuple(spec.mean), tuple(spec.std or (1.0,)), spec.mean_std_source)
    if input_range is not None:
        return InputSpace.from_range(*input_range, source="--input-range")
    stored = model_preprocessing(model)
    if stored is not None:
        return InputSpace(stored.mean, stored.std, "model metadata")
    return InputSpace(IMAGENET_MEAN, IMAGENET_STD, ASSUMED_IMAGENET)


def prior_samples(model: Any, spec: CalibSpec, input_range: tuple[float, float] | None) -> tuple[np.ndarray, dict]:
    """``spec.samples`` procedural images (default 256) in the model's input space, and a summary."""
    shape = input_shape(model, spec.size)
    space = prior_input_space(model, spec, input_range)
    start = time.perf_counter()
    count = spec.samples or default_prior_count(*shape[1:])
    generator = resolve_generator(spec.method, *shape[1:])
    x, groups = prior_image_set(count, shape, space, generator=generator, seed=spec.seed)
    info = {"method": generator, "seconds": round(time.perf_counter() - start, 3), "seed": spec.seed,
            "input_space": space.source}
    if groups is not None:
        info["groups"] = groups  # which generator made each image: the pipeline hands it to the statistics
    return x, info


def synth_input_bounds(model: Any, spec: CalibSpec, input_range: tuple[float, float] | None, *,
                       needs_box: bool = False) -> tuple[tuple[np.ndarray, np.ndarray] | None, str]:
    """Per-channel (lows, highs) real inputs can take, the image of pixels 0 and 1 under the preprocessing the
    user gave or the model records, and where that came from; None when only ImageNet's is assumed, unless the
    generator works in pixels (``needs_box``: inversion), which then gets the assumed box. ResNet-20
    W4A4 with --reconstruct on DFFG samples: 86.75 % unbounded (pixels reached -6.8 where real ones end at -2.1),
    87.51 bounded; MobileNet-V1 W4A8 (100 steps a block) 37.9 unbounded, 66.69 bounded."""
    space = prior_input_space(model, spec, input_range)
    if space.source.startswith("assumed") and not needs_box:
        return None, "unbounded (no preprocessing known)"
    return pixel_box(space.mean, space.std), space.source


def synthesize(model: Any, spec: CalibSpec, progress: SynthProgress | None = None,
               input_range: tuple[float, float] | None = None) -> tuple[np.ndarray, dict]:
    """``spec.samples`` generated inputs (``spec.method``), kept inside the input's box when the preprocessing is
    known, and a summary of the run (with the batch BN loss for the methods that match BN statistics)."""
    try:
        from onnxdfq import synth

        start = time.perf_counter()
        samples, options = spec.synth_run()
        generator = synth.get_generator(spec.method)
        bounds, bounds_source = synth_input_bounds(model, spec, input_range, needs_box=generator.needs_pixel_box)
        x = synth.generate(model, spec.method, samples, batch_size=spec.batch_size, seed=spec.seed,
                           device=spec.device, progress=progress, input_bounds=bounds, **options)
    except ImportError as exc:
        raise UnsupportedModelError(f"--calib synth:{spec.method} needs torch: pip install -e \".[synth]\" "
                                    f"torch==2.13.0 ({exc})") from None
    seconds = time.perf_counter() - start
    info = {"method": spec.method, "seconds": round(seconds, 3), "seed": spec.seed,
            "steps": options.get("steps", generator.default_steps), "input_bounds": bounds_source}
    chosen = {key: value for key, value in options.items() if key != "steps"}
    if chosen:
        info["options"] = chosen
    if generator.needs_bn:
        info["bn_loss"] = synth.bn_statistics_loss(model, x, device=spec.device)
    return x, info


def calibration_samples(model: Any, spec: CalibSpec, progress: SynthProgress | None = None, *,
                        input_range: tuple[float, float] | None = None) -> tuple[np.ndarray, dict]:
    """The calibration inputs for ``spec`` (``model`` is the float model, BN not folded)."""
    shape = input_shape(model, spec.size)
    if spec.source == "prior":
        return prior_samples(model, spec, input_range)
    if spec.source == "synth":
        return synthesize(model, spec, progress, input_range)
    if spec.source == "data":
        x = load_samples(spec.path, shape, limit=spec.samples, mean=spec.mean, std=spec.std)
        return x, {"path": str(spec.path)}
    raise ValueError(f"calibration source {spec.source!r} has no samples")


# images per batch when every observed tensor leaves onnxruntime (histograms): EfficientNet-Lite0 at 224 px fetches
# 13 M floats an image, so 32 images a batch held 1.6 GB; 4 images at 224 px, 32 at CIFAR's 32 px
FETCH_BATCH_PIXELS = 4 * 224 * 224


def _batches(x: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    for start in range(0, len(x), batch_size):
        yield np.ascontiguousarray(x[start:start + batch_size])


def collect_statistics(model: Any, tensors: list[str], samples: np.ndarray, *, histogram: bool,
                       channels: set[str] | frozenset[str] = frozenset(), batch_size: int = 32,
                       provider: str = "cpu") -> dict[str, TensorObserver]:
    """Observe every tensor in ``tensors`` (all graph outputs of ``model``) over ``samples``.

    Pass 1 records min/max (and per-channel moments of the tensors in ``channels``); with
    ``histogram`` a second pass fills histograms over those ranges.
    """
    session = make_session(model, provider, lean=True)
    input_name = session.get_inputs()[0].name
    fixed_batch = session.get_inputs()[0].shape[0]
    if isinstance(fixed_batch, int) and fixed_batch > 0:  # exported with a static batch (often 1)
        batch_size = fixed_batch
    elif samples.ndim == 4:  # every tensor of a batch is fetched: bound the batch by its pixels
        batch_size = int(np.clip(FETCH_BATCH_PIXELS // max(int(np.prod(samples.shape[2:])), 1), 1, batch_size))
    available = {out.name for out in session.get_outputs()}
    missing = [name for name in tensors if name not in available and name != input_name]
    if missing:
        raise ValueError(f"tensors to calibrate are not graph outputs: {missing[:5]}")
    fetched = [name for name in tensors if name != input_name]  # the input itself is observed as fed
    observers = {name: TensorObserver() for name in tensors}
    for pass_index in range(2 if histogram else 1):
        for batch in _batches(samples, batch_size):
            values = run_session(session, fetched, {input_name: batch}) if fetched else []
            pairs = list(zip(fetched, values, strict=True))
            if input_name in observers:
                pairs.append((input_name, batch))
            for name, value in pairs:
                if pass_index == 0:
                    observers[name].observe_range(value, channels=name in channels)
                else:
                    observers[name].observe_histogram(value)
    return observers


def stream_tensors(model: Any, tensors: list[str], samples: np.ndarray,
                   consume: Callable[[dict[str, np.ndarray]], None], *, batch_size: int = 32,
                   provider: str = "cpu") -> None:
    """Run ``samples`` through ``model`` (``tensors`` among its outputs) in small batches and hand each batch's values
    of ``tensors`` (the input too, as fed) to ``consume``: only one batch's activations are held at a time."""
    session = make_session(model, provider, lean=True)
    input_name = session.get_inputs()[0].name
    fetched = [name for name in tensors if name != input_name]
    if samples.ndim == 4:  # every tensor of a batch leaves onnxruntime: bound the batch by its pixels
        batch_size = int(np.clip(FETCH_BATCH_PIXELS // max(int(np.prod(samples.shape[2:])), 1), 1, batch_size))
    for batch in _batches(np.asarray(samples, np.float32), batch_size):
        values = dict(zip(fetched, run_batched(session, input_name, batch, fetched), strict=True)) if fetched else {}
        values[input_name] = batch
        consume(values)


# images per statistics batch: onnxruntime keeps each observed activation until it is pooled, so its memory grows
# with the batch (EfficientNet-Lite0 at 224 px, 64 images: 0.36 GB and 0.8 s at 2 images a batch, 0.52 GB and 1.2 s
# at 4, 0.86 GB and 1.45 s at 8, 1.5 GB and 1.4 s at 16: small batches stay in the caches)
MOMENT_BATCH_PIXELS = 2 * 224 * 224


def collect_moments(model: Any, tensors: list[str], samples: np.ndarray, *, batch_size: int | None = None,
                    provider: str = "cpu") -> dict[str, TensorObserver]:
    """Observers holding the per-channel moments of ``tensors`` (no range: see ``TensorObserver.from_moments``),
    from a model that reduces them in the graph (``graph.surgery.model_with_moments``: ``<tensor>/mean`` and
    ``/meansq`` [N, C]). Nothing larger than [batch, channels] leaves onnxruntime, so memory stays at one
    batch's activations whatever the number of samples. Each observer also keeps the per-sample moments
    (``sample_mean``, ``sample_meansq`` [N, C]) for statistics over subsets of the samples.
    """
    session = make_session(model, provider, lean=True)
    input_name = session.get_inputs()[0].name
    fixed_batch = session.get_inputs()[0].shape[0]
    if isinstance(fixed_batch, int) and fixed_batch > 0:
        batch_size = fixed_batch
    elif batch_size is None:
        batch_size = int(np.clip(MOMENT_BATCH_PIXELS // max(int(np.prod(samples.shape[2:])), 1), 1, 64))
    names = [f"{name}/{kind}" for name in tensors for kind in MOMENT_OUTPUTS]
    parts: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for batch in _batches(samples, batch_size):
        for name, value in zip(names, run_batched(session, input_name, batch, names), strict=True):
            parts[name].append(np.asarray(value, np.float64))
    observers = {}
    for name in tensors:
        mean, meansq = (np.concatenate(parts[f"{name}/{kind}"]) for kind in MOMENT_OUTPUTS)
        observers[name] = TensorObserver.from_moments(mean, meansq)
    return observers
