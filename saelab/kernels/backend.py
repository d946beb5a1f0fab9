"""The one switch between the eager and the Triton implementation of the sparse primitives.

`SAELAB_KERNELS` = auto (default: Triton for CUDA tensors when Triton is installed, eager otherwise),
eager, triton (Triton for every device; on CPU this needs TRITON_INTERPRET=1, Triton's interpreter,
which is how CI tests the kernels without a GPU), or dense (no sparse kernels: training uses dense matmuls
throughout, e.g. to rule the kernels out when debugging). Both kernel backends expose `bag_sum` and `bag_dots`
with the signatures documented in saelab.kernels.eager.
"""

from __future__ import annotations

import importlib.util
import os
from types import ModuleType

import torch

from saelab.errors import SaelabError
from saelab.kernels import eager

BACKENDS = ("auto", "eager", "triton", "dense")


def requested_backend() -> str:
    choice = os.environ.get("SAELAB_KERNELS", "auto").strip().lower() or "auto"
    if choice not in BACKENDS:
        raise SaelabError(f"SAELAB_KERNELS={choice!r} is not one of {', '.join(BACKENDS)}.")
    return choice


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def backend_for(device: torch.device) -> ModuleType:
    """The module (eager or triton) whose primitives run on tensors of `device`."""
    choice = requested_backend()
    if choice in ("eager", "dense") or (choice == "auto" and (device.type != "cuda" or not triton_available())):
        return eager
    if not triton_available():
        raise SaelabError("SAELAB_KERNELS=triton but Triton is not installed; `pip install triton` or unset it.")
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise SaelabError(
            f"SAELAB_KERNELS=triton on a {device.type} tensor needs TRITON_INTERPRET=1 (Triton's CPU interpreter)."
        )
    from saelab.kernels import triton as triton_kernels

    return triton_kernels
