"""Every architecture at one target L0 on SmolLM2, trained side by side on one cache and evaluated on held-out text.

    python scripts/bench_targets.py --target-l0 32 [--expansion 8] [--train-tokens 1000000] [--eval-tokens 16384]
                                    [--only architecture=relu ...]

One `saelab train` sweep (every SAE sees the same batches of runs/cache, built first if missing) with only
`--target-l0` and the architecture set, so each variant runs at its defaults; then one `saelab eval` pass over
held-out text for all of them (the contexts after the cache's). Prints a markdown table: held-out L0, FVU,
dead fraction (never fired on the eval tokens), CE recovered (zero ablation) and each SAE's final sparsity
coefficient. --only retrains a subset (topk always included, so the criterion's reference is measured in the
same sweep; the others' results do not depend on which variants share the sweep, up to rounding: TopK at target
16 gave FVU 0.254 in the 13-variant sweep and 0.255 in a 9-variant one). g-SAE is left out: it needs a cache with gradients (`--with-grads`) and is TopK at inference.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

ARCHITECTURES = [
    "architecture=topk", "architecture=batchtopk", "architecture=abstopk",
    "architecture=choice", "architecture=choice,choice_mode=feature", "architecture=topafa",
    "architecture=jumprelu", "architecture=relu",
    *(f"architecture=threshold,threshold_family={f}" for f in ("soft", "hard", "half", "lq", "cel0")),
]
COEFFICIENTS = {"relu": ("l1", "l1_coef"), "jumprelu": ("jumprelu", "threshold_scale"),
                "threshold": ("threshold", "threshold_lambda"), "topafa": ("afa", "afa_norm_scale")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target-l0", type=float, default=32)
    parser.add_argument("--expansion", type=int, default=8)
    parser.add_argument("--train-tokens", type=int, default=1_000_000)
    parser.add_argument("--eval-tokens", type=int, default=16_384)
    parser.add_argument("--cache", default="runs/cache")
    parser.add_argument("--out", default="")
    parser.add_argument("--only", nargs="+", default=[], metavar="ENTRY",
                        help="Train only these sweep entries (e.g. architecture=relu); topk is always kept, as the "
                             "reference of the FVU criterion.")
    args = parser.parse_args()
    entries = [e for e in ARCHITECTURES if not args.only or e in args.only or e == "architecture=topk"]
    out = Path(args.out or f"runs/targets-{args.target_l0:g}")
    saelab = [sys.executable, "-m", "saelab"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    if not (out / "metrics.jsonl").exists() or any(out.glob("checkpoint*.pt")) and not list(out.glob("*/sae.safetensors")):
        resume = ["--resume"] if (out / "checkpoint.pt").exists() else []
        subprocess.run([*saelab, "train", "--cache", args.cache, "--out", str(out), "--expansion", str(args.expansion),
                        "--train-tokens", str(args.train_tokens), "--target-l0", str(args.target_l0),
                        "--sweep", *entries, *resume], check=True, env=env)
    folders = sorted(str(f.parent) for f in out.glob("*/sae.safetensors"))
    report = out / "eval.json"
    subprocess.run([*saelab, "eval", "--sae", *folders, "--n-tokens", str(args.eval_tokens), "--out", str(report)],
                   check=True, env=env)
    print(f"\n{datetime.date.today()}, SmolLM2-135M, target L0 {args.target_l0:g}, {args.expansion}x, "
          f"{args.train_tokens} training tokens, {args.eval_tokens} held-out tokens\n")
    print("| SAE | L0 | FVU (95% CI) | dead | CE recovered (zero) | coefficient reached | L0 ±25% / dead ≤5% / FVU ≤1.5× TopK |")
    print("|---|---|---|---|---|---|---|")
    evaluations = json.loads(report.read_text())["evaluations"]
    topk_fvu = next(e["reconstruction"]["fvu"] for e in evaluations if Path(e["sae"]).name.endswith("=topk"))
    for result in evaluations:
        cfg = json.loads((Path(result["sae"]) / "cfg.json").read_text())
        arch = cfg["architecture"]
        name = Path(result["sae"]).name.split("__", 1)[-1].replace("architecture=", "")
        coefficient = ""
        if arch in COEFFICIENTS:
            section, option = COEFFICIENTS[arch]
            coefficient = f"{option} {cfg[section][option]:.3g}" if arch != "jumprelu" else "folded into theta"
        rec, sparsity, downstream = result["reconstruction"], result["sparsity"], result.get("downstream") or {}
        low, high = rec.get("fvu_ci", (float("nan"), float("nan")))
        verdicts = (abs(sparsity["l0"] / args.target_l0 - 1) <= 0.25, sparsity["dead_fraction"] <= 0.05,
                    rec["fvu"] <= 1.5 * topk_fvu)
        print(f"| {name} | {sparsity['l0']:.1f} | {rec['fvu']:.3f} ({low:.3f}–{high:.3f}) | "
              f"{sparsity['dead_fraction']:.3f} | {downstream.get('ce_recovered_zero', float('nan')):.3f} | "
              f"{coefficient} | {' / '.join('yes' if v else 'NO' for v in verdicts)} |")


if __name__ == "__main__":
    main()
