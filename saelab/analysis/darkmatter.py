"""Dark-matter decomposition of SAE errors (Engels et al. 2024, "Decomposing The Dark Matter of Sparse
Autoencoders", arXiv 2410.14670).

With e = x - x_hat an SAE's error, one matrix W* = argmin_W sum_t ||e_t - x_t W||^2 (least squares, no
intercept) splits every activation exactly into three parts:

    x = x_hat + x W* + eps_NL          (reconstruction + linear error + nonlinear error)

W* is fitted on fit tokens and judged on held-out tokens: how much of the error vector is linearly predictable
from x (R^2 per dimension and overall), how well the per-token norms ||e||^2, ||x_hat||^2, ||x||^2 and
||eps_NL||^2 are linear functions of x, the nonlinear FVU (FVU of x against x_hat + x W*), whether several SAEs
of one hook fail on the same tokens, and (with the model) the next-token cross-entropy when the model runs on
x_hat plus only the linear or only the nonlinear error.

Everything streams: least squares accumulates the normal equations X^T X and X^T Y in float64 over batches and
R^2 accumulates sums, so the token count costs time, not memory. Three passes over re-iterable batch sources:
    1. fit tokens: W* and the norm regressions that do not need W*
    2. fit tokens again: the ||eps_NL||^2 regression (eps_NL needs W*)
    3. held-out tokens: every R^2, the FVUs, per-token error norms
"""

from __future__ import annotations

import itertools
import json
import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from saelab.activations.cache import ActivationCache
from saelab.config import DarkMatterCommand, DataConfig, to_dict
from saelab.errors import SaelabError
from saelab.sae.base import SAE

# Singular values of X^T X below this fraction of the largest are treated as zero. The paper calls
# torch.linalg.lstsq(X, E, rcond=1e-9) on the float32 data matrix; solving the normal equations squares X's
# singular values, so 1e-12 here drops directions of X with sigma < 1e-6 sigma_max: about the float32
# resolution of the stored activations. Like the paper's rcond it guards against rank deficiency (e.g. a dead
# dimension) and is not a regulariser: well-conditioned data gets the exact least-squares solution.
DEFAULT_RCOND = 1e-12
# Per-token regression targets, in column order: ||e||^2, ||x_hat||^2, ||x||^2, ||eps_NL||^2.
NORM_TARGETS = ("error", "reconstruction", "input", "nonlinear_error")
NORM_LABELS = {
    "error": "||e||^2",
    "reconstruction": "||x_hat||^2",
    "input": "||x||^2",
    "nonlinear_error": "||eps_NL||^2",
}
TOP_FRACTION = 0.01  # "worst tokens": the top 1% of per-token error norms
SCATTER_POINTS = 2000


# --- streaming least squares and R^2 (model-free) ------------------------------------------------------------


class ColumnMoments:
    """Streaming count, mean [q] and sum of squared deviations [q] per column, in float64 (Chan et al.'s
    pairwise update, so the deviations never suffer the cancellation of sum(y^2) - n mean^2)."""

    def __init__(self, n_columns: int, device: str | torch.device | None = None):
        self.n = 0
        self.mean = torch.zeros(n_columns, dtype=torch.float64, device=device)
        self.m2 = torch.zeros(n_columns, dtype=torch.float64, device=device)

    def update(self, Y: torch.Tensor) -> None:
        """Y [N, q]."""
        count = Y.shape[0]
        if count == 0:
            return
        Y = Y.to(torch.float64)
        batch_mean = Y.mean(0)
        batch_m2 = (Y - batch_mean).square().sum(0)
        total = self.n + count
        delta = batch_mean - self.mean
        self.mean += delta * (count / total)
        self.m2 += batch_m2 + delta.square() * (self.n * count / total)
        self.n = total

    @property
    def sum_squares(self) -> torch.Tensor:
        """[q] sum_t y_tj^2."""
        return self.m2 + self.n * self.mean.square()


@dataclass(frozen=True)
class R2:
    """Coefficient of determination of a q-output prediction.

    per_dim:      [q] R2_j = 1 - SSE_j / SS_j with SS_j = sum_t (y_tj - mean_j)^2 (NaN where y_j is constant)
    pooled:       1 - sum_j SSE_j / sum_j SS_j: the share of the total variance explained
    mean_per_dim: the mean of per_dim over non-constant dimensions (what Engels et al. report)
    """

    per_dim: torch.Tensor
    pooled: float
    mean_per_dim: float

    @staticmethod
    def from_sums(sse: torch.Tensor, ss: torch.Tensor) -> R2:
        """From per-column residual sums of squares sse [q] and total (centred) sums of squares ss [q]."""
        per_dim = torch.where(ss > 0, 1 - sse / ss, torch.full_like(ss, math.nan))
        pooled = 1 - float(sse.sum()) / float(ss.sum()) if float(ss.sum()) > 0 else math.nan
        return R2(per_dim.cpu(), pooled, float(per_dim.nanmean()))

    def to_dict(self, per_dim: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {"pooled": self.pooled, "mean_per_dim": self.mean_per_dim}
        if per_dim:
            out["per_dim"] = [None if math.isnan(v) else v for v in self.per_dim.tolist()]
        return out


class NormalEquations:
    """Streaming least squares without intercept, Y [N, q] ~ X [N, p] W [p, q].

    Accumulates X^T X [p, p], X^T Y [p, q] and the column moments of Y in float64, so `solve` and the
    in-sample R^2 never need the data again. Add a constant column to X (see `design`) for an intercept.
    """

    def __init__(self, n_features: int, n_targets: int, device: str | torch.device | None = None):
        self.gram = torch.zeros(n_features, n_features, dtype=torch.float64, device=device)
        self.cross = torch.zeros(n_features, n_targets, dtype=torch.float64, device=device)
        self.targets = ColumnMoments(n_targets, device)

    @property
    def n(self) -> int:
        """Rows accumulated so far."""
        return self.targets.n

    def update(self, X: torch.Tensor, Y: torch.Tensor) -> None:
        """Add rows X [N, p], Y [N, q] (cast to float64)."""
        if X.shape[0] != Y.shape[0]:
            raise ValueError(f"X has {X.shape[0]} rows but Y has {Y.shape[0]}")
        X = X.to(self.gram.device, torch.float64)
        Y = Y.to(self.gram.device, torch.float64)
        self.gram.addmm_(X.T, X)
        self.cross.addmm_(X.T, Y)
        self.targets.update(Y)

    def solve(self, rcond: float = DEFAULT_RCOND) -> torch.Tensor:
        """W [p, q] float64 minimising sum_t ||y_t - x_t W||^2: the minimum-norm solution of X^T X W = X^T Y
        (SVD-based gelsd on the CPU; singular values of X^T X below rcond * the largest count as zero, see
        DEFAULT_RCOND)."""
        if self.n == 0:
            raise SaelabError("No tokens reached the least-squares fit; give it a non-empty set of fit tokens.")
        solution = torch.linalg.lstsq(self.gram.cpu(), self.cross.cpu(), rcond=rcond, driver="gelsd").solution
        return solution.to(self.gram.device)

    def rank(self, rcond: float = DEFAULT_RCOND) -> int:
        """Number of directions of X that `solve` keeps (eigenvalues of X^T X above rcond * the largest)."""
        eigenvalues = torch.linalg.eigvalsh(self.gram.cpu())
        return int((eigenvalues > rcond * eigenvalues[-1]).sum())

    def condition_number(self) -> float:
        """sigma_max / sigma_min of X (the square root of X^T X's eigenvalue ratio; inf if X is rank-deficient)."""
        eigenvalues = torch.linalg.eigvalsh(self.gram.cpu())
        return math.sqrt(eigenvalues[-1] / eigenvalues[0]) if eigenvalues[0] > 0 else math.inf

    def residual_sum_squares(self, W: torch.Tensor) -> torch.Tensor:
        """[q] sum_t (y_tj - x_t w_j)^2 over the accumulated rows, from the sums alone:
        sum y_j^2 - 2 w_j . (X^T y_j) + w_j^T X^T X w_j (clamped at 0 against rounding)."""
        W = W.to(self.gram)
        sse = self.targets.sum_squares - 2 * (W * self.cross).sum(0) + (W * (self.gram @ W)).sum(0)
        return sse.clamp_min(0)

    def r2(self, W: torch.Tensor) -> R2:
        """In-sample R^2 of Y ~ X W [p, q] over the accumulated rows."""
        return R2.from_sums(self.residual_sum_squares(W), self.targets.m2)


class HeldOutR2:
    """Streaming R^2 of given predictions (e.g. on held-out tokens), with the evaluated data's own mean."""

    def __init__(self, n_targets: int, device: str | torch.device | None = None):
        self.targets = ColumnMoments(n_targets, device)
        self.sse = torch.zeros(n_targets, dtype=torch.float64, device=device)

    def update(self, Y: torch.Tensor, prediction: torch.Tensor) -> None:
        """Targets Y [N, q] and their predictions [N, q]."""
        Y = Y.to(self.sse.device, torch.float64)
        self.targets.update(Y)
        self.sse += (Y - prediction.to(self.sse.device, torch.float64)).square().sum(0)

    def result(self) -> R2:
        return R2.from_sums(self.sse, self.targets.m2)


def design(x: torch.Tensor, intercept: bool = False) -> torch.Tensor:
    """x [N, d] -> float64 regressors [N, d], or [N, d + 1] with a trailing constant column for an intercept."""
    x = x.to(torch.float64)
    return torch.cat([x, torch.ones_like(x[:, :1])], dim=1) if intercept else x


def split_error(
    x: torch.Tensor, x_hat: torch.Tensor, weights: torch.Tensor, intercept: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """x, x_hat [N, d], weights W* [p, d] -> (linear error x W* [N, d], nonlinear error e - x W* [N, d]) in
    float64, so that x = x_hat + linear + nonlinear (up to float64 rounding)."""
    linear = design(x, intercept) @ weights.to(torch.float64)
    return linear, x.to(torch.float64) - x_hat.to(torch.float64) - linear


def _squared_norm(t: torch.Tensor) -> torch.Tensor:
    """[N, d] -> [N, 1]."""
    return t.square().sum(dim=1, keepdim=True)


@torch.no_grad()
def reconstruct(sae: SAE, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Raw activations x [N, d_in] -> (reconstruction x_hat [N, d_in] in float64, number of nonzero latents)."""
    x_hat, code = sae.reconstruct(x)
    return x_hat.to(torch.float64), int(code.active().sum())


# --- the decomposition over several SAEs --------------------------------------------------------------------


@dataclass
class SAEDarkMatter:
    """One SAE's decomposition. p = d_in, or d_in + 1 with an intercept; N = held-out tokens.

    weights:            W* [p, d_in], the linear error map
    norm_weights:       [p, 4] coefficients predicting NORM_TARGETS from x
    error_r2:           held-out R^2 of predicting e by x W*; error_r2_fit: the same in-sample
    norm_r2:            target -> held-out R^2 (norm_r2_fit in-sample)
    fvu:                sum ||e||^2 / sum ||x - mean x||^2 on held-out tokens; nonlinear_fvu: the same with
                        eps_NL for e (FVU of x against x_hat + x W*); linear_error_fvu: with x W* for e
    error_norm:         [N] per-token ||e_t||; predicted_error_sq: [N] the regression's ||e_t||^2
    downstream:         cross-entropies with the model (filled by `downstream_ce`)
    """

    name: str
    weights: torch.Tensor
    norm_weights: torch.Tensor
    error_r2: R2
    error_r2_fit: R2
    norm_r2: dict[str, float]
    norm_r2_fit: dict[str, float]
    fvu: float
    nonlinear_fvu: float
    linear_error_fvu: float
    l0: float
    error_norm: torch.Tensor
    predicted_error_sq: torch.Tensor
    downstream: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Every scalar, and the per-dimension held-out R^2 of the error."""
        return {
            "l0": self.l0,
            "fvu": self.fvu,
            "nonlinear_fvu": self.nonlinear_fvu,
            "linear_error_fvu": self.linear_error_fvu,
            "error_r2": {"held_out": self.error_r2.to_dict(per_dim=True), "fit": self.error_r2_fit.to_dict()},
            "norm_r2": {"held_out": self.norm_r2, "fit": self.norm_r2_fit},
            "downstream_ce": self.downstream,
        }


@dataclass
class DarkMatterResult:
    """The decomposition of every SAE over the same fit and held-out tokens."""

    saes: list[SAEDarkMatter]
    d_in: int
    fit_tokens: int
    eval_tokens: int
    intercept: bool
    rcond: float
    rank: int
    condition_number: float
    downstream: dict[str, Any] = field(default_factory=dict)
    setup: dict[str, Any] = field(default_factory=dict)  # where the tokens came from, timings, the config

    def shared_failures(self) -> dict[str, torch.Tensor]:
        """Do the SAEs fail on the same held-out tokens? See `shared_failures`."""
        return shared_failures(torch.stack([s.error_norm for s in self.saes]))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            **self.setup,
            "d_in": self.d_in,
            "fit_tokens": self.fit_tokens,
            "eval_tokens": self.eval_tokens,
            "intercept": self.intercept,
            "rcond": self.rcond,
            "fit_rank": self.rank,
            "fit_condition_number": self.condition_number,
            "saes": {s.name: s.to_dict() for s in self.saes},
        }
        if len(self.saes) > 1:
            agreement = self.shared_failures()
            out["shared_failures"] = {"names": [s.name for s in self.saes], "top_fraction": TOP_FRACTION}
            out["shared_failures"].update({key: value.tolist() for key, value in agreement.items()})
        if self.downstream:
            out["downstream"] = self.downstream
        return out


def shared_failures(error_norms: torch.Tensor, top_fraction: float = TOP_FRACTION) -> dict[str, torch.Tensor]:
    """Per-token error norms of S SAEs on the same tokens [S, N] -> [S, S] matrices: Pearson and Spearman
    correlations, and top_overlap[i, j] = the fraction of SAE i's worst `top_fraction` tokens that are also
    among SAE j's worst."""
    values = error_norms.to(torch.float64)
    ranks = values.argsort(dim=1).argsort(dim=1).to(torch.float64)
    count = max(1, math.ceil(top_fraction * values.shape[1]))
    worst = torch.zeros_like(values)
    worst.scatter_(1, values.topk(count, dim=1).indices, 1.0)
    return {
        "pearson": torch.corrcoef(values),
        "spearman": torch.corrcoef(ranks),
        "top_overlap": worst @ worst.T / count,
    }


def _batches(source: Iterable[torch.Tensor], device: str | torch.device, desc: str, progress: bool) -> Iterator:
    total = getattr(source, "n_tokens", None)
    with tqdm(total=total, desc=desc, unit="tok", unit_scale=True, disable=not progress) as bar:
        for x in source:
            yield x.to(device, torch.float32)
            bar.update(x.shape[0])


def decompose(
    saes: dict[str, SAE],
    fit: Iterable[torch.Tensor],
    held_out: Iterable[torch.Tensor],
    intercept: bool = False,
    rcond: float = DEFAULT_RCOND,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> DarkMatterResult:
    """Fit and evaluate the dark-matter decomposition of every SAE in `saes` (name -> SAE, all with one d_in).

    fit, held_out: re-iterable sources of raw activation batches [n, d_in] (lists of tensors, or
    `CachedActivations`); `fit` is read twice, `held_out` once.
    """
    d_in = {sae.d_in for sae in saes.values()}
    if len(d_in) != 1:
        raise SaelabError(f"Got SAEs of input widths {sorted(d_in)}; pass one or more SAEs of one hook.")
    d = d_in.pop()
    p = d + intercept
    fits = {name: NormalEquations(p, d + 3, device) for name in saes}
    for x in _batches(fit, device, "pass 1/3: fit W*", progress):
        _check_width(x, d)
        X, x64 = design(x, intercept), x.to(torch.float64)
        for name, sae in saes.items():
            x_hat, _ = reconstruct(sae, x)
            e = x64 - x_hat
            fits[name].update(X, torch.cat([e, _squared_norm(e), _squared_norm(x_hat), _squared_norm(x64)], dim=1))
    solutions = {name: fits[name].solve(rcond) for name in saes}

    nonlinear_fits = {name: NormalEquations(p, 1, device) for name in saes}
    for x in _batches(fit, device, "pass 2/3: fit ||eps_NL||^2", progress):
        X = design(x, intercept)
        for name, sae in saes.items():
            x_hat, _ = reconstruct(sae, x)
            _, nonlinear = split_error(x, x_hat, solutions[name][:, :d], intercept)
            nonlinear_fits[name].update(X, _squared_norm(nonlinear))
    norm_weights = {name: torch.cat([solutions[name][:, d:], nonlinear_fits[name].solve(rcond)], 1) for name in saes}

    input_moments = ColumnMoments(d, device)
    error_eval = {name: HeldOutR2(d, device) for name in saes}
    norm_eval = {name: HeldOutR2(len(NORM_TARGETS), device) for name in saes}
    squared_sums = {name: torch.zeros(3, dtype=torch.float64, device=device) for name in saes}
    active = dict.fromkeys(saes, 0)
    error_norms: dict[str, list[torch.Tensor]] = {name: [] for name in saes}
    predicted: dict[str, list[torch.Tensor]] = {name: [] for name in saes}
    for x in _batches(held_out, device, "pass 3/3: held-out", progress):
        _check_width(x, d)
        X, x64 = design(x, intercept), x.to(torch.float64)
        input_moments.update(x64)
        for name, sae in saes.items():
            x_hat, n_active = reconstruct(sae, x)
            linear, nonlinear = split_error(x, x_hat, solutions[name][:, :d], intercept)
            e = x64 - x_hat
            error_eval[name].update(e, linear)
            norms = torch.cat([_squared_norm(t) for t in (e, x_hat, x64, nonlinear)], dim=1)
            prediction = X @ norm_weights[name]
            norm_eval[name].update(norms, prediction)
            squared_sums[name] += torch.stack([norms[:, 0].sum(), norms[:, 3].sum(), linear.square().sum()])
            active[name] += n_active
            error_norms[name].append(norms[:, 0].sqrt().float().cpu())
            predicted[name].append(prediction[:, 0].float().cpu())
    if input_moments.n == 0:
        raise SaelabError("No held-out tokens to evaluate on; give a non-empty set of evaluation tokens.")

    total_variance = float(input_moments.m2.sum())
    first = fits[next(iter(saes))]
    results = []
    for name in saes:
        fit_sse = fits[name].residual_sum_squares(solutions[name])
        fit_ss = fits[name].targets.m2
        fit_norm_r2 = [R2.from_sums(fit_sse[d + i : d + i + 1], fit_ss[d + i : d + i + 1]).pooled for i in range(3)]
        fit_norm_r2.append(nonlinear_fits[name].r2(norm_weights[name][:, 3:]).pooled)
        held_norm_r2 = norm_eval[name].result().per_dim.tolist()
        error_sq, nonlinear_sq, linear_sq = squared_sums[name].tolist()
        results.append(
            SAEDarkMatter(
                name=name,
                weights=solutions[name][:, :d].cpu(),
                norm_weights=norm_weights[name].cpu(),
                error_r2=error_eval[name].result(),
                error_r2_fit=R2.from_sums(fit_sse[:d], fit_ss[:d]),
                norm_r2=dict(zip(NORM_TARGETS, held_norm_r2, strict=True)),
                norm_r2_fit=dict(zip(NORM_TARGETS, fit_norm_r2, strict=True)),
                fvu=error_sq / total_variance,
                nonlinear_fvu=nonlinear_sq / total_variance,
                linear_error_fvu=linear_sq / total_variance,
                l0=active[name] / input_moments.n,
                error_norm=torch.cat(error_norms[name]),
                predicted_error_sq=torch.cat(predicted[name]),
            )
        )
    return DarkMatterResult(
        saes=results,
        d_in=d,
        fit_tokens=first.n,
        eval_tokens=input_moments.n,
        intercept=intercept,
        rcond=rcond,
        rank=first.rank(rcond),
        condition_number=first.condition_number(),
    )


def _check_width(x: torch.Tensor, d: int) -> None:
    if x.dim() != 2 or x.shape[1] != d:
        raise SaelabError(f"Activation batches must be [tokens, {d}] to match the SAEs; got {tuple(x.shape)}.")


# --- activations from a cache -------------------------------------------------------------------------------


class CachedActivations:
    """Re-iterable source of one hook's cached activations at storage indices `index` [N], in batches of
    `batch_tokens` [n, d] float32 (read memory-mapped, one batch at a time)."""

    def __init__(self, cache: ActivationCache, hook: str, index: torch.Tensor, batch_tokens: int = 8192):
        self.cache = cache
        self.hook = cache.require(hook)
        self.index = index
        self.batch_tokens = batch_tokens

    @property
    def n_tokens(self) -> int:
        return len(self.index)

    def __iter__(self) -> Iterator[torch.Tensor]:
        for start in range(0, len(self.index), self.batch_tokens):
            batch = self.cache.read(self.index[start : start + self.batch_tokens], hooks=[self.hook])
            yield batch.acts[self.hook].float()


def usable_tokens(
    cache: ActivationCache, skip_positions: int, limit: int, after_context: int = -1, chunk_tokens: int = 1 << 20
) -> torch.Tensor:
    """Storage indices [m <= limit] of the first `limit` tokens (in corpus order) at positions >= skip_positions
    in contexts after `after_context`; the token metadata is scanned `chunk_tokens` at a time."""
    found: list[torch.Tensor] = []
    count = 0
    for start in range(0, cache.n_tokens, chunk_tokens):
        if count >= limit:
            break
        info = cache.read(torch.arange(start, min(start + chunk_tokens, cache.n_tokens)), hooks=[])
        keep = ((info.position >= skip_positions) & (info.context > after_context)).nonzero().squeeze(1) + start
        found.append(keep[: limit - count])
        count += len(found[-1])
    return torch.cat(found) if found else torch.zeros(0, dtype=torch.long)


def split_tokens(
    cache: ActivationCache,
    eval_cache: ActivationCache | None,
    fit_tokens: int,
    eval_tokens: int,
    skip_positions: int,
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(fit indices into `cache`, held-out indices, notes). Without `eval_cache` the held-out tokens come from
    the contexts after the last fit context (never one context on both sides), and the cache must hold both
    sets in full; with it, each set is capped by what its cache holds (said in the notes)."""
    fit = usable_tokens(cache, skip_positions, fit_tokens)
    notes = []
    if eval_cache is None:
        last_context = int(cache.read(fit[-1:], hooks=[]).context[0]) if len(fit) else -1
        held_out = usable_tokens(cache, skip_positions, eval_tokens, after_context=last_context)
        if len(fit) < fit_tokens or len(held_out) < eval_tokens:
            raise SaelabError(
                f"The cache in {cache.path} has too few tokens at positions >= {skip_positions} for {fit_tokens:,} "
                f"fit plus {eval_tokens:,} held-out tokens (it has {len(fit):,} + {len(held_out):,}). Lower "
                "--fit-tokens / --eval-tokens, pass a separate --eval-cache, or build a bigger cache."
            )
        return fit, held_out, notes
    held_out = usable_tokens(eval_cache, skip_positions, eval_tokens)
    for name, got, asked, source in (("fit", fit, fit_tokens, cache), ("held-out", held_out, eval_tokens, eval_cache)):
        if len(got) < asked:
            notes.append(
                f"{source.path} holds only {len(got):,} tokens at positions >= {skip_positions}: "
                f"using {len(got):,} {name} tokens instead of {asked:,}."
            )
    return fit, held_out, notes


# --- downstream cross-entropy ---------------------------------------------------------------------------------

SPLICES = ("reconstruction", "reconstruction_plus_linear_error", "reconstruction_plus_nonlinear_error")


def fresh_contexts(manifest: dict[str, Any], tokenizer: Any, n_tokens: int) -> torch.Tensor:
    """[n, context_length] token contexts of a cache's corpus that come after every context the cache holds,
    enough for `n_tokens` tokens (fewer if the corpus ends first)."""
    from saelab.data import token_contexts

    data = DataConfig(**manifest["identity"]["data"])
    used = manifest["shards"][-1]["contexts"][1] if manifest["shards"] else 0
    wanted = math.ceil(n_tokens / data.context_length)
    contexts = list(itertools.islice(token_contexts(data, tokenizer), used, used + wanted))
    if not contexts:
        raise SaelabError(
            f"Corpus '{data.corpus}' has no text beyond the {used:,} contexts in the cache, so there is nothing "
            "held out for the downstream loss. Use --no-downstream, or a cache that leaves part of the corpus unused."
        )
    return torch.stack(contexts)


def _splice(sae: SAE, weights: torch.Tensor, intercept: bool, part: str):
    """A splice.py replacement [batch, pos, d] -> [batch, pos, d] putting x_hat (+ one error part) in place of x."""

    def replace(act: torch.Tensor) -> torch.Tensor:
        flat = act.reshape(-1, act.shape[-1]).float()
        x_hat, _ = reconstruct(sae, flat)
        if part != "reconstruction":
            linear, nonlinear = split_error(flat, x_hat, weights, intercept)
            x_hat = x_hat + (linear if part == "reconstruction_plus_linear_error" else nonlinear)
        return x_hat.to(act.dtype).reshape(act.shape)

    return replace


@torch.no_grad()
def downstream_ce(
    model,
    hook: str,
    saes: dict[str, tuple[SAE, torch.Tensor]],
    contexts: torch.Tensor,
    skip_positions: int,
    intercept: bool = False,
    batch_contexts: int = 8,
    progress: bool = False,
) -> dict[str, Any]:
    """Mean next-token cross-entropy (nats) of `model` on `contexts` [n, pos] with `hook` spliced at positions
    >= skip_positions that hold no special token, averaged over exactly those positions.

    saes: name -> (SAE, W* [p, d]). Returns {"tokens", "clean", "input" (x spliced back: equals clean, a sanity
    check), "saes": {name: {part: CE}}} with part in SPLICES: x_hat, x_hat + x W*, x_hat + eps_NL (= x - x W*).
    """
    from saelab.analysis.splice import next_token_losses, run_logits, splice_keep_mask

    runs = {("clean", None): None, ("input", None): lambda act: act}
    for name, (sae, weights) in saes.items():
        runs.update({(name, part): _splice(sae, weights, intercept, part) for part in SPLICES})
    totals = dict.fromkeys(runs, 0.0)
    count = 0
    for start in tqdm(range(0, len(contexts), batch_contexts), desc="downstream CE", disable=not progress):
        tokens = contexts[start : start + batch_contexts]
        keep = splice_keep_mask(model, tokens) & (torch.arange(tokens.shape[1]) >= skip_positions)
        measured = keep[:, :-1].to(model.cfg.device)
        count += int(measured.sum())
        for key, replace in runs.items():
            logits = run_logits(model, tokens, hook, replace=replace, keep=keep)
            totals[key] += float(next_token_losses(logits, tokens)[measured].sum())
    if count == 0:
        raise SaelabError(f"No position >= --skip-positions {skip_positions} in the downstream contexts; lower it.")
    mean = {key: total / count for key, total in totals.items()}
    return {
        "tokens": count,
        "clean": mean["clean", None],
        "input": mean["input", None],
        "saes": {name: {part: mean[name, part] for part in SPLICES} for name in saes},
    }


# --- the command: caches in, JSON and HTML report out ---------------------------------------------------------


def sae_names(folders: list[str]) -> list[str]:
    """Short unique display names: the folder name without the trainer's '<hook>__' prefix, led by the parent
    folder's name when the folders have different parents (the full path where names still collide)."""
    paths = [Path(f) for f in folders]
    names = [p.name.split("__", 1)[-1] for p in paths]
    if len({p.parent for p in paths}) > 1:
        names = [f"{p.parent.name}/{name}" for p, name in zip(paths, names, strict=True)]
    return [str(p) if names.count(n) > 1 else n for p, n in zip(paths, names, strict=True)]


def _load_saes(folders: list[str], device: str) -> tuple[dict[str, SAE], dict[str, str]]:
    from saelab.sae.io import load_sae

    if not folders:
        raise SaelabError("No SAE given. Pass one or more SAE folders of the same hook with --sae DIR [DIR ...].")
    names = sae_names(folders)
    saes = {name: load_sae(folder, device=device).eval() for name, folder in zip(names, folders, strict=True)}
    return saes, dict(zip(names, folders, strict=True))


def _hook_of(saes: dict[str, SAE], cache: ActivationCache) -> str:
    hooks = {sae.metadata.get("hook") for sae in saes.values()}
    if None in hooks and len(cache.hooks) == 1:
        hooks = (hooks - {None}) or {cache.hooks[0]}
    if len(hooks) != 1 or None in hooks:
        found = ", ".join(f"{n}: {s.metadata.get('hook')}" for n, s in saes.items())
        raise SaelabError(f"The SAEs must all read one known hook ({found}). Pass SAEs trained on the same hook.")
    return hooks.pop()


def run_darkmatter(cmd: DarkMatterCommand, progress: bool = True) -> DarkMatterResult:
    """`saelab darkmatter`: decompose the errors of the SAEs in cmd.darkmatter.sae over cached activations,
    optionally measure downstream CE, and write <out>/darkmatter.json, <out>/darkmatter.html and the maps W*
    [p, d_in] (float64, keyed by SAE name) to <out>/linear_maps.safetensors."""
    cfg = cmd.darkmatter
    started = time.perf_counter()
    if cfg.fit_tokens <= 0 or cfg.eval_tokens <= 0 or cfg.batch_tokens <= 0 or cfg.skip_positions < 0:
        raise SaelabError("--fit-tokens, --eval-tokens and --batch-tokens must be positive, --skip-positions >= 0.")
    saes, folders = _load_saes(cfg.sae, cfg.device)
    cache = ActivationCache(cfg.cache, progress=progress)
    eval_cache = ActivationCache(cfg.eval_cache, progress=progress) if cfg.eval_cache else None
    hook = _hook_of(saes, cache)
    d_in = next(iter(saes.values())).d_in
    cache.require(hook, d_in)
    model_name = cache.manifest["identity"]["model"]["model"]
    if eval_cache is not None:
        eval_cache.require(hook, d_in)
        if eval_cache.manifest["identity"]["model"]["model"] != model_name:
            raise SaelabError(
                f"{cache.path} holds activations of {model_name} but {eval_cache.path} of "
                f"{eval_cache.manifest['identity']['model']['model']}; evaluate on a cache of the same model."
            )
    fit_index, eval_index, notes = split_tokens(cache, eval_cache, cfg.fit_tokens, cfg.eval_tokens, cfg.skip_positions)
    if len(fit_index) <= d_in + cfg.intercept:
        raise SaelabError(
            f"Only {len(fit_index):,} fit tokens for a {d_in}-dimensional linear map: the fit would be exact and "
            "meaningless. Use a cache with many more tokens than d_in (the paper fits on 150k)."
        )
    if len(eval_index) < 2:
        raise SaelabError("Fewer than 2 held-out tokens; use a bigger --eval-cache or lower --skip-positions.")
    for note in notes:
        tqdm.write(f"saelab: {note}")
    fit = CachedActivations(cache, hook, fit_index, cfg.batch_tokens)
    held_out = CachedActivations(eval_cache or cache, hook, eval_index, cfg.batch_tokens)
    result = decompose(saes, fit, held_out, cfg.intercept, cfg.rcond, cfg.device, progress)
    decomposed = time.perf_counter()
    if cfg.downstream:
        from saelab.models import load_model

        source = eval_cache or cache
        model = load_model(model_name, device=cfg.device, dtype=source.manifest["identity"]["model"]["model_dtype"])
        contexts = fresh_contexts(source.manifest, model.tokenizer, cfg.downstream_tokens)
        fitted = {s.name: (saes[s.name], s.weights.to(cfg.device)) for s in result.saes}
        result.downstream = downstream_ce(
            model, hook, fitted, contexts, cfg.skip_positions, cfg.intercept, progress=progress
        )
        result.downstream["text"] = f"{len(contexts)} contexts of {source.path}'s corpus after the cached ones"
        for s in result.saes:
            s.downstream = result.downstream["saes"][s.name]
    result.setup = {
        "hook": hook,
        "model": model_name,
        "fit_cache": str(cache.path),
        "eval_cache": str(eval_cache.path) if eval_cache else f"{cache.path} (contexts after the fit tokens)",
        "skip_positions": cfg.skip_positions,
        "sae_folders": folders,
        "notes": notes,
        "wall_seconds": {
            "decomposition": decomposed - started,
            "downstream": time.perf_counter() - decomposed,
            "total": time.perf_counter() - started,
        },
        "config": to_dict(cmd),
    }
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "darkmatter.json").write_text(json.dumps(_json_safe(result.to_dict()), indent=2, allow_nan=False))
    save_file({s.name: s.weights.contiguous() for s in result.saes}, str(out / "linear_maps.safetensors"))
    write_darkmatter_report(result, out / "darkmatter.html")
    return result


def _json_safe(value: Any) -> Any:
    """NaN and inf -> None (strict JSON), recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _json_safe(v) for key, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def summary_rows(result: DarkMatterResult) -> list[dict[str, Any]]:
    """One row per SAE of the headline held-out numbers (the report's table and the CLI's printout)."""
    rows = []
    for s in result.saes:
        row = {
            "SAE": s.name,
            "L0": s.l0,
            "FVU": s.fvu,
            "nonlinear FVU": s.nonlinear_fvu,
            "error R2 pooled": s.error_r2.pooled,
            "error R2 mean/dim": s.error_r2.mean_per_dim,
            "error R2 pooled (fit)": s.error_r2_fit.pooled,
        }
        row.update({f"{NORM_LABELS[t]} R2": s.norm_r2[t] for t in NORM_TARGETS})
        rows.append(row)
    return rows


def write_darkmatter_report(result: DarkMatterResult, path: str | Path) -> Path:
    """The HTML report of `result`: tables of every headline number and the figures."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    from saelab.analysis.report import Section, write_report

    setup = result.setup
    names = [s.name for s in result.saes]
    sections = [
        Section(
            "Setup",
            f"Hook {setup.get('hook')} of {setup.get('model')}, d_in {result.d_in}. W* fitted on "
            f"{result.fit_tokens:,} tokens of {setup.get('fit_cache')}, evaluated on {result.eval_tokens:,} "
            f"held-out tokens of {setup.get('eval_cache')}; positions < {setup.get('skip_positions')} dropped. "
            f"Least squares {'with' if result.intercept else 'without'} intercept, rcond {result.rcond:g} on "
            f"X^T X: rank {result.rank}, condition number of X {result.condition_number:.4g}. Wall time "
            f"{setup.get('wall_seconds', {}).get('total', math.nan):.1f} s."
            + "".join(f"\n\n{note}" for note in setup.get("notes", [])),
        ),
        Section(
            "Summary (held-out)",
            "x = x_hat + x W* + eps_NL. error R2: share of the error vector e explained by x W* (pooled over "
            "dimensions, and the mean of per-dimension R2 as the paper reports). Norm R2: a linear, intercept-free "
            "prediction of each per-token squared norm from x. Engels et al. (Gemma Scope 9B, layer 20) find about "
            "half of the error variance and over 90% of ||e||^2 linearly predictable.",
            summary_rows(result),
        ),
    ]
    histogram = go.Figure(
        [go.Histogram(x=s.error_r2.per_dim.numpy(), name=s.name, opacity=0.6, nbinsx=60) for s in result.saes]
    )
    histogram.update_layout(
        barmode="overlay", title="Held-out R2 of the error, per dimension", xaxis_title="R2_j", yaxis_title="dimensions"
    )
    sections.append(Section("Error vector", figures=[histogram]))

    bars = go.Figure(
        [
            go.Bar(x=[NORM_LABELS[t] for t in NORM_TARGETS], y=[s.norm_r2[t] for t in NORM_TARGETS], name=s.name)
            for s in result.saes
        ]
    )
    bars.update_layout(barmode="group", title="Held-out R2 of linear norm predictions from x", yaxis_title="R2")
    scatter = go.Figure()
    for s in result.saes:
        pick = torch.linspace(0, len(s.error_norm) - 1, min(len(s.error_norm), SCATTER_POINTS)).long()
        scatter.add_scatter(
            x=s.error_norm[pick].square().numpy(),
            y=s.predicted_error_sq[pick].numpy(),
            mode="markers",
            marker={"size": 3, "opacity": 0.5},
            name=s.name,
        )
    top = max(float(s.error_norm.square().max()) for s in result.saes)
    scatter.add_scatter(x=[0, top], y=[0, top], mode="lines", line={"dash": "dot", "color": "gray"}, name="y = x")
    scatter.update_layout(
        title="Predicted vs actual ||e||^2 (held-out sample)",
        xaxis_title="actual ||e||^2",
        yaxis_title="predicted from x",
    )
    fit_table = [
        {
            "SAE": s.name,
            **{f"{NORM_LABELS[t]} R2 (fit)": s.norm_r2_fit[t] for t in NORM_TARGETS},
            "error R2 mean/dim (fit)": s.error_r2_fit.mean_per_dim,
        }
        for s in result.saes
    ]
    sections.append(Section("Error norms", "In-sample (fit-token) R2 for comparison:", fit_table, [bars, scatter]))

    fvu = go.Figure(
        [
            go.Bar(x=names, y=[s.fvu for s in result.saes], name="FVU (x vs x_hat)"),
            go.Bar(x=names, y=[s.nonlinear_fvu for s in result.saes], name="nonlinear FVU (x vs x_hat + x W*)"),
            go.Bar(x=names, y=[s.linear_error_fvu for s in result.saes], name="||x W*||^2 / total variance"),
        ]
    )
    fvu.update_layout(barmode="group", title="Nonlinear vs total FVU (held-out)", yaxis_title="fraction of variance")
    sections.append(Section("Nonlinear FVU", figures=[fvu]))

    if len(result.saes) > 1:
        agreement = result.shared_failures()
        heatmaps = make_subplots(
            rows=1,
            cols=2,
            subplot_titles=("Pearson correlation of per-token ||e||", f"Shared worst {TOP_FRACTION:.0%} tokens"),
        )
        for col, key in ((1, "pearson"), (2, "top_overlap")):
            heatmaps.add_heatmap(
                z=agreement[key].numpy(),
                x=names,
                y=names,
                zmin=0,
                zmax=1,
                coloraxis="coloraxis",
                text=agreement[key].numpy().round(2),
                texttemplate="%{text}",
                row=1,
                col=col,
            )
        heatmaps.update_layout(height=600, coloraxis={"colorscale": "Viridis"})
        rows = [
            {"SAE": a, **{b: float(agreement["spearman"][i, j]) for j, b in enumerate(names)}}
            for i, a in enumerate(names)
        ]
        sections.append(
            Section(
                "Do the SAEs fail on the same tokens?",
                "Spearman rank correlation of per-token ||e|| on the held-out tokens (heatmaps: Pearson, and the "
                f"fraction of one SAE's worst {TOP_FRACTION:.0%} tokens that are also among the other's).",
                rows,
                [heatmaps],
            )
        )

    if result.downstream:
        ce = result.downstream
        labels = {
            "reconstruction": "x_hat",
            "reconstruction_plus_linear_error": "x_hat + x W*",
            "reconstruction_plus_nonlinear_error": "x_hat + eps_NL",
        }
        rows = [
            {
                "SAE": s.name,
                "clean": ce["clean"],
                "x spliced": ce["input"],
                **{labels[p]: s.downstream[p] for p in SPLICES},
            }
            for s in result.saes
        ]
        ce_bars = go.Figure(
            [go.Bar(x=names, y=[s.downstream[p] - ce["clean"] for s in result.saes], name=labels[p]) for p in SPLICES]
        )
        ce_bars.update_layout(
            barmode="group", title="Increase in next-token CE over clean (nats)", yaxis_title="CE - CE clean"
        )
        sections.append(
            Section(
                "Downstream cross-entropy",
                f"Mean next-token CE (nats) over {ce['tokens']:,} positions of {ce['text']}, with the hook replaced at "
                f"positions >= {setup.get('skip_positions')} (special tokens keep the clean activation). 'x spliced' "
                "puts the clean activation back through the same hook: it must equal clean.",
                rows,
                [ce_bars],
            )
        )
    return write_report(path, "SAE dark matter: linear and nonlinear error", sections)
