"""`saelab train`'s config: the model, data, harvest and training sections, then every section the registered SAE
variants read (saelab.sae.registry.sae_sections), so a new variant's options are flags, config-file keys and
sweep keys without being listed here."""

from __future__ import annotations

import dataclasses

from saelab.config import DataConfig, HarvestConfig, ModelConfig, TrainConfig
from saelab.sae.registry import sae_sections

FIXED_SECTIONS = {"model": ModelConfig, "data": DataConfig, "harvest": HarvestConfig, "train": TrainConfig}


def train_command_class() -> type:
    """The TrainCommand dataclass for the variants registered now: one field per section, each defaulting to its
    section's defaults."""
    sections = {**FIXED_SECTIONS, **sae_sections()}
    command = dataclasses.make_dataclass(
        "TrainCommand",
        [(name, section, dataclasses.field(default_factory=section)) for name, section in sections.items()],
        namespace={"__doc__": "`saelab train`: train one or more SAEs from an activation cache or live harvesting."},
    )
    command.__module__ = __name__
    return command


TrainCommand = train_command_class()
