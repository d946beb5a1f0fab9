"""Architecture name -> SAE class. Adding a variant is one file, its tests and one line here."""

from __future__ import annotations

from typing import Any

from saelab.config import SAEConfig
from saelab.errors import SaelabError
from saelab.sae.abstopk import AbsTopKSAE
from saelab.sae.base import SAE
from saelab.sae.batchtopk import BatchTopKSAE
from saelab.sae.choice import ChoiceSAE
from saelab.sae.gsae import GradientSAE
from saelab.sae.jumprelu import JumpReLUSAE
from saelab.sae.relu import ReLUSAE
from saelab.sae.thresholds import ThresholdSAE
from saelab.sae.topafa import TopAFASAE
from saelab.sae.topk import TopKSAE

ARCHITECTURES: dict[str, type[SAE]] = {
    ReLUSAE.architecture: ReLUSAE,
    TopKSAE.architecture: TopKSAE,
    BatchTopKSAE.architecture: BatchTopKSAE,
    AbsTopKSAE.architecture: AbsTopKSAE,
    GradientSAE.architecture: GradientSAE,
    ChoiceSAE.architecture: ChoiceSAE,
    JumpReLUSAE.architecture: JumpReLUSAE,
    TopAFASAE.architecture: TopAFASAE,
    ThresholdSAE.architecture: ThresholdSAE,
}


def sae_class(architecture: str) -> type[SAE]:
    """The SAE class registered as `architecture`; a SaelabError listing the known ones otherwise."""
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
