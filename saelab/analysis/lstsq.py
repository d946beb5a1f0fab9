"""Streaming least squares and R^2 in float64 (model-free): the normal equations X^T X and X^T Y and the sums
behind R^2 accumulate over batches, so the number of rows costs time, not memory.

    fit = NormalEquations(p, q)
    for X, Y in batches:            # X [n, p], Y [n, q]
        fit.update(X, Y)
    W = fit.solve()                 # [p, q]
    fit.r2(W)                       # in-sample R2; HeldOutR2 judges W's predictions on other rows
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from saelab.errors import SaelabError

# Singular values of X^T X below this fraction of the largest are treated as zero. The paper calls
# torch.linalg.lstsq(X, E, rcond=1e-9) on the float32 data matrix; solving the normal equations squares X's
# singular values, so 1e-12 here drops directions of X with sigma < 1e-6 sigma_max: about the float32
# resolution of the stored activations. Like the paper's rcond it guards against rank deficiency (e.g. a dead
# dimension) and is not a regulariser: well-conditioned data gets the exact least-squares solution.
DEFAULT_RCOND = 1e-12


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

