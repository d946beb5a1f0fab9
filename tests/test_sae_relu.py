"""ReLU + L1 SAE (docs/algorithms.md, "ReLU-L1"): both forms, folding, the projected step, b_dec init, recovery."""

import itertools

import pytest
import torch
from helpers import perturb, planted_toy, sparsity_warmup, toy_sae

from saelab.config import SAEConfig
from saelab.errors import SaelabError
from saelab.sae.base import StepContext
from saelab.sae.geometric_median import geometric_median
from saelab.sae.io import load_sae, save_sae
from saelab.sae.relu import L1Config, ReLUSAE
from saelab.synthetic import fit_planted, mmcs
from saelab.train.step import train_step


def make(d_in=8, d_sae=24, seed=0, sae_kw=None, **l1):
    torch.manual_seed(seed)
    cfg = SAEConfig(architecture="relu", d_sae=d_sae, **(sae_kw or {}))
    return ReLUSAE(d_in, cfg, {"l1": L1Config(**l1)})


def test_init_weighted_form():
    sae = make(decoder_norm="weighted", decoder_init_norm=0.1)
    assert sae.unit_norm_decoder is False
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.full((24,), 0.1))
    assert torch.equal(sae.W_enc, sae.W_dec.T)
    assert not sae.b_enc.any() and not sae.b_dec.any()


def test_init_unit_form():
    sae = make()  # the default
    assert sae.unit_norm_decoder is True
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(24))
    assert torch.equal(sae.W_enc, sae.W_dec.T)
    # The class attribute is untouched: the instance attribute decides per SAE.
    assert make(decoder_norm="weighted").unit_norm_decoder is False


def test_forward_is_relu_then_linear_decode():
    sae = perturb(make())
    x = torch.randn(16, 8)
    z = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    a = sae.encode(x)
    assert torch.equal(a, z.clamp_min(0))
    assert (a == 0).any() and (a > 0).any()
    torch.testing.assert_close(sae(x), a @ sae.W_dec + sae.b_dec)


@pytest.mark.parametrize("form", ["weighted", "unit"])
def test_sparsity_loss_matches_formula(form):
    sae = perturb(make(decoder_norm=form, l1_coef=2.5))
    x = torch.randn(32, 8)
    out = sae.training_loss(x, StepContext(sparsity_scale=0.4))
    a = torch.relu((x - sae.b_dec) @ sae.W_enc + sae.b_enc)
    weights = sae.W_dec.norm(dim=1) if form == "weighted" else torch.ones(24)
    expected_l1 = 2.5 * 0.4 * (a * weights).sum(dim=1).mean()
    expected_mse = (x - a @ sae.W_dec - sae.b_dec).pow(2).sum(dim=1).mean()
    torch.testing.assert_close(out.terms["l1"], expected_l1)
    torch.testing.assert_close(out.terms["mse"], expected_mse)
    torch.testing.assert_close(out.loss, expected_l1 + expected_mse)
    # The two forms differ once decoder norms are not 1 (perturb makes them 0.3..3).
    other_weights = torch.ones(24) if form == "weighted" else sae.W_dec.norm(dim=1)
    other = 2.5 * 0.4 * (a * other_weights).sum(dim=1).mean()
    assert not torch.allclose(out.terms["l1"], other)


@pytest.mark.parametrize("input_norm", ["none", "constant"])
@pytest.mark.parametrize("form", ["weighted", "unit"])
def test_fold_keeps_forward_and_code(form, input_norm):
    sae = perturb(make(decoder_norm=form, sae_kw={"input_norm": input_norm}))
    c = 3.7 if input_norm == "constant" else 1.0
    with torch.no_grad():
        sae.input_scale.fill_(c)
    x = torch.randn(64, 8) * 2
    before_out = sae(x)
    a = sae.encode(x)
    norms = sae.W_dec.norm(dim=1).detach()
    assert (a > 0).float().mean() > 0.2  # enough active latents for the check to mean something
    sae.fold()
    torch.testing.assert_close(sae(x), before_out, atol=1e-5, rtol=1e-5)
    assert float(sae.input_scale) == 1.0
    # a saved code is the trained one; the decoder moves into raw units (W_dec / c)
    torch.testing.assert_close(sae.encode(x), a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), norms / c, atol=1e-6, rtol=1e-5)


def test_unit_form_projected_step_keeps_rows_unit_and_grads_orthogonal():
    sae = make(decoder_norm="unit", l1_coef=0.5)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    x = torch.randn(128, 8)
    rows_before = sae.W_dec.detach().clone()
    train_step(sae, opt, x, StepContext())
    grad = sae.W_dec.grad
    assert grad.abs().max() > 1e-3  # the decoder did get a gradient
    radial = (grad * rows_before).sum(dim=1)  # g_i . d_i (d_i unit before the step)
    assert radial.abs().max() < 1e-6
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(24), atol=1e-6, rtol=0)
    assert not torch.allclose(sae.W_dec, rows_before)


def test_weighted_form_decoder_is_free():
    sae = make(decoder_norm="weighted", l1_coef=0.5)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    x = torch.randn(128, 8)
    for _ in range(5):
        train_step(sae, opt, x, StepContext())
    norms = sae.W_dec.norm(dim=1)
    assert (norms - 0.1).abs().max() > 1e-2  # not renormalised to the init norm
    assert (norms - 1.0).abs().max() > 1e-2  # nor to unit norm


def test_geomedian_b_dec_init_resists_outliers():
    g = torch.Generator().manual_seed(0)
    center = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0, -1.0, 2.0, 0.0])
    inliers = center + 0.1 * torch.randn(900, 8, generator=g)
    outliers = center + 100.0 + torch.randn(100, 8, generator=g)  # 10% far away
    points = torch.cat([inliers, outliers])

    sae = make(b_dec_init="geomedian")
    sae.initialize_from_data(points)
    assert (sae.b_dec - center).norm() < 0.1
    assert (points.mean(dim=0) - center).norm() > 10  # the mean drifts

    sae_zero = make(b_dec_init="zero")
    sae_zero.initialize_from_data(points)
    assert not sae_zero.b_dec.any()

    # Weiszfeld's objective never rises with more iterations (max_iter=0 is the mean).
    objective = [float((points - geometric_median(points, max_iter=k)).norm(dim=1).sum()) for k in range(25)]
    assert all(b <= a + 1e-3 for a, b in itertools.pairwise(objective))
    assert objective[-1] < 0.6 * objective[0]


@pytest.mark.parametrize(
    "options, message",
    [
        ({"decoder_norm": "l2"}, "--decoder-norm"),
        ({"b_dec_init": "mean"}, "--b-dec-init"),
        ({"l1_coef": -1.0}, "--l1-coef"),
        ({"l1_warmup_fraction": 1.5}, "--l1-warmup-fraction"),
        ({"decoder_init_norm": 0.0}, "--decoder-init-norm"),
        ({"resample_scale": -0.2}, "--resample-scale"),
    ],
)
def test_bad_options_raise_saelab_error(options, message):
    with pytest.raises(SaelabError, match=message):
        make(**options)


def test_defaults_learning_rate_and_warmup():
    sae = make(d_in=64, d_sae=16 * 64, l1_coef=5.0, l1_warmup_fraction=0.07)
    assert sae.default_learning_rate() == pytest.approx(2e-4 * (1024 / 2**14) ** -0.5)
    assert sae.sparsity_warmup_fraction() == pytest.approx(0.07)  # a given coefficient is ramped in
    assert make(l1_warmup_fraction=0.07).sparsity_warmup_fraction() == 0  # the L0 controller needs no ramp
    assert ReLUSAE.architecture == "relu" and ReLUSAE.sections == (L1Config,)


def test_save_load_round_trip(tmp_path):
    sae = perturb(make(decoder_norm="weighted", l1_coef=0.7))
    x = torch.randn(32, 8)
    loaded = load_sae(save_sae(sae, tmp_path / "relu"))
    assert isinstance(loaded, ReLUSAE)
    assert loaded.l1_cfg == sae.l1_cfg and loaded.unit_norm_decoder is False
    torch.testing.assert_close(loaded(x), sae(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loaded.encode(x), sae.encode(x), atol=1e-5, rtol=1e-5)  # the trained code


@pytest.mark.parametrize("form, steps", [("weighted", 1500), ("unit", 2500)])
def test_planted_dictionary_recovery(form, steps, one_thread):
    """lambda = 0.3 (sum-MSE, inputs with E||x||^2 ~ 1), Adam lr 1e-3, 10% lambda warmup."""
    sae = toy_sae(ReLUSAE, {"l1": L1Config(l1_coef=0.3, decoder_norm=form)})
    data = planted_toy()
    assert mmcs(sae.W_dec, data.dictionary) < 0.6  # a random init is far from the answer
    fit_planted(sae, data, steps, lr=1e-3, context=sparsity_warmup(steps))
    assert mmcs(sae.W_dec, data.dictionary) > 0.9
    x = data.sample(2048)
    l0 = float((sae.encode(x) > 0).float().sum(dim=1).mean())
    assert l0 < 12  # sparse: the true L0 is 96 * 0.03 = 2.9
