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
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from saelab.errors import SaelabError

T = TypeVar("T")


def option(default: Any, help: str, **kwargs: Any) -> Any:
    """A dataclass field with CLI help text. Lists get a fresh copy per instance."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **kwargs})
    return field(default=default, metadata={"help": help, **kwargs})


@dataclass
class ModelConfig:
    model: str = option(
        "smollm2-135m",
        "Model to load: 'smollm2-135m' (embedded default), 'minilm-l6', 'tiny-native', "
        "a local HF model directory, or an HF hub id (needs internet or a local HF cache).",
    )
    device: str = option("cpu", "Torch device for the model, e.g. 'cpu' or 'cuda'.")
    model_dtype: str = option("float32", "Model weights dtype: float32, bfloat16 or float16.")


@dataclass
class DataConfig:
    corpus: str = option(
        "embedded",
        "Text source: 'embedded' (KJV + Python docs, shipped by installed packages), 'kjv', "
        "'python-docs', a local .txt/.jsonl/.json/.csv/.parquet file or folder, or an HF dataset name.",
    )
    context_length: int = option(128, "Tokens per context; each context starts with BOS.")
    seed: int = option(0, "Seed for document shuffling (and anything else random).")
    text_column: str = option("text", "Column holding the text in jsonl/csv/parquet/HF datasets.")
    split: str = option("train", "Dataset split to read (HF datasets and local files).")


@dataclass
class HarvestConfig:
    hooks: list[str] = option(
        ["blocks.15.hook_resid_pre"],
        "Hook names to harvest in one forward pass, e.g. blocks.6.hook_resid_post, blocks.6.hook_mlp_out, "
        "blocks.6.hook_attn_out, blocks.6.attn.hook_z (flattened to n_heads*d_head). "
        "`saelab hooks --model M` lists them.",
    )
    batch_contexts: int = option(16, "Contexts per model forward pass.")
    with_grads: bool = option(
        False, "Also store d(sum of next-token cross-entropy)/d(activation) per token (for g-SAE)."
    )
    include_special: bool = option(
        False, "Keep BOS/separator/padding positions (excluded by default, as their activations are outliers)."
    )


@dataclass
class CacheConfig:
    out: str = option("runs/cache", "Output folder for shards and manifest.json.")
    n_tokens: int = option(200_000, "Tokens to run through the model (contexts x context_length, rounded up).")
    storage_dtype: str = option("float32", "On-disk activation dtype: float32, bfloat16 or float16.")
    shard_tokens: int = option(
        65_536, "Tokens per shard (rounded to whole contexts); the unit of resumption (150 MB at d=576 fp32)."
    )
    overwrite: bool = option(False, "Delete an existing cache in --out that was built with other settings.")


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
            help_text = f"{f.metadata.get('help', '')} (default: {default})"
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
