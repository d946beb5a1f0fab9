"""saelab: sparse-autoencoder interpretability for transformer language models.

Data flows one way: text (`saelab.data`) -> model (`saelab.models`) -> activations
(`saelab.activations`: live source, shuffle buffer, on-disk cache) -> trainers -> analysis.
"""

from saelab.errors import SaelabError

__version__ = "0.1.0"
__all__ = ["SaelabError", "__version__"]
