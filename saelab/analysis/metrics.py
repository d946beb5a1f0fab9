"""Streaming evaluation metrics: feed batches to `update`, read `result()` at the end. Pure torch, no model.

Every sum is accumulated in float64 on the CPU, so the result does not depend on how the tokens were batched
(up to float64 rounding). Conventions (algorithms doc §9):

- FVU is global: the sum of squared errors over all evaluation tokens divided by the sum of squared deviations
  from the mean over all evaluation tokens (not a mean of per-batch or per-token ratios). The per-token
  normalised MSE, mean_t ||x_t - x_hat_t||^2 / ||x_t||^2, is reported separately and labelled per-token.
- L0 and firing counts count a != 0, so AbsTopK's negative codes count.
- Downstream sums run over the positions a mask keeps (next-token predictions made from non-special positions).
"""

from __future__ import annotations

import torch

from saelab.kernels import SparseCode

DENSITY_EPS = 1e-10  # log10(f + eps) puts dead latents at -10 in the density histogram
DENSITY_BIN_EDGES = torch.linspace(-10.0, 0.0, 41, dtype=torch.float64)  # bins of 0.25 decades
RARE_FREQUENCIES = (1e-5, 1e-6)


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", torch.float64)


def _ratio(numerator: float, denominator: float) -> float | None:
    """numerator / denominator, or None where the ratio is undefined (denominator 0)."""
    return numerator / denominator if denominator != 0 else None


class ReconstructionStats:
    """Reconstruction quality of x_hat for x, over every token passed to `update`."""

    def __init__(self) -> None:
        self.n_tokens = 0
        self.d = 0
        self.squared_error = 0.0  # sum_t ||x_t - x_hat_t||^2
        self.sum_x: torch.Tensor | None = None  # [d] sum_t x_t
        self.sum_x_squared: torch.Tensor | None = None  # [d] sum_t x_t^2
        self.cosine = 0.0  # sum_t cos(x_t, x_hat_t)
        self.shrinkage = 0.0  # sum_t ||x_hat_t|| / ||x_t||
        self.relative_error = 0.0  # sum_t ||x_t - x_hat_t||^2 / ||x_t||^2

    def update(self, x: torch.Tensor, x_hat: torch.Tensor) -> None:
        """x, x_hat [n, d]: activations and their reconstructions (raw space)."""
        x, x_hat = _f64(x), _f64(x_hat)
        if self.sum_x is None:
            self.d = x.shape[1]
            self.sum_x = torch.zeros(self.d, dtype=torch.float64)
            self.sum_x_squared = torch.zeros(self.d, dtype=torch.float64)
        error = (x - x_hat).square().sum(1)  # [n]
        x_norm = x.norm(dim=1).clamp_min(1e-30)
        x_hat_norm = x_hat.norm(dim=1)
        self.n_tokens += x.shape[0]
        self.squared_error += float(error.sum())
        self.sum_x += x.sum(0)
        self.sum_x_squared += x.square().sum(0)
        self.cosine += float(((x * x_hat).sum(1) / (x_norm * x_hat_norm.clamp_min(1e-30))).sum())
        self.shrinkage += float((x_hat_norm / x_norm).sum())
        self.relative_error += float((error / x_norm.square()).sum())

    def result(self) -> dict[str, float | int | None]:
        """fvu, explained_variance (1 - fvu), mse (per element), normalized_mse_per_token, cosine and
        shrinkage (means over tokens), n_tokens."""
        n = self.n_tokens
        if n == 0:
            return {"n_tokens": 0}
        mean = self.sum_x / n
        total_variance = float(self.sum_x_squared.sum() - n * mean.square().sum())  # sum_t ||x_t - mean||^2
        fvu = _ratio(self.squared_error, total_variance)
        return {
            "n_tokens": n,
            "fvu": fvu,
            "explained_variance": None if fvu is None else 1.0 - fvu,
            "mse": self.squared_error / (n * self.d),
            "normalized_mse_per_token": self.relative_error / n,
            "cosine": self.cosine / n,
            "shrinkage": self.shrinkage / n,
        }


class SparsityStats:
    """L0 and per-latent firing frequencies of sparse codes over [n, d_sae]."""

    def __init__(self, d_sae: int, dense_threshold: float = 0.1) -> None:
        self.d_sae = d_sae
        self.dense_threshold = dense_threshold
        self.n_tokens = 0
        self.active_entries = 0
        self.firing_counts = torch.zeros(d_sae, dtype=torch.int64)

    def update(self, code: SparseCode) -> None:
        """code: a SparseCode over [n, d_sae] (entries count where the value is nonzero)."""
        self.n_tokens += code.layout.batch
        self.active_entries += int(code.active().sum())
        self.firing_counts += code.firing_counts().cpu()

    def result(self) -> dict:
        """l0, firing_frequency [d_sae] (float64 tensor), dead/dense fractions and counts, counts below 1e-5 and
        1e-6, and the histogram of log10(f + 1e-10) over DENSITY_BIN_EDGES."""
        n = max(self.n_tokens, 1)
        frequency = self.firing_counts.double() / n
        log_density = torch.log10(frequency + DENSITY_EPS).clamp(DENSITY_BIN_EDGES[0], DENSITY_BIN_EDGES[-1])
        histogram = torch.histogram(log_density, bins=DENSITY_BIN_EDGES).hist
        dead = int((self.firing_counts == 0).sum())
        dense = int((frequency > self.dense_threshold).sum())
        return {
            "n_tokens": self.n_tokens,
            "l0": self.active_entries / n,
            "firing_frequency": frequency,
            "dead": dead,
            "dead_fraction": dead / self.d_sae,
            "dense": dense,
            "dense_fraction": dense / self.d_sae,
            "dense_threshold": self.dense_threshold,
            **{f"below_{f:.0e}": int((frequency < f).sum()) for f in RARE_FREQUENCIES},
            "log10_density_histogram": {
                "edges": DENSITY_BIN_EDGES.tolist(),
                "counts": [int(c) for c in histogram.tolist()],
            },
        }


DOWNSTREAM_TERMS = ("ce_clean", "ce_sae", "ce_zero", "ce_mean", "kl_sae", "kl_zero", "kl_mean")


class DownstreamStats:
    """Per-token losses of the clean, spliced and ablated model, summed over kept positions."""

    def __init__(self) -> None:
        self.n_predictions = 0
        self.sums = dict.fromkeys(DOWNSTREAM_TERMS, 0.0)

    def update(
        self,
        ce_clean: torch.Tensor,
        ce_sae: torch.Tensor,
        ce_zero: torch.Tensor,
        ce_mean: torch.Tensor,
        kl_sae: torch.Tensor,
        kl_zero: torch.Tensor,
        kl_mean: torch.Tensor,
        mask: torch.Tensor,
    ) -> None:
        """All [batch, pos]: next-token cross-entropy of the clean model, with the reconstruction spliced in, with
        the hook zero- and mean-ablated; KL(clean || each) at the same predictions; mask (bool) keeps positions."""
        values = dict(zip(DOWNSTREAM_TERMS, (ce_clean, ce_sae, ce_zero, ce_mean, kl_sae, kl_zero, kl_mean)))
        keep = mask.to("cpu", torch.bool)
        self.n_predictions += int(keep.sum())
        for name, value in values.items():
            self.sums[name] += float(_f64(value)[keep].sum())

    def result(self) -> dict[str, float | int | None]:
        """Means of each term, CE loss recovered against zero and mean ablation, delta LM loss (ce_sae - ce_clean),
        KL scores (kl_abl - kl_sae) / kl_abl; ratios with a zero denominator are None."""
        n = max(self.n_predictions, 1)
        mean = {name: total / n for name, total in self.sums.items()}
        return {
            "n_predictions": self.n_predictions,
            **mean,
            "ce_recovered_zero": _ratio(mean["ce_zero"] - mean["ce_sae"], mean["ce_zero"] - mean["ce_clean"]),
            "ce_recovered_mean": _ratio(mean["ce_mean"] - mean["ce_sae"], mean["ce_mean"] - mean["ce_clean"]),
            "delta_lm_loss": mean["ce_sae"] - mean["ce_clean"],
            "kl_score_zero": _ratio(mean["kl_zero"] - mean["kl_sae"], mean["kl_zero"]),
            "kl_score_mean": _ratio(mean["kl_mean"] - mean["kl_sae"], mean["kl_mean"]),
        }
