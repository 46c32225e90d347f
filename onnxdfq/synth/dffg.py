"""DFFG: fast-gradient iteration for data-free quantization (Leng et al., BMVC 2023).

The BN batch-statistics alignment loss ``L(x)`` of ZeroQ (without ZeroQ's N(0, 1) input prior
by default) is minimised with a momentum fast-gradient-sign iteration (MI-FGSM run downhill):

    g_0 = 0
    g_{t+1} = mu * g_t + grad_x L(x_t) / ||grad_x L(x_t)||_1      (L1 norm per sample)
    x_{t+1} = x_t - alpha_t * sign(g_{t+1})

Every pixel moves by exactly ``alpha_t`` per step; ``alpha_t`` decays with a cosine from
``alpha`` to ``alpha_final`` so that the sign steps stop oscillating around the optimum. The
last ``keep`` iterates, ``stride`` steps apart, are all returned as calibration samples: one
optimisation of a batch of B images yields ``keep * B`` samples, which is where most of the
speed-up over ZeroQ comes from.

Tuning (batch 32 unless noted; ZeroQ's 500 Adam steps end at a batch BN loss of 0.0040 on the
shared CIFAR ResNet-20):

- steps: 40 reach ~0.02, 100 ~0.006, 150 ~0.003-0.0035 (final iterate). Default 150, keeping 8
  iterates 3 steps apart: 256 samples from one batch of 32 seeds in 150 forward/backward
  passes, where ZeroQ needs 8 x 500.
- alpha (150 steps, loss of all 256 samples): ResNet-20 0.0057 / 0.0046 / 0.0041 / 0.0038 /
  0.0039 for alpha 0.05 / 0.075 / 0.1 / 0.15 / 0.2; MobileNet-V1 (inputs in [-1, 1], batch 8)
  0.075 / 0.33 / 4.3 for alpha 0.05 / 0.1 / 0.2 (noise: 16.5). Default 0.1; pass ``alpha=0.05``
  for MobileNet-like models. Shrinking alpha whenever the loss rose did not help.
- a cosine step size beat a geometric one; momentum 0.9 beat 0.5 and 0.8; ZeroQ's input prior
  raised the final BN loss by ~50 %, hence ``input_prior_weight=0``.

Natural-image options (off by default): sign steps from Gaussian noise leave samples far rougher than
photographs. On 224-px inputs in [-1, 1] (60 steps, batch 8), the mean squared difference of neighbouring
pixels was 0.64 on EfficientNet-Lite0 and 0.40 on MobileNet-V1 against 0.018 for real val1300 images, and
the share of power at high spatial frequency was 40-170x a photograph's.

- ``init``: start from the image prior's procedural images (``pink``: 1/f noise) mapped into the input's box
  instead of Gaussian noise;
- ``blur``: smooth the gradient with a Gaussian of this many pixels before its sign is taken, so the sign
  steps move whole regions rather than single pixels;
- ``jitter`` / ``flip``: take each step's gradient on the batch rolled by a random shift of up to
  ``jitter`` pixels (and mirrored), as DeepInversion does, which costs the BN match more.

``init="pink", blur=1, alpha=0.05`` brought Lite0's roughness to 0.083 at a lower BN loss (0.38 against 0.43).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .base import Generator, StepFn, SynthOptionError, input_prior, register_generator
from .executor import TorchGraph
from .stats import BNTarget

__all__ = ["DFFGGenerator"]


@register_generator("dffg")
class DFFGGenerator(Generator):
    """Momentum fast-gradient-sign generator that keeps its intermediate iterates.

    Parameters
    ----------
    alpha, alpha_final : float
        Sign-step size at the first and the last step (cosine decay in between), in input units.
    momentum : float
        ``mu``, the decay of the accumulated normalised gradient.
    keep : int
        Number of iterates returned per seed image (the final one first).
    stride : int
        Steps between two kept iterates.
    input_prior_weight : float
        Weight of ZeroQ's N(0, 1) input term (default 0: off).
    jitter, flip : int, bool
        Random roll of up to ``jitter`` pixels (and a random mirror) of the batch before each gradient.
    init : str
        ``noise`` (Gaussian, the default) or a prior generator (``pink``, ``dead_leaves``, ``mixed``, ``ensemble``)
        for the starting batch; a prior start needs the input's box.
    blur : float
        Sigma in pixels of the Gaussian the gradient is smoothed with before its sign (0: off).
    """

    default_steps = 150

    def __init__(
        self,
        graph: TorchGraph,
        targets: Sequence[BNTarget],
        *,
        alpha: float = 0.1,
        alpha_final: float = 0.005,
        momentum: float = 0.9,
        keep: int = 8,
        stride: int = 3,
        input_prior_weight: float = 0.0,
        jitter: int = 0,
        flip: bool = False,
        init: str = "noise",
        blur: float = 0.0,
    ) -> None:
        super().__init__(graph, targets)
        if keep < 1 or stride < 1 or jitter < 0:
            raise SynthOptionError(f"keep and stride must be >= 1 and jitter >= 0, got keep={keep}, stride={stride}, "
                                   f"jitter={jitter}")
        self.alpha = alpha
        self.alpha_final = alpha_final
        self.momentum = momentum
        self.keep = keep
        self.stride = stride
        self.input_prior_weight = input_prior_weight
        self.jitter = jitter
        self.flip = flip
        self._rng = torch.Generator().manual_seed(0)
        if init not in ("noise", "pink", "dead_leaves", "mixed", "ensemble"):
            raise SynthOptionError(f"init must be noise or a prior generator (pink, dead_leaves, mixed, ensemble), "
                                   f"got {init!r}")
        self.init = init
        if blur < 0:
            raise SynthOptionError(f"blur must be >= 0 (a Gaussian's sigma in pixels), got {blur}")
        self.blur = blur

    def _kept_steps(self, steps: int) -> list[int]:
        """Step counts after which the iterate is kept, last first (never before step 1)."""
        return sorted({max(steps - i * self.stride, 1) for i in range(self.keep)}, reverse=True)

    def samples_per_run(self, batch_size: int, steps: int) -> int:
        return batch_size * len(self._kept_steps(steps))

    def step_size(self, step: int, steps: int) -> float:
        """Cosine decay from ``alpha`` (step 0) to ``alpha_final`` (last step)."""
        progress = step / max(steps - 1, 1)
        return self.alpha_final + 0.5 * (self.alpha - self.alpha_final) * (1.0 + math.cos(math.pi * progress))

    def prepare(self, batch_shape: tuple[int, ...], rng: torch.Generator) -> None:
        if self.jitter or self.flip:  # the shifts follow the run's seed; without them the seed stream is untouched
            self._rng = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=rng)))

    def seed_batch(self, batch_shape: tuple[int, ...], rng: torch.Generator, device: str) -> torch.Tensor:
        if self.init == "noise" or self.bounds is None or len(batch_shape) != 4:
            return super().seed_batch(batch_shape, rng, device)
        from .prior import InputSpace, prior_images

        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=rng))
        images = torch.from_numpy(prior_images(batch_shape[0], batch_shape[1:], InputSpace(), generator=self.init,
                                               seed=seed)).to(device)
        low, high = self.bounds
        return low + images * (high - low)

    def shifted_gradient(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The alignment gradient taken on ``x`` rolled by a random shift (and flipped), mapped back onto ``x``."""
        if not self.jitter and not self.flip or x.dim() != 4:
            return self.alignment_gradient(x)
        dy, dx = (torch.randint(-self.jitter, self.jitter + 1, (2,), generator=self._rng).tolist()
                  if self.jitter else (0, 0))
        mirror = self.flip and bool(torch.randint(0, 2, (1,), generator=self._rng))
        moved = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
        if mirror:
            moved = moved.flip(3)
        grad, loss = self.alignment_gradient(moved)
        if mirror:
            grad = grad.flip(3)
        return torch.roll(grad, shifts=(-dy, -dx), dims=(2, 3)), loss

    def run(self, x0: torch.Tensor, steps: int, on_step: StepFn) -> list[torch.Tensor]:
        kept_steps = set(self._kept_steps(steps))
        x = x0.clone()
        velocity = torch.zeros_like(x)
        reduce_dims = tuple(range(1, x.dim()))
        kept: list[torch.Tensor] = []
        for step in range(steps):
            grad, loss = self.shifted_gradient(x)
            on_step(loss / len(self.targets))
            if self.input_prior_weight:
                leaf = x.detach().requires_grad_(True)
                grad = grad + torch.autograd.grad(self.input_prior_weight * input_prior(leaf), leaf)[0]
            if self.blur and grad.dim() == 4:
                grad = gaussian_blur(grad, self.blur)
            l1 = grad.abs().sum(dim=reduce_dims, keepdim=True).clamp_min(1e-12)
            velocity = self.momentum * velocity + grad / l1
            x = self.project(x.detach() - self.step_size(step, steps) * torch.sign(velocity))
            if step + 1 in kept_steps:
                kept.append(x.clone())
        return kept[::-1]


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """``x`` (N, C, H, W) smoothed per channel by a Gaussian of ``sigma`` pixels (reflected at the borders)."""
    radius = max(1, math.ceil(3 * sigma))
    taps = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-0.5 * (taps / sigma) ** 2)
    kernel = kernel / kernel.sum()
    channels = x.shape[1]
    padded = torch.nn.functional.pad(x, (radius, radius, radius, radius), mode="reflect")
    rows = torch.nn.functional.conv2d(padded, kernel.view(1, 1, 1, -1).repeat(channels, 1, 1, 1), groups=channels)
    return torch.nn.functional.conv2d(rows, kernel.view(1, 1, -1, 1).repeat(channels, 1, 1, 1), groups=channels)
