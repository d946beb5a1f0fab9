"""Geometric median by Weiszfeld's algorithm: the b_dec initialisation of several variants."""

from __future__ import annotations

import torch


@torch.no_grad()
def geometric_median(points: torch.Tensor, max_iter: int = 100, eps: float = 1e-6) -> torch.Tensor:
    """argmin_m sum_j ||x_j - m|| for points [n, d] -> [d].

    Weiszfeld: m <- sum_j w_j x_j / sum_j w_j with w_j = 1 / max(||x_j - m||, eps), from the mean, until the
    objective stops falling (it never rises: the last iterate that lowered it is returned) or max_iter.
    """
    points = points.double()
    median = points.mean(dim=0)
    best = (points - median).norm(dim=1).sum()
    for _ in range(max_iter):
        weights = 1.0 / (points - median).norm(dim=1).clamp_min(eps)
        candidate = (weights[:, None] * points).sum(dim=0) / weights.sum()
        objective = (points - candidate).norm(dim=1).sum()
        if objective >= best:
            break
        median, best = candidate, objective
    return median.float()
