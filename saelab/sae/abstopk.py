"""AbsTopK SAE (Zhu, Khalili & Zhu 2025, arXiv 2510.00404): top-k by magnitude, signs kept.

It is one proximal-gradient step of sparse coding under the constraint ||a||_0 <= k *without* a >= 0:

    S   = indices of the k largest |s_ti|,  s_ti = z_ti * ||d_i||  (rescale_by_decoder_norm)  or  z_ti
    a_ti = z_ti on S (no ReLU; negative codes allowed), 0 elsewhere          a: [batch, d_sae]
    x_hat = a @ W_dec + b_dec

so one latent can stand for a direction and its opposite (TopK needs two antipodal latents for that).
Gradients reach the k selected entries (their value is z itself). Codes are signed: statistics must count
a != 0 (`signed = True`), and negative steering coefficients are meaningful.

Loss: normalised MSE + aux_coef * AuxK, with AuxK choosing the k_aux dead latents of largest |z| and
keeping their signed z (the signed analogue of TopK's AuxK).
"""

from __future__ import annotations

import torch

from saelab.kernels import SparseLayout
from saelab.sae.base import StepContext
from saelab.sae.topk import TopKSAE


class AbsTopKSAE(TopKSAE):
    """Signed top-k SAE: keep the k pre-activations of largest magnitude per token, with their sign."""

    architecture = "abstopk"
    signed = True

    def selection_scores(self, z: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """[batch, d_sae] |z| (times ||d_i|| when rescale_by_decoder_norm)."""
        return super().selection_scores(z, ctx).abs()

    def values_at(self, z_at: torch.Tensor, layout: SparseLayout, ctx: StepContext) -> torch.Tensor:
        """The kept pre-activations themselves, signs included."""
        return z_at

    def aux_scores(self, z: torch.Tensor) -> torch.Tensor:
        """Signed AuxK ranks dead latents by |z| (and keeps their signed z)."""
        return z.abs()
