import itertools
import json
import math
from collections import Counter
from types import SimpleNamespace

import pytest
import torch

from saelab.activations import build_cache
from saelab.analysis.attribution import bias_terms, head_attribution
from saelab.config import SAEConfig
from saelab.dashboard import collect
from saelab.dashboard.collect import (
    DoublingHistogram,
    StreamingTopK,
    collect_dashboard_data,
    decoder_neighbours,
    logit_effects,
)
from saelab.errors import SaelabError
from saelab.sae.registry import create_sae

RESID = "blocks.1.hook_resid_post"
HOOK_Z = "blocks.0.attn.hook_z"
SUMMARY_KEYS = {
    "sae", "architecture", "hook", "model", "d_sae", "n_tokens", "signed", "metrics", "metric_names",
    "density_histogram", "top_k", "latent_tokens",
}  # fmt: skip
FEATURE_KEYS = {
    "id",
    "density",
    "max_act",
    "min_act",
    "mean_act",
    "dead",
    "dense",
    "top_tokens",
    "top",
    "quantiles",
    "histogram",
    "logits",
    "neighbours",
    "heads",
}
EXAMPLE_KEYS = {"tokens", "acts", "focus", "context", "position", "heads"}


@pytest.fixture(scope="module")
def cache(tmp_path_factory, tiny_model, cache_config):
    return build_cache(cache_config(tmp_path_factory.mktemp("dash")), model=tiny_model, progress=False)


def random_sae(hook: str, architecture: str = "topk", d_sae: int = 48, k: int = 4, seed: int = 0):
    torch.manual_seed(seed)
    sae = create_sae(
        64, SAEConfig(architecture=architecture, d_sae=d_sae, k=k), metadata={"hook": hook, "model": "tiny-native"}
    )
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_(std=0.1)
        sae.b_enc[5] = -1e4  # latent 5 never fires
        sae.input_scale.fill_(0.7)
    return sae.double()


@pytest.mark.parametrize("merge_at", [1, 1 << 16])  # merge after every few entries / once at the end
def test_streaming_topk_equals_sorting_everything(merge_at, monkeypatch):
    monkeypatch.setattr(collect, "_MIN_MERGE_ENTRIES", merge_at)
    gen = torch.Generator().manual_seed(0)
    n_slots, k, n = 7, 5, 3000
    slots = torch.randint(0, n_slots - 1, (n,), generator=gen)  # the last slot gets nothing
    keys = torch.randint(0, 12, (n,), generator=gen).double()  # many ties
    tokens = torch.arange(n)
    top = StreamingTopK(n_slots, k, dtype=torch.float64)
    bounds = [0, 1, 2, 50, 51, 400, 1200, 1201, 2999, n]
    for a, b in itertools.pairwise(bounds):
        top.update(slots[a:b], keys[a:b], tokens[a:b], -keys[a:b])
    for s in range(n_slots - 1):
        mine = (slots == s).nonzero().squeeze(1).tolist()
        best = sorted(mine, key=lambda t: (-keys[t], t))[:k]
        assert top.tokens[s].tolist() == best
        assert top.keys[s].tolist() == keys[best].tolist() and top.values[s].tolist() == (-keys[best]).tolist()
    assert top.tokens[-1].tolist() == [-1] * k and top.keys[-1].tolist() == [-math.inf] * k


def test_random_priority_sample_is_uniform_and_sized():
    repeats, firing, size = 2000, 10, 4
    gen = torch.Generator().manual_seed(1)
    sample = StreamingTopK(repeats, size)
    for a, b in ((0, 3), (3, 4), (4, 10)):  # each repeat sees tokens 0..9 in three batches
        tokens = torch.arange(a, b).repeat_interleave(repeats)
        slots = torch.arange(repeats).repeat(b - a)
        order = torch.argsort(tokens, stable=True)
        sample.update(slots[order], torch.rand(len(order), generator=gen), tokens[order], tokens[order].double())
    assert (sample.tokens >= 0).all() and all(len(set(row)) == size for row in sample.tokens.tolist())
    drawn = torch.bincount(sample.tokens.flatten(), minlength=firing)
    expected, sd = repeats * size / firing, math.sqrt(repeats * 0.4 * 0.6)
    assert ((drawn - expected).abs() < 5 * sd).all(), drawn


@pytest.mark.parametrize("signed", [False, True])
def test_doubling_histogram_counts_exactly(signed):
    gen = torch.Generator().manual_seed(2)
    hist = DoublingHistogram(3, 16, signed)
    values, slots = [], []
    for scale in (0.3, 1.0, 1.1, 7.0, 2.0, 50.0):  # the range grows several times, by various factors
        v = torch.rand(200, generator=gen, dtype=torch.float64) * scale + 1e-3
        if signed:
            v = v * (torch.randint(0, 2, (200,), generator=gen) * 2 - 1)
        s = torch.randint(0, 2, (200,), generator=gen)  # slot 2 stays empty
        hist.update(s, v)
        values.append(v)
        slots.append(s)
    values, slots = torch.cat(values), torch.cat(slots)
    for s in range(2):
        result = hist.result(s)
        mine = values[slots == s]
        edges = torch.tensor(result["edges"], dtype=torch.float64)
        assert sum(result["counts"]) == len(mine) and result["counts"][0] > 0 and result["counts"][-1] > 0
        assert edges[0] <= mine.min() and mine.max() <= edges[-1]
        assert torch.histogram(mine, bins=edges).hist.long().tolist() == result["counts"]
    assert hist.result(2) == {"edges": [], "counts": []}


def brute_force(sae, cache, hook):
    everything = cache.read(torch.arange(cache.n_tokens), hooks=[hook])
    return everything, sae.encode(everything.acts[hook].double()).detach()


def top_rows(dense, latent, top_k, signed):
    """The cache rows of a latent's top_k activations, best first, ties to the earlier row (the dashboard's rule)."""
    column = dense[:, latent]
    key = column.abs() if signed else column
    return sorted((column != 0).nonzero().squeeze(1).tolist(), key=lambda t: (-float(key[t]), t))[:top_k]


def top_token_counts(dense, everything, latent, top_k, signed, tokenizer, m=10):
    """A latent's most common top-example tokens with how many of its top_k examples are on each, most common first
    (ties: the better example's token first)."""
    rows = top_rows(dense, latent, top_k, signed)
    return Counter(tokenizer.decode([int(everything.token_ids[r])]) for r in rows).most_common(m)


def top_tokens(dense, everything, latent, top_k, signed, tokenizer, m=10):
    """A latent's most common top-example tokens, most common first (ties: the better example's token first)."""
    return [token for token, _ in top_token_counts(dense, everything, latent, top_k, signed, tokenizer, m)]


def check_against_dense(summary, features, sae, cache, tiny_model, hook, top_k):
    everything, dense = brute_force(sae, cache, hook)
    signed = sae.signed
    assert set(summary) == SUMMARY_KEYS and summary["n_tokens"] == cache.n_tokens and summary["signed"] == signed
    json.dumps([summary, features])  # JSON-ready
    assert set(summary["metric_names"]) == set(summary["metrics"]) and summary["top_k"] == top_k
    # the token index covers every latent of the SAE, with a page or not
    assert len(summary["latent_tokens"]) == sae.d_sae
    for latent, entries in enumerate(summary["latent_tokens"]):
        expected = top_token_counts(dense, everything, latent, top_k, signed, tiny_model.tokenizer)
        assert [tuple(entry) for entry in entries] == expected
    for feature in features:
        assert set(feature) == FEATURE_KEYS
        latent = feature["id"]
        column = dense[:, latent]
        firing = (column != 0).nonzero().squeeze(1)
        assert feature["density"] == pytest.approx(len(firing) / cache.n_tokens)
        assert feature["dead"] == (len(firing) == 0)
        if feature["dead"]:
            assert feature["top"] == [] and feature["quantiles"] == [] and feature["histogram"]["counts"] == []
            continue
        assert feature["max_act"] == pytest.approx(float(column[firing].max()), abs=1e-9)
        assert feature["min_act"] == pytest.approx(float(column[firing].min()), abs=1e-9)
        assert feature["mean_act"] == pytest.approx(float(column[firing].mean()), abs=1e-9)
        best = top_rows(dense, latent, top_k, signed)
        assert feature["top_tokens"] == top_tokens(dense, everything, latent, top_k, signed, tiny_model.tokenizer)
        assert [(e["context"], e["position"]) for e in feature["top"]] == [
            (int(everything.context[t]), int(everything.position[t])) for t in best
        ]
        for example in feature["top"] + [e for q in feature["quantiles"] for e in q["examples"]]:
            assert set(example) == EXAMPLE_KEYS
            rows = ((everything.context == example["context"]).nonzero().squeeze(1)).tolist()
            focus_row = next(r for r in rows if int(everything.position[r]) == example["position"])
            window = [r for r in rows if -24 <= r - focus_row <= 8]
            assert example["focus"] == window.index(focus_row)
            assert example["acts"] == pytest.approx(column[window].tolist(), abs=1e-9)
            assert example["tokens"] == [tiny_model.tokenizer.decode([int(everything.token_ids[r])]) for r in window]
        assert sum(feature["histogram"]["counts"]) == len(firing)
        bins = feature["quantiles"]
        assert bins and all(b["low"] <= b["high"] for b in bins)
        assert all(a["high"] <= b["low"] for a, b in itertools.pairwise(bins))
        assert all(b["low"] <= e["acts"][e["focus"]] <= b["high"] for b in bins for e in b["examples"])
        assert sum(len(b["examples"]) for b in bins) == min(len(firing), 5 * len(bins))
    unit = torch.nn.functional.normalize(sae.W_dec, dim=1)
    for feature in features:
        cosines = unit @ unit[feature["id"]]
        cosines[feature["id"]] = -2
        assert [i for i, _, _ in feature["neighbours"]] == cosines.argsort(descending=True)[:10].tolist()
        assert [c for _, c, _ in feature["neighbours"]] == pytest.approx(
            cosines.sort(descending=True).values[:10].tolist()
        )
        # every neighbour, with a page or not, carries the first five top tokens its own page would list
        for i, _, tokens in feature["neighbours"]:
            assert tokens == top_tokens(dense, everything, i, top_k, signed, tiny_model.tokenizer, m=5)
    requested = {f["id"] for f in features}
    assert any(i not in requested for f in features for i, _, _ in f["neighbours"])


def test_topk_sae_matches_dense_reference_over_many_batches(cache, tiny_model, monkeypatch):
    sae = random_sae(RESID)
    features = [5, 3, 10, 13, 17, 44, 0]
    summary, data = collect_dashboard_data(
        sae, cache, model=tiny_model, features=features, top_k=6, batch_tokens=100, progress=False
    )
    assert [f["id"] for f in data] == features and data[0]["dead"] and sum(not f["dead"] for f in data) == 5
    check_against_dense(summary, data, sae, cache, tiny_model, RESID, top_k=6)
    _, dense = brute_force(sae, cache, RESID)
    assert summary["metrics"]["l0"] == pytest.approx(float((dense != 0).sum(1).double().mean()))
    direction = sae.W_dec.float() / 0.7
    for feature in data:
        effect = direction[feature["id"]] @ tiny_model.W_U
        expected = effect.topk(10)
        assert [v for _, v in feature["logits"]["positive"]] == pytest.approx(expected.values.tolist(), rel=1e-5)
        assert [t for t, _ in feature["logits"]["positive"]] == [
            tiny_model.tokenizer.decode([i]) for i in expected.indices.tolist()
        ]
        assert [v for _, v in feature["logits"]["negative"]] == pytest.approx(
            effect.topk(10, largest=False).values.tolist(), rel=1e-5
        )
        assert feature["heads"] is None
    monkeypatch.setattr(collect, "RECORD_BUDGET_BYTES", 0)  # windows re-encode their rows instead of the record
    summary, again = collect_dashboard_data(
        sae, cache, model=tiny_model, features=features, top_k=6, batch_tokens=100, progress=False
    )
    check_against_dense(summary, again, sae, cache, tiny_model, RESID, top_k=6)


def test_abstopk_ranks_by_magnitude_and_keeps_negatives(cache, tiny_model):
    sae = random_sae(RESID, architecture="abstopk", d_sae=32, k=6, seed=1)
    summary, data = collect_dashboard_data(
        sae, cache, features=range(0, 32, 3), top_k=8, batch_tokens=256, n_logits=3, progress=False
    )
    assert summary["signed"] and all(f["logits"] is None for f in data)  # no model: no logit effects
    assert any(f["min_act"] < 0 for f in data)
    check_against_dense(summary, data, sae, cache, tiny_model, RESID, top_k=8)


def test_hook_z_head_attribution_sums_to_the_pre_activation(cache, tiny_model):
    sae = random_sae(HOOK_Z, seed=2)
    summary, data = collect_dashboard_data(
        sae, cache, model=tiny_model, features=[0, 1, 5], batch_tokens=300, progress=False
    )
    check_against_dense(summary, data, sae, cache, tiny_model, HOOK_Z, top_k=20)
    everything = cache.read(torch.arange(cache.n_tokens), hooks=[HOOK_Z])
    z = sae.encode_pre(sae.normalize(everything.acts[HOOK_Z].double())[0]).detach()
    row = {(int(c), int(p)): i for i, (c, p) in enumerate(zip(everything.context, everything.position))}
    for feature in data[:2]:
        latent = feature["id"]
        for example in feature["top"]:
            assert len(example["heads"]) == 4
            r = row[example["context"], example["position"]]
            assert sum(example["heads"]) + float(bias_terms(sae, torch.tensor([latent]))) == pytest.approx(
                float(z[r, latent]), abs=1e-9
            )
        assert feature["heads"] == pytest.approx(torch.tensor([e["heads"] for e in feature["top"]]).mean(0).tolist())
        W_O = tiny_model.W_O[0]
        direction = torch.einsum("hd,hdm->m", (sae.W_dec[latent] / 0.7).view(4, 16).float(), W_O)
        assert [v for _, v in feature["logits"]["positive"]] == pytest.approx(
            (direction @ tiny_model.W_U).topk(10).values.tolist(), rel=1e-4
        )
    assert data[2]["dead"] and data[2]["heads"] is None
    x = torch.randn(3, 64, dtype=torch.float64)
    per_head = head_attribution(sae, x, torch.tensor([0, 7, 7]), 4)
    z = sae.encode_pre(sae.normalize(x)[0]).detach()
    assert (per_head.sum(1) + bias_terms(sae, torch.tensor([0, 7, 7]))).tolist() == pytest.approx(
        [float(z[0, 0]), float(z[1, 7]), float(z[2, 7])]
    )


def test_neighbours_and_encoder_models():
    sae = random_sae(RESID, d_sae=40)
    ids, cosines = decoder_neighbours(sae, torch.tensor([3, 39]), 5)
    unit = torch.nn.functional.normalize(sae.W_dec, dim=1)
    for i, latent in enumerate((3, 39)):
        similarity = unit @ unit[latent]
        similarity[latent] = -2
        assert ids[i].tolist() == similarity.argsort(descending=True)[:5].tolist()
        assert cosines[i].tolist() == pytest.approx(similarity.sort(descending=True).values[:5].tolist())
    encoder = SimpleNamespace(cfg=SimpleNamespace(attention_dir="bidirectional", d_model=64))
    assert logit_effects(sae, encoder, torch.tensor([0]), 5) is None


def test_reads_only_the_first_n_tokens_and_checks_requests(cache):
    sae = random_sae(RESID)
    summary, data = collect_dashboard_data(sae, cache, features=[3, 10], n_tokens=500, batch_tokens=128, progress=False)
    first = cache.read(torch.arange(500), hooks=[RESID])
    dense = sae.encode(first.acts[RESID].double()).detach()
    stored = set(zip(first.context.tolist(), first.position.tolist()))
    assert summary["n_tokens"] == 500
    for feature in data:
        assert feature["density"] == pytest.approx(float((dense[:, feature["id"]] != 0).double().mean()))
        examples = feature["top"] + [e for q in feature["quantiles"] for e in q["examples"]]
        assert examples and all((e["context"], e["position"]) in stored for e in examples)
    with pytest.raises(SaelabError, match="repeated"):
        collect_dashboard_data(sae, cache, features=[1, 1], progress=False)
    with pytest.raises(SaelabError, match=r"\[0, 48\)"):
        collect_dashboard_data(sae, cache, features=[48], progress=False)
