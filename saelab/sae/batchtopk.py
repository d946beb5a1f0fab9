"""BatchTopK SAE (Bussmann, Leask & Nanda 2024), and the batch-level pieces mutual choice shares with it.

Training keeps the k*B largest selection scores of the whole batch; inference is a JumpReLU with one scalar threshold
theta (z units), a running minimum of the kept activations that `calibrate_inference` sets exactly when training ends.

Math, defaults and choices: docs/algorithms.md, section "BatchTopK".
"""

from __future__ import annotations

import torch
from typing_extensions import override

from saelab.errors import SaelabError
from saelab.kernels import SparseCode, SparseLayout
from saelab.sae.base import StepContext
from saelab.sae.topk import TopKSAE


def batch_topk_layout(scores: torch.Tensor, k_total: int) -> SparseLayout:
    """The k_total highest `scores` [batch, n] of the whole flattened matrix (all of them if fewer).

    Fast path: each row's top 4 * k_total / batch scores are the candidates, and the batch-level top k_total is
    taken among them. That is exact unless some row has all of its candidates at or above the selected minimum
    (then it might hold more winners than candidates), in which case the whole matrix is searched.
    """
    batch, n = scores.shape
    k_total = min(int(k_total), batch * n)
    per_row = min(n, 4 * -(-k_total // max(batch, 1)))
    if 0 < k_total and per_row < n:
        candidates, columns = scores.topk(per_row, dim=1, sorted=False)
        chosen = candidates.reshape(-1).topk(k_total, sorted=False)
        if not bool((candidates.min(dim=1).values >= chosen.values.min()).any()):
            position = chosen.indices.sort().values  # row-major: rows ascend
            rows = torch.div(position, per_row, rounding_mode="floor")
            return SparseLayout.from_rows(rows, columns.reshape(-1)[position], batch, n)
    flat_index = scores.reshape(-1).topk(k_total, sorted=False).indices.sort().values
    return SparseLayout.from_flat(flat_index, batch, n)


def top_values(x_n: torch.Tensor, chunk: int, scores, count: int, dim: int) -> torch.Tensor:
    """The `count` largest of scores(part) along `dim`, over x_n [T, d_in] read in parts of `chunk` tokens, in
    descending order (fewer when there are fewer). scores(part [c, d_in]) -> [c * n] (dim 0) or [c, n]."""
    best = None
    for part in x_n.split(chunk):
        values = scores(part)
        pool = values if best is None else torch.cat([best, values], dim=dim)
        best = pool.topk(min(count, pool.shape[dim]), dim=dim).values
    return best


@torch.no_grad()
def ema_threshold_(threshold: torch.Tensor, observed: torch.Tensor, rate: float) -> None:
    """In place, elementwise: theta <- (1 - rate) * theta + rate * observed.

    threshold: [] or [n] running thresholds; +inf marks one never updated, which takes `observed` directly.
    observed:  same shape; +inf (or NaN) marks "no observation this step" and leaves that entry unchanged.
    """
    observed = observed.to(threshold)
    valid = torch.isfinite(observed)
    fresh = ~torch.isfinite(threshold)
    blended = (1 - rate) * threshold + rate * observed
    updated = torch.where(fresh, observed, blended)
    threshold.copy_(torch.where(valid, updated, threshold))


class BatchTopKSAE(TopKSAE):
    """TopK over the whole batch in training; a scalar-threshold JumpReLU at inference.

    Buffers: threshold [] (z units; +inf until the first training step).
    """

    architecture = "batchtopk"
    summary = "the k*B largest in the batch"
    inference_form = "jump"
    calibrates_inference = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("threshold", torch.full(self.threshold_shape(), float("inf")))

    def threshold_shape(self) -> tuple[int, ...]:
        """Shape of the inference threshold buffer: () for one global threshold."""
        return ()

    @override
    def validate(self) -> None:
        super().validate()
        rate = self.topk_cfg.threshold_rate
        if not 0 < rate <= 1:
            raise SaelabError(f"--threshold-rate must be in (0, 1] (got {rate}).")

    @override
    def select(self, z: torch.Tensor, ctx: StepContext) -> SparseLayout:
        """Training: the top k*batch of ReLU(selection scores) in the batch. Inference: z > theta."""
        if not ctx.training:
            return SparseLayout.from_mask(z > self.threshold)
        return batch_topk_layout(self.selection_scores(z, ctx).relu(), self.cfg.k * z.shape[0])

    @torch.no_grad()
    @override
    def calibrate_inference(self, x_n: torch.Tensor, chunk: int = 4096) -> None:
        """theta <- midway between the (k*T)-th and (k*T+1)-th largest ReLU(z) over x_n [T, d_in], so exactly k*T
        entries fire there (ties aside). Reads x_n in chunks of `chunk` tokens, keeping only the running top."""
        wanted = self.cfg.k * len(x_n)
        best = top_values(x_n, chunk, lambda part: self.encode_pre(part).relu().reshape(-1), wanted + 1, dim=0)
        if len(best) > wanted:
            self.threshold.fill_(float(best[wanted - 1] + best[wanted]) / 2)

    @override
    def jump_threshold(self) -> torch.Tensor:
        """theta [d_sae] (the global or per-latent inference threshold); the code is z * 1[z > theta] at inference.
        Refuses a negative theta, under which the code keeps negative z (no ReLU SAE form computes that)."""
        theta = self.threshold.detach().expand(self.d_sae).clone()
        if bool((theta < 0).any()):
            raise SaelabError(
                f"This '{self.architecture}' SAE has a negative inference threshold, so its code keeps some negative "
                "pre-activations, which a JumpReLU (ReLU first) cannot reproduce; train it further or raise the "
                "threshold to >= 0."
            )
        return theta

    @torch.no_grad()
    @override
    def update_inference_state(self, code: SparseCode) -> None:
        """theta <- EMA of the smallest positive value of the training code."""
        positive = code.values[code.values > 0]
        if positive.numel():
            ema_threshold_(self.threshold, positive.min(), self.topk_cfg.threshold_rate)
