"""Run a model with one hook's activations replaced, and the per-token losses that downstream metrics need.

A replacement is a function of the clean activation, flattened per token: [batch, pos, d] -> [batch, pos, d]
(hook_z's [batch, pos, n_heads, d_head] is flattened to n_heads * d_head and reshaped back). Positions holding
special tokens (BOS, separators; `keep` False) always keep their clean activation, as SAEs are not trained on them.
The forward pass runs to the logits; everything here is inference (no grad).

    clean = run_logits(model, tokens, hook, capture=True)           # (logits, act) of the unmodified model
    spliced = run_logits(model, tokens, hook, replace=lambda a: sae(a), keep=keep)
    ce = next_token_losses(spliced, tokens)                          # [batch, pos - 1]
    kl = kl_divergence(clean_logits.log_softmax(-1), spliced)        # [batch, pos]
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from saelab.activations.hooks import per_token, resolve_hooks
from saelab.data import special_token_ids
from saelab.errors import SaelabError

Replacement = Callable[[torch.Tensor], torch.Tensor]


def splice_keep_mask(model, tokens: torch.Tensor) -> torch.Tensor:
    """tokens [batch, pos] -> bool [batch, pos]: True where the activation may be replaced (not a special token)."""
    special = torch.tensor(special_token_ids(model.tokenizer), dtype=torch.long, device=tokens.device)
    return ~torch.isin(tokens, special)


def run_logits(
    model,
    tokens: torch.Tensor,
    hook: str,
    replace: Replacement | None = None,
    keep: torch.Tensor | None = None,
    capture: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """tokens [batch, pos] -> logits [batch, pos, vocab] (float32), with `hook` replaced where `keep` [batch, pos].

    capture=True also returns the hook's clean activation [batch, pos, d] (before any replacement).
    """
    resolve_hooks(model, [hook])
    batch, positions = tokens.shape
    captured: dict[str, torch.Tensor] = {}

    name = hook

    def fn(act: torch.Tensor, hook) -> torch.Tensor:  # TransformerLens passes the HookPoint as `hook=`
        flat = per_token(name, act, batch, positions)
        if capture:
            captured["act"] = flat.detach().clone()
        if replace is None:
            return act
        new = replace(flat)
        if new.shape != flat.shape:
            raise SaelabError(
                f"A replacement for hook activations of shape {tuple(flat.shape)} returned {tuple(new.shape)}; "
                "it must keep [batch, pos, d]."
            )
        if keep is not None:
            new = torch.where(keep.to(flat.device)[..., None], new.to(flat.dtype), flat)
        return new.to(act.dtype).reshape(act.shape)

    with torch.no_grad():
        logits = model.run_with_hooks(tokens.to(model.cfg.device), fwd_hooks=[(name, fn)], return_type="logits")
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3 or tuple(logits.shape[:2]) != (batch, positions):
        raise SaelabError("Downstream metrics need a causal language model that returns [batch, pos, vocab] logits.")
    logits = logits.float()
    return (logits, captured["act"]) if capture else logits


def next_token_losses(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """logits [batch, pos, vocab], tokens [batch, pos] -> cross-entropy of predicting token t+1 at t [batch, pos-1]."""
    targets = tokens[:, 1:].to(logits.device)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten(), reduction="none").view_as(targets)


def kl_divergence(clean_log_probs: torch.Tensor, other_logits: torch.Tensor) -> torch.Tensor:
    """KL(p_clean || p_other) per position: clean_logits.log_softmax(-1) (computed once, shared by every other run)
    and other logits, both [batch, pos, vocab] -> [batch, pos] (nats)."""
    other = other_logits.log_softmax(-1)
    return (clean_log_probs.exp() * (clean_log_probs - other)).sum(-1)
