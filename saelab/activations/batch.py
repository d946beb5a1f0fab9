"""ActivationBatch: per-token activations at one or more hooks, with where each token came from."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

ACTS_PREFIX = "acts:"
GRADS_PREFIX = "grads:"
META_KEYS = ("token_ids", "context", "position")


@dataclass
class ActivationBatch:
    """`n` tokens. Every tensor's first dimension is the token index.

    acts:      hook -> [n, d_hook] activations (attn.hook_z flattened to n_heads*d_head)
    token_ids: [n] token id at that position
    context:   [n] global index of the context (in corpus order) the token came from
    position:  [n] position of the token within its context (0 is BOS)
    grads:     hook -> [n, d_hook] gradient of the summed next-token cross-entropy w.r.t. acts, or None
    """

    acts: dict[str, torch.Tensor]
    token_ids: torch.Tensor
    context: torch.Tensor
    position: torch.Tensor
    grads: dict[str, torch.Tensor] | None = None

    def __len__(self) -> int:
        return self.token_ids.shape[0]

    def select(self, index: torch.Tensor | slice) -> ActivationBatch:
        """The tokens at `index` (a [m] index tensor, bool mask or slice), in that order."""
        return ActivationBatch.from_tensors({k: v[index] for k, v in self.to_tensors().items()})

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> ActivationBatch:
        """Move to `device`; cast acts and grads (not the integer metadata) to `dtype`."""
        cast = {
            k: v.to(device=device, dtype=dtype if k.startswith((ACTS_PREFIX, GRADS_PREFIX)) else None)
            for k, v in self.to_tensors().items()
        }
        return ActivationBatch.from_tensors(cast)

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """Flat name -> tensor form, as stored in cache shards ('acts:<hook>', 'grads:<hook>', metadata)."""
        tensors = {ACTS_PREFIX + hook: t for hook, t in self.acts.items()}
        for hook, t in (self.grads or {}).items():
            tensors[GRADS_PREFIX + hook] = t
        tensors.update(token_ids=self.token_ids, context=self.context, position=self.position)
        return tensors

    @staticmethod
    def from_tensors(tensors: dict[str, torch.Tensor]) -> ActivationBatch:
        acts = {k.removeprefix(ACTS_PREFIX): v for k, v in tensors.items() if k.startswith(ACTS_PREFIX)}
        grads = {k.removeprefix(GRADS_PREFIX): v for k, v in tensors.items() if k.startswith(GRADS_PREFIX)}
        return ActivationBatch(
            acts=acts,
            token_ids=tensors["token_ids"],
            context=tensors["context"],
            position=tensors["position"],
            grads=grads or None,
        )

    @staticmethod
    def cat(batches: Sequence[ActivationBatch]) -> ActivationBatch:
        """Concatenate along the token dimension."""
        parts = [b.to_tensors() for b in batches]
        return ActivationBatch.from_tensors({k: torch.cat([p[k] for p in parts]) for k in parts[0]})
