import pytest
import torch

from saelab.activations import ActivationBatch, ShuffleBuffer
from saelab.errors import SaelabError


def context_stream(n_contexts=50, positions=20, d=4):
    """Batches arriving one context at a time, as from a harvest; acts encode (context, position)."""
    for c in range(n_contexts):
        position = torch.arange(positions)
        context = torch.full((positions,), c)
        acts = torch.stack([context, position] + [torch.zeros(positions, dtype=torch.long)] * (d - 2), 1).float()
        yield ActivationBatch(acts={"h": acts}, token_ids=position + 100, context=context, position=position)


def test_every_token_once_and_batches_mix_contexts():
    batches = list(ShuffleBuffer(context_stream(), capacity=400, batch_size=32, seed=0))
    keys = [(int(c), int(p)) for b in batches for c, p in zip(b.context, b.position)]
    assert sorted(keys) == [(c, p) for c in range(50) for p in range(20)]
    assert all(len(b) == 32 for b in batches[:-1]) and len(batches[-1]) == 1000 % 32
    for b in batches:  # rows stay aligned across fields
        assert torch.equal(b.acts["h"][:, 0].long(), b.context) and torch.equal(b.token_ids, b.position + 100)
    distinct = [len(set(b.context.tolist())) for b in batches[:-1]]
    assert min(distinct) >= 10  # a batch of 32 drawn from >= 10 of the buffered contexts, never one document


def test_seed_changes_the_order_and_drop_last():
    a = [b.context.tolist() for b in ShuffleBuffer(context_stream(), 400, 32, seed=0)]
    b = [b.context.tolist() for b in ShuffleBuffer(context_stream(), 400, 32, seed=1)]
    assert a != b
    kept = list(ShuffleBuffer(context_stream(), 400, 32, seed=0, drop_last=True))
    assert all(len(x) == 32 for x in kept) and len(kept) == 1000 // 32


def test_capacity_must_hold_two_batches():
    with pytest.raises(SaelabError, match="at least twice"):
        ShuffleBuffer(context_stream(), capacity=40, batch_size=32)
