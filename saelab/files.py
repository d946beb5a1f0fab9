"""Strict JSON files, written atomically (saelab.activations.cache.write_atomic): a killed or disk-full run never
leaves a half-written file under the final name."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from saelab.activations.cache import write_atomic


def json_safe(value: Any) -> Any:
    """`value` with every NaN and infinity (not JSON) replaced by None, recursively through dicts, lists, tuples."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: json_safe(v) for key, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def write_json(path: str | Path, value: Any, indent: int = 2) -> Path:
    """Write `value` as strict JSON (NaN and infinities as null, see `json_safe`) with a final newline to `path`,
    atomically, creating its folder; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(json_safe(value), indent=indent, allow_nan=False) + "\n"
    write_atomic(path, text.encode())
    return path
