"""Gradient SAE, g-SAE (Olmo, Wilson, Forsey, Hepner, Howe & Wingate 2024, arXiv 2411.10397;
Findings of NAACL 2025, pp. 7609-7619): TopK whose *choice* of latents also weighs the downstream effect.

With g = dL/dx [batch, d_in] the gradient of the LM's next-token loss at the hooked activation (in the SAE's
normalised space: g_raw / c when inputs are scaled by c),

    e_ti  = |g_t . d_i|  = |g @ W_dec^T|_ti                        [batch, d_sae]
    s_ti  = z_ti * (1 + beta * e_ti)     = z + beta * z (.) |g W_dec^T|
    S     = top-k of s per token;   a_ti = ReLU(z_ti) on S, 0 elsewhere.

z_i (d_i . g) is the first-order (attribution-patching) estimate of the loss change from removing latent i,
so the score is "magnitude + beta * |estimated effect|". Only the selection changes: the decoder sees the
ordinary activations and gradients flow through the kept ReLU(z) exactly as in TopK. The gradient term is
a constant of the step (computed without autograd). With ctx None (inference), ctx.grads None or beta = 0
the SAE is exactly TopKSAE. Loss and AuxK are TopK's. With rescale_by_decoder_norm the TopK score z*||d_i||
is multiplied by the same factor (1 + beta * e_ti).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

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

    Score normalisation ("check" item of algorithms.md section 5). What was found, with the search tool:
    - The ScienceStack summary of arXiv 2411.10397 (https://www.sciencestack.ai/paper/2411.10397) gives the
      augmented activation as TopK(z + beta * z (.) |W_dec^T . grad_x L(x)|): the raw gradient, projected on
      each decoder row, absolute value, times z, times beta. No rescaling of g or of the product is stated.
    - The arXiv abstract/HTML (https://arxiv.org/html/2411.10397v2, ACL Anthology 2025.findings-naacl.423)
      and third-party summaries (arxivlens, paperz) say only that TopK is "augmented to rely on the gradients
      of the input activation when selecting the k elements" (GPT-2 small, layer 7). No official code was
      found in the code index, and the default beta was not in any text reached.
    Choice: the published form, unnormalised: s = z * (1 + beta * |g . d_i|), with g the per-token gradient of
    the summed next-token cross-entropy, taken into the SAE's normalised space (g / c for inputs scaled by c,
    so |g . d_i| * z is the same first-order loss change in either space). Reason: it is the only equation
    the sources give, it keeps z_i * (d_i . g) an attribution estimate in loss units, and any further scaling
    (e.g. dividing by mean |g . d|) is a reparameterisation of beta, which is exposed (`--gsae-beta`) and has
    to be tuned per model and hook anyway. Note beta's useful range therefore depends on the gradient scale
    (summed vs mean CE, tokens per batch, input scaling).
    """

    architecture = "gsae"
    needs_lm_grads = True
    sections = (AuxConfig, TopKConfig, GSAEConfig)
    gsae_cfg: GSAEConfig

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

    def selection_scores(self, z: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """[batch, d_sae] TopK scores times (1 + beta * |g . d_i|) when gradients are given."""
        scores = super().selection_scores(z, ctx)
        beta = self.gsae_cfg.gsae_beta
        if not ctx.training or ctx.grads is None or beta == 0:
            return scores
        if ctx.grads.shape[0] != z.shape[0]:
            raise SaelabError(f"g-SAE got {ctx.grads.shape[0]} gradient rows for a batch of {z.shape[0]} tokens.")
        return scores * (1 + beta * self.gradient_effect(ctx.grads))
