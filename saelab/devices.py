"""Torch devices named on the command line, checked where the option is parsed: an unusable --device fails with
one sentence before any model loads, instead of an assertion deep inside torch."""

from __future__ import annotations

import torch

from saelab.errors import SaelabError


def check_device(name: str) -> torch.device:
    """'cpu', 'cuda', 'cuda:N' or 'mps' -> the torch.device, if this machine has it; a SaelabError otherwise."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as exc:
        raise SaelabError(f"--device {name!r} is not a torch device; use cpu, cuda, cuda:N or mps.") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SaelabError(
                f"--device {name} was asked for, but this machine has no usable CUDA device "
                f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'none'}); use --device cpu."
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise SaelabError(
                f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), numbered from 0."
            )
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise SaelabError(f"--device {name} was asked for, but MPS is not available here; use --device cpu.")
    elif device.type != "cpu":
        raise SaelabError(f"--device {name}: saelab runs on cpu, cuda or mps.")
    return device


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """--precision (auto, bf16, fp32) on `device` -> the autocast dtype for SAE training, None for float32.
    auto is bf16 on CUDA (tensor cores; float32 weights and Adam state keep the update exact) and fp32 elsewhere
    (CPUs without bf16 matrix units run bf16 matmuls slower than float32)."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None
