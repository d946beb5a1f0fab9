"""The decoder refit (saelab.sae.refit): conjugate gradients reach the ridge least-squares decoder for the frozen
codes, leave the codes alone, and never keep a decoder that does worse on the held-out part of the sample."""

import torch

from saelab.config import SAEConfig
from saelab.sae.refit import refit_decoder, sample_codes
from saelab.sae.registry import create_sae
from saelab.synthetic import PlantedDictionary


def shrunk_relu_sae(d_in: int = 32, d_sae: int = 128, seed: int = 0):
    """A ReLU SAE whose encoder sees a planted dictionary but whose decoder is a noisy, shrunk copy of it."""
    data = PlantedDictionary(d_in, d_sae, 3 / d_sae, seed=seed)
    sae = create_sae(d_in, SAEConfig(architecture="relu", d_sae=d_sae))
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        sae.W_enc.copy_(data.dictionary.T)
        sae.b_enc.fill_(-0.3)  # an L1-like shrinkage of every code
        sae.W_dec.copy_(data.dictionary + 0.1 * torch.randn(d_sae, d_in, generator=generator))
    return sae, data


def exact_refit(sae, x_n: torch.Tensor, n_fit: int, ridge: float = 1e-3) -> torch.Tensor:
    """[W_dec; b_dec] from the dense ridge normal equations on the first n_fit tokens (float64)."""
    F = torch.cat([sample_codes(sae, x_n).dense(), torch.ones(len(x_n), 1)], dim=1).double()[:n_fit]
    theta0 = torch.cat([sae.W_dec, sae.b_dec[None]]).detach().double()
    gram = F.T @ F
    latent_diag = gram.diagonal()[:-1]
    rho = ridge * latent_diag[latent_diag > 0].mean()
    rhs = F.T @ (x_n[:n_fit].double() - F @ theta0)
    return theta0 + torch.linalg.solve(gram + rho * torch.eye(len(gram), dtype=torch.float64), rhs)


def held_out_mse(theta: torch.Tensor, sae, x_n: torch.Tensor) -> float:
    F = torch.cat([sample_codes(sae, x_n).dense(), torch.ones(len(x_n), 1)], dim=1).double()
    return float((F @ theta - x_n.double()).pow(2).sum(dim=1).mean())


def test_refit_reaches_the_least_squares_decoder_and_keeps_the_codes():
    for seed in (0, 1):
        sae, data = shrunk_relu_sae(seed=seed)
        x_n = data.sample(16_384)
        n_fit = len(x_n) - len(x_n) // 8
        codes_before = sample_codes(sae, x_n).dense()
        exact = exact_refit(sae, x_n, n_fit)
        report = refit_decoder(sae, x_n, max_iters=400)
        refit = torch.cat([sae.W_dec, sae.b_dec[None]]).detach().double()
        assert report.iterations > 0 and report.held_out_mse_after < 0.5 * report.held_out_mse_before
        best = held_out_mse(exact, sae, x_n[n_fit:])
        assert report.held_out_mse_after <= best * 1.002  # CG's held-out MSE is the exact solution's
        assert (refit - exact).abs().max() < 0.02 * exact.abs().max()
        torch.testing.assert_close(sample_codes(sae, x_n).dense(), codes_before, rtol=0, atol=1e-5)  # rounding only


def test_a_refit_that_does_worse_on_the_held_out_tokens_is_not_kept():
    sae, data = shrunk_relu_sae()
    held_out = data.sample(18_432)
    refit_decoder(sae, held_out)  # now (nearly) the best decoder for this distribution
    other = 3 * PlantedDictionary(32, 128, 3 / 128, seed=7).sample(14_336)  # fit tokens of another distribution
    decoder = sae.W_dec.detach().clone(), sae.b_dec.detach().clone()
    report = refit_decoder(sae, torch.cat([other, held_out[-2048:]]))
    assert report.iterations == 0 and report.held_out_mse_after == report.held_out_mse_before
    assert torch.equal(sae.W_dec, decoder[0]) and torch.equal(sae.b_dec, decoder[1])
