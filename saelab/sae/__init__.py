"""SAE variants, their registry, and save/load."""

from saelab.sae.base import INFERENCE, SAE, Encoding, LossOutput, Reconstruction, StepContext
from saelab.sae.io import load_sae, save_sae
from saelab.sae.registry import ARCHITECTURES, create_sae

__all__ = ["ARCHITECTURES", "INFERENCE", "SAE", "Encoding", "LossOutput", "Reconstruction", "StepContext", "create_sae",
           "load_sae", "save_sae"]
