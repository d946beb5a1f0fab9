"""Training batches for the trainer: from an on-disk cache (built first if missing) or harvested live.

Both are reproducible from the step number, so a resumed run sees exactly the batches an uninterrupted run
would have seen. From a cache: epoch e is the cache's shuffled order for (seed, e); resuming skips whole
batches without reading them. Live: contexts -> harvest -> shuffle buffer, repeated over the corpus;
resuming replays the harvest (no SAE work) up to the checkpoint, so prefer a cache for long runs.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator
from pathlib import Path

import torch

from saelab.activations import ActivationBatch, ActivationCache, ActivationSource, ShuffleBuffer, build_cache
from saelab.activations.cache import MANIFEST, read_manifest
from saelab.config import CacheCommand, CacheConfig, TrainCommand
from saelab.data import token_contexts
from saelab.errors import SaelabError

LIVE = "none"


class CacheStream:
    """Batches of `batch_size` tokens from an ActivationCache, epoch after epoch."""

    def __init__(self, cache: ActivationCache, hooks: list[str], batch_size: int, seed: int, grads: bool):
        self.cache, self.hooks, self.batch_size, self.seed, self.grads = cache, hooks, batch_size, seed, grads
        for hook in hooks:
            cache.require(hook)
        if grads and not cache.has_grads:
            raise SaelabError(
                f"A g-SAE needs gradients, but the cache in {cache.path} has none. Build one with --with-grads."
            )
        self.steps_per_epoch = cache.n_tokens // batch_size
        if self.steps_per_epoch == 0:
            raise SaelabError(
                f"The cache in {cache.path} holds {cache.n_tokens} tokens, fewer than one batch ({batch_size})."
            )
        self.dims = {hook: cache.d(hook) for hook in hooks}
        self.description = f"cache {cache.path} ({cache.n_tokens:,} tokens)"
        # What the SAE was trained on, so evaluation can default to contexts after these (held-out text).
        self.provenance = {
            "data": cache.manifest["identity"]["data"],
            "train_contexts": cache.manifest["shards"][-1]["contexts"][1],
        }

    def sample(self, n: int, draw: int = 0) -> ActivationBatch:
        """n tokens drawn uniformly from the whole cache (seeded by --seed and `draw`), e.g. for initialisation."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + draw)
        index = torch.randperm(self.cache.n_tokens, generator=generator)[: min(n, self.cache.n_tokens)]
        return self.cache.read(index.sort().values, hooks=self.hooks, grads=self.grads)

    def batches(self, start_step: int = 0) -> Iterator[ActivationBatch]:
        """Endless [batch_size]-token batches from step `start_step` on (earlier batches are skipped unread)."""
        epoch, offset = divmod(start_step, self.steps_per_epoch)
        while True:
            yield from self.cache.batches(
                self.batch_size, hooks=self.hooks, grads=self.grads, seed=self.seed, epoch=epoch,
                drop_last=True, start=offset,
            )
            epoch, offset = epoch + 1, 0


class LiveStream:
    """Batches harvested on the fly: contexts -> ActivationSource -> ShuffleBuffer, cycling over the corpus."""

    def __init__(self, cmd: TrainCommand, model, hooks: list[str], grads: bool):
        self.cmd, self.model = cmd, model
        self.source = ActivationSource(model, hooks, with_grads=grads, include_special=cmd.harvest.include_special)
        self.dims = dict(self.source.dims)
        self.description = f"live harvest from {cmd.model.model} over '{cmd.data.corpus}'"
        self.provenance = {"data": dataclasses.asdict(cmd.data), "train_contexts": None}  # cycles over the corpus

    def _contexts(self, first_cycle: int = 0) -> Iterator[torch.Tensor]:
        for cycle in itertools.count(first_cycle):
            data = dataclasses.replace(self.cmd.data, seed=self.cmd.data.seed + cycle)
            yield from token_contexts(data, self.model.tokenizer)

    def sample(self, n: int, draw: int = 0) -> ActivationBatch:
        """About n tokens harvested from the corpus order of cycle `draw` (its first contexts)."""
        contexts = itertools.islice(self._contexts(first_cycle=draw), -(-n // self.cmd.data.context_length))
        return ActivationBatch.cat(list(self.source.stream(contexts, self.cmd.harvest.batch_contexts)))

    def batches(self, start_step: int = 0) -> Iterator[ActivationBatch]:
        """Endless batches from step `start_step` on (earlier ones are harvested and dropped)."""
        train = self.cmd.train
        harvested = self.source.stream(self._contexts(), self.cmd.harvest.batch_contexts)
        buffer = ShuffleBuffer(harvested, train.buffer_tokens, train.batch_size, seed=self.cmd.data.seed, drop_last=True)
        return itertools.islice(iter(buffer), start_step, None)


def open_stream(cmd: TrainCommand, hooks: list[str], grads: bool, model=None, progress: bool = True):
    """The configured batch stream; builds (or finishes building) the cache first when it is incomplete."""
    train = cmd.train
    if train.cache == LIVE:
        if model is None:
            from saelab.models import load_model

            model = load_model(cmd.model.model, device=cmd.model.device, dtype=cmd.model.model_dtype)
        return LiveStream(cmd, model, hooks, grads)
    folder = Path(train.cache)
    if not (folder / MANIFEST).is_file() or not read_manifest(folder)["complete"]:
        build = CacheCommand(
            model=cmd.model,
            data=cmd.data,
            harvest=dataclasses.replace(cmd.harvest, hooks=hooks, with_grads=grads or cmd.harvest.with_grads),
            cache=CacheConfig(out=str(folder), n_tokens=train.cache_tokens),
        )
        build_cache(build, model=model, progress=progress)
    return CacheStream(ActivationCache(folder, progress=progress), hooks, train.batch_size, cmd.data.seed, grads)
