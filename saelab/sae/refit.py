"""Decoder refit (Wright and Sharkey 2024, "Addressing Feature Suppression in SAEs"): once training ends,
least-squares W_dec and b_dec for the codes the encoder actually produces, for the variants whose penalty shrinks
their codes (ReLU-L1, the threshold family).

Ridge least squares by preconditioned conjugate gradients on sparse decodes, a held-out eighth of the sample
choosing the iterate; the codes, so L0 and the dead latents, do not change.

Math, defaults and choices: docs/algorithms.md, section "Decoder refit".
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from saelab.kernels import SparseCode, SparseLayout, decode, latent_sums


class RefitReport(NamedTuple):
    iterations: int  # CG iterations of the kept iterate (0: the decoder is unchanged)
    held_out_mse_before: float  # mean over held-out tokens of ||x_n - x_hat||^2, normalised space
    held_out_mse_after: float


@torch.no_grad()
def sample_codes(sae, x_n: torch.Tensor, chunk: int = 4096) -> SparseCode:
    """The inference code of x_n [T, d_in] (normalised) as one SparseCode over [T, d_sae], `chunk` tokens at a
    time so no dense [T, d_sae] is formed."""
    return SparseCode.cat([sae.encode_normalized(x_n[i : i + chunk]) for i in range(0, len(x_n), chunk)])


def _split(code: SparseCode, tokens: int) -> tuple[SparseCode, SparseCode]:
    """The code of the first `tokens` tokens and that of the rest."""
    layout, cut = code.layout, int(code.layout.offsets[tokens])
    head = SparseLayout(layout.indices[:cut], layout.offsets[: tokens + 1], layout.n_latents)
    tail = SparseLayout(layout.indices[cut:], layout.offsets[tokens:] - cut, layout.n_latents)
    return SparseCode(head, code.values[:cut]), SparseCode(tail, code.values[cut:])


def _reconstruct(code: SparseCode, W: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return decode(code.values.to(W.dtype), W, code.layout) + b


@torch.no_grad()
def refit_decoder(
    sae, x_n: torch.Tensor, max_iters: int = 200, ridge: float = 1e-3, held_out: float = 1 / 8, check_every: int = 5
) -> RefitReport:
    """Refit sae.W_dec [d_sae, d_in] and sae.b_dec [d_in] in place to the codes of x_n [T, d_in] (the SAE's
    normalised space; the method: docs/algorithms.md, section "Decoder refit"). Returns what the held-out tokens
    measured."""
    code = sample_codes(sae, x_n)
    n_fit = len(x_n) - max(1, int(len(x_n) * held_out))
    fit, check = _split(code, n_fit)
    x_fit, x_check = x_n[:n_fit], x_n[n_fit:]
    W0, b0 = sae.W_dec.detach().float(), sae.b_dec.detach().float()
    values = fit.values.float()

    def held_out_mse(W: torch.Tensor, b: torch.Tensor) -> float:
        return float((_reconstruct(check, W, b) - x_check).pow(2).sum(dim=1).mean())

    def normal(P: torch.Tensor, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(F^T F + rho) applied to Delta = [P; p]: [d_sae, d], [d]."""
        q = _reconstruct(fit, P, p)
        return latent_sums(fit.layout, values, q) + rho * P, q.sum(dim=0) + rho * p

    diagonal = torch.zeros(sae.d_sae, device=W0.device).index_add_(0, fit.layout.indices, values.pow(2))
    rho = ridge * float(diagonal[diagonal > 0].mean()) if bool((diagonal > 0).any()) else ridge
    inverse_diag = (1 / (diagonal + rho))[:, None]
    inverse_bias = 1 / (n_fit + rho)
    residual = x_fit - _reconstruct(fit, W0, b0)
    r_W, r_b = latent_sums(fit.layout, values, residual), residual.sum(dim=0)  # minus the gradient at Delta = 0
    del residual
    z_W, z_b = r_W * inverse_diag, r_b * inverse_bias
    p_W, p_b = z_W.clone(), z_b.clone()
    rz = (r_W * z_W).sum(dim=0) + r_b * z_b  # [d]: one CG system per output dimension
    D_W, D_b = torch.zeros_like(W0), torch.zeros_like(b0)
    before = best = held_out_mse(W0, b0)
    best_state, best_iteration = None, 0
    for iteration in range(1, max_iters + 1):
        A_W, A_b = normal(p_W, p_b)
        alpha = rz / ((p_W * A_W).sum(dim=0) + p_b * A_b).clamp_min(1e-30)
        D_W.addcmul_(p_W, alpha), D_b.addcmul_(p_b, alpha)
        r_W.addcmul_(A_W, alpha, value=-1), r_b.addcmul_(A_b, alpha, value=-1)
        z_W, z_b = r_W * inverse_diag, r_b * inverse_bias
        rz_next = (r_W * z_W).sum(dim=0) + r_b * z_b
        beta = rz_next / rz.clamp_min(1e-30)
        p_W, p_b, rz = z_W + beta * p_W, z_b + beta * p_b, rz_next
        if iteration % check_every and iteration != max_iters:
            continue
        mse = held_out_mse(W0 + D_W, b0 + D_b)
        if mse < best:
            best, best_state, best_iteration = mse, (W0 + D_W, b0 + D_b), iteration
        elif iteration - best_iteration >= 2 * check_every:
            break
    if best_state is not None:
        if sae.cfg.pre_enc_bias:  # z = (x_n - b_dec) W_enc + b_enc: move b_enc with b_dec so that z stays the same
            sae.b_enc.add_((best_state[1] - b0) @ sae.W_enc.float())
        sae.W_dec.copy_(best_state[0]), sae.b_dec.copy_(best_state[1])
    return RefitReport(best_iteration, before, best)
