import pytest
import torch

from saelab.analysis.splice import run_logits, splice_keep_mask
from saelab.config import SAEConfig
from saelab.errors import SaelabError
from saelab.models import tiny_native_model
from saelab.sae.registry import create_sae
from saelab.steering import (
    Add,
    Clamp,
    Project,
    Steering,
    feature_activations,
    generate,
    next_token_loss,
    position_mask,
    steer,
    steered_logits,
    sweep,
    top_features,
)

RESID = "blocks.1.hook_resid_pre"
HOOK_Z = "blocks.1.attn.hook_z"
PROMPT = "In the beginning God created the heaven and the earth."


def make_sae(hook=RESID, architecture="topk", input_norm="constant", d_in=64, d_sae=96, k=8, dtype=torch.float32):
    torch.manual_seed(0)
    sae = create_sae(d_in, SAEConfig(architecture=architecture, d_sae=d_sae, k=k, input_norm=input_norm),
                     metadata={"hook": hook, "model": "tiny-native"})
    with torch.no_grad():
        sae.W_enc.mul_(4.0)
        sae.b_dec.normal_(std=0.1)
        sae.b_enc.normal_(std=0.1)
        sae.W_dec.mul_(torch.rand(d_sae, 1) + 0.5)  # rows of several norms, as after folding
        sae.input_scale.fill_(0.6 if input_norm == "constant" else 1.0)
    return sae.to(dtype)


@pytest.fixture(scope="module")
def model64(tokenizer):
    return tiny_native_model(tokenizer=tokenizer, dtype=torch.float64)


def test_clamping_to_the_current_value_keeps_the_clean_logits(tiny_model):
    sae = make_sae()
    tokens = tiny_model.to_tokens([PROMPT, "Return the sum of the numbers in a list."], padding_side="right")
    clean = tiny_model(tokens, return_type="logits").float()
    features = list(range(0, 96, 7))
    for intervention in (Clamp(features, factor=1.0), Add(features, alpha=0.0), Project(features, scale=1.0)):
        steered = steered_logits(tiny_model, tokens, sae, [intervention])
        torch.testing.assert_close(steered, clean, atol=1e-4, rtol=0)
    with steer(tiny_model, sae, Clamp(features, factor=1.0)):  # the context manager too (no special-token mask)
        torch.testing.assert_close(tiny_model(tokens, return_type="logits").float(), clean, atol=1e-4, rtol=0)


@pytest.mark.parametrize("architecture,input_norm", [("topk", "constant"), ("abstopk", "constant"),
                                                     ("relu", "constant"), ("topk", "layernorm")])
def test_clamp_identity_keeps_the_error_term(architecture, input_norm):
    """h' = h + (c - a_i) d_i, checked as (SAE reconstruction with the clamped code) + (the SAE's error h - x_hat)."""
    sae = make_sae(architecture=architecture, input_norm=input_norm, dtype=torch.float64)
    h = torch.randn(40, 64, dtype=torch.float64) * 3
    features, values = [3, 17, 50], [2.5, -1.0, 0.0]  # a negative value: AbsTopK codes are signed
    code, _, stats = sae.encode_code(h)
    clamped = code.dense().clone()
    clamped[:, features] = torch.tensor(values, dtype=torch.float64)
    x_hat = sae.denormalize(sae.decode(code.dense()), stats)
    expected = sae.denormalize(sae.decode(clamped), stats) + (h - x_hat)
    torch.testing.assert_close(Clamp(features, value=values).apply(sae, h), expected, atol=1e-10, rtol=0)
    if input_norm == "constant":  # the same as the formula with raw decoder rows d_i = W_dec[i] / c
        a = code.dense()[:, features]
        formula = h + (torch.tensor(values, dtype=torch.float64) - a) @ (sae.W_dec[features] / sae.input_scale)
        torch.testing.assert_close(Clamp(features, value=values).apply(sae, h), formula, atol=1e-10, rtol=0)
    doubled = code.dense().clone()
    doubled[:, features] *= 2
    expected = sae.denormalize(sae.decode(doubled), stats) + (h - x_hat)
    torch.testing.assert_close(Clamp(features, factor=2.0).apply(sae, h), expected, atol=1e-10, rtol=0)


def test_add_and_project_formulas():
    sae = make_sae(dtype=torch.float64)
    h = torch.randn(30, 64, dtype=torch.float64)
    d = sae.W_dec / sae.input_scale
    torch.testing.assert_close(Add(4, alpha=-3.0).apply(sae, h), h - 3.0 * d[4])
    torch.testing.assert_close(Add([4, 9], alpha=[1.0, 2.0]).apply(sae, h), h + d[4] + 2 * d[9])
    removed = Project([4, 9]).apply(sae, h)
    assert (removed @ d[[4, 9]].T).abs().max() < 1e-10  # nothing left along either direction
    basis, _ = torch.linalg.qr(d[[4, 9]].T)
    component = (h @ basis) @ basis.T
    torch.testing.assert_close(removed, h - component)
    torch.testing.assert_close(Project([4, 9], scale=2.0).apply(sae, h), h + component)


def test_small_alpha_changes_the_logit_by_the_gradient(model64):
    """logit(alpha) - logit(0) ~ alpha * sum_pos d_i . dlogit/dh[pos], in float64 at alpha 1e-5."""
    sae = make_sae(dtype=torch.float64)
    tokens = model64.to_tokens(PROMPT)
    captured = {}

    def track(act, hook):
        captured["h"] = act.detach().requires_grad_(True)
        return captured["h"]

    logits = model64.run_with_hooks(tokens, fwd_hooks=[(RESID, track)], return_type="logits")
    target = int(logits[0, -1].argmax())
    logits[0, -1, target].backward()
    keep = splice_keep_mask(model64, tokens)[0]
    gradient = captured["h"].grad[0][keep]  # the positions steering touches (BOS is left alone)
    for feature in (2, 40):
        d = sae.W_dec[feature] / sae.input_scale
        predicted = float((gradient @ d).sum().detach())
        alpha = 1e-5
        with steer(model64, sae, Add(feature, alpha), keep=keep[None]):  # float64 logits (steered_logits: fp32)
            change = (model64(tokens, return_type="logits") - logits.detach())[0, -1, target]
        assert float(change.detach()) / alpha == pytest.approx(predicted, rel=1e-4, abs=1e-8)
        assert abs(predicted) > 1e-3  # a real effect, not 0 == 0


def test_positions_and_special_tokens(tiny_model):
    assert position_mask("all", 5, 2).tolist() == [True] * 5
    assert position_mask("prompt", 5, 2).tolist() == [True, True, False, False, False]
    assert position_mask("generated", 5, 2).tolist() == [False, False, True, True, True]
    assert position_mask(3, 5, None).tolist() == [False, False, False, True, True]
    assert position_mask([0, 4, 9], 5, None).tolist() == [True, False, False, False, True]
    with pytest.raises(SaelabError, match="positions"):
        position_mask("everywhere", 5, None)
    sae = make_sae()
    tokens = tiny_model.to_tokens(PROMPT)
    keep = splice_keep_mask(tiny_model, tokens)
    h = torch.randn(1, tokens.shape[1], 64)
    steering = Steering(sae, [Add(1, 5.0, positions=4)], keep=keep)
    moved = (steering.edit(h) - h).norm(dim=-1)[0]
    assert not keep[0, 0] and moved[0] == 0  # BOS is never steered
    assert (moved[1:4] == 0).all() and (moved[4:] > 0).all()
    prompt_only = Steering(sae, [Add(1, 5.0, positions="prompt")], prompt_length=3)
    assert ((prompt_only.edit(h) - h).norm(dim=-1)[0] > 0).tolist() == [i < 3 for i in range(tokens.shape[1])]


def test_hook_z_steering_reshapes_heads(tiny_model):
    sae = make_sae(hook=HOOK_Z)
    tokens = tiny_model.to_tokens(PROMPT)
    direction = (sae.W_dec[7] / sae.input_scale).view(4, 16)

    def manual(act, hook):
        act = act.clone()
        act[:, 1:] += 2.0 * direction  # every position but BOS
        return act

    expected = tiny_model.run_with_hooks(tokens, fwd_hooks=[(HOOK_Z, manual)], return_type="logits").float()
    torch.testing.assert_close(steered_logits(tiny_model, tokens, sae, [Add(7, 2.0)]), expected)
    assert (expected - tiny_model(tokens, return_type="logits")).abs().max() > 1e-3


def test_several_interventions_apply_in_order():
    sae = make_sae(dtype=torch.float64)
    h = torch.randn(1, 6, 64, dtype=torch.float64)
    both = Steering(sae, [Add(3, 4.0), Project(3)]).edit(h)
    assert (both[0] @ sae.W_dec[3]).abs().max() < 1e-10  # the projection also removes what Add put there
    reverse = Steering(sae, [Project(3), Add(3, 4.0)]).edit(h)
    torch.testing.assert_close(reverse, Project(3).apply(sae, h[0])[None] + 4.0 * sae.W_dec[3] / sae.input_scale)


def test_generate_matches_transformer_lens_greedy(tiny_model):
    ours = generate(tiny_model, PROMPT, max_new_tokens=6)[0]
    reference = tiny_model.generate(PROMPT, max_new_tokens=6, do_sample=False, use_past_kv_cache=False,
                                    stop_at_eos=False, verbose=False, return_type="tokens")
    prompt_length = tiny_model.to_tokens(PROMPT).shape[1]
    assert ours == tiny_model.tokenizer.decode(reference[0, prompt_length:], skip_special_tokens=True)
    sampled = generate(tiny_model, PROMPT, max_new_tokens=6, temperature=1.0, n=3, seed=5)
    assert sampled == generate(tiny_model, PROMPT, max_new_tokens=6, temperature=1.0, n=3, seed=5)
    assert len(set(sampled)) > 1  # three different samples from a random model's flat distribution


def test_generate_follows_a_strong_steer(tiny_model):
    """Adding a large multiple of a direction that raises one token's logit makes greedy decoding emit it."""
    sae = make_sae()
    with torch.no_grad():  # make latent 0's decoder row the residual direction of token id 1000's unembedding
        sae.W_dec[0] = tiny_model.W_U[:, 1000] / tiny_model.W_U[:, 1000].norm() * sae.input_scale
    steered = generate(tiny_model, PROMPT, sae, [Add(0, 60.0)], max_new_tokens=3)[0]
    assert steered == tiny_model.tokenizer.decode([1000] * 3)
    assert generate(tiny_model, PROMPT, max_new_tokens=3)[0] != steered


def test_sweep_rows(tiny_model):
    sae = make_sae()
    rows = sweep(tiny_model, sae, Add(5, 0.0), alphas=[0.0, 4.0], prompt=PROMPT, reference=PROMPT,
                 max_new_tokens=4)
    assert [r["alpha"] for r in rows] == [0.0, 4.0]
    assert rows[0]["delta_loss"] == pytest.approx(0.0, abs=1e-5)
    assert rows[1]["reference_loss"] == pytest.approx(next_token_loss(tiny_model, PROMPT, sae, [Add(5, 4.0)]))
    assert rows[1]["delta_loss"] != pytest.approx(0.0, abs=1e-5)
    assert rows[0]["completion"] == generate(tiny_model, PROMPT, max_new_tokens=4)[0]
    clamp_rows = sweep(tiny_model, sae, Clamp(5, value=0.0), alphas=[1.5], prompt=PROMPT, reference=PROMPT,
                       max_new_tokens=2)
    assert clamp_rows[0]["reference_loss"] == pytest.approx(
        next_token_loss(tiny_model, PROMPT, sae, [Clamp(5, value=1.5)]))


def test_feature_lookup(tiny_model):
    sae = make_sae()
    tokens = tiny_model.to_tokens(PROMPT)
    _, act = run_logits(tiny_model, tokens, RESID, capture=True)
    expected = sae.encode(act[0])
    expected[0] = 0  # BOS
    found = feature_activations(tiny_model, sae, PROMPT)
    assert len(found.tokens) == tokens.shape[1] and found.tokens[1] == tiny_model.tokenizer.decode([tokens[0, 1]])
    torch.testing.assert_close(found.acts, expected)
    rows = top_features(tiny_model, sae, PROMPT, k=5)
    best = expected.max(0)
    assert [r["feature"] for r in rows] == best.values.topk(5).indices.tolist()
    assert [r["position"] for r in rows] == best.indices[best.values.topk(5).indices].tolist()
    at_3 = top_features(tiny_model, sae, PROMPT, k=3, position=3)
    assert [r["feature"] for r in at_3] == expected[3].topk(3).indices.tolist()
    assert all(r["position"] == 3 for r in at_3)


def test_bad_input_gets_clear_errors(tiny_model):
    sae = make_sae()
    with pytest.raises(SaelabError, match="out of range"):
        Steering(sae, [Add(96, 1.0)])
    with pytest.raises(SaelabError, match="exactly one"):
        Clamp(1)
    with pytest.raises(SaelabError, match="one per feature"):
        Add([1, 2, 3], alpha=[1.0, 2.0]).apply(sae, torch.randn(2, 64))
    with pytest.raises(SaelabError, match="positions='middle'"):
        Steering(sae, [Add(1, 1.0, positions="middle")])
    with pytest.raises(SaelabError, match="not an intervention"):
        Steering(sae, ["add 5"])
    with pytest.raises(SaelabError, match="another model"):
        steered_logits(tiny_model, tiny_model.to_tokens(PROMPT), make_sae(d_in=32), [Add(1, 1.0)])
    wrong = make_sae(hook="blocks.9.hook_resid_pre")
    with pytest.raises(SaelabError, match="Unknown hook"), steer(tiny_model, wrong, Add(1, 1.0)):
        pass


def test_steer_command_prints_baseline_and_steered(tmp_path, capsys, tiny_model):
    from saelab.cli import main
    from saelab.sae.io import save_sae

    folder = save_sae(make_sae(), tmp_path / "sae")
    argv = ["steer", "--sae", str(folder), "--feature", "3", "--prompt", PROMPT, "--max-new-tokens", "3"]
    assert main([*argv, "--alpha", "0", "30"]) == 0
    lines = capsys.readouterr().out.splitlines()
    baseline = lines[1].removeprefix("baseline: ")
    assert lines[2] == f"alpha 0: {baseline}" and "change +0.000" in lines[3]  # alpha 0 changes nothing
    expected = generate(tiny_model, PROMPT, make_sae(), [Add(3, 30.0)], max_new_tokens=3)[0]  # the same model
    assert lines[4] == f"alpha 30: {expected!r}"
    assert main([*argv, "--mode", "clamp", "--alpha", "-2"]) == 0
    assert "alpha -2: " in capsys.readouterr().out
    assert main([*argv, "--feature", "96"]) == 2
    assert "out of range" in capsys.readouterr().err


def test_generation_reports_progress(tmp_path, capsys, tiny_model):
    from saelab.cli import main
    from saelab.sae.io import save_sae

    class Counter:
        steps = 0

        def update(self, n):
            self.steps += n

    counter = Counter()
    generate(tiny_model, PROMPT, max_new_tokens=4, n=2, progress=counter)
    assert counter.steps == 4  # one step a token, for both completions together
    folder = save_sae(make_sae(), tmp_path / "sae")
    argv = ["steer", "--sae", str(folder), "--feature", "3", "--prompt", PROMPT, "--max-new-tokens", "2"]
    argv += ["--alpha", "1"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "generating" in captured.err and "4/4" in captured.err and "generating" not in captured.out
    assert main([*argv, "--quiet"]) == 0
    assert capsys.readouterr().err == ""
