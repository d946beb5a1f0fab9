"""Input normalisation: the map between a hook's raw activations and the space an SAE trains in.

Math, defaults and choices: docs/algorithms.md, section "Input normalisation".
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

INPUT_NORMS = ("none", "constant", "layernorm")
LAYERNORM_EPS = 1e-5


class TokenStats(NamedTuple):
    """Per-token statistics of a layer-norm input: mean and std, each [batch, 1]."""

    mean: torch.Tensor
    std: torch.Tensor


class InputNorm:
    """One of three modes (SAEConfig.input_norm), over an SAE's `input_scale` buffer c:

        none        x_n = x                             (c stays 1)
        constant    x_n = c x,  c = sqrt(d_in) / E||x||  (fitted once on a sample; folded into the saved weights)
        layernorm   x_n = (x - mean) / (std + eps) per token (OpenAI's and SAELens' convention, so their SAEs load
                    exactly); undone without eps, as they do

    `to_sae` returns the per-token statistics (TokenStats, or None) that `from_sae` needs.
    """

    def __init__(self, mode: str, scale: torch.Tensor):
        self.mode = mode
        self.scale = scale  # the SAE's input_scale buffer [], shared (fit writes into it)

    @torch.no_grad()
    def fit(self, x: torch.Tensor) -> None:
        """Constant mode: c = sqrt(d_in) / mean ||x|| over a raw sample x [n, d_in]; the other modes have no state."""
        if self.mode == "constant":
            self.scale.fill_(math.sqrt(x.shape[-1]) / x.norm(dim=1).mean().clamp_min(1e-12))

    def to_sae(self, x: torch.Tensor) -> tuple[torch.Tensor, TokenStats | None]:
        """Raw x [batch, d_in] -> (x_n [batch, d_in], the statistics `from_sae` needs)."""
        if self.mode == "layernorm":
            mean = x.mean(dim=-1, keepdim=True)
            std = x.std(dim=-1, keepdim=True)
            return (x - mean) / (std + LAYERNORM_EPS), TokenStats(mean, std)
        return x * self.scale, None

    def from_sae(self, x_hat: torch.Tensor, stats: TokenStats | None) -> torch.Tensor:
        """A reconstruction x_hat_n [batch, d_in] in the SAE's space -> raw space (the inverse of `to_sae`)."""
        if self.mode == "layernorm":
            return x_hat * stats.std + stats.mean
        return x_hat / self.scale

    def change_from_sae(self, change: torch.Tensor, stats: TokenStats | None) -> torch.Tensor:
        """A change [batch, d_in] of a reconstruction in the SAE's space -> the same change in raw space (the
        linear part of `from_sae`: divided by c, or times each token's std)."""
        return change * stats.std if self.mode == "layernorm" else change / self.scale

    def grads_to_sae(self, grads: torch.Tensor, stats: TokenStats | None) -> torch.Tensor:
        """d(loss)/dx [batch, d_in] -> d(loss)/dx_n by the chain rule through `to_sae` (first order for layer norm:
        times each token's std; constant: divided by c)."""
        return grads * stats.std if self.mode == "layernorm" else grads / self.scale

    @torch.no_grad()
    def fold(self, W_enc: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor) -> float | None:
        """Constant mode with c != 1: move c into the weights in place (W_enc [d_in, d_sae] times c; W_dec
        [d_sae, d_in] and b_dec [d_in] divided by c) and set c to 1, so the SAE maps raw x to raw x_hat with the
        same code. Returns the folded c (None when there was nothing to fold)."""
        c = self.scale.clone()
        if self.mode != "constant" or c == 1:
            return None
        W_enc *= c
        W_dec /= c
        b_dec /= c
        self.scale.fill_(1.0)
        return float(c)

    def encoder_columns(self, columns: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Encoder columns w [n, d_in] acting on x_n -> the raw-space weights acting on x [n, d_in], so that
        x . result = x_n . w up to the bias terms (layer norm: centred and divided by each token's std + eps)."""
        if self.mode == "layernorm":
            return (columns - columns.mean(-1, keepdim=True)) / (x.std(-1, keepdim=True) + LAYERNORM_EPS)
        return columns * self.scale.to(x.dtype)
