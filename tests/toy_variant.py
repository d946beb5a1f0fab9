"""A toy SAE variant in one file, as a new variant would be written: its config section and its class. The contract
test registers it with one line (`ARCHITECTURES["toy"] = ToyTopKSAE`) and checks it like every shipped variant."""

from dataclasses import dataclass
from typing import ClassVar

import torch
from typing_extensions import override

from saelab.config import Section, option
from saelab.kernels import SparseLayout
from saelab.sae.base import SAE, StepContext
from saelab.sae.topk import topk_layout


@dataclass
class ToyConfig(Section):
    name: ClassVar[str] = "toy"

    toy_shift: float = option(0.0, "Toy: subtracted from the kept pre-activations.", min=0)


class ToyTopKSAE(SAE):
    """The k largest z per token, with values ReLU(z - toy_shift): the smallest sparse-code variant."""

    architecture = "toy"
    summary = "a toy top-k"
    sections = (ToyConfig,)
    toy_cfg: ToyConfig
    sparse_code = True

    @override
    def select(self, z: torch.Tensor, ctx: StepContext) -> SparseLayout:
        return topk_layout(z, self.cfg.k)

    @override
    def values_at(self, z_at: torch.Tensor, layout: SparseLayout, ctx: StepContext) -> torch.Tensor:
        return (z_at - self.toy_cfg.toy_shift).relu()
