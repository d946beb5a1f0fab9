"""TopK SAE invariants (docs/algorithms.md, "TopK"): exact k per row, gradient routing, AuxK, tied init, FVU,
and planted-dictionary recovery."""

import pytest
import torch
from helpers import assert_encoder_gradient_only_at_selected, fit_toy

from saelab.config import SAEConfig
from saelab.sae.base import INFERENCE, EncoderPass, StepContext
from saelab.sae.topk import AuxConfig, TopKConfig, TopKSAE, normalized_mse
from saelab.synthetic import mmcs


def make(d_in=32, d_sae=192, k=4, aux_coef=1 / 32, k_aux=0, seed=1, **topk):
    torch.manual_seed(seed)
    cfg = SAEConfig(architecture="topk", d_sae=d_sae, k=k, input_norm="none")
    return TopKSAE(d_in, cfg, {"aux": AuxConfig(aux_coef=aux_coef, k_aux=k_aux), "topk": TopKConfig(**topk)})


def test_exactly_k_nonzeros_per_row():
    sae = make()
    x = torch.randn(64, 32)
    z = sae.encode_pre(x)
    for ctx in (INFERENCE, StepContext()):
        a = sae.activate(z, ctx)
        assert ((a != 0).sum(dim=1) == 4).all()
        assert (a >= 0).all()
    # the kept entries are the k largest pre-activations of each row
    a = sae.encode(x)
    kept_min = a.masked_fill(a == 0, float("inf")).min(dim=1).values
    dropped_max = z.masked_fill(a != 0, float("-inf")).max(dim=1).values
    assert (kept_min >= dropped_max).all()


def test_unselected_latents_get_zero_encoder_gradient():
    sae = make(aux_coef=0.0)
    x = torch.randn(3, 32)  # 3 tokens x k=4: at most 12 of 192 latents selected
    dead = torch.zeros(192, dtype=torch.bool)
    dead[100:] = True  # AuxK would touch these, but aux_coef = 0
    out = sae.training_loss(x, StepContext(dead=dead))
    out.loss.backward()
    selected = assert_encoder_gradient_only_at_selected(sae, out)
    assert 4 <= int(selected.sum()) <= 12
    assert (sae.b_enc.grad[~selected] == 0).all()
    assert (sae.W_dec.grad[~selected] == 0).all()


def test_auxk_is_zero_without_dead_latents():
    sae = make(aux_coef=1.0)
    x = torch.randn(16, 32)
    for dead in (None, torch.zeros(192, dtype=torch.bool)):
        out = sae.training_loss(x, StepContext(dead=dead))
        assert out.terms["auxk"] == 0
        assert torch.allclose(out.loss, out.terms["mse"])


@pytest.mark.parametrize("sparse_kernels", [True, False])
def test_auxk_gradient_reaches_only_dead_latents(sparse_kernels):
    sae = make(aux_coef=1.0, k_aux=8)
    x = torch.randn(16, 32)
    dead = torch.zeros(192, dtype=torch.bool)
    dead[torch.randperm(192)[:40]] = True
    x_hat = sae.decode(sae.activate(sae.encode_pre(x), StepContext(dead=dead))).detach()
    loss = sae.auxk_loss(EncoderPass(sae, x, StepContext(sparse_kernels=sparse_kernels)), x, x_hat, dead)
    assert loss > 0
    loss.backward()
    touched_dec = sae.W_dec.grad.abs().sum(dim=1) > 0
    touched_enc = sae.W_enc.grad.abs().sum(dim=0) > 0
    assert touched_dec.any() and touched_enc.any()
    assert not (touched_dec & ~dead).any()
    assert not (touched_enc & ~dead).any()


def test_tied_init():
    sae = make()
    assert torch.equal(sae.W_enc, sae.W_dec.T)
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(192))
    assert (sae.b_enc == 0).all() and (sae.b_dec == 0).all()


def test_fvu_is_zero_when_true_l0_at_most_k():
    """Orthonormal dictionary, encoder = its transpose, non-negative codes with <= k actives: exact."""
    torch.manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(32, 32))
    sae = make(d_sae=32, k=4)
    with torch.no_grad():
        sae.W_dec.copy_(q.T)
        sae.W_enc.copy_(q)
    codes = torch.rand(256, 32) * (torch.rand(256, 32) < 0.08)
    codes[(codes > 0).sum(dim=1) > 4] = 0  # keep true L0 <= k
    with torch.no_grad():
        x = codes @ sae.W_dec
        assert float(normalized_mse(x, sae(x))) < 1e-10
        # with L0 > k the same SAE cannot be exact: the test can fail
        dense = torch.rand(256, 32) @ sae.W_dec
        assert float(normalized_mse(dense, sae(dense))) > 0.1


@pytest.fixture(scope="module")
def trained():
    return fit_toy(make(seed=1), 1000)


def test_planted_dictionary_recovery(trained):
    sae, data = trained
    assert mmcs(sae.W_dec, data.dictionary) > 0.95  # 0.997 in this configuration
