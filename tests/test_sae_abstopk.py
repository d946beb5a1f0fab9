"""AbsTopK SAE (docs/algorithms.md, "AbsTopK"): ||a||_0 = k, oddness, magnitude ordering, signed AuxK, planted
recovery on signed data, and one latent per signed direction where ReLU-TopK needs two."""

import pytest
import torch
from helpers import assert_encoder_gradient_only_at_selected, fit_toy, planted_toy

from saelab.config import SAEConfig
from saelab.sae.abstopk import AbsTopKSAE
from saelab.sae.base import INFERENCE, EncoderPass, StepContext
from saelab.sae.topk import AuxConfig, TopKConfig, TopKSAE
from saelab.synthetic import cosine_matrix, mmcs


def make(cls=AbsTopKSAE, d_in=32, d_sae=192, k=4, seed=1, k_aux=0, aux_coef=1 / 32, **topk):
    torch.manual_seed(seed)
    cfg = SAEConfig(architecture=cls.architecture, d_sae=d_sae, k=k, input_norm="none")
    return cls(d_in, cfg, {"aux": AuxConfig(k_aux=k_aux, aux_coef=aux_coef), "topk": TopKConfig(**topk)})


@pytest.mark.parametrize("rescale", [True, False])
def test_exactly_k_nonzeros_signs_kept(rescale):
    sae = make(rescale_by_decoder_norm=rescale)
    z = torch.randn(64, 192)
    for ctx in (INFERENCE, StepContext()):
        a = sae.activate(z, ctx)
        assert ((a != 0).sum(dim=1) == 4).all()
        assert (a < 0).any() and (a > 0).any()  # no ReLU
        assert torch.equal(a[a != 0], z[a != 0])  # the kept values are z itself
    assert AbsTopKSAE.signed and not TopKSAE.signed


def test_odd_symmetry():
    sae = make()
    z = torch.randn(64, 192)
    assert torch.equal(sae.activate(-z), -sae.activate(z))
    x = torch.randn(16, 32)
    with torch.no_grad():
        sae.b_dec.zero_()
        assert torch.allclose(sae.encode(-x), -sae.encode(x))  # b_enc = 0 at init: the map is odd


def test_kept_magnitudes_dominate_dropped_ones():
    sae = make()
    z = torch.randn(128, 192)
    a = sae.activate(z)
    kept_min = a.abs().masked_fill(a == 0, float("inf")).min(dim=1).values
    dropped_max = z.abs().masked_fill(a != 0, float("-inf")).max(dim=1).values
    assert (kept_min >= dropped_max).all()


def test_gradient_reaches_selected_entries_only():
    sae = make(aux_coef=0.0)
    out = sae.training_loss(torch.randn(3, 32), StepContext())
    out.loss.backward()
    assert_encoder_gradient_only_at_selected(sae, out)


def test_signed_auxk_picks_dead_latents_by_magnitude():
    sae = make(d_in=8, d_sae=6, k=1, k_aux=2, aux_coef=1.0, rescale_by_decoder_norm=False)
    z = torch.tensor([[5.0, -3.0, 0.5, 2.0, -0.1, 1.0], [4.0, -2.5, 0.2, 1.5, 0.3, -0.9]])
    dead = torch.tensor([False, True, True, True, True, True])
    x_n = torch.randn(2, 8)
    encoder = EncoderPass(sae, x_n, StepContext())
    encoder.z = z  # the pass's dense pre-activations, as if x_n had produced them
    x_hat = sae.decode(sae.activate(z, StepContext(dead=dead))).detach()
    loss = sae.auxk_loss(encoder, x_n, x_hat, dead)
    loss.backward()
    # top-2 |z| among dead latents: 1 (negative!) and 3, in both rows; latent 0 is alive
    assert (sae.b_enc.grad[[1, 3]] != 0).all()
    assert (sae.b_enc.grad[[0, 2, 4, 5]] == 0).all()
    touched = sae.W_dec.grad.abs().sum(dim=1) > 0
    assert touched.tolist() == [False, True, False, True, False, False]
    assert sae.auxk_loss(encoder, x_n, x_hat, torch.zeros(6, dtype=torch.bool)) == 0


def test_planted_signed_dictionary_recovery():
    sae, data = fit_toy(make(seed=1), 600, signed=True)
    assert mmcs(sae.W_dec, data.dictionary, absolute=True) > 0.9  # 0.99 here


def test_one_latent_per_signed_direction_where_relu_topk_needs_two():
    """d_sae = n_features on signed codes: AbsTopK covers each +-D_i with one latent; ReLU-TopK cannot."""
    D = planted_toy(signed=True).dictionary
    signed_dirs = torch.cat([D, -D])  # the 192 directions the data moves along
    abstopk, _ = fit_toy(make(AbsTopKSAE, d_sae=96, seed=1), 1000, signed=True)
    topk, _ = fit_toy(make(TopKSAE, d_sae=96, seed=1), 1000, signed=True)

    # AbsTopK: latent i with code a covers a * d_i, so +-d_i both count (about 0.95 here)
    abs_coverage = mmcs(torch.cat([abstopk.W_dec, -abstopk.W_dec]), signed_dirs)
    assert mmcs(abstopk.W_dec, D, absolute=True) == pytest.approx(abs_coverage, abs=1e-6)
    assert abs_coverage > 0.9
    # ReLU-TopK codes are >= 0: latent i only covers +d_i (about 0.79 here)
    relu_coverage = mmcs(topk.W_dec, signed_dirs)
    assert relu_coverage < abs_coverage - 0.1

    abs_cos = cosine_matrix(abstopk.W_dec.detach(), D)
    relu_cos = cosine_matrix(topk.W_dec.detach(), D)
    single = (abs_cos.abs() > 0.9).any(dim=0)
    assert single.float().mean() > 0.75  # most directions: one AbsTopK latent, either sign
    pos, neg = (relu_cos > 0.9).any(dim=0), (relu_cos < -0.9).any(dim=0)
    assert (pos & neg).any()  # ReLU-TopK spends antipodal pairs on some directions...
    assert (pos | neg).float().mean() < 0.6  # ...and so leaves many uncovered at the same width
