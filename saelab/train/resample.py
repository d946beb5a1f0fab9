"""Anthropic neuron resampling (Bricken et al. 2023, "Towards Monosemanticity"): re-initialise dead latents
toward inputs the SAE reconstructs badly, so they have a chance to fire again."""

from __future__ import annotations

import torch

from saelab.sae.base import SAE


@torch.no_grad()
def resample_dead_latents(
    sae: SAE,
    optimizer: torch.optim.Optimizer,
    dead: torch.Tensor,
    x_n: torch.Tensor,
    losses: torch.Tensor,
    scale: float,
    generator: torch.Generator | None = None,
) -> int:
    """Re-initialise every dead latent from a loss-weighted sample of inputs; returns how many were resampled.

    dead:   [d_sae] bool, latents that did not fire in the preceding window
    x_n:    [N, d_in] inputs in the SAE's normalised space
    losses: [N] per-token loss of the current SAE on x_n
    scale:  encoder scale (0.2 in Bricken 2023)

    For each dead i, draw token j with probability ∝ losses_j^2 (uniform if all losses are 0), v = x_j - b_dec:
        d_i = W_dec[i] <- v / ||v||
        W_enc[:, i]    <- scale * mean_{k alive} ||W_enc[:, k]|| * v / ||v||   (mean is 1 if nothing is alive)
        b_enc[i]       <- 0
    and zero the optimiser state (Adam's exp_avg, exp_avg_sq, ...) of exactly those entries, so stale moments
    do not immediately push the new directions back. Tokens are drawn without replacement while enough have
    non-zero probability (distinct directions for distinct latents), with replacement otherwise.
    """
    dead = dead.to(device=sae.W_dec.device, dtype=torch.bool)
    if dead.shape != (sae.d_sae,):
        raise ValueError(f"dead must have shape [{sae.d_sae}], got {list(dead.shape)}")
    if x_n.ndim != 2 or x_n.shape[1] != sae.d_in or losses.shape != (x_n.shape[0],):
        raise ValueError(f"need x_n [N, {sae.d_in}] and losses [N]; got {list(x_n.shape)} and {list(losses.shape)}")
    dead_idx = dead.nonzero().squeeze(1)
    n_dead = int(dead_idx.numel())
    if n_dead == 0:
        return 0

    weights = losses.detach().double().cpu().pow(2)
    if not torch.isfinite(weights).all() or weights.sum() <= 0:
        weights = torch.ones_like(weights)
    replacement = n_dead > int((weights > 0).sum())
    picks = torch.multinomial(weights, n_dead, replacement=replacement, generator=generator)

    v = x_n.detach()[picks.to(x_n.device)].to(sae.W_dec) - sae.b_dec
    v = v / v.norm(dim=1, keepdim=True).clamp_min(1e-12)  # [n_dead, d_in] unit directions
    alive = ~dead
    alive_norm = sae.W_enc[:, alive].norm(dim=0).mean() if alive.any() else sae.W_enc.new_tensor(1.0)

    sae.W_dec[dead_idx] = v
    sae.W_enc[:, dead_idx] = (scale * alive_norm * v).T
    sae.b_enc[dead_idx] = 0.0

    for param, index in ((sae.W_dec, (dead_idx,)), (sae.W_enc, (slice(None), dead_idx)), (sae.b_enc, (dead_idx,))):
        for value in optimizer.state.get(param, {}).values():
            if torch.is_tensor(value) and value.shape == param.shape:  # moments, not Adam's scalar `step`
                value[index] = 0.0
    return n_dead
