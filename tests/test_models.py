import functools

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from saelab.errors import SaelabError
from saelab.models import load_model


def residuals(model, tokens, n_layers):
    """blocks.L.hook_resid_post for every L, read through the bridge's hooks."""
    got = {}

    def save(act, hook, layer):
        got[layer] = act.detach().clone()

    hooks = [(f"blocks.{layer}.hook_resid_post", functools.partial(save, layer=layer)) for layer in range(n_layers)]
    with torch.no_grad():
        model.run_with_hooks(tokens, fwd_hooks=hooks)
    return got


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory, tokenizer):
    """A tiny random Llama (SmolLM2's architecture) saved as a local HF folder."""
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_local_hf_folder_bridge_equals_hf_hidden_states(tiny_llama_dir):
    model = load_model(str(tiny_llama_dir))
    hf = LlamaForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32, attn_implementation="eager").eval()
    tokens = torch.randint(3, 1000, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        hidden = hf(tokens, output_hidden_states=True).hidden_states
    got = residuals(model, tokens, 2)
    assert torch.equal(got[0], hidden[1])
    # the last hidden state HF returns is after the final norm; compare the pre-norm residual through it
    assert torch.allclose(hf.model.norm(got[1]), hidden[2], atol=1e-6)


def test_tiny_native_residual_identities(tiny_model):
    got = {}

    def save(act, hook, name):
        got[name] = act.detach().clone()

    names = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_pre", "blocks.1.hook_resid_mid",
             "blocks.1.hook_attn_out", "blocks.1.hook_mlp_out", "blocks.1.hook_resid_post"]
    tokens = torch.randint(3, 1000, (2, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        tiny_model.run_with_hooks(tokens, fwd_hooks=[(n, functools.partial(save, name=n)) for n in names])
    assert torch.equal(got["blocks.0.hook_resid_post"], got["blocks.1.hook_resid_pre"])
    torch.testing.assert_close(got["blocks.1.hook_resid_pre"] + got["blocks.1.hook_attn_out"], got["blocks.1.hook_resid_mid"])
    torch.testing.assert_close(got["blocks.1.hook_resid_mid"] + got["blocks.1.hook_mlp_out"], got["blocks.1.hook_resid_post"])


def test_unknown_model_is_a_clear_error():
    with pytest.raises(SaelabError, match="Unknown model 'not-a-model'.*smollm2-135m"):
        load_model("not-a-model")


@pytest.mark.slow
def test_smollm2_bridge_equals_hf_and_is_a_real_lm(smollm2):
    from transformers import AutoModelForCausalLM

    from saelab.models import smollm2_dir

    hf = AutoModelForCausalLM.from_pretrained(smollm2_dir(), dtype=torch.float32, attn_implementation="eager").eval()
    text = "In the beginning God created the heaven and the earth. And the earth was without form, and void."
    tokens = smollm2.to_tokens(text)
    with torch.no_grad():
        hidden = hf(tokens, output_hidden_states=True).hidden_states
        loss = smollm2(tokens, return_type="loss")
    got = residuals(smollm2, tokens, 16)
    for layer in (0, 7, 15):
        assert torch.equal(got[layer], hidden[layer + 1])
    assert smollm2.cfg.n_layers == 30 and smollm2.cfg.d_model == 576
    assert loss < 4.0  # a random model would be near ln(49152) = 10.8
    with torch.no_grad():
        logits = smollm2(smollm2.to_tokens("The capital of Germany is"), return_type="logits")
    assert smollm2.tokenizer.decode(logits[0, -1].argmax()) == " Berlin"
