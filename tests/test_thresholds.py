"""Thresholding operators (soft, hard, half, lq, CEL0) and the ThresholdSAE built on them."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import planted_toy, toy_sae

from saelab.config import SAEConfig
from saelab.errors import SaelabError
from saelab.sae.base import StepContext
from saelab.sae.thresholds import (
    ThresholdConfig,
    ThresholdSAE,
    cel0,
    cel0_penalty,
    half,
    half_threshold,
    hard,
    lq,
    lq_threshold,
    soft,
    threshold_op,
    threshold_penalty,
)
from saelab.synthetic import fit_planted, mmcs

T = 0.4  # t = lambda * gamma for the t-parameterised families
LAM, GAMMA = 0.5, 0.5  # CEL0

# (name, operator u -> a, penalty a -> gamma * P(a), thresholds where the 1-D objective has a tie or a kink)
CASES = {
    "soft": (lambda u: soft(u, T), lambda a: T * a.abs(), [T]),
    "hard": (lambda u: hard(u, T), lambda a: T * (a != 0).double(), [math.sqrt(2 * T)]),
    "half": (lambda u: half(u, T), lambda a: T * a.abs().sqrt(), [half_threshold(T)]),
    "lq0.3": (lambda u: lq(u, T, 0.3), lambda a: T * a.abs().pow(0.3), [lq_threshold(T, 0.3)]),
    "lq0.5": (lambda u: lq(u, T, 0.5), lambda a: T * a.abs().pow(0.5), [lq_threshold(T, 0.5)]),
    "lq0.8": (lambda u: lq(u, T, 0.8), lambda a: T * a.abs().pow(0.8), [lq_threshold(T, 0.8)]),
    "cel0": (
        lambda u: cel0(u, LAM, GAMMA),
        lambda a: GAMMA * cel0_penalty(a, LAM),
        [GAMMA * math.sqrt(2 * LAM), math.sqrt(2 * LAM)],
    ),
    "cel0_dnorm1.3": (
        lambda u: cel0(u, LAM, GAMMA, 1.3),
        lambda a: GAMMA * cel0_penalty(a, LAM, 1.3),
        [GAMMA * math.sqrt(2 * LAM) * 1.3, math.sqrt(2 * LAM) / 1.3],
    ),
}


def grid_argmin(u: torch.Tensor, penalty) -> torch.Tensor:
    """Brute-force argmin_a 1/2 (a - u)^2 + penalty(a) for each u [n] (float64): a grid of step 1e-3 on [-4, 4],
    refined with step 1e-6 within +-2e-3 of its best point; a = 0 (the other basin of the jumping operators)
    is always a candidate, so the refinement cannot lose the global minimum."""
    coarse = torch.arange(-4000, 4001, dtype=torch.float64) * 1e-3  # contains exactly 0
    objective = 0.5 * (coarse - u[:, None]) ** 2 + penalty(coarse)
    centre = coarse[objective.argmin(dim=1)]
    fine = centre[:, None] + torch.arange(-2000, 2001, dtype=torch.float64) * 1e-6
    candidates = torch.cat([fine, torch.zeros(len(u), 1, dtype=torch.float64)], dim=1)
    objective = 0.5 * (candidates - u[:, None]) ** 2 + penalty(candidates)
    return candidates.gather(1, objective.argmin(dim=1, keepdim=True)).squeeze(1)


@pytest.mark.parametrize("name", list(CASES))
def test_operator_is_the_grid_argmin_of_its_objective(name):
    op, penalty, kinks = CASES[name]
    u = torch.linspace(-3.0, 3.0, 121, dtype=torch.float64) + 0.0123
    # Stay off the exact thresholds, where two minimisers tie.
    u = u[(u.abs()[:, None] - torch.tensor(kinks, dtype=torch.float64)).abs().min(1).values > 2e-3]
    got, best = op(u), grid_argmin(u, penalty)
    assert int((got != 0).sum()) > 10 and int((got == 0).sum()) > 2  # both regimes are exercised
    torch.testing.assert_close(got, best, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", list(CASES))
def test_operators_are_odd_and_zero_at_zero(name):
    op = CASES[name][0]
    u = torch.randn(1000, dtype=torch.float64) * 2
    assert torch.equal(op(-u), -op(u))
    assert float(op(torch.zeros(1, dtype=torch.float64))) == 0.0


def test_soft_and_cel0_are_continuous():
    u = torch.linspace(0, 3, 300_001, dtype=torch.float64)
    for op, lipschitz in ((lambda v: soft(v, T), 1.0), (lambda v: cel0(v, LAM, GAMMA), 1 / (1 - GAMMA))):
        jumps = op(u).diff().abs() / u.diff()
        assert float(jumps.max()) <= lipschitz + 1e-6


@pytest.mark.parametrize(
    "name, tau, jump",
    [
        ("hard", math.sqrt(2 * T), math.sqrt(2 * T)),  # from 0 to sqrt(2t)
        ("half", 1.5 * T ** (2 / 3), T ** (2 / 3)),  # from 0 to 2/3 tau = t^(2/3)
        ("lq0.3", lq_threshold(T, 0.3), (2 * T * 0.7) ** (1 / 1.7)),  # from 0 to (2t(1-q))^(1/(2-q))
    ],
)
def test_hard_half_and_lq_jump_at_the_threshold(name, tau, jump):
    op = CASES[name][0]
    below, above = op(torch.tensor([tau - 1e-7, tau + 1e-7], dtype=torch.float64))
    assert float(below) == 0.0
    assert float(above) == pytest.approx(jump, abs=1e-3)


def test_thresholds_interpolate_between_hard_and_half():
    assert lq_threshold(T, 0.5) == pytest.approx(half_threshold(T)) == pytest.approx(1.5 * T ** (2 / 3))
    assert lq_threshold(T, 1e-9) == pytest.approx(math.sqrt(2 * T), rel=1e-6)
    # Xu et al.'s own threshold (cbrt(54)/4) t_X^(2/3) with t_X = 2t.
    assert half_threshold(T) == pytest.approx(54 ** (1 / 3) / 4 * (2 * T) ** (2 / 3))


def test_general_q_solver_matches_the_closed_form_half():
    t = torch.tensor(0.7, dtype=torch.float64)
    tau = float(half_threshold(t))
    u = torch.cat([torch.randn(2000, dtype=torch.float64) * 3, torch.linspace(tau + 1e-9, tau + 0.1, 200).double()])
    torch.testing.assert_close(lq(u, t, 0.5), half(u, t), atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(lq(u.float(), 0.7, 0.5), half(u.float(), 0.7), atol=1e-5, rtol=1e-5)


def test_cel0_zero_then_linear_ramp_then_identity():
    lam, gamma = 0.5, 0.4  # sqrt(2 lam) = 1: zero up to 0.4, ramp (u - 0.4)/0.6 to 1, identity beyond
    u = torch.linspace(0, 3, 3001, dtype=torch.float64)
    a = cel0(u, lam, gamma)
    zero, ramp, identity = u <= 0.4, (u > 0.4) & (u < 1.0), u >= 1.0
    assert torch.all(a[zero] == 0)
    torch.testing.assert_close(a[ramp], (u[ramp] - 0.4) / 0.6)
    torch.testing.assert_close(a[identity], u[identity])
    with pytest.raises(SaelabError, match="gamma"):
        cel0(u, lam, 1.0)


def test_gradients_are_the_almost_everywhere_derivatives():
    t, q = 0.3, 0.4
    u = torch.tensor([-2.0, -0.2, 0.0, 0.1, 0.9, 1.5, 3.0], dtype=torch.float64, requires_grad=True)
    for op in (lambda v: lq(v, t, q), lambda v: half(v, t), lambda v: hard(v, t), lambda v: cel0(v, 0.2, 0.5)):
        (grad,) = torch.autograd.grad(op(u).sum(), u)
        eps = 1e-6
        numeric = (op(u.detach() + eps) - op(u.detach() - eps)) / (2 * eps)
        assert torch.isfinite(grad).all()
        torch.testing.assert_close(grad, numeric, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", ["soft", "hard", "half", "lq", "cel0"])
def test_penalty_gradient_is_finite_at_zero(family):
    a = torch.tensor([0.0, 0.5, 2.0], requires_grad=True)
    total = threshold_penalty(a, family, 0.3, 0.5).sum() + 0 * a.sum()  # hard: piecewise constant, no graph
    (grad,) = torch.autograd.grad(total, a)
    assert torch.isfinite(grad).all()
    if family == "hard":
        assert torch.all(grad == 0)


def _sae(family="soft", lam=0.1, gamma=0.01, q=0.5, **sae_kw) -> ThresholdSAE:
    cfg = SAEConfig(architecture="threshold", d_sae=24, input_norm="none", **sae_kw)
    options = {
        "threshold": ThresholdConfig(
            threshold_family=family, threshold_lambda=lam, threshold_gamma=gamma, threshold_q=q
        )
    }
    return ThresholdSAE(8, cfg, options)


@pytest.mark.parametrize("family", ["soft", "hard", "half", "lq", "cel0"])
def test_threshold_sae_code_and_loss(family):
    torch.manual_seed(0)
    sae = _sae(family, lam=0.5, gamma=0.3, q=0.4)
    x = torch.randn(32, 8)
    z = sae.encode_pre(x)
    a = sae.activate(z)
    assert torch.all(a >= 0)
    torch.testing.assert_close(a, threshold_op(z.relu(), family, 0.5, 0.3, 0.4, 1.0))
    assert 0 < int((a > 0).sum()) < a.numel()  # the threshold does something here
    torch.testing.assert_close(sae.encode(x), a)
    out = sae.training_loss(x, StepContext())
    mse = (out.x_hat - x).pow(2).sum(-1).mean()
    penalty = 2 * threshold_penalty(a, family, 0.5, 0.4, 1.0).sum(-1).mean()
    torch.testing.assert_close(out.terms["mse"], mse)
    torch.testing.assert_close(out.terms["sparsity"], penalty)
    torch.testing.assert_close(out.loss, mse + penalty)
    mean_sae = _sae(family, lam=0.5, gamma=0.3, q=0.4, mse_reduction="mean")
    mean_sae.load_state_dict(sae.state_dict())
    torch.testing.assert_close(mean_sae.training_loss(x, StepContext()).loss, (mse + penalty) / 8)


def test_threshold_sae_rejects_bad_options():
    with pytest.raises(SaelabError, match="family"):
        _sae("quarter")
    with pytest.raises(SaelabError, match="gamma"):
        _sae("cel0", gamma=1.0)
    with pytest.raises(SaelabError, match="threshold-q"):
        _sae("lq", q=1.0)
    with pytest.raises(SaelabError, match="lambda"):
        _sae("soft", lam=-1.0)


@pytest.mark.parametrize(
    "family, lam, gamma",
    [
        ("cel0", 0.05, 0.5),  # zero below 0.16, ramp, identity from 0.32: no shrinkage of large codes
        ("soft", 0.2, 0.01),  # ReLU + L1 (the tiny t is absorbed by b_enc; the penalty does the work)
    ],
)
def test_threshold_sae_recovers_a_planted_dictionary(one_thread, family, lam, gamma):
    options = {"threshold": ThresholdConfig(threshold_family=family, threshold_lambda=lam, threshold_gamma=gamma)}
    sae = toy_sae(ThresholdSAE, options)
    data = planted_toy()
    assert mmcs(sae.W_dec, data.dictionary) < 0.6
    last = {}
    fit_planted(sae, data, 1000, on_step=lambda step, x, out: last.update(out=out))
    assert mmcs(sae.W_dec, data.dictionary) > 0.9
    assert float((last["out"].code.dense() > 0).float().sum(-1).mean()) < 8  # sparse: the true L0 is 2.9
