"""Where a sparse code's nonzeros are: the CSR layout the sparse kernels read, and its transpose.

A code over a batch of B tokens and n latents with nnz stored entries is

    indices  [nnz] int64   latent of each entry, token 0's entries first, then token 1's, ...
    offsets  [B + 1] int64 token t owns entries offsets[t]:offsets[t + 1]  (offsets[0] = 0, offsets[B] = nnz)

Fixed-k codes (TopK, AbsTopK, g-SAE) are the special case offsets = [0, k, 2k, ...]; variable-count codes
(BatchTopK, JumpReLU, choice SAEs, top-AFA) use general offsets, and empty rows are allowed. The transpose
(entries grouped by latent) is what the weight gradients need: it is built once per layout, lazily, and
shared by the encoder and decoder backward passes.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property
from typing import NamedTuple

import torch

from saelab.errors import SaelabError


def _offsets(groups: torch.Tensor, n_groups: int) -> torch.Tensor:
    """[n_groups + 1] CSR offsets of entries labelled by `groups` [nnz] (int64 in [0, n_groups))."""
    offsets = torch.zeros(n_groups + 1, dtype=torch.long, device=groups.device)
    torch.cumsum(torch.bincount(groups, minlength=n_groups), 0, out=offsets[1:])
    return offsets


class SparseLayout:
    """Positions of a sparse [batch, n_latents] code (see the module docstring for the format)."""

    def __init__(self, indices: torch.Tensor, offsets: torch.Tensor, n_latents: int, rows: torch.Tensor | None = None):
        """indices [nnz], offsets [batch + 1]; rows [nnz] (each entry's token) if the caller already has them."""
        if indices.ndim != 1 or offsets.ndim != 1 or offsets.numel() < 1:
            raise SaelabError(f"A sparse layout needs 1-D indices and offsets (got {indices.shape}, {offsets.shape}).")
        self.indices = indices.long()
        self.offsets = offsets.long()
        self.n_latents = n_latents
        self.batch = offsets.numel() - 1
        if rows is not None:
            self.rows = rows.long()

    @classmethod
    def fixed_k(cls, indices: torch.Tensor, n_latents: int) -> SparseLayout:
        """From [batch, k] latent indices (k entries per token)."""
        batch, k = indices.shape
        offsets = torch.arange(0, batch * k + 1, k, device=indices.device) if k else indices.new_zeros(batch + 1)
        return cls(indices.reshape(-1), offsets, n_latents)

    @classmethod
    def from_rows(cls, rows: torch.Tensor, indices: torch.Tensor, batch: int, n_latents: int) -> SparseLayout:
        """From each entry's token rows [nnz] (ascending) and latent indices [nnz]."""
        return cls(indices, _offsets(rows, batch), n_latents, rows)

    @classmethod
    def from_flat(cls, flat_indices: torch.Tensor, batch: int, n_latents: int) -> SparseLayout:
        """From ascending indices into the flattened [batch * n_latents] matrix."""
        rows = torch.div(flat_indices, n_latents, rounding_mode="floor")
        return cls.from_rows(rows, flat_indices - rows * n_latents, batch, n_latents)

    @classmethod
    def from_mask(cls, mask: torch.Tensor) -> SparseLayout:
        """From a [batch, n_latents] bool mask of the entries to keep (row-major order)."""
        rows, indices = mask.nonzero(as_tuple=True)
        return cls.from_rows(rows, indices, *mask.shape)

    @property
    def nnz(self) -> int:
        return self.indices.numel()

    @cached_property
    def rows(self) -> torch.Tensor:
        """[nnz] int64: the token of each entry."""
        counts = self.offsets.diff()
        return torch.repeat_interleave(
            torch.arange(self.batch, device=self.indices.device), counts, output_size=self.nnz
        )

    @cached_property
    def transpose(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Entries grouped by latent: (order [nnz], rows [nnz], latent_offsets [n_latents + 1]).

        Entry order[j] is the j-th in latent-major order; its token is rows[j]; latent i owns
        positions latent_offsets[i]:latent_offsets[i + 1]. The sort is stable, so tokens ascend within a latent.
        """
        order = self.indices.argsort(stable=True)
        return order, self.rows[order], _offsets(self.indices, self.n_latents)

    def to_dense(self, values: torch.Tensor) -> torch.Tensor:
        """values [nnz] -> the dense [batch, n_latents] code (repeated indices in a row add up)."""
        dense = values.new_zeros(self.batch, self.n_latents)
        return dense.index_put_((self.rows, self.indices), values, accumulate=True)


class SparseCode(NamedTuple):
    """A sparse code: the layout and one value per entry (values [nnz]; entries may hold 0, e.g. ReLU of z < 0)."""

    layout: SparseLayout
    values: torch.Tensor

    @classmethod
    def from_dense(cls, code: torch.Tensor) -> SparseCode:
        """From a dense [batch, n_latents] code, keeping its nonzero entries."""
        layout = SparseLayout.from_mask(code != 0)
        return cls(layout, code[layout.rows, layout.indices])

    @classmethod
    def cat(cls, codes: Sequence[SparseCode]) -> SparseCode:
        """Codes of consecutive token blocks (same n_latents) -> one code over all their tokens, in order."""
        offsets, start = [codes[0].layout.offsets[:1]], 0
        for code in codes:
            offsets.append(code.layout.offsets[1:] + start)
            start += code.layout.nnz
        indices = torch.cat([code.layout.indices for code in codes])
        layout = SparseLayout(indices, torch.cat(offsets), codes[0].layout.n_latents)
        return cls(layout, torch.cat([code.values for code in codes]))

    def dense(self) -> torch.Tensor:
        """[batch, n_latents]."""
        return self.layout.to_dense(self.values)

    def active(self) -> torch.Tensor:
        """[nnz] bool: entries with a nonzero value (AbsTopK's negative codes count)."""
        return self.values != 0

    def fired(self) -> torch.Tensor:
        """[n_latents] bool: latents nonzero for at least one token."""
        fired = torch.zeros(self.layout.n_latents, dtype=torch.bool, device=self.values.device)
        return fired.index_fill_(0, self.layout.indices[self.active()], True)

    def firing_counts(self) -> torch.Tensor:
        """[n_latents] int64: tokens on which each latent is nonzero."""
        return torch.bincount(self.layout.indices[self.active()], minlength=self.layout.n_latents)

    def l0(self) -> float:
        """Mean number of nonzero latents per token."""
        return float(self.active().sum()) / max(self.layout.batch, 1)
