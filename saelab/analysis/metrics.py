"""Streaming evaluation metrics: feed batches to `update`, read `result()` at the end. Pure torch, no model.

Every sum is accumulated per context in float64 on the CPU, so the result does not depend on how the tokens were
batched (up to float64 rounding), and each metric gets a bootstrap interval over contexts from the per-context sums
alone. Conventions:

- FVU is global: the sum of squared errors over the evaluation tokens divided by the sum of squared deviations
  from their mean (not a mean of per-batch or per-token ratios). The per-token normalised MSE,
  mean_t ||x_t - x_hat_t||^2 / ||x_t||^2, is reported separately and labelled per-token.
- Outliers: with outlier_norm > 0, tokens with ||x|| > outlier_norm x the median ||x|| of the first
  reference_tokens tokens are left out of the headline reconstruction metrics and reported on their own. A handful
  of massive activations (attention sinks) otherwise hold most of the variance, and FVU's denominator moves with
  how many of them a sample happens to contain.
- L0 and firing counts count a != 0, so AbsTopK's negative codes count.
- Downstream sums run over the positions a mask keeps (next-token predictions made from non-special positions).
- Intervals (`<metric>_ci`): percentile bootstrap over contexts (see `bootstrap_intervals`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch

from saelab.errors import SaelabError
from saelab.kernels import SparseCode

DENSITY_EPS = 1e-10  # log10(f + eps) puts dead latents at -10 in the density histogram
DENSITY_BIN_EDGES = torch.linspace(-10.0, 0.0, 41, dtype=torch.float64)  # bins of 0.25 decades
RARE_FREQUENCIES = (1e-5, 1e-6)
CONFIDENCE = 0.95
OUTLIER_REFERENCE_TOKENS = 2048
_REPLICATES_PER_CHUNK = 64  # bounds the [chunk, n_contexts] resampling counts held at once


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", torch.float64)


def _ratio(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """Elementwise numerator / denominator, NaN where the denominator is 0 (the ratio is undefined)."""
    return torch.where(denominator != 0, numerator / denominator, torch.nan)


def _scalar(value: torch.Tensor) -> float | None:
    """A one-element tensor as a float, None where it is NaN (undefined)."""
    value = float(value)
    return None if math.isnan(value) else value


def _new_contexts(first: int, n: int) -> torch.Tensor:
    return torch.arange(first, first + n)


class ContextSums:
    """Sums of named per-token terms, one row per context: name -> [n_contexts, *shape] float64.

    Context ids are global (0, 1, ...); the tables grow to the highest id seen, so a context may arrive in pieces.
    """

    def __init__(self) -> None:
        self.tables: dict[str, torch.Tensor] = {}
        self.n_contexts = 0

    def add(self, context: torch.Tensor, terms: dict[str, torch.Tensor]) -> None:
        """context [n] int64 (each token's context id); terms: name -> [n, *shape] per-token values."""
        context = context.to("cpu", torch.long)
        if context.numel() == 0:
            return
        needed = int(context.max()) + 1
        for name, value in terms.items():
            value = _f64(value)
            table = self.tables.get(name)
            if table is None:
                table = self.tables[name] = value.new_zeros(max(needed, 64), *value.shape[1:])
            elif table.shape[0] < needed:
                grown = table.new_zeros(max(needed, 2 * table.shape[0]), *table.shape[1:])
                grown[: table.shape[0]] = table
                table = self.tables[name] = grown
            table.index_add_(0, context, value)
        self.n_contexts = max(self.n_contexts, needed)

    def per_context(self) -> dict[str, torch.Tensor]:
        """name -> [n_contexts, *shape]."""
        return {name: table[: self.n_contexts] for name, table in self.tables.items()}

    def totals(self) -> dict[str, torch.Tensor]:
        """name -> [1, *shape]: the sums over all contexts, with the replicate dimension statistics expect."""
        return {name: table[: self.n_contexts].sum(0, keepdim=True) for name, table in self.tables.items()}


def bootstrap_intervals(
    per_context: dict[str, torch.Tensor],
    statistic: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]],
    resamples: int,
    seed: int = 0,
) -> dict[str, list[float] | None]:
    """Percentile bootstrap intervals over contexts: name -> [lo, hi], the (1 - CONFIDENCE) / 2 and
    (1 + CONFIDENCE) / 2 quantiles (linear interpolation) of the metric over the resamples where it is defined;
    None where it never is.

    per_context: name -> [C, *shape] sums of each context. statistic maps sums with a leading replicate dimension
    (name -> [B, *shape]) to metrics (name -> [B], NaN where undefined). Resample b draws C contexts with
    replacement, torch.randint(C, (resamples, C), generator=torch.Generator().manual_seed(seed))[b], and its sums
    are the drawn contexts' sums added up, so a resample costs one [C] x [C, *shape] product, not a pass over text.
    """
    n_contexts = next(iter(per_context.values())).shape[0] if per_context else 0
    if resamples <= 0 or n_contexts == 0:
        return {}
    generator = torch.Generator().manual_seed(seed)
    flat = {name: table.reshape(n_contexts, -1) for name, table in per_context.items()}
    values: dict[str, list[torch.Tensor]] = {}
    for start in range(0, resamples, _REPLICATES_PER_CHUNK):
        chunk = min(_REPLICATES_PER_CHUNK, resamples - start)
        drawn = torch.randint(n_contexts, (chunk, n_contexts), generator=generator)
        counts = torch.zeros(chunk, n_contexts, dtype=torch.float64).scatter_add_(
            1, drawn, torch.ones(chunk, n_contexts, dtype=torch.float64)
        )
        sums = {name: (counts @ table).reshape(chunk, *per_context[name].shape[1:]) for name, table in flat.items()}
        for name, value in statistic(sums).items():
            values.setdefault(name, []).append(value)
    quantiles = torch.tensor([(1 - CONFIDENCE) / 2, (1 + CONFIDENCE) / 2], dtype=torch.float64)
    intervals: dict[str, list[float] | None] = {}
    for name, chunks in values.items():
        value = torch.cat(chunks)
        defined = value[~value.isnan()]
        intervals[name] = None if defined.numel() == 0 else torch.quantile(defined, quantiles).tolist()
    return intervals


def _with_intervals(
    point: dict[str, float | None], intervals: dict[str, list[float] | None]
) -> dict[str, float | list[float] | None]:
    """Each metric followed by its interval (`<name>_ci`) when one was computed."""
    out: dict[str, float | list[float] | None] = {}
    for name, value in point.items():
        out[name] = value
        if name in intervals:
            out[f"{name}_ci"] = intervals[name]
    return out


def _reconstruction_terms(x: torch.Tensor, x_hat: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-token terms [n] (sum_x: [n, d]) whose sums give every reconstruction metric (`_reconstruction_metrics`)."""
    error = (x - x_hat).square().sum(1)
    x_norm_squared = x.square().sum(1)
    x_norm = x_norm_squared.sqrt().clamp_min(1e-30)
    x_hat_norm = x_hat.norm(dim=1)
    return {
        "n": torch.ones_like(error),
        "squared_error": error,
        "sum_x": x,
        "sum_x_norm_squared": x_norm_squared,
        "cosine": (x * x_hat).sum(1) / (x_norm * x_hat_norm.clamp_min(1e-30)),
        "shrinkage": x_hat_norm / x_norm,
        "relative_error": error / x_norm.square(),
    }


def _reconstruction_metrics(sums: dict[str, torch.Tensor], d: int) -> dict[str, torch.Tensor]:
    """Metrics [B] from sums over tokens with a leading replicate dimension (sum_x [B, d], the others [B])."""
    n = sums["n"]
    total_variance = sums["sum_x_norm_squared"] - _ratio(sums["sum_x"].square().sum(-1), n)  # sum_t ||x_t - mean||^2
    fvu = _ratio(sums["squared_error"], total_variance)
    return {
        "fvu": fvu,
        "explained_variance": 1.0 - fvu,
        "mse": _ratio(sums["squared_error"], n * d),
        "normalized_mse_per_token": _ratio(sums["relative_error"], n),
        "cosine": _ratio(sums["cosine"], n),
        "shrinkage": _ratio(sums["shrinkage"], n),
    }


class ReconstructionStats:
    """Reconstruction quality of x_hat for x, per context, with massive-norm tokens set apart.

    Outlier rule (outlier_norm > 0): the threshold is outlier_norm x the median of ||x|| over the first
    `reference_tokens` tokens passed to `update` (all of them if fewer arrive before `result`), fixed from then
    on; tokens with ||x|| above it are outliers. They are left out of the headline metrics and reported under
    `outliers`; `all_tokens` gives the metrics over every token. Tokens are held back until the reference is
    complete, so the split does not depend on the batching. outlier_norm = 0: every token counts in the headline.
    `saelab eval` uses 3 (EvalConfig.outlier_norm): ordinary tokens stay below ~2.9x the median, while attention-sink
    tokens (e.g. some first tokens after BOS in SmolLM2) reach 3.5-180x and would hold most of the variance.
    """

    def __init__(self, outlier_norm: float = 0.0, reference_tokens: int = OUTLIER_REFERENCE_TOKENS) -> None:
        if outlier_norm < 0 or reference_tokens <= 0:
            raise SaelabError(
                f"The outlier rule needs outlier_norm >= 0 and reference_tokens > 0 (got {outlier_norm}, "
                f"{reference_tokens})."
            )
        self.outlier_norm = outlier_norm
        self.reference_tokens = reference_tokens
        self.d = 0
        self.n_seen = 0
        self.median_norm: float | None = None
        self.threshold = math.inf if outlier_norm == 0 else None  # None: still collecting the reference tokens
        self.held: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.inliers = ContextSums()
        self.outliers = ContextSums()
        self.max_norm = 0.0

    def update(self, x: torch.Tensor, x_hat: torch.Tensor, context: torch.Tensor | None = None) -> None:
        """x, x_hat [n, d]: activations and their reconstructions (raw space); context [n] int64: each token's
        context id (the bootstrap's resampling unit; None: every token is a context of its own, numbered on)."""
        context = _new_contexts(self.n_seen, x.shape[0]) if context is None else context.cpu()
        self.d = x.shape[1]
        self.n_seen += x.shape[0]
        if self.threshold is None:
            self.held.append((x.detach().cpu(), x_hat.detach().cpu(), context))
            if sum(len(h[0]) for h in self.held) >= self.reference_tokens:
                self._settle()
            return
        self._add(x, x_hat, context)

    def _settle(self) -> None:
        """Fix the threshold from the held tokens' norms and count them."""
        held, self.held = self.held, []
        norms = torch.cat([_f64(h[0]).norm(dim=1) for h in held])
        if norms.numel():
            self.median_norm = float(norms[: self.reference_tokens].median())
            self.threshold = self.outlier_norm * self.median_norm
        else:
            self.threshold = math.inf
        for x, x_hat, context in held:
            self._add(x, x_hat, context)

    def _add(self, x: torch.Tensor, x_hat: torch.Tensor, context: torch.Tensor) -> None:
        x, x_hat = _f64(x), _f64(x_hat)
        terms = _reconstruction_terms(x, x_hat)
        norm = terms["sum_x_norm_squared"].sqrt()
        if norm.numel():
            self.max_norm = max(self.max_norm, float(norm.max()))
        outlier = norm > self.threshold
        self.inliers.add(context[~outlier], {k: v[~outlier] for k, v in terms.items()})
        self.outliers.add(context[outlier], {k: v[outlier] for k, v in terms.items()})

    def _all_tokens(self) -> dict[str, torch.Tensor]:
        """Per-context sums of inliers and outliers together: name -> [C, *shape]."""
        inliers, outliers = self.inliers.per_context(), self.outliers.per_context()
        n_contexts = max(self.inliers.n_contexts, self.outliers.n_contexts)
        out = {}
        for name in inliers.keys() | outliers.keys():
            parts = [t for t in (inliers.get(name), outliers.get(name)) if t is not None]
            total = parts[0].new_zeros(n_contexts, *parts[0].shape[1:])
            for part in parts:
                total[: part.shape[0]] += part
            out[name] = total
        return out

    def _section(self, per_context: dict[str, torch.Tensor], resamples: int, seed: int) -> dict:
        n = int(per_context["n"].sum()) if per_context else 0
        if n == 0:
            return {"n_tokens": 0}
        metrics = functools.partial(_reconstruction_metrics, d=self.d)
        totals = {name: table.sum(0, keepdim=True) for name, table in per_context.items()}
        point = {name: _scalar(value) for name, value in metrics(totals).items()}
        return {"n_tokens": n, **_with_intervals(point, bootstrap_intervals(per_context, metrics, resamples, seed))}

    def result(self, resamples: int = 0, seed: int = 0) -> dict:
        """Headline metrics over the non-outlier tokens: n_tokens, fvu, explained_variance (1 - fvu), mse (per
        element), normalized_mse_per_token, cosine and shrinkage (means over tokens), each with `<name>_ci` when
        resamples > 0 (`bootstrap_intervals` over contexts, seeded by `seed`); n_contexts; outlier_rule
        (outlier_norm, reference_tokens, median_norm, norm_threshold); outliers (n_tokens, fraction of all tokens,
        max_norm_ratio = the largest ||x|| over the median, and their own metrics); all_tokens (the metrics over
        every token, with intervals). Undefined ratios are None. Fixes the threshold if it is still open."""
        if self.threshold is None:
            self._settle()
        if self.n_seen == 0:
            return {"n_tokens": 0}
        all_tokens = self._all_tokens()
        n_outliers = int(self.outliers.per_context()["n"].sum()) if self.outliers.tables else 0
        outliers = self._section(self.outliers.per_context(), 0, seed)
        outliers.pop("n_tokens")
        return {
            **self._section(self.inliers.per_context(), resamples, seed),
            "n_contexts": len(all_tokens["n"]),
            "outlier_rule": {
                "outlier_norm": self.outlier_norm,
                "reference_tokens": min(self.reference_tokens, self.n_seen),
                "median_norm": self.median_norm,
                "norm_threshold": None if math.isinf(self.threshold) else self.threshold,
            },
            "outliers": {
                "n_tokens": n_outliers,
                "fraction": n_outliers / self.n_seen,
                "max_norm_ratio": None if not self.median_norm else self.max_norm / self.median_norm,
                **outliers,
            },
            "all_tokens": self._section(all_tokens, resamples, seed),
        }


class SparsityStats:
    """L0 and per-latent firing frequencies of sparse codes over [n, d_sae]."""

    def __init__(self, d_sae: int, dense_threshold: float = 0.1) -> None:
        self.d_sae = d_sae
        self.dense_threshold = dense_threshold
        self.n_tokens = 0
        self.active_entries = 0
        self.firing_counts = torch.zeros(d_sae, dtype=torch.int64)
        self.contexts = ContextSums()  # n, active per context, for the interval of l0

    def update(self, code: SparseCode, context: torch.Tensor | None = None) -> None:
        """code: a SparseCode over [n, d_sae] (entries count where the value is nonzero); context [n] int64: each
        token's context id (None: every token is a context of its own, numbered on)."""
        n = code.layout.batch
        if context is None:
            context = _new_contexts(self.n_tokens, n)
        active = code.active()
        per_token = torch.bincount(code.layout.rows[active], minlength=n)  # [n]
        self.n_tokens += n
        self.active_entries += int(per_token.sum())
        self.firing_counts += code.firing_counts().cpu()
        self.contexts.add(context, {"n": torch.ones(n), "active": per_token})

    def result(self, resamples: int = 0, seed: int = 0) -> dict:
        """l0 (with l0_ci when resamples > 0: `bootstrap_intervals` over contexts), firing_frequency [d_sae]
        (float64 tensor), dead/dense fractions and counts, counts below 1e-5 and 1e-6, and the histogram of
        log10(f + 1e-10) over DENSITY_BIN_EDGES."""
        n = max(self.n_tokens, 1)
        frequency = self.firing_counts.double() / n
        log_density = torch.log10(frequency + DENSITY_EPS).clamp(DENSITY_BIN_EDGES[0], DENSITY_BIN_EDGES[-1])
        histogram = torch.histogram(log_density, bins=DENSITY_BIN_EDGES).hist
        dead = int((self.firing_counts == 0).sum())
        dense = int((frequency > self.dense_threshold).sum())
        intervals = bootstrap_intervals(self.contexts.per_context(), _sparsity_metrics, resamples, seed)
        return {
            "n_tokens": self.n_tokens,
            **_with_intervals({"l0": self.active_entries / n}, intervals),
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


def _sparsity_metrics(sums: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """l0 [B] from sums over tokens (n, active: [B])."""
    return {"l0": _ratio(sums["active"], sums["n"])}


DOWNSTREAM_TERMS = ("ce_clean", "ce_sae", "ce_zero", "ce_mean", "kl_sae", "kl_zero", "kl_mean")


def _downstream_metrics(sums: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Metrics [B] from sums over predictions (n and DOWNSTREAM_TERMS: [B])."""
    mean = {name: _ratio(sums[name], sums["n"]) for name in DOWNSTREAM_TERMS}
    return {
        **mean,
        "ce_recovered_zero": _ratio(mean["ce_zero"] - mean["ce_sae"], mean["ce_zero"] - mean["ce_clean"]),
        "ce_recovered_mean": _ratio(mean["ce_mean"] - mean["ce_sae"], mean["ce_mean"] - mean["ce_clean"]),
        "delta_lm_loss": mean["ce_sae"] - mean["ce_clean"],
        "kl_score_zero": _ratio(mean["kl_zero"] - mean["kl_sae"], mean["kl_zero"]),
        "kl_score_mean": _ratio(mean["kl_mean"] - mean["kl_sae"], mean["kl_mean"]),
    }


class DownstreamStats:
    """Per-token losses of the clean, spliced and ablated model, summed over kept positions per context."""

    def __init__(self) -> None:
        self.n_predictions = 0
        self.contexts = ContextSums()  # n and DOWNSTREAM_TERMS per context

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
        context: torch.Tensor | None = None,
    ) -> None:
        """All [batch, pos]: next-token cross-entropy of the clean model, with the reconstruction spliced in, with
        the hook zero- and mean-ablated; KL(clean || each) at the same predictions; mask (bool) keeps positions.
        context [batch] int64: each row's context id (None: the rows are new contexts, numbered on)."""
        values = dict(zip(DOWNSTREAM_TERMS, (ce_clean, ce_sae, ce_zero, ce_mean, kl_sae, kl_zero, kl_mean)))
        keep = mask.to("cpu", torch.bool)
        if context is None:
            context = _new_contexts(self.contexts.n_contexts, keep.shape[0])
        self.n_predictions += int(keep.sum())
        terms = {name: torch.where(keep, _f64(value), 0.0).sum(1) for name, value in values.items()}
        self.contexts.add(context, {"n": keep.sum(1), **terms})

    def result(self, resamples: int = 0, seed: int = 0) -> dict[str, float | int | list[float] | None]:
        """Means of each term, CE loss recovered against zero and mean ablation, delta LM loss (ce_sae - ce_clean),
        KL scores (kl_abl - kl_sae) / kl_abl, each with `<name>_ci` when resamples > 0 (`bootstrap_intervals` over
        contexts, seeded by `seed`); ratios with a zero denominator are None."""
        totals = self.contexts.totals() if self.contexts.tables else _zero_sums()
        point = {name: _scalar(value) for name, value in _downstream_metrics(totals).items()}
        intervals = bootstrap_intervals(self.contexts.per_context(), _downstream_metrics, resamples, seed)
        return {"n_predictions": self.n_predictions, **_with_intervals(point, intervals)}


def _zero_sums() -> dict[str, torch.Tensor]:
    """Sums [1] over no predictions (every metric undefined)."""
    return {name: torch.zeros(1, dtype=torch.float64) for name in ("n", *DOWNSTREAM_TERMS)}
