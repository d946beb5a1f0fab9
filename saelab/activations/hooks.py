"""Hook names: validate against a model, find the layer to stop at, and shape outputs per token."""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from saelab.errors import SaelabError

_BLOCK = re.compile(r"^blocks\.(\d+)\.")
COMMON_HOOKS = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_mlp_out", "hook_attn_out", "attn.hook_z")


@dataclass(frozen=True)
class HookSpec:
    name: str
    layer: int | None  # the block the hook lives in; None for hooks outside the block stack (e.g. ln_final)


def resolve_hooks(model, names: Sequence[str]) -> list[HookSpec]:
    """Check every name exists on `model`, suggesting close names when one does not."""
    if not names:
        raise SaelabError("No hook given. Pass at least one, e.g. --hooks blocks.6.hook_resid_post.")
    duplicates = sorted({n for n in names if list(names).count(n) > 1})
    if duplicates:
        raise SaelabError(f"Hook(s) {duplicates} given more than once; list each hook once.")
    available = list(model.hook_dict)
    specs = []
    for name in names:
        if name not in model.hook_dict:
            close = difflib.get_close_matches(name, available, n=4, cutoff=0.6)
            hint = f" Did you mean: {', '.join(close)}?" if close else ""
            n_layers = getattr(model.cfg, "n_layers", "?")
            raise SaelabError(
                f"Unknown hook '{name}' for this model ({n_layers} layers).{hint} "
                f"Common hooks: blocks.L.{{{', '.join(COMMON_HOOKS)}}}; `saelab hooks --model M` lists all."
            )
        match = _BLOCK.match(name)
        specs.append(HookSpec(name=name, layer=int(match.group(1)) if match else None))
    return specs


def stop_at_layer(specs: Sequence[HookSpec]) -> int | None:
    """The `stop_at_layer` that still runs every hooked block; None (run everything) if a hook is outside blocks."""
    if any(s.layer is None for s in specs):
        return None
    return max(s.layer for s in specs) + 1


def per_token(name: str, act: torch.Tensor, batch: int, positions: int) -> torch.Tensor:
    """[batch, pos, ...] -> [batch, pos, d] (hook_z's [batch, pos, n_heads, d_head] -> n_heads*d_head)."""
    if act.dim() < 3 or tuple(act.shape[:2]) != (batch, positions):
        raise SaelabError(
            f"Hook '{name}' gives shape {tuple(act.shape)}, not [batch, position, ...]: it is not a per-token "
            "activation (e.g. attention patterns). Pick a residual, MLP or attention output hook."
        )
    return act.reshape(batch, positions, -1)
