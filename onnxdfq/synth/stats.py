"""BatchNorm statistics targets and the alignment losses shared by every generator.

Notation, per BN layer l with C channels: ``mu``, ``sigma = sqrt(running_var + eps)`` are the
running statistics; ``mu~``, ``sigma~ = sqrt(var~ + eps)`` are the statistics of the BN's input on
the synthetic batch (biased variance). "Batch" moments reduce over every axis but the channel
axis; "per-sample" moments reduce over the spatial axes only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from onnxdfq.errors import UnsupportedModelError

from .executor import TorchGraph

__all__ = [
    "NoBatchNormError",
    "BNTarget",
    "bn_targets",
    "batch_moments",
    "sample_moments",
    "layer_alignment",
    "alignment_loss",
]


class NoBatchNormError(UnsupportedModelError, ValueError):
    """The model has no BatchNormalization node, so there are no statistics to match."""


@dataclass(frozen=True)
class BNTarget:
    """Running statistics of one BN layer, as the targets of the alignment losses."""

    name: str
    mean: torch.Tensor  # [C]
    std: torch.Tensor  # [C], sqrt(running_var + eps)
    eps: float

    @property
    def channels(self) -> int:
        return int(self.mean.numel())


def bn_targets(graph: TorchGraph) -> list[BNTarget]:
    """One :class:`BNTarget` per BatchNormalization node, in graph order.

    Raises :class:`NoBatchNormError` (an ``UnsupportedModelError`` and a ``ValueError``) when the
    graph has no BatchNormalization: every generator here needs the BN running statistics, and a
    model with BN already folded has none.
    """
    stats = graph.bn_running_stats()
    if not stats:
        raise NoBatchNormError(
            "the model has no BatchNormalization nodes: BN-statistics data generation needs the "
            "running mean/var of every BN (use the model before BN folding)"
        )
    return [
        BNTarget(name, mean.detach().float(), torch.sqrt(var.detach().float() + eps), eps)
        for name, mean, var, eps in stats
    ]


def batch_moments(features: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``(mu~, sigma~)`` of ``features`` [N, C, ...] over every axis but axis 1."""
    dims = [0, *range(2, features.dim())]
    var, mean = torch.var_mean(features, dim=dims, correction=0)
    return mean, torch.sqrt(var + eps)


def sample_moments(features: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample, per-channel ``(mu~, sigma~)``, each [N, C], over the spatial axes."""
    flat = features.reshape(features.shape[0], features.shape[1], -1)
    var, mean = torch.var_mean(flat, dim=2, correction=0)
    return mean, torch.sqrt(var + eps)


def layer_alignment(
    mean: torch.Tensor,
    std: torch.Tensor,
    target: BNTarget,
    mean_margin: float | torch.Tensor = 0.0,
    std_margin: float | torch.Tensor = 0.0,
) -> torch.Tensor:
    """``mean_c(max(|mu~ - mu| - delta, 0)^2) + mean_c(max(|sigma~ - sigma| - gamma, 0)^2)``.

    With zero margins this is ``(||mu~ - mu||^2 + ||sigma~ - sigma||^2) / C``. ``mean``/``std``
    may carry leading sample axes ([N, C]); the channel mean is then taken per sample and the
    result has shape [N].
    """
    mean_gap = torch.relu(torch.abs(mean - target.mean) - mean_margin)
    std_gap = torch.relu(torch.abs(std - target.std) - std_margin)
    return mean_gap.pow(2).mean(dim=-1) + std_gap.pow(2).mean(dim=-1)


def alignment_loss(features: list[torch.Tensor], targets: list[BNTarget]) -> torch.Tensor:
    """ZeroQ's loss: sum over BN layers of the batch-moment :func:`layer_alignment`."""
    total = features[0].new_zeros(())
    for feature, target in zip(features, targets, strict=True):
        total = total + layer_alignment(*batch_moments(feature, target.eps), target)
    return total
