"""Train every SAE variant on the same cached SmolLM2 activations, and sparsify's TopK beside them.

    python scripts/bench_variants.py [--train-tokens 500000] [--epochs 1] [--expansion 8] [--k 32]

All saelab variants train in one `Trainer` run (a sweep): each step, every SAE gets the same batch. sparsify's
`SparseCoder` (eai-sparsify: `pip install -c constraints.txt -e ".[bench]"`) then trains on the same
batches in the same order with its own trainer defaults (signum under a ScheduleFree wrapper, lr
5e-3 / sqrt(n / 2^14), no AuxK, b_dec = first batch mean, unit-norm decoder, FVU loss, raw inputs), at the
same k, width and token budget. Everything is evaluated on a held-out cache (a different corpus seed, so a
different document order and context packing): FVU over all held-out tokens (global sums), mean L0 (a != 0)
and the fraction of latents that never fire there. Prints a markdown table for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

if not torch.cuda.is_available():  # sparsify picks its Triton decoder whenever Triton is importable, even on CPU
    os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")

from saelab.activations import ActivationCache, build_cache
from saelab.config import CacheCommand, CacheConfig, DataConfig, HarvestConfig, SAEConfig, TrainConfig
from saelab.sae import load_sae
from saelab.train.command import TrainCommand
from saelab.train.stream import CacheStream
from saelab.train.trainer import Trainer

HOOK = "blocks.15.hook_resid_pre"
VARIANTS = [
    "architecture=topk",
    "architecture=batchtopk",
    "architecture=abstopk",
    "architecture=choice,choice_mode=mutual",
    "architecture=choice,choice_mode=feature",
    "architecture=relu",
    "architecture=jumprelu,theta_init=0.01,bandwidth=0.05",
    "architecture=topafa",
    "architecture=threshold,threshold_family=soft",
]


def ensure_cache(folder: Path, n_tokens: int, seed: int, with_grads: bool = False) -> ActivationCache:
    config = CacheCommand(data=DataConfig(seed=seed), harvest=HarvestConfig(hooks=[HOOK], with_grads=with_grads),
                          cache=CacheConfig(out=str(folder), n_tokens=n_tokens))
    return build_cache(config)


class Evaluation:
    """Global FVU, mean L0 and never-fired fraction over a stream of [batch, d] activations."""

    def __init__(self, d_sae: int):
        self.sse = self.sum_sq = 0.0
        self.sum = None
        self.tokens = self.nonzero = 0
        self.fired = torch.zeros(d_sae, dtype=torch.bool)

    def add(self, x: torch.Tensor, x_hat: torch.Tensor, acts: torch.Tensor) -> None:
        self.sse += float((x - x_hat).pow(2).sum())
        self.sum_sq += float(x.pow(2).sum())
        self.sum = x.sum(0) if self.sum is None else self.sum + x.sum(0)
        self.tokens += len(x)
        self.nonzero += int((acts != 0).sum())
        self.fired |= (acts != 0).any(0)

    def result(self) -> dict[str, float]:
        total_variance = self.sum_sq - float(self.sum.pow(2).sum()) / self.tokens
        return {"fvu": self.sse / total_variance, "l0": self.nonzero / self.tokens,
                "dead": 1 - float(self.fired.float().mean())}


@torch.no_grad()
def evaluate_saelab(folder: Path, eval_cache: ActivationCache) -> dict[str, float]:
    sae = load_sae(folder)
    result = Evaluation(sae.d_sae)
    for batch in eval_cache.batches(4096, hooks=[HOOK], shuffle=False):
        x = batch.acts[HOOK].float()
        x_n, stats = sae.normalize(x)
        acts = sae.encode_normalized(x_n).dense()  # inference code; decoded below, so each batch is encoded once
        result.add(x, sae.denormalize(sae.decode(acts), stats), acts)
    return result.result()


def train_sparsify(stream: CacheStream, steps: int, d_in: int, n_latents: int, k: int):
    from schedulefree import ScheduleFreeWrapper
    from sparsify import SparseCoder, SparseCoderConfig
    from sparsify.sign_sgd import SignSGD

    torch.manual_seed(0)
    sae = SparseCoder(d_in, SparseCoderConfig(k=k, num_latents=n_latents))
    optimizer = ScheduleFreeWrapper(SignSGD([{"params": sae.parameters(), "lr": 5e-3 / math.sqrt(n_latents / 2**14)}]),
                                    momentum=0.95)
    optimizer.train()
    for step, batch in enumerate(stream.batches(0)):
        if step >= steps:
            break
        x = batch.acts[HOOK].float()
        if step == 0:
            sae.b_dec.data = x.mean(0)
        sae.set_decoder_norm_to_unit_norm()
        out = sae(x)
        out.fvu.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        optimizer.step()
        optimizer.zero_grad()
    optimizer.eval()  # ScheduleFree: evaluate the averaged weights, as sparsify does when saving
    return sae


@torch.no_grad()
def evaluate_sparsify(sae, eval_cache: ActivationCache) -> dict[str, float]:
    result = Evaluation(sae.num_latents)
    for batch in eval_cache.batches(4096, hooks=[HOOK], shuffle=False):
        x = batch.acts[HOOK].float()
        out = sae(x)
        acts = torch.zeros(len(x), sae.num_latents).scatter(1, out.latent_indices, out.latent_acts)
        result.add(x, out.sae_out, acts)
    return result.result()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", default="runs/bench-variants")
    parser.add_argument("--train-tokens", type=int, default=500_000)
    parser.add_argument("--epochs", type=int, default=1, help="Passes over the training cache (longer runs).")
    parser.add_argument("--eval-tokens", type=int, default=65_536)
    parser.add_argument("--expansion", type=int, default=8)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--sweep", nargs="+", default=VARIANTS, help="Variants to train (saelab sweep entries).")
    parser.add_argument("--runs-name", default="saes", help="Subfolder of --folder for the trained SAEs.")
    parser.add_argument("--no-sparsify", action="store_true", help="Skip the sparsify baseline.")
    parser.add_argument("--with-grads", action="store_true",
                        help="Train on a cache that also holds LM-loss gradients (train-cache-grads; needed by gsae).")
    args = parser.parse_args()
    folder = Path(args.folder)
    started = time.time()
    train_folder = folder / ("train-cache-grads" if args.with_grads else "train-cache")
    train_cache = ensure_cache(train_folder, args.train_tokens, seed=0, with_grads=args.with_grads)
    eval_cache = ensure_cache(folder / "eval-cache", args.eval_tokens, seed=1)
    d_in = train_cache.d(HOOK)
    n_latents = args.expansion * d_in
    cmd = TrainCommand(
        harvest=HarvestConfig(hooks=[HOOK]),
        train=TrainConfig(cache=str(train_folder), out=str(folder / args.runs_name),
                          batch_size=args.batch_size, train_tokens=args.epochs * train_cache.n_tokens, sweep=args.sweep,
                          checkpoint_every=10**9),
        sae=SAEConfig(expansion=args.expansion, k=args.k),
    )
    trainer = Trainer(cmd, progress=True)
    steps = trainer.total_steps
    trained = time.time()
    folders = trainer.fit()
    saelab_seconds = time.time() - trained
    rows = [(run.spec.overrides, evaluate_saelab(f, eval_cache)) for run, f in zip(trainer.runs, folders)]
    sparsify_seconds = 0.0
    if not args.no_sparsify:
        trained = time.time()
        stream = CacheStream(train_cache, [HOOK], args.batch_size, seed=0, grads=False)
        sparsify_sae = train_sparsify(stream, steps, d_in, n_latents, args.k)
        sparsify_seconds = time.time() - trained
        rows.append(({"architecture": "sparsify SparseCoder (topk, its defaults)"},
                     evaluate_sparsify(sparsify_sae, eval_cache)))

    print(f"\n# bench_variants: {datetime.date.today()}, SmolLM2-135M {HOOK}, d_in {d_in}, {n_latents} latents, "
          f"k {args.k}, {steps} steps x {args.batch_size} tokens ({steps * args.batch_size:,} tokens), "
          f"eval on {eval_cache.n_tokens:,} held-out tokens")
    print(f"command: python scripts/bench_variants.py --train-tokens {args.train_tokens} --epochs {args.epochs} "
          f"{'--with-grads ' if args.with_grads else ''}"
          f"--expansion {args.expansion} "
          f"--k {args.k} --sweep {' '.join(args.sweep)}; {len(args.sweep)} saelab SAEs trained together in {saelab_seconds:.0f} s, sparsify in "
          f"{sparsify_seconds:.0f} s, total {time.time() - started:.0f} s\n")
    print("| variant | settings | FVU (held out) | L0 | never fired |")
    print("|---|---|---|---|---|")
    for overrides, r in rows:
        name = overrides.get("architecture", "")
        settings = ", ".join(f"{k}={v}" for k, v in overrides.items() if k != "architecture") or "defaults"
        print(f"| {name} | {settings} | {r['fvu']:.3f} | {r['l0']:.1f} | {100 * r['dead']:.1f}% |")


if __name__ == "__main__":
    main()
