import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

from saelab.config import CacheCommand, CacheConfig, DataConfig, HarvestConfig, ModelConfig
from saelab.models import load_model, load_tokenizer, tiny_native_model


@pytest.fixture(scope="session")
def tokenizer():
    return load_tokenizer("smollm2-135m")


@pytest.fixture(scope="session")
def tiny_model(tokenizer):
    """2-layer random TL-native model, d_model 64, 4 heads, SmolLM2 tokenizer (same as load_model('tiny-native'))."""
    return tiny_native_model(tokenizer=tokenizer)


@pytest.fixture(scope="session")
def smollm2():
    return load_model("smollm2-135m")


def tiny_cache_config(out, **overrides) -> CacheCommand:
    """A small, fast cache build on the tiny native model; overrides are flat option names."""
    config = CacheCommand(
        model=ModelConfig(model="tiny-native"),
        data=DataConfig(context_length=32),
        harvest=HarvestConfig(hooks=["blocks.1.hook_resid_post", "blocks.0.attn.hook_z"], batch_contexts=8),
        cache=CacheConfig(out=str(out), n_tokens=32 * 40, shard_tokens=32 * 8),
    )
    for key, value in overrides.items():
        section = next(s for s in ("model", "data", "harvest", "cache") if hasattr(getattr(config, s), key))
        setattr(getattr(config, section), key, value)
    return config


@pytest.fixture(scope="session")
def cache_config():
    return tiny_cache_config


@pytest.fixture
def one_thread():
    """Thousands of tiny steps: a second intra-op thread only adds sync overhead (badly so on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
