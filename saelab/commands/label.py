"""`saelab label`: set, remove or list the labels and notes of an SAE's latents (saelab.labels), and refresh the
labels of the SAE's default dashboard (<sae>/dashboard) when it has one."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from saelab.config import LabelCommand
from saelab.errors import SaelabError
from saelab.labels import Label


@dataclass
class LabelResult:
    """labels: every label of the SAE after the command; shown: the latents to print (all of them when None);
    refreshed: the dashboard labels file rewritten, if any."""

    labels: dict[int, Label]
    shown: list[int] | None
    refreshed: Path | None

    def lines(self) -> list[str]:
        ids = sorted(self.labels) if self.shown is None else self.shown
        lines = [_line(latent, self.labels.get(latent)) for latent in ids]
        if self.shown is None and not self.labels:
            lines.append("no labels yet: add one with saelab label --sae DIR --feature N --label TEXT")
        if self.refreshed is not None:
            lines.append(f"updated {self.refreshed}")
        return lines


def _line(latent: int, label: Label | None) -> str:
    if label is None:
        return f"{latent}: (no label)"
    return f"{latent}: {label.label}" + (f"  [notes: {label.notes}]" if label.notes else "")


def run(command: LabelCommand, progress: bool = True) -> LabelResult:
    """Apply --label/--notes/--remove to the --feature latents (or only show them, or list every label)."""
    from saelab.dashboard.site import labels_script
    from saelab.labels import read_labels, set_label
    from saelab.sae.io import load_sae

    options = command.label
    if not options.sae:
        raise SaelabError("No SAE given: pass its folder with --sae DIR.")
    labels = read_labels(options.sae)
    changing = bool(options.label or options.notes or options.remove)
    if changing:
        labels = set_label(options.sae, options.feature, options.label, options.notes, d_sae=load_sae(options.sae).d_sae)
    site_labels = Path(options.sae) / "dashboard" / "data" / "labels.js"
    refreshed = None
    if changing and site_labels.is_file():
        site_labels.write_text(labels_script(labels), encoding="utf-8")
        refreshed = site_labels
    return LabelResult(labels, options.feature or None, refreshed)
