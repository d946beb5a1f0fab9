import json

import pytest
import torch
from helpers import perturb
from safetensors.torch import load_file

from saelab.activations.cache import build_cache
from saelab.analysis.cached_tokens import split_tokens
from saelab.analysis.darkmatter import NORM_TARGETS, decompose, shared_failures, split_error
from saelab.analysis.darkmatter_report import write_darkmatter_report
from saelab.analysis.lstsq import ColumnMoments, HeldOutR2, NormalEquations
from saelab.analysis.report import Section, format_value, write_report
from saelab.cli import main
from saelab.commands.darkmatter import sae_names
from saelab.config import SAEConfig
from saelab.sae.io import save_sae
from saelab.sae.registry import create_sae

HOOK = "blocks.1.hook_resid_post"


def chunks(t: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    return list(torch.split(t, sizes))


def gaussian(n: int, d: int, seed: int) -> torch.Tensor:
    """Correlated, off-centre Gaussian rows [n, d] in float64 (a mean, like residual streams, and no isotropy)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g, dtype=torch.float64)
    return torch.randn(n, d, generator=g, dtype=torch.float64) @ mix + 3 * torch.randn(
        d, generator=g, dtype=torch.float64
    )


def fit_and_evaluate(x_fit, e_fit, x_eval, e_eval, batch=300):
    fit = NormalEquations(x_fit.shape[1], e_fit.shape[1])
    for xb, eb in zip(x_fit.split(batch), e_fit.split(batch), strict=True):
        fit.update(xb, eb)
    W = fit.solve()
    held_out = HeldOutR2(e_eval.shape[1])
    for xb, eb in zip(x_eval.split(batch), e_eval.split(batch), strict=True):
        held_out.update(eb, xb @ W)
    return W, fit.r2(W), held_out.result()


def test_an_error_linear_in_x_is_fully_predictable_on_held_out_tokens():
    x = gaussian(3000, 12, seed=0)
    A = torch.randn(12, 12, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    W, train, held_out = fit_and_evaluate(x[:2000], x[:2000] @ A, x[2000:], x[2000:] @ A)
    torch.testing.assert_close(W, A, rtol=1e-9, atol=1e-9)
    assert held_out.pooled == pytest.approx(1, abs=1e-10) and held_out.mean_per_dim == pytest.approx(1, abs=1e-10)
    assert torch.allclose(held_out.per_dim, torch.ones(12, dtype=torch.float64), atol=1e-10)
    assert train.pooled == pytest.approx(1, abs=1e-10)


def test_independent_noise_is_not_predictable_and_held_out_r2_is_at_most_train_r2():
    x = gaussian(8000, 10, seed=2)
    noise = torch.randn(8000, 10, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    _, train, held_out = fit_and_evaluate(x[:4000], noise[:4000], x[4000:], noise[4000:])
    assert abs(held_out.pooled) < 0.01 and held_out.per_dim.abs().max() < 0.01  # ~ p / N = 0.0025
    assert held_out.pooled <= train.pooled and held_out.mean_per_dim <= train.mean_per_dim
    assert (held_out.per_dim <= train.per_dim).all()


def test_chunked_normal_equations_equal_a_direct_lstsq_on_the_concatenated_data():
    g = torch.Generator().manual_seed(4)
    X = gaussian(1000, 9, seed=5)
    Y = X @ torch.randn(9, 4, generator=g, dtype=torch.float64) + torch.randn(1000, 4, generator=g, dtype=torch.float64)
    fit = NormalEquations(9, 4)
    for xb, yb in zip(chunks(X, [1, 400, 99, 500]), chunks(Y, [1, 400, 99, 500]), strict=True):
        fit.update(xb, yb)
    direct = torch.linalg.lstsq(X, Y).solution
    torch.testing.assert_close(fit.solve(), direct, rtol=1e-10, atol=1e-10)
    # the in-sample R^2 from the accumulated sums equals the one from the residuals
    residual = Y - X @ direct
    expected = 1 - residual.square().sum(0) / (Y - Y.mean(0)).square().sum(0)
    torch.testing.assert_close(fit.r2(direct).per_dim, expected, rtol=1e-9, atol=1e-9)
    assert fit.n == 1000 and fit.rank() == 9


def test_a_rank_deficient_fit_gives_the_minimum_norm_solution():
    x = gaussian(500, 5, seed=6)
    X = torch.cat([x, x[:, :1], torch.zeros(500, 1, dtype=torch.float64)], dim=1)  # a repeated and a zero column
    Y = x @ torch.randn(5, 3, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    fit = NormalEquations(7, 3)
    fit.update(X, Y)
    torch.testing.assert_close(fit.solve(), torch.linalg.pinv(X) @ Y, rtol=1e-8, atol=1e-8)
    assert fit.rank() == 5 and fit.condition_number() == float("inf")


def test_streaming_r2_and_moments_do_not_depend_on_the_batch_size():
    Y = gaussian(777, 6, seed=8) * 1e3 + 1e5  # a large mean: sum(y^2) - n mean^2 would lose digits
    prediction = Y + torch.randn(777, 6, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    results = []
    for sizes in ([777], [100] * 7 + [77], [1, 2, 774]):
        held_out, moments = HeldOutR2(6), ColumnMoments(6)
        for yb, pb in zip(chunks(Y, sizes), chunks(prediction, sizes), strict=True):
            held_out.update(yb, pb)
            moments.update(yb)
        results.append(held_out.result())
        torch.testing.assert_close(moments.m2, (Y - Y.mean(0)).square().sum(0), rtol=1e-12, atol=0)
    expected = 1 - (Y - prediction).square().sum(0) / (Y - Y.mean(0)).square().sum(0)
    for r in results:
        torch.testing.assert_close(r.per_dim, expected, rtol=1e-10, atol=1e-12)
        assert r.pooled == pytest.approx(results[0].pooled, rel=1e-12)
        assert r.mean_per_dim == pytest.approx(float(expected.mean()), rel=1e-10)


def test_the_three_parts_sum_to_x():
    x = gaussian(200, 8, seed=10)
    x_hat = x + torch.randn(200, 8, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    W = torch.randn(9, 8, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    for intercept, weights in ((False, W[:8]), (True, W)):
        linear, nonlinear = split_error(x, x_hat, weights, intercept)
        torch.testing.assert_close(x_hat + linear + nonlinear, x, rtol=0, atol=1e-12)
        expected_linear = x @ W[:8] + (W[8] if intercept else 0)
        torch.testing.assert_close(linear, expected_linear, rtol=1e-12, atol=1e-12)


def tiny_sae(d_in=16, seed=1, k=4, hook=HOOK):
    return perturb(create_sae(d_in, SAEConfig(architecture="topk", d_sae=48, k=k), metadata={"hook": hook}), seed)


def test_decompose_matches_a_direct_computation_on_the_concatenated_tokens():
    saes = {"a": tiny_sae(seed=1), "b": tiny_sae(seed=2, k=8)}
    x = gaussian(3000, 16, seed=13).float()
    fit, held = x[:2000], x[2000:]
    result = decompose(saes, chunks(fit, [700, 700, 600]), chunks(held, [500, 500]))
    again = decompose(saes, chunks(fit, [2000]), chunks(held, [64] * 15 + [40]))
    assert (result.fit_tokens, result.eval_tokens, result.d_in, result.rank) == (2000, 1000, 16, 16)
    x_fit, x_held = fit.double(), held.double()
    total_variance = float((x_held - x_held.mean(0)).square().sum())
    for s, s_again in zip(result.saes, again.saes, strict=True):
        sae = saes[s.name]
        with torch.no_grad():
            e_fit, e_held = x_fit - sae(fit).double(), x_held - sae(held).double()
        W = torch.linalg.lstsq(x_fit, e_fit).solution
        torch.testing.assert_close(s.weights, W, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(s_again.weights, s.weights, rtol=1e-6, atol=1e-6)  # batch-size independent
        residual = e_held - x_held @ W
        r2 = 1 - residual.square().sum(0) / (e_held - e_held.mean(0)).square().sum(0)
        torch.testing.assert_close(s.error_r2.per_dim, r2, rtol=1e-5, atol=1e-5)
        assert s.error_r2.pooled == pytest.approx(
            1 - float(residual.square().sum()) / float((e_held - e_held.mean(0)).square().sum()), abs=1e-5
        )
        assert s.error_r2.pooled <= s.error_r2_fit.pooled
        assert s.fvu == pytest.approx(float(e_held.square().sum()) / total_variance, rel=1e-6)
        assert s.nonlinear_fvu == pytest.approx(float(residual.square().sum()) / total_variance, rel=1e-5)
        assert s.l0 == pytest.approx(sae.cfg.k)
        torch.testing.assert_close(s.error_norm, e_held.norm(dim=1).float())
        # the ||e||^2 regression: a no-intercept least-squares fit on the fit tokens, judged on held-out ones
        b = torch.linalg.lstsq(x_fit, e_fit.square().sum(1, keepdim=True)).solution
        target = e_held.square().sum(1)
        predicted = (x_held @ b).squeeze(1)
        r2_norm = 1 - float((target - predicted).square().sum()) / float((target - target.mean()).square().sum())
        assert s.norm_r2["error"] == pytest.approx(r2_norm, abs=1e-5)
        torch.testing.assert_close(s.predicted_error_sq, predicted.float(), rtol=1e-4, atol=1e-4)
        # ||eps_NL||^2 regression uses W* from the first pass
        nonlinear_fit = (e_fit - x_fit @ W).square().sum(1, keepdim=True)
        b_nl = torch.linalg.lstsq(x_fit, nonlinear_fit).solution
        torch.testing.assert_close(s.norm_weights[:, 3:], b_nl, rtol=1e-4, atol=1e-6)
        assert set(s.norm_r2) == set(NORM_TARGETS)
        assert s.norm_r2["input"] == pytest.approx(again.saes[0].norm_r2["input"], abs=1e-9)  # x alone: shared


def test_sae_names_are_short_and_unique():
    assert sae_names(["r/sae1", "r/sae2"]) == ["sae1", "sae2"]
    assert sae_names(["a/saes/h__k=1", "a/lr/h__k=1", "a/lr/h__k=2"]) == ["saes/k=1", "lr/k=1", "lr/k=2"]
    assert sae_names(["a/s", "b/a/s"]) == ["a/s", "b/a/s"]


def test_shared_failures_of_identical_and_reversed_error_norms():
    norms = torch.rand(3, 1000, generator=torch.Generator().manual_seed(14))
    norms[1] = norms[0] * 2 + 1  # same ranking
    norms[2] = -norms[0]  # opposite ranking
    agreement = shared_failures(norms, top_fraction=0.01)
    assert agreement["pearson"][0, 1] == pytest.approx(1) and agreement["spearman"][0, 2] == pytest.approx(-1)
    assert agreement["top_overlap"][0, 1] == 1 and agreement["top_overlap"][0, 2] == 0
    torch.testing.assert_close(agreement["top_overlap"].diagonal(), torch.ones(3, dtype=torch.float64))


def test_report_is_one_self_contained_escaped_file(tmp_path):
    import plotly.graph_objects as go

    figures = [go.Figure(go.Bar(x=["a"], y=[1])), go.Figure(go.Bar(x=["b"], y=[2]))]
    path = write_report(
        tmp_path / "r.html",
        "T <script>",
        [
            Section("<b>head</b>", "line & more\n\nsecond", [{"name": "<x>", "value": 0.123456, "n": 7}], figures),
        ],
    )
    page = path.read_text()
    assert "&lt;b&gt;head&lt;/b&gt;" in page and "T &lt;script&gt;" in page and "&lt;x&gt;" in page
    assert "line &amp; more" in page and "0.1235" in page and ">7<" in page
    assert page.count("plotly.js v") == 1 and "<script src=" not in page  # the library once, no CDN
    assert format_value(float("nan")) == "\u2013" and format_value(None) == "\u2013"


def test_darkmatter_report_holds_the_numbers(tmp_path):
    saes = {"a": tiny_sae(seed=1), "b": tiny_sae(seed=2)}
    x = gaussian(600, 16, seed=15).float()
    result = decompose(saes, [x[:400]], [x[400:]])
    page = write_darkmatter_report(result, tmp_path / "dm.html").read_text()
    for s in result.saes:
        for value in (s.fvu, s.nonlinear_fvu, s.error_r2.pooled, s.error_r2.mean_per_dim, s.norm_r2["error"]):
            assert format_value(value) in page
    assert "Do the SAEs fail on the same tokens?" in page


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory, cache_config, tiny_model):
    config = cache_config(tmp_path_factory.mktemp("dm") / "cache", hooks=[HOOK], n_tokens=32 * 40)
    return build_cache(config, model=tiny_model, progress=False)


def test_held_out_tokens_come_from_later_contexts_and_skip_early_positions(tiny_cache):
    fit, held_out, notes = split_tokens(tiny_cache, None, 500, 300, skip_positions=4)
    assert (len(fit), len(held_out), notes) == (500, 300, [])
    fit_info, held_info = tiny_cache.read(fit, hooks=[]), tiny_cache.read(held_out, hooks=[])
    assert int(fit_info.context.max()) < int(held_info.context.min())
    assert int(fit_info.position.min()) >= 4 and int(held_info.position.min()) >= 4
    # with an explicit held-out cache, both sets are capped by what their caches hold
    fit, held_out, notes = split_tokens(tiny_cache, tiny_cache, 10**6, 100, skip_positions=4)
    assert len(fit) == int((tiny_cache.read(torch.arange(tiny_cache.n_tokens), hooks=[]).position >= 4).sum())
    assert len(held_out) == 100 and len(notes) == 1 and "fit tokens instead of 1,000,000" in notes[0]


def test_cli_end_to_end_on_a_tiny_cache(tmp_path, tiny_cache, capsys):
    d_model = tiny_cache.d(HOOK)
    folders = [str(save_sae(tiny_sae(d_model, seed=s), tmp_path / f"sae{s}")) for s in (1, 2)]
    out = tmp_path / "out"
    argv = [
        "darkmatter",
        "--sae",
        *folders,
        "--cache",
        str(tiny_cache.path),
        "--fit-tokens",
        "600",
        "--eval-tokens",
        "400",
        "--skip-positions",
        "4",
        "--batch-tokens",
        "256",
        "--downstream",
        "--downstream-tokens",
        "256",
        "--out",
        str(out),
        "--quiet",
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "SAE sae1" in printed and "darkmatter.html" in printed and "downstream CE" in printed
    numbers = json.loads((out / "darkmatter.json").read_text())
    assert (numbers["fit_tokens"], numbers["eval_tokens"], numbers["hook"]) == (600, 400, HOOK)
    assert set(numbers["saes"]) == {"sae1", "sae2"} and len(numbers["shared_failures"]["pearson"]) == 2
    sae = numbers["saes"]["sae1"]
    assert len(sae["error_r2"]["held_out"]["per_dim"]) == d_model and set(sae["norm_r2"]["held_out"]) == set(
        NORM_TARGETS
    )
    ce = numbers["downstream"]
    assert ce["input"] == pytest.approx(ce["clean"], abs=1e-5)  # splicing x back changes nothing
    assert set(sae["downstream_ce"]) == {
        "reconstruction",
        "reconstruction_plus_linear_error",
        "reconstruction_plus_nonlinear_error",
    }
    maps = load_file(str(out / "linear_maps.safetensors"))
    assert maps["sae1"].shape == (d_model, d_model) and maps["sae1"].dtype == torch.float64
    page = (out / "darkmatter.html").read_text()
    assert format_value(sae["nonlinear_fvu"]) in page and "Downstream cross-entropy" in page

    assert main([*argv[:-3], "--fit-tokens", "1000", "--out", str(out), "--quiet"]) == 2
    assert "too few tokens at positions >= 4" in capsys.readouterr().err
    wrong_hook = str(save_sae(tiny_sae(d_model, hook="blocks.0.hook_resid_post"), tmp_path / "other"))
    assert main(["darkmatter", "--sae", wrong_hook, "--cache", str(tiny_cache.path), "--quiet"]) == 2
    assert "has no hook 'blocks.0.hook_resid_post'" in capsys.readouterr().err
    wrong_width = str(save_sae(tiny_sae(8), tmp_path / "narrow"))
    assert main(["darkmatter", "--sae", wrong_width, "--cache", str(tiny_cache.path), "--quiet"]) == 2
    assert "has width 64, not 8" in capsys.readouterr().err
