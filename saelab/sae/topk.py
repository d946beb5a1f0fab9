"""TopK SAE (Gao et al. 2024) with AuxK, and the helpers the top-k family shares.

activate: keep the k largest selection scores per token (scores = z * ||d_i|| when rescale_by_decoder_norm,
else z), apply ReLU to the kept pre-activations, zero the rest. Gradients reach only the kept entries.

Loss: normalised MSE, sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 over the batch (the fraction of variance
unexplained), plus aux_coef * AuxK. AuxK: the top-k_aux pre-activations among dead latents reconstruct the
detached residual e = x - x_hat; L_aux = ||e - e_hat||^2 / ||e - mean(e)||^2 (OpenAI `normalized_mse`),
0 when nothing is dead. The top-k family normalises the MSE whatever --mse-reduction says: its only
coefficient (aux_coef) is relative to a normalised main loss, as in the OpenAI and EleutherAI trainers.
"""

from __future__ import annotations

import torch

from saelab.errors import SaelabError
from saelab.sae.base import SAE, StepContext


def normalized_mse(target: torch.Tensor, estimate: torch.Tensor) -> torch.Tensor:
    """sum ||target - estimate||^2 / sum ||target - mean(target)||^2 over a batch [batch, d]."""
    variance = (target - target.mean(dim=0)).pow(2).sum()
    return (target - estimate).pow(2).sum() / variance.clamp_min(1e-12)


def scatter_topk(values: torch.Tensor, scores: torch.Tensor, k: int) -> torch.Tensor:
    """[batch, n]: keep `values` at the k highest `scores` per row, zeros elsewhere."""
    index = scores.topk(k, dim=-1, sorted=False).indices
    return torch.zeros_like(values).scatter(-1, index, values.gather(-1, index))


class TopKSAE(SAE):
    """TopK SAE: code a [batch, d_sae] keeps ReLU(z) at the k best selection scores per token (module docstring)."""

    architecture = "topk"
    sections = ("aux", "topk")

    def validate(self) -> None:
        if not 0 < self.cfg.k <= self.d_sae:
            raise SaelabError(f"--k must be between 1 and d_sae={self.d_sae} (got {self.cfg.k}).")
        aux = self.option("aux")
        if aux.k_aux < 0 or aux.aux_coef < 0 or aux.dead_tokens <= 0:
            raise SaelabError("--k-aux and --aux-coef must be >= 0 and --dead-tokens > 0.")

    def selection_scores(self, z: torch.Tensor, ctx: StepContext | None) -> torch.Tensor:
        """[batch, d_sae] scores that pick the active latents."""
        if self.option("topk").rescale_by_decoder_norm:
            return z * self.W_dec.norm(dim=1)
        return z

    def activate(self, z: torch.Tensor, ctx: StepContext | None = None) -> torch.Tensor:
        return scatter_topk(z.relu(), self.selection_scores(z, ctx), self.cfg.k)

    def reconstruction_loss(self, x_n: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
        return normalized_mse(x_n, x_hat)

    def auxk_loss(self, x_n: torch.Tensor, z: torch.Tensor, x_hat: torch.Tensor, dead: torch.Tensor | None) -> torch.Tensor:
        """AuxK: dead latents' top-k_aux pre-activations reconstruct the detached residual; 0 if none dead."""
        n_dead = 0 if dead is None else int(dead.sum())
        if n_dead == 0:
            return z.new_zeros(())
        aux = self.option("aux")
        k_aux = min(aux.k_aux or self.d_in // 2, n_dead)
        residual = (x_n - x_hat).detach()
        dead_z = z.masked_fill(~dead, float("-inf"))
        a_aux = scatter_topk(z.relu(), dead_z, k_aux)
        return normalized_mse(residual, a_aux @ self.W_dec).nan_to_num(0.0)

    def sparsity_loss(self, x_n, z, a, x_hat, ctx: StepContext) -> dict[str, torch.Tensor]:
        return {"auxk": self.option("aux").aux_coef * self.auxk_loss(x_n, z, x_hat, ctx.dead)}
