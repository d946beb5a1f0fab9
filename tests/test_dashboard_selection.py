"""`saelab dashboard --select`: which latents get pages (saelab.dashboard.selection), checked against brute force on
a tiny random SAE over a tiny cache, and the options' one-sentence errors."""

from collections import Counter

import pytest
import torch
from test_dashboard_collect import RESID, brute_force, random_sae, top_rows, top_tokens

from saelab.activations import build_cache
from saelab.cli import main
from saelab.config import DashboardConfig
from saelab.dashboard.collect import collect_dashboard_data
from saelab.dashboard.selection import select_latents
from saelab.errors import SaelabError

TOP_K = 6


def round_trips(tokenizer, token_id: int) -> bool:
    """Whether a token's text encodes back to that one token (what --token needs)."""
    return tokenizer.encode(tokenizer.decode([token_id]), add_special_tokens=False) == [token_id]


@pytest.fixture(scope="module")
def cache(tmp_path_factory, tiny_model, cache_config):
    return build_cache(cache_config(tmp_path_factory.mktemp("select")), model=tiny_model, progress=False)


@pytest.fixture(scope="module")
def sae():
    return random_sae(RESID, d_sae=48)


@pytest.fixture(scope="module")
def dense(sae, cache):
    return brute_force(sae, cache, RESID)


def test_first_random_and_ids(sae, cache):
    assert select_latents(sae, cache, "first", n=5) == [0, 1, 2, 3, 4]
    assert select_latents(sae, cache, "first") is None  # n 0: every latent
    assert select_latents(sae, cache, "first", n=1000) == list(range(48))
    drawn = select_latents(sae, cache, "random", n=10, seed=3)
    assert drawn == sorted(torch.randperm(48, generator=torch.Generator().manual_seed(3))[:10].tolist())
    assert drawn == select_latents(sae, cache, "random", n=10, seed=3) != select_latents(sae, cache, "random", n=10)
    assert len(set(drawn)) == 10 and all(0 <= i < 48 for i in drawn)
    assert select_latents(sae, cache, "ids", ids=[40, 2, 40]) == [2, 40]
    with pytest.raises(SaelabError, match=r"Latent ids \[48\] are outside this SAE's range 0..47"):
        select_latents(sae, cache, "ids", ids=[3, 48])


def test_densest_counts_every_scanned_token(sae, cache, dense):
    _, codes = dense
    counts = (codes != 0).sum(0)
    chosen = select_latents(sae, cache, "densest", n=7, batch_tokens=100, progress=False)
    expected = sorted(range(48), key=lambda i: (-int(counts[i]), i))[:7]
    assert chosen == sorted(expected)
    assert int(counts[chosen].min()) >= int(counts[[i for i in range(48) if i not in chosen]].max())
    first = cache.read(torch.arange(300), hooks=[RESID])
    early = (sae.encode(first.acts[RESID].double()) != 0).sum(0)
    assert select_latents(sae, cache, "densest", n=3, n_tokens=300, progress=False) == sorted(
        sorted(range(48), key=lambda i: (-int(early[i]), i))[:3]
    )


def test_token_picks_latents_by_their_top_activations(sae, cache, dense, tokenizer, tiny_model):
    everything, codes = dense
    # the token most often among the latents' top activations (one that encodes back to itself)
    hits = Counter(int(everything.token_ids[r]) for i in range(48) for r in top_rows(codes, i, TOP_K, False))
    target = next(t for t, _ in hits.most_common() if round_trips(tokenizer, t))
    token = tokenizer.decode([target])
    tops = {i: top_rows(codes, i, TOP_K, False) for i in range(48)}
    on_token = {i: sum(int(everything.token_ids[r]) == target for r in rows) for i, rows in tops.items()}
    listed = [i for i in range(48) if token in top_tokens(codes, everything, i, TOP_K, False, tokenizer)]
    ranked = sorted(listed, key=lambda i: (-on_token[i], i))
    assert len(ranked) >= 3
    chosen = select_latents(sae, cache, "token", token=token, tokenizer=tokenizer, top_k=TOP_K, batch_tokens=128,
                            progress=False)  # fmt: skip
    assert chosen == sorted(ranked)
    two = select_latents(sae, cache, "token", n=2, token=token, tokenizer=tokenizer, top_k=TOP_K, progress=False)
    assert two == sorted(ranked[:2])
    _, features = collect_dashboard_data(sae, cache, model=tiny_model, features=chosen, top_k=TOP_K, progress=False)
    assert all(token in f["top_tokens"] for f in features)  # each chosen page lists the token

    with pytest.raises(SaelabError, match=r"is 3 tokens for this model's tokenizer"):
        select_latents(sae, cache, "token", token=" LORD God Almighty", tokenizer=tokenizer, progress=False)
    stored = set(everything.token_ids.tolist())
    absent = next(t for t in range(1000, 5000) if t not in stored and round_trips(tokenizer, t))
    with pytest.raises(SaelabError, match="No latent lists .* among the top tokens of its top 6 activations"):
        select_latents(sae, cache, "token", token=tokenizer.decode([absent]), tokenizer=tokenizer, top_k=TOP_K,
                       progress=False)  # fmt: skip


@pytest.mark.parametrize(
    "options, message",
    [
        ({"select": "ids"}, "--select ids needs the latent ids: add them with --features"),
        ({"select": "densest", "features": [3]}, "--features lists latent ids for --select ids, but --select is dense"),
        ({"select": "token"}, "--select token needs the token: add it with --token"),
        ({"token": " LORD"}, "--token is for --select token, but --select is first"),
        ({"select": "biggest"}, "--select is one of first, random, densest, ids, token; got 'biggest'"),
    ],
)
def test_option_errors_are_one_sentence(options, message, capsys):
    with pytest.raises(SaelabError, match=message):
        DashboardConfig(**options)
    argv = ["dashboard", "--sae", "x"]
    for key, value in options.items():
        argv += [f"--{key}", *map(str, value if isinstance(value, list) else [value])]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("saelab: error:") and err.count("\n") == 1 and message in err
    assert DashboardConfig(features=[3, 1]).select == "ids"  # --features alone, as before --select existed
