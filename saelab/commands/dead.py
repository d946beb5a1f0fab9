"""`saelab dead`: dead-latent statistics of a trained SAE from its latent history (saelab.analysis.dead), written
as dead_report.html (saelab.analysis.dead_report) and dead.json beside the SAE or in --out."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from saelab.config import DeadCommand
from saelab.errors import SaelabError
from saelab.files import write_json

REPORT_HTML = "dead_report.html"
REPORT_JSON = "dead.json"


@dataclass
class DeadResult:
    """summary: the dead.json summary (saelab.analysis.dead.summarize); page, data: the two files written."""

    summary: dict[str, Any]
    page: Path
    data: Path

    def lines(self) -> list[str]:
        summary = self.summary
        dead, density = summary["dead"], summary["final_density"]
        headline = (
            f"dead at the end: {dead['at_end']} of {summary['d_sae']} ({100 * dead['fraction_at_end']:.2f}%); "
            f"ever dead {dead['ever']}, revived {dead['revived']} ({dead['revived_after_resample']} after "
            f"resampling); dense {100 * density['dense_fraction']:.2f}%"
        )
        return [headline, f"report: {self.page}, summary: {self.data}"]


def run(command: DeadCommand, progress: bool = True) -> DeadResult:
    """Analyse the SAE folder --sae; write dead_report.html and dead.json to --out (default: the SAE folder)."""
    from saelab.analysis.dead import LatentHistory, decoder_geometry, mean_activation, summarize
    from saelab.analysis.dead_report import write_dead_report
    from saelab.sae.io import load_saes

    options = command.dead
    if not options.sae:
        raise SaelabError(
            "Pass --sae (or --run) with a saved SAE folder from `saelab train` (it holds latent_history.safetensors)."
        )
    if not 0 < options.density_fraction <= 1:
        raise SaelabError(f"--density-fraction must be in (0, 1], got {options.density_fraction}.")
    if options.timeline_latents < 1:
        raise SaelabError(f"--timeline-latents must be at least 1, got {options.timeline_latents}.")
    history = LatentHistory.load(options.sae)
    ((_, sae, hook),) = load_saes([options.sae], default_hook=history.info.get("hook"))
    if sae.d_sae != history.d_sae:
        raise SaelabError(
            f"{options.sae}: the SAE has {sae.d_sae} latents but its history {history.d_sae}. Retrain it."
        )
    deaths = history.deaths(options.dead_tokens or None)
    final, _ = history.final_density(options.density_fraction)
    dense = final > options.dense_threshold
    groups = {"dense": dense, "dead": deaths.dead_at_end, "other_alive": ~dense & ~deaths.dead_at_end}
    mean = mean_activation(options.cache, hook, sae.d_in, options.mean_tokens) if options.cache else None
    geometry = decoder_geometry(sae.W_dec.detach(), sae.b_dec.detach(), groups, mean, progress=progress)
    summary = summarize(history, deaths, options, geometry)
    out = Path(options.out or options.sae)
    out.mkdir(parents=True, exist_ok=True)
    page = write_dead_report(out / REPORT_HTML, history, deaths, options, summary)
    return DeadResult(summary, page, write_json(out / REPORT_JSON, summary, indent=1))
