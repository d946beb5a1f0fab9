"""scripts/reproduce.py --quick: the whole claims pipeline at tiny scale on the random tiny-native model (no
SmolLM2 forward). Checks that every claim writes well-formed results, not what the numbers are."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "reproduce.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("reproduce", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


reproduce = _load_script()


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reproduce")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    subprocess.run([sys.executable, str(SCRIPT), "all", "--quick", "--out", str(out)], check=True, env=env, cwd=ROOT)
    return out


def _numbers(rows):
    return [value for row in rows for value in row if isinstance(value, dict)]


@pytest.mark.parametrize("claim", reproduce.CLAIMS)
def test_every_claim_writes_tables_with_intervals_and_figures(quick_run, claim):
    results = json.loads((quick_run / claim / "results.json").read_text())
    assert results["quick"] and results["tables"] and results["verdicts"]
    assert results["setup"]["seconds"] > 0
    for table in results["tables"]:
        assert table["rows"], table["title"]
        assert all(len(row) == len(table["columns"]) for row in table["rows"]), table["title"]
        numbers = _numbers(table["rows"])
        assert numbers, table["title"]
        for number in numbers:
            assert set(number) == {"value", "low", "high"}
            assert all(math.isfinite(number[key]) for key in number), (table["title"], number)
            assert number["low"] <= number["high"], (table["title"], number)
    page = (quick_run / claim / "figures.html").read_text()
    assert "plotly" in page.lower() and page.count("class=\"plotly-graph-div\"") >= 1


def test_frontier_has_every_architecture_at_every_target(quick_run):
    results = json.loads((quick_run / "frontier" / "results.json").read_text())
    main, comparisons = results["tables"]
    scale = reproduce.QUICK
    assert {(row[0], row[1]) for row in main["rows"]} == {
        (label, l0) for label in reproduce.FRONTIER_ARCHITECTURES for l0 in scale.target_l0s
    }
    assert {row[0] for row in comparisons["rows"]} == {claim for claim, _, _ in reproduce.FRONTIER_CLAIMS}
    assert len(results["verdicts"]) == len(reproduce.FRONTIER_CLAIMS)


def test_claim_tables_have_their_rows(quick_run):
    def rows(claim, index=0):
        return json.loads((quick_run / claim / "results.json").read_text())["tables"][index]["rows"]

    assert [row[0] for row in rows("dead")] == list(reproduce.DEAD_VARIANTS)
    assert len(rows("gsae")) == len(reproduce.GSAE_VARIANTS) * len(reproduce.QUICK.seeds)
    assert [row[0] for row in rows("gsae", 1)] == [*reproduce.GSAE_VARIANTS, "g-SAE − topk (paired by seed)"]
    assert [row[0] for row in rows("darkmatter")] == list(reproduce.QUICK.darkmatter_expansions)
    assert len(rows("attention")) == 7


def test_bidirectional_example_dashboard_and_negative_steering(quick_run):
    results = json.loads((quick_run / "bidirectional" / "results.json").read_text())
    assert results["examples"]
    assert Path(results["dashboard"]).is_file()
    alphas = [s["alpha"] for s in results["steering"]["steered"]]
    assert min(alphas) < 0 < max(alphas)
    assert all(math.isfinite(s["reference_loss"]) for s in results["steering"]["steered"])


def test_markdown_tables_render_every_claim(quick_run):
    text = (quick_run / "tables.md").read_text()
    assert text == reproduce.markdown_tables(quick_run)
    for claim in reproduce.CLAIMS:
        assert f"### {claim}" in text
    assert json.loads((quick_run / "cache.json").read_text())["built_seconds"].keys() == {"cache", "cache-grads"}
