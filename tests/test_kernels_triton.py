"""The Triton sparse primitives against the eager ones: directly, and through the encoder/decoder autograd.

Without CUDA the kernels run on CPU tensors under Triton's interpreter. @triton.jit reads TRITON_INTERPRET when
saelab.kernels.triton is imported, so the variable is set around that import, then restored, and set again per
test (the backend switch checks it on every call): it never leaks into other test modules.
"""

import os

import pytest
import torch

INTERPRET = not torch.cuda.is_available()
_prior_interpret = os.environ.get("TRITON_INTERPRET")
if INTERPRET:
    os.environ["TRITON_INTERPRET"] = "1"
try:
    pytest.importorskip("triton")
    from saelab.kernels import triton as triton_kernels
finally:
    if _prior_interpret is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _prior_interpret

from saelab.kernels import decode, eager, encode_at
from saelab.kernels.backend import backend_for
from saelab.kernels.layout import SparseLayout

DEVICE = "cpu" if INTERPRET else "cuda"
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    if INTERPRET:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


def _csr(counts: list[int], n: int, gen: torch.Generator) -> SparseLayout:
    """A layout with the given entry count per token and random latents (repeats allowed)."""
    offsets = torch.zeros(len(counts) + 1, dtype=torch.long)
    torch.cumsum(torch.tensor(counts, dtype=torch.long), 0, out=offsets[1:])
    indices = torch.randint(0, n, (int(offsets[-1]),), generator=gen)
    return SparseLayout(indices.to(DEVICE), offsets.to(DEVICE), n)


def _layout(case: str, n: int, gen: torch.Generator) -> SparseLayout:
    batch = 6
    if case == "random":
        return SparseLayout.from_mask((torch.rand(batch, n, generator=gen) < 0.3).to(DEVICE))
    if case == "k1":
        return SparseLayout.fixed_k(torch.randint(0, n, (batch, 1), generator=gen).to(DEVICE), n)
    if case == "k_eq_n":  # every latent, in a different order per token
        return SparseLayout.fixed_k(torch.stack([torch.randperm(n, generator=gen) for _ in range(batch)]).to(DEVICE), n)
    if case == "repeats":  # 8 entries over 3 latents: every token repeats a latent
        return SparseLayout.fixed_k(torch.randint(0, 3, (batch, 8), generator=gen).to(DEVICE), n)
    if case == "empty_rows":  # first, middle and last tokens have no entries; one token spans two chunks
        return _csr([0, 3, 0, 21, 2, 0], n, gen)
    if case == "nnz0":
        return _csr([0] * batch, n, gen)
    if case == "batch0":
        return _csr([], n, gen)
    raise ValueError(case)


CASES = ["random", "k1", "k_eq_n", "repeats", "empty_rows", "nnz0", "batch0"]


def _table(n: int, d: int, dtype: torch.dtype, transposed: bool, gen: torch.Generator) -> torch.Tensor:
    if transposed:
        table = torch.randn(d, n, generator=gen).to(DEVICE, dtype).T
        assert not table.is_contiguous()
        return table
    return torch.randn(n, d, generator=gen).to(DEVICE, dtype)


def _assert_matches(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal up to summation order (fp32) or a rounding of each side (bf16); atol scales with the data."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    scale = max(expected.float().abs().max().item(), 1.0) if expected.numel() else 1.0
    tol = 1e-5 if expected.dtype == torch.float32 else 2e-2
    torch.testing.assert_close(actual.float(), expected.float(), rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("case", CASES)
def test_primitives_match_eager(case, transposed, dtype):
    gen = torch.Generator().manual_seed(CASES.index(case))
    n, d = 20, 130  # d spans two column blocks, n > one chunk of entries
    layout = _layout(case, n, gen)
    table = _table(n, d, dtype, transposed, gen)
    weights = torch.randn(layout.nnz, generator=gen, dtype=torch.float64).to(DEVICE)  # not table's dtype
    dense = torch.randn(d, layout.batch, generator=gen).to(DEVICE, dtype).T  # strided too

    summed = triton_kernels.bag_sum(layout.indices, layout.offsets, weights, table)
    expected_sum = eager.bag_sum(layout.indices, layout.offsets, weights, table)
    _assert_matches(summed, expected_sum)
    dots = triton_kernels.bag_dots(layout.indices, layout.offsets, layout.rows, table, dense)
    _assert_matches(dots, eager.bag_dots(layout.indices, layout.offsets, layout.rows, table, dense))

    assert summed.shape == (layout.batch, d) and dots.shape == (layout.nnz,)
    empty = layout.offsets.diff() == 0
    assert (summed[empty] == 0).all()
    if (~empty).any():  # the comparison above is not vacuous
        assert expected_sum[~empty].abs().sum() > 0 and dots.abs().sum() > 0


def test_bag_sum_accumulates_repeats_exactly():
    """weights 1 on a repeated latent: out = count * row, exact in fp32 for small integers."""
    table = torch.arange(12, dtype=torch.float32, device=DEVICE).reshape(4, 3)
    indices = torch.tensor([2, 2, 2, 0, 3], device=DEVICE)
    offsets = torch.tensor([0, 0, 3, 5], device=DEVICE)
    out = triton_kernels.bag_sum(indices, offsets, torch.ones(5, device=DEVICE), table)
    torch.testing.assert_close(out, torch.stack([torch.zeros(3, device=DEVICE), 3 * table[2], table[0] + table[3]]))


def _run_sae(layout: SparseLayout, params: dict[str, torch.Tensor], cotangent: torch.Tensor, backend: str, monkeypatch):
    """encode_at -> decode on fresh leaf copies of params; returns (z_at, out, grads of every param)."""
    monkeypatch.setenv("SAELAB_KERNELS", backend)
    assert backend_for(cotangent.device) is (triton_kernels if backend == "triton" else eager)
    leaves = {name: p.detach().clone().requires_grad_() for name, p in params.items()}
    x, W_enc, b_enc, W_dec = leaves["x"], leaves["W_enc"], leaves["b_enc"], leaves["W_dec"]
    with torch.no_grad():
        z_at = (x @ W_enc + b_enc)[layout.rows, layout.indices]
    values = encode_at(x, None, W_enc, b_enc, layout, z_at)
    out = decode(values, W_dec, layout)
    (out * cotangent).sum().backward()
    return values.detach(), out.detach(), {name: leaf.grad for name, leaf in leaves.items()}


def _params(batch: int, n: int, d: int, dtype: torch.dtype, gen: torch.Generator) -> dict[str, torch.Tensor]:
    def randn(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=gen)).to(DEVICE, dtype)

    return {
        "x": randn(batch, d),
        "W_enc": randn(n, d, scale=d**-0.5).T,  # stored as saelab's SAE stores it: transpose of a contiguous [n, d]
        "b_enc": randn(n, scale=0.1),
        "W_dec": randn(n, d, scale=d**-0.5),
    }


def _assert_autograd_agrees(layout, params, cotangent, monkeypatch):
    z_eager, out_eager, grads_eager = _run_sae(layout, params, cotangent, "eager", monkeypatch)
    z_triton, out_triton, grads_triton = _run_sae(layout, params, cotangent, "triton", monkeypatch)
    _assert_matches(z_triton, z_eager)
    _assert_matches(out_triton, out_eager)
    for name in params:
        assert grads_eager[name].abs().sum() > 0, name
        _assert_matches(grads_triton[name], grads_eager[name])


@pytest.mark.parametrize("layout_kind", ["fixed_k", "from_mask"])
def test_autograd_matches_eager(layout_kind, monkeypatch):
    gen = torch.Generator().manual_seed(1)
    batch, n, d, k = 8, 24, 20, 5
    params = _params(batch, n, d, torch.float32, gen)
    if layout_kind == "fixed_k":
        layout = SparseLayout.fixed_k(torch.rand(batch, n, generator=gen).topk(k, dim=1).indices.to(DEVICE), n)
    else:
        mask = torch.rand(batch, n, generator=gen) < k / n
        mask[0] = mask[-1] = False
        mask[3] = True
        layout = SparseLayout.from_mask(mask.to(DEVICE))
    _assert_autograd_agrees(layout, params, torch.randn(batch, d, generator=gen).to(DEVICE), monkeypatch)


@cuda_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout_kind", ["fixed_k", "from_mask"])
def test_autograd_matches_eager_cuda_medium(layout_kind, dtype, monkeypatch):
    gen = torch.Generator().manual_seed(2)
    batch, n, d, k = 512, 4096, 256, 32
    params = _params(batch, n, d, dtype, gen)
    z = (params["x"] @ params["W_enc"] + params["b_enc"]).float()
    if layout_kind == "fixed_k":
        layout = SparseLayout.fixed_k(z.topk(k, dim=1).indices, n)
    else:  # BatchTopK-style: the batch's top batch * k pre-activations, a variable count per token
        layout = SparseLayout.from_mask(z >= z.flatten().topk(batch * k).values[-1])
    _assert_autograd_agrees(layout, params, torch.randn(batch, d, generator=gen).to(DEVICE, dtype), monkeypatch)


def test_auto_picks_triton_for_cuda_tensors_and_eager_for_cpu(monkeypatch):
    monkeypatch.delenv("SAELAB_KERNELS", raising=False)
    assert backend_for(torch.device("cuda")) is triton_kernels
    assert backend_for(torch.device("cpu")) is eager
