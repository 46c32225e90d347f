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
from .stats import BNTarget, batch_moments, bn_targets, layer_alignment

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
]

logger = logging.getLogger(__name__)

ProgressFn = Callable[[int, int, float], None]  # (step, total_steps, batch BN loss)
StepFn = Callable[[torch.Tensor], None]  # called once per optimisation step with the batch BN loss


class SynthOptionError(OptionError, ValueError):
    """An unknown method or an impossible sample count / batch size / step count."""


class SynthInputError(UnsupportedModelError, ValueError):
    """The model's input cannot be synthesised (several inputs, dynamic non-batch dims)."""


_REGISTRY: dict[str, type[Generator]] = {}
# Built-in methods, imported on first use so that a method file is only loaded when asked for.
_BUILTIN_MODULES = {"zeroq": ".zeroq", "dsg": ".dsg", "dffg": ".dffg"}

G = TypeVar("G", bound="Generator")


class Generator(ABC):
    """One data-free sample generator.

    Subclasses set ``default_steps``, take their options as keyword arguments of ``__init__``
    and implement :meth:`run`. ``run`` must call ``on_step(batch_metric)`` once per step with
    :meth:`batch_metric` of the current iterate, so that every method reports the same number.
    """

    name: ClassVar[str] = ""
    default_steps: ClassVar[int] = 500

    def __init__(self, graph: TorchGraph, targets: Sequence[BNTarget]) -> None:
        self.graph = graph
        self.targets = list(targets)
        self.bounds: tuple[torch.Tensor, torch.Tensor] | None = None  # set by generate() when the input box is known

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

    @abstractmethod
    def run(self, x0: torch.Tensor, steps: int, on_step: StepFn) -> list[torch.Tensor]:
        """Optimise the batch ``x0`` for ``steps`` steps; return sample batches, best first."""

    def bn_inputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The input tensor of every BN layer for the batch ``x``, in graph order."""
        _, captures = self.graph(x, capture_bn_inputs=True)
        return [tensor for _, tensor in captures]

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
    **options: Any,
) -> np.ndarray:
    """Generate ``n`` synthetic calibration inputs for ``model`` with ``method``.

    Parameters
    ----------
    model : Any
        A float model that still has its BatchNormalization nodes.
    method : str
        A registered method: ``"zeroq"``, ``"dsg"`` or ``"dffg"`` (see :func:`available_methods`).
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
    **options
        Method-specific keyword options (e.g. ``lr`` for ZeroQ, ``alpha`` for DFFG).

    Returns
    -------
    numpy.ndarray
        float32, shape ``(n, *input_shape[1:])`` (NCHW for image models). With a fixed ``seed``
        the result is reproducible on the CPU.
    """
    if n < 1 or batch_size < 1:
        raise SynthOptionError(f"n and batch_size must be >= 1, got n={n}, batch_size={batch_size}")
    generator_cls = get_generator(method)
    check_device(device)
    sample_shape = input_sample_shape(model)
    graph = TorchGraph(model).to(device).eval()
    targets = bn_targets(graph)
    try:
        generator = generator_cls(graph, targets, **options)
    except TypeError as exc:  # an option the method does not take
        raise SynthOptionError(f"{generator_cls.name}: {exc}") from None
    if input_bounds is not None:
        generator.bounds = _bounds_tensors(input_bounds, sample_shape, device)
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
    batch_shape = (batch_size, *sample_shape)
    generator.prepare(batch_shape, rng)
    chunks: list[torch.Tensor] = []
    for run in range(runs):
        x0 = generator.project(torch.randn(batch_shape, generator=rng).to(device))
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
    batch_size: int = 64,
    device: str = "cpu",
) -> float:
    """How far the BN-input statistics of the whole set ``x`` are from the BN running statistics.

    ``L = (1/L_bn) * sum_l ( ||mu~_l - mu_l||^2 / C_l + ||sigma~_l - sigma_l||^2 / C_l )``

    where, for BN layer l with C_l channels, mu_l and sigma_l = sqrt(running_var + eps) are its
    running statistics and mu~_l, sigma~_l = sqrt(var~ + eps) the per-channel mean and (biased)
    std of its input over all of ``x`` (every sample and spatial position; accumulated in float64
    over chunks of ``batch_size``). It is ZeroQ's objective divided by the number of BN layers;
    real data gets a small value, Gaussian noise a large one.
    """
    check_device(device)
    graph = model if isinstance(model, TorchGraph) else TorchGraph(model)
    graph = graph.to(device).eval()
    targets = bn_targets(graph)
    data = torch.as_tensor(np.asarray(x, dtype=np.float32)) if not isinstance(x, torch.Tensor) else x.float()
    sums: list[torch.Tensor] = [torch.zeros(t.channels, dtype=torch.float64) for t in targets]
    squares: list[torch.Tensor] = [torch.zeros(t.channels, dtype=torch.float64) for t in targets]
    counts = [0] * len(targets)
    with torch.no_grad():
        for start in range(0, data.shape[0], batch_size):
            _, captures = graph(data[start : start + batch_size].to(device), capture_bn_inputs=True)
            for index, (_, feature) in enumerate(captures):
                flat = feature.transpose(0, 1).reshape(feature.shape[1], -1).double().cpu()
                sums[index] += flat.sum(dim=1)
                squares[index] += flat.pow(2).sum(dim=1)
                counts[index] += flat.shape[1]
    terms = []
    for target, total, square, count in zip(targets, sums, squares, counts, strict=True):
        mean = total / count
        std = torch.sqrt(torch.clamp(square / count - mean.pow(2), min=0.0) + target.eps)
        cpu_target = BNTarget(target.name, target.mean.double().cpu(), target.std.double().cpu(), target.eps)
        terms.append(float(layer_alignment(mean, std, cpu_target)))
    return float(np.mean(terms))
