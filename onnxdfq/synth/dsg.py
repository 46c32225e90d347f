"""DSG: Diverse Sample Generation (Zhang, Qin et al., CVPR 2021, "Diversifying Sample Generation
for Accurate Data-Free Quantization").

Two changes to ZeroQ's objective, both meant to stop the samples from all looking alike:

**Slack distribution alignment (SDA).** Each BN layer's alignment is a hinge with margins:

    L_SDA^l = mean_c max(|mu~_c - mu_c| - delta_l, 0)^2 + mean_c max(|sigma~_c - sigma_c| - gamma_l, 0)^2

so that statistics within the margins cost nothing. The margins are the spread that a perfect
sample would still show: we draw features f ~ N(mu_c, sigma_c^2) with exactly the shape the BN
input has for one batch (B, C, H, W), take their batch moments, and set ``delta_l`` and
``gamma_l`` to the ``quantile`` (0.9) of ``|mu~_c - mu_c|`` and ``|sigma~_c - sigma_c|`` over
the channels. Margins for per-sample moments (below) come from the same draw, taking the
quantile over all (sample, channel) pairs of the per-sample moments.

**Layerwise sample enhancement (LSE).** Sample k of the batch additionally aligns its *own*
statistics at layer ``l(k) = (k + offset) mod L`` (the offset advances by B per batch, so every
layer gets enhanced across batches):

    L = sum_l L_SDA^l(batch) + w_lse * (1/B) sum_k L_SDA^{l(k)}(x_k) + w_in * input prior

i.e. each sample weights its own layer twice, as in the paper. Per-sample terms are skipped
for BN layers without spatial axes. Optimised with Adam exactly like ZeroQ.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .base import StepFn, input_prior, register_generator
from .executor import TorchGraph
from .stats import BNTarget, batch_moments, layer_alignment, sample_moments
from .zeroq import ZeroQGenerator

__all__ = ["DSGGenerator", "slack_margins"]


def slack_margins(
    target: BNTarget, feature_shape: Sequence[int], quantile: float, rng: torch.Generator
) -> tuple[float, float, float, float]:
    """``(delta, gamma, delta_sample, gamma_sample)`` for one BN layer (see the module docstring).

    ``feature_shape`` is the BN input's shape for one batch, e.g. (B, C, H, W).
    """
    mean, std = target.mean.cpu(), target.std.cpu()
    view = (1, -1) + (1,) * (len(feature_shape) - 2)
    features = torch.randn(tuple(feature_shape), generator=rng) * std.view(view) + mean.view(view)
    q = torch.tensor(quantile)
    batch_mean, batch_std = batch_moments(features, 0.0)
    margins = [
        torch.quantile((batch_mean - mean).abs(), q),
        torch.quantile((batch_std - std).abs(), q),
    ]
    if len(feature_shape) > 2:
        per_mean, per_std = sample_moments(features, 0.0)
        margins += [torch.quantile((per_mean - mean).abs(), q), torch.quantile((per_std - std).abs(), q)]
    else:
        margins += margins
    return tuple(float(m) for m in margins)  # type: ignore[return-value]


@register_generator("dsg")
class DSGGenerator(ZeroQGenerator):
    """DSG: slack alignment plus layerwise sample enhancement, optimised with Adam like ZeroQ.

    Parameters
    ----------
    quantile : float
        Which quantile of the finite-sample deviations sets the margins (paper: 0.9).
    enhance_weight : float
        Weight of the layerwise sample-enhancement term; 0 gives SDA alone.
    **adam_options
        ZeroQ's: ``lr``, ``input_prior_weight``, ``plateau_patience``.
    """

    default_steps = 500

    def __init__(self, graph: TorchGraph, targets: Sequence[BNTarget], *, quantile: float = 0.9,
                 enhance_weight: float = 1.0, **adam_options: float) -> None:
        super().__init__(graph, targets, **adam_options)
        self.quantile = quantile
        self.enhance_weight = enhance_weight
        self.margins: list[tuple[float, float, float, float]] = []
        self._offset = 0

    def prepare(self, batch_shape: tuple[int, ...], rng: torch.Generator) -> None:
        device = next(iter(self.graph.buffers())).device
        with torch.no_grad():
            probe = self.bn_inputs(torch.zeros((1, *batch_shape[1:]), device=device))
        self.margins = [
            slack_margins(target, (batch_shape[0], *feature.shape[1:]), self.quantile, rng)
            for target, feature in zip(self.targets, probe, strict=True)
        ]

    def loss(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(objective, batch metric)`` for the batch ``x``."""
        features = self.bn_inputs(x)
        batch_size, layers = x.shape[0], len(self.targets)
        slack = x.new_zeros(())
        enhance = x.new_zeros(())
        owner = (torch.arange(batch_size) + self._offset) % layers
        for index, (feature, target) in enumerate(zip(features, self.targets, strict=True)):
            delta, gamma, delta_s, gamma_s = self.margins[index]
            slack = slack + layer_alignment(*batch_moments(feature, target.eps), target, delta, gamma)
            picked = torch.nonzero(owner == index).flatten()
            if self.enhance_weight and picked.numel() and feature.dim() > 2:
                per_mean, per_std = sample_moments(feature[picked.to(feature.device)], target.eps)
                enhance = enhance + layer_alignment(per_mean, per_std, target, delta_s, gamma_s).sum()
        loss = slack + self.enhance_weight * enhance / batch_size
        if self.input_prior_weight:
            loss = loss + self.input_prior_weight * input_prior(x)
        return loss, self.batch_metric(features)

    def run(self, x0: torch.Tensor, steps: int, on_step: StepFn) -> list[torch.Tensor]:
        if not self.margins:
            self.prepare(tuple(x0.shape), torch.Generator().manual_seed(0))
        samples = super().run(x0, steps, on_step)  # Adam on self.loss
        self._offset += x0.shape[0]
        return samples
