import itertools
import threading

import pytest
import torch

from saelab.activations import ActivationSource
from saelab.data import special_token_ids
from saelab.errors import SaelabError

HOOKS = ["blocks.0.hook_resid_post", "blocks.1.attn.hook_z", "blocks.1.hook_mlp_out"]


def tokens_with_bos(tokenizer, batch=3, positions=12, seed=0):
    tokens = torch.randint(3, 5000, (batch, positions), generator=torch.Generator().manual_seed(seed))
    tokens[:, 0] = tokenizer.bos_token_id
    return tokens


def test_multi_hook_harvest_equals_single_hook_harvests(tiny_model, tokenizer):
    tokens = tokens_with_bos(tokenizer)
    together, _ = ActivationSource(tiny_model, HOOKS).harvest(tokens)
    for hook in HOOKS:
        alone, _ = ActivationSource(tiny_model, [hook]).harvest(tokens)
        assert torch.equal(together[hook], alone[hook])


def test_harvests_from_two_threads_do_not_mix(tiny_model, tokenizer):
    """The trainer's prefetch thread harvests while a resampling draw may harvest on the main thread."""
    source = ActivationSource(tiny_model, HOOKS)
    inputs = [tokens_with_bos(tokenizer, seed=seed) for seed in range(2)]
    expected = [source.harvest(tokens)[0] for tokens in inputs]
    results: dict[int, list] = {0: [], 1: []}

    def harvest_repeatedly(i):
        for _ in range(20):
            results[i].append(source.harvest(inputs[i])[0])

    threads = [threading.Thread(target=harvest_repeatedly, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for i in range(2):
        assert len(results[i]) == 20
        assert all(torch.equal(acts[hook], expected[i][hook]) for acts in results[i] for hook in HOOKS)


def test_forward_stops_once_every_hook_has_fired(tiny_model, tokenizer):
    assert ActivationSource(tiny_model, ["blocks.0.hook_resid_post"]).stop_at_layer == 1
    assert ActivationSource(tiny_model, HOOKS).stop_at_layer == 2
    assert ActivationSource(tiny_model, ["ln_final.hook_normalized"]).stop_at_layer is None
    calls = {"block 1": 0, "unembed": 0}
    handles = [
        module.register_forward_pre_hook(lambda module, args, name=name: calls.__setitem__(name, calls[name] + 1))
        for name, module in (("block 1", tiny_model.blocks[1]), ("unembed", tiny_model.unembed))
    ]
    try:
        ActivationSource(tiny_model, ["blocks.0.hook_resid_post"]).harvest(tokens_with_bos(tokenizer))
        assert calls == {"block 1": 0, "unembed": 0}
        ActivationSource(tiny_model, ["blocks.1.hook_resid_mid"]).harvest(tokens_with_bos(tokenizer))
        assert calls == {"block 1": 2, "unembed": 0}  # once in the width probe, once here; never the unembed
        with torch.no_grad():  # the early exit leaves no hook behind: a plain forward runs to the logits
            logits = tiny_model(tokens_with_bos(tokenizer), return_type="logits")
        assert logits.shape[-1] == len(tokenizer) and calls["unembed"] == 1
    finally:
        for handle in handles:
            handle.remove()


def test_hook_z_flattening_round_trips(tiny_model, tokenizer):
    tokens = tokens_with_bos(tokenizer)
    got = {}
    with torch.no_grad():
        tiny_model.run_with_hooks(
            tokens, fwd_hooks=[("blocks.1.attn.hook_z", lambda act, hook: got.setdefault("z", act.clone()))]
        )
    z = got["z"]  # [batch, pos, n_heads, d_head]
    source = ActivationSource(tiny_model, ["blocks.1.attn.hook_z"])
    flat, _ = source.harvest(tokens)
    assert source.dims["blocks.1.attn.hook_z"] == z.shape[2] * z.shape[3]
    assert torch.equal(flat["blocks.1.attn.hook_z"].reshape(z.shape), z)
    assert torch.equal(flat["blocks.1.attn.hook_z"][0, 5, 16:32], z[0, 5, 1])  # head 1 is the second block


def test_special_positions_are_excluded_by_default(tiny_model, tokenizer):
    tokens = tokens_with_bos(tokenizer)
    tokens[1, 6] = tokenizer.bos_token_id  # a document separator mid-context
    batch = ActivationSource(tiny_model, HOOKS).batch(tokens, first_context=10)
    assert len(batch) == tokens.numel() - 4
    assert not set(batch.token_ids.tolist()) & set(special_token_ids(tokenizer))
    assert batch.context.min() == 10 and batch.context.max() == 12
    assert torch.equal(batch.token_ids, tokens[batch.context - 10, batch.position])
    everything = ActivationSource(tiny_model, HOOKS, include_special=True).batch(tokens)
    assert len(everything) == tokens.numel()
    full, _ = ActivationSource(tiny_model, HOOKS).harvest(tokens)
    hook = HOOKS[1]
    assert torch.equal(batch.acts[hook], full[hook][batch.context - 10, batch.position])


def test_unknown_hook_suggests_close_names(tiny_model):
    with pytest.raises(SaelabError, match="Did you mean: blocks.1.hook_resid_post"):
        ActivationSource(tiny_model, ["blocks.1.hook_resid_pots"])
    with pytest.raises(SaelabError, match="more than once"):
        ActivationSource(tiny_model, [HOOKS[0], HOOKS[0]])


def test_non_per_token_hook_is_rejected(tiny_model):
    with pytest.raises(SaelabError, match="not a per-token activation"):
        ActivationSource(tiny_model, ["blocks.0.attn.hook_pattern"])


def test_stored_gradients_match_finite_differences(tokenizer):
    from saelab.models import tiny_native_model

    model = tiny_native_model(tokenizer=tokenizer, dtype=torch.float64, seed=3)
    hooks = ["blocks.0.hook_resid_post", "blocks.1.attn.hook_z"]
    source = ActivationSource(model, hooks, with_grads=True)
    tokens = tokens_with_bos(tokenizer, batch=2, positions=8, seed=4)
    acts, grads = source.harvest(tokens)
    plain, _ = ActivationSource(model, hooks).harvest(tokens)
    assert all(torch.equal(acts[h], plain[h]) for h in hooks)  # the gradient tap does not change activations

    def loss_with(hook, row, pos, direction):
        def nudge(act, hook):
            act = act.clone()
            act.view(act.shape[0], act.shape[1], -1)[row, pos] += direction
            return act

        with torch.no_grad():
            logits = model.run_with_hooks(tokens, fwd_hooks=[(hook, nudge)], return_type="logits")
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten(), reduction="sum")

    generator = torch.Generator().manual_seed(5)
    for hook in hooks:
        for row, pos in [(0, 2), (1, 6)]:
            v = torch.randn(source.dims[hook], generator=generator, dtype=torch.float64)
            eps = 1e-5
            numeric = (loss_with(hook, row, pos, eps * v) - loss_with(hook, row, pos, -eps * v)) / (2 * eps)
            analytic = grads[hook][row, pos] @ v
            assert abs(numeric - analytic) <= 1e-6 * max(1.0, abs(analytic)), (hook, row, pos)
    # the last position only feeds its own logits, which predict nothing
    assert grads["blocks.0.hook_resid_post"][:, -1].abs().sum() == 0


@pytest.mark.slow
def test_encoder_model_harvests_with_cls_as_begin_token():
    from saelab.config import DataConfig
    from saelab.data import token_contexts
    from saelab.models import load_model

    model = load_model("minilm-l6")
    contexts = list(itertools.islice(token_contexts(DataConfig(context_length=16), model.tokenizer), 2))
    assert all(c[0] == model.tokenizer.cls_token_id for c in contexts)
    source = ActivationSource(model, ["blocks.2.hook_resid_post", "blocks.2.attn.hook_z"])
    batch = source.batch(torch.stack(contexts))
    assert source.dims == {"blocks.2.hook_resid_post": 384, "blocks.2.attn.hook_z": 384}
    assert len(batch) <= 2 * 15 and model.tokenizer.cls_token_id not in batch.token_ids.tolist()
    assert torch.isfinite(batch.acts["blocks.2.hook_resid_post"]).all()
