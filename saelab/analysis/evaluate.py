"""Evaluate SAEs in their model: reconstruction, sparsity and downstream (spliced) metrics in one pass over text.

Per batch of contexts: one clean forward (logits and the first hook's activation; other hooks' activations from
one early-stopping capture), then per hook one zero-ablation and one mean-ablation forward, then one spliced
forward per SAE. Several SAEs of one hook therefore share everything but their own spliced forward.

    results = evaluate([load_sae(folder)], model, contexts)    # one dict per SAE (see `evaluate_targets`)
    write_json(folder / "eval.json", json_ready(results[0]))     # saelab.files
    print(format_table(results))

The core, `evaluate_targets`, takes reconstruction functions rather than SAEs, so exact baselines (identity,
mean, zero) run through the same code as SAEs. `saelab eval` (saelab.commands.eval) loads SAEs and model, picks
held-out text with `heldout_skip` and `eval_model_name` and writes the JSON files.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from tqdm.auto import tqdm

from saelab.activations.hooks import resolve_hooks
from saelab.activations.source import ActivationSource
from saelab.analysis.metrics import CONFIDENCE, DownstreamStats, ReconstructionStats, SparsityStats
from saelab.analysis.splice import kl_divergence, next_token_losses, run_logits, splice_keep_mask
from saelab.config import DataConfig
from saelab.errors import SaelabError
from saelab.kernels import SparseCode
from saelab.sae.base import SAE
from saelab.sae.io import recorded_hook

Reconstruction = Callable[[torch.Tensor], tuple[torch.Tensor, SparseCode | None]]

CONVENTIONS = {
    "fvu": "global: sum of squared errors over sum of squared deviations from the mean over the evaluation tokens "
    "(headline: outliers excluded, see outliers; all_tokens: every token)",
    "outliers": "tokens with ||x|| > outlier_norm x the median ||x|| of the hook's first reference_tokens evaluation "
    "tokens (massive activations, e.g. attention sinks); left out of the headline reconstruction metrics and "
    "reported under reconstruction.outliers; still spliced downstream and counted in sparsity",
    "explained_variance": "1 - fvu (global)",
    "mse": "mean over tokens and dimensions of (x - x_hat)^2, raw activation space",
    "normalized_mse_per_token": "per-token: mean over tokens of ||x - x_hat||^2 / ||x||^2",
    "cosine": "mean over tokens of cos(x, x_hat)",
    "shrinkage": "mean over tokens of ||x_hat|| / ||x||",
    "positions": "reconstruction and sparsity over non-special positions (BOS and separators excluded); the hook is "
    "replaced only there, and CE and KL average over the next-token predictions made from those positions",
    "l0": "mean over tokens of the number of latents with a != 0",
    "firing_frequency": "fraction of evaluation tokens on which a latent is nonzero; dead: never fired in the window, "
    "dense: above dense_threshold",
    "ce_recovered": "(CE_ablation - CE_sae) / (CE_ablation - CE_clean), against zero and against mean ablation",
    "delta_lm_loss": "CE_sae - CE_clean (nats)",
    "kl": "mean over predictions of KL(p_clean || p_other) in nats; kl_score = (KL_ablation - KL_sae) / KL_ablation",
    "intervals": "<metric>_ci: 95% percentile bootstrap interval over evaluation contexts (resample contexts with "
    "replacement, recompute the metric from their summed statistics; bootstrap_resamples resamples, "
    "bootstrap_seed); the outlier threshold and the mean-ablation baseline are held fixed",
}


class EvalTarget(NamedTuple):
    """One reconstruction to evaluate at `hook`: reconstruct maps x [n, d] (raw, float32) to (x_hat [n, d], the
    code over [n, d_sae] or None); d_sae = 0 means no code (no sparsity metrics). `name` appears in errors."""

    name: str
    hook: str
    reconstruct: Reconstruction
    d_sae: int = 0


def sae_reconstruction(sae: SAE) -> Reconstruction:
    """x [n, d_in] -> (sae's raw-space reconstruction [n, d_in], its SparseCode over [n, d_sae])."""

    return lambda x: sae.reconstruct(x.to(sae.W_enc))


def _batches(contexts: Iterable[torch.Tensor], batch_contexts: int) -> Iterable[torch.Tensor]:
    iterator = iter(contexts)
    while chunk := list(itertools.islice(iterator, batch_contexts)):
        yield torch.stack(chunk)


def hook_means(
    model, hooks: Sequence[str], contexts: Iterable[torch.Tensor], batch_contexts: int = 8
) -> dict[str, torch.Tensor]:
    """Mean activation [d] (float32) of each hook over the non-special positions of `contexts` ([pos] tensors)."""
    source = ActivationSource(model, hooks)
    sums = {hook: torch.zeros(d, dtype=torch.float64) for hook, d in source.dims.items()}
    n_tokens = 0
    with torch.no_grad():
        for tokens in _batches(contexts, batch_contexts):
            batch = source.batch(tokens)
            for hook in hooks:
                sums[hook] += batch.acts[hook].double().sum(0)
            n_tokens += len(batch)
    if n_tokens == 0:
        raise SaelabError("The mean-ablation text holds no non-special token; give more text (--mean-tokens).")
    return {hook: (total / n_tokens).float() for hook, total in sums.items()}


def _put(act: torch.Tensor, keep: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """act [batch, pos, d] with its kept positions (keep [batch, pos]) replaced by rows [n_kept, d]."""
    out = act.clone()
    out[keep.to(act.device)] = rows.to(act)
    return out


def _broadcast(mean: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
    """mean [d] -> act's shape [batch, pos, d] (the mean-ablation replacement)."""
    return mean.to(act).expand_as(act)


def _spliced_losses(
    model, tokens: torch.Tensor, hook: str, replace: Callable, keep: torch.Tensor, clean_log_probs: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(next-token CE [batch, pos-1], KL(clean || spliced) [batch, pos-1]) with `hook` replaced where `keep`."""
    logits = run_logits(model, tokens, hook, replace=replace, keep=keep)
    return next_token_losses(logits, tokens), kl_divergence(clean_log_probs, logits)[:, :-1]


def evaluate_targets(
    model,
    targets: Sequence[EvalTarget],
    contexts: Iterable[torch.Tensor],
    *,
    downstream: bool = True,
    ablation_means: dict[str, torch.Tensor] | None = None,
    batch_contexts: int = 8,
    dense_threshold: float = 0.1,
    skip_positions: int = 0,
    outlier_norm: float = 3.0,
    bootstrap_resamples: int = 1000,
    bootstrap_seed: int = 0,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Evaluate reconstructions in one pass over `contexts` ([pos] int64 token tensors, BOS first).

    Positions below `skip_positions` (and special tokens) keep their clean activation and are not counted.
    Tokens with ||x|| > outlier_norm x the median norm of the hook's first OUTLIER_REFERENCE_TOKENS counted tokens
    are left out of the headline reconstruction metrics (see ReconstructionStats; 0: none are).
    Every metric gets a bootstrap interval over the contexts (bootstrap_resamples; 0: none).

    ablation_means: hook -> [d] mean activation, the mean-ablation baseline (needed when downstream).
    Returns one dict per target: n_contexts, reconstruction (ReconstructionStats.result), sparsity
    (SparsityStats.result, with firing_frequency a [d_sae] tensor; None without a code) and downstream
    (DownstreamStats.result; None unless downstream).
    """
    hooks = list(dict.fromkeys(t.hook for t in targets))
    resolve_hooks(model, hooks)
    if downstream and (ablation_means is None or any(hook not in ablation_means for hook in hooks)):
        raise SaelabError("Downstream evaluation needs the mean activation of every hook (ablation_means).")
    stats = [_TargetStats(t, outlier_norm, dense_threshold, downstream) for t in targets]
    captured_hooks = hooks[1:] if downstream else hooks  # downstream: the clean forward captures hooks[0]
    source = ActivationSource(model, captured_hooks) if captured_hooks else None
    total = math.ceil(len(contexts) / batch_contexts) if isinstance(contexts, Sequence) else None
    n_contexts = 0
    bar = tqdm(total=total, unit="batch", desc=f"evaluating {len(targets)} SAE(s)", disable=not progress)
    with torch.no_grad():
        for tokens in _batches(contexts, batch_contexts):
            keep = splice_keep_mask(model, tokens)
            keep[:, :skip_positions] = False
            token_context = n_contexts + keep.nonzero()[:, 0].cpu()  # [n_kept], rows in acts[keep] order
            row_context = n_contexts + torch.arange(tokens.shape[0])
            acts: dict[str, torch.Tensor] = {}
            if downstream:
                clean_logits, acts[hooks[0]] = run_logits(model, tokens, hooks[0], capture=True)
                ce_clean = next_token_losses(clean_logits, tokens)
                clean_log_probs = clean_logits.log_softmax(-1)
            if source is not None:
                acts.update(source.harvest(tokens)[0])
            for hook in hooks:
                x = acts[hook][keep.to(acts[hook].device)].float()  # [n_kept, d]
                if downstream:
                    ce_zero, kl_zero = _spliced_losses(model, tokens, hook, torch.zeros_like, keep, clean_log_probs)
                    ce_mean, kl_mean = _spliced_losses(
                        model, tokens, hook, functools.partial(_broadcast, ablation_means[hook]), keep, clean_log_probs
                    )
                for i, target in enumerate(targets):
                    if target.hook != hook:
                        continue
                    x_hat, code = target.reconstruct(x)
                    _check_finite(target, x_hat)
                    stats[i].reconstruction.update(x, x_hat, token_context)
                    if stats[i].sparsity is not None and code is not None:
                        stats[i].sparsity.update(code, token_context)
                    if downstream:
                        ce_sae, kl_sae = _spliced_losses(
                            model, tokens, hook, functools.partial(_put, keep=keep, rows=x_hat), keep, clean_log_probs
                        )
                        stats[i].downstream.update(
                            ce_clean, ce_sae, ce_zero, ce_mean, kl_sae, kl_zero, kl_mean, keep[:, :-1], row_context
                        )
            n_contexts += tokens.shape[0]
            bar.update()
    bar.close()
    return [s.result(n_contexts, resamples=bootstrap_resamples, seed=bootstrap_seed) for s in stats]


class _TargetStats:
    """One target's running sums: reconstruction, sparsity (None without a code), downstream (None unless asked)."""

    def __init__(self, target: EvalTarget, outlier_norm: float, dense_threshold: float, downstream: bool):
        self.reconstruction = ReconstructionStats(outlier_norm)
        self.sparsity = SparsityStats(target.d_sae, dense_threshold) if target.d_sae else None
        self.downstream = DownstreamStats() if downstream else None

    def result(self, n_contexts: int, **bootstrap: int) -> dict[str, Any]:
        return {
            "n_contexts": n_contexts,
            "reconstruction": self.reconstruction.result(**bootstrap),
            "sparsity": None if self.sparsity is None else self.sparsity.result(**bootstrap),
            "downstream": None if self.downstream is None else self.downstream.result(**bootstrap),
        }


def _check_finite(target: EvalTarget, x_hat: torch.Tensor) -> None:
    if not bool(torch.isfinite(x_hat).all()):
        raise SaelabError(
            f"{target.name} produced non-finite reconstructions (NaN or inf) at {target.hook}. Its weights "
            "are likely corrupt (a diverged training run); check them or retrain."
        )


def check_saes(saes: Sequence[SAE], model, names: Sequence[str]) -> list[str]:
    """Each SAE's hook (from its metadata), checked to exist on `model` with width d_in; raises SaelabError."""
    hooks = []
    for sae, name in zip(saes, names):
        hook = recorded_hook(sae, name)
        try:
            resolve_hooks(model, [hook])
        except SaelabError as exc:
            raise SaelabError(f"{name} reads hook '{hook}', which the model lacks. {exc}") from exc
        hooks.append(hook)
    dims = ActivationSource(model, list(dict.fromkeys(hooks))).dims
    for sae, name, hook in zip(saes, names, hooks):
        if sae.d_in != dims[hook]:
            raise SaelabError(
                f"{name} has d_in {sae.d_in}, but {hook} of this model is {dims[hook]} wide. Evaluate it in the "
                "model it was trained on (--model)."
            )
    return hooks


def evaluate(
    saes: Sequence[SAE],
    model,
    contexts: Iterable[torch.Tensor],
    *,
    names: Sequence[str] | None = None,
    downstream: bool = True,
    mean_tokens: int = 16_384,
    batch_contexts: int = 8,
    dense_threshold: float = 0.1,
    skip_positions: int = 0,
    outlier_norm: float = 3.0,
    bootstrap_resamples: int = 1000,
    bootstrap_seed: int = 0,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Evaluate SAEs (each at its metadata's hook) in one pass over `contexts` ([pos] int64 token tensors).

    The mean-ablation baseline is the mean activation over the first `mean_tokens` tokens of `contexts` (0: all).
    Returns one dict per SAE: `evaluate_targets`' metrics plus sae (its name), architecture, hook, d_in,
    d_sae, mean_ablation (what the mean was taken over) and conventions.
    """
    names = list(names) if names is not None else [f"SAE {i}" for i in range(len(saes))]
    hooks = check_saes(saes, model, names)
    contexts = list(contexts)
    if not contexts:
        raise SaelabError("No text to evaluate on: the context stream is empty.")
    means, mean_info = None, None
    if downstream:
        length = contexts[0].shape[0]
        n_mean = len(contexts) if mean_tokens <= 0 else min(len(contexts), math.ceil(mean_tokens / length))
        means = hook_means(model, list(dict.fromkeys(hooks)), contexts[:n_mean], batch_contexts)
        mean_info = {
            "source": f"mean hook activation over the non-special positions of the first {n_mean} evaluation contexts",
            "n_contexts": n_mean,
            "n_tokens": n_mean * length,
        }
    targets = [
        EvalTarget(name, hook, sae_reconstruction(sae), sae.d_sae) for sae, name, hook in zip(saes, names, hooks)
    ]
    results = evaluate_targets(
        model,
        targets,
        contexts,
        downstream=downstream,
        ablation_means=means,
        batch_contexts=batch_contexts,
        dense_threshold=dense_threshold,
        skip_positions=skip_positions,
        outlier_norm=outlier_norm,
        bootstrap_resamples=bootstrap_resamples,
        bootstrap_seed=bootstrap_seed,
        progress=progress,
    )
    return [
        {
            "sae": name,
            "architecture": sae.architecture,
            "hook": hook,
            "d_in": sae.d_in,
            "d_sae": sae.d_sae,
            **result,
            "mean_ablation": mean_info,
            "conventions": CONVENTIONS,
        }
        for sae, name, hook, result in zip(saes, names, hooks, results)
    ]


# -- saelab eval -----------------------------------------------------------------------------------------------


def heldout_skip(metadatas: Sequence[dict], data: DataConfig, requested: int) -> tuple[int, str | None]:
    """Contexts of the `data` stream to skip before evaluating, and a note for the user (or None).

    requested >= 0 is used as given. -1 (auto): the most training contexts among SAEs whose metadata records
    training on exactly `data` ("data" and "train_contexts"), so no SAE is evaluated on text it saw; 0 if none does.
    """
    if requested >= 0:
        return requested, None
    wanted = dataclasses.asdict(data)
    trained = [m.get("train_contexts") if m.get("data") == wanted else None for m in metadatas]
    known = [t for t in trained if isinstance(t, int)]
    skip = max(known, default=0)
    unknown = len(trained) - len(known)
    if unknown == 0:
        return skip, None
    return skip, (
        f"{unknown} of {len(trained)} SAE(s) record no training contexts for --corpus {data.corpus} --seed "
        f"{data.seed} --context-length {data.context_length}, so evaluation starts at context {skip} and may include "
        "text they were trained on (--skip-contexts N skips more)."
    )


def eval_model_name(saes: Sequence[SAE], names: Sequence[str], given: str) -> tuple[str, str | None]:
    """The model to evaluate in (the one given, else the one the SAEs record) and a note for the user (or None)."""
    recorded = {name: sae.metadata.get("model") for sae, name in zip(saes, names)}
    models = sorted({m for m in recorded.values() if m})
    if len(models) > 1:
        listing = "; ".join(f"{name}: {model}" for name, model in recorded.items())
        raise SaelabError(f"The SAEs were trained on different models ({listing}); evaluate each model's separately.")
    if given:
        note = (
            f"the SAEs record model '{models[0]}', evaluating in '{given}'." if models and models[0] != given else None
        )
        return given, note
    if not models:
        raise SaelabError("The SAEs do not record the model they were trained on; pass it with --model.")
    return models[0], None


def json_ready(result: dict[str, Any]) -> dict[str, Any]:
    """A result of `evaluate` with the [d_sae] firing frequencies summarised (median, p90, p99, max)."""
    out = dict(result)
    if out.get("sparsity") is not None:
        sparsity = dict(out["sparsity"])
        frequency = sparsity.pop("firing_frequency")
        q = torch.quantile(frequency, torch.tensor([0.5, 0.9, 0.99], dtype=frequency.dtype)).tolist()
        sparsity["firing_frequency"] = {"median": q[0], "p90": q[1], "p99": q[2], "max": float(frequency.max())}
        out["sparsity"] = sparsity
    return out


SHARE = "share"  # a TABLE_COLUMNS format: a count of latents with its share of all latents (see `latent_share`)
TABLE_COLUMNS = (  # header, result section, key, format, scale
    ("FVU", "reconstruction", "fvu", "{:.4f}", 1),
    ("MSE", "reconstruction", "mse", "{:.4g}", 1),
    ("cos", "reconstruction", "cosine", "{:.4f}", 1),
    ("shrink", "reconstruction", "shrinkage", "{:.3f}", 1),
    ("L0", "sparsity", "l0", "{:.1f}", 1),
    ("dead", "sparsity", "dead", SHARE, 1),
    ("dense", "sparsity", "dense", SHARE, 1),  # the header names the threshold: "dense f>0.1"
    ("CE rec zero", "downstream", "ce_recovered_zero", "{:.4f}", 1),
    ("CE rec mean", "downstream", "ce_recovered_mean", "{:.4f}", 1),
    ("dLM loss", "downstream", "delta_lm_loss", "{:.4f}", 1),
    ("KL", "downstream", "kl_sae", "{:.4f}", 1),
)


def latent_share(count: int, fraction: float) -> str:
    """A count of latents with its share of all of them, e.g. '3 (0.033%)': one decimal from 1% up, two significant
    digits below, so a share that is not zero never reads as zero."""
    if not count:
        return "0"
    percent = 100 * fraction
    return f"{count} ({percent:.1f}%)" if percent >= 1 else f"{count} ({percent:.2g}%)"


def _dense_thresholds(results: Sequence[dict[str, Any]]) -> str:
    """The firing-frequency threshold of "dense" in these results, as the table header shows it."""
    thresholds = {(r.get("sparsity") or {}).get("dense_threshold") for r in results} - {None}
    return f"{thresholds.pop():g}" if len(thresholds) == 1 else "threshold"


def format_table(results: Sequence[dict[str, Any]]) -> str:
    """One row per result of `evaluate`: SAE (folder name) and the TABLE_COLUMNS metrics ('-': not computed), under
    it a row of +- half-widths of their bootstrap intervals (blank: none), a line that says what the dead and dense
    counts are, then a line per SAE whose headline reconstruction left outlier tokens out, with its all-token FVU."""

    def cell(result: dict, section: str, key: str, fmt: str, scale: float) -> str:
        values = result.get(section) or {}
        value = values.get(key)
        if value is None:
            return "-"
        return latent_share(value, values[f"{key}_fraction"]) if fmt == SHARE else fmt.format(value * scale)

    def spread(result: dict, section: str, key: str, fmt: str, scale: float) -> str:
        interval = (result.get(section) or {}).get(f"{key}_ci")
        return "" if interval is None else "±" + fmt.format((interval[1] - interval[0]) / 2 * scale)

    dense = _dense_thresholds(results)
    header = ["SAE", *(f"dense f>{dense}" if key == "dense" else name for name, _, key, *_ in TABLE_COLUMNS)]
    rows = []
    for r in results:
        rows.append([Path(r["sae"]).name, *(cell(r, *column[1:]) for column in TABLE_COLUMNS)])
        spreads = [spread(r, *column[1:]) for column in TABLE_COLUMNS]
        if any(spreads):
            rows.append(["", *spreads])
    widths = [max(len(row[j]) for row in [header, *rows]) for j in range(len(header))]
    lines = [
        "  ".join(v.ljust(w) if j == 0 else v.rjust(w) for j, (v, w) in enumerate(zip(row, widths))).rstrip()
        for row in [header, *rows]
    ]
    notes = []
    if any(r.get("sparsity") for r in results):
        notes.append(
            f"dead: latents that never fired on the evaluated tokens; dense f>{dense}: latents whose firing frequency "
            f"f (the fraction of evaluated tokens they fire on) is above {dense}; each is a count of latents and its "
            "share of all latents"
        )
    if any(row[0] == "" for row in rows):
        notes.append(f"±: half-width of the {CONFIDENCE:.0%} bootstrap interval over contexts (<metric>_ci in JSON)")
    for r in results:
        reconstruction = r.get("reconstruction") or {}
        outliers, rule = reconstruction.get("outliers") or {}, reconstruction.get("outlier_rule") or {}
        if outliers.get("n_tokens"):
            all_tokens = {"reconstruction": reconstruction["all_tokens"]}
            all_fvu = cell(all_tokens, *TABLE_COLUMNS[0][1:]) + spread(all_tokens, *TABLE_COLUMNS[0][1:])
            notes.append(
                f"{Path(r['sae']).name}: FVU, MSE, cos and shrink leave out {outliers['n_tokens']} token(s) "
                f"({outliers['fraction']:.2%}) with ||x|| > {rule['outlier_norm']:g}x the median norm (up to "
                f"{outliers['max_norm_ratio']:.0f}x); over all tokens FVU {all_fvu}"
            )
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:], *notes])
