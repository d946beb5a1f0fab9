"""Reproduce the papers' claims (issue 19) on the embedded SmolLM2-135M, one subcommand per claim.

    python scripts/reproduce.py cache           # the activation caches every claim reads (timed on its own)
    python scripts/reproduce.py frontier        # 1. FVU and CE recovered against L0, every architecture
    python scripts/reproduce.py dead            # 2. dead latents: choice + aux_zipf vs TopK + AuxK vs ReLU-L1
    python scripts/reproduce.py gsae            # 3. g-SAE vs TopK downstream, over seeds
    python scripts/reproduce.py bidirectional   # 4. AbsTopK latents with different top tokens per sign, steering
    python scripts/reproduce.py darkmatter      # 5. linearly predictable SAE error across widths
    python scripts/reproduce.py attention       # 6. an attn.hook_z SAE: alive latents, head-level DFA
    python scripts/reproduce.py all             # the caches, then every claim, then tables.md
    python scripts/reproduce.py tables          # markdown tables of every finished claim (RESULTS.md's tables)
    python scripts/reproduce.py png             # the figures as PNG in docs/results/ (RESULTS.md's pictures)

    --out DIR   results folder (default runs/reproduce; runs/reproduce-quick with --quick)
    --quick     the whole pipeline at tiny scale on the random `tiny-native` model: checks the pipeline, not the
                numbers (a few minutes on 2 CPU cores)

Every claim runs the public `saelab` commands (train, eval, dead, darkmatter, dashboard, steer) in this process
and reads one shared activation cache (hooks `Scale.resid_hook` and `Scale.attn_hook`, harvested in one pass), or,
for g-SAE, a cache with LM-loss gradients. Within a claim every SAE trains on the same batches for the same
tokens. Each claim writes `<out>/<claim>/results.json` (tables whose numeric cells are {value, low, high} with a
95% interval: a bootstrap over evaluation contexts from `saelab eval`, a t interval over seeds, or a Wilson
interval over latents, as each table says) and `<out>/<claim>/figures.html` (plotly, offline). Finished
training, evaluation and analysis steps are kept and skipped on a rerun. Set HF_HUB_OFFLINE=1
HF_DATASETS_OFFLINE=1: nothing is downloaded.
"""

from __future__ import annotations

import argparse
import collections
import importlib
import itertools
import json
import math
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

# label -> sweep entry. The threshold family lq is left out: at its default q = 0.5 it is half thresholding.
FRONTIER_ARCHITECTURES = {
    "topk": "architecture=topk",
    "batchtopk": "architecture=batchtopk",
    "abstopk": "architecture=abstopk",
    "mutual choice": "architecture=choice",
    "feature choice": "architecture=choice,choice_mode=feature",
    "top-AFA": "architecture=topafa",
    "jumprelu": "architecture=jumprelu",
    "relu-l1": "architecture=relu",
    "soft": "architecture=threshold,threshold_family=soft",
    "hard": "architecture=threshold,threshold_family=hard",
    "half": "architecture=threshold,threshold_family=half",
    "cel0": "architecture=threshold,threshold_family=cel0",
}
FRONTIER_CLAIMS = [  # (claim, candidates, references): each candidate against each reference at equal L0
    ("AbsTopK improves reconstruction at equal L0", ["abstopk"], ["topk"]),
    ("l0-like thresholds (hard, half, CEL0) beat l1 / soft", ["hard", "half", "cel0"], ["relu-l1", "soft"]),
    ("mutual choice gives lower FVU at equal sparsity", ["mutual choice"], ["topk"]),
]
ZIPF_COEF = 0.03125  # aux_zipf's coefficient for the dead-latent claim (the old default, 1/32)
DEAD_VARIANTS = {
    "mutual choice + aux_zipf": f"architecture=choice,zipf_coef={ZIPF_COEF}",
    "feature choice + aux_zipf": f"architecture=choice,choice_mode=feature,zipf_coef={ZIPF_COEF}",
    "mutual choice, no aux_zipf": "architecture=choice",
    "topk + AuxK": "architecture=topk",
    "relu-l1": "architecture=relu",
}
GSAE_VARIANTS = {"topk": "architecture=topk", "g-SAE": "architecture=gsae"}
CLAIMS = ("frontier", "dead", "gsae", "bidirectional", "darkmatter", "attention")


@dataclass(frozen=True)
class Scale:
    """Everything that sets the size of the reproduction."""

    model: str
    resid_hook: str
    attn_hook: str
    cache_tokens: int  # the shared cache (both hooks)
    grads_cache_tokens: int  # the g-SAE cache (resid hook, with gradients)
    expansion: int
    train_tokens: int  # per SAE
    batch_size: int
    decoder_refit_tokens: int
    eval_tokens: int  # held-out text per `saelab eval`
    mean_ablation_tokens: int  # text whose mean activation is `saelab eval`'s mean-ablation baseline
    target_l0s: tuple[int, ...]
    headline_l0: int  # the L0 of the single-L0 claims
    dead_l0: int
    dead_window_tokens: int  # a latent is dead after this many tokens without firing (training and analysis)
    log_every: int
    seeds: tuple[int, ...]
    darkmatter_expansions: tuple[int, ...]
    darkmatter_fit_tokens: int
    darkmatter_eval_tokens: int
    downstream_tokens: int
    scan_tokens: int  # cached tokens scanned for AbsTopK's signed top activations
    top_examples: int
    dashboard_tokens: int
    steer_new_tokens: int
    induction_prompts: int
    induction_length: int


FULL = Scale(
    model="smollm2-135m", resid_hook="blocks.15.hook_resid_pre", attn_hook="blocks.15.attn.hook_z",
    cache_tokens=409_600, grads_cache_tokens=102_400, expansion=8, train_tokens=204_800, batch_size=4096,
    decoder_refit_tokens=32_768, eval_tokens=4096, mean_ablation_tokens=16_384, target_l0s=(8, 16, 32, 64),
    headline_l0=32, dead_l0=16, dead_window_tokens=102_400, log_every=5, seeds=(0, 1, 2),
    darkmatter_expansions=(2, 4, 8), darkmatter_fit_tokens=150_000, darkmatter_eval_tokens=100_000,
    downstream_tokens=4096, scan_tokens=131_072,
    top_examples=20, dashboard_tokens=131_072, steer_new_tokens=16, induction_prompts=8, induction_length=24,
)
QUICK = Scale(
    model="tiny-native", resid_hook="blocks.1.hook_resid_pre", attn_hook="blocks.1.attn.hook_z",
    cache_tokens=16_384, grads_cache_tokens=8192, expansion=2, train_tokens=8192, batch_size=1024,
    decoder_refit_tokens=2048, eval_tokens=1024, mean_ablation_tokens=1024, target_l0s=(8, 16), headline_l0=16,
    dead_l0=16, dead_window_tokens=2048, log_every=1, seeds=(0, 1), darkmatter_expansions=(1, 2),
    darkmatter_fit_tokens=8192, darkmatter_eval_tokens=4096, downstream_tokens=512, scan_tokens=4096,
    top_examples=8, dashboard_tokens=4096, steer_new_tokens=4, induction_prompts=3, induction_length=8,
)


@dataclass(frozen=True)
class Run:
    """One invocation: the scale, the results folder, and whether it is the --quick pipeline check."""

    scale: Scale
    out: Path
    quick: bool

    @property
    def cache(self) -> Path:
        return self.out / "cache"

    @property
    def grads_cache(self) -> Path:
        return self.out / "cache-grads"


# --- running saelab ------------------------------------------------------------------------------------------


def saelab(*argv: Any) -> Any:
    """Run one `saelab` subcommand in this process (its own flags and validation) and return its result object."""
    from saelab.cli import build_parser
    from saelab.config import from_args

    args = build_parser().parse_args([str(a) for a in argv])
    command = importlib.import_module(f"saelab.commands.{args.command}")
    print(f"[reproduce] saelab {' '.join(str(a) for a in argv)}", flush=True)
    return command.run(from_args(args.command_cls, args), progress=False)


def cache_complete(folder: Path) -> bool:
    manifest = folder / "manifest.json"
    return manifest.is_file() and bool(json.loads(manifest.read_text()).get("complete"))


def build_caches(run: Run) -> dict[str, float]:
    """The shared cache (both hooks, one forward pass) and the g-SAE cache (gradients); seconds per build."""
    scale, seconds = run.scale, {}
    builds = {
        "cache": (run.cache, [scale.resid_hook, scale.attn_hook], scale.cache_tokens, []),
        "cache-grads": (run.grads_cache, [scale.resid_hook], scale.grads_cache_tokens, ["--with-grads"]),
    }
    for name, (folder, hooks, tokens, extra) in builds.items():
        if cache_complete(folder):
            continue
        started = time.perf_counter()
        saelab("cache", "--model", scale.model, "--hooks", *hooks, "--n-tokens", tokens, "--out", folder, *extra,
               "--quiet")
        seconds[name] = round(time.perf_counter() - started, 1)
    return seconds


def run_folder(out: Path, hook: str, entry: str) -> Path:
    """The SAE folder `saelab train` writes for one sweep entry (the trainer's naming: hook__key=value_...)."""
    name = hook + "__" + "_".join(item.strip() for item in entry.split(","))
    return out / re.sub(r"[^A-Za-z0-9_.=-]", "-", name)


def train(run: Run, out: Path, hook: str, entries: Sequence[str], cache: Path, seed: int = 0,
          extra: Sequence[Any] = ()) -> list[Path]:
    """Train one SAE per sweep entry from the same batches of `cache` (skipped when all are saved)."""
    folders = [run_folder(out, hook, entry) for entry in entries]
    if not all((folder / "sae.safetensors").is_file() for folder in folders):
        scale = run.scale
        resume = ["--resume"] if (out / "checkpoint.pt").is_file() else []
        saelab("train", "--model", scale.model, "--cache", cache, "--hooks", hook, "--out", out, "--seed", seed,
               "--expansion", scale.expansion, "--train-tokens", scale.train_tokens, "--batch-size", scale.batch_size,
               "--decoder-refit-tokens", scale.decoder_refit_tokens,
               "--init-tokens", min(65_536, scale.cache_tokens // 2),
               *extra, "--sweep", *entries, *resume, "--quiet")
    return folders


def evaluate(run: Run, folders: Sequence[Path], report: Path) -> dict[str, dict[str, Any]]:
    """`saelab eval` of the folders in one pass over held-out text -> folder -> its evaluation."""
    if not report.is_file():
        saelab("eval", "--sae", *folders, "--n-tokens", run.scale.eval_tokens,
               "--mean-tokens", run.scale.mean_ablation_tokens, "--out", report, "--quiet")
    payload = json.loads(report.read_text())
    evaluations = payload.get("evaluations", [payload])
    return {str(Path(e["sae"])): e for e in evaluations}


# --- numbers with intervals -----------------------------------------------------------------------------------


def cell(value: float, low: float, high: float) -> dict[str, float]:
    return {"value": float(value), "low": float(low), "high": float(high)}


def eval_cell(evaluation: dict[str, Any], section: str, key: str) -> dict[str, float]:
    """A metric of `saelab eval` with its bootstrap interval over contexts."""
    block = evaluation[section]
    low, high = block[f"{key}_ci"]
    return cell(block[key], low, high)


def wilson(successes: int, n: int) -> dict[str, float]:
    """The fraction successes / n with its Wilson score interval (here: over latents)."""
    z = 1.959963984540054
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return cell(p, max(0.0, centre - half), min(1.0, centre + half))


# Student's t, 97.5% quantile by degrees of freedom (the two-sided 95% interval); beyond 10, the normal's 1.96 is
# within 10% of it, and no claim here runs more than 11 seeds.
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def over_seeds(values: Sequence[float]) -> dict[str, float]:
    """Mean with its 95% t interval over seeds (one value: a zero-width interval)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return cell(mean, mean, mean)
    half = T_975.get(len(values) - 1, 1.96) * statistics.stdev(values) / math.sqrt(len(values))
    return cell(mean, mean - half, mean + half)


def compare(candidate: dict[str, float], reference: dict[str, float], lower_is_better: bool = True) -> str:
    """'better' / 'worse' when the intervals do not overlap, else 'tie'."""
    if candidate["high"] < reference["low"]:
        return "better" if lower_is_better else "worse"
    if candidate["low"] > reference["high"]:
        return "worse" if lower_is_better else "better"
    return "tie"


def interpolate_at(points: Sequence[tuple[float, dict[str, float]]], l0: float) -> dict[str, float] | None:
    """A metric at `l0`, linear in log L0 between the two measured points around it (None outside them)."""
    points = sorted(points, key=lambda p: p[0])
    for (l0_a, a), (l0_b, b) in itertools.pairwise(points):
        if l0_a <= l0 <= l0_b:
            w = 0.0 if l0_b == l0_a else math.log(l0 / l0_a) / math.log(l0_b / l0_a)
            return {key: (1 - w) * a[key] + w * b[key] for key in ("value", "low", "high")}
    return None


def verdict(outcomes: Sequence[str]) -> str:
    counts = collections.Counter(outcomes)
    summary = ", ".join(f"{counts[o]} {o}" for o in ("better", "tie", "worse", "not comparable") if counts[o])
    if counts["better"] and not counts["worse"]:
        word = "reproduced" if counts["better"] == len(outcomes) else "partly reproduced"
    elif counts["worse"] and not counts["better"]:
        word = "not reproduced (the opposite holds)"
    elif counts["better"] and counts["worse"]:
        word = "mixed"
    else:
        word = "not resolved (intervals overlap)"
    return f"{word}: {summary} of {len(outcomes)} comparisons"


def table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], note: str = "") -> dict[str, Any]:
    return {"title": title, "columns": list(columns), "rows": [list(r) for r in rows], "note": note}


def write_results(run: Run, claim: str, results: dict[str, Any], figures: Sequence[Any]) -> Path:
    """results.json and figures.html (its tables and plotly figures) in <out>/<claim>."""
    from saelab.analysis.report import Section, write_report

    folder = run.out / claim
    results = {"claim": claim, "scale": asdict(run.scale), "quick": run.quick, **results,
               "figures": "figures.html"}
    sections = [
        Section(t["title"], text=t["note"], table=[dict(zip(t["columns"], map(cell_text, r))) for r in t["rows"]])
        for t in results["tables"]
    ]
    sections.append(Section("Figures", text="\n\n".join(results.get("verdicts", [])), figures=list(figures)))
    write_report(folder / "figures.html", f"reproduce: {claim}", sections)
    path = folder / "results.json"
    path.write_text(json.dumps(results, indent=1))
    return path


def cell_text(value: Any) -> str:
    if isinstance(value, dict):
        return f"{value['value']:.3g} ({value['low']:.3g}–{value['high']:.3g})"
    return str(value)


def timed(function: Callable[[Run], dict[str, Any]], run: Run) -> dict[str, Any]:
    started = time.perf_counter()
    results = function(run)
    results.setdefault("setup", {})["seconds"] = round(time.perf_counter() - started, 1)
    return results


def line_figure(title: str, x_title: str, y_title: str, series: dict[str, list[tuple[float, dict[str, float]]]],
                log_x: bool = False) -> Any:
    """One line per series through (x, cell) points, with the intervals as error bars."""
    import plotly.graph_objects as go

    figure = go.Figure()
    for name, points in series.items():
        points = sorted(points, key=lambda p: p[0])
        figure.add_trace(go.Scatter(
            x=[x for x, _ in points], y=[c["value"] for _, c in points], name=name, mode="lines+markers",
            error_y={"type": "data", "symmetric": False, "array": [c["high"] - c["value"] for _, c in points],
                     "arrayminus": [c["value"] - c["low"] for _, c in points]},
        ))
    figure.update_layout(title=title, xaxis_title=x_title, yaxis_title=y_title, height=500)
    if log_x:
        figure.update_xaxes(type="log")
    return figure


# --- 1. frontier ----------------------------------------------------------------------------------------------


def frontier_entries(scale: Scale) -> dict[tuple[str, int], str]:
    return {(label, l0): f"{entry},target_l0={l0}" for label, entry in FRONTIER_ARCHITECTURES.items()
            for l0 in scale.target_l0s}


def frontier(run: Run) -> dict[str, Any]:
    scale = run.scale
    entries = frontier_entries(scale)
    out = run.out / "frontier"
    folders = dict(zip(entries, train(run, out, scale.resid_hook, list(entries.values()), run.cache)))
    evaluations = evaluate(run, list(folders.values()), out / "eval.json")
    rows, fvu_points, ce_points = [], collections.defaultdict(list), collections.defaultdict(list)
    for (label, target), folder in folders.items():
        e = evaluations[str(folder)]
        l0, fvu = eval_cell(e, "sparsity", "l0"), eval_cell(e, "reconstruction", "fvu")
        ce = eval_cell(e, "downstream", "ce_recovered_zero")
        rows.append([label, target, l0, fvu, ce, eval_cell(e, "downstream", "delta_lm_loss"),
                     wilson(e["sparsity"]["dead"], e["d_sae"])])
        fvu_points[label].append((l0["value"], fvu))
        ce_points[label].append((l0["value"], ce))
    comparisons, verdicts = [], []
    for claim, candidates, references in FRONTIER_CLAIMS:
        outcomes = []
        for candidate in candidates:
            for reference in references:
                for target in scale.target_l0s:
                    ours = interpolate_at(fvu_points[candidate], target)
                    theirs = interpolate_at(fvu_points[reference], target)
                    outcome = "not comparable" if ours is None or theirs is None else compare(ours, theirs)
                    outcomes.append(outcome)
                    comparisons.append([claim, candidate, reference, target, ours or "–", theirs or "–", outcome])
        verdicts.append(f"{claim}: {verdict(outcomes)}")
    tables = [
        table("Every architecture at each target L0 (held-out text)",
              ["architecture", "target L0", "L0", "FVU", "CE recovered (zero abl.)", "ΔLM loss (nats)",
               "dead fraction (held out)"], rows,
              "L0, FVU, CE recovered and ΔLM loss: 95% bootstrap intervals over evaluation contexts; dead fraction: "
              "Wilson interval over latents."),
        table("The claims at equal L0 (FVU interpolated in log L0 between each architecture's own points)",
              ["claim", "candidate", "reference", "L0", "candidate FVU", "reference FVU", "outcome"], comparisons,
              "better / worse: the intervals do not overlap; tie: they do; not comparable: the L0 lies outside "
              "an architecture's measured range."),
    ]
    figures = [line_figure("FVU against L0", "L0 (held out)", "FVU", fvu_points, log_x=True),
               line_figure("CE recovered against L0", "L0 (held out)", "CE recovered (zero ablation)", ce_points,
                           log_x=True)]
    setup = {"hook": scale.resid_hook, "cache": str(run.cache), "d_sae": scale.expansion * _d_in(evaluations)}
    write_results(run, "frontier", {"setup": setup, "tables": tables, "verdicts": verdicts}, figures)
    return {"setup": setup, "tables": tables, "verdicts": verdicts}


def _d_in(evaluations: dict[str, dict[str, Any]]) -> int:
    return next(iter(evaluations.values()))["d_in"]


# --- 2. dead latents ------------------------------------------------------------------------------------------


def dead(run: Run) -> dict[str, Any]:
    scale = run.scale
    out = run.out / "dead"
    entries = {label: f"{entry},target_l0={scale.dead_l0}" for label, entry in DEAD_VARIANTS.items()}
    folders = dict(zip(entries, train(run, out, scale.resid_hook, list(entries.values()), run.cache,
                                      extra=["--dead-tokens", scale.dead_window_tokens, "--log-every",
                                             scale.log_every])))
    evaluations = evaluate(run, list(folders.values()), out / "eval.json")
    rows, over_training, histograms = [], {}, {}
    for label, folder in folders.items():
        report = folder / "dead.json"
        summary = (json.loads(report.read_text()) if report.is_file()
                   else saelab("dead", "--sae", folder, "--dead-tokens", scale.dead_window_tokens, "--quiet").summary)
        n, history = summary["d_sae"], summary["dead"]
        e = evaluations[str(folder)]
        rows.append([label, wilson(history["at_end"], n), wilson(history["ever"], n), wilson(history["revived"], n),
                     wilson(e["sparsity"]["dead"], n), eval_cell(e, "sparsity", "l0"),
                     eval_cell(e, "reconstruction", "fvu")])
        over_training[label] = [(r["tokens"], wilson(r["dead"], n)) for r in summary["over_training"]]
        histograms[label] = e["sparsity"]["log10_density_histogram"]
    # Training-time deaths need a window shorter than the run; the held-out count (never fired on the evaluated
    # tokens) separates the variants at any run length, so the verdicts read both.
    at_end = {row[0]: row[1] for row in rows}
    held_out = {row[0]: row[4] for row in rows}
    verdicts = []
    for name, column in (("dead at the end of training", at_end), ("never fired on held-out text", held_out)):
        outcomes = [compare(column[choice], column[base])
                    for choice in ("mutual choice + aux_zipf", "feature choice + aux_zipf")
                    for base in ("topk + AuxK", "relu-l1")]
        verdicts.append(f"choice with aux_zipf has fewer latents {name} than TopK + AuxK and ReLU-L1: "
                        f"{verdict(outcomes)}")
    zipf = compare(held_out["mutual choice + aux_zipf"], held_out["mutual choice, no aux_zipf"])
    verdicts.append(f"aux_zipf lowers mutual choice's latents never fired on held-out text: {verdict([zipf])}")
    tables = [table(
        f"Dead latents at target L0 {scale.dead_l0} (dead: no firing in {scale.dead_window_tokens:,} tokens)",
        ["variant", "dead at end of training", "ever dead", "revived", "never fired on held-out text", "L0", "FVU"],
        rows, "Fractions of latents with Wilson intervals over latents; L0 and FVU with bootstrap intervals over "
        "held-out contexts. aux_zipf coefficient " + str(ZIPF_COEF) + ".")]
    figures = [line_figure("Dead latents over training", "training tokens", "dead fraction", over_training),
               _histogram_figure(histograms)]
    setup = {"hook": scale.resid_hook, "cache": str(run.cache), "target_l0": scale.dead_l0}
    write_results(run, "dead", {"setup": setup, "tables": tables, "verdicts": verdicts}, figures)
    return {"setup": setup, "tables": tables, "verdicts": verdicts}


def _histogram_figure(histograms: dict[str, dict[str, list]]) -> Any:
    import plotly.graph_objects as go

    figure = go.Figure()
    for label, histogram in histograms.items():
        edges = histogram["edges"]
        centres = [(a + b) / 2 for a, b in itertools.pairwise(edges)]
        figure.add_trace(go.Scatter(x=centres, y=histogram["counts"], name=label, mode="lines+markers"))
    figure.update_layout(title="Latent density on held-out text", xaxis_title="log10 firing frequency",
                         yaxis_title="latents", height=500)
    return figure


# --- 3. g-SAE -------------------------------------------------------------------------------------------------


def gsae(run: Run) -> dict[str, Any]:
    scale = run.scale
    entries = {label: f"{entry},target_l0={scale.headline_l0}" for label, entry in GSAE_VARIANTS.items()}
    folders = {}
    for seed in scale.seeds:
        trained = train(run, run.out / "gsae" / f"seed{seed}", scale.resid_hook, list(entries.values()),
                        run.grads_cache, seed=seed)
        folders.update({(label, seed): folder for label, folder in zip(entries, trained)})
    evaluations = evaluate(run, list(folders.values()), run.out / "gsae" / "eval.json")
    metrics = {"ce_recovered_zero": "CE recovered (zero abl.)", "delta_lm_loss": "ΔLM loss (nats)"}
    per_seed = [[label, seed, eval_cell(evaluations[str(f)], "reconstruction", "fvu"),
                 *(eval_cell(evaluations[str(f)], "downstream", m) for m in metrics)]
                for (label, seed), f in folders.items()]
    value = {key: {m: evaluations[str(f)]["downstream"][m] for m in metrics} for key, f in folders.items()}
    summary = [[label, *(over_seeds([value[label, s][m] for s in scale.seeds]) for m in metrics)] for label in entries]
    difference = [over_seeds([value["g-SAE", s][m] - value["topk", s][m] for s in scale.seeds]) for m in metrics]
    summary.append(["g-SAE − topk (paired by seed)", *difference])
    ce_gain, loss_change = difference
    verdicts = [f"g-SAE recovers more CE than TopK at equal k: {verdict([compare(ce_gain, cell(0, 0, 0), False)])}",
                f"g-SAE has a lower ΔLM loss than TopK: {verdict([compare(loss_change, cell(0, 0, 0))])}"]
    tables = [
        table(f"g-SAE and TopK at k = {scale.headline_l0}, per seed", ["SAE", "seed", "FVU", *metrics.values()],
              per_seed, "95% bootstrap intervals over held-out contexts."),
        table(f"Over {len(scale.seeds)} seeds", ["SAE", *metrics.values()], summary,
              "Mean over seeds with a 95% t interval over seeds."),
    ]
    figures = [line_figure("Downstream loss per seed", "seed", "ΔLM loss (nats)",
                           {label: [(s, eval_cell(evaluations[str(folders[label, s])], "downstream", "delta_lm_loss"))
                                    for s in scale.seeds] for label in entries})]
    setup = {"hook": scale.resid_hook, "cache": str(run.grads_cache), "k": scale.headline_l0, "gsae_beta": 1.0}
    write_results(run, "gsae", {"setup": setup, "tables": tables, "verdicts": verdicts}, figures)
    return {"setup": setup, "tables": tables, "verdicts": verdicts}


# --- 4. bidirectional AbsTopK latents ---------------------------------------------------------------------------


def abstopk_sae(run: Run) -> Path:
    """The frontier's AbsTopK at the headline L0, trained alone with the same settings if the frontier has not run."""
    entry = frontier_entries(run.scale)["abstopk", run.scale.headline_l0]
    folder = run_folder(run.out / "frontier", run.scale.resid_hook, entry)
    if (folder / "sae.safetensors").is_file():
        return folder
    return train(run, run.out / "bidirectional" / "sae", run.scale.resid_hook, [entry], run.cache)[0]


OUTLIER_NORM = 3.0  # `saelab eval`'s rule: tokens above 3x the median norm (attention sinks) are left out


@torch.no_grad()
def signed_top_activations(sae: Any, cache: Any, hook: str, n_tokens: int, keep: int) -> dict[str, torch.Tensor]:
    """Per latent and sign: how often it fires, and its `keep` largest |activations| with their token ids, over
    the tokens whose norm is at most OUTLIER_NORM x the batch's median (the few attention-sink tokens right after
    BOS reach 100x the median norm and would otherwise hold every latent's largest activations)."""
    d_sae = sae.d_sae
    found = {sign: {"values": torch.zeros(keep, d_sae), "tokens": torch.zeros(keep, d_sae, dtype=torch.long),
                    "count": torch.zeros(d_sae, dtype=torch.long)} for sign in ("positive", "negative")}
    for start in range(0, n_tokens, 4096):
        batch = cache.read(torch.arange(start, min(start + 4096, n_tokens)), hooks=[hook])
        x = batch.acts[hook].float()
        norms = x.norm(dim=1)
        code = sae.encode(x) * (norms <= OUTLIER_NORM * norms.median())[:, None]
        for sign, signed in (("positive", code), ("negative", -code)):
            top = found[sign]
            top["count"] += (signed > 0).sum(0)
            values = torch.cat([top["values"], signed.clamp_min(0)])
            tokens = torch.cat([top["tokens"], batch.token_ids[:, None].expand(-1, d_sae)])
            best = values.topk(keep, dim=0).indices
            top["values"], top["tokens"] = values.gather(0, best), tokens.gather(0, best)
    return found


def top_tokens(values: torch.Tensor, tokens: torch.Tensor, n: int = 3) -> list[int]:
    """The most frequent token ids among a latent's top activations (values > 0)."""
    return [t for t, _ in collections.Counter(tokens[values > 0].tolist()).most_common(n)]


def bidirectional(run: Run) -> dict[str, Any]:
    from saelab.activations.cache import ActivationCache
    from saelab.models import load_tokenizer
    from saelab.sae.io import load_saes

    scale = run.scale
    folder = abstopk_sae(run)
    ((_, sae, hook),) = load_saes([str(folder)])
    cache = ActivationCache(run.cache)
    scanned = min(scale.scan_tokens, cache.n_tokens)
    found = signed_top_activations(sae, cache, hook, scanned, scale.top_examples)
    positive, negative = found["positive"], found["negative"]
    alive = (positive["count"] + negative["count"]) > 0
    minimum = max(3, scale.top_examples // 4)
    both_signs = (positive["count"] >= minimum) & (negative["count"] >= minimum)
    different = torch.zeros_like(both_signs)
    for latent in both_signs.nonzero().squeeze(1).tolist():
        pos = top_tokens(positive["values"][:, latent], positive["tokens"][:, latent])
        neg = top_tokens(negative["values"][:, latent], negative["tokens"][:, latent])
        different[latent] = bool(pos and neg and not set(pos) & set(neg))
    n_alive = int(alive.sum())
    tokenizer = load_tokenizer(scale.model)

    def spelled_top_tokens(top: dict[str, torch.Tensor], latent: int) -> list[str]:
        return [repr(tokenizer.decode([t])) for t in top_tokens(top["values"][:, latent], top["tokens"][:, latent])]

    strength = torch.minimum(positive["values"][0], negative["values"][0]) * different
    examples = []
    for latent in strength.topk(min(5, int(different.sum()))).indices.tolist():
        examples.append({"latent": latent, "positive_top_tokens": spelled_top_tokens(positive, latent),
                         "negative_top_tokens": spelled_top_tokens(negative, latent),
                         "max_positive": float(positive["values"][0, latent]),
                         "max_negative": -float(negative["values"][0, latent]),
                         "positive_firings": int(positive["count"][latent]),
                         "negative_firings": int(negative["count"][latent])})
    steering = _steering_example(run, folder, examples[0]) if examples else None
    dashboard = run.out / "bidirectional" / "dashboard"
    if examples and not (dashboard / "index.html").is_file():
        saelab("dashboard", "--sae", folder, "--cache", run.cache, "--features", *[e["latent"] for e in examples],
               "--n-tokens", scale.dashboard_tokens, "--out", dashboard, "--quiet")
    rows = [["alive latents that fire with both signs", wilson(int(both_signs.sum()), n_alive)],
            ["alive latents whose two signs have disjoint top tokens", wilson(int(different.sum()), n_alive)]]
    tables = [table(f"AbsTopK (k = {scale.headline_l0}) over {scanned:,} cached tokens",
                    ["measure", "fraction of alive latents"], rows,
                    f"Both signs: at least {minimum} firings of each sign. Disjoint: the 3 most frequent tokens among "
                    f"the {scale.top_examples} largest positive and the {scale.top_examples} largest negative "
                    f"activations share none. Wilson intervals over the {n_alive} alive latents.")]
    verdicts = [(f"AbsTopK has latents whose positive and negative activations fall on different tokens: "
                f"{int(different.sum())} of {n_alive} alive latents (whether the tokens carry opposite concepts is "
                "read from the examples, not computed)")]
    figure = _signed_figure(positive, negative, alive)
    results = {"setup": {"hook": hook, "sae": str(folder)}, "tables": tables, "verdicts": verdicts,
               "examples": examples, "steering": steering,
               "dashboard": str(dashboard / "index.html") if examples else None}
    write_results(run, "bidirectional", results, [figure])
    return results


STEER_SCALE = 4.0  # steering strength in units of the latent's largest |activation| (the README's 16 for ~4)


def _steering_example(run: Run, folder: Path, example: dict[str, Any]) -> dict[str, Any]:
    """Add the latent's direction with a negative and a positive alpha, STEER_SCALE times its largest |activation|."""
    alpha = STEER_SCALE * max(example["max_positive"], -example["max_negative"])
    result = saelab("steer", "--sae", folder, "--feature", example["latent"], "--alpha", -alpha, alpha,
                    "--max-new-tokens", run.scale.steer_new_tokens, "--quiet")
    return {"latent": example["latent"], "prompt": result.options.prompt, "baseline": result.baseline[0],
            "clean_loss": result.clean_loss,
            "steered": [{"alpha": s.alpha, "completion": s.completions[0], "reference_loss": s.reference_loss}
                        for s in result.steered]}


def _signed_figure(positive: dict[str, torch.Tensor], negative: dict[str, torch.Tensor], alive: torch.Tensor) -> Any:
    import plotly.graph_objects as go

    figure = go.Figure(go.Scattergl(
        x=torch.log10(positive["count"][alive].float() + 1).tolist(),
        y=torch.log10(negative["count"][alive].float() + 1).tolist(), mode="markers", marker={"size": 4}))
    figure.update_layout(title="AbsTopK: positive against negative firings per latent", height=500,
                         xaxis_title="log10(1 + positive firings)", yaxis_title="log10(1 + negative firings)")
    return figure


# --- 5. dark matter -------------------------------------------------------------------------------------------


def darkmatter(run: Run) -> dict[str, Any]:
    scale = run.scale
    entries = [f"architecture=topk,target_l0={scale.headline_l0},expansion={e}" for e in scale.darkmatter_expansions]
    per_seed = {}
    for seed in scale.seeds:
        out = run.out / "darkmatter" / f"seed{seed}"
        folders = train(run, out, scale.resid_hook, entries, run.cache, seed=seed)
        report = out / "analysis" / "darkmatter.json"
        if not report.is_file():
            saelab("darkmatter", "--sae", *folders, "--cache", run.cache, "--fit-tokens", scale.darkmatter_fit_tokens,
                   "--eval-tokens", scale.darkmatter_eval_tokens, "--downstream", "--downstream-tokens",
                   scale.downstream_tokens, "--out", out / "analysis", "--quiet")
        per_seed[seed] = json.loads(report.read_text())
    measures = {
        "FVU": lambda s, ce: s["fvu"],
        "error variance linearly predictable (pooled R²)": lambda s, ce: s["error_r2"]["held_out"]["pooled"],
        "‖e‖² linearly predictable (R²)": lambda s, ce: s["norm_r2"]["held_out"]["error"],
        "nonlinear error's share of the CE increase": lambda s, ce: _nonlinear_share(s["downstream_ce"], ce),
    }
    rows, series = [], collections.defaultdict(list)
    for expansion in scale.darkmatter_expansions:
        values = collections.defaultdict(list)
        for seed, report in per_seed.items():
            sae = next(s for name, s in report["saes"].items() if name.endswith(f"expansion={expansion}"))
            for measure, read in measures.items():
                values[measure].append(read(sae, report["downstream"]))
        cells = {m: over_seeds(v) for m, v in values.items()}
        rows.append([expansion, *cells.values()])
        for measure, c in cells.items():
            if measure != "FVU":
                series[measure].append((expansion, c))
    tables = [table(f"TopK (k = {scale.headline_l0}) at several widths, over {len(scale.seeds)} seeds",
                    ["expansion", *measures], rows,
                    "Mean over seeds with a 95% t interval. R² on held-out cached tokens (positions ≥ 16) of a "
                    "least-squares map from x; CE share: (CE[x̂ + linear error] − CE[x]) / (CE[x̂] − CE[x]).")]
    shares = [row[-1] for row in rows]
    verdicts = [(f"Part of the SAE error is linearly predictable from x: pooled R² "
                f"{', '.join(cell_text(row[2]) for row in rows)} across widths (the paper: about half); "
                f"‖e‖² R² {', '.join(cell_text(row[3]) for row in rows)} (the paper: over 90%)"),
                f"The nonlinear error's share of the CE increase: {', '.join(cell_text(s) for s in shares)}"]
    figures = [line_figure("Dark matter against width", "expansion", "fraction", series, log_x=True)]
    setup = {"hook": scale.resid_hook, "cache": str(run.cache)}
    write_results(run, "darkmatter", {"setup": setup, "tables": tables, "verdicts": verdicts}, figures)
    return {"setup": setup, "tables": tables, "verdicts": verdicts}


def _nonlinear_share(ce: dict[str, float], downstream: dict[str, Any]) -> float:
    """(CE with x_hat + linear error − clean) / (CE with x_hat − clean): the CE gap the nonlinear error leaves."""
    clean = downstream["clean"]
    return (ce["reconstruction_plus_linear_error"] - clean) / (ce["reconstruction"] - clean)


# --- 6. attention SAEs ----------------------------------------------------------------------------------------


def attention(run: Run) -> dict[str, Any]:
    from saelab.models import load_model
    from saelab.sae.io import load_saes

    scale = run.scale
    out = run.out / "attention"
    (folder,) = train(run, out, scale.attn_hook, [f"architecture=topk,target_l0={scale.headline_l0}"], run.cache)
    evaluation = evaluate(run, [folder], out / "eval.json")[str(folder)]
    summary = saelab("dead", "--sae", folder, "--quiet").summary
    n = summary["d_sae"]
    rows = [["alive at the end of training", wilson(n - summary["dead"]["at_end"], n)],
            ["fired on held-out text", wilson(n - evaluation["sparsity"]["dead"], n)],
            ["FVU", eval_cell(evaluation, "reconstruction", "fvu")],
            ["CE recovered (zero abl.)", eval_cell(evaluation, "downstream", "ce_recovered_zero")]]
    ((_, sae, _),) = load_saes([str(folder)])
    model = load_model(scale.model)
    induction = induction_attribution(model, sae, scale)
    rows += [[f"latent {induction['latent']}: activation, second repeat / first", induction["activation_ratio"]],
             [f"latent {induction['latent']}: share of its head attribution from head {induction['head']}",
              induction["head_share"]],
             [f"head {induction['head']}: share of its positive source attribution at the induction offset",
              induction["induction_share"]]]
    tables = [table(f"TopK SAE (k = {scale.headline_l0}) on {scale.attn_hook}", ["measure", "value"], rows,
                    "Alive / fired: Wilson intervals over latents (alive: fired within the last "
                    f"{summary['dead_tokens']:,} training tokens). FVU, CE: bootstrap over held-out contexts. The "
                    f"DFA rows: mean over {scale.induction_prompts} random token sequences repeated twice, with a t "
                    "interval over sequences.")]
    verdicts = [f"Most attention-SAE latents are alive: {cell_text(rows[0][1])} alive at the end of training",
                (f"Head-level DFA of the latent that fires most on repeated text (latent {induction['latent']}): head "
                f"{induction['head']} carries {cell_text(induction['head_share'])} of its attribution, "
                f"{cell_text(induction['induction_share'])} of it from the induction source position")]
    write_results(run, "attention", {"setup": {"hook": scale.attn_hook, "sae": str(folder)}, "tables": tables,
                                     "verdicts": verdicts}, [induction.pop("figure")])
    return {"tables": tables, "verdicts": verdicts}


@torch.no_grad()
def induction_attribution(model: Any, sae: Any, scale: Scale) -> dict[str, Any]:
    """On random token sequences repeated twice: the latent most active on the second repeat, the head that
    carries it, and how much of that head's attribution comes from the position after the token's earlier copy."""
    import plotly.graph_objects as go

    from saelab.analysis.attribution import attention_attribution

    hook, length = sae.metadata["hook"], scale.induction_length
    generator = torch.Generator().manual_seed(0)
    prompts = []
    for _ in range(scale.induction_prompts):
        sequence = torch.randint(1000, 20_000, (length,), generator=generator)
        prompts.append(torch.cat([torch.tensor([model.tokenizer.bos_token_id]), sequence, sequence]))
    first, second = slice(1, length + 1), slice(length + 1, 2 * length + 1)
    lift = torch.zeros(sae.d_sae)
    for tokens in prompts:
        _, cache = model.run_with_cache(tokens[None], names_filter=lambda name: name == hook)
        code = sae.encode(cache[hook][0].reshape(len(tokens), -1).to(sae.W_enc))
        lift += code[second].mean(0) - code[first].mean(0)
    latent = int(lift.argmax())
    attributions = [attention_attribution(model, sae, tokens, latent) for tokens in prompts]
    head = int(torch.stack([a.heads[second].sum(0) for a in attributions]).sum(0).argmax())
    ratios, head_shares, induction_shares = [], [], []
    for a in attributions:
        ratios.append(float(a.pre[second].clamp_min(0).mean() / a.pre[first].clamp_min(0).mean().clamp_min(1e-6)))
        head_shares.append(float(a.heads[second, head].sum() / a.heads[second].abs().sum().clamp_min(1e-12)))
        positive = a.sources[second, head].clamp_min(0)  # [second-repeat destinations, sources]
        offsets = torch.arange(length + 1, 2 * length + 1) - length + 1  # the token after the earlier copy
        at_offset = positive[torch.arange(length), offsets].sum()
        induction_shares.append(float(at_offset / positive.sum().clamp_min(1e-12)))
    first_prompt = attributions[0]
    figure = go.Figure(go.Heatmap(z=first_prompt.heads.T.tolist(), colorscale="RdBu", zmid=0))
    figure.update_layout(title=f"Latent {latent}: attribution by head (rows) and position (columns), first "
                               "repeated sequence", xaxis_title="position", yaxis_title="head", height=450)
    return {"latent": latent, "head": head, "activation_ratio": over_seeds(ratios),
            "head_share": over_seeds(head_shares), "induction_share": over_seeds(induction_shares),
            "figure": figure}


# --- tables ---------------------------------------------------------------------------------------------------


def markdown_tables(out: Path) -> str:
    """Every finished claim's tables and verdicts as markdown (the tables of RESULTS.md)."""
    parts = []
    for claim in CLAIMS:
        path = out / claim / "results.json"
        if not path.is_file():
            continue
        results = json.loads(path.read_text())
        parts.append(f"### {claim}\n")
        for t in results["tables"]:
            parts.append(f"**{t['title']}**\n")
            parts.append("| " + " | ".join(t["columns"]) + " |")
            parts.append("|" + "---|" * len(t["columns"]))
            parts += ["| " + " | ".join(cell_text(v) for v in row) + " |" for row in t["rows"]]
            parts.append(f"\n{t['note']}\n" if t["note"] else "")
        parts += [f"- {v}" for v in results.get("verdicts", [])]
        parts.append(f"\nFigures: `{out / claim / results['figures']}`; {results['setup'].get('seconds', '?')} s.\n")
    return "\n".join(parts)


def figure_pngs(out: Path, folder: Path) -> list[Path]:
    """Every finished claim's plotly figures as PNG files in `folder` (<claim>_<n>.png), drawn by headless Chromium
    (Debian's chromium and the playwright package of the dev extra), for RESULTS.md."""
    from playwright.sync_api import sync_playwright

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium",
                                             args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        page = browser.new_page(viewport={"width": 1000, "height": 800})
        for claim in CLAIMS:
            if not (out / claim / "figures.html").is_file():
                continue
            page.goto((out / claim / "figures.html").resolve().as_uri())
            page.wait_for_selector(".plotly-graph-div .main-svg")
            for n, plot in enumerate(page.query_selector_all(".plotly-graph-div")):
                written.append(folder / f"{claim}_{n}.png")
                plot.screenshot(path=str(written[-1]))
        browser.close()
    return written


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("claim", choices=["cache", *CLAIMS, "all", "tables", "png"])
    parser.add_argument("--out", default="")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    run = Run(QUICK if args.quick else FULL, Path(args.out or ("runs/reproduce-quick" if args.quick else
                                                               "runs/reproduce")), args.quick)
    run.out.mkdir(parents=True, exist_ok=True)
    if args.claim in ("cache", "all"):
        started = time.perf_counter()
        built = build_caches(run)
        record = {"built_seconds": built, "total_seconds": round(time.perf_counter() - started, 1)}
        (run.out / "cache.json").write_text(json.dumps(record, indent=1))
        print(f"[reproduce] caches: {record}")
    functions = {"frontier": frontier, "dead": dead, "gsae": gsae, "bidirectional": bidirectional,
                 "darkmatter": darkmatter, "attention": attention}
    for claim in CLAIMS if args.claim == "all" else [args.claim] if args.claim in functions else []:
        build_caches(run)
        results = timed(functions[claim], run)
        _record_seconds(run.out / claim / "results.json", results["setup"]["seconds"])
        print(f"[reproduce] {claim}: {results['setup']['seconds']} s", *results.get("verdicts", []), sep="\n  ")
    if args.claim in ("all", "tables"):
        (run.out / "tables.md").write_text(markdown_tables(run.out))
        print(f"[reproduce] tables: {run.out / 'tables.md'}")
    if args.claim == "png":
        for path in figure_pngs(run.out, Path("docs/results")):
            print(f"[reproduce] {path}")


def _record_seconds(path: Path, seconds: float) -> None:
    results = json.loads(path.read_text())
    results["setup"]["seconds"] = seconds
    path.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    sys.exit(main())
