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


def idle_gpu_note(devices: list[str]) -> str | None:
    """A one-line note when this machine has a CUDA GPU but every one of a command's `devices` is the CPU (the
    default --device), so a user with a GPU learns how to use it instead of training at CPU speed unawares."""
    if not devices or not torch.cuda.is_available() or any(torch.device(d).type != "cpu" for d in devices):
        return None
    return (
        f"saelab: note: this machine has a CUDA GPU ({torch.cuda.get_device_name()}) but --device is cpu; "
        "pass --device cuda to run on it."
    )


def cpu_has_bf16_units() -> bool:
    """Whether this x86 CPU has native bfloat16 matrix instructions (AVX512-BF16 or AMX), on which torch's bf16
    matmuls outrun float32 ones; False where torch cannot tell (other architectures, older torch)."""
    probes = (getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return any(probe is not None and probe() for probe in probes)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """--precision (auto, bf16, fp32) on `device` -> the autocast dtype for SAE training, None for float32.
    auto is bf16 on CUDA (tensor cores) and on CPUs with bfloat16 units (AVX512-BF16, AMX: the main job trains
    1.8x faster at the same FVU), fp32 elsewhere (without those units a CPU has no fast bf16 matmul).
    float32 weights and Adam state keep the update exact either way."""
    if precision == "bf16":
        return torch.bfloat16
    if precision == "auto" and (device.type == "cuda" or (device.type == "cpu" and cpu_has_bf16_units())):
        return torch.bfloat16
    return None
