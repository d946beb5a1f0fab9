"""The `saelab` command line. Each subcommand's flags come from its dataclass config (saelab.config)."""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
import threading
import typing
from collections.abc import Callable, Sequence
from typing import NamedTuple

from saelab.commands import CommandResult
from saelab.config import (
    CacheCommand,
    DarkMatterCommand,
    DashboardCommand,
    DeadCommand,
    EvalCommand,
    LabelCommand,
    ModelConfig,
    ServeCommand,
    SteerCommand,
    add_arguments,
    from_args,
)
from saelab.devices import idle_gpu_note
from saelab.errors import Interrupted, SaelabError
from saelab.train.command import TrainCommand


def _run(args: argparse.Namespace) -> None:
    """Every config-driven subcommand: saelab.commands.<name>.run, then print the result's lines."""
    command = importlib.import_module(f"saelab.commands.{args.command}")
    config = from_args(args.command_cls, args)
    note = idle_gpu_note([section.device for section in vars(config).values() if hasattr(section, "device")])
    if note:
        print(note, file=sys.stderr)
    result: CommandResult = command.run(config, progress=not args.quiet)
    lines = result.lines()
    if lines:  # the other ranks of a torchrun job report nothing
        print("\n".join(lines))


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


class _Subcommand(NamedTuple):
    """A subcommand whose flags come from its `config` dataclass; `handler(args)` runs it."""

    name: str
    config: type
    handler: Callable[[argparse.Namespace], None]
    help: str
    description: str

    def add_to(self, commands) -> argparse.ArgumentParser:
        """Its parser among `commands` (argparse subparsers): the config's flags plus --quiet (no progress bars)."""
        parser = commands.add_parser(self.name, help=self.help, description=self.description)
        add_arguments(parser, self.config)
        parser.add_argument("--quiet", action="store_true", help="No progress bars.")
        parser.set_defaults(run=self.handler, command_cls=self.config)
        return parser


SUBCOMMANDS = (
    _Subcommand(
        "cache",
        CacheCommand,
        _run,
        help="Harvest activations from a model over a corpus into an on-disk cache (resumable).",
        description="Harvest activations at one or more hooks into sharded safetensors with a manifest. "
        "Rerunning the same command resumes an interrupted build.",
    ),
    _Subcommand(
        "train",
        TrainCommand,
        _run,
        help="Train SAEs (TopK on the embedded default with no arguments).",
        description="Train one SAE per hook (or per --sweep entry) from an activation cache, building the cache "
        "first if it does not exist. Ctrl-C writes a checkpoint; --resume continues it to the same result.",
    ),
    _Subcommand(
        "dead",
        DeadCommand,
        _run,
        help="Dead-latent statistics of a trained SAE: when latents died, revivals, densities, dense/dead geometry.",
        description="Read the latent history `saelab train` saves beside each SAE and write dead_report.html (plotly "
        "figures) and dead.json: tokens since last firing, firing frequencies over training, which latents died "
        "and when, revivals after resampling or otherwise, dense / ultra-low densities and decoder geometry.",
    ),
    _Subcommand(
        "eval",
        EvalCommand,
        _run,
        help="Evaluate SAEs: reconstruction, sparsity, CE loss recovered and KL when spliced into the model.",
        description="Evaluate one or more SAEs (saelab or SAELens folders) in one pass over held-out text: FVU, MSE, "
        "cosine, shrinkage, L0, dead/dense latents, CE loss recovered (vs zero and mean ablation), delta LM loss "
        "and KL. Writes a JSON per SAE and prints a table.",
    ),
    _Subcommand(
        "darkmatter",
        DarkMatterCommand,
        _run,
        help="Split SAE errors into a part linear in the input and a nonlinear rest (Engels et al. 2024).",
        description="Fit the least-squares map W* from activations x to SAE errors e = x - x_hat on cached tokens, "
        "then report on held-out tokens: R2 of e from x W*, linear predictions of ||e||^2, ||x_hat||^2, ||x||^2 and "
        "||eps_NL||^2, the nonlinear FVU, whether the SAEs fail on the same tokens and (--downstream) the CE with "
        "x_hat plus the linear or the nonlinear error. Writes darkmatter.json and darkmatter.html.",
    ),
    _Subcommand(
        "dashboard",
        DashboardCommand,
        _run,
        help="Build a static, offline feature-dashboard site for an SAE (index table + one page per latent).",
        description="Scan an activation cache with the SAE and write a static site (no server, no internet): an "
        "index of all latents to sort and filter, and per-latent pages with top and quantile examples highlighted "
        "token by token, activation histograms, logit effects, decoder-cosine neighbours and (hook_z) attention-head "
        "attribution. Open index.html in a browser.",
    ),
    _Subcommand(
        "steer",
        SteerCommand,
        _run,
        help="Complete a prompt with and without steering by SAE latents (add, clamp or project out).",
        description="Generate completions of --prompt from the SAE's model, first clean, then with the latents' "
        "decoder directions added (--mode add), the latents clamped in the SAE basis keeping the SAE error (clamp) "
        "or the component along them rescaled (project), for each --alpha; also prints the next-token loss on "
        "--reference with and without steering. The Python API (saelab.steering) does more: several "
        "interventions, sweeps, feature lookup.",
    ),
    _Subcommand(
        "serve",
        ServeCommand,
        _run,
        help="Serve an SAE's dashboard with live panels: your own text, steering and labels, from the feature pages.",
        description="Load the SAE and its model once and serve the dashboard `saelab dashboard` built for it "
        "(<sae>/dashboard unless --dashboard). Every feature page gains a text box showing this latent's activation "
        "on each token of your text with the text's top latents, a steering panel (add / clamp / project at a "
        "strength, completions with and without it and the loss change) and a label editor. Ctrl-C stops.",
    ),
    _Subcommand(
        "label",
        LabelCommand,
        _run,
        help="Label latents (a name and notes kept in labels.json beside the SAE), or list the labels.",
        description="Give latents a one-line label and notes, kept in <sae>/labels.json. `saelab dashboard` shows "
        "them on the index and the feature pages and searches them; `saelab serve` shows and edits them live. "
        "With --feature only, print those latents' labels; with no --feature, list every label.",
    ),
)


def build_parser() -> argparse.ArgumentParser:
    """The `saelab` parser: one subparser per command, flags from its dataclass config."""
    parser = _Parser(prog="saelab", description="Sparse-autoencoder interpretability toolkit.")
    commands = parser.add_subparsers(dest="command", required=True)
    parsers = {sub.name: sub.add_to(commands) for sub in SUBCOMMANDS}
    parsers["dead"].add_argument("--run", dest="sae", default=argparse.SUPPRESS, help="The same as --sae.")

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


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one sentence (a SaelabError, exit status 2 in `main`), not usage + error."""

    def error(self, message: str) -> typing.NoReturn:
        raise SaelabError(f"{message[0].upper()}{message[1:]}. See `{self.prog} --help`.")


def _raise_interrupted(signum: int, frame) -> None:
    raise Interrupted(signum)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; SaelabError -> its sentence on stderr and exit status 2; Ctrl-C or SIGTERM -> a line
    on stderr and 128 + the signal number (training stops at a step boundary, see saelab.train.interrupt)."""
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_interrupted) if main_thread else None  # SIGTERM acts as Ctrl-C
    try:
        args = build_parser().parse_args(argv)
        args.run(args)
    except SaelabError as exc:
        print(f"saelab: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        message = getattr(exc, "message", "") or "interrupted. Finished work is kept; rerun the same command to resume."
        print(f"\nsaelab: {message}", file=sys.stderr)
        return 128 + getattr(exc, "signum", signal.SIGINT)
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
