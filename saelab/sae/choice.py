"""Feature Choice and Mutual Choice SAEs (Ayonrinde 2024, arXiv 2411.02124).

Mutual choice keeps the top k*B entries of the batch (BatchTopK's selection); feature choice gives each latent a
token budget m_i (equal, or Zipf by firing-frequency rank). Inference: a global (mutual) or per-latent (feature)
threshold. An optional aux_zipf loss acts on under-used latents.

Math, defaults and choices (aux_zipf's form): docs/algorithms.md, section "Feature and mutual choice".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from typing_extensions import override

from saelab.config import Section, option
from saelab.errors import SaelabError
from saelab.kernels import SparseCode, SparseLayout
from saelab.sae.base import StepContext
from saelab.sae.batchtopk import BatchTopKSAE, ema_threshold_, top_values
from saelab.sae.topk import AuxConfig, TopKConfig


@dataclass
class ChoiceConfig(Section):
    name: ClassVar[str] = "choice"

    choice_mode: str = option(
        "mutual", "mutual (top k*B of the batch) or feature (each latent takes its top m tokens).",
        choices=("mutual", "feature"),
    )
    zipf_alpha: float = option(
        0.0, "Zipf exponent of feature-choice capacities and of the aux_zipf target frequencies; 0 means equal.", min=0,
    )
    zipf_beta: float = option(
        1.0, "Zipf rank offset: p(r) ~ (r + beta)^-alpha (capacities and aux_zipf target).", min=0
    )
    zipf_coef: float = option(
        0.0, "aux_zipf loss coefficient for under-used latents (it raises the dead fraction: see ChoiceSAE).", min=0
    )


CHOICE_MODES = ("mutual", "feature")


def zipf_weights(n: int, alpha: float, beta: float) -> torch.Tensor:
    """[n] float64 weights w_r = (r + beta)^-alpha for ranks r = 1..n, normalised to sum to 1."""
    ranks = torch.arange(1, n + 1, dtype=torch.float64)
    weights = (ranks + beta) ** -alpha
    return weights / weights.sum()


def zipf_capacities(n: int, total: int, alpha: float, beta: float, cap: int) -> torch.Tensor:
    """[n] int64 capacities by rank (rank 1 first): total * w_r rounded by largest remainder, capped at `cap`.

    Sums to `total` unless the cap binds (then to less). alpha = 0 gives equal capacities total / n.
    """
    real = zipf_weights(n, alpha, beta) * total
    base = real.floor()
    short = int(total - base.sum().item())
    if short > 0:
        base[torch.argsort(real - base, descending=True, stable=True)[:short]] += 1
    return base.clamp_max(cap).long()


def feature_choice_layout(scores: torch.Tensor, capacity: torch.Tensor) -> SparseLayout:
    """Each column i of `scores` [B, n] keeps its capacity[i] highest entries (capacity [n] int64, each <= B;
    ties broken by topk)."""
    m_max = int(capacity.max()) if capacity.numel() else 0
    mask = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    if m_max > 0:
        index = scores.topk(m_max, dim=0, sorted=True).indices  # [m_max, n], best token first per column
        keep = torch.arange(m_max, device=scores.device)[:, None] < capacity.to(scores.device)[None, :]
        mask.scatter_(0, index, keep)
    return SparseLayout.from_mask(mask)


class ChoiceSAE(BatchTopKSAE):
    """Mutual choice (BatchTopK selection) or feature choice (per-latent token budgets), with aux_zipf.

    Buffers: threshold [] (mutual) or [d_sae] (feature), z units, +inf until learnt;
             feature_freq [d_sae] running firing frequency (fraction of tokens with a != 0);
             freq_updates [] int64, training steps folded into feature_freq.

    Loss = normalised MSE + aux_coef * AuxK(dead) + zipf_coef * aux_zipf(U), where U (`underused`) holds the alive
    latents firing below their Zipf target frequency and aux_zipf is AuxK restricted to U with the code's own k.
    zipf_coef defaults to 0 (in this form aux_zipf raises the dead fraction). The form, the sources consulted and the
    measurements: docs/algorithms.md, section "Feature and mutual choice".
    """

    architecture = "choice"
    summary = "feature or mutual choice"
    sections = (AuxConfig, TopKConfig, ChoiceConfig)
    choice_cfg: ChoiceConfig

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("feature_freq", torch.zeros(self.d_sae))
        self.register_buffer("freq_updates", torch.zeros((), dtype=torch.long))

    @override
    def threshold_shape(self) -> tuple[int, ...]:
        return (self.d_sae,) if self.choice_cfg.choice_mode == "feature" else ()

    @override
    def validate(self) -> None:
        super().validate()
        choice = self.choice_cfg
        if choice.choice_mode not in CHOICE_MODES:
            raise SaelabError(f"Unknown --choice-mode '{choice.choice_mode}'; use mutual or feature.")
        if choice.zipf_alpha < 0 or choice.zipf_beta <= -1 or choice.zipf_coef < 0:
            raise SaelabError("--zipf-alpha and --zipf-coef must be >= 0 and --zipf-beta > -1.")

    # -- selection ----------------------------------------------------------------------------------
    def frequency_ranks(self) -> torch.Tensor:
        """[d_sae] int64 rank (0 = most frequent) of each latent by running firing frequency (ties: index)."""
        order = torch.argsort(self.feature_freq, descending=True, stable=True)
        return torch.empty_like(order).scatter_(0, order, torch.arange(self.d_sae, device=order.device))

    def capacities(self, batch: int) -> torch.Tensor:
        """[d_sae] int64 token budget m_i of each latent for a batch of `batch` tokens (sum k*batch)."""
        choice = self.choice_cfg
        by_rank = zipf_capacities(self.d_sae, self.cfg.k * batch, choice.zipf_alpha, choice.zipf_beta, batch)
        return by_rank.to(self.feature_freq.device)[self.frequency_ranks()]

    @override
    def select(self, z: torch.Tensor, ctx: StepContext) -> SparseLayout:
        """Threshold(s) at inference; mutual (BatchTopK's) or feature choice in training."""
        if not ctx.training or self.choice_cfg.choice_mode == "mutual":
            return super().select(z, ctx)
        return feature_choice_layout(self.selection_scores(z, ctx).relu(), self.capacities(z.shape[0]))

    # -- losses -------------------------------------------------------------------------------------
    def zipf_targets(self) -> torch.Tensor:
        """[d_sae] target firing frequency of each latent: k * Zipf weight of its frequency rank."""
        choice = self.choice_cfg
        by_rank = self.cfg.k * zipf_weights(self.d_sae, choice.zipf_alpha, choice.zipf_beta)
        return by_rank.to(self.feature_freq)[self.frequency_ranks()]

    def underused(self, dead: torch.Tensor | None) -> torch.Tensor:
        """[d_sae] bool: alive latents firing below their Zipf target (all False before any tracking)."""
        if int(self.freq_updates) == 0:
            return torch.zeros(self.d_sae, dtype=torch.bool, device=self.feature_freq.device)
        below = self.feature_freq < self.zipf_targets()
        return below if dead is None else below & ~dead.to(below.device)

    @override
    def code_losses(self, encoder, x_n, code, x_hat, ctx: StepContext) -> dict[str, torch.Tensor]:
        terms = super().code_losses(encoder, x_n, code, x_hat, ctx)
        coef = self.choice_cfg.zipf_coef
        if coef > 0:
            terms["aux_zipf"] = coef * self.auxk_loss(
                encoder, x_n, x_hat, self.underused(ctx.dead), ctx.batch_variance, k_aux=self.cfg.k
            )
        return terms

    # -- running state --------------------------------------------------------------------------------
    @torch.no_grad()
    @override
    def calibrate_inference(self, x_n: torch.Tensor, chunk: int = 4096) -> None:
        """Mutual: BatchTopK's global threshold. Feature: each latent's threshold midway between its m_i-th and
        (m_i+1)-th largest z over x_n [T, d_in], m_i = its Zipf capacity for T tokens, so every latent takes its
        budget there as it does in training (the per-latent running minima under-fill: L0 16 for k 32)."""
        if self.choice_cfg.choice_mode == "mutual":
            return super().calibrate_inference(x_n, chunk)
        budget = self.capacities(len(x_n))  # [d_sae] int64, sums to k * T
        best = top_values(x_n, chunk, self.encode_pre, int(budget.max()) + 1, dim=0)  # [m_max + 1, d_sae]
        below = best.gather(0, (budget - 1).clamp(0, len(best) - 1)[None]).squeeze(0)
        above = best.gather(0, budget.clamp(max=len(best) - 1)[None]).squeeze(0)
        theta = ((below + above) / 2).clamp_min(0)
        self.threshold.copy_(torch.where(budget > 0, theta, torch.full_like(theta, float("inf"))))

    @torch.no_grad()
    @override
    def update_inference_state(self, code: SparseCode) -> None:
        """Update the inference threshold(s) and the running firing frequency from the training code."""
        rate = self.topk_cfg.threshold_rate
        if self.choice_cfg.choice_mode == "mutual":
            super().update_inference_state(code)
        else:
            positive = code.values > 0
            column_min = torch.full_like(self.threshold, float("inf"))  # [d_sae]; inf: none kept
            values = code.values[positive].to(column_min.dtype)  # bf16 under --precision bf16
            column_min.scatter_reduce_(0, code.layout.indices[positive], values, "amin")
            ema_threshold_(self.threshold, column_min, rate)
        fired = code.firing_counts().to(self.feature_freq) / max(code.layout.batch, 1)
        if int(self.freq_updates) == 0:
            self.feature_freq.copy_(fired)
        else:
            self.feature_freq.lerp_(fired, rate)
        self.freq_updates += 1
