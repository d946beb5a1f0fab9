"""Training throughput of `saelab train` with 1 and with N processes (data parallel, torchrun, gloo or NCCL).

    python scripts/bench_distributed.py [--cache runs/cache-1m] [--d-sae 9216] [--k 32] [--batch-size 4096]
                                        [--steps 40] [--settings 1x2 2x1]

Each setting PxT runs `python -m torch.distributed.run --nproc_per_node P -m saelab train` with T threads per
process (OMP_NUM_THREADS) on the same cache, SAE and global batch, in a fresh --out. Throughput is read from the
run's own metrics.jsonl: tokens trained between the first and the last log step over the seconds between them,
so model loading, cache verification and the b_dec initialisation are not counted (reading batches from the
cache is). Prints a markdown table with the machine and its load average before and after.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch


def run_setting(args: argparse.Namespace, processes: int, threads: int, out: Path) -> dict:
    hook = next(iter(json.loads((Path(args.cache) / "manifest.json").read_text())["hooks"]))
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
        "-m", "saelab", "train", "--quiet", "--cache", args.cache, "--hooks", hook, "--out", str(out),
        "--architecture", "topk", "--d-sae", str(args.d_sae), "--k", str(args.k),
        "--batch-size", str(args.batch_size), "--train-tokens", str(args.steps * args.batch_size),
        "--log-every", str(args.log_every), "--checkpoint-every", str(10**9), "--init-tokens", str(args.init_tokens),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    first, last = records[1], records[-1]  # from the end of the first log interval (warm) to the last step
    tokens = last["tokens"] - first["tokens"]
    seconds = last["seconds"] - first["seconds"]
    return {"processes": processes, "threads": threads, "steps": (tokens // args.batch_size), "seconds": seconds,
            "tokens_per_s": tokens / seconds, "fvu": last["fvu"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", default="runs/cache-1m", help="Activation cache to train from (read only).")
    parser.add_argument("--d-sae", type=int, default=9216)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=4096, help="Global batch (split over the processes).")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--log-every", type=int, default=5)
    parser.add_argument("--init-tokens", type=int, default=16_384)
    parser.add_argument("--settings", nargs="+", default=["1x2", "2x1"],
                        help="PxT: P processes with T threads each, e.g. 1x2 2x1 1x1.")
    args = parser.parse_args()
    load_before = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, setting in enumerate(args.settings):
            processes, threads = (int(v) for v in setting.split("x"))
            rows.append(run_setting(args, processes, threads, Path(tmp) / f"run{i}"))
            print(f"{setting}: {rows[-1]['tokens_per_s']:,.0f} tokens/s", file=sys.stderr)
    load_after = os.getloadavg()
    base = rows[0]["tokens_per_s"]
    print(f"\n{datetime.date.today()} · {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}, CUDA {'yes' if torch.cuda.is_available() else 'no'} · load average "
          f"{load_before[0]:.2f} before, {load_after[0]:.2f} after")
    print(f"TopK d_in from {args.cache}, d_sae {args.d_sae}, k {args.k}, global batch {args.batch_size}\n")
    print("| processes x threads | steps timed | seconds | tokens/s | vs first row | FVU at the end |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['processes']} x {row['threads']} | {row['steps']} | {row['seconds']:.1f} | "
              f"{row['tokens_per_s']:,.0f} | {row['tokens_per_s'] / base:.2f}x | {row['fvu']:.4f} |")


if __name__ == "__main__":
    main()
