"""Architecture name -> SAE class. Adding a variant is one file, its tests and one line here."""

from __future__ import annotations

from typing import Any

from saelab.config import SAEConfig
from saelab.errors import SaelabError
from saelab.sae.base import SAE
from saelab.sae.topk import TopKSAE

ARCHITECTURES: dict[str, type[SAE]] = {
    TopKSAE.architecture: TopKSAE,
}


def sae_class(architecture: str) -> type[SAE]:
    if architecture not in ARCHITECTURES:
        raise SaelabError(
            f"Unknown SAE architecture '{architecture}'. Known architectures: {', '.join(sorted(ARCHITECTURES))}."
        )
    return ARCHITECTURES[architecture]


def create_sae(
    d_in: int, cfg: SAEConfig, options: dict[str, Any] | None = None, metadata: dict | None = None
) -> SAE:
    """A freshly initialised SAE of `cfg.architecture`; `options` maps section names to config dataclasses."""
    return sae_class(cfg.architecture)(d_in, cfg, options, metadata)
