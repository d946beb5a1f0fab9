"""Anthropic neuron resampling (docs/algorithms.md, section "ReLU-L1", "Neuron resampling")."""

import pytest
import torch

from saelab.config import SAEConfig
from saelab.sae.base import StepContext
from saelab.sae.relu import L1Config, ReLUSAE
from saelab.train.resample import resample_dead_latents
from saelab.train.step import train_step

D_IN, D_SAE = 8, 32


def trained_sae(seed=0):
    """A unit-form ReLU SAE after a few Adam steps (so Adam's moments are non-zero), and its optimiser."""
    torch.manual_seed(seed)
    sae = ReLUSAE(D_IN, SAEConfig(architecture="relu", d_sae=D_SAE), {"l1": L1Config(decoder_norm="unit")})
    with torch.no_grad():
        sae.b_dec.copy_(torch.randn(D_IN))
        sae.W_enc.mul_(0.5 + torch.rand(D_SAE))  # unequal encoder norms: the alive mean is not trivially 1
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    for _ in range(3):
        train_step(sae, opt, torch.randn(64, D_IN), StepContext())
    return sae, opt


def test_resampled_latents_point_at_sampled_inputs_with_fresh_adam_state():
    sae, opt = trained_sae()
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[[1, 5, 6, 20, 31]] = True
    x = torch.randn(200, D_IN) * 3
    losses = torch.rand(200)
    before = {name: p.detach().clone() for name, p in sae.named_parameters()}
    state_before = {name: {k: v.clone() for k, v in opt.state[p].items()} for name, p in sae.named_parameters()}
    alive_norm = before["W_enc"][:, ~dead].norm(dim=0).mean()

    n = resample_dead_latents(sae, opt, dead, x, losses, scale=0.2, generator=torch.Generator().manual_seed(0))
    assert n == 5

    v = x - before["b_dec"]  # candidate directions, [200, d_in]
    v_unit = v / v.norm(dim=1, keepdim=True)
    W_dec, W_enc, b_enc = sae.W_dec.detach(), sae.W_enc.detach(), sae.b_enc.detach()
    for i in dead.nonzero().squeeze(1).tolist():
        torch.testing.assert_close(W_dec[i].norm(), torch.tensor(1.0))
        cos = v_unit @ W_dec[i]
        j = int(cos.argmax())
        assert cos[j] > 1 - 1e-5  # d_i is parallel to one sampled x_j - b_dec
        torch.testing.assert_close(W_enc[:, i].norm(), 0.2 * alive_norm)
        torch.testing.assert_close(W_enc[:, i] / W_enc[:, i].norm(), W_dec[i])
        assert b_enc[i] == 0
        assert sae.encode(x[j : j + 1])[0, i] > 0  # the new latent fires on the input it was drawn from
    # Without replacement: distinct latents get distinct inputs.
    assert torch.unique(W_dec[dead], dim=0).shape[0] == 5

    # Alive latents, b_dec and their optimiser state are untouched.
    torch.testing.assert_close(W_dec[~dead], before["W_dec"][~dead], atol=0, rtol=0)
    torch.testing.assert_close(W_enc[:, ~dead], before["W_enc"][:, ~dead], atol=0, rtol=0)
    torch.testing.assert_close(sae.b_dec.detach(), before["b_dec"], atol=0, rtol=0)
    index = {"W_dec": lambda t, m: t[m], "W_enc": lambda t, m: t[:, m], "b_enc": lambda t, m: t[m]}
    for name, pick in index.items():
        state = opt.state[dict(sae.named_parameters())[name]]
        for key in ("exp_avg", "exp_avg_sq"):
            assert pick(state_before[name][key], dead).abs().sum() > 0  # there was something to reset
            assert not pick(state[key], dead).any()
            assert torch.equal(pick(state[key], ~dead), pick(state_before[name][key], ~dead))


def test_sampling_is_proportional_to_squared_loss():
    sae, opt = trained_sae()
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[3] = True
    x = torch.eye(D_IN)[:3] * 5 + sae.b_dec.detach()  # v = x - b_dec are the basis vectors e0, e1, e2
    losses = torch.tensor([1.0, 2.0, 0.0])  # squared: 1 : 4 : 0
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(3)
    for _ in range(2000):
        resample_dead_latents(sae, opt, dead, x, losses, scale=0.2, generator=g)
        counts[int(sae.W_dec[3, :3].argmax())] += 1
    assert counts[2] == 0
    assert counts[1] / 2000 == pytest.approx(0.8, abs=0.04)  # 4/5; linear weights would give 2/3


def test_nothing_dead_changes_nothing():
    sae, opt = trained_sae()
    before = [p.detach().clone() for p in sae.parameters()]
    n = resample_dead_latents(
        sae, opt, torch.zeros(D_SAE, dtype=torch.bool), torch.randn(10, D_IN), torch.rand(10), 0.2
    )
    assert n == 0
    assert all(torch.equal(a, b) for a, b in zip(before, sae.parameters()))


def test_more_dead_than_inputs_samples_with_replacement_and_training_continues():
    sae, opt = trained_sae()
    dead = torch.ones(D_SAE, dtype=torch.bool)
    dead[:2] = False
    x = torch.randn(4, D_IN)
    n = resample_dead_latents(sae, opt, dead, x, torch.rand(4), scale=0.2, generator=torch.Generator().manual_seed(1))
    assert n == D_SAE - 2
    assert torch.unique(sae.W_dec.detach()[dead], dim=0).shape[0] <= 4
    out = train_step(sae, opt, torch.randn(64, D_IN), StepContext())
    assert torch.isfinite(out.loss)
    assert all(torch.isfinite(p).all() for p in sae.parameters())
