"""Read SAEs published by other libraries: sparsify folders, Gemma Scope params.npz, dictionary_learning ae.pt, and
`hf:` / SAELens `release:id` sources fetched through the Hugging Face hub cache. `saelab.sae.io.load_sae` (every
`--sae`) dispatches here.

Each loader returns the saelab SAE (float32, input_norm "none") whose encode and forward equal the original
library's, and records the hook and model where the source names them.

Formats: docs/formats.md, sections "sparsify", "Gemma Scope", "dictionary_learning", "Hub sources" and "Hooks and
models".
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import pickle
import re
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file

from saelab.config import SAEConfig
from saelab.errors import SaelabError
from saelab.sae.base import SAE
from saelab.sae.registry import sae_class

HUB_PREFIX = "hf:"
SAE_FILE_NAMES = ("cfg.json", "sae.safetensors", "sae_weights.safetensors", "params.npz", "ae.pt", "config.json")
SAELENS_CONVERTERS = (None, "sae_lens", "gemma_2", "dictionary_learning_1", "sparsify")
GEMMA_SCOPE_ARRAYS = ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")
GEMMA_SCOPE_SITES = {"res": "hook_resid_post", "mlp": "hook_mlp_out", "att": "attn.hook_z"}
DICTIONARY_LEARNING_TENSORS = {
    "AutoEncoder": {"encoder.weight", "encoder.bias", "decoder.weight", "bias"},
    "AutoEncoderTopK": {"encoder.weight", "encoder.bias", "decoder.weight", "b_dec", "k", "threshold"},
    "BatchTopKSAE": {"encoder.weight", "encoder.bias", "decoder.weight", "b_dec", "k", "threshold"},
    "MatryoshkaBatchTopKSAE": {"W_enc", "b_enc", "W_dec", "b_dec", "k", "threshold", "group_sizes"},
    "JumpReluAutoEncoder": {"W_enc", "b_enc", "W_dec", "b_dec", "threshold"},
    "GatedAutoEncoder": {"encoder.weight", "decoder.weight", "decoder_bias", "r_mag", "gate_bias", "mag_bias"},
}
NO_TOPK_RESCALE = {"topk": {"rescale_by_decoder_norm": False}}  # these libraries select by z, not z * ||d_i||


# -- building the saelab SAE ----------------------------------------------------------------------------------


def _need(tensors: dict[str, torch.Tensor], name: str, shape: tuple[int, ...], path: Path) -> torch.Tensor:
    """tensors[name] as float32 [shape]; a SaelabError naming `path` when it is missing or of another shape."""
    if name not in tensors:
        raise SaelabError(f"{path} has no '{name}' tensor, so it is not a complete SAE of its format.")
    if tuple(tensors[name].shape) != shape:
        raise SaelabError(f"'{name}' in {path} has shape {tuple(tensors[name].shape)}, but the SAE needs {shape}.")
    return tensors[name].float()


def _encoder_sizes(tensors: dict[str, torch.Tensor], name: str, path: Path, transposed: bool) -> tuple[int, int]:
    """(d_in, d_sae) from the 2-D encoder weight tensors[name]: [d_sae, d_in] when `transposed`, else [d_in, d_sae]."""
    weight = tensors.get(name)
    if weight is None or weight.ndim != 2:
        raise SaelabError(f"{path} has no 2-D '{name}' tensor, so it is not a complete SAE of its format.")
    rows, columns = weight.shape
    return (columns, rows) if transposed else (rows, columns)


def _saelab_named_weights(tensors: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """The four weights of a file that names them as saelab does: W_enc [d_in, d_sae], b_enc [d_sae],
    W_dec [d_sae, d_in], b_dec [d_in] (float32), the sizes read from W_enc."""
    d_in, d_sae = _encoder_sizes(tensors, "W_enc", path, transposed=False)
    return {
        "W_enc": _need(tensors, "W_enc", (d_in, d_sae), path),
        "b_enc": _need(tensors, "b_enc", (d_sae,), path),
        "W_dec": _need(tensors, "W_dec", (d_sae, d_in), path),
        "b_dec": _need(tensors, "b_dec", (d_in,), path),
    }


def _build_sae(architecture: str, tensors: dict[str, torch.Tensor], *, pre_enc_bias: bool, k: int | None = None,
               option_overrides: dict[str, dict[str, Any]] | None = None, metadata: dict[str, Any]) -> SAE:
    """The saelab `architecture` SAE holding `tensors` (W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in],
    b_dec [d_in] and the variant's own, e.g. log_threshold [d_sae]), input_norm "none", default options but
    `option_overrides` (section -> field -> value), the sparsity coefficient frozen."""
    d_in, d_sae = tensors["W_enc"].shape
    cls = sae_class(architecture)
    cfg = SAEConfig(architecture=architecture, d_sae=d_sae, k=k or SAEConfig.k, pre_enc_bias=pre_enc_bias,
                    input_norm="none")
    options = {section.name: section() for section in cls.sections}
    for name, changes in (option_overrides or {}).items():
        options[name] = dataclasses.replace(options[name], **changes)
    sae = cls(d_in, cfg, options, metadata)
    sae.freeze_sparsity()
    current = sae.state_dict()
    missing = set(tensors) - set(current)
    if missing:
        raise SaelabError(
            f"saelab's '{architecture}' SAE has no {sorted(missing)}; saelab.sae.published needs updating."
        )
    state = {**current, **tensors, "input_scale": torch.ones(())}
    sae.load_state_dict({name: value.to(current[name].dtype) for name, value in state.items()})
    return sae


def _log_threshold(threshold: torch.Tensor) -> torch.Tensor:
    """saelab jumprelu's log_threshold for a code ReLU(z) * 1[z > t]: log(max(t, 0)), -inf for t <= 0."""
    return threshold.clamp_min(0).log()


def _reason(exc: BaseException) -> str:
    """The first sentence of an exception's message (its type's name when it has none), to quote in one sentence."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return re.split(r"\.\s", text, maxsplit=1)[0].rstrip(".")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SaelabError(f"{path} is unreadable ({_reason(exc)}); download or save it again.") from exc


def _json_or_none(path: Path) -> Any:
    """The JSON in `path`, or None when it is missing or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


# -- sparsify ---------------------------------------------------------------------------------------------------


def is_sparsify_config(config: Any) -> bool:
    """Whether a cfg.json dict is sparsify's (k and d_in at the top, no saelab `architecture` / `sae` section)."""
    return (
        isinstance(config, dict)
        and {"k", "d_in"} <= config.keys()
        and not {"architecture", "sae"} & config.keys()
        and ("num_latents" in config or "expansion_factor" in config)
    )


def _sparsify_hook(name: str) -> str | None:
    """The TransformerLens hook of a sparsify hookpoint (its SAE folder's name): residual-stream layers only."""
    if name == "embed_tokens":
        return "hook_embed"
    match = re.fullmatch(r"(?:.*\.)?(?:layers|h)\.(\d+)", name)
    return f"blocks.{match.group(1)}.hook_resid_post" if match else None


def load_sparsify(folder: str | Path) -> SAE:
    """A sparsify SAE folder (cfg.json + sae.safetensors, docs/formats.md) as a saelab topk SAE (CPU)."""
    folder = Path(folder)
    config = _read_json(folder / "cfg.json")
    if not is_sparsify_config(config):
        raise SaelabError(f"{folder / 'cfg.json'} is not a sparsify config (it needs k, d_in and num_latents or "
                          "expansion_factor).")
    if config.get("transcode"):
        raise SaelabError(
            f"{folder} is a sparsify transcoder (it predicts another module's output); saelab loads SAEs."
        )
    if config.get("skip_connection"):
        raise SaelabError(f"The sparsify SAE in {folder} has a skip connection (W_skip), which saelab's SAEs lack.")
    if config.get("activation", "topk") != "topk":
        raise SaelabError(
            f"The sparsify SAE in {folder} uses activation '{config['activation']}'; saelab reads sparsify's topk."
        )
    path = folder / "sae.safetensors"
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise SaelabError(
            f"The sparsify weights {path} are unreadable ({_reason(exc)}); download or save them again."
        ) from exc
    d_in = int(config["d_in"])
    d_sae = int(config.get("num_latents") or d_in * int(config["expansion_factor"]))
    tensors = {
        "W_enc": _need(state, "encoder.weight", (d_sae, d_in), path).T.contiguous(),
        "b_enc": _need(state, "encoder.bias", (d_sae,), path),
        "W_dec": _need(state, "W_dec", (d_sae, d_in), path),
        "b_dec": _need(state, "b_dec", (d_in,), path),
    }
    metadata: dict[str, Any] = {"published_format": "sparsify", "published_config": config}
    hook = _sparsify_hook(folder.name)
    if hook:
        metadata["hook"] = hook
    run_config = _json_or_none(folder.parent / "config.json")  # the run's, beside its SAE folders
    if isinstance(run_config, dict) and isinstance(run_config.get("model"), str):
        metadata["model"] = run_config["model"]
    return _build_sae("topk", tensors, pre_enc_bias=True, k=int(config["k"]), option_overrides=NO_TOPK_RESCALE,
                      metadata=metadata)


# -- Gemma Scope ------------------------------------------------------------------------------------------------


def _gemma_scope_hook(path: Path) -> str | None:
    """blocks.N.<site> when `path` names a gemma-scope-*-{res,mlp,att} repository and a layer_N folder."""
    parts = path.absolute().parts  # not resolved: hub cache files are links to blobs
    sites = [m.group(1) for part in parts if (m := re.search(r"gemma-scope-.*-(res|mlp|att)$", part))]
    layers = [m.group(1) for part in parts if (m := re.fullmatch(r"layer_(\d+)", part))]
    return f"blocks.{layers[-1]}.{GEMMA_SCOPE_SITES[sites[-1]]}" if sites and layers else None


def load_gemma_scope(path: str | Path) -> SAE:
    """Gemma Scope's params.npz (the file, or a folder holding it; docs/formats.md) as a saelab jumprelu SAE
    (CPU)."""
    path = Path(path)
    if path.is_dir():
        path = path / "params.npz"
    if any(re.search(r"gemma-scope-.*transcoder", part) for part in path.absolute().parts):
        raise SaelabError(f"{path} is a Gemma Scope transcoder (it maps MLP inputs to MLP outputs); saelab loads SAEs.")
    try:
        with np.load(path) as data:
            arrays = {re.sub(r"^w_", "W_", name): torch.from_numpy(data[name].copy()) for name in data.files}
    except (OSError, ValueError, TypeError, EOFError, zipfile.BadZipFile) as exc:
        raise SaelabError(
            f"The Gemma Scope file {path} is corrupt or truncated ({_reason(exc)}); download it again."
        ) from exc
    scaling = arrays.pop("scaling_factor", None)
    if scaling is not None and not torch.all(scaling == 1):
        raise SaelabError(f"{path} has a finetuning scaling_factor, which Gemma Scope's JumpReLU SAEs lack; "
                          "multiply it into W_dec's rows and save the arrays again.")
    unknown = sorted(set(arrays) - set(GEMMA_SCOPE_ARRAYS))
    if unknown:
        raise SaelabError(f"{path} holds arrays {unknown} besides {', '.join(GEMMA_SCOPE_ARRAYS)}, so it is not a "
                          "Gemma Scope JumpReLU SAE.")
    tensors = _saelab_named_weights(arrays, path)
    d_sae = tensors["b_enc"].shape[0]
    tensors["log_threshold"] = _log_threshold(_need(arrays, "threshold", (d_sae,), path))
    metadata: dict[str, Any] = {"published_format": "gemma_scope"}
    hook = _gemma_scope_hook(path)
    if hook:
        metadata["hook"] = hook
    return _build_sae("jumprelu", tensors, pre_enc_bias=False, metadata=metadata)


# -- dictionary_learning ----------------------------------------------------------------------------------------


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A torch file holding {name: tensor}, loaded with weights_only=True (never running pickled code)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise SaelabError(
            f"{path} is not a plain tensor state dict: torch.load(weights_only=True) refused it (a corrupt file, or "
            "a pickle that would run code, which saelab never executes); save it again with "
            "torch.save(model.state_dict(), path)."
        ) from exc
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise SaelabError(f"{path} is corrupt or truncated ({_reason(exc)}); download or save it again.") from exc
    if isinstance(state, dict) and isinstance(state.get("ae"), dict) and "optimizer" in state:
        raise SaelabError(f"{path} is a dictionary_learning training backup (with optimizer state); load the ae.pt "
                          "that trainSAE writes when training ends.")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SaelabError(f"{path} does not hold a state dict of tensors, so it is not a dictionary_learning SAE.")
    return state


def _dictionary_class(state: dict[str, torch.Tensor], trainer: dict[str, Any], path: Path) -> str:
    """The dictionary_learning class that saved `state`: config.json's trainer.dict_class, checked against the
    tensors, or the one class whose tensors they are."""
    names = set(state)
    named = trainer.get("dict_class")
    if named is not None:
        if named not in DICTIONARY_LEARNING_TENSORS:
            raise SaelabError(f"{path} was saved by dictionary_learning's {named}; saelab reads "
                              f"{', '.join(c for c in DICTIONARY_LEARNING_TENSORS if c != 'GatedAutoEncoder')}.")
        if DICTIONARY_LEARNING_TENSORS[named] != names:
            raise SaelabError(f"{path} holds {sorted(names)}, not the tensors of the {named} its config.json names.")
        return named
    matches = [cls for cls, tensors in DICTIONARY_LEARNING_TENSORS.items() if tensors == names]
    if len(matches) > 1:
        raise SaelabError(f"{path} may be dictionary_learning's {' or '.join(matches)}, which save the same tensors "
                          "but encode differently; put the run's config.json (trainer.dict_class) beside it.")
    if not matches:
        raise SaelabError(f"{path} holds {sorted(names)}, the tensors of no dictionary_learning SAE saelab reads.")
    return matches[0]


def _dictionary_learning_metadata(trainer: dict[str, Any], cls: str) -> dict[str, Any]:
    metadata: dict[str, Any] = {"published_format": "dictionary_learning", "dictionary_class": cls,
                                "published_config": trainer}
    submodule = trainer.get("submodule_name")
    if isinstance(trainer.get("layer"), int) and (submodule is None or str(submodule).startswith("resid_post")):
        metadata["hook"] = f"blocks.{trainer['layer']}.hook_resid_post"
    if isinstance(trainer.get("lm_name"), str):
        metadata["model"] = trainer["lm_name"]
    return metadata


def load_dictionary_learning(path: str | Path) -> SAE:
    """dictionary_learning's ae.pt (the file, or a folder holding it and usually config.json; see the module
    docstring) as the saelab relu, topk, batchtopk or jumprelu SAE (CPU)."""
    path = Path(path)
    if path.is_dir():
        path = path / "ae.pt"
    state = read_state_dict(path)
    config_path = path.parent / "config.json"
    config = _read_json(config_path) if config_path.is_file() else {}
    trainer = config.get("trainer") if isinstance(config, dict) and isinstance(config.get("trainer"), dict) else {}
    cls = _dictionary_class(state, trainer, path)
    if cls == "GatedAutoEncoder":
        raise SaelabError(f"{path} is a gated SAE (separate gate and magnitude encoders), which saelab does not have.")
    metadata = _dictionary_learning_metadata(trainer, cls)
    if cls in ("MatryoshkaBatchTopKSAE", "JumpReluAutoEncoder"):
        tensors = _saelab_named_weights(state, path)
        d_in, d_sae = tensors["W_enc"].shape
    else:
        d_in, d_sae = _encoder_sizes(state, "encoder.weight", path, transposed=True)
        tensors = {
            "W_enc": _need(state, "encoder.weight", (d_sae, d_in), path).T.contiguous(),
            "b_enc": _need(state, "encoder.bias", (d_sae,), path),
            "W_dec": _need(state, "decoder.weight", (d_in, d_sae), path).T.contiguous(),
            "b_dec": _need(state, "bias" if cls == "AutoEncoder" else "b_dec", (d_in,), path),
        }
    if cls == "AutoEncoder":
        return _build_sae("relu", tensors, pre_enc_bias=True, metadata=metadata)
    if cls == "JumpReluAutoEncoder":
        tensors["log_threshold"] = _log_threshold(_need(state, "threshold", (d_sae,), path))
        return _build_sae("jumprelu", tensors, pre_enc_bias=False, metadata=metadata)
    k = int(_need(state, "k", (), path))
    if cls == "AutoEncoderTopK":
        return _build_sae("topk", tensors, pre_enc_bias=True, k=k, option_overrides=NO_TOPK_RESCALE,
                          metadata=metadata)
    if cls == "MatryoshkaBatchTopKSAE":
        groups = [int(size) for size in state["group_sizes"]]
        if sum(groups) != d_sae:
            raise SaelabError(f"The Matryoshka group sizes {groups} in {path} do not add up to its {d_sae} latents.")
        metadata["matryoshka_group_sizes"] = groups
    tensors["threshold"] = _need(state, "threshold", (), path).clamp_min(0)
    return _build_sae("batchtopk", tensors, pre_enc_bias=True, k=k, option_overrides=NO_TOPK_RESCALE,
                      metadata=metadata)


# -- dispatch ---------------------------------------------------------------------------------------------------


def published_loader(path: Path) -> Callable[[Path], SAE] | None:
    """The loader of the published format `path` (a folder or file) is in; None for saelab and SAELens folders and
    for anything else, which saelab.sae.io reads or refuses."""
    if path.is_file():
        return {".npz": load_gemma_scope, ".pt": load_dictionary_learning}.get(path.suffix)
    if (path / "params.npz").is_file():
        return load_gemma_scope
    if (path / "ae.pt").is_file():
        return load_dictionary_learning
    if (path / "sae.safetensors").is_file() and is_sparsify_config(_json_or_none(path / "cfg.json")):
        return load_sparsify
    return None


def load_published(path: Path, device: str | torch.device = "cpu") -> SAE | None:
    """The saelab SAE on `device` for `path` in a published format (docs/formats.md); None when it is in none."""
    loader = published_loader(path)
    return None if loader is None else loader(path).to(device)


# -- hub sources ------------------------------------------------------------------------------------------------


def saelens_directory_file() -> Path | None:
    """pretrained_saes.yaml of an installed sae-lens package, found without importing it; None without one."""
    spec = importlib.util.find_spec("sae_lens")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    path = Path(locations[0]) / "pretrained_saes.yaml" if locations else None
    return path if path is not None and path.is_file() else None


def saelens_release(release: str, sae_id: str, source: str) -> tuple[str, str]:
    """(repository, folder in it) of a SAELens release/id pair: from the installed sae-lens package's
    pretrained_saes.yaml, else `release` itself as the repository and `sae_id` as the folder (SAELens' own rule)."""
    directory_file = saelens_directory_file()
    entry = None
    if directory_file is not None:
        with directory_file.open() as stream:
            entry = yaml.load(stream, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)).get(release)
    if entry is None:
        if "/" not in release:
            raise SaelabError(
                f"'{source}' is not an existing path, and no installed sae-lens package lists '{release}' as a "
                "release; name its repository instead, as owner/repo:path or hf:owner/repo/path."
            )
        return release, sae_id
    converter = entry.get("conversion_func")
    if converter not in SAELENS_CONVERTERS:
        raise SaelabError(
            f"SAELens release '{release}' needs SAELens' '{converter}' converter, which saelab lacks; saelab reads "
            "releases in SAELens' own format, gemma_2 (Gemma Scope), dictionary_learning_1 and sparsify."
        )
    paths = {str(sae["id"]): str(sae["path"]) for sae in entry.get("saes", [])}
    if sae_id not in paths:
        raise SaelabError(f"SAELens release '{release}' has no SAE '{sae_id}'; its ids include "
                          f"{', '.join(list(paths)[:3])}.")
    return entry["repo_id"], paths[sae_id]


def hub_folder(repo_id: str, subfolder: str, source: str) -> Path:
    """The local copy of `subfolder` ('' for the root) of Hugging Face repository `repo_id`: its SAE files
    (SAE_FILE_NAMES) and its parent's config.json (a sparsify run's) downloaded into, or with HF_HUB_OFFLINE=1 found
    in, the hub cache."""
    from huggingface_hub import snapshot_download

    subfolder = subfolder.strip("/")
    parent = subfolder.rpartition("/")[0]
    patterns = [f"{subfolder}/{name}" if subfolder else name for name in SAE_FILE_NAMES]
    if subfolder:
        patterns.append(f"{parent}/config.json" if parent else "config.json")
    try:
        snapshot = Path(snapshot_download(repo_id, allow_patterns=patterns))
    except (OSError, ValueError) as exc:
        raise SaelabError(
            f"Cannot get {source} from the Hugging Face hub ({type(exc).__name__}: {_reason(exc)}); check the "
            "name, or download it once online if HF_HUB_OFFLINE is set."
        ) from exc
    folder = snapshot / subfolder
    if not folder.is_dir():
        raise SaelabError(f"The Hugging Face repository {repo_id} (cached at {snapshot}) has no folder '{subfolder}'; "
                          "check the path, or download it once online if HF_HUB_OFFLINE is set.")
    return folder


def resolve_sae_source(source: str | Path) -> Path:
    """The local path of an SAE source: `source` itself when it is a Path or an existing path; else, through the
    Hugging Face hub cache, `hf:owner/repo[/subfolder]`, or a SAELens `release:id` pair (docs/formats.md, section "Hub sources")."""
    if isinstance(source, Path) or Path(source).exists():
        return Path(source)
    if source.startswith(HUB_PREFIX):
        parts = source[len(HUB_PREFIX):].strip("/").split("/")
        if len(parts) < 2 or not all(parts[:2]):
            raise SaelabError(f"'{source}' names no repository; write hf:owner/repo or hf:owner/repo/subfolder.")
        return hub_folder("/".join(parts[:2]), "/".join(parts[2:]), source)
    if ":" in source:
        release, _, sae_id = source.partition(":")
        return hub_folder(*saelens_release(release, sae_id, source), source)
    return Path(source)
