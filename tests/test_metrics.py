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


# -- outliers and bootstrap intervals ----------------------------------------------------------------------------


def _plant_outliers(x, ratios, reference_tokens, later=()):
    """x with tokens scaled to ratios x the median norm of its first `reference_tokens` tokens: first the tokens of
    `later` (past the reference), then tokens of the reference above its median, so the median stays put.
    Returns (x, the planted rows, the median)."""
    norms = x.norm(dim=1)
    median = norms[:reference_tokens].median()
    above = torch.nonzero(norms[:reference_tokens] > median)[:, 0]
    rows = [*later, *above[: len(ratios) - len(later)].tolist()]
    x = x.clone()
    for row, ratio in zip(rows, ratios):
        x[row] *= ratio * median / norms[row]
    return x, rows, float(median)


def _fvu(x, x_hat):
    return float((x - x_hat).square().sum() / (x - x.mean(0)).square().sum())


@pytest.mark.parametrize("sizes", BATCHINGS)
def test_outlier_rule_leaves_out_planted_massive_tokens(sizes):
    x, x_hat = _activations()
    ratios = [30.0, 3.2, 60.0, 8.0, 150.0, 2.95, 2.9]  # the last two just under 3x: they stay in
    x, rows, median = _plant_outliers(x, ratios, reference_tokens=200, later=[300, 499])
    planted = rows[:5]
    x_hat = x_hat.clone()
    x_hat[rows] = 0.9 * x[rows]
    stats = ReconstructionStats(outlier_norm=3.0, reference_tokens=200)
    for chunk in _chunks(len(x), sizes):
        stats.update(x[chunk], x_hat[chunk])
    result = stats.result()
    inlier = torch.ones(len(x), dtype=torch.bool)
    inlier[planted] = False
    assert result["outlier_rule"]["median_norm"] == pytest.approx(median, rel=1e-12)
    assert result["outlier_rule"]["norm_threshold"] == pytest.approx(3 * median, rel=1e-12)
    assert result["n_tokens"] == 495 and result["outliers"]["n_tokens"] == 5 and result["outliers"]["fraction"] == 0.01
    assert result["fvu"] == pytest.approx(_fvu(x[inlier], x_hat[inlier]), rel=1e-12)
    assert result["mse"] == pytest.approx(float((x - x_hat)[inlier].square().mean()), rel=1e-12)
    assert result["cosine"] == pytest.approx(float(F.cosine_similarity(x, x_hat, dim=1)[inlier].mean()), rel=1e-12)
    assert result["outliers"]["mse"] == pytest.approx(float((x - x_hat)[~inlier].square().mean()), rel=1e-12)
    assert result["outliers"]["max_norm_ratio"] == pytest.approx(150.0, rel=1e-9)
    assert result["all_tokens"]["n_tokens"] == 500
    assert result["all_tokens"]["fvu"] == pytest.approx(_fvu(x, x_hat), rel=1e-12)
    # the planted tokens hold most of the variance: with them FVU is a different number
    assert result["all_tokens"]["fvu"] < 0.2 * result["fvu"]


def test_outlier_rule_off_and_short_streams():
    x, x_hat = _activations()
    x, _, median = _plant_outliers(x, [100.0], reference_tokens=500)
    off = ReconstructionStats().result()
    assert off == {"n_tokens": 0}
    stats = ReconstructionStats(outlier_norm=0.0)
    stats.update(x, x_hat)
    result = stats.result()
    assert result["n_tokens"] == 500 and result["outliers"]["n_tokens"] == 0
    assert result["fvu"] == result["all_tokens"]["fvu"] == pytest.approx(_fvu(x, x_hat), rel=1e-12)
    short = ReconstructionStats(outlier_norm=3.0, reference_tokens=4096)  # fewer tokens than the reference: all
    short.update(x, x_hat)
    result = short.result()
    assert result["outliers"]["n_tokens"] == 1 and result["outlier_rule"]["reference_tokens"] == 500
    assert result["outlier_rule"]["median_norm"] == pytest.approx(median, rel=1e-12)


def _context_data(n_contexts, tokens_per_context=10, seed=0):
    """Reconstruction, sparsity and downstream data of n_contexts contexts with context-level effects."""
    g = torch.Generator().manual_seed(seed)
    n = n_contexts * tokens_per_context
    context = torch.arange(n) // tokens_per_context
    shift = torch.randn(n_contexts, 12, generator=g, dtype=torch.float64)[context]  # a topic per context
    x = 5.0 + shift + torch.randn(n, 12, generator=g, dtype=torch.float64)
    x_hat = 0.8 * x + (0.2 + 0.3 * torch.rand(n_contexts, 1, generator=g, dtype=torch.float64)[context]) * torch.randn(
        n, 12, generator=g, dtype=torch.float64
    )
    code = torch.randn(n, 30, generator=g, dtype=torch.float64)
    code[torch.rand(n, 30, generator=g) < 0.8] = 0
    return context, x, x_hat, code


def _reference_intervals(n_contexts, metric, resamples, seed):
    """Brute force: resample the contexts as documented, recompute `metric(contexts)` from scratch each time."""
    drawn = torch.randint(n_contexts, (resamples, n_contexts), generator=torch.Generator().manual_seed(seed))
    values = torch.tensor([metric(row) for row in drawn], dtype=torch.float64)
    return torch.quantile(values, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()


def test_reconstruction_and_l0_intervals_equal_a_brute_force_bootstrap():
    context, x, x_hat, code = _context_data(30)
    stats, sparsity = ReconstructionStats(), SparsityStats(30)
    for rows in _chunks(len(x), [37, 100, 0, 163]):  # contexts split across updates
        stats.update(x[rows], x_hat[rows], context[rows])
        sparsity.update(SparseCode.from_dense(code[rows]), context[rows])
    result, l0 = stats.result(resamples=200, seed=3), sparsity.result(resamples=200, seed=3)

    def rows_of(drawn):
        return torch.cat([torch.nonzero(context == c)[:, 0] for c in drawn.tolist()])

    def fvu(drawn):
        rows = rows_of(drawn)
        return _fvu(x[rows], x_hat[rows])

    def cosine(drawn):
        rows = rows_of(drawn)
        return float(F.cosine_similarity(x[rows], x_hat[rows], dim=1).mean())

    def l0_of(drawn):
        return float((code[rows_of(drawn)] != 0).sum(1).double().mean())

    assert result["fvu_ci"] == pytest.approx(_reference_intervals(30, fvu, 200, 3), rel=1e-9)
    assert result["cosine_ci"] == pytest.approx(_reference_intervals(30, cosine, 200, 3), rel=1e-9)
    assert l0["l0_ci"] == pytest.approx(_reference_intervals(30, l0_of, 200, 3), rel=1e-9)
    assert result["all_tokens"]["fvu_ci"] == result["fvu_ci"]  # no outlier rule: the same tokens


def test_downstream_intervals_equal_a_brute_force_bootstrap():
    ce, kl, mask = _losses()
    stats = DownstreamStats()
    for rows in _chunks(6, [4, 2]):
        stats.update(*(ce[k][rows] for k in ("clean", "sae", "zero", "mean")), *(kl[k][rows] for k in kl), mask[rows])
    result = stats.result(resamples=300, seed=1)

    def mean(term, drawn):
        return float(term[drawn][mask[drawn]].mean())

    def recovered(drawn):
        zero, sae, clean = (mean(ce[k], drawn) for k in ("zero", "sae", "clean"))
        return (zero - sae) / (zero - clean)

    def delta(drawn):
        return mean(ce["sae"], drawn) - mean(ce["clean"], drawn)

    assert result["ce_recovered_zero_ci"] == pytest.approx(_reference_intervals(6, recovered, 300, 1), rel=1e-9)
    assert result["delta_lm_loss_ci"] == pytest.approx(_reference_intervals(6, delta, 300, 1), rel=1e-9)
    assert result["kl_sae_ci"] == pytest.approx(_reference_intervals(6, lambda d: mean(kl["sae"], d), 300, 1), rel=1e-9)


def _interval_results(n_contexts, seed=0, resamples=1000):
    context, x, x_hat, code = _context_data(n_contexts, seed=seed)
    stats, sparsity = ReconstructionStats(), SparsityStats(30)
    stats.update(x, x_hat, context)
    sparsity.update(SparseCode.from_dense(code), context)
    return stats.result(resamples=resamples), sparsity.result(resamples=resamples)


def test_intervals_contain_the_estimate_and_shrink_like_one_over_sqrt_n():
    small, small_l0 = _interval_results(100)
    large, large_l0 = _interval_results(1600)
    for result, key in ((small, "fvu"), (small, "mse"), (small, "cosine"), (small_l0, "l0"), (large, "fvu")):
        lo, hi = result[f"{key}_ci"]
        assert lo < result[key] < hi, key

    def width(result, key):
        return result[f"{key}_ci"][1] - result[f"{key}_ci"][0]

    for key in ("fvu", "mse", "cosine"):  # 16x the contexts: sqrt(16) = 4x narrower
        assert 3.2 < width(small, key) / width(large, key) < 5.0, key
    assert 3.2 < width(small_l0, "l0") / width(large_l0, "l0") < 5.0


def test_intervals_are_seeded_and_optional():
    context, x, x_hat, _ = _context_data(40)
    stats = ReconstructionStats()
    stats.update(x, x_hat, context)
    assert stats.result(resamples=100, seed=5)["fvu_ci"] == stats.result(resamples=100, seed=5)["fvu_ci"]
    assert stats.result(resamples=100, seed=5)["fvu_ci"] != stats.result(resamples=100, seed=6)["fvu_ci"]
    assert "fvu_ci" not in stats.result()


@pytest.mark.parametrize("sizes", [[400], [1] * 400, [33] * 12 + [4]])
def test_intervals_do_not_depend_on_the_batching(sizes):
    context, x, x_hat, _code = _context_data(40)
    x, _, _ = _plant_outliers(x, [40.0, 9.0], reference_tokens=64, later=[250])
    stats, one_shot = ReconstructionStats(3.0, reference_tokens=64), ReconstructionStats(3.0, reference_tokens=64)
    one_shot.update(x, x_hat, context)
    for rows in _chunks(len(x), sizes):
        stats.update(x[rows], x_hat[rows], context[rows])
    streamed, expected = stats.result(resamples=100), one_shot.result(resamples=100)
    assert expected["outliers"]["n_tokens"] == 2
    for section in (None, "all_tokens"):
        for key in ("fvu", "fvu_ci", "mse_ci", "cosine_ci"):
            got = (streamed if section is None else streamed[section])[key]
            want = (expected if section is None else expected[section])[key]
            assert got == pytest.approx(want, rel=1e-10), (section, key)
