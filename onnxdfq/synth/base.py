"""Generator interface, registry and harness for BN-statistics synthetic calibration data.

A generator optimises a batch of inputs so that every BatchNormalization layer sees inputs whose
per-channel statistics match the layer's running mean and variance. :func:`generate` owns
everything common (building the torch graph, seeding, batching, progress); a method is one class
with a ``run`` loop, registered under its name with :func:`register_generator`.

Adding a method: write ``onnxdfq/synth/<name>.py`` with a ``Generator`` subclass decorated with
``@register_generator("<name>")`` and add it to ``_BUILTIN_MODULES`` below (or just import the
module before calling :func:`generate`; registration happens at import).
"""

from __future__ import annotations

import importlib
import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch

from onnxdfq.errors import OptionError, UnsupportedModelError
from onnxdfq.graph.io import model_input

from .executor import TorchGraph
from .stats import BNTarget, alignment_loss, batch_moments, bn_targets, layer_alignment

__all__ = [
    "Generator",
    "ProgressFn",
    "StepFn",
    "register_generator",
    "get_generator",
    "available_methods",
    "generate",
    "bn_statistics_loss",
    "input_sample_shape",
    "input_prior",
    "run_adam",
    "SynthOptionError",
    "SynthInputError",
    "check_device",
    "gradient_chunk",
]

logger = logging.getLogger(__name__)

ProgressFn = Callable[[int, int, float], None]  # (step, total_steps, batch BN loss)
StepFn = Callable[[torch.Tensor], None]  # called once per optimisation step with the batch BN loss

# input pixels one backward pass of the BN alignment takes at once: autograd holds every activation of what it runs,
# and EfficientNet-Lite0 at 224 px held 5.3 GB for DFFG's batch of 32. Larger batches take the same gradient in
# chunks (Generator.alignment_gradient); CIFAR's 32 px batches stay whole.
GRADIENT_CHUNK_PIXELS = 8 * 224 * 224


def gradient_chunk(batch_shape: Sequence[int]) -> int:
    """Images a backward pass of the alignment loss runs at once for a batch of ``batch_shape``."""
    pixels = max(math.prod(batch_shape[2:]), 1)
    return int(np.clip(GRADIENT_CHUNK_PIXELS // pixels, 1, batch_shape[0]))


class SynthOptionError(OptionError, ValueError):
    """An unknown method or an impossible sample count / batch size / step count."""


class SynthInputError(UnsupportedModelError, ValueError):
    """The model's input cannot be synthesised (several inputs, dynamic non-batch dims)."""


_REGISTRY: dict[str, type[Generator]] = {}
# Built-in methods, imported on first use so that a method file is only loaded when asked for.
_BUILTIN_MODULES = {"zeroq": ".zeroq", "dsg": ".dsg", "dffg": ".dffg", "invert": ".invert"}

G = TypeVar("G", bound="Generator")


class Generator(ABC):
    """One data-free sample generator.

    Subclasses set ``default_steps``, take their options as keyword arguments of ``__init__``
    and implement :meth:`run`. ``run`` must call ``on_step(batch_metric)`` once per step with
    :meth:`batch_metric` of the current iterate, so that every method reports the same number.
    """

    name: ClassVar[str] = ""
    default_steps: ClassVar[int] = 500
    needs_bn: ClassVar[bool] = True  # matches BN running statistics (False: works on a model without BN)
    needs_pixel_box: ClassVar[bool] = False  # generates in the input's pixel box (generate's input_bounds)

    def __init__(self, graph: TorchGraph, targets: Sequence[BNTarget]) -> None:
        self.graph = graph
        self.targets = list(targets)
        self.bounds: tuple[torch.Tensor, torch.Tensor] | None = None  # set by generate() when the input box is known
        self.chunk: int | None = None  # images per backward pass (alignment_gradient); None: the whole batch

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` clamped into the input's box (each channel's image of pixels 0..1), when it is known."""
        if self.bounds is None:
            return x
        return torch.maximum(torch.minimum(x, self.bounds[1]), self.bounds[0])

    def samples_per_run(self, batch_size: int, steps: int) -> int:
        """How many samples one call of :meth:`run` on a batch of ``batch_size`` returns."""
        return batch_size

    def prepare(self, batch_shape: tuple[int, ...], rng: torch.Generator) -> None:  # noqa: B027
        """Hook run once before the first batch (e.g. to calibrate margins); default: nothing."""

    def seed_batch(self, batch_shape: tuple[int, ...], rng: torch.Generator, device: str) -> torch.Tensor:
        """The starting batch of one run: Gaussian noise, inside the input's box when it is known."""
        return self.project(torch.randn(batch_shape, generator=rng).to(device))

    @abstractmethod
    def run(self, x0: torch.Tensor, steps: int, on_step: StepFn) -> list[torch.Tensor]:
        """Optimise the batch ``x0`` for ``steps`` steps; return sample batches, best first."""

    def bn_inputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The input tensor of every BN layer for the batch ``x``, in graph order."""
        _, captures = self.graph(x, capture_bn_inputs=True)
        return [tensor for _, tensor in captures]

    def alignment_gradient(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(d loss / d x, loss)`` of :func:`alignment_loss` on the whole batch ``x``, ``self.chunk`` images at a time.

        The loss depends on the batch only through each BN input's per-channel mean ``m`` and second moment ``s``,
        so its gradient at a feature value ``f`` of channel c is ``(dL/dm_c + 2 f dL/ds_c) / n`` (n positions per
        channel). One pass without autograd sums the moments in float64; a second pass differentiates
        ``sum_c (dL/dm_c sum f + dL/ds_c sum f^2) / n`` chunk by chunk, which has that gradient: the same numbers
        as one backward pass over the batch, with one chunk's activations held.
        """
        chunk = self.chunk or len(x)
        if chunk >= len(x):
            x = x.detach().requires_grad_(True)
            loss = alignment_loss(self.bn_inputs(x), self.targets)
            (grad,) = torch.autograd.grad(loss, x)
            return grad, loss.detach()
        with torch.no_grad():
            sums, squares, counts = bn_input_sums(self.graph, x, chunk)
        means = [(total / count).requires_grad_(True) for total, count in zip(sums, counts, strict=True)]
        seconds = [(square / count).requires_grad_(True) for square, count in zip(squares, counts, strict=True)]
        loss = sum(layer_alignment(mean, torch.sqrt(torch.clamp(second - mean.pow(2), min=0.0) + target.eps), target)
                   for mean, second, target in zip(means, seconds, self.targets, strict=True))
        grads = torch.autograd.grad(loss, means + seconds)
        per_mean = [(g / n).float() for g, n in zip(grads[: len(means)], counts, strict=True)]
        per_second = [(g / n).float() for g, n in zip(grads[len(means):], counts, strict=True)]
        grad = torch.empty_like(x)
        for start in range(0, len(x), chunk):
            piece = x[start : start + chunk].detach().requires_grad_(True)
            surrogate = piece.new_zeros(())
            for feature, a, b in zip(self.bn_inputs(piece), per_mean, per_second, strict=True):
                shape = (1, -1) + (1,) * (feature.dim() - 2)
                surrogate = surrogate + (feature * a.view(shape)).sum() + (feature.pow(2) * b.view(shape)).sum()
            (grad[start : start + chunk],) = torch.autograd.grad(surrogate, piece)
        return grad, loss.detach().float()

    def batch_metric(self, features: list[torch.Tensor]) -> torch.Tensor:
        """:func:`bn_statistics_loss` of the current batch (detached)."""
        with torch.no_grad():
            terms = [layer_alignment(*batch_moments(f, t.eps), t) for f, t in zip(features, self.targets, strict=True)]
            return torch.stack(terms).mean()


def input_prior(x: torch.Tensor) -> torch.Tensor:
    """ZeroQ's input term: per-channel batch mean/std of ``x`` against N(0, 1)."""
    mean, std = batch_moments(x, 0.0)
    return (mean.pow(2) + (std - 1.0).pow(2)).mean()


LossFn = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # x -> (loss, batch metric)


def run_adam(
    x0: torch.Tensor, steps: int, loss_fn: LossFn, on_step: StepFn, *, lr: float, plateau_patience: int,
    project: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Minimise ``loss_fn`` over the batch with Adam; the learning rate drops 10x on plateaus.

    This is ZeroQ's optimiser (``ReduceLROnPlateau``, floor 1e-4); DSG uses it too. ``project`` maps the
    iterate back into the input's box after every step.
    """
    x = x0.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([x], lr=lr)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, factor=0.1, patience=plateau_patience, min_lr=1e-4
    )
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        loss, metric = loss_fn(x)
        on_step(metric)
        loss.backward()
        optimizer.step()
        scheduler.step(float(loss.detach()))
        if project is not None:
            with torch.no_grad():
                x.copy_(project(x))
    return x.detach()


def register_generator(name: str) -> Callable[[type[G]], type[G]]:
    """Class decorator: make a :class:`Generator` subclass available to :func:`generate`."""

    def decorate(cls: type[G]) -> type[G]:
        cls.name = name
        _REGISTRY[name.lower()] = cls
        return cls

    return decorate


def available_methods() -> list[str]:
    return sorted(set(_REGISTRY) | set(_BUILTIN_MODULES))


def get_generator(method: str) -> type[Generator]:
    """The generator class registered as ``method`` (case-insensitive)."""
    key = method.lower()
    if key not in _REGISTRY and key in _BUILTIN_MODULES:
        importlib.import_module(_BUILTIN_MODULES[key], __package__)
    if key not in _REGISTRY:
        raise SynthOptionError(f"unknown synthetic-data method {method!r}; available: {', '.join(available_methods())}")
    return _REGISTRY[key]


def check_device(device: str) -> None:
    """Raise SynthOptionError unless torch can use ``device`` (e.g. CUDA asked for on a CPU build)."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SynthOptionError(f"--device {device} asked for but torch {torch.__version__} sees no CUDA device; "
                               "use --device cpu")
    if not device.startswith(("cpu", "cuda")):
        raise SynthOptionError(f"--device must be cpu or cuda, got {device!r}")


def input_sample_shape(model: Any) -> tuple[int, ...]:
    """The model input's shape without its batch axis, e.g. (3, 32, 32); must be static."""
    try:
        name, dims = model_input(model, "synthetic data")
    except UnsupportedModelError as exc:
        raise SynthInputError(str(exc)) from None
    shape = tuple(-1 if d is None else d for d in dims[1:])
    if len(dims) < 2 or any(s <= 0 for s in shape):
        raise SynthInputError(f"input {name!r} must have static non-batch dims, got {shape}")
    return shape


def generate(
    model: Any,
    method: str,
    n: int,
    *,
    batch_size: int = 32,
    seed: int = 0,
    device: str = "cpu",
    steps: int | None = None,
    progress: ProgressFn | None = None,
    input_bounds: tuple[Sequence[float], Sequence[float]] | None = None,
    chunk: int | None = None,
    **options: Any,
) -> np.ndarray:
    """Generate ``n`` synthetic calibration inputs for ``model`` with ``method``.

    Parameters
    ----------
    model : Any
        A float model; one that still has its BatchNormalization nodes for the methods that match BN statistics.
    method : str
        A registered method: ``"zeroq"``, ``"dsg"`` or ``"dffg"`` (BN statistics), or ``"invert"`` (class-conditional
        inversion of a classifier, for a model without BN; needs ``input_bounds``). See :func:`available_methods`.
    n : int
        Number of samples. Batches of ``batch_size`` are optimised until ``n`` are collected.
    steps : int, optional
        Optimisation steps per batch; the method's ``default_steps`` when omitted.
    progress : callable, optional
        ``progress(step, total, loss)`` after every step; ``loss`` is the current batch's
        :func:`bn_statistics_loss`, ``total`` the number of steps over all batches.
    input_bounds : (lows, highs), optional
        Per-channel (or one) bounds of real inputs, e.g. the image of pixels 0 and 1 under the
        preprocessing. Every iterate is projected into them: unbounded, BN matching drives some pixels
        far outside what an image can give (ResNet-20's DFFG samples reached -6.8 where real inputs end
        at -2.1), and whatever learns on the samples widens its input grid for them.
    chunk : int, optional
        Images per backward pass where the method supports it (DFFG); the gradient is the whole batch's either
        way, only the memory held changes. Default: :func:`gradient_chunk` (the whole batch below 8 images at 224 px).
    **options
        Method-specific keyword options (e.g. ``lr`` for ZeroQ, ``alpha`` for DFFG).

    Returns
    -------
    numpy.ndarray
        float32, shape ``(n, *input_shape[1:])`` (NCHW for image models). With a fixed ``seed``
        the result is reproducible on the CPU.
    """
    if n < 1 or batch_size < 1 or (chunk is not None and chunk < 1):
        raise SynthOptionError(f"n, batch_size and chunk must be >= 1, got n={n}, batch_size={batch_size}, "
                               f"chunk={chunk}")
    generator_cls = get_generator(method)
    check_device(device)
    sample_shape = input_sample_shape(model)
    graph = TorchGraph(model).to(device).eval()
    if input_bounds is None and generator_cls.needs_pixel_box:
        raise SynthOptionError(f"{generator_cls.name} generates images and needs input_bounds: the preprocessing's "
                               "image of pixels 0 and 1")
    targets = bn_targets(graph) if generator_cls.needs_bn else []
    try:
        generator = generator_cls(graph, targets, **options)
    except TypeError as exc:  # an option the method does not take
        raise SynthOptionError(f"{generator_cls.name}: {exc}") from None
    if input_bounds is not None:
        generator.bounds = _bounds_tensors(input_bounds, sample_shape, device)
    batch_shape = (batch_size, *sample_shape)
    generator.chunk = chunk or gradient_chunk(batch_shape)
    steps = generator_cls.default_steps if steps is None else steps
    if steps < 1:
        raise SynthOptionError(f"steps must be >= 1, got {steps}")
    runs = math.ceil(n / generator.samples_per_run(batch_size, steps))
    total, done = runs * steps, 0

    def on_step(metric: torch.Tensor) -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total, float(metric))

    rng = torch.Generator().manual_seed(seed)
    generator.prepare(batch_shape, rng)
    chunks: list[torch.Tensor] = []
    for run in range(runs):
        x0 = generator.seed_batch(batch_shape, rng, device)
        chunks.extend(sample.detach().cpu() for sample in generator.run(x0, steps, on_step))
        logger.debug("%s: batch %d/%d done", generator_cls.name, run + 1, runs)
    return torch.cat(chunks)[:n].numpy().astype(np.float32, copy=False)


def _bounds_tensors(bounds: tuple[Sequence[float], Sequence[float]], sample_shape: tuple[int, ...],
                    device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(lows, highs) as tensors broadcasting over a batch: one value, or one per channel (axis 1)."""
    shape = (1, -1) + (1,) * (len(sample_shape) - 1)
    lows, highs = (torch.as_tensor(np.asarray(b, np.float32).reshape(-1)) for b in bounds)
    if lows.shape != highs.shape or lows.numel() not in (1, sample_shape[0]) or bool((lows >= highs).any()):
        raise SynthOptionError(f"input_bounds must be one or {sample_shape[0]} (low, high) pairs with low < high, "
                               f"got {bounds}")
    return lows.view(shape).to(device), highs.view(shape).to(device)


def bn_statistics_loss(
    model: Any | TorchGraph,
    x: np.ndarray | torch.Tensor,
    *,
    batch_size: int | None = None,
    device: str = "cpu",
) -> float:
    """How far the BN-input statistics of the whole set ``x`` are from the BN running statistics.

    ``L = (1/L_bn) * sum_l ( ||mu~_l - mu_l||^2 / C_l + ||sigma~_l - sigma_l||^2 / C_l )``

    where, for BN layer l with C_l channels, mu_l and sigma_l = sqrt(running_var + eps) are its
    running statistics and mu~_l, sigma~_l = sqrt(var~ + eps) the per-channel mean and (biased)
    std of its input over all of ``x`` (every sample and spatial position; accumulated in float64
    over chunks of ``batch_size``: by default 64 images, 8 at 224 px as in :func:`gradient_chunk`, since every
    BN input of a chunk is held). It is ZeroQ's objective divided by the number of BN layers; real data gets a
    small value, Gaussian noise a large one.
    """
    check_device(device)
    graph = model if isinstance(model, TorchGraph) else TorchGraph(model)
    graph = graph.to(device).eval()
    targets = bn_targets(graph)
    data = torch.as_tensor(np.asarray(x, dtype=np.float32)) if not isinstance(x, torch.Tensor) else x.float()
    batch_size = batch_size or gradient_chunk((64, *data.shape[1:]))
    sums, squares, counts = bn_input_sums(graph, data, batch_size, device)
    terms = []
    for target, total, square, count in zip(targets, sums, squares, counts, strict=True):
        mean, square = total.cpu() / count, square.cpu()
        std = torch.sqrt(torch.clamp(square / count - mean.pow(2), min=0.0) + target.eps)
        cpu_target = BNTarget(target.name, target.mean.double().cpu(), target.std.double().cpu(), target.eps)
        terms.append(float(layer_alignment(mean, std, cpu_target)))
    return float(np.mean(terms))


def bn_input_sums(graph: TorchGraph, x: torch.Tensor, batch_size: int, device: str | None = None
                  ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[int]]:
    """Per BN layer: the float64 per-channel sum and sum of squares of its input over ``x`` (every sample and
    position, ``batch_size`` samples at a time, without autograd) and the number of positions summed."""
    sums: list[torch.Tensor] = []
    squares: list[torch.Tensor] = []
    counts: list[int] = []
    with torch.no_grad():
        for start in range(0, x.shape[0], batch_size):
            piece = x[start : start + batch_size]
            _, captures = graph(piece if device is None else piece.to(device), capture_bn_inputs=True)
            for index, (_, feature) in enumerate(captures):
                flat = feature.transpose(0, 1).reshape(feature.shape[1], -1).double()
                if index == len(sums):
                    sums.append(torch.zeros(flat.shape[0], dtype=torch.float64, device=flat.device))
                    squares.append(torch.zeros_like(sums[-1]))
                    counts.append(0)
                sums[index] += flat.sum(dim=1)
                squares[index] += flat.pow(2).sum(dim=1)
                counts[index] += flat.shape[1]
    return sums, squares, counts
