"""Save and load SAEs: a folder with `sae.safetensors` and `cfg.json`.

`save_sae` folds a copy first (the constant input scale goes into the weights and the sparsity coefficient is
fixed; no code changes), so a saved SAE maps raw activations to raw reconstructions. `load_sae` also reads
SAELens folders (`cfg.json` + `sae_weights.safetensors`); see saelab.sae.saelens.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from saelab import __version__
from saelab.config import SAEConfig
from saelab.errors import SaelabError
from saelab.sae.base import SAE
from saelab.sae.registry import create_sae, sae_sections

WEIGHTS = "sae.safetensors"
LINEAR_WEIGHTS = ("W_enc", "b_enc", "W_dec", "b_dec")
CONFIG = "cfg.json"


def write_folder_atomic(folder: Path, files: dict[str, bytes]) -> None:
    """Write `files` (name -> bytes) into `folder` via a sibling temp folder and a rename."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp makes it 0700; the saved folder gets the usual permissions
    try:
        for name, data in files.items():
            (staging / name).write_bytes(data)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def save_sae(sae: SAE, folder: str | Path, fold: bool = True) -> Path:
    """Write `sae` (folded copy unless fold=False) to `folder`; returns the folder."""
    folder = Path(folder)
    saved = copy.deepcopy(sae)
    if fold:
        saved.fold()  # freezes the sparsity coefficient too
    else:
        saved.freeze_sparsity()
    config = {"saelab_version": __version__, **saved.config_dict()}
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / WEIGHTS
        save_file({k: v.detach().contiguous().cpu() for k, v in saved.state_dict().items()}, str(weights))
        write_folder_atomic(folder, {WEIGHTS: weights.read_bytes(), CONFIG: json.dumps(config, indent=2).encode()})
    return folder


def sae_from_config(config: dict) -> SAE:
    """An (unloaded) SAE built from a cfg.json dict."""
    try:
        legacy_target = (config.get("jumprelu") or {}).pop("target_l0", 0)  # moved to the sae section
        sae_cfg = SAEConfig(**{**({"target_l0": legacy_target} if legacy_target else {}), **config["sae"]})
        sections = sae_sections()
        options = {name: sections[name](**config[name]) for name in config if name in sections and name != "sae"}
        sae = create_sae(config["d_in"], sae_cfg, options, config.get("metadata"))
    except (KeyError, TypeError) as exc:
        raise SaelabError(f"cfg.json is not a saelab SAE config ({exc}).") from exc
    sae.freeze_sparsity()  # saved SAEs hold a fixed coefficient; files older than the sparsity target lack one
    return sae


def load_sae(folder: str | Path, device: str | torch.device = "cpu") -> SAE:
    """Load a saelab SAE folder, a SAELens one (cfg.json + sae_weights.safetensors), or a published SAE: a sparsify
    folder, Gemma Scope params.npz, dictionary_learning ae.pt, or an `hf:owner/repo[/subfolder]` or SAELens
    `release:id` source through the Hugging Face hub cache (saelab.sae.published)."""
    from saelab.sae.published import load_published, resolve_sae_source

    folder = resolve_sae_source(folder)
    published = load_published(folder, device)
    if published is not None:
        return _check_finite(published, folder)
    if (folder / "sae_weights.safetensors").is_file():
        from saelab.sae.saelens import load_saelens

        return _check_finite(load_saelens(folder, device=device), folder)
    if not (folder / CONFIG).is_file() or not (folder / WEIGHTS).is_file():
        raise SaelabError(
            f"{folder} is not an SAE folder (needs {CONFIG} with {WEIGHTS}, SAELens' sae_weights.safetensors, Gemma "
            "Scope's params.npz or dictionary_learning's ae.pt)."
        )
    try:
        config = json.loads((folder / CONFIG).read_text())
        state = load_file(str(folder / WEIGHTS))
    except (json.JSONDecodeError, SafetensorError, OSError) as exc:
        raise SaelabError(f"The SAE in {folder} is corrupt ({exc}). Re-save or retrain it.") from exc
    sae = sae_from_config(config)
    try:
        sae.load_state_dict(state)
    except RuntimeError as exc:
        raise SaelabError(f"The weights in {folder / WEIGHTS} do not match its {CONFIG} ({exc}).") from exc
    return _check_finite(sae, folder).to(device)


def _check_finite(sae: SAE, folder: Path) -> SAE:
    """Refuse NaN anywhere and Inf in the encoder and decoder weights (a threshold may be infinite: +inf until
    learnt, or a JumpReLU log-threshold of -inf for theta = 0)."""
    tensors = [*sae.named_parameters(), *sae.named_buffers()]
    bad = [name for name, t in tensors if t.is_floating_point() and bool(torch.isnan(t).any())]
    bad += [name for name, t in tensors if name in LINEAR_WEIGHTS and bool(torch.isinf(t).any())]
    if bad:
        raise SaelabError(
            f"The SAE in {folder} holds NaN/Inf in {', '.join(bad)}; it cannot encode anything. Retrain it (a "
            "training run stops at the first NaN loss and keeps a checkpoint of the last good state)."
        )
    return sae


class LoadedSAE(NamedTuple):
    """An SAE loaded from `folder` for inference, and the hook it reads."""

    folder: str
    sae: SAE
    hook: str


def recorded_hook(sae: SAE, name: str, default: str | None = None) -> str:
    """The hook `sae` reads: its metadata's 'hook', else `default`; a SaelabError naming `name` if neither is set."""
    hook = sae.metadata.get("hook") or default
    if not hook:
        raise SaelabError(
            f"{name} does not record the hook it reads (metadata 'hook'); add it to the metadata in its cfg.json."
        )
    return hook


def load_saes(
    folders: Sequence[str | Path], device: str | torch.device = "cpu", default_hook: str | None = None
) -> list[LoadedSAE]:
    """Load each SAE folder (saelab or SAELens) onto `device` in eval mode, with the hook it reads (metadata 'hook',
    else `default_hook`; a SaelabError naming the folder if neither is set), in the order given."""
    loaded = []
    for folder in folders:
        sae = load_sae(folder, device=device).eval()
        loaded.append(LoadedSAE(str(folder), sae, recorded_hook(sae, str(folder), default_hook)))
    return loaded
