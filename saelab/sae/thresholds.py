"""Thresholding operators beyond ReLU (Rentzeperis et al. 2023, "Beyond l1 sparse coding in V1") and an SAE
that uses them as its activation.

soft, hard, half (Xu et al. 2012), lq and CEL0 (Soubies et al. 2015), each the proximal map of a separable penalty,
op(u) = argmin_a 1/2 (a - u)^2 + gamma * P(a) elementwise; `ThresholdSAE` codes with op(ReLU(z)) and trains with the
sparse-coding objective whose proximal step that is.

Math, defaults and choices: docs/algorithms.md, section "Thresholds".
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from typing_extensions import override

from saelab.config import Section, option
from saelab.errors import SaelabError
from saelab.kernels import SparseCode, SparseLayout
from saelab.sae.base import SAE, EncoderPass, StepContext
from saelab.sae.sparsity import target_quantiles


@dataclass
class ThresholdConfig(Section):
    name: ClassVar[str] = "threshold"

    threshold_family: str = option("soft", "Thresholding operator: soft, hard, half, lq or cel0.")
    threshold_lambda: float = option(
        0.0, "Penalty weight lambda of the operator; 0: adapted to reach --target-l0.", min=0
    )
    threshold_gamma: float = option(0.01, "Step gamma (t = lambda * gamma); CEL0 needs gamma * ||d_i||^2 < 1.", above=0)
    threshold_q: float = option(0.5, "Exponent q of the lq family (0 < q < 1).", above=0)


FAMILIES = ("soft", "hard", "half", "lq", "cel0")
_NEWTON_MAX_ITERS = 100


def _as_like(value: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(value, dtype=like.dtype, device=like.device)


def _work_dtype(u: torch.Tensor) -> torch.dtype:
    """Compute in float32 at least (half / bfloat16 inputs lose the Newton and arccos accuracy)."""
    return u.dtype if u.dtype in (torch.float32, torch.float64) else torch.float32


def soft(u: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
    """Soft threshold, the prox of t|a|:  sign(u) * (|u| - t)_+.   u: any shape; t >= 0 broadcastable to u.

    Continuous, odd; the l1 proximal step (ReLU(u - t) on non-negative inputs)."""
    return u.sign() * (u.abs() - t).clamp_min(0)


def hard(u: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
    """Hard threshold, the prox of t 1[a != 0]:  u * 1[|u| > sqrt(2t)].   u: any shape; t >= 0.

    Keeping a = u costs t, zeroing costs u^2 / 2, hence the threshold sqrt(2t) (the Rentzeperis repo uses
    sqrt(t), i.e. the penalty t/2). Jumps from 0 to sqrt(2t) at the threshold; derivative 1[|u| > sqrt(2t)]."""
    threshold = (2 * _as_like(t, u)).sqrt()
    return u * (u.abs() > threshold)


def half_threshold(t: float | torch.Tensor) -> float | torch.Tensor:
    """tau_{1/2} = 3/2 t^(2/3): below it the prox of t|a|^(1/2) is 0 (equals (cbrt 54 / 4)(2t)^(2/3))."""
    return 1.5 * t ** (2 / 3)


def half(u: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
    """l_{1/2} threshold (Xu et al. 2012), the prox of t|a|^(1/2):  argmin_a 1/2 (a - u)^2 + t |a|^(1/2).

    Xu et al. write the problem as (a - u)^2 + t_X |a|^(1/2) (no 1/2), i.e. t_X = 2t. With their formula:
        op(u) = 0                                                     if |u| <= (cbrt(54)/4) t_X^(2/3) = 3/2 t^(2/3)
        op(u) = 2/3 u (1 + cos(2 pi / 3 - 2/3 phi(u))),  phi(u) = arccos(t_X/8 (|u|/3)^(-3/2))   otherwise.
    So `half(u, t) == lq(u, t, 0.5)`. u: any shape; t >= 0. Jumps from 0 to 2/3 tau at tau = 3/2 t^(2/3)."""
    dtype = u.dtype
    u = u.to(_work_dtype(u))
    t_x = 2 * _as_like(t, u)
    tau = half_threshold(t_x / 2)
    magnitude = u.abs()
    keep = magnitude > tau
    # Evaluate the branch only where it applies: elsewhere arccos could see an argument > 1 (NaN gradients).
    safe = torch.where(keep, magnitude, torch.maximum(tau, torch.ones_like(magnitude)))
    phi = torch.arccos(t_x / 8 * (safe / 3).pow(-1.5))
    value = 2 / 3 * safe * (1 + torch.cos(2 * math.pi / 3 - 2 / 3 * phi))
    return (u.sign() * torch.where(keep, value, torch.zeros_like(value))).to(dtype)


def lq_threshold(t: float | torch.Tensor, q: float) -> float | torch.Tensor:
    """tau_q = (2 - q)/(2 - 2q) * (2t(1 - q))^(1/(2 - q)): the prox of t|a|^q is 0 for |u| <= tau_q.

    q -> 0 gives sqrt(2t) (hard), q = 1/2 gives 3/2 t^(2/3) (half)."""
    return (2 - q) / (2 - 2 * q) * (2 * t * (1 - q)) ** (1 / (2 - q))


def lq(u: torch.Tensor, t: float | torch.Tensor, q: float) -> torch.Tensor:
    """General l_q threshold, 0 < q < 1: the prox of t|a|^q,  argmin_a 1/2 (a - u)^2 + t |a|^q.

    For |u| <= tau_q (`lq_threshold`) the answer is 0; above, a = sign(u) * a*, where a* is the largest root of
        f(a) = a + t q a^(q-1) - |u| = 0,
    found by Newton's method from a = |u|. f is convex and f(|u|) > 0, so the iterates decrease monotonically
    to a* (where f'(a*) >= 1 - q/2 > 0): no bracketing needed. The gradient is the implicit derivative
        d a*/d|u| = 1 / (1 + t q (q - 1) a*^(q-2)),
    not an unrolled Newton graph. u: any shape; t >= 0 (float or broadcastable tensor, no gradient)."""
    if not 0 < q < 1:
        raise SaelabError(f"lq needs 0 < q < 1 (got q={q}); use hard (q -> 0) or soft (q = 1) instead.")
    dtype = u.dtype
    u = u.to(_work_dtype(u))
    t = _as_like(t, u).detach()
    magnitude = u.abs()
    keep = magnitude.detach() > lq_threshold(t, q)
    with torch.no_grad():
        target = torch.where(keep, magnitude, torch.ones_like(magnitude))
        a = target.clone()
        for _ in range(_NEWTON_MAX_ITERS):
            f = a + t * q * a.pow(q - 1) - target
            slope = 1 + t * q * (q - 1) * a.pow(q - 2)
            step = torch.where(keep, f / slope, torch.zeros_like(f))
            a = a - step
            if bool((step.abs() <= 4 * torch.finfo(a.dtype).eps * a).all()):
                break
        slope = 1 + t * q * (q - 1) * a.pow(q - 2)
    a = a + (magnitude - magnitude.detach()) / slope  # value a*, gradient d a*/d|u|
    return (u.sign() * torch.where(keep, a, torch.zeros_like(a))).to(dtype)


def cel0(
    u: torch.Tensor, lam: float | torch.Tensor, gamma: float | torch.Tensor, d_norm: float | torch.Tensor = 1.0
) -> torch.Tensor:
    """CEL0 threshold (Soubies et al. 2015): the prox of gamma * Phi_CEL0, with (per entry)

        Phi_CEL0(a) = lambda - ||d||^2 / 2 * (|a| - sqrt(2 lambda)/||d||)^2 * 1[|a| <= sqrt(2 lambda)/||d||],
        op(u) = sign(u) * min(|u|, (|u| - sqrt(2 lambda) ||d|| gamma)_+ / (1 - ||d||^2 gamma)).

    With ||d|| = 1: 0 for |u| <= gamma sqrt(2 lambda), a linear ramp of slope 1/(1 - gamma), and the identity
    from |u| = sqrt(2 lambda). Continuous and odd; the 1-D objective is strictly convex, so this is its unique
    minimiser, which needs gamma ||d||^2 < 1. u: any shape; lam >= 0; gamma > 0; d_norm (the decoder row
    norm ||d_i||, e.g. shape [d_sae] for u [batch, d_sae]) broadcastable to u."""
    d_norm = _as_like(d_norm, u)
    if bool((gamma * d_norm.pow(2) >= 1).any()):
        raise SaelabError(f"CEL0 needs gamma * ||d_i||^2 < 1 (gamma={float(gamma)}); lower --threshold-gamma.")
    magnitude = u.abs()
    ramp = (magnitude - math.sqrt(2 * float(lam)) * d_norm * gamma).clamp_min(0) / (1 - d_norm.pow(2) * gamma)
    return u.sign() * torch.minimum(magnitude, ramp)


def cel0_penalty(a: torch.Tensor, lam: float, d_norm: float | torch.Tensor = 1.0) -> torch.Tensor:
    """Phi_CEL0(a) elementwise (see `cel0`): 0 at a = 0, rising concavely to lambda at |a| = sqrt(2 lambda)/||d||,
    then flat. Its global minimisers with 1/2 ||x - Da||^2 are those of 1/2 ||x - Da||^2 + lambda ||a||_0."""
    d_norm = _as_like(d_norm, a)
    corner = math.sqrt(2 * lam) / d_norm
    gap = (a.abs() - corner).clamp_max(0)  # 0 above the corner: flat at lambda
    return lam - d_norm.pow(2) / 2 * gap.pow(2)


def threshold_op(
    u: torch.Tensor, family: str, lam: float, gamma: float, q: float = 0.5, d_norm: float | torch.Tensor = 1.0
) -> torch.Tensor:
    """Apply `family`'s operator with t = lam * gamma (CEL0 takes lam, gamma and d_norm). u: any shape."""
    t = lam * gamma
    if family == "soft":
        return soft(u, t)
    if family == "hard":
        return hard(u, t)
    if family == "half":
        return half(u, t)
    if family == "lq":
        return lq(u, t, q)
    if family == "cel0":
        return cel0(u, lam, gamma, d_norm)
    raise SaelabError(f"Unknown --threshold-family '{family}'; use one of {', '.join(FAMILIES)}.")


def zero_below(
    family: str, lam: float, gamma: float, q: float = 0.5, d_norm: float | torch.Tensor = 1.0
) -> float | torch.Tensor:
    """The magnitude at or below which `threshold_op(., family, lam, gamma, q, d_norm)` is 0 (a tensor shaped like
    d_norm for CEL0, a float otherwise): soft t, hard sqrt(2t), half / lq tau_q, CEL0 gamma sqrt(2 lambda) ||d||."""
    t = lam * gamma
    if family == "soft":
        return t
    if family == "hard":
        return math.sqrt(2 * t)
    if family == "half":
        return half_threshold(t)
    if family == "lq":
        return lq_threshold(t, q)
    if family == "cel0":
        return math.sqrt(2 * lam) * gamma * d_norm
    raise SaelabError(f"Unknown --threshold-family '{family}'; use one of {', '.join(FAMILIES)}.")


def threshold_penalty(
    a: torch.Tensor, family: str, lam: float, q: float = 0.5, d_norm: float | torch.Tensor = 1.0
) -> torch.Tensor:
    """Elementwise penalty P(a) whose prox (step gamma) is `threshold_op(., family, lam, gamma)`. a: any shape.

    soft lam|a|;  hard lam 1[a != 0];  half lam|a|^(1/2);  lq lam|a|^q;  cel0 Phi_CEL0(a; lam, d_norm).
    Powers are evaluated only on nonzero entries, so the gradient at a = 0 is 0, not inf * 0 = NaN."""
    if family == "soft":
        return lam * a.abs()
    if family == "hard":
        return lam * (a != 0).to(a.dtype)
    if family in ("half", "lq"):
        exponent = 0.5 if family == "half" else q
        magnitude = a.abs()
        nonzero = magnitude > 0
        tiny = torch.finfo(a.dtype).tiny
        powered = magnitude.clamp_min(tiny).pow(exponent)
        return lam * torch.where(nonzero, powered, torch.zeros_like(powered))
    if family == "cel0":
        return cel0_penalty(a, lam, d_norm)
    raise SaelabError(f"Unknown --threshold-family '{family}'; use one of {', '.join(FAMILIES)}.")


class ThresholdSAE(SAE):
    """SAE whose activation is a fixed proximal operator (section `threshold`): soft, hard, half, lq or cel0.

        z = encode_pre(x_n)                                     [batch, d_sae]
        a = op(ReLU(z))     t = lambda * gamma                  [batch, d_sae]   (non-negative codes)
        x_hat = a W_dec + b_dec                                 [batch, d_in]

    Non-negative version: the operator is applied to ReLU(z), so codes are >= 0;
    for these odd operators this equals ReLU(op(z)).

    Loss (sum reduction): ||x - x_hat||^2 + 2 sum_i P(a_i), averaged over tokens, i.e. exactly
    2 * mean_B J(a) with J = 1/2 ||x - x_hat||^2 + sum_i P(a_i), the sparse-coding objective whose proximal
    step (step gamma) is the activation; P is `threshold_penalty` of the family. With --mse-reduction mean both
    terms are divided by d_in, so lambda keeps its meaning. The decoder trains with unit-norm rows, so CEL0 uses
    ||d_i|| = 1 throughout: the code stays what it was trained to be after the decoder refit (saelab.sae.refit)
    and folding, which change the stored row norms.

    The code keeps only the entries above the operator's zero region (`zero_below`), so training runs on the
    sparse kernels; gradients are exact, since every operator is flat at 0 there.

    Gradients: the threshold t is a fixed hyperparameter, not a parameter, so no straight-through estimator is
    needed: the almost-everywhere derivative of the operator (1 on the support for hard; the closed form's or the
    implicit derivative for half / lq; 1/(1 - gamma) on CEL0's ramp) trains the encoder. The hard penalty
    lambda 1[a != 0] is piecewise constant, so it is logged but gives no gradient: for `hard` the threshold
    sqrt(2t) alone sets sparsity. A learnt threshold would need the JumpReLU estimator
    (docs/algorithms.md, section "JumpReLU").
    """

    architecture = "threshold"
    summary = "soft, hard, half, lq or CEL0 thresholding"
    sections = (ThresholdConfig,)
    threshold_cfg: ThresholdConfig
    sparsity_coefficient = ("threshold", "threshold_lambda")
    refits_decoder = True
    sparse_code = True  # only entries above the operator's zero region are encoded, decoded and penalised

    @override
    def initial_sparsity_coef(self) -> float:
        return 1.0

    @torch.no_grad()
    @override
    def initialize_from_data(self, x_n: torch.Tensor) -> None:
        """x_n [n, d_in]: b_dec = geometric median; then b_enc = -(each latent's (1 - target_l0/d_sae) quantile of z),
        so ReLU(z) starts at the target L0 (the operator's threshold only removes more)."""
        super().initialize_from_data(x_n)
        self.b_enc.sub_(target_quantiles(self, x_n))

    @override
    def validate(self) -> None:
        opt = self.threshold_cfg
        if opt.threshold_family not in FAMILIES:
            raise SaelabError(f"Unknown --threshold-family '{opt.threshold_family}'; use one of {', '.join(FAMILIES)}.")
        if opt.threshold_lambda < 0 or opt.threshold_gamma <= 0:
            raise SaelabError("--threshold-lambda must be >= 0 and --threshold-gamma > 0.")
        if opt.threshold_family == "lq" and not 0 < opt.threshold_q < 1:
            raise SaelabError(f"--threshold-q must be in (0, 1) for the lq family (got {opt.threshold_q}).")
        if opt.threshold_family == "cel0" and opt.threshold_gamma >= 1:
            raise SaelabError(
                f"CEL0 needs gamma * ||d_i||^2 < 1 with unit decoder rows, i.e. --threshold-gamma < 1 "
                f"(got {opt.threshold_gamma})."
            )

    def _operator_args(self) -> tuple[str, float, float, float]:
        opt = self.threshold_cfg
        return opt.threshold_family, float(self.sparsity_coef()), opt.threshold_gamma, opt.threshold_q

    @property
    @override
    def inference_form(self) -> str | None:
        """Soft: ReLU(z - t), a ReLU SAE; hard: z 1[z > sqrt(2t)], a jump; half, lq and CEL0 shrink past their jump."""
        return {"soft": "relu", "hard": "jump"}.get(self.threshold_cfg.threshold_family)

    @override
    def relu_encoder_bias(self) -> torch.Tensor:
        return self.b_enc - self.zero_below()

    @override
    def jump_threshold(self) -> torch.Tensor:
        return torch.full_like(self.b_enc, self.zero_below()).detach()

    def zero_below(self) -> float:
        """The pre-activation at or below which every code entry is 0 (unit decoder rows: one value for all)."""
        return zero_below(*self._operator_args())

    @override
    def select(self, z: torch.Tensor, ctx: StepContext) -> SparseLayout:
        """z [batch, d_sae] -> the entries where op(ReLU(z)) is nonzero: z above the family's zero region."""
        return SparseLayout.from_mask(z > self.zero_below())

    @override
    def values_at(self, z_at: torch.Tensor, layout: SparseLayout, ctx: StepContext) -> torch.Tensor:
        """a = op(ReLU(z)) at the kept entries [nnz], a >= 0 (same map in training and inference)."""
        return threshold_op(z_at.relu(), *self._operator_args())

    @override
    def code_losses(
        self, encoder: EncoderPass, x_n: torch.Tensor, code: SparseCode, x_hat: torch.Tensor, ctx: StepContext
    ) -> dict[str, torch.Tensor]:
        """{"sparsity": 2 mean_B sum_i P(a_i)} over the code's entries (P(0) = 0), divided by d_in under mean
        reduction; see the class docstring."""
        family, lam, _, q = self._operator_args()
        penalty = threshold_penalty(code.values, family, lam, q)
        scale = 2.0 if self.cfg.mse_reduction == "sum" else 2.0 / self.d_in
        return {"sparsity": scale * ctx.sparsity_scale * penalty.sum() / code.layout.batch}
