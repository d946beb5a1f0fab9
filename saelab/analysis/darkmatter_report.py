"""The dark-matter report: the headline numbers per SAE (`summary_rows`, also what `saelab darkmatter` prints) and
the self-contained HTML page of tables and figures (`write_darkmatter_report`). The JSON is `DarkMatterResult.to_dict`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from saelab.analysis.darkmatter import NORM_TARGETS, SPLICES, TOP_FRACTION, DarkMatterResult
from saelab.analysis.report import Section, write_report

NORM_LABELS = {
    "error": "||e||^2",
    "reconstruction": "||x_hat||^2",
    "input": "||x||^2",
    "nonlinear_error": "||eps_NL||^2",
}
SPLICE_LABELS = {
    "reconstruction": "x_hat",
    "reconstruction_plus_linear_error": "x_hat + x W*",
    "reconstruction_plus_nonlinear_error": "x_hat + eps_NL",
}
SCATTER_POINTS = 2000


def summary_rows(result: DarkMatterResult) -> list[dict[str, Any]]:
    """One row per SAE of the headline held-out numbers (the report's table and the CLI's printout)."""
    rows = []
    for s in result.saes:
        row = {
            "SAE": s.name,
            "L0": s.l0,
            "FVU": s.fvu,
            "nonlinear FVU": s.nonlinear_fvu,
            "error R2 pooled": s.error_r2.pooled,
            "error R2 mean/dim": s.error_r2.mean_per_dim,
            "error R2 pooled (fit)": s.error_r2_fit.pooled,
        }
        row.update({f"{NORM_LABELS[t]} R2": s.norm_r2[t] for t in NORM_TARGETS})
        rows.append(row)
    return rows


def write_darkmatter_report(result: DarkMatterResult, path: str | Path) -> Path:
    """The HTML report of `result`: tables of every headline number and the figures."""
    sections = [
        _setup_section(result),
        Section(
            "Summary (held-out)",
            "x = x_hat + x W* + eps_NL. error R2: share of the error vector e explained by x W* (pooled over "
            "dimensions, and the mean of per-dimension R2 as the paper reports). Norm R2: a linear, intercept-free "
            "prediction of each per-token squared norm from x. Engels et al. (Gemma Scope 9B, layer 20) find about "
            "half of the error variance and over 90% of ||e||^2 linearly predictable.",
            summary_rows(result),
        ),
        _error_vector_section(result),
        _error_norms_section(result),
        _nonlinear_fvu_section(result),
    ]
    if len(result.saes) > 1:
        sections.append(_shared_failures_section(result))
    if result.downstream:
        sections.append(_downstream_section(result))
    return write_report(path, "SAE dark matter: linear and nonlinear error", sections)


def _setup_section(result: DarkMatterResult) -> Section:
    setup = result.setup
    return Section(
        "Setup",
        f"Hook {setup.get('hook')} of {setup.get('model')}, d_in {result.d_in}. W* fitted on "
        f"{result.fit_tokens:,} tokens of {setup.get('fit_cache')}, evaluated on {result.eval_tokens:,} "
        f"held-out tokens of {setup.get('eval_cache')}; positions < {setup.get('skip_positions')} dropped. "
        f"Least squares {'with' if result.intercept else 'without'} intercept, rcond {result.rcond:g} on "
        f"X^T X: rank {result.rank}, condition number of X {result.condition_number:.4g}. Wall time "
        f"{setup.get('wall_seconds', {}).get('total', math.nan):.1f} s."
        + "".join(f"\n\n{note}" for note in setup.get("notes", [])),
    )


def _error_vector_section(result: DarkMatterResult) -> Section:
    import plotly.graph_objects as go

    histogram = go.Figure(
        [go.Histogram(x=s.error_r2.per_dim.numpy(), name=s.name, opacity=0.6, nbinsx=60) for s in result.saes]
    )
    histogram.update_layout(
        barmode="overlay", title="Held-out R2 of the error, per dimension", xaxis_title="R2_j", yaxis_title="dimensions"
    )
    return Section("Error vector", figures=[histogram])


def _error_norms_section(result: DarkMatterResult) -> Section:
    import plotly.graph_objects as go

    bars = go.Figure(
        [
            go.Bar(x=[NORM_LABELS[t] for t in NORM_TARGETS], y=[s.norm_r2[t] for t in NORM_TARGETS], name=s.name)
            for s in result.saes
        ]
    )
    bars.update_layout(barmode="group", title="Held-out R2 of linear norm predictions from x", yaxis_title="R2")
    scatter = go.Figure()
    for s in result.saes:
        pick = torch.linspace(0, len(s.error_norm) - 1, min(len(s.error_norm), SCATTER_POINTS)).long()
        scatter.add_scatter(
            x=s.error_norm[pick].square().numpy(),
            y=s.predicted_error_sq[pick].numpy(),
            mode="markers",
            marker={"size": 3, "opacity": 0.5},
            name=s.name,
        )
    top = max(float(s.error_norm.square().max()) for s in result.saes)
    scatter.add_scatter(x=[0, top], y=[0, top], mode="lines", line={"dash": "dot", "color": "gray"}, name="y = x")
    scatter.update_layout(
        title="Predicted vs actual ||e||^2 (held-out sample)",
        xaxis_title="actual ||e||^2",
        yaxis_title="predicted from x",
    )
    fit_table = [
        {
            "SAE": s.name,
            **{f"{NORM_LABELS[t]} R2 (fit)": s.norm_r2_fit[t] for t in NORM_TARGETS},
            "error R2 mean/dim (fit)": s.error_r2_fit.mean_per_dim,
        }
        for s in result.saes
    ]
    return Section("Error norms", "In-sample (fit-token) R2 for comparison:", fit_table, [bars, scatter])


def _nonlinear_fvu_section(result: DarkMatterResult) -> Section:
    import plotly.graph_objects as go

    names = [s.name for s in result.saes]
    fvu = go.Figure(
        [
            go.Bar(x=names, y=[s.fvu for s in result.saes], name="FVU (x vs x_hat)"),
            go.Bar(x=names, y=[s.nonlinear_fvu for s in result.saes], name="nonlinear FVU (x vs x_hat + x W*)"),
            go.Bar(x=names, y=[s.linear_error_fvu for s in result.saes], name="||x W*||^2 / total variance"),
        ]
    )
    fvu.update_layout(barmode="group", title="Nonlinear vs total FVU (held-out)", yaxis_title="fraction of variance")
    return Section("Nonlinear FVU", figures=[fvu])


def _shared_failures_section(result: DarkMatterResult) -> Section:
    from plotly.subplots import make_subplots

    names = [s.name for s in result.saes]
    agreement = result.shared_failures()
    heatmaps = make_subplots(
        rows=1,
        cols=2,
        subplot_titles=("Pearson correlation of per-token ||e||", f"Shared worst {TOP_FRACTION:.0%} tokens"),
    )
    for col, key in ((1, "pearson"), (2, "top_overlap")):
        heatmaps.add_heatmap(
            z=agreement[key].numpy(),
            x=names,
            y=names,
            zmin=0,
            zmax=1,
            coloraxis="coloraxis",
            text=agreement[key].numpy().round(2),
            texttemplate="%{text}",
            row=1,
            col=col,
        )
    heatmaps.update_layout(height=600, coloraxis={"colorscale": "Viridis"})
    rows = [
        {"SAE": a, **{b: float(agreement["spearman"][i, j]) for j, b in enumerate(names)}} for i, a in enumerate(names)
    ]
    return Section(
        "Do the SAEs fail on the same tokens?",
        "Spearman rank correlation of per-token ||e|| on the held-out tokens (heatmaps: Pearson, and the "
        f"fraction of one SAE's worst {TOP_FRACTION:.0%} tokens that are also among the other's).",
        rows,
        [heatmaps],
    )


def _downstream_section(result: DarkMatterResult) -> Section:
    import plotly.graph_objects as go

    ce = result.downstream
    names = [s.name for s in result.saes]
    rows = [
        {
            "SAE": s.name,
            "clean": ce["clean"],
            "x spliced": ce["input"],
            **{SPLICE_LABELS[p]: s.downstream[p] for p in SPLICES},
        }
        for s in result.saes
    ]
    ce_bars = go.Figure(
        [
            go.Bar(x=names, y=[s.downstream[p] - ce["clean"] for s in result.saes], name=SPLICE_LABELS[p])
            for p in SPLICES
        ]
    )
    ce_bars.update_layout(
        barmode="group", title="Increase in next-token CE over clean (nats)", yaxis_title="CE - CE clean"
    )
    return Section(
        "Downstream cross-entropy",
        f"Mean next-token CE (nats) over {ce['tokens']:,} positions of {ce['text']}, with the hook replaced at "
        f"positions >= {result.setup.get('skip_positions')} (special tokens keep the clean activation). 'x spliced' "
        "puts the clean activation back through the same hook: it must equal clean.",
        rows,
        [ce_bars],
    )
