"""ShuffleBuffer: mix tokens from many contexts before they reach a trainer.

Activations arrive context by context; training on them in that order would put one document's tokens
in one batch. The buffer holds `capacity` tokens, draws random batches from it, and refills when half
of it has been drawn (as SAELens' mixing buffer does), so a batch mixes tokens from ~capacity/context
contexts.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from saelab.activations.batch import ActivationBatch
from saelab.errors import SaelabError


class ShuffleBuffer:
    """Iterate over batches of `batch_size` tokens drawn at random from a pool of `capacity` tokens.

    Every incoming token is emitted exactly once; the final batch may be short unless drop_last.
    """

    def __init__(
        self,
        source: Iterable[ActivationBatch],
        capacity: int,
        batch_size: int,
        seed: int = 0,
        drop_last: bool = False,
    ):
        if capacity < 2 * batch_size:
            raise SaelabError(
                f"Shuffle buffer capacity ({capacity} tokens) must be at least twice the batch size ({batch_size})."
            )
        self.source = source
        self.capacity = capacity
        self.batch_size = batch_size
        self.seed = seed
        self.drop_last = drop_last

    def __iter__(self) -> Iterator[ActivationBatch]:
        generator = torch.Generator().manual_seed(self.seed)
        pool: list[ActivationBatch] = []
        pooled = 0
        for incoming in self.source:
            pool.append(incoming)
            pooled += len(incoming)
            if pooled < self.capacity:
                continue
            mixed = ActivationBatch.cat(pool)
            mixed = mixed.select(torch.randperm(len(mixed), generator=generator))
            n_out = (len(mixed) - self.capacity // 2) // self.batch_size * self.batch_size
            for start in range(0, n_out, self.batch_size):
                yield mixed.select(slice(start, start + self.batch_size))
            pool, pooled = [mixed.select(slice(n_out, None))], len(mixed) - n_out
        if pooled:
            rest = ActivationBatch.cat(pool)
            rest = rest.select(torch.randperm(len(rest), generator=generator))
            for start in range(0, len(rest), self.batch_size):
                part = rest.select(slice(start, start + self.batch_size))
                if len(part) == self.batch_size or not self.drop_last:
                    yield part
