"""One self-contained HTML report: headed sections of text, a table and plotly figures.

The plotly library is embedded once in the page (no CDN), so the file opens offline and can be mailed around.

    write_report("out/report.html", "My analysis", [
        Section("Summary", text="What was measured.", table=[{"name": "a", "fvu": 0.12}]),
        Section("Figures", figures=[figure]),
    ])
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 2em; border-bottom: 1px solid #ccc; }
p { white-space: pre-wrap; line-height: 1.4; }
table { border-collapse: collapse; font-size: 0.9em; margin: 1em 0; }
th, td { border: 1px solid #ddd; padding: 0.3em 0.6em; text-align: right; }
th { background: #f4f4f4; } td:first-child, th:first-child { text-align: left; }
"""


@dataclass
class Section:
    """A heading with optional text (escaped; blank lines split paragraphs), a table (rows of column -> value;
    columns from the first row) and plotly figures, in that order."""

    heading: str
    text: str = ""
    table: Sequence[dict[str, Any]] = ()
    figures: Sequence[Any] = field(default_factory=list)


def format_value(value: Any) -> str:
    """Numbers to 4 significant digits (integers in full), None and NaN as an en dash, anything else as str."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "\u2013"
    if isinstance(value, bool | int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def html_table(rows: Sequence[dict[str, Any]]) -> str:
    """Rows of column -> value as an escaped HTML table (columns: the first row's keys)."""
    columns = list(rows[0])
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(format_value(row.get(c)))}</td>" for c in columns) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def write_report(path: str | Path, title: str, sections: Sequence[Section]) -> Path:
    """Write `sections` under `title` as one self-contained HTML file at `path`; returns the path."""
    from plotly.offline import get_plotlyjs

    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style>",
        f"<script type='text/javascript'>{get_plotlyjs()}</script></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    for section in sections:
        parts.append(f"<h2>{html.escape(section.heading)}</h2>")
        parts += [f"<p>{html.escape(paragraph)}</p>" for paragraph in section.text.split("\n\n") if paragraph.strip()]
        if section.table:
            parts.append(html_table(section.table))
        parts += [
            figure.to_html(full_html=False, include_plotlyjs=False, default_height=f"{figure.layout.height or 450}px")
            for figure in section.figures
        ]
    parts.append("</body></html>")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
