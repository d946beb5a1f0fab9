"""`saelab dashboard`: collect one SAE's per-latent data over an activation cache (saelab.dashboard.collect) and
write the static, offline site (saelab.dashboard.site)."""

from __future__ import annotations

import shlex
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
    """Load the SAE and its cache, choose the latents (--select), load the model (for logit effects), collect the
    per-latent data and write the site to --out (default: <sae>/dashboard)."""
    from saelab.activations.cache import ActivationCache
    from saelab.dashboard.collect import collect_dashboard_data
    from saelab.dashboard.selection import select_latents
    from saelab.dashboard.site import write_site
    from saelab.labels import read_labels
    from saelab.models import load_model, load_tokenizer
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
    n_tokens = options.n_tokens or None
    tokenizer = None
    if options.select == "token":  # the token ids a cache stores are those of the model it was harvested with
        tokenizer = load_tokenizer(cache.manifest["identity"]["model"]["model"])
    features = select_latents(
        sae,
        cache,
        options.select,
        n=options.n_features,
        ids=options.features,
        token=options.token,
        tokenizer=tokenizer,
        seed=options.seed,
        n_tokens=n_tokens,
        top_k=options.top_k,
        progress=progress,
    )
    model = None if model_name == "none" else load_model(model_name, command.model.device, command.model.model_dtype)
    summary, records = collect_dashboard_data(
        sae,
        cache,
        model=model,
        features=features,
        n_tokens=n_tokens,
        top_k=options.top_k,
        quantile_examples=options.quantile_examples,
        progress=progress,
        folder=options.sae,
        seed=options.seed,
    )
    out = Path(options.out) if options.out else Path(options.sae) / "dashboard"
    serve = ["saelab", "serve", "--sae", options.sae] + (["--dashboard", str(out)] if options.out else [])
    summary = {
        **summary,
        "selection": _selection_text(options),
        "build_command": _build_command(command),
        "serve_command": shlex.join(serve),
    }
    labels = read_labels(options.sae) if Path(options.sae).is_dir() else {}
    return DashboardResult(write_site(out, summary, records, progress=progress, labels=labels))


def _selection_text(options) -> str:
    """How the latents were chosen, as the flags that choose them (shown on the index page)."""
    if options.select == "ids":
        return f"--select ids --features {' '.join(map(str, sorted(set(options.features))))}"
    if options.select != "token" and not options.n_features:
        return "all latents"
    words = [f"--select {options.select}", f"--n-features {options.n_features}"]
    if options.select == "token":
        words.append(f"--token {shlex.quote(options.token)}")
    if options.select == "random":
        words.append(f"--seed {options.seed}")
    return " ".join(words)


def _build_command(command: DashboardCommand) -> str:
    """The start of a `saelab dashboard` command for this SAE and cache: the feature pages complete it with
    `--select ids --features N --out DIR` to build a page that this dashboard lacks."""
    words = ["saelab", "dashboard", "--sae", command.dashboard.sae, "--cache", command.dashboard.cache]
    if command.model.model:
        words += ["--model", command.model.model]
    return shlex.join(words)
