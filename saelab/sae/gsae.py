"""Gradient SAE, g-SAE (Olmo, Wilson, Forsey, Hepner, Howe & Wingate 2024, arXiv 2411.10397;
Findings of NAACL 2025, pp. 7609-7619): TopK whose *choice* of latents also weighs the downstream effect.

Selection by s = z * (1 + beta * |g . d_i|), g the LM-loss gradient at the hook in the SAE's normalised space;
activations ReLU(z) on the selection; exactly TopK at inference, without gradients or with beta = 0.

Math, defaults and choices (the score normalisation): docs/algorithms.md, section "g-SAE".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from typing_extensions import override

from saelab.config import Section, option
from saelab.errors import SaelabError
from saelab.sae.base import StepContext
from saelab.sae.topk import AuxConfig, TopKConfig, TopKSAE


@dataclass
class GSAEConfig(Section):
    name: ClassVar[str] = "gsae"

    gsae_beta: float = option(
        1.0, "g-SAE: select by z * (1 + beta * |d_i . g|) in training; beta = 0 is TopK, and inference is TopK.", min=0,
    )



class GradientSAE(TopKSAE):
    """g-SAE: select the top k of z * (1 + beta * |g . d_i|) per token; activations ReLU(z) on the selection.

    ctx.grads [batch, d_in] is g in the SAE's normalised space; the gradient term carries no autograd. The score is
    the published one, unnormalised (the sources consulted and the reasons: docs/algorithms.md, section "g-SAE"), so
    beta's useful range depends on the gradient scale (summed vs mean CE, tokens per batch, input scaling).
    """

    architecture = "gsae"
    summary = "top-k by gradient-weighted scores"
    needs_lm_grads = True
    sections = (AuxConfig, TopKConfig, GSAEConfig)
    gsae_cfg: GSAEConfig

    @override
    def validate(self) -> None:
        super().validate()
        beta = self.gsae_cfg.gsae_beta
        if beta < 0:
            raise SaelabError(f"--gsae-beta must be >= 0 (got {beta}); 0 is plain TopK.")

    def gradient_effect(self, grads: torch.Tensor) -> torch.Tensor:
        """|g @ W_dec^T|: [batch, d_in] gradients -> [batch, d_sae] |d_i . g_t| (no autograd)."""
        if grads.ndim != 2 or grads.shape[1] != self.d_in:
            raise SaelabError(
                f"g-SAE gradients must be [batch, d_in={self.d_in}] (got {tuple(grads.shape)}); "
                "harvest with --with-grads from the same hook."
            )
        with torch.no_grad():
            return (grads.to(self.W_dec) @ self.W_dec.T).abs()

    @override
    def selection_scores(self, z: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """[batch, d_sae] TopK scores times (1 + beta * |g . d_i|) when gradients are given."""
        scores = super().selection_scores(z, ctx)
        beta = self.gsae_cfg.gsae_beta
        if not ctx.training or ctx.grads is None or beta == 0:
            return scores
        if ctx.grads.shape[0] != z.shape[0]:
            raise SaelabError(f"g-SAE got {ctx.grads.shape[0]} gradient rows for a batch of {z.shape[0]} tokens.")
        return scores * (1 + beta * self.gradient_effect(ctx.grads))
