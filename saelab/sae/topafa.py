"""top-AFA SAE (Lee et al. 2025, "Evaluating and Designing Sparse Autoencoders by Approximating
Quasi-Orthogonality", arXiv 2503.24277; official code SewoongLee/top-afa-sae, training/sae.py::TopAFASAE).

Per token, the number of active latents k* is the one whose decoder-weighted code norm best matches
s * ||x - b_dec|| (s the norm scale, adapted to reach --target-l0); loss: normalised MSE + AuxK + the AFA term.

Math, defaults and choices (the departures from the official code, and why it densifies under superposition):
docs/algorithms.md, section "top-AFA".
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch
from typing_extensions import override

from saelab.config import Section, option
from saelab.errors import SaelabError
from saelab.kernels import SparseLayout
from saelab.sae.base import INFERENCE, EncoderPass, StepContext
from saelab.sae.topk import AuxConfig, TopKConfig, TopKSAE, summed_variance


@dataclass
class AFAConfig(Section):
    name: ClassVar[str] = "afa"

    afa_coef: float = option(
        1 / 16, "top-AFA: weight of sum (||a|| - ||x - b_dec||)^2 / sum ||x - mean(x)||^2 over the batch.", min=0
    )
    afa_norm_scale: float = option(
        0.0, "top-AFA: k* matches the code norm to this times ||x - b_dec||; 0: adapted so the mean k* is --target-l0.",
        min=0,
    )



class AFASelection(NamedTuple):
    acts: torch.Tensor  # [batch, d_sae] the code a
    k: torch.Tensor  # [batch] int64, k* per token (1 <= k* <= d_sae - 1)


def afa_k(
    u: torch.Tensor, decoder_norms: torch.Tensor, target_norm: torch.Tensor, cap: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Norm matching. u [batch, n] >= 0 (ReLU'd pre-activations), decoder_norms [n] (||d_i||), target_norm [batch]
    (||x - b_dec||) -> (k* [batch] int64, order [batch, m]: the first m >= max(k*) latents by descending
    (u_i ||d_i||)^2).

    c_j = sqrt(cumsum of the sorted q) with the last entry +inf; k* = argmin_j |c_j - target| + 1, and the code
    keeps the first k* latents of `order`. The official code sets the last cumulative sum to 1e8 (c = 1e4) rather
    than +inf; the two differ only for targets above ~5e3, where +inf still keeps k* < n.

    cap: rank only the top `cap` latents (a top-k instead of a full sort) when every token's c_cap reaches its
    target; c is non-decreasing, so k* <= cap there and the result is the full sort's. Otherwise sort fully."""
    with torch.no_grad():
        scores = (u * decoder_norms).pow(2)
        if cap is not None and cap < u.shape[-1]:
            top_scores, order = scores.topk(cap, dim=-1)
            cumulative = top_scores.cumsum(dim=-1)
            if bool((cumulative[..., -1].sqrt() >= target_norm).all()):
                return (cumulative.sqrt() - target_norm.unsqueeze(-1)).abs().argmin(dim=-1) + 1, order
        sorted_scores, order = scores.sort(dim=-1, descending=True)
        cumulative = sorted_scores.cumsum(dim=-1)
        cumulative[..., -1] = float("inf")
        k = (cumulative.sqrt() - target_norm.unsqueeze(-1)).abs().argmin(dim=-1) + 1
    return k, order


def afa_select(
    u: torch.Tensor, decoder_norms: torch.Tensor, target_norm: torch.Tensor, cap: int | None = None
) -> AFASelection:
    """The dense code (u on each token's top k* latents, see afa_k) and k*. The mask carries no gradient; u's
    kept entries do."""
    k, order = afa_k(u, decoder_norms, target_norm, cap)
    keep_ranked = torch.arange(order.shape[-1], device=u.device) < k.unsqueeze(-1)
    keep = torch.zeros_like(u, dtype=torch.bool).scatter(-1, order, keep_ranked)
    return AFASelection(u * keep, k)


def afa_layout(
    u: torch.Tensor, decoder_norms: torch.Tensor, target_norm: torch.Tensor, cap: int | None = None
) -> SparseLayout:
    """The entries afa_select keeps, as a layout (each token's top k* latents)."""
    k, order = afa_k(u, decoder_norms, target_norm, cap)
    rows, ranks = (torch.arange(order.shape[-1], device=u.device) < k.unsqueeze(-1)).nonzero(as_tuple=True)
    return SparseLayout.from_rows(rows, order[rows, ranks], *u.shape)


class CoherenceStats(NamedTuple):
    eps_max: float  # max_{i != j} |d_i . d_j| over unit-normalised decoder rows
    eps_mean: float  # mean_{i != j} |d_i . d_j|


@torch.no_grad()
def decoder_coherence(W_dec: torch.Tensor, chunk_size: int = 1024) -> CoherenceStats:
    """Quasi-orthogonality of a decoder W_dec [n, d] (rows d_i): with d_hat_i = d_i / ||d_i||,
        eps_max = max_{i != j} |d_hat_i . d_hat_j|,   eps_mean = mean_{i != j} |d_hat_i . d_hat_j|
    (the eps of the AFA bound; the official training log computes the max and the mean of the *signed*
    off-diagonal of W_dec W_dec^T, whose mean is ~0 and says little). Computed in row blocks of chunk_size x n
    (float32 at least), so n = 16k never needs the n x n Gram matrix at once. Needs n >= 2."""
    n = W_dec.shape[0]
    if n < 2:
        raise SaelabError("Decoder coherence needs at least two latents.")
    dtype = W_dec.dtype if W_dec.dtype in (torch.float32, torch.float64) else torch.float32
    unit = W_dec.to(dtype)
    unit = unit / unit.norm(dim=1, keepdim=True).clamp_min(1e-12)
    eps_max = torch.zeros((), dtype=dtype, device=W_dec.device)
    total = torch.zeros((), dtype=torch.float64, device=W_dec.device)
    for start in range(0, n, chunk_size):
        block = (unit[start : start + chunk_size] @ unit.T).abs()  # [rows, n]
        rows = torch.arange(block.shape[0], device=W_dec.device)
        block[rows, start + rows] = 0.0  # drop the diagonal (|d_hat_i . d_hat_i| = 1)
        eps_max = torch.maximum(eps_max, block.max())
        total += block.sum(dtype=torch.float64)
    return CoherenceStats(float(eps_max), float(total / (n * (n - 1))))


class TopAFASAE(TopKSAE):
    """top-AFA SAE (sections aux, topk, afa). `--k` is not used: k* is chosen per token (`afa_k`); AuxK, its
    dead-latent handling and the normalised MSE come from TopKSAE.

    The selection needs ||x - b_dec|| besides z, so it reads both from the encoder pass (`select_entries`), in
    training and at inference; `activate(z)` (z alone) is refused and `afa_code(z, target_norm)` is the explicit
    form. Training is a sparse code, so it runs on the sparse kernels like TopK.

    It differs from the official code on purpose (b_enc exists, pre_enc_bias is configurable, AuxK is the OpenAI
    normalised form, the AFA term is centred on b_dec and normalised as the MSE), and under superposition its k*
    grows to most positive latents: docs/algorithms.md, section "top-AFA".
    """

    architecture = "topafa"
    summary = "a per-token k matching the input norm"
    inference_form = None  # a per-token number of latents
    sections = (AuxConfig, TopKConfig, AFAConfig)
    afa_cfg: AFAConfig
    sparsity_coefficient = ("afa", "afa_norm_scale")
    sparsity_sign = -1  # a larger target norm keeps more latents

    @override
    def initial_sparsity_coef(self) -> float:
        return 1.0  # the paper's norm matching, ||a|| ~ ||x - b_dec||

    @override
    def validate(self) -> None:
        aux = self.aux_cfg
        if aux.k_aux < 0 or aux.aux_coef < 0 or aux.dead_tokens <= 0:
            raise SaelabError("--k-aux and --aux-coef must be >= 0 and --dead-tokens > 0.")
        if self.afa_cfg.afa_coef < 0:
            raise SaelabError(f"--afa-coef must be >= 0 (got {self.option('afa').afa_coef}).")
        if self.d_sae < 2:
            raise SaelabError("top-AFA needs d_sae >= 2 (k* ranges over 1 .. d_sae - 1).")

    def target_norm(self, x_n: torch.Tensor) -> torch.Tensor:
        """s * ||x_n - b_dec|| per token, s the norm scale (afa_norm_scale or its controller's value): [batch, d_in]
        -> [batch] (detached; it only picks k*)."""
        return (x_n - self.b_dec).detach().norm(dim=-1) * self.sparsity_coef()

    @property
    def rank_cap(self) -> int:
        """Latents ranked per token before falling back to a full sort (afa_k): 4x the target L0, at least 64."""
        return max(64, 4 * math.ceil(self.cfg.target_l0))

    def afa_code(self, z: torch.Tensor, target_norm: torch.Tensor) -> AFASelection:
        """z [batch, d_sae], target_norm [batch] -> (code [batch, d_sae], k* [batch])."""
        return afa_select(z.relu(), self.W_dec.detach().norm(dim=1), target_norm, self.rank_cap)

    @override
    def activate(self, z: torch.Tensor, ctx: StepContext = INFERENCE) -> torch.Tensor:
        """Refused: z alone cannot fix k*."""
        raise SaelabError(
            "top-AFA's code needs ||x - b_dec|| besides z: use sae.encode(x), sae.encode_normalized(x_n), or "
            "sae.afa_code(z, sae.target_norm(x_n))."
        )

    @override
    def select(self, z: torch.Tensor, ctx: StepContext) -> SparseLayout:
        """Refused: z alone cannot fix k* (TopKSAE's select would silently use --k)."""
        self.activate(z)

    @override
    def select_entries(self, encoder: EncoderPass, ctx: StepContext) -> SparseLayout:
        """Each token's top k* latents, k* matching s * ||x_n - b_dec|| (afa_k)."""
        if encoder.x_n is None:
            self.activate(encoder.z)
        u = encoder.z.relu()
        return afa_layout(u, self.W_dec.detach().norm(dim=1), self.target_norm(encoder.x_n), self.rank_cap)

    @override
    def code_losses(self, encoder, x_n, code, x_hat, ctx: StepContext) -> dict[str, torch.Tensor]:
        """AuxK (from TopKSAE) and afa_coef * sum_B (||a|| - ||x_n - b_dec||)^2 / sum_B ||x_n - mean(x_n)||^2
        (b_dec detached; normalised as the MSE is)."""
        terms = super().code_losses(encoder, x_n, code, x_hat, ctx)
        squared_norms = torch.zeros(len(x_n), dtype=code.values.dtype, device=x_n.device)
        code_norms = squared_norms.index_add(0, code.layout.rows, code.values.pow(2)).sqrt()
        gap = code_norms - (x_n - self.b_dec.detach()).norm(dim=-1)
        terms["afa"] = self.afa_cfg.afa_coef * gap.pow(2).sum() / summed_variance(x_n, ctx.batch_variance)
        return terms
