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

Everything streams (saelab.analysis.lstsq: the normal equations X^T X and X^T Y and the sums behind R^2 accumulate
in float64), so the token count costs time, not memory. Three passes over re-iterable batch sources:
    1. fit tokens: W* and the norm regressions that do not need W*
    2. fit tokens again: the ||eps_NL||^2 regression (eps_NL needs W*)
    3. held-out tokens: every R^2, the FVUs, per-token error norms

Which cached tokens to use: saelab.analysis.cached_tokens; the HTML page: saelab.analysis.darkmatter_report;
`saelab darkmatter`: saelab.commands.darkmatter.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from saelab.analysis.lstsq import DEFAULT_RCOND, R2, ColumnMoments, HeldOutR2, NormalEquations, design
from saelab.errors import SaelabError
from saelab.sae.base import SAE

# Per-token regression targets: ||e||^2, ||x_hat||^2, ||x||^2, ||eps_NL||^2, and their columns in a norms tensor.
NORM_TARGETS = ("error", "reconstruction", "input", "nonlinear_error")
ERROR, RECONSTRUCTION, INPUT, NONLINEAR_ERROR = range(len(NORM_TARGETS))
TOP_FRACTION = 0.01  # "worst tokens": the top 1% of per-token error norms
SPLICES = ("reconstruction", "reconstruction_plus_linear_error", "reconstruction_plus_nonlinear_error")


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


class _SAEPasses:
    """One SAE's sums over the three passes (module docstring); p = d, or d + 1 with an intercept."""

    # Pass 1 regresses [e | ||e||^2, ||x_hat||^2, ||x||^2] [N, d + 3] on x in one fit (the targets share X^T X): W*,
    # and the norms before NONLINEAR_ERROR, which need no W*.
    PASS1_NORMS = NONLINEAR_ERROR

    def __init__(self, sae: SAE, d: int, intercept: bool, device: str | torch.device):
        self.sae, self.d, self.intercept = sae, d, intercept
        p = d + intercept
        self.fit = NormalEquations(p, d + self.PASS1_NORMS, device)
        self.nonlinear_fit = NormalEquations(p, 1, device)
        self.error_eval = HeldOutR2(d, device)
        self.norm_eval = HeldOutR2(len(NORM_TARGETS), device)
        self.squared_sums = torch.zeros(3, dtype=torch.float64, device=device)  # ||e||^2, ||eps_NL||^2, ||x W*||^2
        self.active = 0
        self.error_norms: list[torch.Tensor] = []
        self.predicted_error_sq: list[torch.Tensor] = []

    def fit_update(self, x: torch.Tensor, X: torch.Tensor, x64: torch.Tensor) -> None:
        """Pass 1: x [N, d], its regressors X [N, p] and x in float64 [N, d]."""
        x_hat, _ = reconstruct(self.sae, x)
        e = x64 - x_hat
        self.fit.update(X, torch.cat([e, _squared_norm(e), _squared_norm(x_hat), _squared_norm(x64)], dim=1))

    def solve(self, rcond: float) -> None:
        """After pass 1: the solution [p, d + 3], split into W* [p, d] and the first three norm coefficients."""
        self.solution = self.fit.solve(rcond)
        self.weights, self.first_norm_weights = self.solution.split([self.d, self.PASS1_NORMS], dim=1)

    def nonlinear_update(self, x: torch.Tensor, X: torch.Tensor) -> None:
        """Pass 2: x [N, d] and its regressors X [N, p]."""
        x_hat, _ = reconstruct(self.sae, x)
        _, nonlinear = split_error(x, x_hat, self.weights, self.intercept)
        self.nonlinear_fit.update(X, _squared_norm(nonlinear))

    def solve_nonlinear(self, rcond: float) -> None:
        """After pass 2: norm_weights [p, 4], the coefficients of every NORM_TARGETS column."""
        self.norm_weights = torch.cat([self.first_norm_weights, self.nonlinear_fit.solve(rcond)], 1)

    def evaluate(self, x: torch.Tensor, X: torch.Tensor, x64: torch.Tensor) -> None:
        """Pass 3: held-out x [N, d], its regressors X [N, p] and x in float64 [N, d]."""
        x_hat, n_active = reconstruct(self.sae, x)
        linear, nonlinear = split_error(x, x_hat, self.weights, self.intercept)
        e = x64 - x_hat
        self.error_eval.update(e, linear)
        norms = torch.cat([_squared_norm(t) for t in (e, x_hat, x64, nonlinear)], dim=1)  # [N, 4]
        prediction = X @ self.norm_weights
        self.norm_eval.update(norms, prediction)
        sums = [norms[:, ERROR].sum(), norms[:, NONLINEAR_ERROR].sum(), linear.square().sum()]
        self.squared_sums += torch.stack(sums)
        self.active += n_active
        self.error_norms.append(norms[:, ERROR].sqrt().float().cpu())
        self.predicted_error_sq.append(prediction[:, ERROR].float().cpu())

    def result(self, name: str, total_variance: float, n_tokens: int) -> SAEDarkMatter:
        """The decomposition, with the held-out inputs' total variance and token count."""
        error_sse, norm_sse = self.fit.residual_sum_squares(self.solution).split([self.d, self.PASS1_NORMS])
        error_ss, norm_ss = self.fit.targets.m2.split([self.d, self.PASS1_NORMS])
        fit_norm_r2 = [
            R2.from_sums(norm_sse[i : i + 1], norm_ss[i : i + 1]).pooled for i in (ERROR, RECONSTRUCTION, INPUT)
        ]
        fit_norm_r2.append(self.nonlinear_fit.r2(self.norm_weights[:, NONLINEAR_ERROR:]).pooled)
        error_sq, nonlinear_sq, linear_sq = self.squared_sums.tolist()
        return SAEDarkMatter(
            name=name,
            weights=self.weights.cpu(),
            norm_weights=self.norm_weights.cpu(),
            error_r2=self.error_eval.result(),
            error_r2_fit=R2.from_sums(error_sse, error_ss),
            norm_r2=dict(zip(NORM_TARGETS, self.norm_eval.result().per_dim.tolist(), strict=True)),
            norm_r2_fit=dict(zip(NORM_TARGETS, fit_norm_r2, strict=True)),
            fvu=error_sq / total_variance,
            nonlinear_fvu=nonlinear_sq / total_variance,
            linear_error_fvu=linear_sq / total_variance,
            l0=self.active / n_tokens,
            error_norm=torch.cat(self.error_norms),
            predicted_error_sq=torch.cat(self.predicted_error_sq),
        )


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
    passes = {name: _SAEPasses(sae, d, intercept, device) for name, sae in saes.items()}
    for x in _batches(fit, device, "pass 1/3: fit W*", progress):
        _check_width(x, d)
        X, x64 = design(x, intercept), x.to(torch.float64)
        for state in passes.values():
            state.fit_update(x, X, x64)
    for state in passes.values():
        state.solve(rcond)

    for x in _batches(fit, device, "pass 2/3: fit ||eps_NL||^2", progress):
        X = design(x, intercept)
        for state in passes.values():
            state.nonlinear_update(x, X)
    for state in passes.values():
        state.solve_nonlinear(rcond)

    input_moments = ColumnMoments(d, device)
    for x in _batches(held_out, device, "pass 3/3: held-out", progress):
        _check_width(x, d)
        X, x64 = design(x, intercept), x.to(torch.float64)
        input_moments.update(x64)
        for state in passes.values():
            state.evaluate(x, X, x64)
    if input_moments.n == 0:
        raise SaelabError("No held-out tokens to evaluate on; give a non-empty set of evaluation tokens.")

    total_variance = float(input_moments.m2.sum())
    first = next(iter(passes.values())).fit
    return DarkMatterResult(
        saes=[state.result(name, total_variance, input_moments.n) for name, state in passes.items()],
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


# --- downstream cross-entropy ---------------------------------------------------------------------------------


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

