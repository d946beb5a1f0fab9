"""The static dashboard site: files, chunking, data round trips, escaping of hostile token text, offline assets and
the `saelab dashboard` command. Feature data is synthetic and follows the data contract of
saelab.dashboard.collect (`fake_dashboard` is shared with test_dashboard_browser.py)."""

from __future__ import annotations

import json
import random
import re
import shlex
from collections import Counter
from pathlib import Path

import pytest
from plotly.offline import get_plotlyjs

from saelab.cli import main
from saelab.dashboard import collect, site
from saelab.dashboard.selection import select_latents
from saelab.dashboard.site import chunk_file, script_json, write_site
from saelab.errors import SaelabError

# fmt: off
WORDS = [
    "In", "the", "beginning", "God", "created", "heaven", "and", "earth", ".", "And", "was", "without", "form", ",",
    "void", ";", "darkness", "upon", "face", "of", "deep", "Spirit", "moved", "waters",
]
# fmt: on
# innerHTML would run the <img> handler (an inserted <script> never runs), so both kinds of injection are covered.
HOSTILE = [
    "<script>window.__pwned=1</script>",
    "<img src=x onerror=window.__pwned=1>",
    '"',
    "'",
    "&amp;",
    "</script>",
    "\n",
]
WHITESPACE = "\n\t  "  # shown as ↵⇥··
N_HEADS = 4


def fake_example(rng: random.Random, peak: float, signed: bool, tokens: list[str] | None = None) -> dict:
    """One context window of 12 tokens whose focus token activates at `peak`, a few neighbours weaker."""
    tokens = tokens or [(" " if rng.random() < 0.8 else "") + rng.choice(WORDS) for _ in range(12)]
    focus = rng.randrange(len(tokens))
    acts = [0.0] * len(tokens)
    for i in rng.sample(range(len(tokens)), 3):
        acts[i] = round(peak * rng.uniform(0.1, 0.7) * (-1 if signed and rng.random() < 0.5 else 1), 4)
    acts[focus] = peak
    return {
        "tokens": tokens,
        "acts": acts,
        "focus": focus,
        "context": rng.randrange(1000),
        "position": rng.randrange(1, 128),
        "heads": None,
    }


def fake_feature(feature_id: int, rng: random.Random, signed: bool, ids: list[int]) -> dict:
    """A contract-conformant feature. id % 10 == 7 is dead, == 5 dense; id % 3 == 2 has head attributions
    (hook_z); id 4 has no logit effects (as for an encoder); id 3 carries hostile token text."""
    dead, dense = feature_id % 10 == 7, feature_id % 10 == 5
    others = [o for o in ids if o != feature_id][:4]
    neighbours = [[other, round(0.9 - 0.1 * j, 3), [" " + WORDS[other % len(WORDS)]]] for j, other in enumerate(others)]
    neighbours.append([5000 + feature_id, 0.2, [" waters", "<b>"]])  # a latent that is not in the dashboard
    neighbours.append([6000 + feature_id, 0.1, []])  # one that never fired, not in the dashboard either
    if dead:
        return {
            "id": feature_id, "density": 0.0, "max_act": 0.0, "min_act": 0.0, "mean_act": 0.0, "dead": True,
            "dense": False, "top_tokens": [], "top": [], "quantiles": [], "histogram": {"edges": [], "counts": []},
            "logits": {"positive": [], "negative": []}, "neighbours": neighbours, "heads": None,
        }  # fmt: skip
    max_act = round(1 + 9 * rng.random(), 3)
    top = [fake_example(rng, round(max_act * (1 - 0.04 * i), 4), signed) for i in range(6)]
    if feature_id == 3:
        top[0] = fake_example(rng, max_act, signed, tokens=[" the", *HOSTILE, WHITESPACE, " end"])
        top[0]["focus"], top[0]["acts"] = 1, [0.0, max_act, 0.5, 0.5, 0.25, 0.25, 0.25, 0.25, 0.0, 0.0]
    with_heads = feature_id % 3 == 2
    for example in top:
        if with_heads:
            example["heads"] = [round(rng.uniform(-0.5, 1.0), 4) for _ in range(N_HEADS)]
    counts = Counter(example["tokens"][example["focus"]] for example in top)
    edges = [round((-max_act if signed else 0.0) + i * (2 if signed else 1) * max_act / 10, 5) for i in range(11)]
    return {
        "id": feature_id,
        "density": 0.2 if dense else float(f"{10 ** rng.uniform(-5, -1.5):.4g}"),
        "max_act": max_act,
        "min_act": -round(max_act * 0.6, 3) if signed else 0.0,
        "mean_act": round(max_act * 0.3, 4),
        "dead": False,
        "dense": dense,
        "top_tokens": [token for token, _ in counts.most_common(10)],
        "top": top,
        "quantiles": [
            {
                "low": round(max_act * q / 3, 4),
                "high": round(max_act * (q + 1) / 3, 4),
                "examples": [fake_example(rng, round(max_act * (q + 0.5) / 3, 4), signed) for _ in range(2)],
            }
            for q in range(3)
        ],
        "histogram": {"edges": edges, "counts": [rng.randrange(1, 500) for _ in range(10)]},
        "logits": None
        if feature_id == 4
        else {
            "positive": [[rng.choice(WORDS), round(rng.uniform(0.5, 2), 3)] for _ in range(5)],
            "negative": [[rng.choice(WORDS), -round(rng.uniform(0.5, 2), 3)] for _ in range(5)],
        },
        "neighbours": neighbours,
        "heads": [round(sum(e["heads"][h] for e in top) / len(top), 4) for h in range(N_HEADS)] if with_heads else None,
    }


def fake_dashboard(ids: list[int], signed: bool = False, seed: int = 0) -> tuple[dict, list[dict]]:
    """(summary, features) for the latents `ids` of a fake SAE, following the dashboard data contract."""
    rng = random.Random(seed)
    features = [fake_feature(i, rng, signed, ids) for i in ids]
    d_sae = max(ids) + 1
    built = {f["id"]: f for f in features}
    metrics = {"l0": 31.7, "dead_fraction": 0.1, "dense_fraction": 0.1, "eval_fvu": 0.21}
    summary = {
        "sae": "blocks.1.hook_resid_post__fake",
        "architecture": "abstopk" if signed else "topk",
        "hook": "blocks.1.hook_resid_post",
        "model": "tiny-native",
        "d_sae": d_sae,
        "n_tokens": 40_960,
        "signed": signed,
        "metrics": metrics,
        "metric_names": {key: collect.metric_name(key, 40_960, metrics, 0.1) for key in metrics},
        "density_histogram": {
            "edges": [-6 + 0.5 * i for i in range(13)],
            "counts": [rng.randrange(50) for _ in range(12)],
        },
        "top_k": 6,
        "latent_tokens": [
            [[token, 6 - j] for j, token in enumerate(built[i]["top_tokens"])] if i in built else fake_unbuilt_tokens(i)
            for i in range(d_sae)
        ],
    }
    return summary, features


def fake_unbuilt_tokens(latent: int) -> list[list]:
    """The token-index entry of a latent without a page: every fifth fires on " LORD", the rest on nothing."""
    return [[" LORD", 4], [" " + WORDS[latent % len(WORDS)], 2]] if latent % 5 == 0 else []


SUMMARY_KEYS = {
    "sae", "architecture", "hook", "model", "d_sae", "n_tokens", "signed", "metrics", "metric_names",
    "density_histogram", "top_k",
}  # fmt: skip  (and "latent_tokens", which the site writes to its own file)
FEATURE_KEYS = {"id", "density", "max_act", "min_act", "mean_act", "dead", "dense", "top_tokens", "top", "quantiles",
                "histogram", "logits", "neighbours", "heads"}  # fmt: skip
EXAMPLE_KEYS = {"tokens", "acts", "focus", "context", "position", "heads"}


def assert_follows_contract(summary: dict, features: list[dict]) -> None:
    """The dashboard data contract (keys and types) that the collector writes and the site reads."""
    assert set(summary) - {"latent_tokens"} == SUMMARY_KEYS and isinstance(summary["signed"], bool)
    assert isinstance(summary["metrics"], dict) and set(summary["metric_names"]) == set(summary["metrics"])
    histograms = [summary["density_histogram"]] + [f["histogram"] for f in features]
    assert all(len(h["edges"]) == len(h["counts"]) + 1 or h["counts"] == [] for h in histograms)
    for f in features:
        assert set(f) == FEATURE_KEYS and isinstance(f["id"], int) and isinstance(f["dead"], bool)
        assert all(isinstance(t, str) for t in f["top_tokens"]) and len(f["top_tokens"]) <= 10
        examples = f["top"] + [e for q in f["quantiles"] for e in q["examples"]]
        assert all(q["low"] <= q["high"] for q in f["quantiles"])
        for e in examples:
            assert set(e) == EXAMPLE_KEYS and len(e["tokens"]) == len(e["acts"]) and 0 <= e["focus"] < len(e["tokens"])
            assert e["heads"] is None or len(e["heads"]) == len(f["heads"])
        if f["logits"] is not None:
            assert all(isinstance(t, str) and isinstance(v, float | int) for t, v in f["logits"]["positive"])
            assert all(isinstance(t, str) and isinstance(v, float | int) for t, v in f["logits"]["negative"])
        assert all(isinstance(i, int) and i != f["id"] for i, _, _ in f["neighbours"])
        assert all(isinstance(tokens, list) and len(tokens) <= 5 for _, _, tokens in f["neighbours"])


def read_js(path: Path, prefix: str, suffix: str):
    """Strip a data file's JS wrapper and parse the JSON inside."""
    text = path.read_text(encoding="utf-8")
    assert text.startswith(prefix) and text.endswith(suffix), text[:80]
    return json.loads(text[len(prefix) : -len(suffix)])


def read_chunk(out: Path, chunk: int) -> dict:
    return read_js(out / chunk_file(chunk), "saelab.register(", ");\n")


IDS = [*range(130), 1000]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    summary, features = fake_dashboard(IDS)
    out = tmp_path_factory.mktemp("site")
    return out, write_site(out, summary, features), summary, features


def test_files_and_chunks(built):
    out, index, summary, features = built
    assert_follows_contract(summary, features)
    assert index == out / "index.html"
    for name in ("index.html", "feature.html", "assets/app.js", "assets/style.css", "assets/plotly.min.js"):
        assert (out / name).is_file(), name
    # 64 ids per chunk: 0-63, 64-127, 128-129, and 1000 alone in chunk 15.
    assert sorted(p.name for p in (out / "data").glob("features_*.js")) == [
        "features_0000.js", "features_0001.js", "features_0002.js", "features_0015.js"
    ]  # fmt: skip
    assert [f["id"] for f in read_chunk(out, 0)["features"]] == list(range(64))
    assert [f["id"] for f in read_chunk(out, 2)["features"]] == [128, 129]
    assert read_chunk(out, 15) == {"chunk": 15, "features": [features[-1]]}


def test_data_files_parse_back_to_the_input(built):
    out, _, summary, features = built
    without_tokens = {key: value for key, value in summary.items() if key != "latent_tokens"}
    assert read_js(out / "data/summary.js", "window.SAELAB_SUMMARY = ", ";\n") == {
        **without_tokens, "n_features": len(IDS), "chunk_size": site.CHUNK_SIZE
    }  # fmt: skip
    assert read_js(out / "data/tokens.js", "window.SAELAB_TOKENS = ", ";\n") == {
        "top_k": 6, "latents": summary["latent_tokens"]
    }  # fmt: skip
    assert read_js(out / "data/labels.js", "window.SAELAB_LABELS = ", ";\n") == {}
    parsed = [f for chunk in (0, 1, 2, 15) for f in read_chunk(out, chunk)["features"]]
    assert parsed == features
    index = read_js(out / "data/index.js", "window.SAELAB_INDEX = ", ";\n")
    assert index["columns"] == list(site.INDEX_COLUMNS)
    assert [dict(zip(index["columns"], row)) for row in index["rows"]] == [
        {key: f[key] for key in site.INDEX_COLUMNS} for f in features
    ]


def test_hostile_token_text_is_escaped(built):
    out, _, _, features = built
    for path in (out / "data").glob("*.js"):
        text = path.read_text(encoding="utf-8")
        for raw in ("<", ">", "&", "\u2028", "\u2029"):
            assert raw not in text, (path.name, raw)
    hostile = read_chunk(out, 0)["features"][3]["top"][0]["tokens"]
    assert hostile[1:-1] == [*HOSTILE, WHITESPACE]
    assert "<script>window.__pwned=1</script>" in features[3]["top_tokens"]
    assert script_json(["</script>\u2028&"]) == '["\\u003c/script\\u003e\\u2028\\u0026"]'


def test_site_is_offline(built):
    out, *_ = built
    assert (out / "assets/plotly.min.js").read_text(encoding="utf-8") == get_plotlyjs()
    # plotly's own bundle names XML namespaces and map-tile servers it never loads for bar charts; everything
    # saelab writes names no URL at all, and every script and stylesheet is a relative path.
    ours = [p for p in out.rglob("*") if p.is_file() and p.name != "plotly.min.js"]
    assert len(ours) == 12
    for path in ours:
        assert not re.search(r"https?:|//cdn", path.read_text(encoding="utf-8")), path
    for page in ("index.html", "feature.html"):
        html = (out / page).read_text(encoding="utf-8")
        assert '<link rel="icon" href="data:,">' in html  # an empty inline icon: no favicon request to a server
        refs = [ref for ref in re.findall(r'(?:src|href)="([^"]+)"', html) if ref != "data:,"]
        assert refs and all(not ref.startswith(("/", "http", "//")) and (out / ref).is_file() for ref in refs), refs


def test_signed_site_round_trips_with_floats_cut_to_six_digits(tmp_path):
    summary, features = fake_dashboard([0, 1, 2], signed=True)
    assert any(a < 0 for f in features for e in f["top"] for a in e["acts"])
    features[0]["mean_act"] = float("nan")
    features[1]["max_act"] = 2.5962278842926025
    features[1]["top"][0]["acts"][0] = 0.0
    write_site(tmp_path, summary, features)
    parsed = read_chunk(tmp_path, 0)["features"]
    assert parsed[0]["mean_act"] is None and parsed[1]["max_act"] == 2.59623
    assert type(parsed[1]["top"][0]["acts"][0]) is int  # written as 0, not 0.0
    features[0]["mean_act"], features[1]["max_act"] = None, 2.59623
    assert parsed == features  # the fake's numbers have at most 6 significant digits


def test_rewrite_replaces_old_chunks(tmp_path):
    write_site(tmp_path, *fake_dashboard([0, 70, 200]))
    write_site(tmp_path, *fake_dashboard([5, 6]))
    assert [p.name for p in (tmp_path / "data").glob("features_*.js")] == ["features_0000.js"]
    assert [f["id"] for f in read_chunk(tmp_path, 0)["features"]] == [5, 6]


def test_duplicate_ids_and_missing_templates_are_user_errors(tmp_path, monkeypatch):
    summary, features = fake_dashboard([0, 1])
    with pytest.raises(SaelabError, match="same latent id twice"):
        write_site(tmp_path, summary, features + features[:1])
    monkeypatch.setattr(site, "ASSETS", (*site.ASSETS, "missing.js"))
    with pytest.raises(SaelabError, match="templates"):
        write_site(tmp_path, summary, features)


@pytest.fixture(scope="module")
def tiny_sae_and_cache(tmp_path_factory, cache_config, tiny_model):
    from helpers import perturb

    from saelab.activations.cache import build_cache
    from saelab.config import SAEConfig
    from saelab.sae.io import save_sae
    from saelab.sae.registry import create_sae

    root = tmp_path_factory.mktemp("cli")
    build_cache(cache_config(root / "cache"), model=tiny_model, progress=False)
    metadata = {"hook": "blocks.1.hook_resid_post", "model": "tiny-native"}
    sae = perturb(create_sae(64, SAEConfig(architecture="topk", d_sae=96, k=8), metadata=metadata))
    return save_sae(sae, root / "sae"), root / "cache"


def test_cli_passes_options_to_the_collector_and_writes_the_site(tiny_sae_and_cache, monkeypatch, capsys):
    sae_folder, cache = tiny_sae_and_cache
    calls = []

    def collect_dashboard_data(sae, cache, **options):
        calls.append((sae, cache, options))
        summary, features = fake_dashboard(options["features"] or list(range(sae.d_sae)))
        return {**summary, "d_sae": sae.d_sae}, features

    monkeypatch.setattr(collect, "collect_dashboard_data", collect_dashboard_data)

    argv = ["dashboard", "--sae", str(sae_folder), "--cache", str(cache), "--model", "none", "--quiet"]
    assert main([*argv, "--features", "90", "3", "3", "--n-tokens", "640", "--top-k", "7"]) == 0
    sae, opened, options = calls[-1]
    assert sae.d_sae == 96 and opened.path == cache
    assert options == {
        "model": None, "features": [3, 90], "n_tokens": 640, "top_k": 7, "quantile_examples": 5, "progress": False,
        "folder": str(sae_folder), "seed": 0,
    }  # fmt: skip
    index = sae_folder / "dashboard/index.html"
    assert f"dashboard: {index}" in capsys.readouterr().out
    assert [f["id"] for f in read_chunk(index.parent, 1)["features"]] == [90]
    written = read_js(index.parent / "data/summary.js", "window.SAELAB_SUMMARY = ", ";\n")
    assert written["selection"] == "--select ids --features 3 90"
    assert written["build_command"] == f"saelab dashboard --sae {sae_folder} --cache {cache} --model none"
    assert written["serve_command"] == f"saelab serve --sae {sae_folder}"

    out = sae_folder.parent / "elsewhere"
    assert main([*argv, "--n-features", "10", "--out", str(out)]) == 0
    assert calls[-1][2]["features"] == list(range(10)) and calls[-1][2]["n_tokens"] is None
    assert main([*argv, "--out", str(out)]) == 0
    assert calls[-1][2]["features"] is None
    assert main([*argv, "--select", "random", "--n-features", "5", "--seed", "4", "--out", str(out)]) == 0
    assert calls[-1][2]["features"] == select_latents(calls[-1][0], calls[-1][1], "random", n=5, seed=4)
    assert calls[-1][2]["seed"] == 4
    assert main([*argv, "--select", "densest", "--n-features", "5", "--out", str(out)]) == 0
    assert calls[-1][2]["features"] == select_latents(calls[-1][0], calls[-1][1], "densest", n=5, progress=False)
    assert main([*argv, "--select", "ids", "--features", "7", "--out", str(out)]) == 0
    assert calls[-1][2]["features"] == [7]

    assert main([*argv, "--features", "96"]) == 2
    assert "outside this SAE's range 0..95" in capsys.readouterr().err
    assert main(["dashboard", "--sae", str(sae_folder), "--cache", str(sae_folder)]) == 2
    assert "is not a saelab activation cache" in capsys.readouterr().err


def test_cli_with_the_real_collector(tiny_sae_and_cache):
    """The two halves together: what collect_dashboard_data returns follows the contract and lands in the site."""
    pytest.importorskip("saelab.dashboard.collect")
    from helpers import perturb

    from saelab.config import SAEConfig
    from saelab.sae.io import save_sae
    from saelab.sae.registry import create_sae

    sae_folder, cache = tiny_sae_and_cache
    metadata = {"hook": "blocks.0.attn.hook_z", "model": "tiny-native"}
    hook_z = perturb(create_sae(64, SAEConfig(architecture="abstopk", d_sae=96, k=8), metadata=metadata))
    hook_z_folder = save_sae(hook_z, sae_folder.parent / "sae_z")
    for folder, model in ((sae_folder, "none"), (hook_z_folder, "tiny-native")):
        out = folder.parent / f"{folder.name}_dashboard"
        argv = ["dashboard", "--sae", str(folder), "--cache", str(cache), "--model", model, "--out", str(out)]
        assert main([*argv, "--features", "0", "95", "--quiet"]) == 0
        summary = read_js(out / "data/summary.js", "window.SAELAB_SUMMARY = ", ";\n")
        features = read_chunk(out, 0)["features"] + read_chunk(out, 1)["features"]
        assert_follows_contract({k: summary[k] for k in SUMMARY_KEYS}, features)
        assert len(read_js(out / "data/tokens.js", "window.SAELAB_TOKENS = ", ";\n")["latents"]) == 96
        assert [f["id"] for f in features] == [0, 95] and summary["signed"] == (folder == hook_z_folder)
        if folder == hook_z_folder:
            assert all(len(f["heads"]) == 4 and f["logits"] is not None for f in features if not f["dead"])
        else:
            assert all(f["heads"] is None and f["logits"] is None for f in features)


def test_cli_selects_latents_by_token_with_the_real_collector(tiny_sae_and_cache, tokenizer):
    sae_folder, cache = tiny_sae_and_cache
    out = sae_folder.parent / "by_token"
    argv = ["dashboard", "--sae", str(sae_folder), "--cache", str(cache), "--model", "none", "--out", str(out)]
    assert main([*argv, "--features", *map(str, range(40)), "--quiet"]) == 0
    built = [f for chunk in (0,) for f in read_chunk(out, chunk)["features"]]
    token = next(t for f in built for t in f["top_tokens"] if len(tokenizer.encode(t, add_special_tokens=False)) == 1)
    assert main([*argv, "--select", "token", "--token", token, "--n-features", "3", "--quiet"]) == 0
    summary = read_js(out / "data/summary.js", "window.SAELAB_SUMMARY = ", ";\n")
    chosen = [f for chunk in sorted({i // 64 for i in range(96)}) if (out / chunk_file(chunk)).is_file()
              for f in read_chunk(out, chunk)["features"]]  # fmt: skip
    assert summary["n_features"] == len(chosen) and 1 <= len(chosen) <= 3  # fewer when fewer latents list it
    assert all(token in f["top_tokens"] for f in chosen)
    assert summary["selection"] == f"--select token --n-features 3 --token {shlex.quote(token)}"


def test_a_damaged_cache_shard_is_named_instead_of_read(tmp_path, tiny_sae_and_cache, capsys):
    import shutil

    sae_folder, cache = tiny_sae_and_cache
    damaged = tmp_path / "cache"
    shutil.copytree(cache, damaged)
    shard = damaged / "shard_00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    argv = ["dashboard", "--sae", str(sae_folder), "--cache", str(damaged), "--model", "none", "--out", str(tmp_path / "d")]
    assert main([*argv, "--features", "0", "--quiet"]) == 2
    assert "shard_00001.safetensors is corrupt" in capsys.readouterr().err
