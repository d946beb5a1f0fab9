"""Benchmark one full SAE training step (forward, loss, backward, Adam, decoder renormalisation).

    python scripts/bench_step.py [--n 16384] [--d 768] [--k 32] [--batch 4096] [--dtype float32] [--rounds 5]
    python scripts/bench_step.py --variants          # BatchTopK, mutual choice, JumpReLU: sparse vs dense backward
    python scripts/bench_step.py --crossover         # sparse vs dense backward as the code's density grows
    python scripts/bench_step.py --inference         # ReLU-L1 inference, sae(x): CSR decode vs dense matmul

Candidates, timed in interleaved rounds in one process (median), on the same batch and sizes:
  naive     a dense PyTorch TopK SAE: z = x W + b, top-k scattered into a dense [B, n] code, code @ W_dec
  sparsify  eai-sparsify's SparseCoder forward (its fused encoder + sparse decoder) with the same Adam
            (`pip install -c constraints.txt -e ".[bench]"`; skipped if missing)
  saelab    saelab.train.step.train_step on a TopK SAE (sparse kernels), its Adam (fused)
  floor     what no TopK step can avoid: the dense encoder matmul, the top-k, and the Adam update alone
All use torch.optim.Adam(fused=True) (the fastest torch Adam on CPU) and unit-norm decoder rows. AuxK is idle in
all of them (no dead latents at the start of training). Peak memory: each candidate runs alone in a child
process; the figure is its peak resident set size (VmHWM) over two steps.

Prints markdown tables for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch

import saelab.sae.base

if not torch.cuda.is_available():  # sparsify picks its Triton decoder whenever Triton is importable, even on CPU
    os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")

from saelab.config import AuxConfig, SAEConfig, TopKConfig
from saelab.sae.base import StepContext
from saelab.sae.registry import create_sae
from saelab.train.step import train_step

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def adam(params) -> torch.optim.Adam:
    return torch.optim.Adam(params, lr=1e-4, fused=True)


def unit_rows(n: int, d: int, dtype: torch.dtype) -> torch.Tensor:
    w = torch.randn(n, d)
    return (w / w.norm(dim=1, keepdim=True)).to(dtype)


def naive_step(args, dtype):
    W_dec = torch.nn.Parameter(unit_rows(args.n, args.d, dtype))
    W_enc = torch.nn.Parameter(W_dec.detach().T.clone())
    b_enc = torch.nn.Parameter(torch.zeros(args.n, dtype=dtype))
    b_dec = torch.nn.Parameter(torch.zeros(args.d, dtype=dtype))
    optimizer = adam([W_enc, b_enc, W_dec, b_dec])

    def step(x):
        optimizer.zero_grad(set_to_none=True)
        z = (x - b_dec) @ W_enc + b_enc
        top = z.topk(args.k, dim=1, sorted=False)
        a = torch.zeros_like(z).scatter(1, top.indices, top.values.relu())
        x_hat = a @ W_dec + b_dec
        loss = (x_hat - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
        loss.backward()
        with torch.no_grad():
            W_dec.grad -= (W_dec.grad * W_dec).sum(1, keepdim=True) * W_dec
        optimizer.step()
        with torch.no_grad():
            W_dec.div_(W_dec.norm(dim=1, keepdim=True))

    return step


def sparsify_step(args, dtype):
    from sparsify import SparseCoder, SparseCoderConfig

    sae = SparseCoder(args.d, SparseCoderConfig(k=args.k, num_latents=args.n), dtype=dtype)
    optimizer = adam(sae.parameters())

    def step(x):
        optimizer.zero_grad(set_to_none=True)
        out = sae(x)
        out.fvu.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        optimizer.step()
        sae.set_decoder_norm_to_unit_norm()

    return step


def saelab_step(args, dtype, architecture="topk", sparse_kernels=True):
    cfg = SAEConfig(architecture=architecture, d_sae=args.n, k=args.k, input_norm="none")
    sae = create_sae(args.d, cfg, {"aux": AuxConfig(), "topk": TopKConfig()}).to(dtype)
    if architecture == "jumprelu":  # thresholds at the (1 - k/n) quantile of z: L0 ~ k, as after training
        with torch.no_grad():
            z = sae.encode_pre(batch_for(args, dtype)[:512]).float()
            sae.log_threshold.fill_(math.log(float(z.quantile(1 - args.k / args.n))))
    optimizer = adam(sae.parameters())
    ctx = StepContext(dead=torch.zeros(args.n, dtype=torch.bool), sparse_kernels=sparse_kernels)
    return lambda x: train_step(sae, optimizer, x, ctx)


def floor_step(args, dtype):
    W_enc = torch.nn.Parameter(unit_rows(args.n, args.d, dtype).T)
    b_enc = torch.nn.Parameter(torch.zeros(args.n, dtype=dtype))
    W_dec = torch.nn.Parameter(unit_rows(args.n, args.d, dtype))
    b_dec = torch.nn.Parameter(torch.zeros(args.d, dtype=dtype))
    params = [W_enc, b_enc, W_dec, b_dec]
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer = adam(params)

    def step(x):
        with torch.no_grad():
            torch.addmm(b_enc, x, W_enc).topk(args.k, dim=1, sorted=False)
        optimizer.step()

    return step


CANDIDATES = {"naive": naive_step, "sparsify": sparsify_step, "saelab": saelab_step, "floor": floor_step}


def available(name: str) -> bool:
    if name != "sparsify":
        return True
    try:
        import sparsify  # noqa: F401
    except ImportError:
        return False
    return True


def interleaved(steps: dict, x: torch.Tensor, rounds: int) -> dict[str, float]:
    """Median seconds per step of each candidate, alternating candidates every round (after one warm-up each)."""
    for step in steps.values():
        step(x)
    times = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            step(x)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def peak_rss_mb() -> float:
    """This process's peak resident set (MB): VmHWM, which exec resets (ru_maxrss would carry the parent's)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_memory_mb(name: str, argv: list[str]) -> float:
    """Peak RSS (MB) of a child process that builds `name` and runs two steps."""
    out = subprocess.run(
        [sys.executable, __file__, *argv, "--memory-child", name], capture_output=True, text=True, check=True
    )
    return float(out.stdout.strip().splitlines()[-1])


def batch_for(args, dtype) -> torch.Tensor:
    return torch.randn(args.batch, args.d, generator=torch.Generator().manual_seed(0)).to(dtype)


def main_table(args, argv: list[str]) -> None:
    dtype = DTYPES[args.dtype]
    names = [n for n in CANDIDATES if available(n)]
    torch.manual_seed(0)
    steps = {name: CANDIDATES[name](args, dtype) for name in names}
    seconds = interleaved(steps, batch_for(args, dtype), args.rounds)
    del steps
    memory = {name: peak_memory_mb(name, argv) for name in names} if not args.no_memory else {}
    print(
        f"\nn={args.n} d_in={args.d} k={args.k} batch={args.batch} {args.dtype}, {torch.get_num_threads()} threads, "
        f"median of {args.rounds} interleaved rounds\n"
    )
    print("| step | seconds | saelab is faster by | vs floor | peak RSS (MB) |")
    print("|---|---|---|---|---|")
    for name in names:
        speedup = seconds[name] / seconds["saelab"]
        mem = f"{memory[name]:,.0f}" if memory else "-"
        print(f"| {name} | {seconds[name]:.3f} | {speedup:.2f}x | {seconds[name] / seconds['floor']:.2f}x | {mem} |")


def variants_table(args) -> None:
    dtype = DTYPES[args.dtype]
    x = batch_for(args, dtype)
    print(f"\nn={args.n} d_in={args.d} k={args.k} batch={args.batch} {args.dtype}: sparse kernels vs dense backward\n")
    print("| variant | sparse (s) | dense (s) | speedup |")
    print("|---|---|---|---|")
    for architecture in ("topk", "batchtopk", "choice", "jumprelu"):
        steps = {sparse: saelab_step(args, dtype, architecture, sparse) for sparse in (True, False)}
        seconds = interleaved(steps, x, args.rounds)
        print(
            f"| {architecture} | {seconds[True]:.3f} | {seconds[False]:.3f} | {seconds[False] / seconds[True]:.2f}x |"
        )


DENSITIES = (0.002, 0.01, 0.05, 0.1, 0.15, 0.2, 0.3)


def sparse_at_every_density(args) -> tuple[torch.dtype, torch.Tensor]:
    """Switch off the automatic dense fallback (saelab.sae.base.DENSE_CROSSOVER), so that the sparse path runs at
    every density; returns the dtype and the batch."""
    saelab.sae.base.DENSE_CROSSOVER = 1.0
    dtype = DTYPES[args.dtype]
    return dtype, batch_for(args, dtype)


def crossover_table(args) -> None:
    """Sparse vs dense backward for TopK as k / n grows: where the dense matmuls start to win."""
    dtype, x = sparse_at_every_density(args)
    print(f"\nn={args.n} d_in={args.d} batch={args.batch} {args.dtype}: TopK step, sparse kernels vs dense backward\n")
    print("| k | density k/n | sparse (s) | dense (s) | dense / sparse |")
    print("|---|---|---|---|---|")
    for density in DENSITIES:
        sized = argparse.Namespace(**{**vars(args), "k": max(1, round(density * args.n))})
        steps = {sparse: saelab_step(sized, dtype, "topk", sparse) for sparse in (True, False)}
        seconds = interleaved(steps, x, args.rounds)
        print(
            f"| {sized.k} | {sized.k / args.n:.3f} | {seconds[True]:.3f} | {seconds[False]:.3f} | "
            f"{seconds[False] / seconds[True]:.2f} |"
        )


def relu_inference(args, dtype, density: float, backend: str):
    """sae(x) of a ReLU SAE whose b_enc puts each latent's threshold at its (1 - density) quantile of z, run
    under SAELAB_KERNELS=backend (eager: the CSR code and sparse decode; dense: the [B, n] code @ W_dec)."""
    sae = create_sae(args.d, SAEConfig(architecture="relu", d_sae=args.n, input_norm="none")).to(dtype)
    with torch.no_grad():
        z = sae.encode_pre(batch_for(args, dtype)[:1024]).float()
        sae.b_enc -= z.quantile(1 - density, dim=0).to(dtype)

    def step(x):
        os.environ["SAELAB_KERNELS"] = backend
        with torch.no_grad():
            sae(x)

    return step


def inference_table(args) -> None:
    """Inference for a dense-activation variant (ReLU-L1): the code is converted to CSR and decoded sparsely
    unless it is denser than DENSE_CROSSOVER (switched off here, so that both paths run at every density)."""
    dtype, x = sparse_at_every_density(args)
    print(f"\nn={args.n} d_in={args.d} batch={args.batch} {args.dtype}: ReLU-L1 sae(x), CSR decode vs dense\n")
    print("| density | L0 | CSR (s) | dense (s) | dense / CSR |")
    print("|---|---|---|---|---|")
    for density in DENSITIES:
        steps = {backend: relu_inference(args, dtype, density, backend) for backend in ("eager", "dense")}
        seconds = interleaved(steps, x, args.rounds)
        print(
            f"| {density:.3f} | {density * args.n:.0f} | {seconds['eager']:.3f} | {seconds['dense']:.3f} | "
            f"{seconds['dense'] / seconds['eager']:.2f} |"
        )
    os.environ.pop("SAELAB_KERNELS")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=16384, help="latents")
    parser.add_argument("--d", type=int, default=768, help="input width")
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory child processes")
    parser.add_argument("--variants", action="store_true", help="BatchTopK / choice: sparse vs dense backward")
    parser.add_argument("--crossover", action="store_true", help="sparse vs dense backward across densities")
    parser.add_argument("--inference", action="store_true", help="ReLU-L1 sae(x): CSR decode vs dense matmul")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        dtype = DTYPES[args.dtype]
        step = CANDIDATES[args.memory_child](args, dtype)
        x = batch_for(args, dtype)
        step(x), step(x)
        print(peak_rss_mb())
        return
    print(
        f"# bench_step.py, {datetime.date.today()}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, torch {torch.__version__}"
    )
    if args.variants:
        variants_table(args)
    elif args.crossover:
        crossover_table(args)
    elif args.inference:
        inference_table(args)
    else:
        argv = [a for a in sys.argv[1:] if a != "--no-memory"]
        main_table(args, argv)


if __name__ == "__main__":
    main()
