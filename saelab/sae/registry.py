"""Architecture name -> SAE class, and the config sections they read. Adding a variant is one file (the class
and its config section), its tests and one line here: its options then appear in `saelab train`, saved configs,
sweeps and the contract tests."""

from __future__ import annotations

from typing import Any

from saelab.config import SAEConfig, Section
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
    cls.architecture: cls
    for cls in (
        ReLUSAE,
        TopKSAE,
        BatchTopKSAE,
        AbsTopKSAE,
        GradientSAE,
        ChoiceSAE,
        JumpReLUSAE,
        TopAFASAE,
        ThresholdSAE,
    )
}



def sae_sections() -> dict[str, type[Section]]:
    """Section name -> config section: `sae` and every section a registered variant reads (in first-use order)."""
    return {"sae": SAEConfig, **{section.name: section for cls in ARCHITECTURES.values() for section in cls.sections}}


def architecture_help() -> str:
    """--architecture's help: every registered variant and its summary."""
    return "SAE variant: " + "; ".join(f"{name} ({cls.summary})" for name, cls in ARCHITECTURES.items()) + "."


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
