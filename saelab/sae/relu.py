"""ReLU SAE with an L1 penalty (Bricken et al. 2023, "Towards Monosemanticity"; Anthropic's April 2024 update).

Code a = ReLU(z) in two forms, chosen by `--decoder-norm`: unit (2023: unit-norm decoder rows, L1 of a) or weighted
(2024: a free decoder, L1 of a_i * ||d_i||). Dead-latent resampling is saelab.train.resample.

Math, defaults and choices: docs/algorithms.md, section "ReLU-L1".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from typing_extensions import override

from saelab.config import SAEConfig, Section, option
from saelab.errors import SaelabError
from saelab.kernels import SparseCode, SparseLayout
from saelab.sae.base import SAE, EncoderPass, StepContext
from saelab.sae.sparsity import target_quantiles


@dataclass
class L1Config(Section):
    name: ClassVar[str] = "l1"

    l1_coef: float = option(0.0, "L1 sparsity coefficient (relu); 0: adapted to reach --target-l0.", min=0)
    l1_warmup_fraction: float = option(
        0.05, "Warm a given --l1-coef up linearly over this fraction of steps.", min=0, max=1
    )
    decoder_norm: str = option(
        "unit",
        "relu decoder: unit (2023: unit-norm rows; MMCS 0.999 / FVU 0.16 on a planted dictionary at L0 6) or "
        "weighted (2024: L1 of a_i*||d_i||, free decoder from norm 0.1; MMCS 0.90 / FVU 0.38 in the same 1500 steps).",
    )
    decoder_init_norm: float = option(0.1, "Initial decoder row norm for the weighted form.", above=0)
    b_dec_init: str = option(
        "geomedian", "b_dec initialisation: geomedian (geometric median of a sample) or zero (the 2024 recipe)."
    )
    resample_steps: list[int] = option(
        [], "Steps at which to resample dead latents (2023 form), e.g. 25000 50000.", min=1
    )
    resample_scale: float = option(0.2, "Resampled encoder rows get this times the mean alive encoder norm.", min=0)


DECODER_NORMS = ("weighted", "unit")
B_DEC_INITS = ("zero", "geomedian")


class ReLUSAE(SAE):
    """ReLU + L1 SAE. Code a = ReLU(z) [batch, d_sae], kept as its z > 0 entries; loss: reconstruction + the L1 term
    of `code_losses` (unit or weighted form)."""

    architecture = "relu"
    summary = "ReLU with an L1 penalty"
    inference_form = "relu"
    sections = (L1Config,)
    l1_cfg: L1Config
    sparse_code = True  # only the z > 0 entries are encoded, decoded and penalised (the sparse kernels' path)
    sparsity_coefficient = ("l1", "l1_coef")
    refits_decoder = True

    def __init__(self, d_in: int, cfg: SAEConfig, options: dict[str, Any] | None = None, metadata: dict | None = None):
        super().__init__(d_in, cfg, options, metadata)
        # Instance attribute read by the base class hooks: only the 2023 form keeps unit-norm rows.
        self.unit_norm_decoder = self.l1_cfg.decoder_norm == "unit"

    @override
    def validate(self) -> None:
        l1 = self.l1_cfg
        if l1.decoder_norm not in DECODER_NORMS:
            raise SaelabError(
                f"Unknown --decoder-norm '{l1.decoder_norm}'; use weighted (2024 form) or unit (2023 form)."
            )
        if l1.b_dec_init not in B_DEC_INITS:
            raise SaelabError(f"Unknown --b-dec-init '{l1.b_dec_init}'; use zero or geomedian.")
        if l1.l1_coef < 0:
            raise SaelabError(f"--l1-coef must be >= 0 (got {l1.l1_coef}); pass a non-negative coefficient.")
        if not 0 <= l1.l1_warmup_fraction <= 1:
            raise SaelabError(
                f"--l1-warmup-fraction must be between 0 and 1 (got {l1.l1_warmup_fraction}); 0 disables the warmup."
            )
        if l1.decoder_init_norm <= 0:
            raise SaelabError(f"--decoder-init-norm must be > 0 (got {l1.decoder_init_norm}); the 2024 default is 0.1.")
        if l1.resample_scale < 0 or any(step <= 0 for step in l1.resample_steps):
            raise SaelabError("--resample-scale must be >= 0 and every --resample-steps entry a positive step number.")

    @override
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Tied init: random directions for the rows d_i of W_dec [d_sae, d_in], W_enc = W_dec^T, zero biases.
        Row norm: `decoder_init_norm` in the weighted form, 1 in the unit form."""
        super().reset_parameters(generator)
        if self.l1_cfg.decoder_norm == "weighted":
            with torch.no_grad():
                self.W_dec.mul_(self.l1_cfg.decoder_init_norm)
                self.W_enc.copy_(self.W_dec.T)

    @override
    def initial_sparsity_coef(self) -> float:
        return 5.0  # the 2024 recipe's lambda with constant input scaling

    @torch.no_grad()
    @override
    def initialize_from_data(self, x_n: torch.Tensor) -> None:
        """x_n [n, d_in]: b_dec = geometric median of the sample when --b-dec-init geomedian, else keep b_dec = 0;
        then b_enc = -(each latent's (1 - target_l0/d_sae) quantile of z), so ReLU(z) starts at the target L0."""
        if self.l1_cfg.b_dec_init == "geomedian":
            super().initialize_from_data(x_n)
        self.b_enc.sub_(target_quantiles(self, x_n))

    @override
    def resample_schedule(self) -> tuple[tuple[int, ...], float]:
        l1 = self.l1_cfg
        return tuple(l1.resample_steps), l1.resample_scale

    @override
    def sparsity_warmup_fraction(self) -> float:
        return 0.0 if self.l0_controller is not None else self.l1_cfg.l1_warmup_fraction

    @override
    def select(self, z: torch.Tensor, ctx: StepContext) -> SparseLayout:
        """z [batch, d_sae] -> the entries with z > 0 (the same in training and inference)."""
        return SparseLayout.from_mask(z > 0)

    @override
    def values_at(self, z_at: torch.Tensor, layout: SparseLayout, ctx: StepContext) -> torch.Tensor:
        """a = ReLU(z) at the kept entries [nnz] (ReLU only guards against rounding between the two z passes)."""
        return z_at.relu()

    @override
    def code_losses(
        self, encoder: EncoderPass, x_n: torch.Tensor, code: SparseCode, x_hat: torch.Tensor, ctx: StepContext
    ) -> dict[str, torch.Tensor]:
        """{"l1": lambda * mean_B sum_i a_i * w_i} with w_i = ||d_i||_2 (weighted) or 1 (unit), summed over the
        code's entries (a_i = 0 elsewhere, with zero gradient)."""
        coef = self.sparsity_coef() * ctx.sparsity_scale
        values = code.values
        if self.l1_cfg.decoder_norm == "weighted":
            values = values * self.W_dec.norm(dim=1)[code.layout.indices]
        return {"l1": coef * values.sum() / code.layout.batch}
