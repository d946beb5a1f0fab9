"""The SAE base class: parameters, input normalisation, encode/decode, losses, save-time folding.

A variant is one subclass that sets `architecture`, lists the config `sections` it reads, and defines its
code in one of two ways. Everything else is shared:

    x (raw activations)                               [batch, d_in]
      -> normalize:   x_n = x * input_scale  |  per-token layer norm
      -> encode_pre:  z = (x_n - p * b_dec) @ W_enc + b_enc          [batch, d_sae]
      -> activate:    a = variant's selection / threshold of z       [batch, d_sae]
      -> decode:      x_hat_n = a @ W_dec + b_dec                    [batch, d_in]
      -> denormalize: x_hat (raw space)

- Sparse-code variants (the top-k family incl. top-AFA, choice SAEs, JumpReLU's step/target modes) implement `select` (which entries of z are kept: a
  SparseLayout, no gradient) and `values_at` (the code's values from z at those entries, differentiable),
  plus `code_losses` for auxiliary terms. Training then never builds a dense [batch, d_sae] code or gradient:
  the encoder pass and decoder run on saelab.kernels' sparse autograd functions (or their dense fallback
  when the code is too dense for them to win; same numbers either way).
- Dense variants (ReLU-L1, JumpReLU's tanh mode, thresholds) implement `activate` and
  `sparsity_loss` on dense [batch, d_sae] tensors.

Losses are computed in the normalised space, so coefficients do not depend on the model's activation
scale; `fold()` moves the constant input scale (and, where exact, decoder norms) into the weights, so a
saved SAE maps raw activations to raw reconstructions with input_scale = 1.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from functools import cached_property
from typing import Any, ClassVar, NamedTuple

import torch
from torch import nn

from saelab.config import SAEConfig, Section
from saelab.errors import SaelabError
from saelab.kernels import SparseCode, SparseLayout, decode, encode_at
from saelab.kernels.backend import requested_backend
from saelab.sae.geometric_median import geometric_median
from saelab.sae.input_norm import INPUT_NORMS, InputNorm, TokenStats
from saelab.sae.sparsity import L0Controller

MSE_REDUCTIONS = ("sum", "mean")


class StepContext(NamedTuple):
    """What a training step knows beyond the batch.

    sparsity_scale: warmup factor in [0, 1] for sparsity coefficients
    dead:           [d_sae] bool, latents that have not fired for `dead_tokens` (None: none tracked)
    grads:          [batch, d_in] d(LM loss)/d(x) in the SAE's normalised space (g-SAE), or None
    sparse_kernels: sparse-code variants use saelab.kernels' sparse backward where it wins (False: always
                    the dense backward, the reference the sparse path is tested against)
    batch_variance: target [batch, d] -> the sum of ||t - mean||^2 that batch-normalised losses (the top-k
                    family's normalised MSE) divide by; None: the batch's own. Data-parallel training passes
                    this rank's share of the global batch's (saelab.train.distributed.global_variance).
    training:       False at inference (`INFERENCE`): batch-level variants use their inference thresholds, and
                    the code's values come from the dense pre-activations with the caller's autograd mode
    """

    sparsity_scale: float = 1.0
    dead: torch.Tensor | None = None
    grads: torch.Tensor | None = None
    sparse_kernels: bool = True
    batch_variance: Callable[[torch.Tensor], torch.Tensor] | None = None
    training: bool = True


INFERENCE = StepContext(training=False)


class Encoding(NamedTuple):
    """An inference encoding of raw activations [..., d_in], flattened to [batch, d_in]."""

    code: SparseCode  # the code over [batch, d_sae] (CSR)
    x_n: torch.Tensor  # [batch, d_in] the input in the SAE's normalised space
    stats: TokenStats | None  # what `denormalize` needs (layer norm's per-token mean and std)


class Reconstruction(NamedTuple):
    """An inference reconstruction of raw activations [..., d_in], flattened to [batch, d_in]."""

    x_hat: torch.Tensor  # [batch, d_in] raw reconstruction
    code: SparseCode  # the code over [batch, d_sae] it was decoded from


class LossOutput(NamedTuple):
    loss: torch.Tensor  # scalar to minimise
    terms: dict[str, torch.Tensor]  # named scalar parts (detached), e.g. {"mse": ..., "auxk": ...}
    code: SparseCode  # the code (values detached)
    x_hat: torch.Tensor  # [batch, d_in] reconstruction, normalised space


# Codes with more than this fraction of [batch, d_sae] entries kept train through dense matmuls instead of the
# sparse kernels. scripts/bench_step.py --crossover (CPU, n 16384, d 768, batch 4096): the sparse step is 3.9x
# faster at 0.2%, 1.8x at 5%, 1.13x at 15%, and 0.56x at 20%.
DENSE_CROSSOVER = 0.15


def prefers_dense(layout: SparseLayout) -> bool:
    """Whether dense matmuls beat the sparse kernels for this layout: above the measured density crossover, or
    when SAELAB_KERNELS=dense."""
    return requested_backend() == "dense" or layout.nnz > DENSE_CROSSOVER * layout.batch * layout.n_latents


class EncoderPass:
    """One batch's encoder pass for a sparse-code variant: dense pre-activations z [batch, d_sae] for selecting
    entries, and the pre-activations and decoding at the selected entries only.

    Training (ctx.training): the encoder input is x_n - center, center = b_dec with pre_enc_bias (its gradient
    flows) or None; z is computed once (on first use) without autograd, and `at` recomputes the selected entries
    on saelab.kernels' sparse autograd functions. Inference: z = sae.encode_pre(x_n) under the caller's autograd
    mode, and `at` gathers from it. `EncoderPass(sae, None, ctx, z=z)` selects from given pre-activations (for
    variants whose code depends on z alone).
    """

    def __init__(self, sae: SAE, x_n: torch.Tensor | None, ctx: StepContext, z: torch.Tensor | None = None):
        self.sae = sae
        self.x_n = x_n
        self.training = ctx.training and z is None
        self.center = sae.b_dec if sae.cfg.pre_enc_bias else None
        self.sparse_kernels = ctx.sparse_kernels
        self.z_graph = None if self.training else z if z is not None else sae.encode_pre(x_n)

    @cached_property
    def z(self) -> torch.Tensor:
        if self.z_graph is not None:
            return self.z_graph.detach()
        with torch.no_grad():
            x_in = self.x_n if self.center is None else self.x_n - self.center
            return torch.addmm(self.sae.b_enc, x_in, self.sae.W_enc)

    def use_dense(self, layout: SparseLayout) -> bool:
        return not self.sparse_kernels or prefers_dense(layout)

    def at(self, layout: SparseLayout) -> torch.Tensor:
        """[nnz] z at the layout's entries, with gradients to the encoder's inputs and weights."""
        if self.z_graph is not None:
            return self.z_graph[layout.rows, layout.indices]
        z_at = self.z[layout.rows, layout.indices]
        sae = self.sae
        return encode_at(self.x_n, self.center, sae.W_enc, sae.b_enc, layout, z_at, dense=self.use_dense(layout))

    def decode(self, code: SparseCode) -> torch.Tensor:
        """[batch, d_in] code @ W_dec (no bias), with gradients to the values and W_dec."""
        return decode(code.values, self.sae.W_dec, code.layout, dense=self.use_dense(code.layout))


class SAE(nn.Module):
    """Base sparse autoencoder. Subclasses implement select / values_at (sparse-code variants) or activate and
    sparsity_loss (dense variants); see the module docstring."""

    architecture: ClassVar[str] = ""
    summary: ClassVar[str] = ""  # a few words for --architecture's help
    # config sections (besides `sae`) this variant reads; section `name` is the attribute `<name>_cfg`
    sections: ClassVar[tuple[type[Section], ...]] = ()
    unit_norm_decoder: ClassVar[bool] = True  # keep decoder rows at unit norm during training
    signed: ClassVar[bool] = False  # codes may be negative (AbsTopK): statistics count a != 0
    default_lr: ClassVar[float] = 2e-4  # scaled by (d_sae / 2**14) ** -0.5 when --lr is 0
    sparse_code: ClassVar[bool] = False  # the variant implements select / values_at / code_losses
    calibrates_inference: ClassVar[bool] = False  # calibrate_inference fixes its inference state after training
    # penalty variants, whose codes shrink: the trainer refits W_dec and b_dec to the frozen codes after training
    # (saelab.sae.refit, TrainConfig.decoder_refit_tokens)
    refits_decoder: ClassVar[bool] = False
    # (section, option) of the one coefficient that sets this variant's L0, adapted by an L0Controller toward
    # --target-l0 while the option is 0 (saelab.sae.sparsity); None: the variant fixes its L0 itself (top-k family).
    sparsity_coefficient: ClassVar[tuple[str, str] | None] = None
    sparsity_sign: ClassVar[int] = 1  # +1: a larger coefficient gives a sparser code; -1: a denser one
    needs_lm_grads: ClassVar[bool] = False  # training reads d(LM loss)/dx at its hook (ctx.grads; g-SAE)
    # The code at inference, for exporters (saelab.sae.saelens): "relu" (ReLU(x_in W_enc + relu_encoder_bias())),
    # "topk" / "abstopk" (per token, the cfg.k entries of largest z / |z|), "jump" (z 1[z > jump_threshold()]), or
    # None (none of these).
    inference_form: ClassVar[str | None] = None

    def __init__(self, d_in: int, cfg: SAEConfig, options: dict[str, Any] | None = None, metadata: dict | None = None):
        super().__init__()
        if cfg.input_norm not in INPUT_NORMS:
            raise SaelabError(f"Unknown --input-norm '{cfg.input_norm}'; use one of {', '.join(INPUT_NORMS)}.")
        if cfg.mse_reduction not in MSE_REDUCTIONS:
            raise SaelabError(f"Unknown --mse-reduction '{cfg.mse_reduction}'; use sum or mean.")
        d_sae = cfg.d_sae or cfg.expansion * d_in
        if d_in <= 0 or d_sae <= 0:
            raise SaelabError(f"SAE sizes must be positive (d_in={d_in}, d_sae={d_sae}).")
        if not cfg.target_l0 > 0:
            raise SaelabError(f"--target-l0 must be > 0 (got {cfg.target_l0}): the active latents per token to train toward.")
        self.cfg = dataclasses.replace(cfg, d_sae=d_sae, k=cfg.k or max(1, round(cfg.target_l0)))
        self.d_in, self.d_sae = d_in, d_sae
        options = options or {}
        for section in self.sections:
            setattr(self, f"{section.name}_cfg", options.get(section.name) or section())
        self.metadata = dict(metadata or {})  # hook, model, trained tokens...: informational, saved in cfg.json
        self.W_enc = nn.Parameter(torch.empty(d_in, d_sae))
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.W_dec = nn.Parameter(torch.empty(d_sae, d_in))
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        self.register_buffer("input_scale", torch.ones(()))
        self.l0_controller: L0Controller | None = None
        if self.sparsity_coefficient is not None and self.fixed_sparsity_coef() == 0:
            self.l0_controller = L0Controller(
                cfg.target_l0, self.initial_sparsity_coef(), cfg.l0_control_rate, self.sparsity_sign
            )
        self.validate()
        self.reset_parameters()

    # -- construction -----------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise a SaelabError for option values this variant cannot use. Extended by subclasses."""

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Tied init: random unit-norm decoder rows, W_enc = W_dec^T, zero biases."""
        with torch.no_grad():
            self.W_dec.copy_(torch.randn(self.d_sae, self.d_in, generator=generator))
            self.W_dec /= self.W_dec.norm(dim=1, keepdim=True)
            self.W_enc.copy_(self.W_dec.T)
            self.b_enc.zero_()
            self.b_dec.zero_()

    @property
    def options(self) -> dict[str, Section]:
        """Section name -> this SAE's config section, for every section it reads."""
        return {section.name: getattr(self, f"{section.name}_cfg") for section in self.sections}

    # -- sparsity target ---------------------------------------------------------------------------
    def fixed_sparsity_coef(self) -> float:
        """The sparsity coefficient's option as given (0: adapted toward --target-l0)."""
        section, name = self.sparsity_coefficient
        return getattr(self.options[section], name)

    def initial_sparsity_coef(self) -> float:
        """Where the L0 controller starts its coefficient (variants with a sparsity_coefficient override this)."""
        return 1.0

    def sparsity_coef(self) -> torch.Tensor | float:
        """The coefficient in force: the controller's value while it adapts, else the fixed option."""
        return self.l0_controller.value if self.l0_controller is not None else self.fixed_sparsity_coef()

    @torch.no_grad()
    def adapt_sparsity(self, code: SparseCode) -> None:
        """After a training step (no grad): one controller step from the step's code (no-op without a controller)."""
        if self.l0_controller is not None:
            self.l0_controller.update(code.l0())

    @torch.no_grad()
    def freeze_sparsity(self) -> None:
        """Write the controller's coefficient into its option and drop the controller (saved SAEs hold a fixed
        coefficient, so they load as they ran)."""
        if self.l0_controller is not None:
            section, name = self.sparsity_coefficient
            frozen = dataclasses.replace(self.options[section], **{name: float(self.l0_controller.value)})
            setattr(self, f"{section}_cfg", frozen)
            self.l0_controller = None

    @torch.no_grad()
    def initialize_from_data(self, x_n: torch.Tensor) -> None:
        """Data-dependent init from a sample [n, d_in] in the normalised space (before training).
        Default: b_dec = geometric median of the sample (OpenAI TopK's b_pre; Bricken 2023)."""
        self.b_dec.copy_(geometric_median(x_n).to(self.b_dec))

    def sparsity_warmup_fraction(self) -> float:
        """Fraction of training over which the trainer ramps ctx.sparsity_scale from 0 to 1."""
        return 0.0

    def resample_schedule(self) -> tuple[tuple[int, ...], float]:
        """(steps after which the trainer resamples dead latents, the resampled encoder rows' norm as a fraction of
        the mean alive one); no steps by default (saelab.train.resample)."""
        return (), 0.0

    # -- the map: what users call (inference) ------------------------------------------------------
    # encode (dense code), encode_code (sparse code + its context), reconstruct / forward (the reconstruction),
    # decode_code (a code back to the normalised space); training's entry point is training_loss.
    def encode_code(self, x: torch.Tensor) -> Encoding:
        """Raw activations [..., d_in] -> Encoding (the code over [batch, d_sae] as CSR, x_n, stats), the leading
        dims flattened. The inference entry point for evaluation and dashboards: the code stays sparse."""
        x_n, stats = self.normalize(x.reshape(-1, self.d_in))
        return Encoding(self.encode_normalized(x_n), x_n, stats)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Raw activations [..., d_in] -> dense code [..., d_sae] (inference)."""
        code, _, _ = self.encode_code(x)
        return code.dense().reshape(*x.shape[:-1], self.d_sae)

    def reconstruct(self, x: torch.Tensor) -> Reconstruction:
        """Raw activations [..., d_in] -> Reconstruction (raw x_hat [batch, d_in], the code over [batch, d_sae]),
        the leading dims flattened."""
        code, _, stats = self.encode_code(x)
        return Reconstruction(self.denormalize(self.decode_code(code), stats), code)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Raw activations [..., d_in] -> raw reconstruction [..., d_in] (inference; sparse decode)."""
        return self.reconstruct(x)[0].reshape(x.shape)

    def decode_code(self, code: SparseCode) -> torch.Tensor:
        """A SparseCode over [batch, d_sae] -> reconstruction [batch, d_in] in the normalised space, on the sparse
        kernels unless the code is dense enough for the matmul to win (differentiable in values and W_dec)."""
        return decode(code.values, self.W_dec, code.layout, dense=prefers_dense(code.layout)) + self.b_dec

    @property
    def input_norm(self) -> InputNorm:
        """The map between raw activations and this SAE's space (over the input_scale buffer)."""
        return InputNorm(self.cfg.input_norm, self.input_scale)

    def normalize(self, x: torch.Tensor) -> tuple[torch.Tensor, TokenStats | None]:
        """Raw x [batch, d_in] -> (x in the SAE's space, what `denormalize` needs)."""
        return self.input_norm.to_sae(x)

    def denormalize(self, x_hat: torch.Tensor, stats: TokenStats | None) -> torch.Tensor:
        """Inverse of `normalize`: x_hat [batch, d_in] in the SAE's space -> raw space."""
        return self.input_norm.from_sae(x_hat, stats)

    # -- variant hooks: the stages a variant defines or overrides -------------------------------------
    def encode_pre(self, x_n: torch.Tensor) -> torch.Tensor:
        """[batch, d_in] (normalised) -> pre-activations z [batch, d_sae]."""
        if self.cfg.pre_enc_bias:
            x_n = x_n - self.b_dec
        return x_n @ self.W_enc + self.b_enc

    def select(self, z: torch.Tensor, ctx: StepContext) -> SparseLayout:
        """Sparse-code variants: z [batch, d_sae] (no grad) -> the entries the code keeps."""
        raise NotImplementedError(f"{type(self).__name__} (a sparse-code variant) must implement select.")

    def values_at(self, z_at: torch.Tensor, layout: SparseLayout, ctx: StepContext) -> torch.Tensor:
        """Sparse-code variants: z at the kept entries [nnz] -> the code's values there [nnz] (differentiable)."""
        raise NotImplementedError(f"{type(self).__name__} (a sparse-code variant) must implement values_at.")

    def select_entries(self, encoder: EncoderPass, ctx: StepContext) -> SparseLayout:
        """Sparse-code variants: the entries the code keeps, from the encoder pass; select(encoder.z, ctx) unless
        the variant needs more than z (top-AFA reads encoder.x_n)."""
        return self.select(encoder.z, ctx)

    def sparse_code_of(self, encoder: EncoderPass, ctx: StepContext) -> SparseCode:
        """Sparse-code variants: the code of an encoder pass (values differentiable, selection not)."""
        layout = self.select_entries(encoder, ctx)
        return SparseCode(layout, self.values_at(encoder.at(layout), layout, ctx))

    def encode_normalized(self, x_n: torch.Tensor, ctx: StepContext = INFERENCE) -> SparseCode:
        """x_n [batch, d_in] in the normalised space -> the code over [batch, d_sae] (CSR; no autograd through the
        selection). Dense variants keep the nonzero entries of `activate`."""
        if self.sparse_code:
            return self.sparse_code_of(EncoderPass(self, x_n, ctx), ctx)
        return SparseCode.from_dense(self.activate(self.encode_pre(x_n), ctx))

    def activate(self, z: torch.Tensor, ctx: StepContext = INFERENCE) -> torch.Tensor:
        """z [batch, d_sae] -> dense code a [batch, d_sae], for variants whose code is a function of z alone.
        Dense variants implement it; sparse-code variants select from z (their select / values_at)."""
        if not self.sparse_code:
            raise NotImplementedError(f"{type(self).__name__} (a dense variant) must implement activate.")
        return self.sparse_code_of(EncoderPass(self, None, ctx, z=z), ctx).dense()

    def decode(self, a: torch.Tensor) -> torch.Tensor:
        """a [batch, d_sae] -> reconstruction [batch, d_in] in the normalised space."""
        return a @ self.W_dec + self.b_dec

    # -- training ----------------------------------------------------------------------------------
    def reconstruction_loss(self, x_n: torch.Tensor, x_hat: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """Squared error summed (or averaged, per --mse-reduction) over d_in, averaged over tokens."""
        squared = (x_hat - x_n).pow(2)
        return squared.sum(-1).mean() if self.cfg.mse_reduction == "sum" else squared.mean()

    def sparsity_loss(
        self, x_n: torch.Tensor, z: torch.Tensor, a: torch.Tensor, x_hat: torch.Tensor, ctx: StepContext
    ) -> dict[str, torch.Tensor]:
        """Dense variants: named loss terms besides reconstruction (already weighted by their coefficients)."""
        return {}

    def code_losses(
        self, encoder: EncoderPass, x_n: torch.Tensor, code: SparseCode, x_hat: torch.Tensor, ctx: StepContext
    ) -> dict[str, torch.Tensor]:
        """Sparse-code variants: named loss terms besides reconstruction (e.g. AuxK), weighted."""
        return {}

    def training_loss(self, x_n: torch.Tensor, ctx: StepContext) -> LossOutput:
        """x_n [batch, d_in] in the normalised space -> loss and its parts."""
        if self.sparse_code:
            encoder = EncoderPass(self, x_n, ctx)
            code = self.sparse_code_of(encoder, ctx)
            x_hat = encoder.decode(code) + self.b_dec
            terms = {"mse": self.reconstruction_loss(x_n, x_hat, ctx)}
            terms.update(self.code_losses(encoder, x_n, code, x_hat, ctx))
        else:
            z = self.encode_pre(x_n)
            a = self.activate(z, ctx)
            x_hat = self.decode(a)
            terms = {"mse": self.reconstruction_loss(x_n, x_hat, ctx)}
            terms.update(self.sparsity_loss(x_n, z, a, x_hat, ctx))
            code = SparseCode.from_dense(a)
        loss = sum(terms.values())
        detached = SparseCode(code.layout, code.values.detach())
        return LossOutput(loss, {k: v.detach() for k, v in terms.items()}, detached, x_hat)

    def relu_encoder_bias(self) -> torch.Tensor:
        """inference_form "relu": the bias b [d_sae] with code = ReLU(x_in @ W_enc + b)."""
        return self.b_enc

    def jump_threshold(self) -> torch.Tensor:
        """inference_form "jump": theta [d_sae] with code = z * 1[z > theta]."""
        raise NotImplementedError(f"{type(self).__name__} has no inference threshold.")

    def update_inference_state(self, code: SparseCode) -> None:
        """After each training step (no grad), from its code: e.g. running thresholds of batch-level variants."""

    def calibrate_inference(self, x_n: torch.Tensor) -> None:
        """Once training ends, from x_n [T, d_in] normalised training inputs: fix inference state that a running
        estimate only approximates (batch-level variants' thresholds; they set `calibrates_inference`)."""

    @torch.no_grad()
    def remove_parallel_decoder_grad(self) -> None:
        """Unit-norm decoders: project out the gradient component parallel to each row (after backward)."""
        if not self.unit_norm_decoder or self.W_dec.grad is None:
            return
        W, grad = self.W_dec, self.W_dec.grad
        # grad -= (grad . d_i / ||d_i||^2) d_i, row by row, without [d_sae, d_in] temporaries
        parallel = torch.bmm(grad.unsqueeze(1), W.unsqueeze(2)).view(-1) / W.norm(dim=1).square()
        grad.addcmul_(W, parallel.unsqueeze(1), value=-1)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Unit-norm decoders: rescale rows to norm 1 (after the optimiser step)."""
        if self.unit_norm_decoder:
            self.W_dec /= self.W_dec.norm(dim=1, keepdim=True)

    # -- saving ------------------------------------------------------------------------------------
    @torch.no_grad()
    def fold(self) -> SAE:
        """Fold the constant input scale into the weights (InputNorm.fold) and fix the sparsity coefficient at the
        controller's value (freeze_sparsity). Neither changes a code: a saved SAE's codes are the ones it was
        trained with, for every variant (dashboards, steering and evaluations read them), and its decoder rows
        are in raw units (the trained rows divided by c)."""
        self.freeze_sparsity()
        folded = self.input_norm.fold(self.W_enc, self.W_dec, self.b_dec)
        if folded is not None:
            self.metadata["folded_input_scale"] = folded
        return self

    def config_dict(self) -> dict[str, Any]:
        """What cfg.json holds: enough to rebuild this SAE (with `saelab.sae.load`)."""
        return {
            "architecture": self.architecture,
            "d_in": self.d_in,
            "d_sae": self.d_sae,
            "sae": dataclasses.asdict(self.cfg),
            **{name: dataclasses.asdict(opt) for name, opt in self.options.items()},
            "metadata": self.metadata,
        }

    def default_learning_rate(self) -> float:
        return self.default_lr * math.sqrt(2**14 / self.d_sae)
