"""Do the defaults train at every run length? Each architecture, from its defaults plus --target-l0, on a planted
dictionary (known answer), trained for 10^3 and for 10^5 steps with the trainer's schedule (saelab.synthetic.
train_planted: default learning rate, 20 warmup steps, linear decay over the last 20%).

    python scripts/bench_run_length.py [--steps 1000 100000] [--architectures relu jumprelu threshold topk]

Prints, per architecture and run length: held-out L0 (target 3), MMCS with the true dictionary, FVU and the
fraction of latents that never fire on 8192 held-out tokens. Single-threaded (tiny matmuls).
"""

from __future__ import annotations

import argparse
import datetime
import time

import torch

from saelab.config import SAEConfig
from saelab.sae import create_sae
from saelab.synthetic import PlantedDictionary, mmcs, train_planted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, nargs="+", default=[1000, 100_000])
    parser.add_argument("--architectures", nargs="+", default=["relu", "jumprelu", "threshold", "topafa", "topk"])
    parser.add_argument("--batch", type=int, default=256)
    args = parser.parse_args()
    d_in, n_features, true_l0, d_sae = 32, 96, 3, 192
    print(f"{datetime.date.today()}: planted d_in {d_in}, {n_features} features, L0 {true_l0}, d_sae {d_sae}, "
          f"batch {args.batch}\n")
    print("| architecture | steps | L0 | MMCS | FVU | never fire | seconds |")
    print("|---|---|---|---|---|---|---|")
    for name in args.architectures:
        for steps in args.steps:
            data = PlantedDictionary(d_in, n_features, true_l0 / n_features, seed=0)
            torch.manual_seed(100)
            sae = create_sae(d_in, SAEConfig(architecture=name, d_sae=d_sae, target_l0=true_l0))
            started = time.perf_counter()
            train_planted(sae, data, steps, batch=args.batch)
            seconds = time.perf_counter() - started
            with torch.no_grad():
                x = data.sample(8192)
                x_hat, code = sae.reconstruct(x)
            fvu = float((x - x_hat).pow(2).sum() / (x - x.mean(dim=0)).pow(2).sum())
            never = float((code.firing_counts() == 0).float().mean())
            print(f"| {name} | {steps:,} | {code.l0():.2f} | {mmcs(sae.W_dec, data.dictionary):.3f} | {fvu:.3f} | "
                  f"{never:.3f} | {seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
