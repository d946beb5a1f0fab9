"""JumpReLU SAE (docs/algorithms.md, "JumpReLU"): STE density estimates, exact forward, loss modes, folding,
save/load, recovery."""

import dataclasses
import math

import pytest
import torch
from helpers import perturb, planted_toy, sparsity_warmup, toy_sae

from saelab.config import SAEConfig
from saelab.errors import SaelabError
from saelab.kernels import SparseCode
from saelab.sae.base import EncoderPass, StepContext
from saelab.sae.io import load_sae, save_sae
from saelab.sae.jumprelu import JumpReLUConfig, JumpReLUSAE, jumprelu, step
from saelab.synthetic import fit_planted, mmcs
from saelab.train.step import train_step


def phi(t: float) -> float:
    """Standard normal density."""
    return math.exp(-t * t / 2) / math.sqrt(2 * math.pi)


def make(d_in=8, d_sae=24, seed=0, sae_kw=None, **opts):
    torch.manual_seed(seed)
    # target_l0 = d_in: lambda = l0_coef * d_in / target_l0 is then l0_coef itself
    cfg = SAEConfig(architecture="jumprelu", d_sae=d_sae, **{"target_l0": d_in, **(sae_kw or {})})
    return JumpReLUSAE(d_in, cfg, {"jumprelu": JumpReLUConfig(**opts)})


N_DENSITY = 1 << 22  # 4M samples: std of the rectangle-STE estimate ~ sqrt(phi / (eps N)) = 0.003 at eps = 0.01


@pytest.fixture(scope="module")
def gaussian_z():
    return torch.randn(N_DENSITY, 1, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("theta0", [0.5, 1.5])
def test_step_ste_estimates_the_density(gaussian_z, theta0):
    """d/dtheta mean_B H(z - theta) -> -p(theta) = -phi(theta) for z ~ N(0, 1)."""
    theta = torch.tensor([theta0], requires_grad=True)
    step(gaussian_z, theta, 0.01).mean().backward()
    assert float(theta.grad) == pytest.approx(-phi(theta0), abs=0.015)


@pytest.mark.parametrize("theta0", [0.5, 1.5])
def test_jumprelu_ste_estimates_d_mean_activation(gaussian_z, theta0):
    """E[a] = E[z 1[z > theta]] = phi(theta), so dE[a]/dtheta = -theta phi(theta)."""
    theta = torch.tensor([theta0], requires_grad=True)
    jumprelu(gaussian_z, theta, 0.01).mean().backward()
    assert float(theta.grad) == pytest.approx(-theta0 * phi(theta0), abs=0.015)


def test_ste_z_gradients():
    z = torch.randn(64, 5, requires_grad=True)
    theta = torch.full((5,), 0.3, requires_grad=True)
    jumprelu(z, theta, 0.1).sum().backward()
    assert torch.equal(z.grad, (z > theta).float().detach())  # da/dz = H(z - theta)
    z.grad = None
    step(z, theta, 0.1).sum().backward()
    assert z.grad is None or not z.grad.any()  # dH/dz = 0


def test_forward_equals_z_times_indicator_exactly():
    sae = perturb(make())
    theta = sae.threshold.detach()
    z = torch.randn(100, 24)
    z[:, :6] = theta[:6]  # exactly at the threshold: H(0) = 0
    a = sae.activate(z)
    assert torch.equal(a, z * (z > theta).float())
    assert (a[:, :6] == 0).all() and (a != 0).any() and ((z > 0) & (a == 0)).any()
    x = torch.randn(50, 8)
    z = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    torch.testing.assert_close(sae(x), (z * (z > theta)) @ sae.W_dec + sae.b_dec)


def sparse_code_terms(sae: JumpReLUSAE, x: torch.Tensor, ctx: StepContext) -> dict[str, torch.Tensor]:
    """The step / target modes' sparsity terms, computed as in training (over the sparse code's entries)."""
    encoder = EncoderPass(sae, x, StepContext())
    layout = sae.select(encoder.z, ctx)
    code = SparseCode(layout, sae.values_at(encoder.at(layout), layout, ctx))
    return sae.code_losses(encoder, x, code, code.values, ctx)


def test_step_l0_term_gives_encoder_zero_gradient_and_threshold_the_ste_gradient():
    sae = perturb(make(l0_coef=0.7, bandwidth=0.2))
    x = torch.randn(256, 8)
    z = sae.encode_pre(x)
    terms = sparse_code_terms(sae, x, StepContext(sparsity_scale=0.5))
    assert set(terms) == {"sparsity"}
    theta = sae.threshold.detach()
    zd = z.detach()
    torch.testing.assert_close(terms["sparsity"], 0.35 * (zd > theta).float().sum(dim=1).mean())
    terms["sparsity"].backward()
    for p in (sae.W_enc, sae.b_enc, sae.b_dec, sae.W_dec):
        assert p.grad is None or not p.grad.any()
    # d/dlog(theta) = theta * d/dtheta = theta * 0.35 * mean_B (-(1/eps) K((z - theta)/eps))
    kernel = (((zd - theta) / 0.2).abs() < 0.5).float()
    expected = theta * 0.35 * (-(1 / 0.2) * kernel).mean(dim=0)
    assert expected.abs().sum() > 0
    torch.testing.assert_close(sae.log_threshold.grad, expected)
    # The reconstruction term does reach the encoder.
    sae.zero_grad()
    sae.reconstruction_loss(x, sae.decode(sae.activate(sae.encode_pre(x), StepContext())), StepContext()).backward()
    assert sae.W_enc.grad.abs().sum() > 0


def test_target_mode():
    sae = perturb(make(sparsity_mode="target", l0_coef=2.0 * 3.0 / 8, bandwidth=0.2, sae_kw={"target_l0": 3.0}))
    x = torch.randn(256, 8)
    z = sae.encode_pre(x)
    terms = sparse_code_terms(sae, x, StepContext())
    l0 = (z.detach() > sae.threshold.detach()).float().sum(dim=1).mean()
    assert float(l0) != pytest.approx(3.0, abs=0.5)
    torch.testing.assert_close(terms["sparsity"], 2.0 * (l0 / 3.0 - 1) ** 2)
    terms["sparsity"].backward()
    assert sae.W_enc.grad is None or not sae.W_enc.grad.any()
    # Above target, the push raises thresholds (negative loss gradient on log theta overall); below, lowers them.
    direction = -float(sae.log_threshold.grad.sum())
    assert direction * (float(l0) - 3.0) > 0


def test_tanh_mode_terms_and_dead_mask():
    sae = perturb(make(sparsity_mode="tanh", tanh_c=4.0, l0_coef=1.5, preact_coef=0.01))
    x = torch.randn(128, 8)
    z = sae.encode_pre(x)
    a = sae.activate(z, StepContext())
    norms = sae.W_dec.norm(dim=1).detach()
    theta = sae.threshold.detach()
    zd, ad = z.detach(), a.detach()
    gap = (theta - zd).relu() * norms

    terms = sae.sparsity_loss(x, z, a, sae.decode(a), StepContext(sparsity_scale=0.5))
    torch.testing.assert_close(terms["sparsity"], 0.75 * torch.tanh(4.0 * ad * norms).sum(dim=1).mean())
    torch.testing.assert_close(terms["preact"], 0.01 * gap.sum(dim=1).mean())  # no dead mask: every latent

    dead = torch.zeros(24, dtype=torch.bool)
    dead[[0, 3, 7]] = True
    terms = sae.sparsity_loss(x, z, a, sae.decode(a), StepContext(dead=dead))
    torch.testing.assert_close(terms["preact"], 0.01 * gap[:, dead].sum(dim=1).mean())
    assert terms["preact"] > 0
    terms["preact"].backward()
    grad = sae.log_threshold.grad
    assert (grad[~dead] == 0).all() and (grad[dead] > 0).any()  # only dead thresholds are pushed down


def test_init_and_defaults():
    sae = make(d_in=64, d_sae=16 * 64, theta_init=0.003, jumprelu_warmup_fraction=0.2)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(1024))
    assert torch.equal(sae.W_enc, sae.W_dec.T)
    assert not sae.b_enc.any() and not sae.b_dec.any()
    torch.testing.assert_close(sae.threshold, torch.full((1024,), 0.003))
    assert isinstance(sae.log_threshold, torch.nn.Parameter)
    assert any(p is sae.log_threshold for p in sae.parameters())
    assert sae.unit_norm_decoder
    assert sae.default_learning_rate() == pytest.approx(2e-4 * (1024 / 2**14) ** -0.5)
    assert sae.sparsity_warmup_fraction() == pytest.approx(0.2)
    # He-uniform rows before normalising: entries are uniform on [-b, b], so max|w| / mean|w| ~ 2 per row,
    # where Gaussian rows of 64 entries average ~3.3.
    ratio = sae.W_dec.abs().max(dim=1).values / sae.W_dec.abs().mean(dim=1)
    assert ratio.mean() < 2.3


def test_unit_norm_decoder_kept_after_a_step():
    sae = make()
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    train_step(sae, opt, torch.randn(64, 8), StepContext())
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(24), atol=1e-6, rtol=0)


@pytest.mark.parametrize("input_norm", ["none", "constant"])
def test_fold_keeps_forward_code_and_thresholds(input_norm):
    sae = perturb(make(sae_kw={"input_norm": input_norm}))
    c = 2.5 if input_norm == "constant" else 1.0
    with torch.no_grad():
        sae.input_scale.fill_(c)
    x = torch.randn(200, 8) * 2
    before = sae(x)
    norms = sae.W_dec.norm(dim=1).detach()
    theta = sae.threshold.detach().clone()
    code = sae.encode(x)
    assert ((code > 0).float().mean(dim=0) > 0).sum() > 12  # many latents active
    sae.fold()
    torch.testing.assert_close(sae(x), before, atol=1e-5, rtol=1e-5)
    # a saved code is the trained one: thresholds stay in z units, the decoder moves into raw units (W_dec / c)
    torch.testing.assert_close(sae.threshold, theta)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), norms / c, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(sae.encode(x), code, atol=1e-5, rtol=1e-5)


def test_thresholds_survive_save_load(tmp_path):
    sae = perturb(make(theta_init=0.02, bandwidth=0.05, sparsity_mode="tanh"))
    x = torch.randn(64, 8)
    loaded = load_sae(save_sae(sae, tmp_path / "jr"))
    assert isinstance(loaded, JumpReLUSAE)
    # the threshold scale (1 here: the controller never stepped) is folded into the thresholds when saving
    assert loaded.jumprelu_cfg == dataclasses.replace(sae.jumprelu_cfg, threshold_scale=1.0)
    torch.testing.assert_close(loaded.threshold, sae.threshold, rtol=1e-6, atol=0)
    assert not torch.allclose(loaded.threshold, torch.full((24,), 0.02))  # the trained, not the initial, value
    torch.testing.assert_close(loaded(x), sae(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"sparsity_mode": "l1"}, "--sparsity-mode"),
        ({"l0_coef": -1.0}, "--l0-coef"),
        ({"preact_coef": -1.0}, "--preact-coef"),
        ({"theta_init": -1.0}, "--theta-init"),
        ({"bandwidth": -0.1}, "--bandwidth"),
        ({"jumprelu_warmup_fraction": 2.0}, "--jumprelu-warmup-fraction"),
    ],
)
def test_bad_options_raise_saelab_error(options, message):
    with pytest.raises(SaelabError, match=message):
        make(**options)


def test_planted_dictionary_recovery(one_thread):
    """Hand-set (no controller): step mode, lambda = 0.03, theta0 = 0.1, eps = 0.05 (inputs have E||x||^2 ~ 1), Adam lr 2e-3, 2000 steps."""
    options = {"jumprelu": JumpReLUConfig(l0_coef=0.03, theta_init=0.1, bandwidth=0.05, threshold_scale=1.0)}
    sae = toy_sae(JumpReLUSAE, options)
    data = planted_toy()
    assert mmcs(sae.W_dec, data.dictionary) < 0.6
    fit_planted(sae, data, 2000, lr=2e-3, context=sparsity_warmup(2000))
    assert mmcs(sae.W_dec, data.dictionary) > 0.9
    l0 = float((sae.encode(data.sample(2048)) != 0).float().sum(dim=1).mean())
    assert abs(l0 - 2.88) < 0.3 * 2.88  # ~2.2; the true L0 is 96 * 0.03 = 2.88
