"""Tokens of activation caches for fits and held-out evaluation: which stored tokens to use (`split_tokens`),
batches of their activations (`CachedActivations`), and fresh text after everything a cache holds
(`fresh_contexts`)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from typing import Any

import torch

from saelab.activations.cache import ActivationCache
from saelab.config import DataConfig
from saelab.errors import SaelabError


class CachedActivations:
    """Re-iterable source of one hook's cached activations at storage indices `index` [N], in batches of
    `batch_tokens` [n, d] float32 (read memory-mapped, one batch at a time)."""

    def __init__(self, cache: ActivationCache, hook: str, index: torch.Tensor, batch_tokens: int = 8192):
        self.cache = cache
        self.hook = cache.require(hook)
        self.index = index
        self.batch_tokens = batch_tokens

    @property
    def n_tokens(self) -> int:
        return len(self.index)

    def __iter__(self) -> Iterator[torch.Tensor]:
        for start in range(0, len(self.index), self.batch_tokens):
            batch = self.cache.read(self.index[start : start + self.batch_tokens], hooks=[self.hook])
            yield batch.acts[self.hook].float()


def usable_tokens(
    cache: ActivationCache, skip_positions: int, limit: int, after_context: int = -1, chunk_tokens: int = 1 << 20
) -> torch.Tensor:
    """Storage indices [m <= limit] of the first `limit` tokens (in corpus order) at positions >= skip_positions
    in contexts after `after_context`; the token metadata is scanned `chunk_tokens` at a time."""
    found: list[torch.Tensor] = []
    count = 0
    for start in range(0, cache.n_tokens, chunk_tokens):
        if count >= limit:
            break
        info = cache.read(torch.arange(start, min(start + chunk_tokens, cache.n_tokens)), hooks=[])
        keep = ((info.position >= skip_positions) & (info.context > after_context)).nonzero().squeeze(1) + start
        found.append(keep[: limit - count])
        count += len(found[-1])
    return torch.cat(found) if found else torch.zeros(0, dtype=torch.long)


def split_tokens(
    cache: ActivationCache,
    eval_cache: ActivationCache | None,
    fit_tokens: int,
    eval_tokens: int,
    skip_positions: int,
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(fit indices into `cache`, held-out indices, notes). Without `eval_cache` the held-out tokens come from
    the contexts after the last fit context (never one context on both sides), and the cache must hold both
    sets in full; with it, each set is capped by what its cache holds (said in the notes)."""
    fit = usable_tokens(cache, skip_positions, fit_tokens)
    notes = []
    if eval_cache is None:
        last_context = int(cache.read(fit[-1:], hooks=[]).context[0]) if len(fit) else -1
        held_out = usable_tokens(cache, skip_positions, eval_tokens, after_context=last_context)
        if len(fit) < fit_tokens or len(held_out) < eval_tokens:
            raise SaelabError(
                f"The cache in {cache.path} has too few tokens at positions >= {skip_positions} for {fit_tokens:,} "
                f"fit plus {eval_tokens:,} held-out tokens (it has {len(fit):,} + {len(held_out):,}). Lower "
                "--fit-tokens / --eval-tokens, pass a separate --eval-cache, or build a bigger cache."
            )
        return fit, held_out, notes
    held_out = usable_tokens(eval_cache, skip_positions, eval_tokens)
    for name, got, asked, source in (("fit", fit, fit_tokens, cache), ("held-out", held_out, eval_tokens, eval_cache)):
        if len(got) < asked:
            notes.append(
                f"{source.path} holds only {len(got):,} tokens at positions >= {skip_positions}: "
                f"using {len(got):,} {name} tokens instead of {asked:,}."
            )
    return fit, held_out, notes


def fresh_contexts(manifest: dict[str, Any], tokenizer: Any, n_tokens: int) -> torch.Tensor:
    """[n, context_length] token contexts of a cache's corpus that come after every context the cache holds,
    enough for `n_tokens` tokens (fewer if the corpus ends first)."""
    from saelab.data import token_contexts

    data = DataConfig(**manifest["identity"]["data"])
    used = manifest["shards"][-1]["contexts"][1] if manifest["shards"] else 0
    wanted = math.ceil(n_tokens / data.context_length)
    contexts = list(itertools.islice(token_contexts(data, tokenizer), used, used + wanted))
    if not contexts:
        raise SaelabError(
            f"Corpus '{data.corpus}' has no text beyond the {used:,} contexts in the cache, so there is nothing "
            "held out for the downstream loss. Use --no-downstream, or a cache that leaves part of the corpus unused."
        )
    return torch.stack(contexts)
