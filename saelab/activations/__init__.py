"""Activations: live harvesting from a model, a shuffle buffer, and an on-disk cache."""

from saelab.activations.batch import ActivationBatch
from saelab.activations.buffer import ShuffleBuffer
from saelab.activations.cache import ActivationCache, build_cache
from saelab.activations.hooks import resolve_hooks
from saelab.activations.source import ActivationSource

__all__ = ["ActivationBatch", "ActivationCache", "ActivationSource", "ShuffleBuffer", "build_cache", "resolve_hooks"]
