"""Collect the per-latent data of a feature dashboard in one pass over an activation cache.

    summary, features = collect_dashboard_data(load_sae(folder), ActivationCache(cache), model=model, folder=folder)

The output follows the dashboard data contract (summary and one dict per latent; see `collect_dashboard_data`).

One pass, all latents at once. The cache is read in storage order, `batch_tokens` at a time; each batch is encoded
once (`sae.encode_code`, a sparse CSR code) and only its nonzero entries at the requested latents are used:
- firing counts, sums, max and min per latent (and SparsityStats over all latents for the summary);
- top examples: a streaming top-k per latent (`StreamingTopK`): entries that beat a latent's current K-th key are
  buffered; once the buffer holds F * K entries it is merged with the running [F, K] state by sorting on
  (latent, -key, token) and keeping rank < K within each latent's segment. Ties go to the earlier token. The key
  is the activation, or |activation| for signed SAEs (AbsTopK);
- quantile samples: a uniform random sample without replacement of each latent's firing tokens, by the same
  top-k on a random priority per entry (reservoir sampling by random keys, seeded). At the end the sample is
  sorted by activation and split into `n_quantiles` equal-count bins (lowest first); each bin shows up to
  `quantile_examples` of its tokens, drawn at random;
- histogram: exact counts of the firing activations in `HISTOGRAM_BINS` bins over [0, R] ([-R, R] if signed).
  R starts at the first batch's max |activation| and doubles when a larger one comes, merging bins 2^m -> 1,
  which is exact because the old edges are a subset of the new ones. Empty bins at both ends are trimmed;
- a firing record: the (token, latent, activation) entries at the requested latents, while they fit in
  RECORD_BUDGET_BYTES. Example windows (context_before stored tokens before the focus token and context_after
  after it, within the same context; BOS and separators are not stored in the cache and do not appear) read their
  per-token activations from this record, so they are exactly the values the pass computed. When the record
  outgrows the budget (dense SAEs) it is dropped, and after the pass the rows the windows need are read again
  with `cache.read` and re-encoded (every variant's inference code is per token, so the values are the same).

Besides the pass:
- logit effects: the decoder direction through the unembedding, d_i @ W_U (hook_z: first through that layer's
  W_O, d_i reshaped [n_heads, d_head]). The final norm is ignored (the direct logit effect, as SAELens and
  Neuronpedia show it). None without a model, for encoders (attention not causal), and for hooks whose width is
  not d_model;
- the token index: every latent that is not requested gets a streaming top-k of its own in the pass (keys only; no
  samples, histograms or windows), so summary["latent_tokens"] lists the top tokens of every latent of the SAE,
  with a page or without (see below);
- neighbours: the other latents with the highest cosine between decoder rows, each with its top tokens (up to
  NEIGHBOUR_TOKENS, as its own page would list them), so a page can show what a neighbour without a page fires on;
- heads (attn.hook_z SAEs with a model, which gives n_heads): direct feature attribution of the pre-activation by
  head (saelab.analysis.attribution.head_attribution; with its bias term the heads sum to the pre-activation).

summary["metrics"] is flat: l0, dead_fraction and dense_fraction over the tokens read, plus eval_<name> for every
number of the reconstruction, sparsity and downstream sections of the SAE folder's eval.json (when `folder` is given
and has one); summary["metric_names"] gives each a human name that says which tokens it was measured on.
summary["latent_tokens"][i] is latent i's top tokens as [token, how many of its top_k top activations are on it],
most first (the first entries are its page's "top_tokens"), for all d_sae latents: the site writes it to its own
token-index file. Feature "heads" is the mean of the top examples' head attributions (None for dead latents).

Reading `n_tokens` tokens covers the first n_tokens stored tokens (at most the whole cache); windows stay within
those tokens.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import torch
from tqdm.auto import tqdm

from saelab.activations.cache import ActivationCache
from saelab.analysis.attribution import head_attribution
from saelab.analysis.metrics import SparsityStats
from saelab.errors import SaelabError
from saelab.sae.base import SAE
from saelab.sae.io import recorded_hook

HISTOGRAM_BINS = 64
SAMPLE_PER_QUANTILE = 40  # reservoir size per latent = this * n_quantiles (sets how well the bin edges are estimated)
RECORD_BUDGET_BYTES = 1 << 30
_CHUNK_LATENTS = 256
_MIN_MERGE_ENTRIES = 1 << 16
_READ_ROWS = 8192
_TOP_TOKENS = 10
NEIGHBOUR_TOKENS = 5


class LogitEffects(NamedTuple):
    """Per latent, best first: positive_ids/positive_values [n, m] (largest logit effects), negative_ids/
    negative_values [n, m] (most negative first)."""

    positive_ids: torch.Tensor
    positive_values: torch.Tensor
    negative_ids: torch.Tensor
    negative_values: torch.Tensor


class StreamingTopK:
    """The k largest keys per slot over a stream of (slot, key, token, value) entries; ties go to the smaller token.

    After the stream: keys [n_slots, k] (-inf where empty), tokens [n_slots, k] (-1 where empty), values
    [n_slots, k], best first. Entries that beat a slot's current k-th key wait in a buffer that is merged once it
    holds n_slots * k entries, so each merge's cost (sorting the kept state with the buffer) is spread over at least
    as many entries.
    """

    def __init__(self, n_slots: int, k: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        self.k = k
        self._keys = torch.full((n_slots, k), -math.inf, device=device, dtype=dtype)
        self._tokens = torch.full((n_slots, k), -1, device=device, dtype=torch.long)
        self._values = torch.zeros((n_slots, k), device=device, dtype=dtype)
        self._pending: list[tuple[torch.Tensor, ...]] = []
        self._pending_entries = 0
        self._merge_at = max(n_slots * k, _MIN_MERGE_ENTRIES)

    @property
    def keys(self) -> torch.Tensor:
        self._merge()
        return self._keys

    @property
    def tokens(self) -> torch.Tensor:
        self._merge()
        return self._tokens

    @property
    def values(self) -> torch.Tensor:
        self._merge()
        return self._values

    def update(self, slots: torch.Tensor, keys: torch.Tensor, tokens: torch.Tensor, values: torch.Tensor) -> None:
        """Add entries: slots [n] int64, keys [n], tokens [n] int64 in ascending order and larger than every token
        of earlier updates (the cache is read in order), values [n] (carried along)."""
        if self.k == 0 or slots.numel() == 0:
            return
        # an equal key loses to the earlier token already kept
        contenders = (keys > self._keys[slots, -1]).nonzero().squeeze(1)
        if contenders.numel() == 0:
            return
        entry = (
            slots[contenders],
            keys[contenders].to(self._keys.dtype),
            tokens[contenders],
            values[contenders].to(self._values.dtype),
        )
        self._pending.append(entry)
        self._pending_entries += len(entry[0])
        if self._pending_entries >= self._merge_at:
            self._merge()

    def _merge(self) -> None:
        if not self._pending:
            return
        slots, keys, tokens, values = (torch.cat(parts) for parts in zip(*self._pending))
        self._pending, self._pending_entries = [], 0
        touched = torch.unique(slots)
        all_slots = torch.cat([touched.repeat_interleave(self.k), slots])
        all_keys = torch.cat([self._keys[touched].flatten(), keys])
        all_tokens = torch.cat([self._tokens[touched].flatten(), tokens])
        all_values = torch.cat([self._values[touched].flatten(), values])
        # Within a slot, equal keys already come in token order (kept ones by rank, then the new, later tokens), so
        # two stable sorts give the order (slot, -key, token).
        order = torch.argsort(-all_keys, stable=True)
        order = order[torch.argsort(all_slots[order], stable=True)]
        sorted_slots = all_slots[order]
        rank = torch.arange(len(order), device=order.device) - torch.searchsorted(sorted_slots, sorted_slots)
        keep = rank < self.k  # every touched slot brings its k kept entries, so all k places are rewritten
        place = (sorted_slots[keep], rank[keep])
        self._keys[place] = all_keys[order[keep]]
        self._tokens[place] = all_tokens[order[keep]]
        self._values[place] = all_values[order[keep]]


class DoublingHistogram:
    """Exact per-slot histograms of a value stream without knowing the range in advance.

    Slot s counts values in n_bins equal bins over [0, R_s] ([-R_s, R_s] when signed); R_s is the first batch's
    max |value| and doubles as often as needed when a larger value comes, merging old bins into new ones.
    """

    def __init__(self, n_slots: int, n_bins: int, signed: bool, device: torch.device | str = "cpu"):
        if signed and n_bins % 2:
            raise SaelabError(f"A signed histogram needs an even number of bins (got {n_bins}).")
        self.n_bins = n_bins
        self.center = n_bins // 2 if signed else 0
        self.half_bins = n_bins // 2 if signed else n_bins  # bins between 0 and R
        self.range = torch.zeros(n_slots, dtype=torch.float64, device=device)
        self.counts = torch.zeros((n_slots, n_bins), dtype=torch.long, device=device)

    def update(self, slots: torch.Tensor, values: torch.Tensor) -> None:
        """slots [n] int64, values [n] (|value| > 0)."""
        if slots.numel() == 0:
            return
        values = values.double()
        needed = torch.zeros_like(self.range).scatter_reduce(0, slots, values.abs(), "amax")
        fresh = (self.range == 0) & (needed > 0)
        self.range[fresh] = needed[fresh]
        grow = needed > self.range
        if grow.any():
            self._grow(grow.nonzero().squeeze(1), needed[grow])
        scaled = torch.floor(values / self.range[slots] * self.half_bins).long() + self.center
        bins = scaled.clamp(0, self.n_bins - 1)
        self.counts.view(-1).index_add_(0, slots * self.n_bins + bins, torch.ones_like(bins))

    def _grow(self, slots: torch.Tensor, needed: torch.Tensor) -> None:
        old = self.range[slots]
        doublings = torch.ceil(torch.log2(needed / old)).clamp(min=1)
        doublings += (old * torch.pow(2.0, doublings) < needed).double()  # guard log2 rounding
        factor = torch.pow(2.0, doublings).long()
        index = torch.arange(self.n_bins, device=slots.device)
        merged = torch.div(index - self.center, factor[:, None], rounding_mode="floor") + self.center
        self.counts[slots] = torch.zeros_like(self.counts[slots]).scatter_add_(1, merged, self.counts[slots])
        self.range[slots] = old * factor.double()

    def result(self, slot: int) -> dict[str, list]:
        """{"edges": [n + 1 floats], "counts": [n ints]} of slot `slot` with empty end bins trimmed (empty lists if
        it never counted anything)."""
        counts = self.counts[slot].cpu()
        nonzero = counts.nonzero().squeeze(1)
        if nonzero.numel() == 0:
            return {"edges": [], "counts": []}
        first, last = int(nonzero[0]), int(nonzero[-1])
        width = float(self.range[slot]) / self.half_bins
        edges = [(i - self.center) * width for i in range(first, last + 2)]
        return {"edges": edges, "counts": counts[first : last + 1].tolist()}


class FiringRecord:
    """A sparse [tokens, slots] code that answers point look-ups: keys token * n_slots + slot [m] int64 and the
    activations there [m], sorted by key on the first look-up."""

    def __init__(self, n_slots: int):
        self.n_slots = n_slots
        self.parts: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.entries = 0
        self.nbytes = 0
        self.table: tuple[torch.Tensor, torch.Tensor] | None = None

    def add(self, tokens: torch.Tensor, slots: torch.Tensor, values: torch.Tensor) -> None:
        """Entries of tokens [n], slots [n], values [n] (each (token, slot) at most once over all calls)."""
        self.parts.append(((tokens * self.n_slots + slots).cpu(), values.cpu()))
        self.entries += len(tokens)
        self.nbytes += sum(t.nbytes for t in self.parts[-1])
        self.table = None

    def lookup(self, tokens: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """The recorded activation [n] at tokens [n] and slots [n] (0 where nothing was recorded)."""
        if not self.entries:
            return torch.zeros(tokens.shape)
        if self.table is None:
            keys, order = torch.sort(torch.cat([k for k, _ in self.parts]))
            self.table = keys, torch.cat([v for _, v in self.parts])[order]
            self.parts = [self.table]
        keys, values = self.table
        query = tokens * self.n_slots + slots
        where = torch.searchsorted(keys, query).clamp(max=keys.numel() - 1)
        return torch.where(keys[where] == query, values[where], 0.0)


@torch.no_grad()
def unembedding_directions(sae: SAE, model: Any, latents: torch.Tensor) -> torch.Tensor | None:
    """The residual-stream direction [n, d_model] each latent's decoder row writes, or None when it has none: hook_z
    rows go through the layer's W_O; other hooks need width d_model."""
    hook = sae.metadata.get("hook", "")
    directions = sae.W_dec[latents] / sae.input_scale  # raw space (input_scale is 1 for saved SAEs)
    if hook.endswith("attn.hook_z"):
        layer = int(hook.split(".")[1])
        W_O = model.W_O[layer]  # [n_heads, d_head, d_model]
        return torch.einsum("nhd,hdm->nm", directions.view(len(latents), *W_O.shape[:2]).to(W_O), W_O)
    if sae.d_in != model.cfg.d_model:
        return None
    return directions


@torch.no_grad()
def logit_effects(sae: SAE, model: Any, latents: torch.Tensor, n_logits: int) -> LogitEffects | None:
    """The n_logits largest and most negative entries of d_i @ W_U [n, d_vocab] for latents [n], or None for no
    model, encoders (attention not causal) and hooks with no residual-stream direction."""
    if model is None or getattr(model.cfg, "attention_dir", "causal") != "causal":
        return None
    if unembedding_directions(sae, model, latents[:1]) is None:
        return None
    W_U = model.W_U  # [d_model, d_vocab]
    n = min(n_logits, W_U.shape[1])
    parts = []
    for chunk in torch.split(latents, _CHUNK_LATENTS):
        logits = unembedding_directions(sae, model, chunk).to(W_U) @ W_U
        parts.append((logits.topk(n, dim=1), logits.topk(n, dim=1, largest=False)))
    return LogitEffects(
        torch.cat([top.indices for top, _ in parts]).cpu(),
        torch.cat([top.values for top, _ in parts]).cpu(),
        torch.cat([bottom.indices for _, bottom in parts]).cpu(),
        torch.cat([bottom.values for _, bottom in parts]).cpu(),
    )


@torch.no_grad()
def decoder_neighbours(sae: SAE, latents: torch.Tensor, n_neighbours: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The n_neighbours other latents with the highest decoder cosine: (ids [n, m], cosines [n, m]), highest first."""
    unit = torch.nn.functional.normalize(sae.W_dec.detach(), dim=1)
    m = min(n_neighbours, sae.d_sae - 1)
    ids, cosines = [], []
    for chunk in torch.split(latents, _CHUNK_LATENTS):
        similarity = unit[chunk] @ unit.T
        similarity[torch.arange(len(chunk)), chunk] = -math.inf
        best = similarity.topk(m, dim=1)
        ids.append(best.indices)
        cosines.append(best.values)
    return torch.cat(ids), torch.cat(cosines)


class TokenPieces:
    """Token id -> its decoded string (raw: may hold spaces, newlines, markup), decoding each id once."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.pieces: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        if token_id not in self.pieces:
            self.pieces[token_id] = self.tokenizer.decode([token_id])
        return self.pieces[token_id]


def _eval_metrics(folder: Path | None) -> dict[str, float]:
    """The numbers of eval.json in the SAE folder as eval_<name> (none if there is no such file)."""
    if folder is None or not (folder / "eval.json").is_file():
        return {}
    try:
        result = json.loads((folder / "eval.json").read_text())
    except json.JSONDecodeError:
        return {}
    metrics = {}
    for section in ("reconstruction", "sparsity", "downstream"):
        for key, value in (result.get(section) or {}).items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                metrics.setdefault(f"eval_{key}", value)
    return metrics


def _check_features(features: Sequence[int] | None, d_sae: int) -> torch.Tensor:
    if features is None:
        return torch.arange(d_sae)
    ids = torch.as_tensor(list(features), dtype=torch.long)
    if ids.numel() == 0:
        raise SaelabError("No features requested; pass at least one latent id (or none for all).")
    if bool(((ids < 0) | (ids >= d_sae)).any()):
        raise SaelabError(f"Feature ids must lie in [0, {d_sae}) for this SAE (got {ids.min()}..{ids.max()}).")
    if torch.unique(ids).numel() != ids.numel():
        raise SaelabError("Feature ids are repeated; list each latent once.")
    return ids


@contextmanager
def _one_thread() -> Iterator[None]:
    """Run the pass's bookkeeping (many small ops) on one thread: on a busy CPU, waking a second intra-op thread
    for each small op cost 50x the work (372 ms against 7 ms per 8192-token batch, 2 shared cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class _Pass:
    """The state of the one pass over the cache (see the module docstring)."""

    def __init__(self, sae: SAE, latents: torch.Tensor, top_k: int, sample_size: int, seed: int, extra: torch.Tensor):
        """latents [n]: the requested latents (slots 0..n-1); extra [m]: other latents that only need their top
        examples' tokens (every latent without a page, for the token index and the neighbours)."""
        device = sae.W_enc.device
        n = len(latents)
        self.slot_of = torch.full((sae.d_sae,), -1, dtype=torch.long, device=device)
        self.slot_of[latents.to(device)] = torch.arange(n, device=device)
        self.signed = sae.signed
        self.sparsity = SparsityStats(sae.d_sae)
        self.counts = torch.zeros(n, dtype=torch.long, device=device)
        self.sums = torch.zeros(n, dtype=torch.float64, device=device)
        self.max = torch.full((n,), -math.inf, dtype=torch.float64, device=device)
        self.min = torch.full((n,), math.inf, dtype=torch.float64, device=device)
        self.top = StreamingTopK(n, top_k, device, sae.W_enc.dtype)
        self.sample = StreamingTopK(n, sample_size, device, sae.W_enc.dtype)
        self.histogram = DoublingHistogram(n, HISTOGRAM_BINS, sae.signed, device)
        self.record: FiringRecord | None = FiringRecord(n)
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.extra_slot_of = torch.full((sae.d_sae,), -1, dtype=torch.long, device=device)
        self.extra_slot_of[extra.to(device)] = torch.arange(len(extra), device=device)
        self.extra_top = StreamingTopK(len(extra), top_k, device, sae.W_enc.dtype) if len(extra) else None

    def update(self, first_token: int, code) -> None:
        self.sparsity.update(code)
        slots = self.slot_of[code.layout.indices]
        keep = ((slots >= 0) & (code.values != 0)).nonzero().squeeze(1)
        slots, values = slots[keep], code.values[keep].detach()
        tokens = code.layout.rows[keep] + first_token
        wide = values.double()
        self.counts += torch.bincount(slots, minlength=len(self.counts))
        self.sums.index_add_(0, slots, wide)
        self.max.scatter_reduce_(0, slots, wide, "amax")
        self.min.scatter_reduce_(0, slots, wide, "amin")
        self.top.update(slots, values.abs() if self.signed else values, tokens, values)
        priority = torch.rand(values.shape, generator=self.generator, device=values.device)
        self.sample.update(slots, priority, tokens, values)
        self.histogram.update(slots, wide)
        if self.record is not None:
            self.record.add(tokens, slots, values)
            if self.record.nbytes > RECORD_BUDGET_BYTES:
                self.record = None  # too dense to keep: windows re-encode their rows after the pass
        if self.extra_top is not None:
            add_top_entries(self.extra_top, self.extra_slot_of, code, first_token, self.signed)


def add_top_entries(top: StreamingTopK, slot_of: torch.Tensor, code, first_token: int, signed: bool) -> None:
    """Feed a batch's sparse code to `top`: each nonzero entry at a latent with a slot (slot_of [d_sae], -1: none),
    keyed by its activation (|activation| when signed), with its cache row (first_token + row in the batch)."""
    slots = slot_of[code.layout.indices]
    hit = ((slots >= 0) & (code.values != 0)).nonzero().squeeze(1)
    values = code.values[hit].detach()
    top.update(slots[hit], values.abs() if signed else values, code.layout.rows[hit] + first_token, values)


def _read_rows(cache: ActivationCache, hook: str, rows: torch.Tensor, with_acts: bool):
    """cache.read of rows [n] in chunks: yields (chunk rows, ActivationBatch)."""
    for chunk in torch.split(rows, _READ_ROWS):
        yield chunk, cache.read(chunk, hooks=[hook] if with_acts else [])


def _recorded_rows(
    sae: SAE, cache: ActivationCache, hook: str, rows: torch.Tensor, slot_of: torch.Tensor, progress: bool
) -> FiringRecord:
    """Re-encode cache rows [n] (sorted, unique) -> a FiringRecord of their entries at the requested latents."""
    record = FiringRecord(int((slot_of >= 0).sum()))
    chunks = tqdm(
        _read_rows(cache, hook, rows, with_acts=True),
        total=math.ceil(len(rows) / _READ_ROWS),
        desc="re-encoding example windows",
        disable=not progress,
    )
    for chunk, batch in chunks:
        code, _, _ = sae.encode_code(batch.acts[hook].to(sae.W_enc))
        slots = slot_of[code.layout.indices]
        keep = (slots >= 0) & (code.values != 0)
        record.add(chunk.to(slots.device)[code.layout.rows[keep]], slots[keep], code.values[keep])
    return record


@torch.no_grad()
def collect_dashboard_data(
    sae: SAE,
    cache: ActivationCache,
    *,
    model: Any = None,
    features: Sequence[int] | None = None,
    n_tokens: int | None = None,
    top_k: int = 20,
    quantile_examples: int = 5,
    n_quantiles: int = 5,
    context_before: int = 24,
    context_after: int = 8,
    n_neighbours: int = 10,
    n_logits: int = 10,
    progress: bool = True,
    folder: str | Path | None = None,
    batch_tokens: int = 8192,
    seed: int = 0,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One pass over `cache` -> (summary, features) of the dashboard data contract, JSON-ready.

    sae: a loaded SAE whose metadata names its hook; cache: an ActivationCache holding that hook; model: a
    TransformerBridge for logit effects and token strings (None: the tokenizer of sae.metadata["model"], no logit
    effects); features: latent ids (default all), reported in that order; n_tokens: tokens to read (default and at
    most the whole cache); folder: the SAE's folder (its name and eval.json go into the summary); batch_tokens:
    tokens encoded at a time; seed: the quantile samples' random draw.
    """
    hook = recorded_hook(sae, "The SAE")
    cache.require(hook, sae.d_in)
    counts = {
        "top_k": top_k,
        "quantile_examples": quantile_examples,
        "n_quantiles": n_quantiles,
        "context_before": context_before,
        "context_after": context_after,
        "n_neighbours": n_neighbours,
        "n_logits": n_logits,
    }
    _check_options(counts, batch_tokens)
    latents = _check_features(features, sae.d_sae)
    total = cache.n_tokens if n_tokens is None else min(int(n_tokens), cache.n_tokens)
    if total <= 0:
        raise SaelabError(f"Nothing to read: the cache holds {cache.n_tokens} tokens and n_tokens is {n_tokens}.")
    model_name = sae.metadata.get("model") or cache.manifest["identity"]["model"]["model"]
    if model is not None:
        pieces = TokenPieces(model.tokenizer)
    else:
        from saelab.models import load_tokenizer

        pieces = TokenPieces(load_tokenizer(model_name))

    neighbours = decoder_neighbours(sae, latents.to(sae.W_dec.device), n_neighbours)
    neighbour_ids = torch.unique(neighbours[0].cpu())
    extra = torch.ones(sae.d_sae, dtype=torch.bool).index_fill_(0, latents, False).nonzero().squeeze(1)
    sample_size = SAMPLE_PER_QUANTILE * n_quantiles if quantile_examples else 0
    state = _Pass(sae, latents, top_k, sample_size, seed, extra)
    scan_cache(sae, cache, hook, state.update, total, batch_tokens, progress)
    with _one_thread():
        examples = _choose_examples(state, quantile_examples, n_quantiles)
    windows = _windows(sae, cache, hook, state, examples, total, context_before, context_after, pieces, progress)
    heads = _example_heads(sae, cache, hook, latents, examples, model)
    logits = logit_effects(sae, model, latents.to(sae.W_dec.device), n_logits)
    counts_of = dict(zip(latents.tolist(), top_token_counts(cache, state.top.tokens.cpu(), pieces)))
    if len(extra):
        counts_of |= dict(zip(extra.tolist(), top_token_counts(cache, state.extra_top.tokens.cpu(), pieces)))
    neighbour_tokens = {i: top_tokens(counts_of[i], NEIGHBOUR_TOKENS) for i in neighbour_ids.tolist()}
    sparsity = state.sparsity.result()
    records = _FeatureRecords(
        state, sparsity["firing_frequency"], examples, windows, heads, logits, (*neighbours, neighbour_tokens), pieces,
        [top_tokens(counts_of[i]) for i in latents.tolist()],
    )  # fmt: skip
    summary = _summary(sae, hook, model_name, total, sparsity, Path(folder) if folder is not None else None)
    summary["top_k"] = top_k
    summary["latent_tokens"] = [[list(pair) for pair in counts_of[i].most_common(_TOP_TOKENS)] for i in range(sae.d_sae)]
    return summary, [records.record(slot, latent) for slot, latent in enumerate(latents.tolist())]


def _check_options(counts: dict[str, int], batch_tokens: int) -> None:
    """Every count (name -> value) at least 0, quantile examples only with quantiles, a positive batch size."""
    for name, value in counts.items():
        if value < 0:
            raise SaelabError(f"{name} must not be negative (got {value}).")
    if counts["n_quantiles"] == 0 and counts["quantile_examples"]:
        raise SaelabError("n_quantiles must be positive to show quantile examples.")
    if batch_tokens <= 0:
        raise SaelabError(f"batch_tokens must be positive (got {batch_tokens}).")


def scan_cache(
    sae: SAE,
    cache: ActivationCache,
    hook: str,
    update: Callable[[int, Any], None],
    total: int,
    batch_tokens: int,
    progress: bool,
    desc: str = "dashboard pass",
) -> None:
    """A pass: the first `total` cached tokens in storage order, encoded `batch_tokens` at a time; each batch's
    sparse code goes to update(first token's row, code), run on one thread (see `_one_thread`)."""
    bar = tqdm(total=total, unit="tok", unit_scale=True, desc=desc, disable=not progress)
    with bar:
        for first in range(0, total, batch_tokens):
            index = torch.arange(first, min(first + batch_tokens, total))
            x = cache.read(index, hooks=[hook]).acts[hook].to(sae.W_enc)
            code, _, _ = sae.encode_code(x)
            with _one_thread():
                update(first, code)
            bar.update(len(index))


def token_ids_at(cache: ActivationCache, rows: torch.Tensor) -> torch.Tensor:
    """The token id stored at each cache row: rows [...] int64 (-1: none) -> token ids [...] (-1 where rows is)."""
    flat = rows.flatten()
    needed = torch.unique(flat[flat >= 0])
    out = torch.full_like(flat, -1)
    if needed.numel():
        ids = torch.cat([batch.token_ids for _, batch in _read_rows(cache, "", needed, with_acts=False)])
        valid = flat >= 0
        out[valid] = ids[torch.searchsorted(needed, flat[valid])].long()
    return out.view(rows.shape)


def top_token_counts(cache: ActivationCache, rows: torch.Tensor, pieces: TokenPieces) -> list[Counter]:
    """Per latent, how often each token (as text) is the focus of its top examples: rows [n, k] of top-example cache
    rows, best first, -1 where empty -> n Counters, each in order of first appearance (the better example first)."""
    return [Counter(pieces(t) for t in row if t >= 0) for row in token_ids_at(cache, rows).tolist()]


def top_tokens(counts: Counter, m: int = _TOP_TOKENS) -> list[str]:
    """The m most common tokens of a latent's top examples (a `top_token_counts` Counter), most common first, ties
    to the better example's token: a feature's "top_tokens"."""
    return [token for token, _ in counts.most_common(m)]


def _summary(
    sae: SAE, hook: str, model_name: str, total: int, sparsity: dict[str, Any], folder: Path | None
) -> dict[str, Any]:
    """The summary of the data contract, from the pass's SparsityStats result."""
    metrics = {
        "l0": sparsity["l0"],
        "dead_fraction": sparsity["dead_fraction"],
        "dense_fraction": sparsity["dense_fraction"],
        **_eval_metrics(folder),
    }
    return {
        "sae": folder.resolve().name if folder is not None else str(sae.metadata.get("run") or sae.architecture),
        "architecture": sae.architecture,
        "hook": hook,
        "model": model_name,
        "d_sae": sae.d_sae,
        "n_tokens": total,
        "signed": bool(sae.signed),
        "metrics": metrics,
        "metric_names": {key: metric_name(key, total, metrics, sparsity["dense_threshold"]) for key in metrics},
        "density_histogram": sparsity["log10_density_histogram"],
    }


METRIC_NAMES = {
    "l0": "L0: latents firing per token",
    "dead_fraction": "dead latents: never fired",
    "dead": "dead latents (count)",
    "dense_fraction": "dense latents: firing on over {dense:.0%} of tokens",
    "dense": "dense latents (count)",
    "dense_threshold": "density above which a latent counts as dense",
    "fvu": "FVU: fraction of variance unexplained",
    "mse": "MSE: mean squared error per token",
    "cosine": "cosine of input and reconstruction",
    "shrinkage": "shrinkage: reconstruction norm / input norm",
    "ce_clean": "LM loss, clean (nats)",
    "ce_sae": "LM loss with the SAE spliced in (nats)",
    "ce_zero": "LM loss with the hook zero-ablated (nats)",
    "ce_mean": "LM loss with the hook mean-ablated (nats)",
    "ce_recovered_zero": "CE loss recovered (vs zero ablation)",
    "ce_recovered_mean": "CE loss recovered (vs mean ablation)",
    "delta_lm_loss": "LM loss increase with the SAE (nats)",
    "kl_sae": "KL to the clean model with the SAE (nats)",
    "kl_zero": "KL to the clean model, zero-ablated (nats)",
    "kl_mean": "KL to the clean model, mean-ablated (nats)",
    "kl_score_zero": "KL recovered (vs zero ablation)",
    "kl_score_mean": "KL recovered (vs mean ablation)",
    "n_tokens": "tokens evaluated",
    "n_contexts": "contexts evaluated",
    "n_predictions": "next-token predictions evaluated",
}


def metric_name(key: str, n_tokens: int, metrics: dict[str, float], dense_threshold: float) -> str:
    """The summary table's name of a summary["metrics"] key, saying which tokens it was measured on: the dashboard's
    scan of the (training) cache, or `saelab eval` on held-out text (keys eval_<name>, whose dense threshold is
    metrics["eval_dense_threshold"] when eval.json gives one)."""
    base = key.removeprefix("eval_")
    if key.startswith("eval_"):
        dense_threshold = metrics.get("eval_dense_threshold", dense_threshold)
    name = METRIC_NAMES.get(base, base.replace("_", " ")).format(dense=dense_threshold)
    where = "eval, held-out text" if key.startswith("eval_") else f"dashboard scan, {n_tokens:,} cache tokens"
    return f"{name} ({where})"


class _FeatureRecords:
    """Each requested latent's record of the data contract, from the pass's state, the latents' firing frequencies
    [d_sae], the examples with their windows and head attributions, logit effects, decoder neighbours (ids [n, m],
    cosines [n, m], {neighbour id: its top tokens}) and each requested latent's top tokens."""

    def __init__(
        self,
        state: _Pass,
        frequency: torch.Tensor,
        examples: dict[str, Any],
        windows: list[dict[str, Any]],
        heads: list[list[float]] | None,
        logits: LogitEffects | None,
        neighbours: tuple[torch.Tensor, torch.Tensor, dict[int, list[str]]],
        pieces: TokenPieces,
        top_tokens: list[list[str]],
    ):
        self.counts, self.sums = state.counts.cpu(), state.sums.cpu()
        self.maxima, self.minima = state.max.cpu(), state.min.cpu()
        self.histogram, self.dense_threshold = state.histogram, state.sparsity.dense_threshold
        self.frequency, self.examples, self.windows, self.heads = frequency, examples, windows, heads
        self.logits, self.pieces = logits, pieces
        self.neighbour_ids, self.neighbour_cosines, self.neighbour_tokens = neighbours
        self.top_tokens = top_tokens

    def example(self, e: int) -> dict[str, Any]:
        """Example e's window with its head attributions (None when there are none)."""
        return self.windows[e] | {"heads": self.heads[e] if self.heads else None}

    def record(self, slot: int, latent: int) -> dict[str, Any]:
        """The record of `latent`, the slot-th requested latent."""
        n = int(self.counts[slot])
        top = [self.example(e) for e in self.examples["top"][slot]]
        quantiles = [
            {"low": low, "high": high, "examples": [self.example(e) for e in chosen]}
            for low, high, chosen in self.examples["quantiles"][slot]
        ]
        frequency = self.frequency[latent]
        return {
            "id": latent,
            "density": float(frequency),
            "max_act": float(self.maxima[slot]) if n else 0.0,
            "min_act": float(self.minima[slot]) if n else 0.0,
            "mean_act": float(self.sums[slot]) / n if n else 0.0,
            "dead": n == 0,
            "dense": bool(frequency > self.dense_threshold),
            "top_tokens": self.top_tokens[slot],
            "top": top,
            "quantiles": quantiles,
            "histogram": self.histogram.result(slot),
            "logits": _logit_lists(self.logits, slot, self.pieces) if self.logits is not None else None,
            "neighbours": [
                [i, float(c), self.neighbour_tokens[i]]
                for i, c in zip(self.neighbour_ids[slot].tolist(), self.neighbour_cosines[slot])
            ],
            "heads": _mean_heads([self.heads[e] for e in self.examples["top"][slot]]) if self.heads and n else None,
        }


def _logit_lists(logits: LogitEffects, slot: int, pieces: TokenPieces) -> dict[str, list]:
    return {
        "positive": [
            [pieces(t), v] for t, v in zip(logits.positive_ids[slot].tolist(), logits.positive_values[slot].tolist())
        ],
        "negative": [
            [pieces(t), v] for t, v in zip(logits.negative_ids[slot].tolist(), logits.negative_values[slot].tolist())
        ],
    }


def _mean_heads(per_example: list[list[float]]) -> list[float]:
    return torch.tensor(per_example, dtype=torch.float64).mean(0).tolist()


def _choose_examples(state: _Pass, quantile_examples: int, n_quantiles: int) -> dict[str, Any]:
    """Examples as one flat list: "slot" [E], "token" [E] (global cache row); "top"[slot] = example numbers best
    first; "quantiles"[slot] = [(low, high, example numbers)] lowest bin first."""
    slots, tokens = [], []
    top_lists, quantile_lists = [], []

    def add(slot: int, token: int) -> int:
        slots.append(slot)
        tokens.append(token)
        return len(slots) - 1

    top_tokens = state.top.tokens.cpu().tolist()
    sample_tokens, sample_values = state.sample.tokens.cpu(), state.sample.values.cpu()
    for slot in range(len(top_tokens)):
        top_lists.append([add(slot, t) for t in top_tokens[slot] if t >= 0])
        bins = []
        drawn = sample_tokens[slot] >= 0
        if quantile_examples and drawn.any():
            sample_t, sample_v = sample_tokens[slot][drawn], sample_values[slot][drawn]  # in random-priority order
            by_value = torch.argsort(sample_v, stable=True)
            for group in torch.tensor_split(by_value, min(n_quantiles, len(by_value))):
                chosen = group[torch.argsort(group)[:quantile_examples]]  # earliest in priority order: random
                chosen = chosen[torch.argsort(sample_v[chosen], descending=True, stable=True)]
                low, high = float(sample_v[group].min()), float(sample_v[group].max())
                bins.append((low, high, [add(slot, int(sample_t[c])) for c in chosen]))
        quantile_lists.append(bins)
    return {
        "slot": torch.tensor(slots, dtype=torch.long),
        "token": torch.tensor(tokens, dtype=torch.long),
        "top": top_lists,
        "quantiles": quantile_lists,
    }


def _windows(
    sae: SAE,
    cache: ActivationCache,
    hook: str,
    state: _Pass,
    examples: dict[str, Any],
    total: int,
    before: int,
    after: int,
    pieces: TokenPieces,
    progress: bool,
) -> list[dict[str, Any]]:
    """One Example dict (without "heads") per example: the stored tokens around it in its context and the latent's
    activation at each."""
    focus, slots = examples["token"], examples["slot"]
    if focus.numel() == 0:
        return []
    rows = focus[:, None] + torch.arange(-before, after + 1)  # [E, W]
    inside = (rows >= 0) & (rows < total)
    rows = rows.clamp(0, total - 1)
    needed = torch.unique(rows[inside])
    local = torch.full((total,), -1, dtype=torch.long)
    local[needed] = torch.arange(len(needed))
    token_ids, contexts, positions = [], [], []
    for _, batch in _read_rows(cache, hook, needed, with_acts=False):
        token_ids.append(batch.token_ids)
        contexts.append(batch.context)
        positions.append(batch.position)
    info = {"token_ids": torch.cat(token_ids), "context": torch.cat(contexts), "position": torch.cat(positions)}
    at = local[rows]
    same = inside & (info["context"][at] == info["context"][local[focus]][:, None])
    record = state.record
    if record is None:
        record = _recorded_rows(sae, cache, hook, torch.unique(rows[same]), state.slot_of, progress)
    acts = record.lookup(rows.flatten(), slots[:, None].expand_as(rows).flatten()).view(rows.shape)
    ids, acts_list, same_list = info["token_ids"][at].tolist(), acts.tolist(), same.tolist()
    context_list, position_list = info["context"][local[focus]].tolist(), info["position"][local[focus]].tolist()
    windows = []
    for e in range(len(focus)):
        keep = [j for j, s in enumerate(same_list[e]) if s]
        windows.append(
            {
                "tokens": [pieces(ids[e][j]) for j in keep],
                "acts": [acts_list[e][j] for j in keep],
                "focus": keep.index(before),
                "context": context_list[e],
                "position": position_list[e],
            }
        )
    return windows


def _example_heads(
    sae: SAE, cache: ActivationCache, hook: str, latents: torch.Tensor, examples: dict[str, Any], model: Any
) -> list[list[float]] | None:
    """DFA by head [n_heads] per example for attn.hook_z SAEs; None for other hooks, or without the model that
    says how many heads there are."""
    if not hook.endswith("attn.hook_z") or model is None or examples["token"].numel() == 0:
        return None
    n_heads = model.cfg.n_heads
    order = torch.argsort(examples["token"])
    heads = torch.empty(len(order), n_heads, dtype=torch.float64)
    for start in range(0, len(order), _READ_ROWS):
        part = order[start : start + _READ_ROWS]
        x = cache.read(examples["token"][part], hooks=[hook]).acts[hook]
        latent = latents[examples["slot"][part]].to(sae.W_enc.device)
        heads[part] = head_attribution(sae, x, latent, n_heads).double().cpu()
    return heads.tolist()
