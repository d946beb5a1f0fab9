"""Which latents a dashboard builds pages for (`saelab dashboard --select`).

    ids = select_latents(sae, cache, "densest", n=1000)        # then collect_dashboard_data(..., features=ids)

Modes (n: how many; 0 means all that qualify):
- first: ids 0..n-1 (the default; all latents when n is 0);
- random: n ids drawn uniformly without replacement by a seeded generator (the same seed, the same ids);
- ids: the ids given, each once;
- densest: the n latents that fire on the most of the scanned tokens (ties: the lower id). The counts come from a
  pre-pass over the same tokens the dashboard then scans (one more encode of them), as only a full count ranks them;
- token: the latents that list the token among their top tokens (the up to 10 most common tokens of their top_k
  top activations, as the index shows and searches them), most activations on it first (ties: the lower id). The top
  activations come from a pre-pass with the same streaming top-k (same keys, same tie rule) as the dashboard pass,
  so every chosen latent's page lists the token.

The result is ascending (the site orders pages by id), or None for all latents.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from saelab.activations.cache import ActivationCache
from saelab.dashboard.collect import (
    StreamingTopK,
    TokenPieces,
    add_top_entries,
    scan_cache,
    top_token_counts,
    top_tokens,
)
from saelab.errors import SaelabError
from saelab.sae.base import SAE
from saelab.sae.io import recorded_hook

MODES = ("first", "random", "densest", "ids", "token")


def select_latents(
    sae: SAE,
    cache: ActivationCache,
    select: str = "first",
    *,
    n: int = 0,
    ids: Sequence[int] = (),
    token: str = "",
    tokenizer: Any = None,
    seed: int = 0,
    n_tokens: int | None = None,
    top_k: int = 20,
    batch_tokens: int = 8192,
    progress: bool = True,
) -> list[int] | None:
    """The latent ids `select` picks (see the module docstring), ascending; None: every latent.

    n_tokens, top_k and batch_tokens are the dashboard pass's (the pre-passes of densest and token scan the same
    tokens); tokenizer turns `token` into its id (mode token only)."""
    d_sae = sae.d_sae
    if select not in MODES:
        raise SaelabError(f"--select is one of {', '.join(MODES)}; got {select!r}.")
    if n < 0:
        raise SaelabError(f"--n-features must not be negative (got {n}).")
    if select == "ids":
        outside = sorted({int(i) for i in ids if not 0 <= int(i) < d_sae})
        if outside:
            raise SaelabError(f"Latent ids {outside} are outside this SAE's range 0..{d_sae - 1}; fix --features.")
        if not ids:
            raise SaelabError("--select ids needs the latent ids: add them with --features, e.g. --features 5789 12.")
        return sorted({int(i) for i in ids})
    if select == "token":
        return _by_token(sae, cache, token, tokenizer, n, n_tokens, top_k, batch_tokens, progress)
    if n == 0:
        return None
    n = min(n, d_sae)
    if select == "first" or n == d_sae:
        return list(range(n))
    if select == "random":
        generator = torch.Generator().manual_seed(seed)
        return sorted(torch.randperm(d_sae, generator=generator)[:n].tolist())
    counts = firing_counts(sae, cache, n_tokens, batch_tokens, progress)
    order = torch.argsort(-counts, stable=True)  # stable: equal counts stay in id order
    return sorted(order[:n].tolist())


def _tokens_to_scan(cache: ActivationCache, n_tokens: int | None) -> int:
    """The dashboard pass's rule: the first n_tokens stored tokens, at most (and by default) the whole cache."""
    return cache.n_tokens if n_tokens is None else min(int(n_tokens), cache.n_tokens)


def firing_counts(
    sae: SAE, cache: ActivationCache, n_tokens: int | None = None, batch_tokens: int = 8192, progress: bool = True
) -> torch.Tensor:
    """On how many of the first n_tokens cached tokens each latent fires: int64 [d_sae] (a pre-pass)."""
    hook = recorded_hook(sae, "The SAE")
    counts = torch.zeros(sae.d_sae, dtype=torch.long)

    def update(first: int, code) -> None:
        counts.add_(code.firing_counts().cpu())

    total = _tokens_to_scan(cache, n_tokens)
    scan_cache(sae, cache, hook, update, total, batch_tokens, progress, desc="pre-pass (--select densest)")
    return counts


def _check_one_token(tokenizer: Any, token: str) -> None:
    """A one-sentence error unless `token` encodes to exactly one token."""
    if tokenizer is None:
        raise SaelabError("--select token needs the model's tokenizer to find the token; pass --model NAME.")
    encoded = tokenizer.encode(token, add_special_tokens=False)
    if len(encoded) != 1:
        pieces = [tokenizer.decode([i]) for i in encoded]
        raise SaelabError(
            f"--token {token!r} is {len(encoded)} tokens for this model's tokenizer ({pieces}); give exactly one, "
            "spelt as the dashboard's top tokens show it, e.g. ' LORD'."
        )


def _by_token(
    sae: SAE,
    cache: ActivationCache,
    token: str,
    tokenizer: Any,
    n: int,
    n_tokens: int | None,
    top_k: int,
    batch_tokens: int,
    progress: bool,
) -> list[int]:
    """Mode token: a pre-pass keeps every latent's top_k activations; the latents whose top tokens (as their pages
    list them) hold the token are ranked by how many of those activations are on it."""
    if not token:
        raise SaelabError("--select token needs the token: add it with --token, e.g. --token ' LORD'.")
    _check_one_token(tokenizer, token)
    hook = recorded_hook(sae, "The SAE")
    top = StreamingTopK(sae.d_sae, top_k, sae.W_enc.device, sae.W_enc.dtype)

    every_latent = torch.arange(sae.d_sae, device=sae.W_enc.device)

    def update(first: int, code) -> None:
        add_top_entries(top, every_latent, code, first, sae.signed)

    total = _tokens_to_scan(cache, n_tokens)
    scan_cache(sae, cache, hook, update, total, batch_tokens, progress, desc="pre-pass (--select token)")
    counts = top_token_counts(cache, top.tokens.cpu(), TokenPieces(tokenizer))
    hits = torch.tensor([c[token] if token in top_tokens(c) else 0 for c in counts])  # [d_sae]
    order = torch.argsort(-hits, stable=True)
    chosen = order[: int((hits > 0).sum())]
    if chosen.numel() == 0:
        raise SaelabError(
            f"No latent lists {token!r} among the top tokens of its top {top_k} activations in the {total:,} scanned "
            "tokens; the token may be rare there (scan more with --n-tokens) or try another token."
        )
    return sorted((chosen[:n] if n else chosen).tolist())
