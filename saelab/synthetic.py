"""Synthetic activations with a known answer: sparse combinations of a planted dictionary.

Used by the tests (each variant must recover the dictionary) and handy for checking a new variant:

    data = PlantedDictionary(d=32, n_features=64, p_active=0.03, seed=0)
    x = data.sample(4096)                         # [4096, 32]
    mmcs(sae.W_dec, data.dictionary)              # mean max cosine similarity in [0, 1]
"""

from __future__ import annotations

import torch


class PlantedDictionary:
    """x = sum_i c_i * D_i with unit rows D [n_features, d]; each feature active with prob p_active,
    magnitude U(0, 1) (times a random sign when `signed`)."""

    def __init__(self, d: int, n_features: int, p_active: float, seed: int = 0, signed: bool = False):
        self.generator = torch.Generator().manual_seed(seed)
        dictionary = torch.randn(n_features, d, generator=self.generator)
        self.dictionary = dictionary / dictionary.norm(dim=1, keepdim=True)
        self.p_active = p_active
        self.signed = signed

    def codes(self, n: int) -> torch.Tensor:
        """[n, n_features] sparse coefficients."""
        shape = (n, self.dictionary.shape[0])
        active = torch.rand(shape, generator=self.generator) < self.p_active
        magnitude = torch.rand(shape, generator=self.generator)
        if self.signed:
            magnitude = magnitude * (torch.randint(0, 2, shape, generator=self.generator) * 2 - 1)
        return active * magnitude

    def sample(self, n: int) -> torch.Tensor:
        """[n, d] activations."""
        return self.codes(n) @ self.dictionary


def cosine_matrix(learned: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """[n_learned, n_true] cosine similarities between rows."""
    learned = learned / learned.norm(dim=1, keepdim=True).clamp_min(1e-12)
    true = true / true.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return learned @ true.T


def mmcs(learned: torch.Tensor, true: torch.Tensor, absolute: bool = False) -> float:
    """Mean over true features of the best cosine similarity with any learned row (|cos| if absolute)."""
    cos = cosine_matrix(learned.detach().float(), true.float())
    return float((cos.abs() if absolute else cos).max(dim=0).values.mean())


def fit_planted(sae, data: PlantedDictionary, steps: int, lr: float = 3e-3, batch: int = 512, context=None):
    """Train `sae` with Adam + `train_step` on `steps` fresh batches of `data.sample(batch)` [batch, d]; returns it.

    context: optional callable (step, x) -> StepContext (sparsity warmup, g-SAE gradients); default StepContext().
    Runs single-threaded: thousands of tiny matmuls only pay synchronisation overhead for a second thread.
    """
    from saelab.sae.base import StepContext
    from saelab.train.step import train_step

    optimizer = torch.optim.Adam(sae.parameters(), lr=lr)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for step in range(steps):
            x = data.sample(batch)
            train_step(sae, optimizer, x, context(step, x) if context else StepContext())
    finally:
        torch.set_num_threads(threads)
    return sae
