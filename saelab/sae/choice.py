"""Feature Choice and Mutual Choice SAEs (Ayonrinde 2024, arXiv 2411.02124).

Sparsification as allocation: with affinities A = ReLU(S) [B, n] (S the selection scores: z, or z * ||d_i||
with rescale_by_decoder_norm), choose a mask M in {0,1}^{B x n} maximising <M, A> subject to sum(M) <= kB,
and set a = M (.) ReLU(z).

- Mutual choice (`choice_mode=mutual`): no row or column limit: the top kB entries of the whole matrix.
  This is exactly BatchTopK's selection (`batch_topk_layout`, shared with BatchTopKSAE, which this class extends).
- Feature choice (`choice_mode=feature`): column sums <= m_i: latent i takes its top m_i tokens of the batch.
  With zipf_alpha = 0 every m_i = kB/n (rounded by largest remainder so that sum m_i = kB); with
  zipf_alpha > 0 the capacities follow a Zipf law m_(r) ~ (r + zipf_beta)^-zipf_alpha over the latents ranked
  by running firing frequency (most used first), again summing to kB (each capped at B).

Inference (ctx None): a = z * 1[z > theta], theta a global scalar (mutual) or per-latent [n] (feature),
running minima of the kept activations as in BatchTopK: theta <- (1 - eta) theta + eta * min(kept a > 0)
(per column for feature choice; columns with no positive kept value are left as they are), eta =
threshold_rate, first update sets theta directly, +inf until then.

Loss: normalised MSE + aux_coef * AuxK (dead latents, as TopK) + zipf_coef * aux_zipf (see ChoiceSAE).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

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

    aux_zipf (the "check" item of algorithms.md section 6). The search tool reached the abstract
    (arXiv 2411.02124 abs/HTML, OpenReview TIjBKgLyPN, the author's blog koayon/blog) and a public copy of the
    four ICLR 2025 OpenReview reviews, but not the text of section 4, so the equation itself could not be
    checked. What the sources say:
    aux_zipf_loss "generalises the aux_k_loss to mitigate dead and underutilised features" (abstract); feature
    densities are fitted well by a Zipf distribution "except at the lower end", and the paper proposes a
    definition of "dying" (under-used) features (reviewer 3); a Zipf law also sets the feature-choice
    capacities (reviewer 4). The closest defensible form, implemented here:
      - f [d_sae]: running firing frequency, f <- (1 - eta) f + eta * mean_t 1[a_ti != 0] after each step
        (eta = threshold_rate; first update sets it);
      - Zipf target by rank: t_(r) = k * (r + zipf_beta)^-zipf_alpha / sum_j (j + zipf_beta)^-zipf_alpha, so
        sum_i t_i = k = the mean L0; latent i is compared with the target of its own frequency rank r(i);
      - under-used U = {i : f_i < t_r(i)} minus the dead latents (those are AuxK's): the lower end that falls
        below the Zipf curve. With zipf_alpha = 0 the target is flat (k / d_sae): U = below-average latents;
      - aux_zipf = AuxK restricted to U: the top-k ReLU(z) among U (k the code's own k, not --k-aux)
        reconstruct the detached residual e = x - x_hat, L = ||e - a_U @ W_dec||^2 / ||e - mean(e)||^2 (0 when
        U is empty or nothing is tracked). U holds about half the dictionary at zipf_alpha 0, and its latents
        have sub-threshold activations of the size of the kept ones: k_aux = 512 of them overshoot the residual,
        so the loss lowered them all and they stopped firing (SmolLM2, blocks.15 residual, 8x, L0 32: 23% dead
        on held-out text, against BatchTopK's 0%); with k, 3.0% dead and FVU 0.247 (BatchTopK 0.239).
    Loss = normalised MSE + aux_coef * AuxK(dead) + zipf_coef * aux_zipf(U); zipf_coef = 0 gives plain AuxK,
    and dead latents (f = 0) are always below target, so the two terms together cover AuxK's set and more.
    Default zipf_coef 0: in this form aux_zipf raises the dead fraction instead of lowering it. Mutual choice
    at L0 16 on the same setup, dead on 8,192 held-out tokens: 5.6% (zipf_coef 0), 10.3% (1/128), 32.5% (1/8);
    14.5% on 16,384 tokens at 1/32, the earlier default. FVU 0.276 / 0.277 / 0.290.
    Unsure: whether the paper weights latents by their shortfall (t - f) or uses one loss for dead and
    dying latents together; this form keeps AuxK's normalisation so zipf_coef is comparable to aux_coef.
    """

    architecture = "choice"
    sections = (AuxConfig, TopKConfig, ChoiceConfig)
    choice_cfg: ChoiceConfig

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("feature_freq", torch.zeros(self.d_sae))
        self.register_buffer("freq_updates", torch.zeros((), dtype=torch.long))

    def threshold_shape(self) -> tuple[int, ...]:
        return (self.d_sae,) if self.choice_cfg.choice_mode == "feature" else ()

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
    def update_inference_state(self, code: SparseCode) -> None:
        """Update the inference threshold(s) and the running firing frequency from the training code."""
        rate = self.topk_cfg.threshold_rate
        if self.choice_cfg.choice_mode == "mutual":
            super().update_inference_state(code)
        else:
            positive = code.values > 0
            column_min = torch.full_like(self.threshold, float("inf"))  # [d_sae]; inf: none kept
            column_min.scatter_reduce_(0, code.layout.indices[positive], code.values[positive], "amin")
            ema_threshold_(self.threshold, column_min, rate)
        fired = code.firing_counts().to(self.feature_freq) / max(code.layout.batch, 1)
        if int(self.freq_updates) == 0:
            self.feature_freq.copy_(fired)
        else:
            self.feature_freq.lerp_(fired, rate)
        self.freq_updates += 1
