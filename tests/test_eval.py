import dataclasses
import itertools
import json

import pytest
import torch
import torch.nn.functional as F
from helpers import perturb

from saelab.analysis.evaluate import (
    EvalTarget,
    eval_model_name,
    evaluate,
    evaluate_targets,
    heldout_skip,
    hook_means,
)
from saelab.analysis.splice import run_logits, splice_keep_mask
from saelab.cli import main
from saelab.config import DataConfig, SAEConfig
from saelab.data import token_contexts
from saelab.errors import SaelabError
from saelab.sae.io import save_sae
from saelab.sae.registry import create_sae
from saelab.sae.saelens import save_saelens

RESID = "blocks.1.hook_resid_post"
HOOK_Z = "blocks.0.attn.hook_z"
DATA = DataConfig(context_length=32)


@pytest.fixture(scope="module")
def contexts(tokenizer):
    return list(itertools.islice(token_contexts(DATA, tokenizer), 10))


def numbers(section, prefix=""):
    """A result section as {dotted key: number}, nested dicts and intervals ([lo, hi]) included."""
    out = {}
    for key, value in (section or {}).items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(numbers(value, f"{name}."))
        elif isinstance(value, list) and len(value) == 2 and all(isinstance(v, float) for v in value):
            out[f"{name}.lo"], out[f"{name}.hi"] = value
        elif isinstance(value, int | float) and not isinstance(value, bool):
            out[name] = value
    return out


def small_sae(architecture="topk", hook=RESID, d_in=64, k=8, seed=1, **metadata):
    sae = create_sae(d_in, SAEConfig(architecture=architecture, d_sae=96, k=k), metadata={"hook": hook, **metadata})
    return perturb(sae, seed=seed)


def test_exact_reconstructions_give_the_known_answers(tiny_model, contexts):
    means = hook_means(tiny_model, [RESID], contexts)  # the evaluation tokens' own mean: FVU of the mean is 1
    mean = means[RESID]
    targets = [
        EvalTarget("identity", RESID, lambda x: (x, None)),
        EvalTarget("mean", RESID, lambda x: (mean.expand_as(x), None)),
        EvalTarget("zero", RESID, lambda x: (torch.zeros_like(x), None)),
    ]
    identity, mean_result, zero = evaluate_targets(
        tiny_model, targets, contexts, ablation_means=means, batch_contexts=4, outlier_norm=0
    )
    assert identity["reconstruction"]["fvu"] == 0 and identity["sparsity"] is None
    down = identity["downstream"]
    assert down["ce_recovered_zero"] == 1 and down["ce_recovered_mean"] == 1
    assert down["kl_sae"] == 0 and down["delta_lm_loss"] == 0 and down["kl_score_zero"] == 1
    assert mean_result["reconstruction"]["fvu"] == pytest.approx(1, abs=1e-5)
    assert mean_result["downstream"]["ce_recovered_mean"] == 0 and mean_result["downstream"]["kl_score_mean"] == 0
    assert zero["downstream"]["ce_recovered_zero"] == 0 and zero["downstream"]["kl_score_zero"] == 0
    assert zero["reconstruction"]["cosine"] == 0
    # every result counts the same kept positions: 10 contexts of 32, minus BOS and separators
    keep = splice_keep_mask(tiny_model, torch.stack(contexts))
    assert identity["reconstruction"]["n_tokens"] == int(keep.sum())
    assert down["n_predictions"] == int(keep[:, :-1].sum())


def test_batching_does_not_change_the_results(tiny_model, contexts):
    sae = small_sae()
    one_shot, *batched = (evaluate([sae], tiny_model, contexts, batch_contexts=b, mean_tokens=0)[0] for b in (10, 1, 3))
    for result in batched:
        for section in ("reconstruction", "downstream"):
            for key, value in numbers(one_shot[section]).items():
                assert numbers(result[section])[key] == pytest.approx(value, rel=1e-5, abs=1e-7), (section, key)
        assert result["sparsity"]["l0"] == one_shot["sparsity"]["l0"]
        assert result["sparsity"]["l0_ci"] == pytest.approx(one_shot["sparsity"]["l0_ci"], rel=1e-12)
        assert torch.equal(result["sparsity"]["firing_frequency"], one_shot["sparsity"]["firing_frequency"])


def test_saes_at_two_hooks_in_one_pass_equal_separate_passes(tiny_model, contexts):
    resid, z = small_sae(), small_sae(hook=HOOK_Z, seed=2)
    together = evaluate([resid, z], tiny_model, contexts, batch_contexts=5, mean_tokens=0)
    for sae, joint in zip((resid, z), together):
        (alone,) = evaluate([sae], tiny_model, contexts, batch_contexts=5, mean_tokens=0)
        for section in ("reconstruction", "downstream"):
            assert numbers(joint[section]) == pytest.approx(numbers(alone[section]), rel=1e-6), section
        assert joint["sparsity"]["l0"] == alone["sparsity"]["l0"]


def test_skip_positions_counts_and_splices_only_later_positions(tiny_model, contexts):
    """FVU over positions >= 5 equals a direct computation on those tokens; CE counts only their predictions."""
    sae = small_sae()
    (result,) = evaluate([sae], tiny_model, contexts, mean_tokens=0, skip_positions=5)
    tokens = torch.stack(contexts)
    keep = splice_keep_mask(tiny_model, tokens)
    keep[:, :5] = False
    _, acts = run_logits(tiny_model, tokens, RESID, capture=True)
    x = acts[keep].double()
    with torch.no_grad():
        x_hat = sae(x.float()).double()
    fvu = (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    assert result["reconstruction"]["all_tokens"]["n_tokens"] == int(keep.sum())
    assert result["reconstruction"]["all_tokens"]["fvu"] == pytest.approx(float(fvu), rel=1e-5)
    assert result["downstream"]["n_predictions"] == int(keep[:, :-1].sum())


def test_headline_reconstruction_leaves_out_tokens_above_the_norm_threshold(tiny_model, contexts):
    """The documented rule by hand: ||x|| > outlier_norm x the median norm of the first 2048 counted tokens (stream
    order) is an outlier; the headline FVU is the FVU of the rest, all_tokens that of every token."""
    sae = small_sae()
    tokens = torch.stack(contexts)
    keep = splice_keep_mask(tiny_model, tokens)
    _, acts = run_logits(tiny_model, tokens, RESID, capture=True)
    x = acts[keep].double()
    norms = x.norm(dim=1)
    median = norms[:2048].median()
    factor = float(torch.quantile(norms, 0.95) / median)  # this random model has no massive tokens: the top 5%
    (result,) = evaluate([sae], tiny_model, contexts, batch_contexts=3, mean_tokens=0, outlier_norm=factor)
    with torch.no_grad():
        x_hat = sae(x.float()).double()
    inlier = norms <= factor * median
    rest, rest_hat = x[inlier], x_hat[inlier]
    fvu = (rest - rest_hat).pow(2).sum() / (rest - rest.mean(0)).pow(2).sum()
    reconstruction = result["reconstruction"]
    assert 0 < reconstruction["outliers"]["n_tokens"] == int((~inlier).sum())
    assert reconstruction["n_tokens"] == int(inlier.sum()) and reconstruction["all_tokens"]["n_tokens"] == len(x)
    assert reconstruction["outlier_rule"]["median_norm"] == pytest.approx(float(median), rel=1e-6)
    assert reconstruction["fvu"] == pytest.approx(float(fvu), rel=1e-5)
    assert reconstruction["mse"] == pytest.approx(float((rest - rest_hat).pow(2).mean()), rel=1e-5)
    # L0 and the downstream metrics still count every token
    assert result["sparsity"]["n_tokens"] == len(x) and result["downstream"]["n_predictions"] == int(keep[:, :-1].sum())


def test_every_headline_metric_has_an_interval_around_it(tiny_model, contexts):
    (result,) = evaluate([small_sae()], tiny_model, contexts, batch_contexts=4, mean_tokens=0, bootstrap_resamples=200)
    headline = [("reconstruction", k) for k in ("fvu", "mse", "cosine")] + [("sparsity", "l0")]
    headline += [("downstream", k) for k in ("ce_recovered_zero", "ce_recovered_mean", "delta_lm_loss", "kl_sae")]
    for section, key in headline:
        lo, hi = result[section][f"{key}_ci"]
        assert lo <= result[section][key] <= hi, (section, key)
        assert lo < hi or key == "l0", (section, key)  # TopK: L0 is k in every context
    (plain,) = evaluate([small_sae()], tiny_model, contexts, downstream=False, bootstrap_resamples=0)
    assert "fvu_ci" not in plain["reconstruction"] and "l0_ci" not in plain["sparsity"]


def test_abstopk_l0_counts_negative_codes(tiny_model, contexts):
    sae = small_sae("abstopk", k=6)
    x = torch.randn(50, 64)
    assert (sae.encode(x) < 0).any()  # the signed code: "> 0" would undercount
    (result,) = evaluate([sae], tiny_model, contexts, downstream=False)
    assert result["sparsity"]["l0"] == 6
    assert result["downstream"] is None and result["mean_ablation"] is None


def test_hook_z_spliced_ce_matches_a_manual_splice(tiny_model, contexts):
    sae = small_sae(hook=HOOK_Z)
    (result,) = evaluate([sae], tiny_model, contexts, batch_contexts=4, mean_tokens=64)
    tokens = torch.stack(contexts)
    keep = splice_keep_mask(tiny_model, tokens)

    def splice(z, hook):  # z [batch, pos, n_heads, d_head]
        flat = z.reshape(*z.shape[:2], -1).clone()
        flat[keep] = sae(flat[keep])
        return flat.reshape(z.shape)

    with torch.no_grad():
        logits = tiny_model.run_with_hooks(tokens, fwd_hooks=[(HOOK_Z, splice)], return_type="logits")
    losses = F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten(), reduction="none")
    expected = losses[keep[:, :-1].flatten()].mean()
    assert result["downstream"]["ce_sae"] == pytest.approx(float(expected), rel=1e-5)
    assert result["hook"] == HOOK_Z and result["d_in"] == 64


def test_heldout_skip():
    trained = {"data": dataclasses.asdict(DATA), "train_contexts": 40}
    assert heldout_skip([trained], DATA, -1) == (40, None)
    assert heldout_skip([trained, {**trained, "train_contexts": 70}], DATA, -1) == (70, None)
    assert heldout_skip([trained], DATA, 5) == (5, None)  # given explicitly: used as is
    skip, note = heldout_skip([trained], dataclasses.replace(DATA, seed=1), -1)  # other text order: unknown overlap
    assert skip == 0 and "1 of 1 SAE(s) record no training contexts" in note
    skip, note = heldout_skip([trained, {"hook": RESID}], DATA, -1)
    assert skip == 40 and "1 of 2" in note
    assert heldout_skip([{"data": dataclasses.asdict(DATA), "train_contexts": None}], DATA, -1)[0] == 0  # live run


def test_model_comes_from_the_saes_unless_given():
    saes = [small_sae(model="tiny-native"), small_sae(model="tiny-native"), small_sae()]
    assert eval_model_name(saes, ["a", "b", "c"], "") == ("tiny-native", None)
    name, note = eval_model_name(saes, ["a", "b", "c"], "smollm2-135m")
    assert name == "smollm2-135m" and "record model 'tiny-native'" in note
    with pytest.raises(SaelabError, match="different models"):
        eval_model_name([saes[0], small_sae(model="smollm2-135m")], ["a", "b"], "")
    with pytest.raises(SaelabError, match="pass it with --model"):
        eval_model_name([small_sae()], ["a"], "")


def test_clear_errors(tiny_model, contexts):
    with pytest.raises(SaelabError, match="has d_in 32, but blocks.1.hook_resid_post of this model is 64 wide"):
        evaluate([small_sae(d_in=32)], tiny_model, contexts)
    with pytest.raises(SaelabError, match="reads hook 'blocks.7.hook_resid_post', which the model lacks"):
        evaluate([small_sae(hook="blocks.7.hook_resid_post")], tiny_model, contexts)
    with pytest.raises(SaelabError, match="does not record the hook"):
        evaluate([create_sae(64, SAEConfig(d_sae=96, k=8))], tiny_model, contexts)
    broken = small_sae()
    with torch.no_grad():
        broken.W_dec[3, 5] = float("nan")
    with pytest.raises(SaelabError, match="SAE 0 produced non-finite reconstructions"):
        evaluate([broken], tiny_model, contexts, downstream=False)


CLI = ["eval", "--context-length", "32", "--n-tokens", "256", "--batch-contexts", "4", "--mean-tokens", "128"]


def test_cli_writes_json_per_sae_and_skips_training_text(tmp_path, capsys):
    trained = {"model": "tiny-native", "data": dataclasses.asdict(DATA), "train_contexts": 3}
    folder = save_sae(small_sae(**trained), tmp_path / "topk")
    assert main([*CLI, "--sae", str(folder), "--quiet"]) == 0  # the model comes from the SAE's metadata
    printed = capsys.readouterr().out
    assert "CE rec mean" in printed and "\ntopk " in printed
    result = json.loads((folder / "eval.json").read_text())
    assert result["skip_contexts"] == 3 and result["n_tokens"] == 256 and result["model"] == "tiny-native"
    assert result["architecture"] == "topk" and result["d_sae"] == 96 and result["format"] == "saelab"
    assert result["conventions"]["fvu"].startswith("global")
    assert set(result["sparsity"]["firing_frequency"]) == {"median", "p90", "p99", "max"}
    assert 0 < result["reconstruction"]["fvu"] and result["downstream"]["ce_clean"] > 0
    assert len(result["reconstruction"]["fvu_ci"]) == 2 and len(result["downstream"]["ce_recovered_mean_ci"]) == 2
    assert result["reconstruction"]["all_tokens"]["n_tokens"] >= result["reconstruction"]["n_tokens"]
    assert result["outlier_norm"] == 3.0 and result["bootstrap"]["resamples"] == 1000
    assert "±" in printed and "bootstrap interval" in printed


def test_saelens_folder_evaluates_like_the_saelab_folder(tmp_path, capsys):
    sae = small_sae(model="tiny-native")
    saelab_folder = save_sae(sae, tmp_path / "saelab")
    saelens_folder = save_saelens(sae, tmp_path / "saelens")
    out = tmp_path / "both.json"
    argv = [*CLI, "--model", "tiny-native", "--sae", str(saelab_folder), str(saelens_folder), "--out", str(out)]
    assert main([*argv, "--quiet"]) == 0
    saelab_result, saelens_result = json.loads(out.read_text())["evaluations"]
    assert saelens_result["format"] == "saelens" and saelab_result["format"] == "saelab"
    for section in ("reconstruction", "sparsity", "downstream"):
        for key, value in saelab_result[section].items():
            if isinstance(value, float):
                assert saelens_result[section][key] == pytest.approx(value, rel=1e-4, abs=1e-6), (section, key)
    assert saelens_result["sparsity"]["log10_density_histogram"] == saelab_result["sparsity"]["log10_density_histogram"]
    assert "record no training contexts" in capsys.readouterr().err


def test_table_shows_dead_and_dense_counts_that_a_fraction_would_round_to_zero():
    from saelab.analysis.evaluate import format_table, latent_share

    assert [latent_share(*case) for case in ((0, 0.0), (3, 3 / 9216), (1, 1 / 131072), (200, 200 / 9216))] == [
        "0", "3 (0.033%)", "1 (0.00076%)", "200 (2.2%)"
    ]  # fmt: skip
    sparsity = {"l0": 32.0, "dead": 0, "dead_fraction": 0.0, "dense": 3, "dense_fraction": 3 / 9216,
                "dense_threshold": 0.1}  # fmt: skip
    results = [{"sae": "runs/sae/a", "reconstruction": {"fvu": 0.25}, "sparsity": sparsity, "downstream": None}]
    header, _, row, note = format_table(results).split("\n")
    assert header.split()[6:8] == ["dead", "dense"] and "dense f>0.1" in header
    assert row.split()[6:9] == ["0", "3", "(0.033%)"]
    assert note.startswith("dead: latents that never fired on the evaluated tokens; dense f>0.1: latents whose")
    results.append({**results[0], "sae": "b", "sparsity": {**sparsity, "dense_threshold": 0.2}})
    assert "dense f>threshold" in format_table(results)  # mixed thresholds are not given one number
