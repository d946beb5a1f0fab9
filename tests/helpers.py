"""Helpers shared by test files (importable as `helpers`: pytest puts tests/ on sys.path)."""

import math

import torch


def perturb(sae, seed=1):
    """Non-trivial weights: decoder row norms in [0.3, 3], non-zero biases, and (for JumpReLU) thresholds in
    [0.05, 0.5], so folding and save/load tests cannot pass by accident of a unit-norm, zero-bias init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(sae.W_enc.shape, generator=g) / math.sqrt(sae.d_in))
        sae.W_dec.copy_(torch.randn(sae.W_dec.shape, generator=g))
        sae.W_dec *= (0.3 + 2.7 * torch.rand(sae.d_sae, 1, generator=g)) / sae.W_dec.norm(dim=1, keepdim=True)
        sae.b_enc.copy_(0.1 * torch.randn(sae.d_sae, generator=g))
        sae.b_dec.copy_(0.5 * torch.randn(sae.d_in, generator=g))
        if hasattr(sae, "log_threshold"):
            sae.log_threshold.copy_(torch.empty(sae.d_sae).uniform_(math.log(0.05), math.log(0.5), generator=g))
    return sae


def assert_encoder_gradient_only_at_selected(sae, out) -> torch.Tensor:
    """After out.loss.backward(): W_enc's gradient is zero for every latent the code never selected and nonzero
    for every selected one. Returns the [d_sae] bool mask of selected latents."""
    selected = (out.code.dense() != 0).any(dim=0)
    assert (sae.W_enc.grad[:, ~selected] == 0).all()
    assert (sae.W_enc.grad[:, selected].abs().sum(dim=0) > 0).all()
    return selected
