"""Steer a model with SAE features: add, clamp or project out decoder directions at the SAE's hook.

    with steer(model, sae, Add(1234, alpha=8.0)):                  # every forward inside is steered
        logits = model(tokens)
    generate(model, "The weather today", sae, [Clamp(1234, value=20.0)])
    sweep(model, sae, Add(1234, alpha=0.0), alphas=[-8, 0, 8, 16], prompt="...", reference="...")

An intervention edits the hook's activation h per token ([batch, pos, d]; hook_z's [batch, pos, n_heads, d_head]
is flattened to n_heads * d_head and reshaped back). Interventions apply in the order given, each to the result
of the one before. d_i is decoder row i in the hook's raw space, so alpha and clamp values are in units of the
latent's activation (adding alpha d_i is what latent i firing at alpha would add to the reconstruction).

    Add      h' = h + sum_i alpha_i d_i
    Clamp    h' = h + sum_i (c_i - a_i(h)) d_i    a_i(h): the SAE's code of h. The SAE's error h - x_hat is kept,
                                                  so clamping a latent to its own value changes nothing.
    Project  h' = h - (1 - scale) P h             P projects onto span{d_i}: scale 0 removes the component, 2 doubles it

`positions` picks where an intervention acts: "all", "prompt" / "generated" (split at the prompt's length during
`generate`), an int p (positions p and later) or a list of positions. Positions holding special tokens (BOS,
separators) are left alone whenever the tokens are known (every helper here), as SAEs are not trained there.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from saelab.activations.hooks import per_token, resolve_hooks
from saelab.activations.source import ActivationSource
from saelab.analysis.splice import next_token_losses, run_logits, splice_keep_mask
from saelab.errors import SaelabError
from saelab.sae.base import SAE
from saelab.sae.io import recorded_hook

Positions = str | int | Sequence[int]
Features = int | Sequence[int]
POSITION_NAMES = ("all", "prompt", "generated")


def _as_list(features: Features) -> list[int]:
    return [int(features)] if isinstance(features, int) else [int(f) for f in features]


def _per_feature(values: float | Sequence[float], n: int, what: str) -> torch.Tensor:
    """A scalar or one value per feature -> [n] float32."""
    tensor = torch.as_tensor(values, dtype=torch.float32).flatten()
    if tensor.numel() == 1:
        return tensor.expand(n)
    if tensor.numel() != n:
        raise SaelabError(f"Give one {what} or one per feature ({n} features), not {tensor.numel()}.")
    return tensor


def raw_change(sae: SAE, change_n: torch.Tensor, stats: Any) -> torch.Tensor:
    """A change [n, d_in] of the reconstruction in the SAE's normalised space -> the same change in the hook's raw
    space (divided by the input scale; times each token's std for layer-norm SAEs)."""
    return sae.input_norm.change_from_sae(change_n, stats)


@dataclass(frozen=True)
class Add:
    """h' = h + sum_i alpha_i d_i (alpha: one value, or one per feature; negative values subtract)."""

    features: Features
    alpha: float | Sequence[float]
    positions: Positions = "all"

    def apply(self, sae: SAE, h: torch.Tensor) -> torch.Tensor:
        features = _as_list(self.features)
        _, stats = sae.normalize(h)
        change = _per_feature(self.alpha, len(features), "alpha").to(h)
        return h + raw_change(sae, change.expand(len(h), -1) @ sae.W_dec[features], stats)


@dataclass(frozen=True)
class Clamp:
    """Set latents to `value` (or multiply them by `factor`) in the SAE basis, keeping the SAE's error term:
    h' = h + sum_i (c_i - a_i(h)) d_i. Clamp(i, value=0) ablates latent i."""

    features: Features
    value: float | Sequence[float] | None = None
    factor: float | Sequence[float] | None = None
    positions: Positions = "all"

    def __post_init__(self) -> None:
        if (self.value is None) == (self.factor is None):
            raise SaelabError("Clamp takes exactly one of value= (set the latents) or factor= (scale them).")

    def apply(self, sae: SAE, h: torch.Tensor) -> torch.Tensor:
        features = _as_list(self.features)
        code, _, stats = sae.encode_code(h)
        current = code.dense()[:, features]  # [n, f]
        if self.value is not None:
            target = _per_feature(self.value, len(features), "value").to(h).expand_as(current)
        else:
            target = current * _per_feature(self.factor, len(features), "factor").to(h)
        return h + raw_change(sae, (target - current) @ sae.W_dec[features], stats)


@dataclass(frozen=True)
class Project:
    """h' = h - (1 - scale) P h, P the orthogonal projector onto the span of the features' decoder directions."""

    features: Features
    scale: float = 0.0
    positions: Positions = "all"

    def apply(self, sae: SAE, h: torch.Tensor) -> torch.Tensor:
        basis, _ = torch.linalg.qr(sae.W_dec[_as_list(self.features)].T.to(h))  # [d_in, f], orthonormal columns
        return h - (1 - self.scale) * (h @ basis) @ basis.T


Intervention = Add | Clamp | Project


def position_mask(positions: Positions, n_positions: int, prompt_length: int | None) -> torch.Tensor:
    """bool [n_positions]: where an intervention with these `positions` acts."""
    index = torch.arange(n_positions)
    if isinstance(positions, str):
        if positions not in POSITION_NAMES:
            raise SaelabError(f"positions='{positions}' is not one of {POSITION_NAMES}, an int or a list of ints.")
        if positions == "all" or prompt_length is None:
            return torch.ones(n_positions, dtype=torch.bool)
        return index < prompt_length if positions == "prompt" else index >= prompt_length
    if isinstance(positions, int):
        return index >= positions
    mask = torch.zeros(n_positions, dtype=torch.bool)
    chosen = torch.as_tensor(list(positions), dtype=torch.long)
    mask[chosen[chosen < n_positions]] = True
    return mask


class Steering:
    """Interventions at one SAE's hook, callable as a TransformerLens forward hook `(act, hook) -> act`.

    keep [batch, pos] (optional): False where the activation must stay clean (special tokens); prompt_length:
    where "prompt" ends and "generated" starts.
    """

    def __init__(
        self,
        sae: SAE,
        interventions: Sequence[Intervention],
        keep: torch.Tensor | None = None,
        prompt_length: int | None = None,
    ):
        self.sae, self.interventions = sae, list(interventions)
        self.hook = recorded_hook(sae, "The SAE")
        self.keep, self.prompt_length = keep, prompt_length
        for intervention in self.interventions:
            if not isinstance(intervention, (Add, Clamp, Project)):
                raise SaelabError(f"{intervention!r} is not an intervention; use Add, Clamp or Project.")
            bad = [f for f in _as_list(intervention.features) if not 0 <= f < sae.d_sae]
            if bad:
                raise SaelabError(f"Feature(s) {bad} out of range: this SAE has latents 0..{sae.d_sae - 1}.")
            position_mask(intervention.positions, 1, None)  # an unknown positions name fails here, not mid-forward

    def edit(self, h: torch.Tensor) -> torch.Tensor:
        """h [batch, pos, d_in] -> steered [batch, pos, d_in]."""
        batch, n_positions, width = h.shape
        if width != self.sae.d_in:
            raise SaelabError(
                f"The SAE reads {self.sae.d_in}-wide activations but {self.hook} gives {width}: it was trained on "
                "another model. Load the model the SAE records (sae.metadata['model'])."
            )
        out = h.to(self.sae.W_dec.dtype).clone()  # differentiable: gradients flow through the interventions
        for intervention in self.interventions:
            mask = position_mask(intervention.positions, n_positions, self.prompt_length).to(h.device)
            mask = mask.expand(batch, -1)
            if self.keep is not None:
                mask = mask & self.keep.to(h.device)
            if mask.any():
                out[mask] = intervention.apply(self.sae, out[mask])
        return out.to(h.dtype)

    def __call__(self, act: torch.Tensor, hook: Any = None) -> torch.Tensor:
        flat = per_token(self.hook, act, act.shape[0], act.shape[1])
        return self.edit(flat).reshape(act.shape)


@contextmanager
def steer(
    model,
    sae: SAE,
    *interventions: Intervention,
    keep: torch.Tensor | None = None,
    prompt_length: int | None = None,
) -> Iterator[Steering]:
    """Every forward pass of `model` inside the block is steered (hooks removed on exit, also on errors).

    Positions count within each forward pass: under TransformerLens' `model.generate` with its KV cache, every
    step after the first sees only the new token (position 0), so use positions="all" there, or `generate` here."""
    steering = Steering(sae, interventions, keep=keep, prompt_length=prompt_length)
    resolve_hooks(model, [steering.hook])
    with model.hooks(fwd_hooks=[(steering.hook, steering)]):
        yield steering


def to_tokens(model, text: str | torch.Tensor) -> torch.Tensor:
    """A string (BOS prepended) or token ids [pos] / [batch, pos] -> [batch, pos] on the model's device."""
    tokens = model.to_tokens(text) if isinstance(text, str) else torch.as_tensor(text)
    tokens = tokens if tokens.dim() == 2 else tokens[None]
    return tokens.to(model.cfg.device)


def steered_logits(
    model, tokens: torch.Tensor, sae: SAE | None = None, interventions: Sequence[Intervention] = (),
    prompt_length: int | None = None,
) -> torch.Tensor:
    """tokens [batch, pos] -> float32 logits [batch, pos, vocab] with the interventions applied (none: clean)."""
    if sae is None or not interventions:
        return model(tokens, return_type="logits").float()
    steering = Steering(sae, interventions, prompt_length=prompt_length)
    return run_logits(model, tokens, steering.hook, replace=steering.edit, keep=splice_keep_mask(model, tokens))


def next_token_loss(
    model, text: str | torch.Tensor, sae: SAE | None = None, interventions: Sequence[Intervention] = ()
) -> float:
    """Mean next-token cross-entropy (nats) on `text`, predicting every token after the first, steered or clean."""
    tokens = to_tokens(model, text)
    return float(next_token_losses(steered_logits(model, tokens, sae, interventions), tokens).mean())


@torch.no_grad()
def generate(
    model,
    prompt: str,
    sae: SAE | None = None,
    interventions: Sequence[Intervention] = (),
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_k: int | None = None,
    n: int = 1,
    seed: int = 0,
    progress: Any = None,
) -> list[str]:
    """n completions of `prompt` (the new text only), greedy at temperature 0, else sampled (seeded).

    progress: anything with update(k) (a tqdm bar), told of every step (one generated token per completion);
    it is told of the steps left when every completion has ended early.

    Every step reruns the whole sequence (no KV cache), so "prompt" / "generated" / int positions mean the same
    token positions at every step. A KV cache would be exact here (each intervention edits a position from that
    position's activation alone, and attention is causal), but TransformerBridge 4.3 cannot reuse one with
    transformers 5: its attention bridge reads the cache from the `past_key_values` / `layer_past` keyword while
    transformers 5 passes it as `cache`, so the cache is never filled and a cached step attends to the new token
    alone (the bridge's own `generate(use_past_kv_cache=True)` then produces garbage); TL-native models
    (tiny-native) return no cache at all."""
    if max_new_tokens < 1 or n < 1:
        raise SaelabError("max_new_tokens and n must be at least 1.")
    tokens = to_tokens(model, prompt).expand(n, -1)
    prompt_length = tokens.shape[1]
    generator = torch.Generator().manual_seed(seed)
    eos = model.tokenizer.eos_token_id
    finished = torch.zeros(n, dtype=torch.bool)
    for step in range(max_new_tokens):
        logits = steered_logits(model, tokens, sae, interventions, prompt_length)[:, -1].cpu()
        if temperature > 0:
            logits = logits / temperature
            if top_k is not None:
                logits[logits < logits.topk(top_k, dim=-1).values[:, -1:]] = -torch.inf
            next_token = torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(1)
        else:
            next_token = logits.argmax(-1)
        next_token[finished] = eos if eos is not None else next_token[finished]
        tokens = torch.cat([tokens, next_token[:, None].to(tokens.device)], dim=1)
        finished |= next_token == eos
        if progress is not None:
            progress.update(1 if not finished.all() else max_new_tokens - step)
        if finished.all():
            break
    return [model.tokenizer.decode(row[prompt_length:], skip_special_tokens=True) for row in tokens.cpu()]


def with_alpha(intervention: Intervention, alpha: float) -> Intervention:
    """The same intervention at strength alpha: Add's alpha, Clamp's value (or factor), Project's scale."""
    if isinstance(intervention, Add):
        field = "alpha"
    elif isinstance(intervention, Clamp):
        field = "value" if intervention.value is not None else "factor"
    else:
        field = "scale"
    return type(intervention)(**{**vars(intervention), field: alpha})


def sweep(
    model,
    sae: SAE,
    intervention: Intervention,
    alphas: Sequence[float],
    prompt: str,
    reference: str | torch.Tensor,
    max_new_tokens: int = 24,
    temperature: float = 0.0,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """One row per alpha: the steered completion of `prompt` and the next-token loss on `reference` (str or
    tokens [batch, pos]) with `intervention` at that strength (see `with_alpha`), against the clean loss.

    Rows: {"alpha", "completion", "reference_loss", "delta_loss"}; pandas.DataFrame(rows) shows them as a table."""
    clean = next_token_loss(model, reference)
    rows = []
    for alpha in alphas:
        steered = [with_alpha(intervention, float(alpha))]
        loss = next_token_loss(model, reference, sae, steered)
        completion = generate(model, prompt, sae, steered, max_new_tokens, temperature, seed=seed)[0]
        rows.append({"alpha": float(alpha), "completion": completion, "reference_loss": loss,
                     "delta_loss": loss - clean})
    return rows


class FeatureActivations(NamedTuple):
    tokens: list[str]  # [pos] the prompt's tokens as text
    acts: torch.Tensor  # [pos, d_sae] the SAE's code at each position (0 at special tokens)


@torch.no_grad()
def feature_activations(model, sae: SAE, prompt: str | torch.Tensor) -> FeatureActivations:
    """The SAE's code at every position of `prompt` (a string, BOS prepended, or token ids [pos])."""
    tokens = to_tokens(model, prompt)[:1]
    hook = recorded_hook(sae, "The SAE")
    acts, _ = ActivationSource(model, [hook]).harvest(tokens)  # stops the forward once the hook has fired
    code = sae.encode(acts[hook][0].to(sae.W_dec))
    code[~splice_keep_mask(model, tokens)[0].to(code.device)] = 0
    return FeatureActivations([model.tokenizer.decode([t]) for t in tokens[0].tolist()], code.cpu())


def top_features(
    model, sae: SAE, prompt: str | torch.Tensor, k: int = 10, position: int | None = None
) -> list[dict[str, Any]]:
    """The k latents most active on `prompt` (largest |activation| at `position`, or at their strongest position):
    rows {"feature", "activation", "position", "token"}."""
    tokens, acts = feature_activations(model, sae, prompt)
    if position is not None:
        if not -len(tokens) <= position < len(tokens):
            raise SaelabError(f"position {position} is outside the prompt's {len(tokens)} tokens.")
        where = torch.full((sae.d_sae,), position % len(tokens))
    else:
        where = acts.abs().argmax(0)
    strongest = acts.gather(0, where[None])[0]
    order = strongest.abs().topk(min(k, sae.d_sae)).indices
    return [{"feature": int(f), "activation": float(strongest[f]), "position": int(where[f]),
             "token": tokens[int(where[f])]} for f in order if strongest[f] != 0]


def intervention_for(mode: str, features: Sequence[int], alpha: float, positions: Positions = "all") -> Intervention:
    """`saelab steer --mode`: add -> Add(alpha), clamp -> Clamp(value=alpha), project -> Project(scale=alpha)."""
    if mode == "add":
        return Add(features, alpha, positions)
    if mode == "clamp":
        return Clamp(features, value=alpha, positions=positions)
    if mode == "project":
        return Project(features, alpha, positions)
    raise SaelabError(f"--mode '{mode}' is not one of add, clamp, project.")


__all__ = [
    "Add", "Clamp", "FeatureActivations", "Intervention", "Project", "Steering", "feature_activations", "generate",
    "intervention_for", "next_token_loss", "position_mask", "raw_change", "steer",
    "steered_logits", "sweep", "to_tokens", "top_features", "with_alpha",
]
