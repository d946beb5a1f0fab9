"""Training batches for the trainer: from an on-disk cache (built first if missing) or harvested live.

Both are reproducible from the step number, so a resumed run sees exactly the batches an uninterrupted run
would have seen. From a cache: epoch e is the cache's shuffled order for (seed, e); resuming skips whole
batches without reading them. Live: contexts -> harvest -> shuffle buffer, repeated over the corpus;
resuming replays the harvest (no SAE work) up to the checkpoint, so prefer a cache for long runs.

Data-parallel training reads `part=(rank, ranks)`: from a cache, rank r's batches are the r-th of `ranks` equal
slices of each global batch (together exactly the tokens a single process's batch holds; each rank reads only its
slice); live, rank r harvests every ranks-th context and fills its own buffer with batch_size / ranks tokens.
`sample` is the same full sample on every rank, so initialisation and resampling agree.

The trainer reads either stream through a Prefetcher: a background thread that keeps the next batches ready (on a
GPU already copied to it), so disk reads and live harvesting overlap the SAE steps instead of stalling them.
"""

from __future__ import annotations

import dataclasses
import itertools
import queue
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Self

import torch

from saelab.activations import ActivationBatch, ActivationCache, ActivationSource, ShuffleBuffer, build_cache
from saelab.activations.cache import MANIFEST, read_manifest
from saelab.config import CacheCommand, CacheConfig
from saelab.data import token_contexts
from saelab.errors import SaelabError
from saelab.train.command import TrainCommand

LIVE = "none"


class CacheStream:
    """Batches of `batch_size` tokens from an ActivationCache, epoch after epoch."""

    def __init__(self, cache: ActivationCache, hooks: list[str], batch_size: int, seed: int, grads: bool,
                 part: tuple[int, int] = (0, 1)):
        self.cache, self.hooks, self.batch_size, self.seed, self.grads = cache, hooks, batch_size, seed, grads
        self.part = part
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

    def keep_hooks(self, hooks: list[str]) -> None:
        """Read only these hooks from now on."""
        self.hooks = hooks

    def batches(self, start_step: int = 0) -> Iterator[ActivationBatch]:
        """Endless [batch_size / ranks]-token batches (this rank's part) from step `start_step` on (earlier
        batches are skipped unread)."""
        epoch, offset = divmod(start_step, self.steps_per_epoch)
        rank, ranks = self.part
        while True:
            # The epoch's order cut into slices of batch_size / ranks: global batch s is slices s*ranks ... s*ranks +
            # ranks - 1, the same tokens as the single-process batch s; rank r takes slice s*ranks + r.
            yield from itertools.islice(self.cache.batches(
                self.batch_size // ranks, hooks=self.hooks, grads=self.grads, seed=self.seed, epoch=epoch,
                drop_last=True, rank=rank, world_size=ranks, start=offset * ranks,
            ), self.steps_per_epoch - offset)
            epoch, offset = epoch + 1, 0


class LiveStream:
    """Batches harvested on the fly: contexts -> ActivationSource -> ShuffleBuffer, cycling over the corpus."""

    def __init__(self, cmd: TrainCommand, model, hooks: list[str], grads: bool, part: tuple[int, int] = (0, 1)):
        self.cmd, self.model, self.part = cmd, model, part
        self.source = ActivationSource(model, hooks, with_grads=grads, include_special=cmd.harvest.include_special)
        self.dims = dict(self.source.dims)
        self.description = f"live harvest from {cmd.model.model} over '{cmd.data.corpus}'"
        self.provenance = {"data": dataclasses.asdict(cmd.data), "train_contexts": None}  # cycles over the corpus

    def _contexts(self, first_cycle: int = 0) -> Iterator[torch.Tensor]:
        for cycle in itertools.count(first_cycle):
            data = dataclasses.replace(self.cmd.data, seed=self.cmd.data.seed + cycle)
            yield from token_contexts(data, self.model.tokenizer, self.model.cfg.n_ctx)

    def sample(self, n: int, draw: int = 0) -> ActivationBatch:
        """About n tokens harvested from the corpus order of cycle `draw` (its first contexts)."""
        contexts = itertools.islice(self._contexts(first_cycle=draw), -(-n // self.cmd.data.context_length))
        return ActivationBatch.cat(list(self.source.stream(contexts, self.cmd.harvest.batch_contexts)))

    def keep_hooks(self, hooks: list[str]) -> None:
        """Nothing to save: one forward pass computes every hook."""

    def batches(self, start_step: int = 0) -> Iterator[ActivationBatch]:
        """Endless batches (this rank's part) from step `start_step` on (earlier ones are harvested and dropped)."""
        train = self.cmd.train
        rank, ranks = self.part
        contexts = self._contexts() if ranks == 1 else itertools.islice(self._contexts(), rank, None, ranks)
        harvested = self.source.stream(contexts, self.cmd.harvest.batch_contexts)
        buffer = ShuffleBuffer(harvested, train.buffer_tokens // ranks, train.batch_size // ranks,
                               seed=self.cmd.data.seed, drop_last=True)
        return itertools.islice(iter(buffer), start_step, None)


_END = object()  # the queue item after the last batch


@dataclasses.dataclass
class _Failure:
    error: BaseException


class Prefetcher:
    """Iterate over `batches` while a background thread keeps up to `depth` of the next ones ready on `device`.

    Batches arrive exactly as, and in the order, the underlying iterator yields them. On a CUDA device the worker
    pins every hook's acts (and grads) [n, d_hook] and copies them with non_blocking=True on its own CUDA stream;
    the consumer's current stream waits for that copy before the batch is handed over (token_ids, context and
    position stay on the CPU). On any other device the batches pass through untouched. An exception raised while
    pulling a batch is raised again, with its original traceback, by the consumer's next(). Use it as a context
    manager (or call close()) so the worker stops when the consumer leaves early.

    wait_seconds: total time the consumer has spent blocked waiting for the next batch.
    """

    def __init__(self, batches: Iterable[ActivationBatch], device: str | torch.device, depth: int = 2):
        if depth < 1:
            raise SaelabError(f"The prefetch depth must be at least 1 batch (got {depth}).")
        self.device = torch.device(device)
        self.wait_seconds = 0.0
        self._copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._terminal: object | None = None  # _END or a _Failure once the consumer has met it (or closed)
        self._thread = threading.Thread(target=self._work, args=(iter(batches),), name="saelab-prefetch", daemon=True)
        self._thread.start()

    def __iter__(self) -> Prefetcher:
        return self

    def __next__(self) -> ActivationBatch:
        if self._terminal is None:
            start = time.perf_counter()
            item = self._queue.get()
            self.wait_seconds += time.perf_counter() - start
            if isinstance(item, tuple):
                return self._ready(*item)
            self._terminal = item
        if isinstance(self._terminal, _Failure):
            raise self._terminal.error
        raise StopIteration

    def close(self) -> None:
        """Stop the worker and wait for it (it first finishes a pull in progress); iteration ends here."""
        self._stop.set()
        self._thread.join()
        self._terminal = self._terminal or _END
        while not self._queue.empty():  # release the batches (and their device memory) nobody will take
            self._queue.get_nowait()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _work(self, batches: Iterator[ActivationBatch]) -> None:
        try:
            for batch in batches:
                if not self._offer(self._to_device(batch)):
                    return
            self._offer(_END)
        except BaseException as exc:  # noqa: BLE001 (anything, so the consumer never waits forever)
            self._offer(_Failure(exc))
        finally:
            if hasattr(batches, "close"):  # a generator: run its cleanup here, in the thread that drove it
                batches.close()

    def _offer(self, item: object) -> bool:
        """Put `item` on the queue, waiting while it is full; False (item dropped) once close() was called."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def _ready(self, batch: ActivationBatch, copied: torch.cuda.Event | None) -> ActivationBatch:
        """The batch, safe to use on the consumer's current stream once its copy (if any) is done."""
        if copied is not None:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(copied)
            for t in (*batch.acts.values(), *(batch.grads or {}).values()):
                t.record_stream(stream)  # allocated on the copy stream: not reused before the consumer is done
        return batch

    def _to_device(self, batch: ActivationBatch) -> tuple[ActivationBatch, torch.cuda.Event | None]:
        """(batch, None) off CUDA; else (batch with acts and grads copied to the device, the copy's event)."""
        if self._copy_stream is None:
            return batch, None

        def copy(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return {hook: t.pin_memory().to(self.device, non_blocking=True) for hook, t in tensors.items()}

        with torch.cuda.stream(self._copy_stream):
            moved = dataclasses.replace(batch, acts=copy(batch.acts),
                                        grads=None if batch.grads is None else copy(batch.grads))
            copied = torch.cuda.Event()
            copied.record(self._copy_stream)
        return moved, copied


def open_stream(cmd: TrainCommand, hooks: list[str], grads: bool, model=None, progress: bool = True,
                part: tuple[int, int] = (0, 1), processes: int = 1):
    """The configured batch stream (this rank's `part` of it); builds (or finishes building) the cache first when
    it is incomplete, unless the job runs `processes` > 1 (build it with `saelab cache` first)."""
    train = cmd.train
    if train.cache == LIVE:
        if model is None:
            from saelab.models import load_model

            model = load_model(cmd.model.model, device=cmd.model.device, dtype=cmd.model.model_dtype)
        return LiveStream(cmd, model, hooks, grads, part)
    folder = Path(train.cache)
    if not (folder / MANIFEST).is_file() or not read_manifest(folder)["complete"]:
        if processes > 1:
            raise SaelabError(
                f"No finished activation cache in {folder}. A multi-process run does not build one (every rank "
                "would write the same folder): build it first with `saelab cache --out ...` (one process, with the "
                "same --model/--corpus/--hooks), or train from --cache none."
            )
        build = CacheCommand(
            model=cmd.model,
            data=cmd.data,
            harvest=dataclasses.replace(cmd.harvest, hooks=hooks, with_grads=grads or cmd.harvest.with_grads),
            cache=CacheConfig(out=str(folder), n_tokens=train.cache_tokens),
        )
        build_cache(build, model=model, progress=progress)
    return CacheStream(ActivationCache(folder, progress=progress), hooks, train.batch_size, cmd.data.seed, grads, part)
