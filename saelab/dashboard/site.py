"""Write a feature dashboard as a static site that opens from disk, offline, with no server.

Browsers refuse `fetch()` of local files from a file:// page, so the data travels as JavaScript files loaded
with <script src>: `data/summary.js` (the SAE's summary), `data/index.js` (one compact row per feature for the
index table) and `data/features_NNNN.js` (the full records of up to CHUNK_SIZE consecutive latent ids each,
so a 16k-latent SAE gives 256 small files instead of one giant page), `data/tokens.js` (the token index: every
latent's top tokens, with a page or without, which the index page searches) and `data/labels.js` (the labels and
notes users gave latents, see saelab.labels; `saelab serve` serves this file fresh from the SAE's labels.json). The
one `feature.html?id=N` page loads the chunk holding N. Templates (HTML, CSS, the page script) live in the
top-level `dashboards/` folder; plotly's bundle is copied beside them once, so nothing is fetched from the internet.

Layout written under `out_dir`:

    index.html  feature.html
    assets/     app.js  style.css  plotly.min.js
    data/       summary.js  index.js  tokens.js  labels.js  features_0000.js ...

The summary and feature dicts follow the dashboard data contract of `saelab.dashboard.collect`.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path
from typing import Any

from plotly.offline import get_plotlyjs
from tqdm.auto import tqdm

from saelab.errors import SaelabError
from saelab.labels import Label, labels_json

CHUNK_SIZE = 64
SIGNIFICANT_DIGITS = 6
PAGES = ("index.html", "feature.html")
ASSETS = ("app.js", "style.css")
PLOTLY_ASSET = "plotly.min.js"
INDEX_COLUMNS = ("id", "density", "max_act", "min_act", "mean_act", "dead", "dense", "top_tokens")
# Inside <script> the HTML parser ends the element at "</script" whatever the JS says, so these characters never
# appear raw in a data file (inside JSON strings only, where the \u escape means the same character).
_SCRIPT_UNSAFE = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}


def templates_dir() -> Path:
    """The folder holding the dashboard templates: `dashboards/` in a checkout (editable install), else the copy
    a wheel install puts under `<prefix>/share/saelab/dashboards`."""
    candidates = [Path(__file__).resolve().parents[2] / "dashboards", Path(sys.prefix) / "share/saelab/dashboards"]
    for folder in candidates:
        if all((folder / name).is_file() for name in PAGES + ASSETS):
            return folder
    raise SaelabError(
        f"The dashboard templates ({', '.join(PAGES + ASSETS)}) were not found in "
        f"{' or '.join(map(str, candidates))}. Reinstall saelab (`pip install -e .` from a checkout)."
    )


def chunk_of(feature_id: int, chunk_size: int = CHUNK_SIZE) -> int:
    """The data chunk holding a latent id (the page script computes the same)."""
    return feature_id // chunk_size


def chunk_file(chunk: int) -> str:
    """File name of a chunk, relative to the site folder."""
    return f"data/features_{chunk:04d}.js"


def _compact(value: Any) -> Any:
    """Floats cut to SIGNIFICANT_DIGITS (activations are float32; the pages show 4 digits), whole floats written
    as integers (most context activations are 0.0), and NaN or infinities, which are not JSON, as null."""
    if isinstance(value, float):
        if not math.isfinite(value):
            return None
        return int(value) if value.is_integer() and abs(value) < 2**53 else float(f"{value:.{SIGNIFICANT_DIGITS}g}")
    if isinstance(value, dict):
        return {key: _compact(v) for key, v in value.items()}
    if isinstance(value, list | tuple):
        return [_compact(v) for v in value]
    return value


def script_json(value: Any) -> str:
    """Compact JSON text that is safe inside a script: no raw `<`, `>`, `&` or JS line separators in any string."""
    text = json.dumps(_compact(value), ensure_ascii=False, separators=(",", ":"))
    return text.translate(str.maketrans(_SCRIPT_UNSAFE))


def index_rows(features: list[dict[str, Any]]) -> dict[str, Any]:
    """The index table's data: column names and one row (a list, no repeated keys) per feature."""
    return {"columns": list(INDEX_COLUMNS), "rows": [[f[key] for key in INDEX_COLUMNS] for f in features]}


def read_data_file(path: Path) -> Any:
    """The value a data file written here holds (`window.NAME = <JSON>;`), or a SaelabError naming the file."""
    text = path.read_text(encoding="utf-8") if path.is_file() else ""
    head, _, rest = text.partition(" = ")
    if not head.startswith("window.") or not rest.endswith(";\n"):
        raise SaelabError(f"{path} is missing or is not a saelab dashboard data file; rebuild the dashboard.")
    return json.loads(rest[:-2])


def labels_script(labels: dict[int, Label]) -> str:
    """The text of data/labels.js for these labels."""
    return f"window.SAELAB_LABELS = {script_json(labels_json(labels))};\n"


def write_site(
    out_dir: str | Path,
    summary: dict[str, Any],
    features: list[dict[str, Any]],
    chunk_size: int = CHUNK_SIZE,
    progress: bool = False,
    labels: dict[int, Label] | None = None,
) -> Path:
    """Write the dashboard for `features` (feature dicts of the data contract, any subset of latent ids) under
    `out_dir`; return the path of its index.html. summary["latent_tokens"], when present, becomes the token index
    (data/tokens.js) instead of part of the summary; labels: latent id -> Label (saelab.labels). Chunk files left by
    an earlier run in the same folder are replaced."""
    if chunk_size < 1:
        raise SaelabError(f"chunk_size must be positive, got {chunk_size}.")
    ids = [f["id"] for f in features]
    if len(set(ids)) != len(ids):
        raise SaelabError("The feature list holds the same latent id twice; pass each latent once.")
    templates = templates_dir()
    out = Path(out_dir)
    (out / "assets").mkdir(parents=True, exist_ok=True)
    (out / "data").mkdir(exist_ok=True)
    for name in PAGES:
        shutil.copyfile(templates / name, out / name)
    for name in ASSETS:
        shutil.copyfile(templates / name, out / "assets" / name)
    (out / "assets" / PLOTLY_ASSET).write_text(get_plotlyjs(), encoding="utf-8")

    for stale in (out / "data").glob("features_*.js"):
        stale.unlink()
    summary = dict(summary)
    token_index = {"top_k": summary.get("top_k"), "latents": summary.pop("latent_tokens", [])}
    site_summary = {**summary, "n_features": len(features), "chunk_size": chunk_size}
    (out / "data/summary.js").write_text(f"window.SAELAB_SUMMARY = {script_json(site_summary)};\n", encoding="utf-8")
    (out / "data/tokens.js").write_text(f"window.SAELAB_TOKENS = {script_json(token_index)};\n", encoding="utf-8")
    (out / "data/labels.js").write_text(labels_script(labels or {}), encoding="utf-8")
    ordered = sorted(features, key=lambda f: f["id"])
    (out / "data/index.js").write_text(f"window.SAELAB_INDEX = {script_json(index_rows(ordered))};\n", encoding="utf-8")
    chunks: dict[int, list[dict[str, Any]]] = {}
    for feature in ordered:
        chunks.setdefault(chunk_of(feature["id"], chunk_size), []).append(feature)
    for chunk, members in tqdm(chunks.items(), desc="writing feature pages", disable=not progress):
        record = {"chunk": chunk, "features": members}
        (out / chunk_file(chunk)).write_text(f"saelab.register({script_json(record)});\n", encoding="utf-8")
    return out / "index.html"
