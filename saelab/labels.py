"""Human labels and notes for latents, kept in a JSON sidecar beside the SAE (`<sae folder>/labels.json`).

    set_label("runs/sae", 5789, "LORD (KJV)", notes="fires on LORD in small capitals")
    read_labels("runs/sae")        # {5789: Label(label="LORD (KJV)", notes="fires on LORD in small capitals")}

The file: {"format": "saelab-labels", "version": 1, "labels": {"5789": {"label": "...", "notes": "..."}}}.
`saelab label` writes it, `saelab dashboard` copies it into the site (data/labels.js), and `saelab serve` reads and
writes it live, so the index, the feature pages and the search show what a user wrote.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

from saelab.errors import SaelabError
from saelab.files import write_json

LABELS_FILE = "labels.json"
FORMAT = "saelab-labels"
MAX_LABEL_CHARS = 200
MAX_NOTES_CHARS = 20_000


class Label(NamedTuple):
    """A latent's short name (one line) and free-form notes."""

    label: str
    notes: str = ""


def labels_path(sae_folder: str | Path) -> Path:
    """Where a local SAE folder keeps its labels; a SaelabError for anything that is not a folder (a hub source)."""
    folder = Path(sae_folder)
    if not folder.is_dir():
        raise SaelabError(
            f"Labels are kept in a file beside the SAE, but {sae_folder} is not a local folder; download or save the "
            "SAE to a folder and label that."
        )
    return folder / LABELS_FILE


def read_labels(sae_folder: str | Path) -> dict[int, Label]:
    """latent id -> Label from the folder's labels.json ({} when there is none)."""
    path = labels_path(sae_folder)
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("format") != FORMAT:
            raise ValueError(f"format is {data.get('format')!r}, not {FORMAT!r}")
        return {int(key): Label(str(entry["label"]), str(entry.get("notes", ""))) for key, entry in data["labels"].items()}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise SaelabError(
            f"{path} is not a readable labels file ({exc}); fix it by hand or move it away to start again."
        ) from None


def set_label(
    sae_folder: str | Path, latent: int | Sequence[int], label: str, notes: str = "", d_sae: int | None = None
) -> dict[int, Label]:
    """Give `latent` (or each of several) a label and notes (both empty: remove the entries); returns every label.

    d_sae, when known, bounds the latent ids. Every id and the text are checked before the one atomic write, so a
    refused call changes nothing."""
    latents = [latent] if isinstance(latent, int) else list(latent)
    outside = [i for i in latents if i < 0 or (d_sae is not None and i >= d_sae)]
    if outside:
        bound = f" 0..{d_sae - 1}" if d_sae is not None else ""
        ids = ", ".join(map(str, outside))
        which = f"Latent {ids} is" if len(outside) == 1 else f"Latents {ids} are"
        raise SaelabError(f"{which} outside this SAE's latents{bound}; nothing was labelled.")
    label, notes = label.strip(), notes.strip()
    if "\n" in label or len(label) > MAX_LABEL_CHARS:
        raise SaelabError(f"A label is one line of at most {MAX_LABEL_CHARS} characters; put longer text in the notes.")
    if len(notes) > MAX_NOTES_CHARS:
        raise SaelabError(f"Notes are at most {MAX_NOTES_CHARS:,} characters (got {len(notes):,}).")
    labels = read_labels(sae_folder)
    for i in latents:
        if label or notes:
            labels[i] = Label(label, notes)
        else:
            labels.pop(i, None)
    write_json(labels_path(sae_folder), {"format": FORMAT, "version": 1, "labels": labels_json(labels)})
    return labels


def labels_json(labels: dict[int, Label]) -> dict[str, dict[str, Any]]:
    """Labels as JSON: {"<id>": {"label", "notes"}}, ids ascending."""
    return {str(latent): entry._asdict() for latent, entry in sorted(labels.items())}
