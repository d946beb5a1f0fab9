"""SAE variants, their registry, and save/load."""

from saelab.sae.base import SAE, LossOutput, StepContext
from saelab.sae.io import load_sae, save_sae
from saelab.sae.registry import ARCHITECTURES, create_sae

__all__ = ["ARCHITECTURES", "SAE", "LossOutput", "StepContext", "create_sae", "load_sae", "save_sae"]
