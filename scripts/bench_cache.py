"""Benchmark the activation cache: harvest overhead and shuffled read throughput.

    python scripts/bench_cache.py [--rounds 5] [--read-gb 1.0]
    python scripts/bench_cache.py --feed [--cache runs/cache] [--steps 200] [--device cpu]

1. Harvest (embedded SmolLM2, fp32, CPU): tokens/s of saelab's ActivationSource (forward with hooks,
   flatten, drop special positions, copy out) vs the bare bridge forward to the same layer with no hooks,
   measured in interleaved rounds (median); then a full `build_cache` end to end (tokenise, harvest, write,
   checksum).
2. Read: a cache of ~read-gb GB (d=576 fp32, written from a 1-layer model: content does not matter for
   I/O) read as shuffled batches of 4096 tokens, vs a raw sequential read of the same files (best of
   several buffer sizes). Both run on a warm page cache, as in training after the first epoch.
3. Feed (--feed, instead of 1 and 2): a TopK SAE trained for --steps steps from a cache (--cache, read-only; by
   default a d=576 cache of --feed-tokens built in a temporary folder) exactly as the trainer steps it (`Run`),
   reading the batches from the plain CacheStream iterator and through the trainer's Prefetcher, in interleaved
   rounds (each round a fresh SAE on the same batches, warm page cache). Reports steps/s and the share of wall time
   the loop spent blocked waiting for the next batch.

Prints a markdown table for BENCHMARKS.md. Re-executes itself with glibc's trim/mmap thresholds raised,
so timings do not swing with the allocator returning large buffers to the OS.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

if "MALLOC_TRIM_THRESHOLD_" not in os.environ:
    env = dict(os.environ, MALLOC_TRIM_THRESHOLD_="17179869184", MALLOC_MMAP_THRESHOLD_="17179869184")
    os.execve(sys.executable, [sys.executable, *sys.argv], env)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from saelab.activations import ActivationCache, ActivationSource, build_cache
from saelab.config import CacheCommand, CacheConfig, DataConfig, HarvestConfig, ModelConfig, SAEConfig
from saelab.data import token_contexts
from saelab.models import load_model, tiny_native_model
from saelab.train.command import TrainCommand
from saelab.train.stream import CacheStream, Prefetcher
from saelab.train.trainer import Run, plan_runs


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_harvest(model, hook: str, blocks: int, tokens: torch.Tensor, rounds: int) -> dict[str, float]:
    """`blocks`: how many blocks the bare forward must run to produce `hook` (L for resid_pre of L, else L+1)."""
    source = ActivationSource(model, [hook])
    n = tokens.numel()

    def bare():
        with torch.no_grad():
            model(tokens, stop_at_layer=blocks)

    bare(), source.batch(tokens)  # warm-up
    bare_times, harvest_times = [], []
    for _ in range(rounds):
        bare_times.append(timed(bare))
        harvest_times.append(timed(lambda: source.batch(tokens)))
    bare_rate, harvest_rate = n / statistics.median(bare_times), n / statistics.median(harvest_times)
    return {"bare": bare_rate, "harvest": harvest_rate, "overhead": bare_rate / harvest_rate - 1}


def bench_build(model, hook: str, n_tokens: int, folder: Path) -> float:
    config = CacheCommand(
        model=ModelConfig(model="smollm2-135m"),
        harvest=HarvestConfig(hooks=[hook]),
        cache=CacheConfig(out=str(folder / "build"), n_tokens=n_tokens),
    )
    seconds = timed(lambda: build_cache(config, model=model, progress=False))
    return ActivationCache(folder / "build", verify=False).n_tokens / seconds


def raw_read_gbps(files: list[Path], buffer_bytes: int) -> float:
    """Sequential read of every file into one reused buffer of `buffer_bytes`."""
    total = sum(f.stat().st_size for f in files)
    buffer = bytearray(buffer_bytes)

    def read_all():
        for file in files:
            with open(file, "rb", buffering=0) as f:
                while f.readinto(buffer):
                    pass

    return total / timed(read_all) / 1e9


def bench_read(folder: Path, gigabytes: float, rounds: int) -> dict[str, float]:
    d = 576
    n_tokens = int(gigabytes * 1e9 / (d * 4))
    model = tiny_native_model(n_layers=1, d_model=d, n_heads=9, d_mlp=64)
    config = CacheCommand(
        model=ModelConfig(model="tiny-native-576"),
        harvest=HarvestConfig(hooks=["blocks.0.hook_resid_pre"], batch_contexts=64),
        cache=CacheConfig(out=str(folder / "read"), n_tokens=n_tokens),
    )
    build_cache(config, model=model, progress=False)
    cache = ActivationCache(folder / "read", verify=False)
    files = [folder / "read" / s["file"] for s in cache.manifest["shards"]]
    act_bytes = cache.n_tokens * d * 4
    batch_bytes = 4096 * d * 4
    raw_read_gbps(files, 1 << 20)  # warm the page cache
    rates: dict[str, list[float]] = {"raw_small": [], "raw_batch": [], "shuffled": [], "sequential": []}
    for epoch in range(rounds):
        rates["raw_small"].append(raw_read_gbps(files, 1 << 20))
        rates["raw_batch"].append(raw_read_gbps(files, batch_bytes))
        rates["shuffled"].append(act_bytes / timed(lambda e=epoch: sum(1 for _ in cache.batches(4096, epoch=e))) / 1e9)
        rates["sequential"].append(act_bytes / timed(lambda: sum(1 for _ in cache.batches(4096, shuffle=False))) / 1e9)
    medians = {k: statistics.median(v) for k, v in rates.items()}
    return {"gb": sum(f.stat().st_size for f in files) / 1e9, **medians}


def tiny_cache(folder: Path, n_tokens: int) -> ActivationCache:
    """A cache of n_tokens at d=576 fp32 from a 1-layer random model (content does not matter for feeding)."""
    model = tiny_native_model(n_layers=1, d_model=576, n_heads=9, d_mlp=64)
    config = CacheCommand(
        model=ModelConfig(model="tiny-native-576"),
        harvest=HarvestConfig(hooks=["blocks.0.hook_resid_pre"], batch_contexts=64),
        cache=CacheConfig(out=str(folder / "feed"), n_tokens=n_tokens),
    )
    build_cache(config, model=model, progress=False)
    return ActivationCache(folder / "feed", verify=False)


def train_steps(stream: CacheStream, args, prefetch: bool) -> dict[str, float]:
    """Steps/s and data-wait share of `args.steps` trainer steps of a fresh TopK SAE on the stream's first batches."""
    hook = stream.hooks[0]
    cmd = TrainCommand(harvest=HarvestConfig(hooks=[hook]), sae=SAEConfig(architecture="topk", k=args.k,
                                                                         expansion=args.expansion))
    device = torch.device(args.device)
    run = Run(plan_runs(cmd)[0], stream.dims[hook], {}, seed=0, device=device)
    run.initialize(stream.sample(args.batch_size).to(device))
    feed = Prefetcher(stream.batches(), device) if prefetch else stream.batches()
    waited = 0.0
    start = time.perf_counter()
    for step in range(args.steps):
        before = time.perf_counter()
        batch = next(feed)
        waited += time.perf_counter() - before
        run.step(batch, step, args.steps, log=False)  # checks the loss is finite: one device sync per step
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    if prefetch:
        feed.close()
    return {"steps_per_s": args.steps / seconds, "data_wait": waited / seconds}


def bench_feed(args) -> None:
    folder = Path(tempfile.mkdtemp(prefix="saelab-bench-"))
    try:
        cache = ActivationCache(args.cache, verify=False) if args.cache else tiny_cache(folder, args.feed_tokens)
        stream = CacheStream(cache, cache.hooks[:1], args.batch_size, seed=0, grads=False)
        raw_read_gbps([cache.path / s["file"] for s in cache.manifest["shards"]], 1 << 20)  # warm the page cache
        results: dict[bool, list[dict[str, float]]] = {False: [], True: []}
        for _ in range(args.rounds):
            for prefetch in (False, True):
                results[prefetch].append(train_steps(stream, args, prefetch))
        print(f"# bench_cache --feed: {datetime.date.today()}, {platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), {args.device}")
        print(f"command: python scripts/bench_cache.py --feed --cache {args.cache or '(temporary)'} --steps "
              f"{args.steps} --rounds {args.rounds} --batch-size {args.batch_size} --expansion {args.expansion} "
              f"--k {args.k} --device {args.device}\n")
        print(f"## Feed: TopK SAE (d={stream.dims[stream.hooks[0]]}, expansion {args.expansion}, k={args.k}), "
              f"batches of {args.batch_size} from {cache.path} ({cache.n_tokens:,} tokens), median of "
              f"{args.rounds} interleaved rounds of {args.steps} steps\n")
        print("| batches from | steps/s | share of wall time waiting for data |")
        print("|---|---|---|")
        for prefetch, label in ((False, "CacheStream iterator, in the loop"), (True, "Prefetcher (depth 2)")):
            rate = statistics.median(r["steps_per_s"] for r in results[prefetch])
            wait = statistics.median(r["data_wait"] for r in results[prefetch])
            print(f"| {label} | {rate:.2f} | {100 * wait:.1f}% |")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch-contexts", type=int, default=16)
    parser.add_argument("--build-tokens", type=int, default=65_536)
    parser.add_argument("--read-gb", type=float, default=1.0)
    parser.add_argument("--feed", action="store_true", help="benchmark feeding the training loop (section 3) only")
    parser.add_argument("--cache", help="--feed: an existing cache to read (first hook); default: a temporary one")
    parser.add_argument("--feed-tokens", type=int, default=262_144, help="--feed: tokens of the temporary cache")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--expansion", type=int, default=8)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.feed:
        bench_feed(args)
        return

    torch.manual_seed(0)
    model = load_model("smollm2-135m")
    contexts = list(token_contexts(DataConfig(), model.tokenizer))[: args.batch_contexts]
    tokens = torch.stack(contexts)
    folder = Path(tempfile.mkdtemp(prefix="saelab-bench-"))
    try:
        print(f"# bench_cache: {datetime.date.today()}, {platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads)")
        print(f"command: python scripts/bench_cache.py --rounds {args.rounds} --read-gb {args.read_gb}\n")
        print(f"## Harvest, SmolLM2-135M fp32, {tokens.shape[0]}x{tokens.shape[1]} tokens per forward, "
              f"median of {args.rounds} interleaved rounds\n")
        print("| hook | bare forward through the same blocks, no hooks (tok/s) | saelab harvest (tok/s) | overhead |")
        print("|---|---|---|---|")
        for hook, blocks in (("blocks.3.hook_resid_post", 4), ("blocks.15.hook_resid_pre", 15)):
            r = bench_harvest(model, hook, blocks, tokens, args.rounds)
            print(f"| {hook} | {r['bare']:,.0f} | {r['harvest']:,.0f} | {100 * r['overhead']:+.1f}% |")
        build_rate = bench_build(model, "blocks.15.hook_resid_pre", args.build_tokens, folder)
        print(f"\nFull `build_cache` at blocks.15.hook_resid_pre ({args.build_tokens:,} tokens: tokenise, harvest, "
              f"checksum, fsync'd writes): {build_rate:,.0f} stored tok/s\n")
        r = bench_read(folder, args.read_gb, args.rounds)
        print(f"## Read, {r['gb']:.2f} GB cache (d=576 fp32), warm page cache, median of {args.rounds} rounds\n")
        print("| read | GB/s | vs raw read, 1 MiB buffer | vs raw read, batch-size buffer |")
        print("|---|---|---|---|")
        for label, key in (("raw sequential read, 1 MiB buffer (cache-resident)", "raw_small"),
                           ("raw sequential read, 9.4 MB buffer (one batch)", "raw_batch"),
                           ("saelab shuffled batches of 4096", "shuffled"),
                           ("saelab sequential batches of 4096", "sequential")):
            print(f"| {label} | {r[key]:.2f} | {r[key] / r['raw_small']:.2f}x | {r[key] / r['raw_batch']:.2f}x |")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
