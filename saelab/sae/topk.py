"""TopK SAE (Gao et al. 2024) with AuxK, and the helpers the top-k family shares (normalised MSE, top-k layouts).

Code: ReLU(z) at the k best selection scores per token; loss: normalised MSE + aux_coef * AuxK on dead latents.

Math, defaults and choices: docs/algorithms.md, section "TopK".
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from typing_extensions import override

from saelab.config import Section, option
from saelab.errors import SaelabError
from saelab.kernels import SparseCode, SparseLayout
from saelab.sae.base import INFERENCE, SAE, EncoderPass, StepContext


@dataclass
class AuxConfig(Section):
    name: ClassVar[str] = "aux"

    k_aux: int = option(512, "AuxK: top-k_aux dead latents reconstruct the residual; 0 means d_in // 2.", min=0)
    aux_coef: float = option(1 / 32, "AuxK loss coefficient (OpenAI: 1/32).", min=0)
    dead_tokens: int = option(
        1_000_000, "A latent is dead after this many tokens without firing (about 2000x a k/d_sae latent's mean gap).",
        min=1,
    )


@dataclass
class TopKConfig(Section):
    name: ClassVar[str] = "topk"

    rescale_by_decoder_norm: bool = option(
        True, "Select latents by z_i * ||d_i|| (SAELens), so decoder-norm drift cannot change the selection."
    )
    threshold_rate: float = option(
        0.01,
        "EMA rate of the inference threshold of batch-level variants (batchtopk, mutual/feature choice), and of "
        "choice's running firing frequencies.", above=0, max=1,
    )



def normalized_mse(
    target: torch.Tensor, estimate: torch.Tensor, batch_variance: Callable[[torch.Tensor], torch.Tensor] | None = None
) -> torch.Tensor:
    """sum ||target - estimate||^2 / sum ||target - mean(target)||^2 over a batch [batch, d] (the denominator from
    batch_variance(target) when given: StepContext.batch_variance)."""
    return (target - estimate).pow(2).sum() / summed_variance(target, batch_variance)


def summed_variance(
    target: torch.Tensor, batch_variance: Callable[[torch.Tensor], torch.Tensor] | None = None
) -> torch.Tensor:
    """sum ||target - mean(target)||^2 over a batch [batch, d] (batch_variance(target) when given), at least 1e-12."""
    variance = (target - target.mean(dim=0)).pow(2).sum() if batch_variance is None else batch_variance(target)
    return variance.clamp_min(1e-12)


def topk_layout(scores: torch.Tensor, k: int) -> SparseLayout:
    """The k highest `scores` [batch, n] of each row, as a fixed-k layout."""
    return SparseLayout.fixed_k(scores.topk(k, dim=-1, sorted=False).indices, scores.shape[-1])


class TopKSAE(SAE):
    """TopK SAE: code a [batch, d_sae] keeps ReLU(z) at the k best selection scores per token
    (docs/algorithms.md, "TopK")."""

    architecture = "topk"
    summary = "the k largest per token"
    inference_form = "topk"
    sections = (AuxConfig, TopKConfig)
    aux_cfg: AuxConfig
    topk_cfg: TopKConfig
    # 5e-4 * (d_sae / 2**14) ** -0.5, 2.5x EleutherAI's long-run rule (2e-4); the measurements behind it:
    # docs/algorithms.md, "Notation and shared conventions" (BENCHMARKS.md, "TopK learning rate").
    default_lr = 5e-4

    @override
    def validate(self) -> None:
        if not 0 < self.cfg.k <= self.d_sae:
            raise SaelabError(f"--k must be between 1 and d_sae={self.d_sae} (got {self.cfg.k}).")
        aux = self.aux_cfg
        if aux.k_aux < 0 or aux.aux_coef < 0 or aux.dead_tokens <= 0:
            raise SaelabError("--k-aux and --aux-coef must be >= 0 and --dead-tokens > 0.")

    def selection_scores(self, z: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """[batch, d_sae] scores that pick the active latents: z, or z * ||d_i|| with rescale_by_decoder_norm.

        The [batch, d_sae] product is skipped when every ||d_i|| is 1 to within 1e-6, as in training (the rows are
        renormalised after every step).
        """
        if not self.topk_cfg.rescale_by_decoder_norm:
            return z
        norms = self.W_dec.detach().norm(dim=1)
        return z if bool((norms - 1).abs().max() <= 1e-6) else z * norms

    sparse_code = True

    @override
    def select(self, z: torch.Tensor, ctx: StepContext) -> SparseLayout:
        return topk_layout(self.selection_scores(z, ctx), self.cfg.k)

    @override
    def values_at(self, z_at: torch.Tensor, layout: SparseLayout, ctx: StepContext) -> torch.Tensor:
        return z_at.relu()

    @override
    def reconstruction_loss(self, x_n: torch.Tensor, x_hat: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        return normalized_mse(x_n, x_hat, ctx.batch_variance)

    def aux_scores(self, z: torch.Tensor) -> torch.Tensor:
        """[batch, d_sae] scores AuxK ranks the dead latents by (z; AbsTopK: |z|)."""
        return z

    def auxk_loss(
        self, encoder: EncoderPass, x_n: torch.Tensor, x_hat: torch.Tensor, dead: torch.Tensor | None,
        batch_variance: Callable[[torch.Tensor], torch.Tensor] | None = None, k_aux: int | None = None,
    ) -> torch.Tensor:
        """AuxK: the `dead` latents' top-k_aux entries (by aux_scores, values as the main code) reconstruct the
        detached residual e = x_n - x_hat: ||e - e_hat||^2 / ||e - mean(e)||^2; 0 if none of them is dead.
        k_aux defaults to --k-aux (0: d_in / 2)."""
        n_dead = 0 if dead is None else int(dead.sum())
        if n_dead == 0:
            return x_n.new_zeros(())
        k_aux = min(k_aux or self.aux_cfg.k_aux or self.d_in // 2, n_dead)
        residual = (x_n - x_hat).detach()
        layout = topk_layout(self.aux_scores(encoder.z).masked_fill(~dead, float("-inf")), k_aux)
        aux_code = SparseCode(layout, self.values_at(encoder.at(layout), layout, INFERENCE))
        return normalized_mse(residual, encoder.decode(aux_code), batch_variance).nan_to_num(0.0)

    @override
    def code_losses(self, encoder, x_n, code, x_hat, ctx: StepContext) -> dict[str, torch.Tensor]:
        return {"auxk": self.aux_cfg.aux_coef * self.auxk_loss(encoder, x_n, x_hat, ctx.dead, ctx.batch_variance)}
