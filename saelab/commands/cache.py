"""`saelab cache`: harvest activations into an on-disk cache (saelab.activations.cache), resuming a partial one."""

from __future__ import annotations

from dataclasses import dataclass

from saelab.activations.cache import ActivationCache
from saelab.config import CacheCommand


@dataclass
class CacheResult:
    """The built (or completed) cache."""

    cache: ActivationCache

    def lines(self) -> list[str]:
        return self.cache.summary().split("\n")


def run(command: CacheCommand, progress: bool = True) -> CacheResult:
    from saelab.activations.cache import build_cache

    return CacheResult(build_cache(command, progress=progress))
