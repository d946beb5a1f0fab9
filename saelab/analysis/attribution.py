"""Direct feature attribution (DFA) for SAEs on attn.hook_z: a latent's pre-activation split exactly by head and by
source position (Kissane et al. 2024).

The pre-activation is affine in the raw input x = hook_z flattened to [n_heads * d_head]:
    z_i = x . w_i + bias_i,   w_i = c W_enc[:, i] (constant input scale c),
                              w_i = (W_enc[:, i] - mean(W_enc[:, i])) / (std(x) + eps) (layer-norm SAEs, per token),
    bias_i = b_enc[i] - b_dec . W_enc[:, i] (the b_dec term only when the SAE subtracts b_dec before encoding).
Splitting x . w_i into head blocks gives the per-head terms. Head h's block at destination q is the attention-
weighted sum of values, x_h[q] = sum_s pattern[h, q, s] v[s, h] (grouped-query models share a value head across
n_heads / n_kv_heads query heads), so each head term splits again by source position s:
    source[q, h, s] = pattern[h, q, s] (v[s, h] . w_i[h-block]),   sum_s source = head[q, h],
    sum_h head[q, h] + bias_i = z_i[q].
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from saelab.errors import SaelabError
from saelab.sae.base import SAE


@torch.no_grad()
def encoder_weights(sae: SAE, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    """Raw x [n, d_in], latents [n] -> w [n, d_in] with x[j] . w[j] + bias_terms(latents)[j] = pre-activation."""
    return sae.input_norm.encoder_columns(sae.W_enc.T[latents].to(x.dtype), x)  # [n, d_in]


@torch.no_grad()
def bias_terms(sae: SAE, latents: torch.Tensor) -> torch.Tensor:
    """[n] the part of each latent's pre-activation that no head carries: b_enc - b_dec . W_enc[:, latent] (the b_dec
    term if the SAE subtracts b_dec before encoding)."""
    terms = sae.b_enc[latents].clone()
    if sae.cfg.pre_enc_bias:
        terms -= sae.b_dec @ sae.W_enc[:, latents]
    return terms


@torch.no_grad()
def head_attribution(sae: SAE, x: torch.Tensor, latents: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Raw hook_z activations x [n, n_heads * d_head], latents [n] -> per-head terms [n, n_heads]; with `bias_terms`
    they sum to the pre-activation."""
    x = x.to(sae.W_enc)
    return (x * encoder_weights(sae, x, latents)).view(len(latents), n_heads, -1).sum(-1)


@torch.no_grad()
def source_attribution(
    sae: SAE, x: torch.Tensor, latents: torch.Tensor, pattern: torch.Tensor, values: torch.Tensor
) -> torch.Tensor:
    """Per-source terms [n, n_heads, src] of each head term: x [n, n_heads * d_head] the destinations' hook_z,
    latents [n], pattern [n, n_heads, src] their attention rows, values [n, src, n_heads, d_head] the values they
    attend to (per query head). Sums over src to `head_attribution`."""
    x = x.to(sae.W_enc)
    n, n_heads = pattern.shape[:2]
    weights = encoder_weights(sae, x, latents).view(n, n_heads, -1)  # [n, n_heads, d_head]
    return pattern.to(x) * torch.einsum("nshd,nhd->nhs", values.to(x), weights)


class Attribution(NamedTuple):
    tokens: list[str]  # [pos] the prompt's tokens as text
    pre: torch.Tensor  # [pos] the latent's pre-activation at each destination position
    heads: torch.Tensor  # [pos, n_heads]
    sources: torch.Tensor  # [pos, n_heads, pos] (destination, head, source); 0 for sources after the destination
    bias: float  # the bias term (the same at every position)


def _value_per_query_head(values: torch.Tensor, n_heads: int) -> torch.Tensor:
    """[batch, src, n_kv_heads, d_head] -> [batch, src, n_heads, d_head] (grouped-query attention shares kv heads)."""
    groups, remainder = divmod(n_heads, values.shape[2])
    if remainder:
        raise SaelabError(f"{n_heads} query heads cannot share {values.shape[2]} value heads evenly.")
    return values.repeat_interleave(groups, dim=2)


@torch.no_grad()
def attention_attribution(model, sae: SAE, prompt: str | torch.Tensor, latent: int) -> Attribution:
    """DFA of `latent` of an attn.hook_z SAE over a prompt (a string, BOS prepended, or token ids [pos]): by head
    and by source position, at every destination position."""
    hook = sae.metadata.get("hook", "")
    if not hook.endswith("attn.hook_z"):
        raise SaelabError(f"Attribution by head needs an SAE on blocks.L.attn.hook_z; this one is on '{hook}'.")
    if not 0 <= latent < sae.d_sae:
        raise SaelabError(f"Latent {latent} is out of range: this SAE has latents 0..{sae.d_sae - 1}.")
    prefix = hook[: -len("hook_z")]
    names = [hook, prefix + "hook_pattern", prefix + "hook_v"]
    tokens = model.to_tokens(prompt) if isinstance(prompt, str) else torch.as_tensor(prompt).reshape(1, -1)
    _, cache = model.run_with_cache(tokens.to(model.cfg.device), names_filter=lambda name: name in names)
    z, pattern, values = (cache[name][0].to(sae.W_enc) for name in names)  # [pos, H, dh], [H, pos, pos], [pos, kv, dh]
    n_positions, n_heads = z.shape[:2]
    values = _value_per_query_head(values[None], n_heads)[0]
    if not torch.allclose(torch.einsum("hqs,shd->qhd", pattern, values), z, atol=1e-4, rtol=1e-4):
        raise SaelabError(f"This model's {hook} is not pattern @ v, so it cannot be split by source position.")
    x = z.reshape(n_positions, -1)
    latents = torch.full((n_positions,), latent, device=x.device)
    sources = source_attribution(sae, x, latents, pattern.transpose(0, 1), values.expand(n_positions, -1, -1, -1))
    pre = sae.encode_pre(sae.normalize(x)[0])[:, latent]
    return Attribution(
        [model.tokenizer.decode([t]) for t in tokens[0].tolist()],
        pre.cpu(),
        head_attribution(sae, x, latents, n_heads).cpu(),
        sources.cpu(),
        float(bias_terms(sae, latents[:1])),
    )


__all__ = ["Attribution", "attention_attribution", "bias_terms", "encoder_weights", "head_attribution",
           "source_attribution"]
