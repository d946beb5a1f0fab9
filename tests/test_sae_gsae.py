"""g-SAE (docs/algorithms.md, "g-SAE"): exactly TopK with beta = 0, g = 0 or no gradients; gradient-weighted
selection displaces a larger-z latent; planted recovery with synthetic gradients."""

import pytest
import torch
from helpers import fit_toy

from saelab.config import SAEConfig
from saelab.errors import SaelabError
from saelab.sae.base import StepContext
from saelab.sae.gsae import GradientSAE, GSAEConfig
from saelab.sae.topk import AuxConfig, TopKConfig, TopKSAE
from saelab.synthetic import mmcs


def make(cls=GradientSAE, d_in=32, d_sae=192, k=4, beta=1.0, seed=1, **topk):
    torch.manual_seed(seed)
    cfg = SAEConfig(architecture=cls.architecture, d_sae=d_sae, k=k, input_norm="none")
    options = {"aux": AuxConfig(), "topk": TopKConfig(**topk), "gsae": GSAEConfig(gsae_beta=beta)}
    return cls(d_in, cfg, {section.name: options[section.name] for section in cls.sections})


def paired(beta):
    """A g-SAE and a TopK SAE with identical weights."""
    gsae, topk = make(beta=beta), make(TopKSAE)
    with torch.no_grad():
        gsae.W_dec.mul_(torch.rand(192, 1) + 0.5)  # non-unit norms, so rescaling matters too
        gsae.b_enc.normal_()
    topk.load_state_dict(gsae.state_dict())
    return gsae, topk


def readout_grads(x, readout):
    """Synthetic LM-loss gradient: L = 0.5 * ||x @ R||^2 (a fixed random linear readout) -> g = x R R^T."""
    return x @ readout @ readout.T


def test_reduces_to_topk_exactly():
    x = torch.randn(64, 32)
    g = torch.randn(64, 32)
    for beta, grads in ((0.0, g), (1.0, torch.zeros(64, 32)), (1.0, None)):
        gsae, topk = paired(beta)
        ctx = StepContext(grads=grads)
        z = gsae.encode_pre(x)
        assert torch.equal(gsae.activate(z, ctx), topk.activate(z, StepContext()))
        out_g, out_t = gsae.training_loss(x, ctx), topk.training_loss(x, StepContext())
        assert torch.equal(out_g.code.dense(), out_t.code.dense()) and torch.equal(out_g.loss, out_t.loss)
    gsae, topk = paired(1.0)
    assert torch.equal(gsae.encode(x), topk.encode(x))  # inference: no gradients, plain TopK


def test_gradients_change_the_selection():
    gsae, topk = paired(1.0)
    x = torch.randn(64, 32)
    z = gsae.encode_pre(x)
    with_g = gsae.activate(z, StepContext(grads=10 * torch.randn(64, 32)))
    assert ((with_g != 0).sum(dim=1) == 4).all()
    assert not torch.equal(with_g != 0, topk.activate(z) != 0)
    assert torch.equal(with_g[with_g != 0], z.relu()[with_g != 0])  # values stay ReLU(z)


def test_selection_score_formula():
    gsae = make(beta=0.7)
    with torch.no_grad():
        gsae.W_dec.mul_(torch.rand(192, 1) + 0.5)
    z, g = torch.randn(8, 192), torch.randn(8, 32)
    norms = gsae.W_dec.norm(dim=1)
    expected = z * norms * (1 + 0.7 * (g @ gsae.W_dec.T).abs())
    assert torch.allclose(gsae.selection_scores(z, StepContext(grads=g)), expected)


def test_large_effect_latent_displaces_larger_z():
    """k = 1, W_dec = I: z = (1.0, 0.8); |d_1 . g| = 1 -> s_1 = 0.8 * (1 + beta) beats s_0 = 1 iff beta > 0.25."""
    sae = make(d_in=4, d_sae=4, k=1, beta=1.0)
    with torch.no_grad():
        sae.W_dec.copy_(torch.eye(4))
        sae.W_enc.copy_(torch.eye(4))
    x = torch.tensor([[1.0, 0.8, 0.0, 0.0]])
    g = torch.tensor([[0.0, 1.0, 0.0, 0.0]])
    z = sae.encode_pre(x)

    def support(grads, beta):
        sae.gsae_cfg.gsae_beta = beta
        a = sae.activate(z, StepContext(grads=grads))
        assert torch.equal(a[a != 0], z[a != 0])  # the kept value is ReLU(z), not the score
        return a[0].nonzero().flatten().tolist()

    assert support(g, 1.0) == [1]
    assert support(None, 1.0) == [0]
    assert support(g, 0.2) == [0]  # below the 0.25 crossover: magnitude wins again
    assert support(-g, 0.2) == [0]
    assert support(-g, 0.3) == [1]  # |d . g|: the sign of the effect does not matter


def test_bad_gradients_and_beta():
    sae = make()
    z = torch.randn(4, 192)
    with pytest.raises(SaelabError, match="d_in=32"):
        sae.activate(z, StepContext(grads=torch.randn(4, 16)))
    with pytest.raises(SaelabError, match="gradient rows"):
        sae.activate(z, StepContext(grads=torch.randn(5, 32)))
    with pytest.raises(SaelabError, match="gsae-beta"):
        make(beta=-1.0)


def test_planted_recovery_with_synthetic_gradients():
    readout = torch.randn(32, 8, generator=torch.Generator().manual_seed(5)) / 32**0.5
    sae = make(seed=1, beta=1.0)
    changed = 0

    def compare_with_topk(step, x, out):
        nonlocal changed
        if step % 100 == 0:
            with torch.no_grad():
                changed += int(((out.code.dense() != 0) != (TopKSAE.activate(sae, sae.encode_pre(x)) != 0)).any())

    def with_grads(step, x):
        return StepContext(grads=readout_grads(x, readout))

    _, data = fit_toy(sae, 1000, context=with_grads, on_step=compare_with_topk)
    assert changed > 0  # the gradients did steer the selection during training
    assert mmcs(sae.W_dec, data.dictionary) > 0.9  # 0.99 here
