"""Sparse kernels (eager path) against dense references: the primitives, the autograd functions (forward and
every gradient), and a whole training step of each sparse-code variant, sparse kernels vs dense backward."""

import pytest
import torch

from saelab.config import SAEConfig
from saelab.errors import SaelabError
from saelab.kernels import SparseCode, SparseLayout, decode, eager, encode_at
from saelab.sae.base import StepContext
from saelab.sae.choice import ChoiceConfig
from saelab.sae.gsae import GSAEConfig
from saelab.sae.jumprelu import JumpReLUConfig
from saelab.sae.registry import create_sae
from saelab.sae.relu import L1Config
from saelab.sae.thresholds import ThresholdConfig
from saelab.sae.topafa import AFAConfig, TopAFASAE
from saelab.sae.topk import AuxConfig, TopKConfig, normalized_mse
from saelab.train.step import train_step


def random_layout(case: str, batch: int, n: int, gen: torch.Generator) -> SparseLayout:
    if case == "topk":
        return SparseLayout.fixed_k(torch.rand(batch, n, generator=gen).topk(5, dim=1).indices, n)
    if case == "k1":
        return SparseLayout.fixed_k(torch.randint(0, n, (batch, 1), generator=gen), n)
    if case == "k_eq_n":
        return SparseLayout.fixed_k(torch.stack([torch.randperm(n, generator=gen) for _ in range(batch)]), n)
    if case == "repeats":  # every token names some latent twice: contributions add
        return SparseLayout.fixed_k(torch.randint(0, 3, (batch, 6), generator=gen), n)
    if case == "empty_rows":  # variable counts, empty first and last rows
        mask = torch.rand(batch, n, generator=gen) < 0.2
        mask[0] = mask[-1] = False
        return SparseLayout.from_mask(mask)
    if case == "empty":
        return SparseLayout.from_mask(torch.zeros(batch, n, dtype=torch.bool))
    raise ValueError(case)


CASES = ["topk", "k1", "k_eq_n", "repeats", "empty_rows", "empty"]


def dense_weights(layout: SparseLayout, weights: torch.Tensor) -> torch.Tensor:
    """[batch, n] with repeated entries summed: the dense matrix a sparse code stands for."""
    return layout.to_dense(weights)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_primitives_equal_dense_matmuls(case, dtype):
    gen = torch.Generator().manual_seed(0)
    batch, n, d = 9, 17, 12
    layout = random_layout(case, batch, n, gen)
    table = torch.randn(d, n, generator=gen).to(dtype).T  # non-contiguous [n, d]
    weights = torch.randn(layout.nnz, generator=gen)
    dense = torch.randn(batch, d, generator=gen).to(dtype)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 5e-2}
    expected_sum = dense_weights(layout, weights).double() @ table.double()
    got_sum = eager.bag_sum(layout.indices, layout.offsets, weights, table)
    assert got_sum.dtype == dtype and got_sum.shape == (batch, d)
    torch.testing.assert_close(got_sum.double(), expected_sum, **tol)
    expected_dots = (table.double()[layout.indices] * dense.double()[layout.rows]).sum(-1)
    got_dots = eager.bag_dots(layout.indices, layout.offsets, layout.rows, table, dense)
    torch.testing.assert_close(got_dots.double(), expected_dots, **tol)


def test_layout_constructors_agree():
    gen = torch.Generator().manual_seed(1)
    mask = torch.rand(7, 11, generator=gen) < 0.3
    from_mask = SparseLayout.from_mask(mask)
    from_flat = SparseLayout.from_flat(mask.reshape(-1).nonzero()[:, 0], 7, 11)
    for layout in (from_mask, from_flat):
        assert torch.equal(layout.to_dense(torch.ones(layout.nnz)).bool(), mask)
        assert torch.equal(layout.offsets.diff(), mask.sum(1))
    order, rows, latent_offsets = from_mask.transpose
    assert torch.equal(latent_offsets.diff(), mask.sum(0))
    assert torch.equal(from_mask.indices[order], torch.sort(from_mask.indices, stable=True).values)
    assert torch.equal(rows, from_mask.rows[order])


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dense", [False, True])
def test_encode_and_decode_gradients_equal_autograd_reference(case, dense):
    """z = (x - center) @ W_enc + b_enc at the entries, values = f(z), x_hat = code @ W_dec: every gradient matches."""
    gen = torch.Generator().manual_seed(2)
    batch, n, d = 9, 17, 12
    layout = random_layout(case, batch, n, gen)
    x = torch.randn(d, batch, generator=gen, dtype=torch.float64).T.requires_grad_()  # non-contiguous
    center = torch.randn(d, generator=gen, dtype=torch.float64, requires_grad=True)
    W_enc = torch.randn(n, d, generator=gen, dtype=torch.float64).T.requires_grad_()
    b_enc = torch.randn(n, generator=gen, dtype=torch.float64, requires_grad=True)
    W_dec = torch.randn(n, d, generator=gen, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(batch, d, generator=gen, dtype=torch.float64)

    def sparse_path():
        with torch.no_grad():
            z = (x - center) @ W_enc + b_enc
        z_at = encode_at(x, center, W_enc, b_enc, layout, z[layout.rows, layout.indices], dense=dense)
        return decode(z_at * z_at.sigmoid(), W_dec, layout, dense=dense)

    def reference():
        z = (x - center) @ W_enc + b_enc
        z_at = z[layout.rows, layout.indices]
        return dense_weights(layout, z_at * z_at.sigmoid()) @ W_dec

    inputs = (x, center, W_enc, b_enc, W_dec)
    got, expected = sparse_path(), reference()
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    got_grads = torch.autograd.grad(got, inputs, upstream, allow_unused=True)
    expected_grads = torch.autograd.grad(expected, inputs, upstream, allow_unused=True)
    for name, tensor, g, e in zip(("x", "center", "W_enc", "b_enc", "W_dec"), inputs, got_grads, expected_grads):
        g, e = (torch.zeros_like(tensor) if v is None else v for v in (g, e))  # None: no path (empty code)
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12, msg=f"d{name} ({case})")


def test_weight_gradients_touch_only_used_latents():
    gen = torch.Generator().manual_seed(3)
    batch, n, d = 6, 20, 8
    layout = SparseLayout.fixed_k(torch.tensor([[1, 4], [4, 7]] * 3), n)
    x = torch.randn(batch, d, generator=gen)
    W_enc = torch.randn(d, n, generator=gen, requires_grad=True)
    b_enc = torch.zeros(n, requires_grad=True)
    W_dec = torch.randn(n, d, generator=gen, requires_grad=True)
    z_at = encode_at(x, None, W_enc, b_enc, layout, torch.randn(layout.nnz, generator=gen))
    decode(z_at, W_dec, layout).square().sum().backward()
    used = torch.zeros(n, dtype=torch.bool)
    used[[1, 4, 7]] = True
    assert (W_dec.grad[~used] == 0).all() and (W_dec.grad[used] != 0).all()
    assert (W_enc.grad[:, ~used] == 0).all() and (W_enc.grad[:, used] != 0).all()


def test_sparse_code_statistics_count_nonzero_values():
    layout = SparseLayout.fixed_k(torch.tensor([[0, 2], [2, 3]]), 5)
    code = SparseCode(layout, torch.tensor([1.0, 0.0, -2.0, 3.0]))  # an entry can hold 0 (ReLU of z < 0)
    assert code.fired().tolist() == [True, False, True, True, False]
    assert code.firing_counts().tolist() == [1, 0, 1, 1, 0]
    assert code.l0() == 1.5
    assert torch.equal(SparseCode.from_dense(code.dense()).dense(), code.dense())


# -- a whole training step ----------------------------------------------------------------------------------
VARIANTS = [
    ("topk", {}),
    ("abstopk", {}),
    ("gsae", {"gsae": GSAEConfig(gsae_beta=2.0)}),
    ("batchtopk", {}),
    ("choice", {"choice": ChoiceConfig(choice_mode="mutual", zipf_coef=0.5)}),
    ("choice", {"choice": ChoiceConfig(choice_mode="feature")}),
    ("topafa", {"afa": AFAConfig(afa_coef=0.5)}),
    ("jumprelu", {"jumprelu": JumpReLUConfig(theta_init=0.3, bandwidth=0.2, l0_coef=0.1)}),
    ("jumprelu", {"jumprelu": JumpReLUConfig(theta_init=0.3, bandwidth=0.2, sparsity_mode="target")}),
]


def make_sae(architecture: str, options: dict, seed: int = 0):
    torch.manual_seed(seed)
    cfg = SAEConfig(architecture=architecture, d_sae=96, k=4, input_norm="none", mse_reduction="mean")
    aux = AuxConfig(k_aux=6, aux_coef=0.5)
    return create_sae(16, cfg, {"aux": aux, "topk": TopKConfig(), **options})


def step_context(seed: int, batch: int) -> StepContext:
    gen = torch.Generator().manual_seed(seed)
    dead = torch.rand(96, generator=gen) < 0.4  # AuxK (and aux_zipf) active
    return StepContext(dead=dead, grads=torch.randn(batch, 16, generator=gen))


@pytest.mark.parametrize(("architecture", "options"), VARIANTS, ids=lambda v: v if isinstance(v, str) else "")
def test_training_step_with_sparse_kernels_equals_dense_backward(architecture, options):
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(4))
    results = []
    for sparse in (True, False):
        sae = make_sae(architecture, options)
        if architecture == "choice":  # give aux_zipf under-used latents to work on
            sae.feature_freq.copy_(torch.rand(96, generator=torch.Generator().manual_seed(5)) * 0.08)
            sae.freq_updates.fill_(1)
        optimizer = torch.optim.SGD(sae.parameters(), lr=0.1)  # Adam's first step is sign(g): it would amplify fp noise
        ctx = step_context(6, len(x))._replace(sparse_kernels=sparse)
        out = sae.training_loss(x, ctx)
        out.loss.backward()
        grads = {name: p.grad.clone() for name, p in sae.named_parameters()}
        train_step(sae, optimizer, x, ctx)
        results.append((out, grads, sae.state_dict()))
    (sparse_out, sparse_grads, sparse_state), (dense_out, dense_grads, dense_state) = results
    assert set(sparse_out.terms) == set(dense_out.terms) and len(sparse_out.terms) >= 2
    assert 0 < sparse_out.code.layout.nnz < 0.5 * 64 * 96  # a sparse code, so the two paths differ
    for name in sparse_out.terms:
        torch.testing.assert_close(sparse_out.terms[name], dense_out.terms[name], rtol=1e-5, atol=1e-7)
    for name in sparse_grads:
        torch.testing.assert_close(sparse_grads[name], dense_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    for name in sparse_state:
        torch.testing.assert_close(sparse_state[name], dense_state[name], rtol=1e-5, atol=1e-6, msg=name)


def test_topk_step_equals_a_hand_written_dense_reference():
    """TopK's loss (normalised MSE + AuxK) written out with dense tensors and plain autograd."""
    sae = make_sae("topk", {})
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(7))
    x = (x * 4).round() / 4  # coarse values: ties among pre-activations
    ctx = step_context(8, len(x))
    out = sae.training_loss(x, ctx)
    out.loss.backward()
    sparse_grads = [p.grad.clone() for p in sae.parameters()]
    sae.zero_grad()

    z = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    keep = torch.zeros_like(z, dtype=torch.bool).scatter(1, out.code.layout.indices.view(64, 4), True)
    a = z.relu() * keep
    x_hat = a @ sae.W_dec + sae.b_dec
    dead_z = z.detach().masked_fill(~ctx.dead, float("-inf"))
    aux_keep = torch.zeros_like(keep).scatter(1, dead_z.topk(6, dim=1).indices, True)
    aux = normalized_mse((x - x_hat).detach(), (z.relu() * aux_keep) @ sae.W_dec)
    loss = normalized_mse(x, x_hat) + 0.5 * aux
    loss.backward()
    torch.testing.assert_close(out.loss, loss)
    for got, p in zip(sparse_grads, sae.parameters()):
        torch.testing.assert_close(got, p.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("mode", ["step", "target"])
def test_jumprelu_sparse_step_equals_the_dense_formula(mode):
    """JumpReLU trains on the entries with z > theta - eps/2 only: loss and gradients equal the dense formula
    a = z * H(z - theta), L0 = mean_B sum_i H(z - theta) over every entry (STE pseudo-derivatives)."""
    from saelab.sae.jumprelu import jumprelu, step

    options = {"jumprelu": JumpReLUConfig(theta_init=0.3, bandwidth=0.2, l0_coef=0.1, sparsity_mode=mode)}
    sae = make_sae("jumprelu", options)
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(9))
    ctx = StepContext(sparsity_scale=0.5)
    out = sae.training_loss(x, ctx)
    out.loss.backward()
    sparse_grads = [p.grad.clone() for p in sae.parameters()]
    sae.zero_grad()

    z = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    a = jumprelu(z, sae.threshold, 0.2)
    l0 = step(z.detach(), sae.threshold, 0.2).sum(dim=1).mean()
    penalty = (l0 / sae.cfg.target_l0 - 1).pow(2) if mode == "target" else l0
    lam = 0.1 / sae.cfg.target_l0  # l0_coef * 1 / target_l0 under mean reduction
    loss = (a @ sae.W_dec + sae.b_dec - x).pow(2).mean() + lam * 0.5 * penalty
    loss.backward()
    torch.testing.assert_close(out.loss, loss)
    for got, p in zip(sparse_grads, sae.parameters()):
        torch.testing.assert_close(got, p.grad, rtol=1e-4, atol=1e-6)


def test_dense_switch_bypasses_the_sparse_kernels(monkeypatch):
    sae = make_sae("topk", {})
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(10))
    sparse_loss = sae.training_loss(x, step_context(11, 64)).loss

    def refuse(*args):
        raise AssertionError("sparse kernel used")

    monkeypatch.setattr(eager, "bag_sum", refuse)
    monkeypatch.setattr(eager, "bag_dots", refuse)
    with pytest.raises(AssertionError, match="sparse kernel used"):
        sae.training_loss(x, step_context(11, 64))
    monkeypatch.setenv("SAELAB_KERNELS", "dense")
    torch.testing.assert_close(sae.training_loss(x, step_context(11, 64)).loss, sparse_loss)
    monkeypatch.setenv("SAELAB_KERNELS", "fast")
    with pytest.raises(SaelabError, match="SAELAB_KERNELS='fast' is not one of auto, eager, triton, dense"):
        sae.training_loss(x, step_context(11, 64))


def test_topafa_sparse_step_equals_the_dense_formula():
    """top-AFA trains on each token's top k* latents: loss and gradients equal the dense code of afa_select with
    normalised MSE, AuxK and afa_coef * sum_B (||a|| - ||x - b_dec||)^2 / sum_B ||x - mean(x)||^2."""
    from saelab.sae.topafa import afa_select

    sae = make_sae("topafa", {"afa": AFAConfig(afa_coef=0.5)})
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(12))
    ctx = step_context(13, 64)
    out = sae.training_loss(x, ctx)
    out.loss.backward()
    sparse_grads = [p.grad.clone() for p in sae.parameters()]
    sae.zero_grad()

    z = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    a = afa_select(z.relu(), sae.W_dec.detach().norm(dim=1), (x - sae.b_dec).detach().norm(dim=-1)).acts
    x_hat = a @ sae.W_dec + sae.b_dec
    dead_z = z.detach().masked_fill(~ctx.dead, float("-inf"))
    aux_keep = torch.zeros_like(z, dtype=torch.bool).scatter(1, dead_z.topk(6, dim=1).indices, True)
    aux = normalized_mse((x - x_hat).detach(), (z.relu() * aux_keep) @ sae.W_dec)
    centred = (x - sae.b_dec.detach()).norm(dim=-1)
    afa = (a.norm(dim=-1) - centred).pow(2).sum() / (x - x.mean(dim=0)).pow(2).sum()
    loss = normalized_mse(x, x_hat) + 0.5 * aux + 0.5 * afa
    loss.backward()
    torch.testing.assert_close(out.loss, loss)
    for got, p in zip(sparse_grads, sae.parameters()):
        torch.testing.assert_close(got, p.grad, rtol=1e-4, atol=1e-6)


DENSE_VARIANTS = [
    ("relu", {"l1": L1Config()}),
    ("threshold", {"threshold": ThresholdConfig(threshold_family="cel0", threshold_lambda=0.5, threshold_gamma=0.3)}),
    ("jumprelu", {"jumprelu": JumpReLUConfig(theta_init=0.3, sparsity_mode="tanh")}),
]


def _dense_code(sae, x_n):
    """The reference: the code from the dense pre-activations [batch, d_sae] (top-AFA's also needs ||x_n - b_dec||)."""
    z = sae.encode_pre(x_n)
    return sae.afa_code(z, sae.target_norm(x_n)).acts if isinstance(sae, TopAFASAE) else sae.activate(z)


@pytest.mark.parametrize("backend", ["eager", "dense"])
@pytest.mark.parametrize(
    ("architecture", "options"), VARIANTS + DENSE_VARIANTS, ids=lambda v: v if isinstance(v, str) else ""
)
def test_inference_code_is_csr_and_decodes_like_the_dense_code(architecture, options, backend, monkeypatch):
    """Every variant, dense ones included: encode_code keeps exactly the nonzero entries of activate's dense code,
    and sae(x) (decoded from the CSR code) equals the dense decode, values and input gradients alike."""
    monkeypatch.setenv("SAELAB_KERNELS", backend)
    sae = make_sae(architecture, options)
    with torch.no_grad():
        sae.b_enc.uniform_(-0.5, 0.2)  # a code with variable counts per token, some latents silent
        sae.b_dec.normal_()
        if hasattr(sae, "threshold"):  # batch-level variants: an untrained inference threshold is +inf
            sae.threshold.fill_(0.5)
    x = torch.randn(3, 20, 16, generator=torch.Generator().manual_seed(14), requires_grad=True)

    code, x_n, _ = sae.encode_code(x)
    reference = _dense_code(sae, x_n)
    assert code.layout.batch == 60 and code.layout.n_latents == sae.d_sae
    assert code.layout.nnz == int((reference != 0).sum())  # no stored zeros
    torch.testing.assert_close(code.dense(), reference)
    assert 0 < code.l0() < sae.d_sae

    out = sae(x)
    (out * torch.linspace(-1, 1, 16)).sum().backward()
    grad_sparse = x.grad.clone()
    x.grad = None
    x_n_ref, _ = sae.normalize(x.reshape(-1, 16))
    expected = sae.denormalize(sae.decode(_dense_code(sae, x_n_ref)), None).reshape(x.shape)
    (expected * torch.linspace(-1, 1, 16)).sum().backward()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_sparse, x.grad, rtol=1e-5, atol=1e-5)
