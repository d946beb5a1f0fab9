"""`saelab train`'s config: the model, data, harvest and training sections, then every section the registered SAE
variants read (saelab.sae.registry.SAE_SECTIONS), so a new variant's options are flags, config-file keys and
sweep keys without being listed here."""

from __future__ import annotations

import dataclasses

from saelab.config import DataConfig, HarvestConfig, ModelConfig, TrainConfig
from saelab.sae.registry import SAE_SECTIONS

_FIXED = {"model": ModelConfig, "data": DataConfig, "harvest": HarvestConfig, "train": TrainConfig}

TrainCommand = dataclasses.make_dataclass(
    "TrainCommand",
    [(name, section, dataclasses.field(default_factory=section)) for name, section in {**_FIXED, **SAE_SECTIONS}.items()],
    namespace={"__doc__": "`saelab train`: train one or more SAEs from an activation cache or from live harvesting."},
)
TrainCommand.__module__ = __name__
