"""Dataclass configs: the single source of every option.

Each CLI subcommand's flags, the config files it reads (`--config file.yaml|json`) and the config it
saves beside its outputs all come from the dataclasses below. A command's config is a dataclass whose
fields are *sections* (themselves dataclasses); flags are the section fields' names, which are unique
within a command. Field help text lives in `metadata["help"]`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from saelab.devices import check_device
from saelab.errors import SaelabError

T = TypeVar("T")


def option(default: Any, help: str | Callable[[], str], **checks: Any) -> Any:
    """A dataclass field with CLI help text (or a function returning it, read when the help is shown) and the
    checks its values must pass (see `Section`):
    choices=(...), min= / max= (inclusive), above= (exclusive), check=callable raising SaelabError. For a list
    option they apply to every element. Lists get a fresh copy per instance."""
    unknown = set(checks) - _CHECKS
    if unknown:
        raise TypeError(f"unknown option checks {sorted(unknown)}")
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **checks})
    return field(default=default, metadata={"help": help, **checks})


_CHECKS = {"choices", "min", "max", "above", "check"}


def help_of(f: dataclasses.Field) -> str:
    """A config field's help text."""
    text = f.metadata.get("help", "")
    return text() if callable(text) else text


def _registry():
    """saelab.sae.registry, imported when first needed (it imports the SAE variants, which import this module)."""
    from saelab.sae import registry

    return registry


def check_folder(value: str) -> None:
    """An output folder option: refuse a path that names an existing file."""
    if value and Path(value).exists() and not Path(value).is_dir():
        raise SaelabError(f"{value} is a file, not a folder; choose a folder path for the output.")


def _checked_value(name: str, tp: Any, value: Any, checks: dict[str, Any]) -> Any:
    """`value` of option `name` converted to `tp` (int -> float only) and checked; a SaelabError otherwise."""
    flag = _flag(name)
    if typing.get_origin(tp) is list:
        if not isinstance(value, list | tuple):
            raise SaelabError(f"{flag} takes a list of values (in a config file: [a, b]); got {value!r}.")
        return [_checked_value(name, typing.get_args(tp)[0], item, checks) for item in value]
    if tp is bool:
        if not isinstance(value, bool):
            raise SaelabError(f"{flag} is true or false; got {value!r}.")
    elif tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SaelabError(f"{flag} takes a whole number; got {value!r}.")
    elif tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise SaelabError(f"{flag} takes a finite number; got {value!r}.")
        value = float(value)
    elif tp is str and not isinstance(value, str):
        raise SaelabError(f"{flag} takes text; got {value!r}.")
    if "choices" in checks and value not in checks["choices"]:
        raise SaelabError(f"{flag} is one of {', '.join(map(str, checks['choices']))}; got {value!r}.")
    if "min" in checks and value < checks["min"]:
        raise SaelabError(f"{flag} must be at least {checks['min']}; got {value!r}.")
    if "max" in checks and value > checks["max"]:
        raise SaelabError(f"{flag} must be at most {checks['max']}; got {value!r}.")
    if "above" in checks and not value > checks["above"]:
        raise SaelabError(f"{flag} must be greater than {checks['above']}; got {value!r}.")
    if "check" in checks:
        checks["check"](value)
    return value


class Section:
    """Base of every config section: each field is converted and checked (type, then its option checks) when
    the section is built, from flags, a config file or Python, so a bad value fails with one sentence before any
    model loads."""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            checks = {k: v for k, v in f.metadata.items() if k in _CHECKS}
            value = _checked_value(f.name, _unwrap_optional(hints[f.name]), getattr(self, f.name), checks)
            setattr(self, f.name, value)


@dataclass
class ModelConfig(Section):
    model: str = option(
        "smollm2-135m",
        "Model to load: 'smollm2-135m' (embedded default), 'minilm-l6', 'tiny-native', "
        "a local HF model directory, or an HF hub id (needs internet or a local HF cache).",
    )
    device: str = option(
        "cpu", "Torch device for the model (and, in `saelab train`, the SAEs): 'cpu', 'cuda', 'cuda:N' or 'mps'.",
        check=check_device,
    )
    model_dtype: str = option(
        "float32", "Model weights dtype: float32, bfloat16 or float16.", choices=("float32", "bfloat16", "float16")
    )


@dataclass
class DataConfig(Section):
    corpus: str = option(
        "embedded",
        "Text source: 'embedded' (KJV + Python docs, shipped by installed packages), 'kjv', "
        "'python-docs', a local .txt/.jsonl/.json/.csv/.parquet file or folder, or an HF dataset name.",
    )
    context_length: int = option(128, "Tokens per context; each context starts with BOS.", min=2)
    seed: int = option(0, "Seed for document shuffling (and anything else random).")
    text_column: str = option("text", "Column holding the text in jsonl/csv/parquet/HF datasets.")
    split: str = option("train", "Dataset split to read (HF datasets and local files).")


@dataclass
class HarvestConfig(Section):
    hooks: list[str] = option(
        ["blocks.15.hook_resid_pre"],
        "Hook names to harvest in one forward pass, e.g. blocks.6.hook_resid_post, blocks.6.hook_mlp_out, "
        "blocks.6.hook_attn_out, blocks.6.attn.hook_z (flattened to n_heads*d_head). "
        "`saelab hooks --model M` lists them.",
    )
    batch_contexts: int = option(16, "Contexts per model forward pass.", min=1)
    with_grads: bool = option(
        False, "Also store d(sum of next-token cross-entropy)/d(activation) per token (for g-SAE)."
    )
    include_special: bool = option(
        False, "Keep BOS/separator/padding positions (excluded by default, as their activations are outliers)."
    )


@dataclass
class CacheConfig(Section):
    out: str = option("runs/cache", "Output folder for shards and manifest.json.", check=check_folder)
    n_tokens: int = option(200_000, "Tokens to run through the model (contexts x context_length, rounded up).", min=1)
    storage_dtype: str = option(
        "float32", "On-disk activation dtype: float32, bfloat16 or float16.", choices=("float32", "bfloat16", "float16")
    )
    shard_tokens: int = option(
        65_536, "Tokens per shard (rounded to whole contexts); the unit of resumption (150 MB at d=576 fp32).", min=1,
    )
    overwrite: bool = option(
        False,
        "Delete a cache in --out that was built with other settings or whose manifest is unreadable; in one built "
        "with these settings, harvest only missing, truncated or corrupt shards again.",
    )


@dataclass
class CacheCommand:
    """`saelab cache`: harvest activations from a model over a corpus into an on-disk cache."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    harvest: HarvestConfig = field(default_factory=HarvestConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)


# --- dataclass <-> argparse / dict plumbing -------------------------------------------------------


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _unwrap_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0]
    return tp


def _sections(command_cls: type) -> list[tuple[str, type]]:
    hints = typing.get_type_hints(command_cls)
    return [(f.name, hints[f.name]) for f in dataclasses.fields(command_cls)]


def add_arguments(parser: argparse.ArgumentParser, command_cls: type) -> None:
    """Add one flag per field of every section of `command_cls`, plus `--config FILE`.

    Defaults are `argparse.SUPPRESS`, so `from_args` can tell which flags the user actually gave
    (those override the config file, which overrides the dataclass defaults).
    """
    parser.add_argument("--config", help="YAML or JSON file with a section per group (flags override it).")
    seen: dict[str, str] = {}
    defaults = command_cls()
    for section, section_cls in _sections(command_cls):
        group = parser.add_argument_group(section)
        hints = typing.get_type_hints(section_cls)
        for f in dataclasses.fields(section_cls):
            if f.name in seen:
                raise AssertionError(f"flag {f.name} defined in both {seen[f.name]} and {section}")
            seen[f.name] = section
            tp = _unwrap_optional(hints[f.name])
            default = getattr(getattr(defaults, section), f.name)
            help_text = f"{help_of(f)} (default: {default})"
            if tp is bool:
                group.add_argument(
                    _flag(f.name), action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text
                )
            elif typing.get_origin(tp) is list:
                group.add_argument(
                    _flag(f.name), nargs="+", type=typing.get_args(tp)[0], default=argparse.SUPPRESS, help=help_text
                )
            else:
                group.add_argument(_flag(f.name), type=tp, default=argparse.SUPPRESS, help=help_text)


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML or JSON config file into a dict of sections."""
    path = Path(path)
    if not path.is_file():
        raise SaelabError(f"Config file {path} does not exist. Pass an existing .yaml or .json file to --config.")
    try:
        text = path.read_text()
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise SaelabError(f"Config file {path} could not be parsed ({exc}). Fix the syntax and retry.") from exc
    if not isinstance(data, dict):
        raise SaelabError(f"Config file {path} must hold a mapping of sections (e.g. 'model:', 'data:').")
    return data


def from_dict(command_cls: type[T], data: dict[str, Any]) -> T:
    """Build a command config from nested section dicts, rejecting unknown sections and keys."""
    sections = dict(_sections(command_cls))
    kwargs = {}
    for section, values in data.items():
        if section not in sections:
            raise SaelabError(f"Unknown config section '{section}'. Known sections: {', '.join(sections)}.")
        if values is not None and not isinstance(values, dict):
            raise SaelabError(f"Config section '{section}' must map option names to values; got {values!r}.")
        section_cls = sections[section]
        known = {f.name for f in dataclasses.fields(section_cls)}
        unknown = set(values or {}) - known
        if unknown:
            raise SaelabError(
                f"Unknown option(s) {sorted(unknown)} in config section '{section}'. "
                f"Known options: {', '.join(sorted(known))}."
            )
        kwargs[section] = section_cls(**(values or {}))
    return command_cls(**kwargs)


def from_args(command_cls: type[T], args: argparse.Namespace) -> T:
    """Merge dataclass defaults <- config file <- explicitly given flags."""
    data: dict[str, dict[str, Any]] = {}
    if getattr(args, "config", None):
        data = {k: dict(v or {}) for k, v in load_config_file(args.config).items()}
    given = vars(args)
    for section, section_cls in _sections(command_cls):
        for f in dataclasses.fields(section_cls):
            if f.name in given:
                data.setdefault(section, {})[f.name] = given[f.name]
    return from_dict(command_cls, data)


def to_dict(config: Any) -> dict[str, Any]:
    """The nested-dict form written beside outputs; `from_dict` reads it back."""
    return dataclasses.asdict(config)


# --- SAEs and training -----------------------------------------------------------------------------
# An SAE's cfg.json holds `sae` plus the sections its architecture declares (SAE.sections), so a saved
# SAE records exactly the options that shaped it.


@dataclass
class SAEConfig(Section):
    architecture: str = option("topk", lambda: _registry().architecture_help(), check=lambda v: _registry().sae_class(v))
    expansion: int = option(16, "d_sae = expansion x d_in, unless --d-sae is given.", min=1)
    d_sae: int = option(0, "Number of latents; 0 means expansion x d_in.", min=0)
    target_l0: float = option(
        32.0,
        "Active latents per token that every architecture trains toward: the top-k family's k; for relu, jumprelu, "
        "threshold and topafa the target of a controller on their sparsity coefficient (when that is left at 0).",
        above=0,
    )
    k: int = option(
        0, "Top-k family (topk, batchtopk, abstopk, gsae, choice): active latents per token; 0 means --target-l0.",
        min=0,
    )
    l0_control_rate: float = option(
        0.05, "Step of the log sparsity coefficient per training step at the largest L0 error (controller variants).",
        above=0,
    )
    pre_enc_bias: bool = option(True, "Subtract b_dec from the input before encoding (SAELens apply_b_dec_to_input).")
    input_norm: str = option(
        "constant",
        "Input normalisation: none; constant (scale so E||x|| = sqrt(d_in), folded into the saved weights); "
        "layernorm (per token, undone after decoding; stored with the SAE).", choices=("none", "constant", "layernorm"),
    )
    mse_reduction: str = option(
        "sum", "Reconstruction loss over d_in: sum (SAELens, Anthropic) or mean (OpenAI, BatchTopK).",
        choices=("sum", "mean"),
    )


@dataclass
class TrainConfig(Section):
    cache: str = option(
        "runs/cache",
        "Activation cache to train from; built first from --model/--corpus/--hooks if it does not exist (resumable). "
        "'none' harvests live with a shuffle buffer instead (nothing written; resuming replays the harvest).",
    )
    cache_tokens: int = option(500_000, "Tokens to harvest when building the cache (training loops over it).", min=1)
    out: str = option(
        "runs/sae", "Output folder: one subfolder per trained SAE, plus logs and checkpoints.", check=check_folder
    )
    train_tokens: int = option(1_000_000, "Tokens to train on (per SAE).", min=1)
    batch_size: int = option(4096, "Tokens per optimiser step.", min=1)
    lr: float = option(
        0.0, "Adam learning rate; 0 means the variant's default (top-k family: 5e-4 * (d_sae / 2^14)^-0.5).", min=0
    )
    init_tokens: int = option(65_536, "Tokens sampled before training for the input scale and the b_dec init.", min=1)
    decoder_refit_tokens: int = option(
        131_072,
        "After training, refit the decoder by least squares to the frozen codes on this many sampled tokens, for the "
        "variants whose penalty shrinks their codes (relu, threshold); 0 turns it off.",
        min=0,
    )
    adam_beta1: float = option(0.9, "Adam beta1.", min=0, max=0.9999)
    adam_beta2: float = option(0.999, "Adam beta2.", min=0, max=0.99999)
    lr_warmup_steps: int = option(20, "Linear learning-rate warmup steps.", min=0)
    lr_decay_fraction: float = option(
        0.2, "Decay the learning rate linearly to 0 over this final fraction of steps.", min=0, max=1
    )
    grad_clip: float = option(1.0, "Clip the gradient norm to this (0 disables).", min=0)
    precision: str = option(
        "auto",
        "SAE training precision: bf16 (bfloat16 autocast for the encoder matmul; float32 weights, Adam state, "
        "decoder and losses), fp32, or auto (bf16 on CUDA and on CPUs with bf16 units, AVX512-BF16 or AMX; fp32 "
        "elsewhere).",
        choices=("auto", "bf16", "fp32"),
    )
    buffer_tokens: int = option(262_144, "Shuffle-buffer size for live harvesting (tokens).", min=1)
    log_every: int = option(50, "Log metrics (JSONL) every N steps.", min=1)
    checkpoint_every: int = option(500, "Write a resumable checkpoint every N steps.", min=1)
    resume: bool = option(False, "Continue from the checkpoint in --out (same config), to the same result.")
    sweep: list[str] = option(
        [],
        "Train several SAEs from one activation stream: each entry is comma-separated overrides of the options "
        "above, e.g. 'k=16' 'k=64' 'architecture=jumprelu'. Empty trains one SAE per hook.",
    )
    wandb: bool = option(False, "Also log to Weights & Biases (set WANDB_MODE=offline to log locally).")
    distributed: bool = option(
        False,
        "Data-parallel training over the processes torchrun started (NCCL on CUDA, gloo on CPU): --batch-size stays "
        "the global batch, each rank trains on an equal slice of it, gradients, dead-latent counts and metrics are "
        "all-reduced, rank 0 writes. Implied when torchrun starts more than one process; needs torchrun.",
    )
    distribute_modules: bool = option(
        False,
        "Under torchrun, split the runs (hooks x sweep entries) over the ranks instead: each rank trains its runs on "
        "the full global batch, as a single process would, and writes their checkpoints and SAEs.",
    )


# --- dead-latent statistics ------------------------------------------------------------------------


@dataclass
class DeadConfig(Section):
    sae: str = option("", "Saved SAE folder from `saelab train` (it holds latent_history.safetensors); or --run.")
    out: str = option("", "Folder for dead_report.html and dead.json; empty: the --sae folder.", check=check_folder)
    dead_tokens: int = option(0, "Dead after this many tokens without firing; 0: the run's training threshold.", min=0)
    dense_threshold: float = option(
        0.1, "A latent firing on more than this fraction of tokens counts as dense.", above=0, max=1
    )
    density_fraction: float = option(
        0.2, "Final densities (dense / ultra-low) are measured over this last fraction of training.", above=0, max=1,
    )
    timeline_latents: int = option(
        300, "At most this many latents (evenly spread by death time) in the per-latent timeline.", min=0,
    )
    cache: str = option("", "Activation cache for the mean activation direction (optional; b_dec is always compared).")
    mean_tokens: int = option(65_536, "Tokens of --cache averaged for the mean activation.", min=1)


@dataclass
class DeadCommand:
    """`saelab dead`: dead-latent statistics and figures from a trained SAE's latent history."""

    dead: DeadConfig = field(default_factory=DeadConfig)


# --- evaluation ------------------------------------------------------------------------------------


@dataclass
class SAEModelConfig(ModelConfig):
    """The model section of commands that run SAEs in their model: by default the model the SAEs were trained on."""

    model: str = option(
        "",
        "Model to run the SAEs in (names as for `saelab cache`); empty: the model recorded in the SAEs' metadata. "
        "`saelab dashboard` also takes 'none': no logit effects (token strings from the metadata model's tokenizer).",
    )


@dataclass
class EvalConfig(Section):
    sae: list[str] = option(
        [],
        "SAEs to evaluate in one pass over the text (saelab, SAELens, sparsify, Gemma Scope params.npz, "
        "dictionary_learning ae.pt, or hf:owner/repo[/subfolder]; one model, any hooks).",
    )
    n_tokens: int = option(
        32_768,
        "Tokens of text to evaluate on (contexts x context_length, rounded up). A batch costs 3 model forwards per "
        "hook (clean, zero- and mean-ablated) plus 1 per SAE: on a 2-core CPU one SAE on SmolLM2 takes ~4 min for "
        "32k tokens. On a GPU use 1M (SAELens' scale).", min=1,
    )
    batch_contexts: int = option(8, "Contexts per model forward pass.", min=1)
    skip_contexts: int = option(
        -1,
        "Contexts of the text stream to skip before evaluating. -1: the SAEs' training contexts when their metadata "
        "records training on this --corpus/--seed/--context-length (held-out text), else 0 (with a note).", min=-1,
    )
    mean_tokens: int = option(
        16_384, "Tokens from the start of the evaluation text whose mean activation is the mean-ablation"
        " baseline (0: all).",
        min=1,
    )
    dense_threshold: float = option(
        0.1, "A latent firing on more than this fraction of tokens counts as dense.", above=0, max=1
    )
    skip_positions: int = option(
        0,
        "Leave positions below this unspliced and uncounted (all metrics, downstream included). The massive "
        "first-after-BOS tokens that used to make early positions dominate FVU are now handled by --outlier-norm.",
        min=0,
    )
    outlier_norm: float = option(
        3.0,
        "Leave tokens whose activation norm ||x|| exceeds this multiple of the median norm (median over the hook's "
        "first 2048 evaluated tokens, then fixed) out of the headline FVU, MSE, normalised MSE, cos and shrinkage; "
        "the JSON reports them under reconstruction.outliers (count, fraction, their own metrics) and every token "
        "under reconstruction.all_tokens. They stay spliced downstream and counted in L0. 0: keep every token. In "
        "SmolLM2-135M's blocks.15.hook_resid_pre ~4%% of first-after-BOS tokens reach 3.5-180x the median norm "
        "(ordinary tokens stay below 2.9x): 0.04%% of tokens holding ~75%% of the variance, so FVU over all tokens "
        "moved 2x between 16k and 32k tokens.", min=0,
    )
    bootstrap_resamples: int = option(
        1000,
        "Resamples of the evaluation contexts (with replacement) for each metric's bootstrap interval, the 2.5th to "
        "97.5th percentile of the resampled metric (<metric>_ci in the JSON, its half-width as +- in the table). "
        "0: no intervals.", min=0,
    )
    bootstrap_seed: int = option(0, "Seed of the bootstrap resampling.")
    downstream: bool = option(
        True, "Splice reconstructions into the model for CE loss recovered and KL (--no-downstream: no extra forwards)."
    )
    out: str = option(
        "", "JSON file to write; empty: eval.json in each SAE folder. With several SAEs it holds"
        " {'evaluations': [...]}."
    )


@dataclass
class EvalCommand:
    """`saelab eval`: reconstruction, sparsity and downstream metrics of SAEs on held-out text."""

    model: SAEModelConfig = field(default_factory=SAEModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        if self.eval.skip_positions >= self.data.context_length:
            raise SaelabError(
                f"--skip-positions {self.eval.skip_positions} leaves nothing of a {self.data.context_length}-token "
                "context to evaluate; use a value below --context-length."
            )


# --- dark matter -----------------------------------------------------------------------------------


@dataclass
class DarkMatterConfig(Section):
    sae: list[str] = option(
        [], "SAE folders to analyse in the same passes, all of one hook (any format `load_sae` reads)."
    )
    cache: str = option("runs/cache", "Activation cache holding the SAEs' hook; W* is fitted on its first tokens.")
    eval_cache: str = option(
        "", "Cache to evaluate on (held-out text); empty: the contexts of --cache after the fit tokens."
    )
    fit_tokens: int = option(
        150_000, "Tokens to fit the linear maps on (the paper's 150k). Without --eval-cache, --cache must hold "
        "--fit-tokens + --eval-tokens; with it, each is capped by its cache's size.", min=1,
    )
    eval_tokens: int = option(150_000, "Held-out tokens to evaluate on.", min=1)
    skip_positions: int = option(
        16,
        "Drop tokens at context positions below this (and keep them clean downstream): early positions carry "
        "outlier activations (attention sinks) that dominate squared errors. The paper drops < 200 of 1024-token "
        "contexts; 16 of our default 128 drops the worst and keeps 7/8 of the tokens.", min=0,
    )
    intercept: bool = option(False, "Fit the linear error as x W + b instead of x W (the paper uses no intercept).")
    rcond: float = option(
        1e-12,
        "Least-squares cutoff on the eigenvalues of X^T X relative to the largest (1e-12 = singular values of X "
        "below 1e-6 of the largest, the float32 resolution; the paper's lstsq on X uses rcond 1e-9).", above=0,
    )
    batch_tokens: int = option(8192, "Tokens per batch read from the cache.", min=1)
    downstream: bool = option(
        False,
        "Also measure next-token CE with x_hat, x_hat + linear error and x_hat + nonlinear error spliced into the "
        "model (loads it; runs 3 forwards per SAE on text after the cache's contexts).",
    )
    downstream_tokens: int = option(32_768, "Tokens of text for the downstream CE.", min=1)
    device: str = option("cpu", "Torch device for the SAEs, the least squares and the model.", check=check_device)
    out: str = option("runs/darkmatter", "Folder for darkmatter.json and darkmatter.html.", check=check_folder)


@dataclass
class DarkMatterCommand:
    """`saelab darkmatter`: linear vs nonlinear SAE error (Engels et al. 2024) over cached activations."""

    darkmatter: DarkMatterConfig = field(default_factory=DarkMatterConfig)


# --- feature dashboards ----------------------------------------------------------------------------


@dataclass
class DashboardConfig(Section):
    sae: str = option(
        "", "SAE to build the dashboard for (saelab, SAELens, sparsify, Gemma Scope, dictionary_learning, hf:...)."
    )
    cache: str = option("runs/cache", "Activation cache holding the SAE's hook; examples come from its tokens.")
    select: str = option(
        "first",
        "Which latents get pages: first (ids 0..N-1), random (N ids drawn with --seed), densest (the N that fire on "
        "the most scanned tokens, counted in a pre-pass that encodes those tokens once more, so the build takes up to "
        "twice as long), ids (the --features list) or token (the N that list --token among their top tokens, as the "
        "index shows them, most of their --top-k top activations on it first; found by the same kind of pre-pass). "
        "N is --n-features.",
        choices=("first", "random", "densest", "ids", "token"),
    )
    n_features: int = option(
        0, "How many latents --select picks (0: all of them; with --select token, all that have the token).", min=0
    )
    features: list[int] = option(
        [], "Latent ids for --select ids, e.g. 5789 12 (--features alone implies --select ids).", min=0
    )
    token: str = option(
        "", "The token for --select token, spelt as the tokenizer decodes it, leading space included, e.g. ' LORD'."
    )
    seed: int = option(0, "Seed of --select random and of the quantile examples' random draw.")
    n_tokens: int = option(0, "Tokens of the cache to scan for examples and densities (0: all of them).", min=0)
    top_k: int = option(20, "Top-activating examples shown per latent.", min=1)
    quantile_examples: int = option(5, "Examples per activation-quantile bin.", min=0)
    out: str = option(
        "", "Folder for the static site (index.html, feature.html, data/); empty: <sae>/dashboard.", check=check_folder
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.features and self.select == "first":
            self.select = "ids"  # --features alone, as before --select existed
        if self.select == "ids" and not self.features:
            raise SaelabError("--select ids needs the latent ids: add them with --features, e.g. --features 5789 12.")
        if self.features and self.select != "ids":
            raise SaelabError(
                f"--features lists latent ids for --select ids, but --select is {self.select}; drop --features or "
                "use --select ids."
            )
        if self.select == "token" and not self.token:
            raise SaelabError("--select token needs the token: add it with --token, e.g. --token ' LORD'.")
        if self.token and self.select != "token":
            raise SaelabError(
                f"--token is for --select token, but --select is {self.select}; drop --token or use --select token."
            )


@dataclass
class DashboardCommand:
    """`saelab dashboard`: a static, offline feature-dashboard site for one SAE."""

    model: SAEModelConfig = field(default_factory=SAEModelConfig)
    dashboard: DashboardConfig = field(default_factory=DashboardConfig)


# --- steering ----------------------------------------------------------------------------------------


@dataclass
class SteerConfig(Section):
    sae: str = option("", "SAE whose latents steer the model (any format `load_sae` reads).")
    feature: list[int] = option([], "Latent id(s) to steer with, e.g. 1234, or 1234 87 (all at once).", min=0)
    alpha: list[float] = option(
        [8.0],
        "Strength, in units of the latent's activation: add alpha * d_i (--mode add; negative subtracts), clamp the "
        "latents to alpha keeping the SAE error (clamp; 0 ablates), or keep alpha times the component along the "
        "directions (project; 0 removes it). Several values print a sweep table.",
    )
    mode: str = option("add", "add, clamp or project.", choices=("add", "clamp", "project"))
    prompt: str = option("In the beginning", "Prompt to complete (BOS is prepended).")
    positions: str = option("all", "Where to steer: all, prompt, generated, or a position p (p and later).")
    max_new_tokens: int = option(32, "Tokens to generate per completion.", min=1)
    temperature: float = option(0.0, "0: greedy decoding; above 0: sampling at this temperature (seeded).", min=0)
    n: int = option(1, "Completions per setting (differ only when sampling).", min=1)
    seed: int = option(0, "Sampling seed (the same for baseline and steered runs).")
    reference: str = option(
        "", "Text whose next-token loss is reported with and without steering; empty: the prompt."
    )


@dataclass
class SteerCommand:
    """`saelab steer`: complete a prompt with and without steering by SAE latents."""

    model: SAEModelConfig = field(default_factory=SAEModelConfig)
    steer: SteerConfig = field(default_factory=SteerConfig)


# --- labels and the live dashboard server ----------------------------------------------------------


@dataclass
class LabelConfig(Section):
    sae: str = option("", "SAE folder whose labels.json (beside sae.safetensors) holds the labels.")
    feature: list[int] = option(
        [], "Latent id(s) to label, show or --remove; none: list every label of the SAE.", min=0
    )
    label: str = option("", "A short name for the latent(s), one line, e.g. 'LORD in the KJV'.")
    notes: str = option("", "Free-form notes for the latent(s), shown on their pages and searched in the index.")
    remove: bool = option(False, "Remove the label and notes of the --feature latent(s).")

    def __post_init__(self) -> None:
        super().__post_init__()
        if (self.label or self.notes or self.remove) and not self.feature:
            raise SaelabError("Name the latent(s) to label with --feature, e.g. --feature 5789 --label 'LORD'.")
        if self.remove and (self.label or self.notes):
            raise SaelabError("--remove takes no --label or --notes; give one or the other.")


@dataclass
class LabelCommand:
    """`saelab label`: give latents labels and notes (a labels.json sidecar beside the SAE), or list them."""

    label: LabelConfig = field(default_factory=LabelConfig)


@dataclass
class ServeConfig(Section):
    sae: str = option("", "SAE folder to serve (the same folder `saelab dashboard --sae` took).")
    dashboard: str = option(
        "", "The static site `saelab dashboard` built for it; empty: <sae>/dashboard.", check=check_folder
    )
    host: str = option("127.0.0.1", "Address to listen on (127.0.0.1: this machine only).")
    port: int = option(8000, "Port to listen on (0: any free port).", min=0, max=65535)
    max_text_tokens: int = option(
        512, "Longest text (in tokens) the live activation and steering panels accept per request.", min=1
    )


@dataclass
class ServeCommand:
    """`saelab serve`: the dashboard of one SAE with live text activations, steering and label editing."""

    model: SAEModelConfig = field(default_factory=SAEModelConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
