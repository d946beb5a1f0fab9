"""The `saelab dead` page: the summary's headline numbers and plotly figures of a run's latent history, written as
one self-contained HTML file (saelab.analysis.report). The statistics themselves: saelab.analysis.dead."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from saelab.analysis.dead import Deaths, LatentHistory
from saelab.analysis.metrics import DENSITY_BIN_EDGES, DENSITY_EPS
from saelab.analysis.report import Section, write_report
from saelab.config import DeadConfig


def write_dead_report(
    path: str | Path, history: LatentHistory, deaths: Deaths, config: DeadConfig, summary: dict[str, Any]
) -> Path:
    """Write the page of one run (its `summarize` summary and the figures of its history) to `path`."""
    title = f"Dead latents: {summary['run'] or Path(config.sae).name}"
    section = Section("Summary", "\n\n".join(summary_lines(summary)), figures=figures(history, deaths, config))
    return write_report(path, title, [section])


def summary_lines(summary: dict[str, Any]) -> list[str]:
    """The report's headline numbers, one sentence each."""
    dead, density = summary["dead"], summary["final_density"]
    lines = [
        f"{summary['d_sae']} latents, {summary['trained_tokens']:,} tokens, {summary['records']} records; "
        + f"dead threshold {summary['dead_tokens']:,} tokens",
        f"dead at the end: {dead['at_end']} ({100 * dead['fraction_at_end']:.2f}%); ever dead: {dead['ever']}; "
        + f"never revived: {dead['never_revived']}",
        f"revived: {dead['revived']} (after resampling {dead['revived_after_resample']}, otherwise "
        + f"{dead['revived_otherwise']})",
        f"final density over {density['over_tokens']:,} tokens: dense {100 * density['dense_fraction']:.2f}%, "
        + f"f < 1e-5 {100 * density['below_1e-05_fraction']:.2f}%, "
        + f"f < 1e-6 {100 * density['below_1e-06_fraction']:.2f}%",
    ]
    for group, stats in summary["decoder_geometry"].items():
        if stats is not None:
            parts = ", ".join(f"{k} {v:.3f}" for k, v in stats.items() if isinstance(v, float))
            lines.append(f"{group} ({stats['latents']}): {parts}")
    return lines


def figures(history: LatentHistory, deaths: Deaths, config: DeadConfig) -> list:
    """The page's plotly figures, in order: tokens since last firing, final densities, the density distribution
    over training, the timeline of latents that died (when any did) and dead latents over training."""
    threshold = config.dead_tokens or history.dead_tokens
    timeline = _death_timeline(history, deaths, config)
    return [
        _since_fired(history, threshold),
        _final_density(history, config),
        _density_over_training(history),
        *([timeline] if timeline is not None else []),
        _dead_over_training(history, deaths, threshold),
    ]


def _since_fired(history: LatentHistory, threshold: int):
    import plotly.graph_objects as go

    counts, edges = history.since_fired_histogram()
    since = go.Figure(
        go.Bar(x=((edges[1:] + edges[:-1]) / 2).tolist(), y=counts.tolist(), width=float(edges[1] - edges[0]))
    )
    since.add_vline(x=threshold, line_dash="dash", annotation_text=f"dead threshold {threshold:,}")
    since.update_layout(
        title="Tokens since last firing at the end of training",
        xaxis_title="tokens",
        yaxis_title="latents",
        yaxis_type="log",
    )
    return since


def _final_density(history: LatentHistory, config: DeadConfig):
    import plotly.graph_objects as go

    final, final_tokens = history.final_density(config.density_fraction)
    final_log = torch.log10(final + DENSITY_EPS)
    density_hist = go.Figure(go.Histogram(x=final_log.tolist(), nbinsx=80))
    density_hist.add_vline(
        x=torch.log10(torch.tensor(config.dense_threshold)).item(), line_dash="dash", annotation_text="dense"
    )
    density_hist.update_layout(
        title=f"log10(density + 1e-10) over the last {final_tokens:,} tokens",
        xaxis_title="log10 firing frequency",
        yaxis_title="latents",
        yaxis_type="log",
    )
    return density_hist


def _density_over_training(history: LatentHistory):
    import plotly.graph_objects as go

    centres = ((DENSITY_BIN_EDGES[1:] + DENSITY_BIN_EDGES[:-1]) / 2).tolist()
    histogram = history.density_histogram()
    heat = go.Figure(
        go.Heatmap(
            x=history.tokens.tolist(),
            y=centres,
            z=torch.log10(1 + histogram.T.double()).tolist(),
            colorscale="Viridis",
            colorbar_title="log10(1 + latents)",
            customdata=histogram.T.tolist(),
            hovertemplate="tokens %{x}<br>log10 f %{y}<br>%{customdata} latents<extra></extra>",
        )
    )
    heat.update_layout(
        title="Firing-frequency distribution over training (per record window)",
        xaxis_title="tokens",
        yaxis_title="log10(density + 1e-10)",
    )
    return heat


def _death_timeline(history: LatentHistory, deaths: Deaths, config: DeadConfig):
    """Density over training of (up to config.timeline_latents of) the latents ever dead; None if none was."""
    import plotly.graph_objects as go

    ever = deaths.ever_dead.nonzero().squeeze(1)
    if not len(ever):
        return None
    key = torch.where(deaths.dead_at_end, deaths.died_at, deaths.first_death)[ever]
    ordered = ever[torch.argsort(key * history.d_sae + ever, stable=True)]
    if len(ordered) > config.timeline_latents:
        ordered = ordered[torch.linspace(0, len(ordered) - 1, config.timeline_latents).round().long().unique()]
    log_f = torch.log10(history.density()[:, ordered].T)
    log_f[torch.isinf(log_f)] = float("nan")  # silent windows stay blank
    labels = [f"{int(i)}{' (dead)' if deaths.dead_at_end[i] else ' (revived)'}" for i in ordered]
    timeline = go.Figure(
        go.Heatmap(
            x=history.tokens.tolist(),
            y=labels,
            z=log_f.tolist(),
            colorscale="Viridis",
            colorbar_title="log10 f",
            hoverongaps=False,
        )
    )
    for t, _ in zip(history.resample_tokens.tolist(), history.resampled):
        timeline.add_vline(x=t, line_dash="dot", line_color="red")
    timeline.update_layout(
        title=f"Latents that died or revived ({len(ordered)} of {len(ever)}), sorted by death time; blank = silent",
        xaxis_title="tokens",
        yaxis_title="latent",
        height=max(400, 4 * len(ordered) + 150),
        yaxis={"type": "category", "autorange": "reversed", "showticklabels": len(ordered) <= 60},
    )
    return timeline


def _dead_over_training(history: LatentHistory, deaths: Deaths, threshold: int):
    import plotly.graph_objects as go

    tokens = history.tokens.tolist()
    over = go.Figure()
    over.add_scatter(x=tokens, y=deaths.dead.sum(1).tolist(), name="dead", mode="lines+markers")
    over.add_scatter(x=tokens, y=(history.counts == 0).sum(1).tolist(), name="silent in the window", mode="lines")
    for t, latents in zip(history.resample_tokens.tolist(), history.resampled):
        over.add_vline(x=t, line_dash="dot", line_color="red", annotation_text=f"resampled {len(latents)}")
    over.update_layout(
        title=f"Dead latents over training (silent for >= {threshold:,} tokens)",
        xaxis_title="tokens",
        yaxis_title="latents",
    )
    return over
