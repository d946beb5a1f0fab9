"""Benchmark one full SAE training step (forward, loss, backward, Adam, decoder renormalisation).

    python scripts/bench_step.py [--n 16384] [--d 768] [--k 32] [--batch 4096] [--dtype float32] [--rounds 5]
    python scripts/bench_step.py --device cuda [--precision bf16]   # the same table on a GPU
    python scripts/bench_step.py --device cuda --grid                # the issue-15 grid and its targets (H100/H200)
    python scripts/bench_step.py --device cpu --grid --scale 64 --budget 30 --rounds 2   # the grid's dry run
    python scripts/bench_step.py --variants          # BatchTopK, mutual choice, JumpReLU: sparse vs dense backward
    python scripts/bench_step.py --crossover         # sparse vs dense backward as the code's density grows
    python scripts/bench_step.py --inference         # ReLU-L1 inference, sae(x): CSR decode vs dense matmul

Candidates, timed in interleaved rounds in one process (median), on the same batch and sizes:
  naive     a dense PyTorch TopK SAE: z = x W + b, top-k scattered into a dense [B, n] code, code @ W_dec
  sparsify  eai-sparsify's SparseCoder forward (its fused encoder + sparse decoder, Triton on CUDA) with the same Adam
            (`pip install -c constraints.txt -e ".[bench]"`; skipped if missing)
  saelab    saelab.train.step.train_step on a TopK SAE (sparse kernels, Triton on CUDA), its Adam (fused)
  floor     what no TopK step can avoid: the dense encoder matmul, the top-k, and the Adam update alone
All use torch.optim.Adam(fused=True) (the fastest torch Adam on CPU) and unit-norm decoder rows. AuxK is idle in
all of them (no dead latents at the start of training). --precision bf16 runs every candidate's forward under
torch.autocast(bfloat16) over float32 master weights and Adam state (saelab: train_step(..., autocast=bfloat16));
fp32 is float32 throughout (on CUDA without TF32, torch's default). On CUDA each timed step ends in a
synchronize. Peak memory: on CPU each candidate runs alone in a child process, and the figure is its peak resident
set size (VmHWM) over two steps; on CUDA it is torch.cuda.max_memory_allocated over building the candidate alone
and two steps (the batch included).

--grid runs sparsify, saelab and the floor (naive's dense [B, n] code would not fit the time) over the issue's
grid: d_in 768 and 2304, n 2^15..2^17, k 32..128, batch 4096..32768, bf16 and fp32; the target point (d_in 2304,
n 2^17, k 64, batch 16384, bf16) first, then the points that differ from it in one setting, then two, ..., cheapest
first within each; it starts no new point once --budget seconds have passed, and ends with the targets at the target
point: saelab >= 1.2x faster than sparsify, <= 1.5x the floor, peak memory <= sparsify's. --scale S divides d_in, n
and the batch of every point by S (a dry run on a CPU).

Prints markdown tables for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import itertools
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

from saelab.config import SAEConfig
from saelab.devices import check_device
from saelab.errors import SaelabError
from saelab.sae.base import StepContext
from saelab.sae.registry import create_sae
from saelab.sae.topk import AuxConfig, TopKConfig
from saelab.train.step import train_step

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
PRECISIONS = ("fp32", "bf16")
GRID = {
    "d": (768, 2304),
    "n": (2**15, 2**16, 2**17),
    "k": (32, 64, 128),
    "batch": (4096, 16384, 32768),
    "precision": ("bf16", "fp32"),
}
TARGET = {"d": 2304, "n": 2**17, "k": 64, "batch": 16384, "precision": "bf16"}
GRID_CANDIDATES = ("sparsify", "saelab", "floor")
MIN_SPEEDUP_OVER_SPARSIFY, MAX_OVER_FLOOR = 1.2, 1.5


def describe(point: dict) -> str:
    return f"d_in {point['d']}, n {point['n']}, k {point['k']}, batch {point['batch']}, {point['precision']}"


def adam(params) -> torch.optim.Adam:
    return torch.optim.Adam(params, lr=1e-4, fused=True)


def autocast(args):
    """The candidates' forward precision: bfloat16 autocast over float32 weights (--precision bf16), or none."""
    return torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16, enabled=args.precision == "bf16")


def unit_rows(n: int, d: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    w = torch.randn(n, d, device=device)
    return (w / w.norm(dim=1, keepdim=True)).to(dtype)


def naive_step(args, dtype):
    W_dec = torch.nn.Parameter(unit_rows(args.n, args.d, dtype, args.device))
    W_enc = torch.nn.Parameter(W_dec.detach().T.clone())
    b_enc = torch.nn.Parameter(torch.zeros(args.n, dtype=dtype, device=args.device))
    b_dec = torch.nn.Parameter(torch.zeros(args.d, dtype=dtype, device=args.device))
    optimizer = adam([W_enc, b_enc, W_dec, b_dec])

    def step(x):
        optimizer.zero_grad(set_to_none=True)
        with autocast(args):
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

    sae = SparseCoder(args.d, SparseCoderConfig(k=args.k, num_latents=args.n), device=args.device, dtype=dtype)
    optimizer = adam(sae.parameters())
    # SparseCoder.forward carries its own bf16 autocast on CUDA; the undecorated forward lets --precision decide,
    # as for the other candidates.
    forward = SparseCoder.forward.__wrapped__

    def step(x):
        optimizer.zero_grad(set_to_none=True)
        with autocast(args):
            out = forward(sae, x)
        out.fvu.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        optimizer.step()
        sae.set_decoder_norm_to_unit_norm()

    return step


def new_sae(args, dtype, cfg: SAEConfig, options=None):
    with torch.device(args.device):  # initialised where it trains: a CPU init of 2^17 x 2304 takes seconds
        return create_sae(args.d, cfg, options).to(dtype)


def saelab_step(args, dtype, architecture="topk", sparse_kernels=True):
    cfg = SAEConfig(architecture=architecture, d_sae=args.n, k=args.k, input_norm="none")
    sae = new_sae(args, dtype, cfg, {"aux": AuxConfig(), "topk": TopKConfig()})
    if architecture == "jumprelu":  # thresholds at the (1 - k/n) quantile of z: L0 ~ k, as after training
        with torch.no_grad():
            z = sae.encode_pre(batch_for(args, dtype)[:512]).float()
            sae.log_threshold.fill_(math.log(float(z.quantile(1 - args.k / args.n))))
    optimizer = adam(sae.parameters())
    dead = torch.zeros(args.n, dtype=torch.bool, device=args.device)
    ctx = StepContext(dead=dead, sparse_kernels=sparse_kernels)
    cast = torch.bfloat16 if args.precision == "bf16" else None
    return lambda x: train_step(sae, optimizer, x, ctx, autocast=cast)


def floor_step(args, dtype):
    W_enc = torch.nn.Parameter(unit_rows(args.n, args.d, dtype, args.device).T)
    b_enc = torch.nn.Parameter(torch.zeros(args.n, dtype=dtype, device=args.device))
    W_dec = torch.nn.Parameter(unit_rows(args.n, args.d, dtype, args.device))
    b_dec = torch.nn.Parameter(torch.zeros(args.d, dtype=dtype, device=args.device))
    params = [W_enc, b_enc, W_dec, b_dec]
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer = adam(params)

    def step(x):
        with torch.no_grad(), autocast(args):
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
    """Median seconds per step of each candidate, alternating candidates every round (after one warm-up each).
    On CUDA every step is timed to a synchronize, so that a step's queued kernels count towards it."""
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    for step in steps.values():
        step(x)
    sync()
    times = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            step(x)
            sync()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def peak_rss_mb() -> float:
    """This process's peak resident set (MB): VmHWM, which exec resets (ru_maxrss would carry the parent's)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def sizes_argv(args) -> list[str]:
    return [
        "--n", str(args.n), "--d", str(args.d), "--k", str(args.k), "--batch", str(args.batch),
        "--dtype", args.dtype, "--precision", args.precision, "--device", args.device,
    ]


def peak_memory_mb(name: str, args, x: torch.Tensor) -> float:
    """Peak memory (MB) of building `name` alone and running two steps on x: on CUDA the allocator's peak in this
    process (x included); on CPU the peak RSS of a child process that does the same."""
    if x.is_cuda:
        gc.collect()  # the previous candidates' optimisers and closures
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        step = CANDIDATES[name](args, x.dtype)
        step(x), step(x)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20
    out = subprocess.run(
        [sys.executable, __file__, *sizes_argv(args), "--memory-child", name], capture_output=True, text=True, check=True
    )
    return float(out.stdout.strip().splitlines()[-1])


def batch_for(args, dtype) -> torch.Tensor:
    generator = torch.Generator(args.device).manual_seed(0)
    return torch.randn(args.batch, args.d, generator=generator, device=args.device).to(dtype)


def measure(args, names: list[str]) -> tuple[dict[str, float], dict[str, float]]:
    """Median seconds per step of each candidate in `names`, timed together, and each one's peak memory in MB
    (measured first, one candidate at a time; {} with --no-memory)."""
    dtype = DTYPES[args.dtype]
    x = batch_for(args, dtype)
    memory = {} if args.no_memory else {name: peak_memory_mb(name, args, x) for name in names}
    gc.collect()
    if x.is_cuda:
        torch.cuda.empty_cache()
    torch.manual_seed(0)
    steps = {name: CANDIDATES[name](args, dtype) for name in names}
    return interleaved(steps, x, args.rounds), memory


def where(args) -> str:
    if torch.device(args.device).type == "cuda":
        return torch.cuda.get_device_name(args.device)
    return f"{torch.get_num_threads()} threads"


def main_table(args) -> None:
    names = [n for n in CANDIDATES if available(n)]
    seconds, memory = measure(args, names)
    cuda = torch.device(args.device).type == "cuda"
    unit, per_second = ("ms", 1000) if cuda else ("seconds", 1)
    print(
        f"\nn={args.n} d_in={args.d} k={args.k} batch={args.batch} {args.dtype}, precision {args.precision}, "
        f"{where(args)}, median of {args.rounds} interleaved rounds\n"
    )
    print(f"| step | {unit} | saelab is faster by | vs floor | {'peak CUDA memory' if cuda else 'peak RSS'} (MB) |")
    print("|---|---|---|---|---|")
    for name in names:
        speedup = seconds[name] / seconds["saelab"]
        mem = f"{memory[name]:,.0f}" if memory else "-"
        print(
            f"| {name} | {seconds[name] * per_second:.3f} | {speedup:.2f}x | {seconds[name] / seconds['floor']:.2f}x "
            f"| {mem} |"
        )


def grid_points(scale: int) -> list[dict]:
    """Every point of GRID with d_in, n and batch divided by `scale`, ordered: the target point, then by how many
    settings differ from it, cheapest (d_in * n * batch, fp32 weighted as its ~8x slower matmul) first."""

    def order(point):
        cost = point["d"] * point["n"] * point["batch"] * (1 if point["precision"] == "bf16" else 8)
        return sum(point[axis] != TARGET[axis] for axis in GRID), cost

    points = sorted((dict(zip(GRID, values)) for values in itertools.product(*GRID.values())), key=order)
    scaled = []
    for point in points:
        n = max(1, point["n"] // scale)
        scaled.append({**point, "d": max(1, point["d"] // scale), "n": n, "batch": max(1, point["batch"] // scale),
                       "k": min(point["k"], n)})
    return scaled


def grid_table(args) -> None:
    names = [n for n in GRID_CANDIDATES if available(n)]
    points = grid_points(args.scale)
    rows = []
    start = time.perf_counter()
    for point in points:
        if rows and time.perf_counter() - start > args.budget:
            break
        sizes = argparse.Namespace(**{**vars(args), **point})
        seconds, memory = measure(sizes, names)
        rows.append((point, seconds, memory))
        print(
            f"grid point {len(rows)}/{len(points)} done at {time.perf_counter() - start:.0f} s: {describe(point)}",
            file=sys.stderr, flush=True,
        )
    scaled = f", every size divided by {args.scale}" if args.scale > 1 else ""
    print(
        f"\nGrid{scaled}: ms per step (median of {args.rounds} interleaved rounds), {args.dtype} weights, "
        f"{where(args)}\n"
    )
    print("| d_in | n | k | batch | precision | " + " | ".join(f"{name} (ms)" for name in names)
          + " | saelab / sparsify | saelab / floor | " + " | ".join(f"peak MB {name}" for name in names) + " |")
    print("|" + "---|" * (5 + 2 * len(names) + 2))
    for point, seconds, memory in rows:
        cells = [str(point[axis]) for axis in GRID]
        cells += [f"{1000 * seconds[name]:.2f}" for name in names]
        cells.append(f"{seconds['saelab'] / seconds['sparsify']:.2f}" if "sparsify" in seconds else "-")
        cells.append(f"{seconds['saelab'] / seconds['floor']:.2f}")
        cells += [f"{memory[name]:,.0f}" if memory else "-" for name in names]
        print("| " + " | ".join(cells) + " |")
    if len(rows) < len(points):
        print(f"\n{len(points) - len(rows)} of {len(points)} grid points not run: the --budget of {args.budget:.0f} s "
              "was spent.")
    print_targets(*rows[0], scaled)


def print_targets(point: dict, seconds: dict[str, float], memory: dict[str, float], scaled: str) -> None:
    """The issue's targets at the target point (rows[0] of the grid)."""
    print(f"\nTargets at {describe(point)}{scaled}:")
    over_floor = seconds["saelab"] / seconds["floor"]
    if "sparsify" in seconds:
        speedup = seconds["sparsify"] / seconds["saelab"]
        print(f"- saelab >= {MIN_SPEEDUP_OVER_SPARSIFY}x faster than sparsify: {speedup:.2f}x, "
              f"{'met' if speedup >= MIN_SPEEDUP_OVER_SPARSIFY else 'NOT met'}")
    else:
        print("- saelab faster than sparsify: not checked, sparsify is not installed (pip install eai-sparsify)")
    print(f"- saelab <= {MAX_OVER_FLOOR}x the floor: {over_floor:.2f}x, {'met' if over_floor <= MAX_OVER_FLOOR else 'NOT met'}")
    if memory and "sparsify" in memory:
        saelab_mb, sparsify_mb = memory["saelab"], memory["sparsify"]
        print(f"- saelab peak memory <= sparsify's: {saelab_mb:,.0f} MB vs {sparsify_mb:,.0f} MB, "
              f"{'met' if saelab_mb <= sparsify_mb else 'NOT met'}")
    else:
        print("- saelab peak memory <= sparsify's: not checked (no sparsify, or --no-memory)")


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
    sae = new_sae(args, dtype, SAEConfig(architecture="relu", d_sae=args.n, input_norm="none"))
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
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="parameter (master weight) dtype")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32", help="bf16: forward under bf16 autocast")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    parser.add_argument("--grid", action="store_true", help="the issue-15 grid of sizes and its targets")
    parser.add_argument("--scale", type=int, default=1, help="--grid: divide d_in, n and the batch by this")
    parser.add_argument("--budget", type=float, default=180.0, help="--grid: start no new point after this many s")
    parser.add_argument("--variants", action="store_true", help="BatchTopK / choice: sparse vs dense backward")
    parser.add_argument("--crossover", action="store_true", help="sparse vs dense backward across densities")
    parser.add_argument("--inference", action="store_true", help="ReLU-L1 sae(x): CSR decode vs dense matmul")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    try:
        check_device(args.device)
    except SaelabError as exc:
        parser.error(str(exc))
    if args.memory_child:
        dtype = DTYPES[args.dtype]
        step = CANDIDATES[args.memory_child](args, dtype)
        x = batch_for(args, dtype)
        step(x), step(x)
        print(peak_rss_mb())
        return
    gpu = f", {torch.cuda.get_device_name(args.device)}" if torch.device(args.device).type == "cuda" else ""
    print(
        f"# bench_step.py, {datetime.date.today()}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs{gpu}, torch {torch.__version__}"
    )
    if args.grid:
        grid_table(args)
    elif args.variants:
        variants_table(args)
    elif args.crossover:
        crossover_table(args)
    elif args.inference:
        inference_table(args)
    else:
        main_table(args)


if __name__ == "__main__":
    main()
