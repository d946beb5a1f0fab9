"""Dead-latent statistics from a run's latent history (`latent_history.safetensors`, written by the trainer).

The trainer records at every log step (merged to fewer than 512 records; saelab.train.history.LatentRecorder)
how often each latent fired since the previous record and the tokens trained so far; at the end, how many tokens
each latent has gone without firing (`since_fired`, exact to one step) and which latents each resampling
re-initialised. With records r = 0..n-1 taken at T_r tokens (T_-1 = 0), and window r the tokens (T_r-1, T_r]:

- density f_ri = counts_ri / (T_r - T_r-1): the fraction of window r's tokens on which latent i fired.
- silence s_ri: tokens since latent i last fired, at record resolution: T_r minus the latest of 0, the end of the
  last window in which it fired, and the token count of a resampling that re-initialised it (the trainer restarts
  its counter there). This is a lower bound on the trainer's own counter (at most one window less); at the last
  record the exact since_fired is used.
- dead at record r: s_ri >= dead_tokens (the training threshold unless overridden).
- died at: for a latent dead at the end, the token count at which its final silence began (T_n-1 - since_fired);
  the trainer declared it dead dead_tokens later.
- revival: a latent dead at record r fires in a later window v (the first such); it was revived by resampling when a
  resampling re-initialised it at t tokens with T_r <= t < T_v, and otherwise (AuxK, or on its own) if not.
  "Died and never revived": dead at some record and no revival after it.
- final density: over the last `density_fraction` of training (the trailing records that cover it). Dense: final
  f > dense_threshold (0.1); ultra-low: f < 1e-5 and f < 1e-6 (resolution 1 / tokens in that window).
- the outlier measure of dense/dead structure, on the saved SAE's unit decoder directions u_i = d_i / ||d_i||, for
  three groups (dense; dead at the end; the other, alive and not dense, latents as the reference):
  mean cos(u_i, b_dec) and mean |cos| (b_dec in the SAE's input space), the same for the mean activation
  direction when a cache is given, mean over the group of max_{j != i} |cos(u_i, u_j)| (nearest other decoder row
  among all latents) and mean |cos(u_i, u_j)| over pairs within the group (up to 4096 sampled members). Dense
  latents aligned with the mean / b_dec, or dead latents clustered together, show up as larger values than the
  reference group's.

The page of figures: saelab.analysis.dead_report; `saelab dead` (dead_report.html and dead.json beside the SAE):
saelab.commands.dead.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open
from tqdm.auto import tqdm

from saelab.analysis.metrics import DENSITY_BIN_EDGES, DENSITY_EPS, RARE_FREQUENCIES
from saelab.config import DeadConfig
from saelab.errors import SaelabError
from saelab.train.history import HISTORY_FORMAT, LATENT_HISTORY

GROUP_SAMPLE = 4096


class Revival(NamedTuple):
    """Latent `latent`, dead at record `dead_record`, fired again in window `record` (ending at `tokens`); the index
    of the resampling event that re-initialised it in between, or -1."""

    latent: int
    dead_record: int
    record: int
    tokens: int
    resample_event: int

    @property
    def after_resample(self) -> bool:
        return self.resample_event >= 0


@dataclass
class Deaths:
    """Which latents died and when, and which came back (see the module docstring for the definitions).

    dead:          bool [n_records, d_sae], dead at each record
    dead_at_end:   bool [d_sae]
    ever_dead:     bool [d_sae], dead at some record
    never_revived: bool [d_sae], dead at some record and silent after the last one
    died_at:       int64 [d_sae], tokens at which the final silence of a latent dead at the end began; -1 if alive
    first_death:   int64 [d_sae], tokens at which the silence of its first dead stretch began; -1 if never dead
    revivals:      one Revival per dead stretch that ended with a firing, in record order
    """

    dead: torch.Tensor
    dead_at_end: torch.Tensor
    ever_dead: torch.Tensor
    never_revived: torch.Tensor
    died_at: torch.Tensor
    first_death: torch.Tensor
    revivals: list[Revival]

    def revived(self, after_resample: bool | None = None) -> torch.Tensor:
        """bool [d_sae]: latents with at least one revival (only those after resampling, or only the others)."""
        mask = torch.zeros_like(self.ever_dead)
        for revival in self.revivals:
            if after_resample is None or revival.after_resample == after_resample:
                mask[revival.latent] = True
        return mask


@dataclass
class LatentHistory:
    """One run's latent history.

    counts:          int64 [n_records, d_sae], firings of each latent in each record's window
    tokens:          int64 [n_records], tokens trained at each record (the last is the whole run)
    since_fired:     int64 [d_sae], tokens since each latent last fired, at the end of training
    dead_tokens:     the trainer's dead threshold (tokens without firing)
    resample_steps:  int64 [n_events], steps after which a resampling ran
    resample_tokens: int64 [n_events], tokens trained at each resampling
    resampled:       n_events int64 tensors, the latents each resampling re-initialised
    info:            the file's metadata (run, hook, batch_size, log_every, log_steps_per_record, ...)
    """

    counts: torch.Tensor
    tokens: torch.Tensor
    since_fired: torch.Tensor
    dead_tokens: int
    resample_steps: torch.Tensor
    resample_tokens: torch.Tensor
    resampled: list[torch.Tensor]
    info: dict[str, Any]

    @classmethod
    def load(cls, folder: str | Path) -> LatentHistory:
        """Read `<folder>/latent_history.safetensors` (a saved SAE folder from `saelab train`)."""
        path = Path(folder) / LATENT_HISTORY
        if not path.is_file():
            raise SaelabError(
                f"{folder} has no {LATENT_HISTORY}: the SAE was trained before latent histories were recorded, or "
                "not by `saelab train`. Retrain it with `saelab train` to get one."
            )
        try:
            tensors = load_file(str(path))
            with safe_open(str(path), framework="pt") as f:
                info = json.loads((f.metadata() or {}).get("saelab", "{}"))
        except (SafetensorError, OSError, json.JSONDecodeError) as exc:
            raise SaelabError(f"{path} is corrupt ({exc}). Retrain the SAE to write it again.") from exc
        if info.get("format") != HISTORY_FORMAT or tensors["tokens"].numel() == 0:
            raise SaelabError(f"{path} is not a saelab latent history ({HISTORY_FORMAT}) with at least one record.")
        offsets = tensors["resample_offsets"].tolist()
        return cls(
            counts=tensors["counts"].long(),
            tokens=tensors["tokens"],
            since_fired=tensors["since_fired"],
            dead_tokens=int(info["dead_tokens"]),
            resample_steps=tensors["resample_steps"],
            resample_tokens=tensors["resample_tokens"],
            resampled=[tensors["resample_latents"][a:b] for a, b in itertools.pairwise(offsets)],
            info=info,
        )

    @property
    def n_records(self) -> int:
        return self.counts.shape[0]

    @property
    def d_sae(self) -> int:
        return self.counts.shape[1]

    @property
    def total_tokens(self) -> int:
        return int(self.tokens[-1])

    def window_tokens(self) -> torch.Tensor:
        """int64 [n_records]: tokens in each record's window."""
        return torch.diff(self.tokens, prepend=self.tokens.new_zeros(1))

    def density(self) -> torch.Tensor:
        """float64 [n_records, d_sae]: f_ri, the fraction of window r's tokens on which latent i fired."""
        return self.counts.double() / self.window_tokens().double().unsqueeze(1)

    def density_histogram(self, edges: torch.Tensor = DENSITY_BIN_EDGES) -> torch.Tensor:
        """int64 [n_records, n_bins]: latents per log10(f + 1e-10) bin (`edges` [n_bins + 1], even) per window."""
        return _row_histogram(torch.log10(self.density() + DENSITY_EPS), edges)

    def since_fired_histogram(self, bins: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
        """Final tokens since last firing: counts int64 [bins] over edges float64 [bins + 1] from 0 to the run's end."""
        edges = torch.linspace(0, self.total_tokens, bins + 1, dtype=torch.float64)
        return _row_histogram(self.since_fired.double().unsqueeze(0), edges)[0], edges

    def final_density(self, fraction: float) -> tuple[torch.Tensor, int]:
        """float64 [d_sae] densities over the trailing records covering `fraction` of training; and their tokens."""
        first = self.n_records - 1
        while first > 0 and self.total_tokens - int(self.tokens[first - 1]) < fraction * self.total_tokens:
            first -= 1
        window = self.total_tokens - (int(self.tokens[first - 1]) if first > 0 else 0)
        return self.counts[first:].sum(0).double() / window, window

    def silence(self) -> torch.Tensor:
        """int64 [n_records, d_sae]: s_ri, tokens since latent i last fired at record r (record resolution; the
        last row is the exact since_fired)."""
        silence = torch.empty_like(self.counts)
        start = torch.zeros(self.d_sae, dtype=torch.long)
        previous = 0
        for r in range(self.n_records):
            end = int(self.tokens[r])
            for t, latents in zip(self.resample_tokens.tolist(), self.resampled):
                if previous <= t < end:
                    start[latents] = start[latents].clamp_min(t)
            start[self.counts[r] > 0] = end
            silence[r] = end - start
            previous = end
        silence[-1] = self.since_fired
        return silence

    def deaths(self, dead_tokens: int | None = None) -> Deaths:
        """Deaths and revivals with `dead_tokens` (default: the training threshold)."""
        threshold = self.dead_tokens if dead_tokens is None else dead_tokens
        silence = self.silence()
        dead = silence >= threshold
        dead_record = torch.full((self.d_sae,), -1, dtype=torch.long)  # last dead record of an unrevived stretch
        first_death = torch.full((self.d_sae,), -1, dtype=torch.long)
        revivals: list[Revival] = []
        for r in range(self.n_records):
            back = (self.counts[r] > 0) & (dead_record >= 0)
            if back.any():
                latents = back.nonzero().squeeze(1)
                dead_since = self.tokens[dead_record[latents]]
                event = torch.full((len(latents),), -1, dtype=torch.long)
                for e, (t, resampled) in enumerate(zip(self.resample_tokens.tolist(), self.resampled)):
                    event[torch.isin(latents, resampled) & (dead_since <= t) & (t < self.tokens[r])] = e
                revivals += [
                    Revival(int(i), int(d), r, int(self.tokens[r]), int(e))
                    for i, d, e in zip(latents, dead_record[latents], event)
                ]
                dead_record[latents] = -1
            newly = dead[r] & (first_death < 0)
            first_death[newly] = self.tokens[r] - silence[r, newly]
            dead_record[dead[r]] = r
        dead_at_end = dead[-1]
        died_at = torch.where(dead_at_end, self.total_tokens - self.since_fired, -1)
        return Deaths(dead, dead_at_end, dead.any(0), dead_record >= 0, died_at, first_death, revivals)


def _row_histogram(values: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """values [rows, n] -> int64 [rows, len(edges) - 1] counts per bin of the evenly spaced `edges` (clamped)."""
    n_bins = len(edges) - 1
    position = (values - edges[0]) / (edges[-1] - edges[0]) * n_bins
    index = position.floor().long().clamp(0, n_bins - 1)
    counts = torch.zeros(values.shape[0], n_bins, dtype=torch.long)
    return counts.scatter_add_(1, index, torch.ones_like(index))


@torch.no_grad()
def decoder_geometry(
    W_dec: torch.Tensor,
    b_dec: torch.Tensor,
    groups: dict[str, torch.Tensor],
    mean_activation: torch.Tensor | None = None,
    progress: bool = False,
) -> dict[str, dict[str, float | int | None] | None]:
    """The outlier measure per group of latents (module docstring); None for an empty group.

    W_dec: [d_sae, d_in] decoder rows; b_dec: [d_in]; groups: name -> bool [d_sae]; mean_activation: [d_in] or None.
    Values per group: latents, cos_b_dec, abs_cos_b_dec, cos_mean_activation, abs_cos_mean_activation (None without
    a mean activation), nearest_abs_cos, within_group_abs_cos (None for a single latent).
    """
    unit = W_dec.float() / W_dec.float().norm(dim=1, keepdim=True).clamp_min(1e-12)
    nearest = torch.empty(len(unit))
    chunk = 1024  # [chunk, d_sae] similarities at a time
    for first in tqdm(range(0, len(unit), chunk), desc="nearest decoder rows", disable=not progress):
        sims = (unit[first : first + chunk] @ unit.T).abs()
        rows = torch.arange(len(sims))
        sims[rows, rows + first] = -1.0  # not the row itself
        nearest[first : first + chunk] = sims.max(dim=1).values

    def cosines(direction: torch.Tensor | None) -> torch.Tensor | None:
        if direction is None or float(direction.norm()) == 0:
            return None
        return unit @ (direction.float() / direction.float().norm())

    to_b_dec, to_mean = cosines(b_dec), cosines(mean_activation)
    generator = torch.Generator().manual_seed(0)
    result: dict[str, dict[str, float | int | None] | None] = {}
    for name, mask in groups.items():
        members = mask.nonzero().squeeze(1)
        if len(members) == 0:
            result[name] = None
            continue
        sample = members[torch.randperm(len(members), generator=generator)[:GROUP_SAMPLE]]
        pairs = (unit[sample] @ unit[sample].T).abs()
        n = len(sample)
        within = float((pairs.sum() - pairs.diagonal().sum()) / (n * (n - 1))) if n > 1 else None
        stats: dict[str, float | int | None] = {"latents": len(members)}
        for key, cos in (("b_dec", to_b_dec), ("mean_activation", to_mean)):
            stats[f"cos_{key}"] = None if cos is None else float(cos[members].mean())
            stats[f"abs_cos_{key}"] = None if cos is None else float(cos[members].abs().mean())
        stats["nearest_abs_cos"] = float(nearest[members].mean())
        stats["within_group_abs_cos"] = within
        result[name] = stats
    return result


def mean_activation(cache_path: str | Path, hook: str, d_in: int, n_tokens: int) -> torch.Tensor:
    """[d_in] mean of the first `n_tokens` activations of `hook` in a cache."""
    from saelab.activations.cache import ActivationCache

    cache = ActivationCache(cache_path)  # checksums checked: a damaged shard is named, not read
    cache.require(hook, d_in)
    batch = cache.read(torch.arange(min(n_tokens, cache.n_tokens)), hooks=[hook])
    return batch.acts[hook].double().mean(dim=0)


def _quantiles(values: torch.Tensor) -> dict[str, float] | None:
    if values.numel() == 0:
        return None
    qs = torch.quantile(values.double(), torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0], dtype=torch.float64))
    return dict(zip(("min", "q25", "median", "q75", "max"), qs.tolist()))


def summarize(history: LatentHistory, deaths: Deaths, config: DeadConfig, geometry: dict[str, Any]) -> dict[str, Any]:
    """The dead.json summary (plain JSON types)."""
    d_sae = history.d_sae
    final, final_tokens = history.final_density(config.density_fraction)
    revived_resample, revived_other = deaths.revived(True), deaths.revived(False)
    density = history.density()
    dead_per_record = deaths.dead.sum(1)
    return {
        "run": history.info.get("run"),
        "hook": history.info.get("hook"),
        "d_sae": d_sae,
        "trained_tokens": history.total_tokens,
        "records": history.n_records,
        "log_steps_per_record": history.info.get("log_steps_per_record"),
        "dead_tokens": config.dead_tokens or history.dead_tokens,
        "dead_tokens_in_training": history.dead_tokens,
        "dead": {
            "at_end": int(deaths.dead_at_end.sum()),
            "fraction_at_end": float(deaths.dead_at_end.double().mean()),
            "ever": int(deaths.ever_dead.sum()),
            "never_revived": int(deaths.never_revived.sum()),
            "revived": int(deaths.revived().sum()),
            "revived_after_resample": int(revived_resample.sum()),
            "revived_otherwise": int(revived_other.sum()),
            "revivals": len(deaths.revivals),
            "revived_then_dead_at_end": int((deaths.revived() & deaths.dead_at_end).sum()),
            "died_at_tokens": _quantiles(deaths.died_at[deaths.dead_at_end]),
            "latents_dead_at_end": deaths.dead_at_end.nonzero().squeeze(1).tolist(),
            "latents_revived_after_resample": revived_resample.nonzero().squeeze(1).tolist(),
            "latents_revived_otherwise": revived_other.nonzero().squeeze(1).tolist(),
        },
        "since_fired": {
            "quantiles": _quantiles(history.since_fired),
            "never_fired": int((history.counts.sum(0) == 0).sum()),
        },
        "final_density": {
            "over_tokens": final_tokens,
            "dense_threshold": config.dense_threshold,
            "dense_fraction": float((final > config.dense_threshold).double().mean()),
            **{f"below_{t:g}_fraction": float((final < t).double().mean()) for t in RARE_FREQUENCIES},
            "zero_fraction": float((final == 0).double().mean()),
            "log10_quantiles": _quantiles(torch.log10(final + DENSITY_EPS)),
        },
        "over_training": [
            {
                "tokens": int(t),
                "dead": int(n),
                "silent_in_window": int((c == 0).sum()),
                "dense_fraction": float((f > config.dense_threshold).double().mean()),
                "median_log10_density": float(torch.log10(f + DENSITY_EPS).median()),
            }
            for t, n, c, f in zip(history.tokens, dead_per_record, history.counts, density)
        ],
        "resamples": [
            {
                "step": int(s),
                "tokens": int(t),
                "latents": len(latents),
                "revived_after": sum(r.resample_event == e for r in deaths.revivals),
            }
            for e, (s, t, latents) in enumerate(zip(history.resample_steps, history.resample_tokens, history.resampled))
        ],
        "decoder_geometry": geometry,
    }


__all__ = ["Deaths", "LatentHistory", "Revival", "decoder_geometry", "mean_activation", "summarize"]
