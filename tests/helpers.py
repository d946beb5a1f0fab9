"""Helpers shared by test files (importable as `helpers`: pytest puts tests/ on sys.path)."""

import math

import torch

from saelab.config import SAEConfig
from saelab.sae.base import StepContext
from saelab.synthetic import PlantedDictionary, fit_planted

# The superposed toy of the variant tests: 96 unit features in 32 dimensions, each active with probability 0.03
# (about 2.9 per token), magnitudes U(0, 1). Its seed is not the SAEs' (they start from torch.manual_seed(1)).
PLANTED_TOY = {"d": 32, "n_features": 96, "p_active": 0.03, "seed": 0}


def planted_toy(signed: bool = False) -> PlantedDictionary:
    """A fresh copy of the toy (the same draws every time), with a random sign on each code when `signed`."""
    return PlantedDictionary(**PLANTED_TOY, signed=signed)


def fit_toy(sae, steps: int, signed: bool = False, **fit):
    """Train `sae` with `fit_planted` (fit: lr, batch, context, on_step) on a fresh planted_toy(signed);
    returns (sae, data)."""
    data = planted_toy(signed)
    return fit_planted(sae, data, steps, **fit), data


def toy_sae(cls, options: dict, d_sae: int = 192):
    """A `cls` SAE for the toy (d_in 32, no input normalisation), initialised from torch.manual_seed(1)."""
    torch.manual_seed(1)  # not the data seed: the init must not be the dictionary
    return cls(PLANTED_TOY["d"], SAEConfig(architecture=cls.architecture, d_sae=d_sae, input_norm="none"), options)


def sparsity_warmup(steps: int, fraction: float = 0.1):
    """A fit_planted context: the sparsity coefficient ramped linearly from 0 to 1 over the first `fraction` of
    `steps`."""
    return lambda step, x: StepContext(sparsity_scale=min(1.0, step / (fraction * steps)))


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
