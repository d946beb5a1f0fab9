"""Dtype names as users type them <-> torch dtypes."""

import torch

from saelab.errors import SaelabError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    """'float32' | 'bfloat16' | 'float16' (also 'fp32', 'bf16', 'fp16') -> torch.dtype."""
    aliases = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16", "float": "float32"}
    key = aliases.get(name, name)
    if key not in DTYPES:
        raise SaelabError(f"Unknown dtype '{name}'. Use one of: {', '.join(DTYPES)}.")
    return DTYPES[key]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
