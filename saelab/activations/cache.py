"""On-disk activation cache: sharded safetensors plus a manifest, built resumably, read memory-mapped.

Layout of a cache folder:
    manifest.json            what was built (model, hooks, dims, dtype, corpus...) and one entry per
                             finished shard (file, token count, context range, byte size, xxh3-128 checksum)
    shard_00000.safetensors  tensors 'acts:<hook>' [n, d] (storage dtype), optional 'grads:<hook>',
                             'token_info' [n, 3] int32: token id, context index, position (packed so a
                             shuffled read fetches one cache line of metadata per token, not three)

The manifest is the source of truth: a shard counts only once the manifest lists it, and both are
written to a temporary name, fsynced and renamed, so a killed build never leaves a half-written shard
that looks complete. Shard i always holds contexts [i*c, (i+1)*c) of the deterministic corpus order,
so a resumed build skips finished shards and produces the same bytes as an uninterrupted one.
"""

from __future__ import annotations

import errno
import itertools
import json
import math
import os
import shutil
import struct
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xxhash
from safetensors.torch import save as safetensors_bytes
from tqdm.auto import tqdm

from saelab import __version__
from saelab.activations.batch import ACTS_PREFIX, GRADS_PREFIX, META_KEYS, ActivationBatch
from saelab.activations.source import ActivationSource
from saelab.config import CacheCommand, to_dict
from saelab.data import token_contexts
from saelab.dtypes import parse_dtype
from saelab.errors import SaelabError
from saelab.locking import FolderLock

FORMAT = "saelab-activation-cache"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TOKEN_INFO = "token_info"
# Options that change the stored bytes; a resumed build must match them exactly.
IDENTITY = {
    "model": ("model", "model_dtype"),
    "data": ("corpus", "context_length", "seed", "text_column", "split"),
    "harvest": ("hooks", "with_grads", "include_special"),
    "cache": ("n_tokens", "storage_dtype", "shard_tokens"),
}
_NUMPY_STORAGE = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "I32": np.int32, "I64": np.int64}
_TORCH_VIEW = {"BF16": torch.bfloat16}


def checksum(data: bytes | memoryview) -> str:
    """'xxh3_128:<hex>' of in-memory bytes (the manifest's per-shard checksum)."""
    return "xxh3_128:" + xxhash.xxh3_128(data).hexdigest()


def file_checksum(path: Path, chunk: int = 1 << 24) -> str:
    """The same checksum, streamed from a file in `chunk`-byte blocks."""
    hasher = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            hasher.update(block)
    return "xxh3_128:" + hasher.hexdigest()


CACHE_SPACE_HINT = " (--storage-dtype bfloat16 halves a cache)"


def write_atomic(path: Path, data: bytes, resume: str = "rerun the same command to resume", hint: str = "") -> None:
    """Write `data` to `path` via a fsynced temporary file and a rename. Disk-full becomes a SaelabError saying
    how to go on (`resume`, plus an optional `hint` on saving space)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise SaelabError(
                f"Disk full while writing {path}; what was finished before is kept. Free some space{hint}, then "
                f"{resume}."
            ) from exc
        raise


REPAIR_ADVICE = (
    "Repair the cache by rerunning the `saelab cache` command that built it with --overwrite added: only the bad "
    "shards are harvested again (a corrupt manifest.json means a full rebuild)"
)


def shard_problem(folder: Path, shard: dict[str, Any], verify: bool = True) -> str:
    """What is wrong with one manifest shard entry's file in `folder` ('' if nothing): missing, the wrong size,
    or (verify) a checksum that does not match."""
    file = folder / shard["file"]
    if not file.is_file():
        return "is missing"
    size = file.stat().st_size
    if size != shard["bytes"]:
        return f"has {size} bytes where the manifest says {shard['bytes']} ({'truncated' if size < shard['bytes'] else 'too long'})"
    if verify and file_checksum(file) != shard["checksum"]:
        return "is corrupt (its checksum does not match the manifest)"
    return ""


def _identity(config: CacheCommand) -> dict[str, Any]:
    full = to_dict(config)
    return {section: {key: full[section][key] for key in keys} for section, keys in IDENTITY.items()}


def _describe_mismatch(old: dict[str, Any], new: dict[str, Any]) -> str:
    diffs = []
    for section, keys in IDENTITY.items():
        for key in keys:
            before, after = old.get(section, {}).get(key), new[section][key]
            if before != after:
                diffs.append(f"{key}: cache has {before!r}, asked for {after!r}")
    return "; ".join(diffs)


def _check_finite(batch: ActivationBatch, shard_index: int) -> None:
    for name, t in batch.to_tensors().items():
        if name.startswith((ACTS_PREFIX, GRADS_PREFIX)) and not torch.isfinite(t).all():
            bad = int((~torch.isfinite(t)).any(dim=1).nonzero()[0, 0])
            raise SaelabError(
                f"NaN/Inf in '{name}' for context {int(batch.context[bad])}, position "
                f"{int(batch.position[bad])} (shard {shard_index}); nothing from this shard was written. "
                "A float16 model or --storage-dtype float16 can overflow: use float32 or bfloat16, then rerun "
                "to resume (use a new --out if you change the dtype)."
            )


def _start_manifest(config: CacheCommand, source: ActivationSource) -> dict[str, Any]:
    context_length = config.data.context_length
    contexts_per_shard = max(1, config.cache.shard_tokens // context_length)
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "saelab_version": __version__,
        "identity": _identity(config),
        "config": to_dict(config),
        "hooks": {hook: {"d": d} for hook, d in source.dims.items()},
        "storage_dtype": config.cache.storage_dtype,
        "context_length": context_length,
        "contexts_per_shard": contexts_per_shard,
        "n_contexts_planned": math.ceil(config.cache.n_tokens / context_length),
        "shards": [],
        "n_tokens": 0,
        "complete": False,
    }


def read_manifest(path: Path) -> dict[str, Any]:
    """The parsed manifest.json of cache folder `path`; a SaelabError if missing, corrupt or foreign."""
    file = path / MANIFEST
    if not file.is_file():
        raise SaelabError(
            f"{path} is not a saelab activation cache (no {MANIFEST}). Build one with: saelab cache --out {path}"
        )
    try:
        manifest = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SaelabError(f"{file} is corrupt ({exc}). {REPAIR_ADVICE}.") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise SaelabError(f"{file} is not a saelab activation cache of format version {FORMAT_VERSION}.")
    return manifest


def _write_manifest(out: Path, manifest: dict[str, Any]) -> None:
    write_atomic(out / MANIFEST, json.dumps(manifest, indent=2).encode(), hint=CACHE_SPACE_HINT)


def _open_for_build(out: Path, config: CacheCommand) -> dict[str, Any] | None:
    """The manifest to resume from, None to start fresh; raises if `out` holds something else."""
    if not out.exists() or not any(out.iterdir()):
        return None
    if not (out / MANIFEST).is_file():
        if config.cache.overwrite:
            shutil.rmtree(out)
            return None
        raise SaelabError(
            f"{out} exists and is not a saelab cache; refusing to write into it. Choose another folder (--out for "
            "`saelab cache`, --cache for `saelab train`), or pass --overwrite to `saelab cache` to delete its contents."
        )
    try:
        manifest = read_manifest(out)
    except SaelabError:
        if not config.cache.overwrite:
            raise
        shutil.rmtree(out)  # an unreadable manifest: nothing in the folder can be trusted
        return None
    mismatch = _describe_mismatch(manifest["identity"], _identity(config))
    if mismatch:
        if config.cache.overwrite or not manifest["shards"]:  # nothing harvested yet (e.g. the corpus failed)
            shutil.rmtree(out)
            return None
        raise SaelabError(
            f"{out} holds a cache built with other settings ({mismatch}). Use another folder (--out for "
            "`saelab cache`, --cache for `saelab train`), or pass --overwrite to `saelab cache` to delete it."
        )
    return manifest


def build_cache(config: CacheCommand, model=None, progress: bool = True) -> ActivationCache:
    """Harvest activations as configured and write them to `config.cache.out`; resume if partly built.

    `model` (a TransformerBridge) defaults to loading `config.model.model`.
    """
    out = Path(config.cache.out)
    if config.cache.n_tokens <= 0:
        raise SaelabError(f"--n-tokens must be positive (got {config.cache.n_tokens}).")
    with FolderLock(out):
        return _build(out, config, model, progress)


def _build(out: Path, config: CacheCommand, model, progress: bool) -> ActivationCache:
    storage_dtype = parse_dtype(config.cache.storage_dtype)
    manifest = _open_for_build(out, config)
    bad = [] if manifest is None or not config.cache.overwrite else [
        index for index, shard in enumerate(manifest["shards"]) if shard_problem(out, shard)]
    if manifest is not None and manifest["complete"] and not bad:
        return ActivationCache(out)
    if model is None:
        from saelab.models import load_model

        model = load_model(config.model.model, device=config.model.device, dtype=config.model.model_dtype)
    source = ActivationSource(
        model, config.harvest.hooks, with_grads=config.harvest.with_grads, include_special=config.harvest.include_special
    )
    out.mkdir(parents=True, exist_ok=True)
    if manifest is None:
        manifest = _start_manifest(config, source)
        _write_manifest(out, manifest)
    length = config.data.context_length
    for index in bad:  # --overwrite on a cache with damaged shards: harvest just those contexts again
        first, end = manifest["shards"][index]["contexts"]
        shard_contexts = list(itertools.islice(token_contexts(config.data, model.tokenizer, model.cfg.n_ctx), first, end))
        batch = _harvest(source, shard_contexts, first, config.harvest.batch_contexts, storage_dtype)
        _write_shard(out, manifest, batch, first, end - first, index)
        if progress:
            print(f"saelab: harvested shard {index} of {out} again ({end - first} contexts)")
    per_shard = manifest["contexts_per_shard"]
    planned = manifest["n_contexts_planned"]
    first = len(manifest["shards"]) * per_shard
    contexts = itertools.islice(token_contexts(config.data, model.tokenizer, model.cfg.n_ctx), first, planned)
    bar = tqdm(total=planned * length, initial=first * length, unit="tok", unit_scale=True,
               desc=f"caching {out}", disable=not progress)
    with bar:
        while first < planned:
            shard_contexts = list(itertools.islice(contexts, min(per_shard, planned - first)))
            if not shard_contexts:
                bar.write(f"saelab: the corpus ended after {first} contexts ({first * length} tokens); "
                          "the cache holds all of them.")
                manifest["n_contexts_planned"] = first
                break
            batch = _harvest(source, shard_contexts, first, config.harvest.batch_contexts, storage_dtype, bar.update)
            _write_shard(out, manifest, batch, first, len(shard_contexts))
            first += len(shard_contexts)
    manifest["complete"] = True
    _write_manifest(out, manifest)
    return ActivationCache(out)


def _harvest(
    source: ActivationSource, contexts: list[torch.Tensor], first: int, per_forward: int, dtype: torch.dtype,
    harvested: Callable[[int], object] = lambda tokens: None,
) -> ActivationBatch:
    """One shard's activations: `contexts` (global indices from `first`) through the model `per_forward` at a
    time, stored as `dtype`; `harvested(tokens)` after each forward (the progress bar)."""
    parts = []
    for start in range(0, len(contexts), per_forward):
        chunk = torch.stack(contexts[start : start + per_forward])
        parts.append(source.batch(chunk, first_context=first + start).to(dtype=dtype))
        harvested(chunk.numel())
    return ActivationBatch.cat(parts)


def _write_shard(
    out: Path, manifest: dict[str, Any], batch: ActivationBatch, first: int, count: int, index: int | None = None
) -> None:
    """Write contexts first .. first + count as the next shard, or in place of shard `index`, and record it."""
    index = len(manifest["shards"]) if index is None else index
    _check_finite(batch, index)
    tensors = {k: v.contiguous() for k, v in batch.to_tensors().items() if k not in META_KEYS}
    tensors[TOKEN_INFO] = torch.stack([getattr(batch, k) for k in META_KEYS], dim=1).to(torch.int32)
    data = safetensors_bytes(tensors)
    name = f"shard_{index:05d}.safetensors"
    write_atomic(out / name, data, hint=CACHE_SPACE_HINT)
    entry = {"file": name, "n_tokens": len(batch), "contexts": [first, first + count], "bytes": len(data),
             "checksum": checksum(data)}
    manifest["shards"][index : index + 1] = [entry]
    manifest["n_tokens"] = sum(shard["n_tokens"] for shard in manifest["shards"])
    _write_manifest(out, manifest)


def _memmap_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Map every tensor of a safetensors file without reading it (bf16 via a uint16 view)."""
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    base = 8 + header_len
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        storage = _NUMPY_STORAGE[info["dtype"]]
        count = (end - begin) // np.dtype(storage).itemsize
        array = np.memmap(path, dtype=storage, mode="r", offset=base + begin, shape=(count,)) if count else np.empty(0, storage)
        tensor = torch.from_numpy(array.reshape(info["shape"]))  # read-only map: never written through
        tensors[name] = tensor.view(_TORCH_VIEW[info["dtype"]]) if info["dtype"] in _TORCH_VIEW else tensor
    return tensors


class ActivationCache:
    """A finished cache folder, memory-mapped.

    verify: check every shard's checksum on open (one sequential read); sizes are always checked.
    """

    def __init__(self, path: str | Path, verify: bool = True, progress: bool = False):
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        if not self.manifest["complete"]:
            raise SaelabError(
                f"The cache in {self.path} is incomplete ({len(self.manifest['shards'])} shards finished). "
                "Rerun the same `saelab cache` command to resume it."
            )
        self.hooks = list(self.manifest["hooks"])
        self.has_grads = self.manifest["identity"]["harvest"]["with_grads"]
        self.storage_dtype = parse_dtype(self.manifest["storage_dtype"])
        shards = self.manifest["shards"]
        for shard in tqdm(shards, desc="verifying shards", disable=not (verify and progress)):
            problem = shard_problem(self.path, shard, verify)
            if problem:
                raise SaelabError(f"Shard {self.path / shard['file']} {problem}. {REPAIR_ADVICE}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torch warns that the numpy maps are read-only
            self._shards = [_memmap_safetensors(self.path / s["file"]) for s in shards]
        self._offsets = torch.tensor(np.cumsum([0] + [s["n_tokens"] for s in shards]))

    @property
    def n_tokens(self) -> int:
        """Tokens stored (over all shards)."""
        return int(self._offsets[-1])

    def d(self, hook: str) -> int:
        """Per-token width of `hook` in this cache."""
        return self.manifest["hooks"][self.require(hook)]["d"]

    def require(self, hook: str, d: int | None = None) -> str:
        """Check that the cache holds `hook` (with width `d`, if given); return the hook."""
        if hook not in self.manifest["hooks"]:
            raise SaelabError(
                f"The cache in {self.path} has no hook '{hook}'; it holds {', '.join(self.hooks)}. "
                "Pick one of those or build a cache for that hook."
            )
        if d is not None and self.manifest["hooks"][hook]["d"] != d:
            raise SaelabError(
                f"Hook '{hook}' in {self.path} has width {self.manifest['hooks'][hook]['d']}, not {d}. "
                "Use a cache built from the same model and hook."
            )
        return hook

    def summary(self) -> str:
        """A few human-readable lines: model, corpus, tokens, size, dtype, hooks and widths."""
        m = self.manifest
        ident = m["identity"]
        size = sum(s["bytes"] for s in m["shards"])
        lines = [
            f"activation cache {self.path}",
            f"  model       {ident['model']['model']} ({ident['model']['model_dtype']})",
            (f"  corpus      {ident['data']['corpus']} (seed {ident['data']['seed']}, "
             f"context length {m['context_length']})"),
            f"  tokens      {self.n_tokens:,} in {len(m['shards'])} shard(s), {size / 1e6:,.1f} MB, "
            f"stored as {m['storage_dtype']}" + (" with gradients" if self.has_grads else ""),
        ]
        lines += [f"  hook        {hook}  d={info['d']}" for hook, info in m["hooks"].items()]
        return "\n".join(lines)

    def read(self, index: torch.Tensor, hooks: Sequence[str] | None = None, grads: bool = False) -> ActivationBatch:
        """Tokens at global indices `index` [m] (any order; fastest sorted) -> ActivationBatch of m tokens."""
        hooks = [self.require(h) for h in (hooks if hooks is not None else self.hooks)]
        if grads and not self.has_grads:
            raise SaelabError(f"The cache in {self.path} holds no gradients; build it with --with-grads.")
        names = [ACTS_PREFIX + h for h in hooks] + ([GRADS_PREFIX + h for h in hooks] if grads else []) + [TOKEN_INFO]
        index = torch.as_tensor(index, dtype=torch.long)
        in_order = bool((index[1:] >= index[:-1]).all())
        order = None if in_order else torch.argsort(index)
        wanted = index if in_order else index[order]
        bounds = torch.searchsorted(wanted, self._offsets).tolist()
        gathered = {}
        for n in names:
            first = self._shards[0][n]
            gathered[n] = torch.empty((len(index), *first.shape[1:]), dtype=first.dtype)
        for s, (a, b) in enumerate(itertools.pairwise(bounds)):
            if a == b:
                continue
            local = wanted[a:b] - int(self._offsets[s])
            for n in names:  # gather straight into the output rows: one copy from the page cache
                torch.index_select(self._shards[s][n], 0, local, out=gathered[n][a:b])
        if order is not None:
            for n in names:
                restored = torch.empty_like(gathered[n])
                restored[order] = gathered[n]
                gathered[n] = restored
        for n in names[:-1]:
            finite = torch.isfinite(gathered[n]).flatten(1).all(dim=1)
            if not bool(finite.all()):
                token = int(index[int((~finite).nonzero()[0, 0])])
                shard = int(torch.searchsorted(self._offsets, token, right=True)) - 1
                raise SaelabError(
                    f"The cache in {self.path} holds NaN/Inf in '{n}' at token {token} ({self.manifest['shards'][shard]['file']}). "
                    f"{REPAIR_ADVICE}."
                )
        info = gathered.pop(TOKEN_INFO).long()
        gathered.update({k: info[:, i] for i, k in enumerate(META_KEYS)})
        return ActivationBatch.from_tensors(gathered)

    def batches(
        self,
        batch_size: int = 4096,
        hooks: Sequence[str] | None = None,
        grads: bool = False,
        shuffle: bool = True,
        seed: int = 0,
        epoch: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        start: int = 0,
    ) -> Iterator[ActivationBatch]:
        """One epoch of batches. Shuffled: a fresh permutation of all tokens per (seed, epoch), so every token is
        visited exactly once and batches mix contexts from all shards. Rank r of world_size gets every
        world_size-th batch (disjoint parts, for data-parallel training). `start` skips that many batches
        without reading them (resuming). Tokens inside a batch come sorted by storage position (cheaper to
        read; a batch is a set to the trainer)."""
        order = torch.arange(self.n_tokens)
        if shuffle:
            order = torch.randperm(self.n_tokens, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
            full = self.n_tokens // batch_size * batch_size  # sort each batch's indices in one vectorised call
            order[:full] = order[:full].view(-1, batch_size).sort(dim=1).values.flatten()
            order[full:] = order[full:].sort().values
        for number, first in enumerate(range(0, self.n_tokens, batch_size)):
            if number < start or number % world_size != rank:
                continue
            index = order[first : first + batch_size]
            if drop_last and len(index) < batch_size:
                return
            yield self.read(index, hooks=hooks, grads=grads)
