"""ZeroQ distilled data (Cai et al., CVPR 2020, "ZeroQ: A Novel Zero Shot Quantization Framework").

Starting from x ~ N(0, 1), minimise with Adam

    L(x) = sum_l ( ||mu~_l - mu_l||^2 + ||sigma~_l - sigma_l||^2 ) / C_l
           + w_in * ( ||mean_c(x)||^2 + ||std_c(x) - 1||^2 ) / C_in

where mu~_l, sigma~_l are the per-channel batch statistics of BN layer l's input and the last
term (ZeroQ's input prior) pulls the input channels towards N(0, 1). As in the reference code the
learning rate drops by 10x when the loss stops improving (``ReduceLROnPlateau``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .base import Generator, StepFn, input_prior, register_generator
from .executor import TorchGraph
from .stats import BNTarget, alignment_loss

__all__ = ["ZeroQGenerator"]


@register_generator("zeroq")
class ZeroQGenerator(Generator):
    """ZeroQ: Adam on the batch-statistics alignment loss.

    Parameters
    ----------
    lr : float
        Adam learning rate (ZeroQ: 0.5).
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

    def run(self, x0: torch.Tensor, steps: int, on_step: StepFn) -> list[torch.Tensor]:
        x = x0.clone().requires_grad_(True)
        optimizer = torch.optim.Adam([x], lr=self.lr)
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, factor=0.1, patience=self.plateau_patience, min_lr=1e-4
        )
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            features = self.bn_inputs(x)
            bn_loss = alignment_loss(features, self.targets)
            on_step(bn_loss.detach() / len(self.targets))
            loss = bn_loss + self.input_prior_weight * input_prior(x) if self.input_prior_weight else bn_loss
            loss.backward()
            optimizer.step()
            scheduler.step(float(loss))
        return [x.detach()]
