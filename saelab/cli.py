"""The `saelab` command line. Each subcommand's flags come from its dataclass config (saelab.config)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from saelab.config import CacheCommand, ModelConfig, TrainCommand, add_arguments, from_args
from saelab.errors import SaelabError


def _cache(args: argparse.Namespace) -> None:
    from saelab.activations.cache import build_cache

    config = from_args(CacheCommand, args)
    cache = build_cache(config, progress=not args.quiet)
    print(cache.summary())


def _train(args: argparse.Namespace) -> None:
    from saelab.train.trainer import train

    config = from_args(TrainCommand, args)
    for folder in train(config, progress=not args.quiet):
        print(f"saved SAE: {folder}")
    print(f"metrics: {config.train.out}/metrics.jsonl, curves: {config.train.out}/training_curves.html")


def _info(args: argparse.Namespace) -> None:
    from saelab.activations.cache import ActivationCache

    cache = ActivationCache(args.path, verify=args.verify, progress=True)
    print(cache.summary())
    if args.verify:
        print(f"  checksums   all {len(cache.manifest['shards'])} shards OK")


def _hooks(args: argparse.Namespace) -> None:
    from saelab.activations.source import ActivationSource
    from saelab.models import load_model

    model = load_model(args.model)
    names = [n for n in model.hook_dict if args.filter in n]
    if args.dims:
        source = ActivationSource(model, names)
        for name in names:
            print(f"{name}  d={source.dims[name]}")
    else:
        print("\n".join(names))


def build_parser() -> argparse.ArgumentParser:
    """The `saelab` parser: one subparser per command, flags from its dataclass config."""
    parser = argparse.ArgumentParser(prog="saelab", description="Sparse-autoencoder interpretability toolkit.")
    commands = parser.add_subparsers(dest="command", required=True)

    cache = commands.add_parser(
        "cache",
        help="Harvest activations from a model over a corpus into an on-disk cache (resumable).",
        description="Harvest activations at one or more hooks into sharded safetensors with a manifest. "
        "Rerunning the same command resumes an interrupted build.",
    )
    add_arguments(cache, CacheCommand)
    cache.add_argument("--quiet", action="store_true", help="No progress bar.")
    cache.set_defaults(run=_cache)

    train = commands.add_parser(
        "train",
        help="Train SAEs (TopK on the embedded default with no arguments).",
        description="Train one SAE per hook (or per --sweep entry) from an activation cache, building the cache "
        "first if it does not exist. Ctrl-C writes a checkpoint; --resume continues it to the same result.",
    )
    add_arguments(train, TrainCommand)
    train.add_argument("--quiet", action="store_true", help="No progress bars.")
    train.set_defaults(run=_train)

    info = commands.add_parser("info", help="Summarise an activation cache.", description="Summarise a cache folder.")
    info.add_argument("path", help="Cache folder (holds manifest.json).")
    info.add_argument("--verify", action="store_true", help="Also check every shard's checksum.")
    info.set_defaults(run=_info)

    hooks = commands.add_parser("hooks", help="List a model's hook names.", description="List a model's hook names.")
    hooks.add_argument("--model", default=ModelConfig.model, help="Model name or path (default: %(default)s).")
    hooks.add_argument("--filter", default="", help="Only names containing this text, e.g. 'blocks.3.'.")
    hooks.add_argument("--dims", action="store_true", help="Also print each hook's per-token width.")
    hooks.set_defaults(run=_hooks)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; SaelabError -> its sentence on stderr and exit status 2, Ctrl-C -> 130."""
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except SaelabError as exc:
        print(f"saelab: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nsaelab: interrupted. Finished work is kept; rerun the same command to resume.", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
