"""ZeroQ distilled data (Cai et al., CVPR 2020, "ZeroQ: A Novel Zero Shot Quantization Framework").

Starting from x ~ N(0, 1), minimise with Adam

    L(x) = sum_l ( ||mu~_l - mu_l||^2 + ||sigma~_l - sigma_l||^2 ) / C_l
           + w_in * ( ||mean_c(x)||^2 + ||std_c(x) - 1||^2 ) / C_in

where mu~_l, sigma~_l are the per-channel batch statistics of BN layer l's input and the last
term (ZeroQ's input prior) pulls the input channels towards N(0, 1). As in the reference code the
learning rate drops by 10x when the loss stops improving (``ReduceLROnPlateau``). The reference
code matches per-sample statistics; like DESIGN.md we match batch statistics, which is what the
activation ranges are calibrated on (and converges faster).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .base import Generator, StepFn, input_prior, register_generator, run_adam
from .executor import TorchGraph
from .stats import BNTarget, alignment_loss

__all__ = ["ZeroQGenerator"]


@register_generator("zeroq")
class ZeroQGenerator(Generator):
    """ZeroQ: Adam on the batch-statistics alignment loss.

    Parameters
    ----------
    lr : float
        Adam learning rate (ZeroQ: 0.5; 0.1 converges about as well, 0.05 clearly slower).
    input_prior_weight : float
        Weight of the N(0, 1) input term; 0 disables it.
    plateau_patience : int
        Steps without improvement before the learning rate is divided by 10.
    """

    default_steps = 500

    def __init__(
        self,
        graph: TorchGraph,
        targets: Sequence[BNTarget],
        *,
        lr: float = 0.5,
        input_prior_weight: float = 1.0,
        plateau_patience: int = 20,
    ) -> None:
        super().__init__(graph, targets)
        self.lr = lr
        self.input_prior_weight = input_prior_weight
        self.plateau_patience = plateau_patience

    def loss(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(objective, batch metric)`` for the batch ``x``."""
        bn_loss = alignment_loss(self.bn_inputs(x), self.targets)
        metric = bn_loss.detach() / len(self.targets)
        if self.input_prior_weight:
            bn_loss = bn_loss + self.input_prior_weight * input_prior(x)
        return bn_loss, metric

    def run(self, x0: torch.Tensor, steps: int, on_step: StepFn) -> list[torch.Tensor]:
        x = run_adam(x0, steps, self.loss, on_step, lr=self.lr, plateau_patience=self.plateau_patience,
                     project=self.project if self.bounds is not None else None)
        return [x]
