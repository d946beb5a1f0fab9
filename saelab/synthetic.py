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


def fit_planted(
    sae, data: PlantedDictionary, steps: int, lr: float = 3e-3, batch: int = 512, context=None, on_step=None
):
    """Train `sae` with Adam + `train_step` on `steps` fresh batches of `data.sample(batch)` [batch, d]; returns it.

    context: optional callable (step, x) -> StepContext (sparsity warmup, g-SAE gradients); default StepContext().
    on_step: optional callable (step, x, out) called after each step with its train_step output (e.g. to keep the
    last training code). Runs single-threaded: thousands of tiny matmuls only pay synchronisation overhead for a
    second thread.
    """
    from saelab.sae.base import StepContext
    from saelab.train.step import train_step

    optimizer = torch.optim.Adam(sae.parameters(), lr=lr)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for step in range(steps):
            x = data.sample(batch)
            out = train_step(sae, optimizer, x, context(step, x) if context else StepContext())
            if on_step is not None:
                on_step(step, x, out)
    finally:
        torch.set_num_threads(threads)
    return sae


def train_planted(sae, data: PlantedDictionary, steps: int, batch: int = 1024, dead_tokens: int = 20_000, grads=None,
                  autocast: torch.dtype | None = None):
    """Train `sae` on fresh planted batches as `saelab train` would, from the variant's defaults: constant input
    scale fitted on a sample, the variant's data-dependent init, its default learning rate with the trainer's
    schedule (20 warmup steps, linear decay over the last 20%), gradient clipping at 1, dead latents (for AuxK)
    after `dead_tokens` tokens without firing. grads: optional callable x [batch, d] -> d(loss)/dx for g-SAE.
    autocast: the training precision as in `train_step` (torch.bfloat16 for --precision bf16; None: float32).
    Returns the SAE. Runs single-threaded (thousands of tiny matmuls)."""

    from saelab.sae.base import StepContext
    from saelab.train.step import train_step
    from saelab.train.trainer import learning_rate

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        sample = data.sample(16_384)
        sae.input_norm.fit(sample)
        sae.initialize_from_data(sae.normalize(sample)[0])
        base_lr = sae.default_learning_rate()
        optimizer = torch.optim.Adam(sae.parameters(), lr=base_lr)
        since_fired = torch.zeros(sae.d_sae, dtype=torch.long)
        for step in range(steps):
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(base_lr, step, steps, 20, 0.2)
            x = data.sample(batch)
            x_n, stats = sae.normalize(x)
            g = None if grads is None else sae.input_norm.grads_to_sae(grads(x), stats)
            ctx = StepContext(dead=since_fired >= dead_tokens, grads=g)
            out = train_step(sae, optimizer, x_n, ctx, 1.0, autocast=autocast)
            since_fired += batch
            since_fired[out.code.firing_counts() > 0] = 0
        if sae.calibrates_inference:
            sae.calibrate_inference(sae.normalize(sample)[0])
    finally:
        torch.set_num_threads(threads)
    return sae
