import math

import pytest
import torch
import torch.nn.functional as F

from saelab.analysis.metrics import DENSITY_BIN_EDGES, DownstreamStats, ReconstructionStats, SparsityStats
from saelab.kernels import SparseCode, SparseLayout

BATCHINGS = ([500], [7] * 71 + [3], [1, 499], [250, 0, 250])


def _chunks(n_rows, sizes):
    start = 0
    for size in sizes:
        yield slice(start, start + size)
        start += size
    assert start == n_rows


def _activations(seed=0):
    """x [500, 12] with a large common offset (so FVU's mean subtraction matters), x_hat a noisy copy."""
    g = torch.Generator().manual_seed(seed)
    x = 5.0 + torch.randn(500, 12, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3.0, 12, dtype=torch.float64)
    x_hat = 0.8 * x + 0.3 * torch.randn(500, 12, generator=g, dtype=torch.float64)
    return x, x_hat


def _reconstruction(x, x_hat, sizes):
    stats = ReconstructionStats()
    for rows in _chunks(len(x), sizes):
        stats.update(x[rows], x_hat[rows])
    return stats.result()


@pytest.mark.parametrize("sizes", BATCHINGS)
def test_reconstruction_streaming_equals_one_shot(sizes):
    x, x_hat = _activations()
    result = _reconstruction(x, x_hat, sizes)
    error = (x - x_hat).square()
    expected = {
        "n_tokens": 500,
        "fvu": float(error.sum() / (x - x.mean(0)).square().sum()),
        "mse": float(error.mean()),
        "normalized_mse_per_token": float((error.sum(1) / x.square().sum(1)).mean()),
        "cosine": float(F.cosine_similarity(x, x_hat, dim=1).mean()),
        "shrinkage": float((x_hat.norm(dim=1) / x.norm(dim=1)).mean()),
    }
    for key, value in expected.items():
        assert result[key] == pytest.approx(value, rel=1e-12), key
    assert result["explained_variance"] == pytest.approx(1 - expected["fvu"], rel=1e-12)
    assert result["fvu"] != pytest.approx(expected["normalized_mse_per_token"], rel=0.1)  # the conventions differ


def test_reconstruction_known_answers():
    x, _ = _activations()
    identity = _reconstruction(x, x.clone(), [100] * 5)
    assert identity["fvu"] == 0 and identity["mse"] == 0 and identity["normalized_mse_per_token"] == 0
    assert identity["cosine"] == pytest.approx(1, abs=1e-12) and identity["shrinkage"] == pytest.approx(1, abs=1e-12)
    # the global mean: FVU exactly 1 (per-batch means would make it differ)
    assert _reconstruction(x, x.mean(0).expand_as(x), [7] * 71 + [3])["fvu"] == pytest.approx(1, abs=1e-12)
    zero = _reconstruction(x, torch.zeros_like(x), [500])
    assert zero["cosine"] == 0 and zero["shrinkage"] == 0 and zero["normalized_mse_per_token"] == pytest.approx(1)


def _signed_code(seed=0):
    """A dense [300, 20] code with negative entries, two dead latents, a dense one and a rarely firing one."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(300, 20, generator=g, dtype=torch.float64)
    a[torch.rand(300, 20, generator=g) < 0.8] = 0
    a[:, 3] = 0
    a[:, 7] = 0
    a[:, 11] = -1.5  # fires on every token, negative
    a[:, 15] = 0
    a[42, 15] = 2.0  # fires once: f = 1/300
    return a


@pytest.mark.parametrize("sizes", [[300], [1] * 300, [17] * 17 + [11]])
def test_sparsity_streaming_equals_one_shot(sizes):
    a = _signed_code()
    stats = SparsityStats(20, dense_threshold=0.25)
    for rows in _chunks(len(a), sizes):
        stats.update(SparseCode.from_dense(a[rows]))
    result = stats.result()
    frequency = (a != 0).double().mean(0)
    assert result["l0"] == pytest.approx(float((a != 0).sum(1).double().mean()), rel=1e-12)
    assert torch.allclose(result["firing_frequency"], frequency, rtol=0, atol=1e-15)
    assert result["dead"] == 2 and result["dead_fraction"] == 0.1
    assert result["dense"] == int((frequency > 0.25).sum()) >= 1 and result["dense_fraction"] == result["dense"] / 20
    assert result["below_1e-05"] == result["below_1e-06"] == 2
    # log10(1 + 1e-10) is just above the last edge (0): the always-firing latent belongs in the last bin
    histogram = torch.histogram(torch.log10(frequency + 1e-10).clamp(max=0), bins=DENSITY_BIN_EDGES).hist
    assert result["log10_density_histogram"]["counts"] == histogram.long().tolist()
    assert result["log10_density_histogram"]["counts"][0] == 2  # the dead latents sit at log10(1e-10) = -10
    assert result["log10_density_histogram"]["counts"][-1] >= 1
    assert sum(result["log10_density_histogram"]["counts"]) == 20


def test_sparsity_counts_nonzero_not_positive_and_skips_stored_zeros():
    # 3 tokens, k = 2 entries each (AbsTopK-like: signed), one stored entry holding an exact zero
    layout = SparseLayout.fixed_k(torch.tensor([[0, 1], [1, 2], [0, 3]]), n_latents=5)
    code = SparseCode(layout, torch.tensor([-1.0, 2.0, -0.5, 0.0, 3.0, -2.0]))
    stats = SparsityStats(5)
    stats.update(code)
    result = stats.result()
    assert result["l0"] == pytest.approx(5 / 3)
    assert result["firing_frequency"].tolist() == pytest.approx([2 / 3, 2 / 3, 0, 1 / 3, 0])
    assert result["dead"] == 2  # latent 2 was only a stored zero
    assert result["below_1e-05"] == 2 and result["dense"] == 3


def _losses(seed=0):
    g = torch.Generator().manual_seed(seed)
    terms = {name: torch.rand(6, 9, generator=g, dtype=torch.float64) for name in ("clean", "sae", "zero", "mean")}
    terms["sae"] += 0.5
    terms["zero"] += 3.0
    terms["mean"] += 1.0
    kl = {
        name: torch.rand(6, 9, generator=g, dtype=torch.float64) * scale
        for name, scale in (("sae", 0.2), ("zero", 2.0), ("mean", 1.0))
    }
    mask = torch.rand(6, 9, generator=g) < 0.7
    return terms, kl, mask


@pytest.mark.parametrize("sizes", [[6], [1] * 6, [4, 2]])
def test_downstream_streaming_equals_one_shot(sizes):
    ce, kl, mask = _losses()
    stats = DownstreamStats()
    for rows in _chunks(6, sizes):
        stats.update(
            ce["clean"][rows],
            ce["sae"][rows],
            ce["zero"][rows],
            ce["mean"][rows],
            kl["sae"][rows],
            kl["zero"][rows],
            kl["mean"][rows],
            mask[rows],
        )
    result = stats.result()
    mean = {f"ce_{k}": float(v[mask].mean()) for k, v in ce.items()} | {
        f"kl_{k}": float(v[mask].mean()) for k, v in kl.items()
    }
    for key, value in mean.items():
        assert result[key] == pytest.approx(value, rel=1e-12), key
    assert result["n_predictions"] == int(mask.sum())
    for ablation in ("zero", "mean"):
        recovered = (mean[f"ce_{ablation}"] - mean["ce_sae"]) / (mean[f"ce_{ablation}"] - mean["ce_clean"])
        assert result[f"ce_recovered_{ablation}"] == pytest.approx(recovered, rel=1e-12)
        score = (mean[f"kl_{ablation}"] - mean["kl_sae"]) / mean[f"kl_{ablation}"]
        assert result[f"kl_score_{ablation}"] == pytest.approx(score, rel=1e-12)
    assert result["delta_lm_loss"] == pytest.approx(mean["ce_sae"] - mean["ce_clean"], rel=1e-12)


def test_downstream_known_answers():
    ce, kl, mask = _losses()
    zero = torch.zeros_like(kl["sae"])
    perfect = DownstreamStats()
    perfect.update(ce["clean"], ce["clean"], ce["zero"], ce["mean"], zero, kl["zero"], kl["mean"], mask)
    result = perfect.result()
    assert result["ce_recovered_zero"] == result["ce_recovered_mean"] == 1
    assert result["delta_lm_loss"] == 0 and result["kl_sae"] == 0 and result["kl_score_zero"] == 1
    ablated = DownstreamStats()
    ablated.update(ce["clean"], ce["zero"], ce["zero"], ce["mean"], kl["zero"], kl["zero"], zero, mask)
    result = ablated.result()
    assert result["ce_recovered_zero"] == 0 and result["kl_score_zero"] == 0
    assert result["kl_score_mean"] is None  # KL of the mean ablation is 0: the score is undefined
    assert math.isfinite(result["ce_recovered_mean"])
