"""`saelab dashboard`: collect one SAE's per-latent data over an activation cache (saelab.dashboard.collect) and
write the static, offline site (saelab.dashboard.site)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from saelab.config import DashboardCommand
from saelab.errors import SaelabError


@dataclass
class DashboardResult:
    """index: the site's index.html."""

    index: Path

    def lines(self) -> list[str]:
        return [f"dashboard: {self.index} (open it in a browser; it works offline, from disk)"]


def run(command: DashboardCommand, progress: bool = True) -> DashboardResult:
    """Load the SAE, its cache and (for logit effects) its model, collect the per-latent data and write the site to
    --out (default: <sae>/dashboard)."""
    from saelab.activations.cache import ActivationCache
    from saelab.dashboard.collect import collect_dashboard_data
    from saelab.dashboard.site import write_site
    from saelab.models import load_model
    from saelab.sae.io import load_saes

    options = command.dashboard
    if not options.sae:
        raise SaelabError("No SAE given: pass its folder with --sae DIR.")
    ((_, sae, hook),) = load_saes([options.sae], command.model.device)
    cache = ActivationCache(options.cache)  # checksums checked: a damaged shard is named, not read
    cache.require(hook, sae.d_in)
    model_name = command.model.model or sae.metadata.get("model", "")
    if not model_name:
        raise SaelabError(
            f"The SAE in {options.sae} records no model: pass --model NAME (or --model none to skip logit effects)."
        )
    model = None if model_name == "none" else load_model(model_name, command.model.device, command.model.model_dtype)
    summary, features = collect_dashboard_data(
        sae,
        cache,
        model=model,
        features=_feature_selection(command, sae.d_sae),
        n_tokens=options.n_tokens or None,
        top_k=options.top_k,
        quantile_examples=options.quantile_examples,
        progress=progress,
        folder=options.sae,
    )
    out = Path(options.out) if options.out else Path(options.sae) / "dashboard"
    return DashboardResult(write_site(out, summary, features, progress=progress))


def _feature_selection(command: DashboardCommand, d_sae: int) -> list[int] | None:
    """The latent ids asked for on the command line; None means all of them."""
    wanted = command.dashboard.features
    if wanted:
        outside = [i for i in wanted if not 0 <= i < d_sae]
        if outside:
            raise SaelabError(f"Latent ids {outside} are outside this SAE's range 0..{d_sae - 1}; fix --features.")
        return sorted(set(wanted))
    if command.dashboard.n_features > 0:
        return list(range(min(command.dashboard.n_features, d_sae)))
    return None
