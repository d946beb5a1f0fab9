"""Read and write SAELens SAE folders (`cfg.json` + `sae_weights.safetensors`), as SAELens 6.x writes them.

`load_saelens` gives the saelab SAE with SAELens' forward map (standard, topk, abstopk, jumprelu and BatchTopK
saves); `save_saelens` writes a saelab SAE that SAELens can load, refusing variants SAELens cannot compute.

Formats: docs/formats.md, section "SAELens" (the forward map, the mapping in both directions, layer norm).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import tempfile
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from saelab import __version__
from saelab.config import SAEConfig
from saelab.dtypes import dtype_name
from saelab.errors import SaelabError
from saelab.sae.base import SAE
from saelab.sae.io import write_folder_atomic
from saelab.sae.registry import sae_class

WEIGHTS = "sae_weights.safetensors"
CONFIG = "cfg.json"
SAELENS_FORMAT_VERSION = "6.54.12"  # the SAELens version whose format save_saelens writes (and was checked)
SUPPORTED = ("standard", "topk", "abstopk", "jumprelu", "batchtopk")
NORMS_TO_SAELAB = {"none": "none", "layer_norm": "layernorm"}
NORMS_TO_SAELENS = {"none": "none", "constant": "none", "layernorm": "layer_norm"}  # constant: folded first
SAELENS_OF_FORM = {"relu": "standard", "topk": "topk", "abstopk": "abstopk", "jump": "jumprelu"}  # SAE.inference_form


# -- reading --------------------------------------------------------------------------------------------------


def _major_version(version: Any) -> int | None:
    try:
        return int(str(version).split(".")[0])
    except ValueError:
        return None


def _upgrade_pre6(cfg: dict[str, Any]) -> dict[str, Any]:
    """A pre-6.0 SAELens cfg (flat keys, hook_point, activation_fn_str, boolean normalize_activations) in 6.x form."""
    renames = {
        "hook_point": "hook_name",
        "hook_point_head_index": "hook_head_index",
        "activation_fn_str": "activation_fn",
    }
    cfg = {renames.get(k, k): v for k, v in cfg.items()}
    cfg.setdefault("apply_b_dec_to_input", True)
    cfg.setdefault("architecture", "standard")
    activation = cfg.get("activation_fn", "relu")
    k = (cfg.get("activation_fn_kwargs") or {}).get("k")
    if activation == "topk" and k is not None:
        cfg["architecture"], cfg["k"] = "topk", k
    elif cfg["architecture"] == "standard" and activation not in ("relu", None):
        raise SaelabError(f"This pre-6.0 SAELens SAE uses activation_fn '{activation}'; saelab reads relu and topk.")
    norm = cfg.get("normalize_activations")
    if isinstance(norm, bool) or norm is None:
        cfg["normalize_activations"] = "expected_average_only_in" if norm else "none"
    meta_keys = ("model_name", "hook_name", "hook_head_index", "context_size", "prepend_bos", "dataset_path",
                 "neuronpedia_id", "model_from_pretrained_kwargs", "model_class_name", "seqpos_slice")
    cfg["metadata"] = {**{k: cfg[k] for k in meta_keys if k in cfg}, **(cfg.get("metadata") or {})}
    return cfg


def read_saelens_config(folder: str | Path) -> dict[str, Any]:
    """cfg.json of a SAELens folder as a 6.x-style dict (older flat configs are upgraded as SAELens does)."""
    path = Path(folder) / CONFIG
    try:
        cfg = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SaelabError(f"Cannot read the SAELens config {path} ({exc}).") from exc
    if not isinstance(cfg, dict) or "d_in" not in cfg or "d_sae" not in cfg:
        raise SaelabError(f"{path} is not a SAELens SAE config (it needs d_in and d_sae).")
    version = cfg.get("sae_lens_version") or (cfg.get("metadata") or {}).get("sae_lens_version")
    major = _major_version(version) if version else None
    if major is None or major < 6:
        cfg = _upgrade_pre6(cfg)
    cfg.setdefault("metadata", {})
    return cfg


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    try:
        state = load_file(str(folder / WEIGHTS))
    except (SafetensorError, OSError) as exc:
        raise SaelabError(f"The SAELens weights {folder / WEIGHTS} are unreadable ({exc}).") from exc
    scaling = state.pop("scaling_factor", None)
    if scaling is not None and not torch.all(scaling == 1):
        raise SaelabError(
            f"{folder / WEIGHTS} has a finetuning scaling_factor, which SAELens 6 no longer loads and saelab does "
            "not read. Multiply it into W_dec's rows and re-save the SAE."
        )
    return {k: v.to(torch.float64) if k == "topk_threshold" else v.float() for k, v in state.items()}


def _need(state: dict[str, torch.Tensor], name: str, shape: tuple[int, ...], folder: Path) -> torch.Tensor:
    if name not in state:
        raise SaelabError(f"{folder / WEIGHTS} has no '{name}' tensor; it is not a complete SAELens SAE.")
    if tuple(state[name].shape) != shape:
        raise SaelabError(
            f"'{name}' in {folder / WEIGHTS} has shape {tuple(state[name].shape)}, but cfg.json says {shape}."
        )
    return state[name]


def _fold_decoder_norms(W_enc: torch.Tensor, b_enc: torch.Tensor, W_dec: torch.Tensor) -> None:
    """In place: latent i's pre-activation times ||d_i||, decoder row d_i over ||d_i|| (W_enc [d_in, d_sae],
    b_enc [d_sae], W_dec [d_sae, d_in]); SAELens' own fold for rescale_acts_by_decoder_norm."""
    norms = W_dec.norm(dim=1)
    W_enc.mul_(norms)
    b_enc.mul_(norms)
    W_dec.div_(norms[:, None])


def _input_norm(norm: str, folder: Path) -> str:
    if norm in NORMS_TO_SAELAB:
        return NORMS_TO_SAELAB[norm]
    reasons = {
        "expected_average_only_in": "the SAE expects inputs already multiplied by a dataset-wide norm scaling "
        "factor that is not stored in the folder. Fold it in SAELens "
        "(sae.fold_activation_norm_scaling_factor(factor)) and save again",
        "covariance_whitening": "the SAE expects whitened inputs and the whitening statistics are not stored in "
        "the folder. Fold them in SAELens (sae.fold_activation_whitening(...)) and save again",
        "constant_norm_rescale": "SAELens rescales every token to norm sqrt(d_in) and back, which saelab's input "
        "norms (none, constant, layernorm) do not include yet",
    }
    reason = reasons.get(norm, "saelab does not know this normalisation")
    raise SaelabError(f"The SAELens SAE in {folder} uses normalize_activations='{norm}': {reason}.")


def _restore_options(cls: type[SAE], block: dict[str, Any]) -> dict[str, Any]:
    """Config sections of `cls` that a saelab-written folder recorded (training options; not the forward map)."""
    options = {}
    for section in cls.sections:
        values = (block.get("options") or {}).get(section.name)
        if isinstance(values, dict):
            known = {f.name for f in dataclasses.fields(section)}
            options[section.name] = section(**{k: v for k, v in values.items() if k in known})
        else:
            options[section.name] = section()
    return options


def _integral_k(value: Any, d_sae: int) -> int | None:
    """k as saelab's int when it is a whole number in [1, d_sae], else None."""
    try:
        k = float(value)
    except (TypeError, ValueError):
        return None
    return int(k) if k.is_integer() and 1 <= k <= d_sae else None


class _SaelabForm(NamedTuple):
    """How a SAELens architecture maps onto a saelab one: the target architecture, its k (None: not top-k), tensors
    to set besides the four weights, and option overrides by section."""

    target: str
    k: int | None
    extra: dict[str, torch.Tensor]
    option_overrides: dict[str, dict[str, Any]]


def _saelab_form(arch: str, cfg: dict[str, Any], state: dict[str, torch.Tensor], W_enc: torch.Tensor,
                 b_enc: torch.Tensor, W_dec: torch.Tensor, folder: Path) -> _SaelabForm:
    """The saelab form of SAELens architecture `arch` (docs/formats.md, section "SAELens"); folds decoder norms into W_enc,
    b_enc [.., d_sae] and W_dec [d_sae, d_in] in place where the mapping needs it."""
    d_sae = W_dec.shape[0]
    meta = cfg.get("metadata") or {}
    details = meta.get("training_architecture_details") or {}
    k, extra, option_overrides = None, {}, {}
    if arch == "standard":
        target = "relu"
    elif arch in ("topk", "abstopk"):
        target, k = arch, cfg.get("k", 100)
        if cfg.get("rescale_acts_by_decoder_norm", False):
            _fold_decoder_norms(W_enc, b_enc, W_dec)
        option_overrides["topk"] = {"rescale_by_decoder_norm": False}
    elif arch == "batchtopk":  # a SAELens training checkpoint: convert as its save_inference_model does
        theta = _need(state, "topk_threshold", (), folder)
        if cfg.get("rescale_acts_by_decoder_norm", True):
            _fold_decoder_norms(W_enc, b_enc, W_dec)
        k = _integral_k(cfg.get("k"), d_sae)
        if k is None:
            target, extra["log_threshold"] = "jumprelu", theta.float().clamp_min(0).log().expand(d_sae).clone()
        else:
            target, extra["threshold"] = "batchtopk", theta.float()
            rescale = bool(cfg.get("rescale_acts_by_decoder_norm", True))
            option_overrides["topk"] = {"rescale_by_decoder_norm": rescale}
    else:  # jumprelu
        threshold = _need(state, "threshold", (d_sae,), folder)
        k = _integral_k(details.get("k"), d_sae)
        uniform = bool(torch.all(threshold == threshold[0])) and float(threshold[0]) >= 0
        if meta.get("training_architecture") == "batchtopk" and uniform and k is not None:
            target, extra["threshold"] = "batchtopk", threshold[0].clone()
            rescale = bool(details.get("rescale_acts_by_decoder_norm", True))
            option_overrides["topk"] = {"rescale_by_decoder_norm": rescale}
        else:
            target, k = "jumprelu", None
            extra["log_threshold"] = threshold.clamp_min(0).log()
    return _SaelabForm(target, k, extra, option_overrides)


def load_saelens(folder: str | Path, device: str | torch.device = "cpu") -> SAE:
    """Load a SAELens SAE folder as the saelab SAE with the same forward map (docs/formats.md, section "SAELens").

    The folder holds cfg.json and sae_weights.safetensors with W_enc [d_in, d_sae], b_enc [d_sae],
    W_dec [d_sae, d_in], b_dec [d_in] (+ threshold [d_sae] for jumprelu, topk_threshold [] for a batchtopk
    checkpoint). Weights are loaded as float32. The returned SAE's encode maps x [..., d_in] to SAELens'
    encode(x) [..., d_sae] and its forward to SAELens' decode(encode(x)) [..., d_in]. SAELens' metadata
    (hook_name, model_name, ...) is kept in `sae.metadata["saelens_metadata"]`, with hook_name and model_name
    also as saelab's `hook` and `model`.
    """
    folder = Path(folder)
    cfg = read_saelens_config(folder)
    state = _read_weights(folder)
    arch = cfg.get("architecture", "standard")
    if arch not in SUPPORTED:
        raise SaelabError(
            f"The SAELens SAE in {folder} has architecture '{arch}'; saelab reads {', '.join(SUPPORTED)}."
        )
    d_in, d_sae = int(cfg["d_in"]), int(cfg["d_sae"])
    W_enc = _need(state, "W_enc", (d_in, d_sae), folder).clone()
    b_enc = _need(state, "b_enc", (d_sae,), folder).clone()
    W_dec = _need(state, "W_dec", (d_sae, d_in), folder).clone()
    b_dec = _need(state, "b_dec", (d_in,), folder).clone()
    norm = cfg.get("normalize_activations") or "none"
    input_norm = _input_norm(norm, folder)
    meta = dict(cfg.get("metadata") or {})
    block = meta.pop("saelab", None)
    block = block if isinstance(block, dict) else {}
    target, k, extra, option_overrides = _saelab_form(arch, cfg, state, W_enc, b_enc, W_dec, folder)

    cls = sae_class(target)
    sae_fields = {f.name for f in dataclasses.fields(SAEConfig)}
    base = {key: v for key, v in (block.get("sae") or {}).items() if key in sae_fields}
    sae_cfg = SAEConfig(**{
        **base,
        "architecture": target,
        "d_sae": d_sae,
        "k": k if k is not None else base.get("k", SAEConfig.k),
        "pre_enc_bias": bool(cfg.get("apply_b_dec_to_input", True)),
        "input_norm": input_norm,
    })
    options = _restore_options(cls, block)
    for name, changes in option_overrides.items():
        options[name] = dataclasses.replace(options[name], **changes)
    metadata = dict(block.get("metadata") or {})
    metadata["saelens_metadata"] = meta
    metadata["saelens_architecture"] = arch
    if meta.get("hook_name"):
        metadata["hook"] = meta["hook_name"]
    if meta.get("model_name"):
        metadata["model"] = meta["model_name"]
    sae = cls(d_in, sae_cfg, options, metadata)
    sae.freeze_sparsity()  # a loaded SAE keeps the coefficient it was saved with

    current = sae.state_dict()
    missing = set(extra) - set(current)
    if missing:  # the registered class lacks the tensor this mapping sets: a saelab-side rename
        raise SaelabError(f"saelab's '{target}' SAE has no {sorted(missing)}; saelab.sae.saelens needs updating.")
    new_state = {**current, "W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec, **extra}
    new_state["input_scale"] = torch.ones(())
    sae.load_state_dict({key: v.to(current[key].dtype) for key, v in new_state.items()})
    return sae.to(device)


# -- writing --------------------------------------------------------------------------------------------------


def _option(sae: SAE, section: str, name: str, default: Any) -> Any:
    return getattr(sae.options[section], name) if section in sae.options else default


def saelens_state_and_config(sae: SAE) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The SAELens state dict (W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in], b_dec [d_in],
    + threshold [d_sae] for jumprelu) and cfg.json dict of `sae`, computed on a folded copy (`sae` is unchanged).
    The SAELens architecture follows the variant's inference_form; a SaelabError where it has none."""
    form = sae.inference_form
    if form not in SAELENS_OF_FORM:
        raise SaelabError(
            f"saelab's '{sae.architecture}' SAE cannot be saved in SAELens format: at inference its code is not "
            "ReLU(x W_enc + b), a per-token top-k or a JumpReLU, the forms SAELens computes (see the variant's "
            "docstring)."
        )
    if sae.cfg.input_norm not in NORMS_TO_SAELENS:
        raise SaelabError(f"saelab's input norm '{sae.cfg.input_norm}' has no SAELens normalize_activations.")
    saved = copy.deepcopy(sae).cpu().fold()
    W_enc, W_dec, b_dec = saved.W_enc.detach().clone(), saved.W_dec.detach().clone(), saved.b_dec.detach().clone()
    b_enc = (saved.relu_encoder_bias() if form == "relu" else saved.b_enc).detach().clone()
    state: dict[str, torch.Tensor] = {}
    fields: dict[str, Any] = {}
    if form in ("topk", "abstopk"):
        if _option(saved, "topk", "rescale_by_decoder_norm", False):
            _fold_decoder_norms(W_enc, b_enc, W_dec)
        fields = {"k": int(saved.cfg.k), "rescale_acts_by_decoder_norm": False}
    elif form == "jump":  # z 1[z > theta] is SAELens' ReLU(z) 1[z > theta] for theta >= 0
        state["threshold"] = saved.jump_threshold().to(W_enc.dtype)
    state.update(W_enc=W_enc, b_enc=b_enc, W_dec=W_dec, b_dec=b_dec)
    meta = _saelens_metadata(saved)
    hook = meta.get("hook_name")
    config = {
        "d_in": saved.d_in,
        "d_sae": saved.d_sae,
        "dtype": dtype_name(W_enc.dtype),
        "device": "cpu",
        "apply_b_dec_to_input": bool(saved.cfg.pre_enc_bias),
        "normalize_activations": NORMS_TO_SAELENS[saved.cfg.input_norm],
        # saelab stores attn.hook_z flattened (n_heads * d_head); SAELens takes [..., n_heads, d_head] there
        "reshape_activations": "hook_z" if isinstance(hook, str) and hook.endswith("hook_z") else "none",
        "metadata": meta,
        **fields,
        "architecture": SAELENS_OF_FORM[form],
    }
    return {k: v.contiguous() for k, v in state.items()}, config


def _saelens_metadata(saved: SAE) -> dict[str, Any]:
    """cfg.json's metadata for a folded SAE: SAELens' fields (those it was loaded with, if any, updated), BatchTopK's
    training record as SAELens' own inference save writes it, and saelab's config under "saelab"."""
    saelab_meta = {k: v for k, v in saved.metadata.items() if k not in ("saelens_metadata", "saelens_architecture")}
    meta = dict(saved.metadata.get("saelens_metadata") or {})
    meta.pop("training_architecture", None)  # re-derived below; stale ones would mislead the batchtopk detection
    details = dict(meta.pop("training_architecture_details", None) or {})
    meta["sae_lens_version"] = SAELENS_FORMAT_VERSION
    meta.setdefault("sae_lens_training_version", SAELENS_FORMAT_VERSION)
    hook = saelab_meta.get("hook", meta.get("hook_name"))
    if saelab_meta.get("model") is not None:
        meta["model_name"] = saelab_meta["model"]
    if hook is not None:
        meta["hook_name"] = hook
    if saved.architecture == "batchtopk":
        meta["training_architecture"] = "batchtopk"
        meta["training_architecture_details"] = {
            **details,
            "k": int(saved.cfg.k),
            "rescale_acts_by_decoder_norm": bool(_option(saved, "topk", "rescale_by_decoder_norm", True)),
            "topk_threshold_lr": float(_option(saved, "topk", "threshold_rate", 0.01)),
        }
    meta["saelab"] = {
        "saelab_version": __version__,
        "architecture": saved.architecture,
        "sae": dataclasses.asdict(saved.cfg),
        "options": {name: dataclasses.asdict(opt) for name, opt in saved.options.items()},
        "metadata": saelab_meta,
    }
    return meta


def save_saelens(sae: SAE, folder: str | Path) -> Path:
    """Write `sae` as a SAELens 6.x folder (cfg.json + sae_weights.safetensors) loadable with SAELens'
    `SAE.load_from_disk(folder)`; returns the folder (replaced if it exists).

    A folded copy is written (the constant input scale goes into the weights), so SAELens' decode(encode(x)) for
    x [..., d_in] equals `sae(x)`, and SAELens' encode(x) [..., d_sae] equals `sae.encode(x)`, except for the
    top-k family with topk.rescale_by_decoder_norm: SAELens' TopK selects by z alone, so the decoder norms are
    folded into the encoder and its codes are a_i * ||d_i|| (||d_i|| = 1 / c for a decoder trained at unit norm
    on inputs scaled by c). Soft thresholds are written as a standard SAE with b_enc - t, hard thresholds as a
    JumpReLU with threshold sqrt(2t). saelab's own config and metadata are kept under cfg.json's
    metadata["saelab"] for `load_saelens`. Raises SaelabError for what SAELens cannot represent (topafa; the
    half, lq and CEL0 thresholds).
    """
    folder = Path(folder)
    state, config = saelens_state_and_config(sae)
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / WEIGHTS
        save_file(state, str(weights))
        write_folder_atomic(folder, {WEIGHTS: weights.read_bytes(), CONFIG: json.dumps(config, indent=2).encode()})
    return folder
