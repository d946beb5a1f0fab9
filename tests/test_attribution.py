import pytest
import torch

from saelab.analysis.attribution import (
    attention_attribution,
    bias_terms,
    head_attribution,
    source_attribution,
)
from saelab.config import SAEConfig
from saelab.errors import SaelabError
from saelab.sae.registry import create_sae

PROMPT = "And God said, Let there be light: and there was light."


def hook_z_sae(d_in, hook, input_norm="constant", pre_enc_bias=True, seed=0):
    torch.manual_seed(seed)
    sae = create_sae(d_in, SAEConfig(architecture="topk", d_sae=64, k=8, input_norm=input_norm,
                                     pre_enc_bias=pre_enc_bias), metadata={"hook": hook})
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_(std=0.3)
        sae.input_scale.fill_(1.3 if input_norm == "constant" else 1.0)
    return sae.double()


@pytest.mark.parametrize("input_norm,pre_enc_bias", [("constant", True), ("layernorm", True), ("none", False)])
def test_heads_and_sources_sum_exactly_on_synthetic_attention(input_norm, pre_enc_bias):
    n, n_heads, d_head, src = 12, 3, 5, 7
    sae = hook_z_sae(n_heads * d_head, "blocks.0.attn.hook_z", input_norm, pre_enc_bias)
    pattern = torch.rand(n, n_heads, src, dtype=torch.float64).softmax(-1)
    values = torch.randn(n, src, n_heads, d_head, dtype=torch.float64)
    x = torch.einsum("nhs,nshd->nhd", pattern, values).reshape(n, -1)
    latents = torch.randint(0, 64, (n,))
    pre = sae.encode_pre(sae.normalize(x)[0]).gather(1, latents[:, None])[:, 0]
    heads = head_attribution(sae, x, latents, n_heads)
    torch.testing.assert_close(heads.sum(1) + bias_terms(sae, latents), pre, atol=1e-12, rtol=0)
    sources = source_attribution(sae, x, latents, pattern, values)
    torch.testing.assert_close(sources.sum(-1), heads, atol=1e-12, rtol=0)
    # one head's term is its block's contribution alone: zero the other heads' values and it is all that changes
    only_head_1 = values.clone()
    only_head_1[:, :, [0, 2]] = 0
    x1 = torch.einsum("nhs,nshd->nhd", pattern, only_head_1).reshape(n, -1)
    if input_norm != "layernorm":  # (layer norm's per-token std depends on every head)
        assert head_attribution(sae, x1, latents, n_heads)[:, 1].tolist() == pytest.approx(heads[:, 1].tolist())


def test_attention_attribution_on_a_model(tiny_model):
    sae = hook_z_sae(64, "blocks.1.attn.hook_z")
    result = attention_attribution(tiny_model, sae, PROMPT, latent=9)
    tokens = tiny_model.to_tokens(PROMPT)
    _, cache = tiny_model.run_with_cache(tokens, names_filter="blocks.1.attn.hook_z")
    z = cache["blocks.1.attn.hook_z"][0].reshape(tokens.shape[1], -1).double()
    torch.testing.assert_close(result.pre, sae.encode_pre(sae.normalize(z)[0])[:, 9])
    torch.testing.assert_close(result.heads.sum(1) + result.bias, result.pre, atol=1e-5, rtol=0)
    torch.testing.assert_close(result.sources.sum(-1), result.heads, atol=1e-5, rtol=0)
    causal = torch.ones(tokens.shape[1], tokens.shape[1], dtype=torch.bool).tril()
    assert (result.sources.permute(1, 0, 2)[:, ~causal] == 0).all()  # nothing comes from later positions
    assert result.sources[:, :, 0].abs().sum() > 0 and len(result.tokens) == tokens.shape[1]


@pytest.mark.slow
def test_attention_attribution_with_grouped_query_heads(smollm2):
    """SmolLM2 has 9 query heads sharing 3 value heads."""
    sae = hook_z_sae(576, "blocks.3.attn.hook_z", input_norm="layernorm")
    result = attention_attribution(smollm2, sae, PROMPT, latent=2)
    assert result.heads.shape[1] == 9
    torch.testing.assert_close(result.heads.sum(1) + result.bias, result.pre, atol=1e-4, rtol=0)
    torch.testing.assert_close(result.sources.sum(-1), result.heads, atol=1e-4, rtol=0)


def test_attribution_needs_a_hook_z_sae(tiny_model):
    with pytest.raises(SaelabError, match="hook_z"):
        attention_attribution(tiny_model, hook_z_sae(64, "blocks.1.hook_resid_pre"), PROMPT, latent=0)
    with pytest.raises(SaelabError, match="out of range"):
        attention_attribution(tiny_model, hook_z_sae(64, "blocks.1.attn.hook_z"), PROMPT, latent=64)
