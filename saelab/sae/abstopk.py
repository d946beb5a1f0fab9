"""AbsTopK SAE (Zhu, Khalili & Zhu 2025, arXiv 2510.00404): top-k by magnitude, signs kept.

a_ti = z_ti at the k largest |z_ti| of each token (no ReLU), so one latent stands for a direction and its opposite;
codes are signed (statistics count a != 0). Loss: normalised MSE + aux_coef * signed AuxK.

Math, defaults and choices: docs/algorithms.md, section "AbsTopK".
"""

from __future__ import annotations

import torch
from typing_extensions import override

from saelab.kernels import SparseLayout
from saelab.sae.base import StepContext
from saelab.sae.topk import TopKSAE


class AbsTopKSAE(TopKSAE):
    """Signed top-k SAE: keep the k pre-activations of largest magnitude per token, with their sign."""

    architecture = "abstopk"
    summary = "the k largest |z| per token, signed"
    inference_form = "abstopk"
    signed = True

    @override
    def selection_scores(self, z: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """[batch, d_sae] |z| (times ||d_i|| when rescale_by_decoder_norm)."""
        return super().selection_scores(z, ctx).abs()

    @override
    def values_at(self, z_at: torch.Tensor, layout: SparseLayout, ctx: StepContext) -> torch.Tensor:
        """The kept pre-activations themselves, signs included."""
        return z_at

    @override
    def aux_scores(self, z: torch.Tensor) -> torch.Tensor:
        """Signed AuxK ranks dead latents by |z| (and keeps their signed z)."""
        return z.abs()
