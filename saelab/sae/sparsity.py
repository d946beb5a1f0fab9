"""Reaching a target L0 with no tuning: the L0 controller and per-latent quantile initialisation.

The variants that set their L0 through one coefficient (ReLU's L1 weight, JumpReLU's threshold scale, the threshold
family's lambda, top-AFA's norm scale) start their thresholds at the target's quantile and adapt that coefficient by
integral feedback on the log L0 of each training batch.

Math, defaults and choices: docs/algorithms.md, section "Sparsity target".
"""

from __future__ import annotations

import math

import torch
from torch import nn


class L0Controller(nn.Module):
    """A coefficient steered so that the training L0 settles at `target_l0`.

    value: the coefficient (positive scalar tensor). sign: +1 when raising the coefficient lowers L0, -1 when it
    raises L0. rate: the step of log(coefficient) per training step at the largest error.
    """

    def __init__(self, target_l0: float, initial: float, rate: float, sign: int = 1):
        super().__init__()
        self.target_l0, self.rate, self.sign = float(target_l0), float(rate), sign
        self.register_buffer("log_value", torch.tensor(math.log(initial)))

    @property
    def value(self) -> torch.Tensor:
        return self.log_value.exp()

    @torch.no_grad()
    def update(self, l0: float | torch.Tensor) -> None:
        """One feedback step from the mean L0 of a training batch:
        log c <- log c + sign * rate * clamp(log((l0 + 1) / (target_l0 + 1)), -1, 1)."""
        error = math.log((float(l0) + 1) / (self.target_l0 + 1))
        self.log_value += self.sign * self.rate * max(-1.0, min(1.0, error))


@torch.no_grad()
def target_quantiles(sae, x_n: torch.Tensor, max_tokens: int = 8192) -> torch.Tensor:
    """Per-latent thresholds that a fraction target_l0 / d_sae of the sample's pre-activations exceeds.

    x_n: [n, d_in] normalised inputs, of which the first max_tokens are encoded (capped so the sample stays small
    at large widths: 8192 x 2^17 floats would be 4 GB) -> [d_sae]: the (1 - target_l0 / d_sae) quantile of each
    latent's z, so sum_i P(z_i > threshold_i) = target_l0 on the sample.
    """
    z = sae.encode_pre(x_n[:max_tokens])
    n_tokens, d_sae = z.shape
    target_l0 = sae.cfg.target_l0
    rank = round(n_tokens * (1 - min(target_l0, d_sae) / d_sae))
    return z.kthvalue(min(max(rank, 1), n_tokens), dim=0).values
