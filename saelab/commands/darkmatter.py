"""`saelab darkmatter`: decompose the errors of SAEs of one hook over cached activations (saelab.analysis.darkmatter),
optionally measure the downstream CE, and write darkmatter.json, darkmatter.html and linear_maps.safetensors."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import save_file
from tqdm.auto import tqdm

from saelab.activations.cache import ActivationCache, read_manifest
from saelab.analysis.cached_tokens import CachedActivations, fresh_contexts, split_tokens
from saelab.analysis.darkmatter import DarkMatterResult, decompose, downstream_ce
from saelab.analysis.darkmatter_report import summary_rows, write_darkmatter_report
from saelab.analysis.report import format_value
from saelab.config import DarkMatterCommand, DarkMatterConfig, to_dict
from saelab.errors import SaelabError
from saelab.files import write_json
from saelab.sae.base import SAE
from saelab.sae.io import LoadedSAE, load_saes

REPORT_JSON = "darkmatter.json"
REPORT_HTML = "darkmatter.html"
LINEAR_MAPS = "linear_maps.safetensors"


@dataclass
class DarkMatterRun:
    """The decomposition (with its setup and downstream CE filled in) and --out, the folder written."""

    result: DarkMatterResult
    out: str

    def lines(self) -> list[str]:
        result = self.result
        lines = ["  ".join(f"{key} {format_value(v)}" for key, v in row.items()) for row in summary_rows(result)]
        if result.downstream:
            ce = result.downstream
            lines.append(
                f"downstream CE over {ce['tokens']:,} positions: clean {ce['clean']:.4f}, x spliced {ce['input']:.4f}"
            )
            lines += [
                f"  {s.name}: " + ", ".join(f"{part} {value:.4f}" for part, value in s.downstream.items())
                for s in result.saes
            ]
        total = result.setup["wall_seconds"]["total"]
        lines.append(f"{total:.0f} s; report: {self.out}/{REPORT_HTML}, numbers: {self.out}/{REPORT_JSON}")
        return lines


def sae_names(folders: list[str]) -> list[str]:
    """Short unique display names: the folder name without the trainer's '<hook>__' prefix, led by the parent
    folder's name when the folders have different parents (the full path where names still collide)."""
    paths = [Path(f) for f in folders]
    names = [p.name.split("__", 1)[-1] for p in paths]
    if len({p.parent for p in paths}) > 1:
        names = [f"{p.parent.name}/{name}" for p, name in zip(paths, names, strict=True)]
    return [str(p) if names.count(n) > 1 else n for p, n in zip(paths, names, strict=True)]


def run(command: DarkMatterCommand, progress: bool = True) -> DarkMatterRun:
    """Decompose the errors of the SAEs in --sae on the fit and held-out tokens of --cache (and --eval-cache) and
    write <out>/darkmatter.json, <out>/darkmatter.html and the maps W* [p, d_in] (float64, keyed by SAE name) to
    <out>/linear_maps.safetensors."""
    options = command.darkmatter
    started = time.perf_counter()
    if options.fit_tokens <= 0 or options.eval_tokens <= 0 or options.batch_tokens <= 0 or options.skip_positions < 0:
        raise SaelabError("--fit-tokens, --eval-tokens and --batch-tokens must be positive, --skip-positions >= 0.")
    if not options.sae:
        raise SaelabError("No SAE given. Pass one or more SAE folders of the same hook with --sae DIR [DIR ...].")
    loaded = load_saes(options.sae, options.device, default_hook=_only_hook(options.cache))
    names = sae_names(options.sae)
    saes = {name: sae.sae for name, sae in zip(names, loaded, strict=True)}
    cache = ActivationCache(options.cache, progress=progress)
    eval_cache = ActivationCache(options.eval_cache, progress=progress) if options.eval_cache else None
    hook = _shared_hook(names, loaded)
    d_in = next(iter(saes.values())).d_in
    model_name = _model_of(cache, eval_cache, hook, d_in)
    fit_index, eval_index, notes = _token_sets(options, cache, eval_cache, d_in)
    fit = CachedActivations(cache, hook, fit_index, options.batch_tokens)
    held_out = CachedActivations(eval_cache or cache, hook, eval_index, options.batch_tokens)
    result = decompose(saes, fit, held_out, options.intercept, options.rcond, options.device, progress)
    decomposed = time.perf_counter()
    if options.downstream:
        _measure_downstream(options, result, saes, hook, eval_cache or cache, progress)
    result.setup = {
        "hook": hook,
        "model": model_name,
        "fit_cache": str(cache.path),
        "eval_cache": str(eval_cache.path) if eval_cache else f"{cache.path} (contexts after the fit tokens)",
        "skip_positions": options.skip_positions,
        "sae_folders": {name: sae.folder for name, sae in zip(names, loaded, strict=True)},
        "notes": notes,
        "wall_seconds": {
            "decomposition": decomposed - started,
            "downstream": time.perf_counter() - decomposed,
            "total": time.perf_counter() - started,
        },
        "config": to_dict(command),
    }
    out = Path(options.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / REPORT_JSON, result.to_dict(), indent=2)
    save_file({s.name: s.weights.contiguous() for s in result.saes}, str(out / LINEAR_MAPS))
    write_darkmatter_report(result, out / REPORT_HTML)
    return DarkMatterRun(result, options.out)


def _only_hook(cache_folder: str) -> str | None:
    """The hook of a cache that holds just one (taken as the hook of SAEs that record none), else None."""
    hooks = list(read_manifest(Path(cache_folder))["hooks"])
    return hooks[0] if len(hooks) == 1 else None


def _shared_hook(names: list[str], loaded: list[LoadedSAE]) -> str:
    hooks = {sae.hook for sae in loaded}
    if len(hooks) != 1:
        found = ", ".join(f"{name}: {sae.hook}" for name, sae in zip(names, loaded, strict=True))
        raise SaelabError(f"The SAEs must all read one known hook ({found}). Pass SAEs trained on the same hook.")
    return hooks.pop()


def _model_of(cache: ActivationCache, eval_cache: ActivationCache | None, hook: str, d_in: int) -> str:
    """The model whose activations both caches hold at `hook` with width d_in (checked)."""
    cache.require(hook, d_in)
    model_name = cache.manifest["identity"]["model"]["model"]
    if eval_cache is not None:
        eval_cache.require(hook, d_in)
        if eval_cache.manifest["identity"]["model"]["model"] != model_name:
            raise SaelabError(
                f"{cache.path} holds activations of {model_name} but {eval_cache.path} of "
                f"{eval_cache.manifest['identity']['model']['model']}; evaluate on a cache of the same model."
            )
    return model_name


def _token_sets(options: DarkMatterConfig, cache: ActivationCache, eval_cache: ActivationCache | None, d_in: int):
    """(fit indices [N_fit], held-out indices [N_eval], notes) of `split_tokens`, checked to be usable; the notes
    are also printed."""
    fit, held_out, notes = split_tokens(
        cache, eval_cache, options.fit_tokens, options.eval_tokens, options.skip_positions
    )
    if len(fit) <= d_in + options.intercept:
        raise SaelabError(
            f"Only {len(fit):,} fit tokens for a {d_in}-dimensional linear map: the fit would be exact and "
            "meaningless. Use a cache with many more tokens than d_in (the paper fits on 150k)."
        )
    if len(held_out) < 2:
        raise SaelabError("Fewer than 2 held-out tokens; use a bigger --eval-cache or lower --skip-positions.")
    for note in notes:
        tqdm.write(f"saelab: {note}")
    return fit, held_out, notes


def _measure_downstream(
    options: DarkMatterConfig,
    result: DarkMatterResult,
    saes: dict[str, SAE],
    hook: str,
    source: ActivationCache,
    progress: bool,
) -> None:
    """Fill result.downstream and each SAE's downstream CE, on fresh text of `source`'s corpus after its contexts."""
    from saelab.models import load_model

    identity = source.manifest["identity"]["model"]
    model = load_model(identity["model"], device=options.device, dtype=identity["model_dtype"])
    contexts = fresh_contexts(source.manifest, model.tokenizer, options.downstream_tokens)
    fitted = {s.name: (saes[s.name], s.weights.to(options.device)) for s in result.saes}
    result.downstream = downstream_ce(
        model, hook, fitted, contexts, options.skip_positions, options.intercept, progress=progress
    )
    result.downstream["text"] = f"{len(contexts)} contexts of {source.path}'s corpus after the cached ones"
    for s in result.saes:
        s.downstream = result.downstream["saes"][s.name]
