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

from saelab.sae.base import StepContext
from saelab.sae.topk import TopKSAE, normalized_mse, scatter_topk


class AbsTopKSAE(TopKSAE):
    """Signed top-k SAE: keep the k pre-activations of largest magnitude per token, with their sign."""

    architecture = "abstopk"
    sections = ("aux", "topk")
    signed = True

    def selection_scores(self, z: torch.Tensor, ctx: StepContext | None) -> torch.Tensor:
        """[batch, d_sae] |z| (times ||d_i|| when rescale_by_decoder_norm)."""
        return super().selection_scores(z, ctx).abs()

    def activate(self, z: torch.Tensor, ctx: StepContext | None = None) -> torch.Tensor:
        """z [batch, d_sae] -> a [batch, d_sae]: z on the k largest |scores| per row, 0 elsewhere."""
        return scatter_topk(z, self.selection_scores(z, ctx), self.cfg.k)

    def auxk_loss(
        self, x_n: torch.Tensor, z: torch.Tensor, x_hat: torch.Tensor, dead: torch.Tensor | None
    ) -> torch.Tensor:
        """Signed AuxK: the k_aux dead latents of largest |z| (values z) reconstruct the detached residual.

        L_aux = ||e - a_aux @ W_dec||^2 / ||e - mean(e)||^2 with e = x_n - x_hat detached; 0 if nothing is dead.
        """
        n_dead = 0 if dead is None else int(dead.sum())
        if n_dead == 0:
            return z.new_zeros(())
        k_aux = min(self.option("aux").k_aux or self.d_in // 2, n_dead)
        residual = (x_n - x_hat).detach()
        dead_scores = z.abs().masked_fill(~dead, float("-inf"))
        a_aux = scatter_topk(z, dead_scores, k_aux)
        return normalized_mse(residual, a_aux @ self.W_dec).nan_to_num(0.0)
