"""One training step, as a plain function: the unit the trainer loops over and tests call directly."""

from __future__ import annotations

import torch

from saelab.sae.base import SAE, LossOutput, StepContext
from saelab.train.distributed import Replica


def train_step(
    sae: SAE, optimizer: torch.optim.Optimizer, x_n: torch.Tensor, ctx: StepContext, grad_clip: float = 0.0,
    replica: Replica | None = None, autocast: torch.dtype | None = None,
) -> LossOutput:
    """Forward, backward, decoder-constraint projection, clipping, optimiser step, renormalisation.

    x_n: [batch, d_in] activations already in the SAE's normalised space (`sae.normalize(x)[0]`).
    replica: data-parallel training (saelab.train.distributed): x_n is this rank's slice of the global batch,
    the loss runs through DDP (gradients averaged over the ranks in backward), a non-finite loss on any rank
    skips the update on all of them, and batch-level inference state is averaged over the ranks.
    autocast: mixed precision, e.g. torch.bfloat16: the forward runs under torch.autocast (the encoder matmul in
    that dtype; the sparse decoder, losses, parameters and Adam state stay float32); None: float32 throughout.
    Returns the step's LossOutput (loss and detached terms, the code and reconstruction).
    """
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(x_n.device.type, dtype=autocast, enabled=autocast is not None):
        out = sae.training_loss(x_n, ctx) if replica is None else replica.training_loss(x_n, ctx)
    if replica is not None and not replica.all_finite(out.loss):
        return out._replace(loss=torch.full_like(out.loss.detach(), float("nan")))  # no rank updates
    if not torch.isfinite(out.loss):
        return out  # the caller decides (the trainer stops with a checkpoint); no update from a bad loss
    out.loss.backward()
    sae.remove_parallel_decoder_grad()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(sae.parameters(), grad_clip)
    optimizer.step()
    sae.normalize_decoder()
    with torch.no_grad():
        sae.update_inference_state(out.code)
        sae.adapt_sparsity(out.code)
        if replica is not None:
            replica.sync_inference_state()
    return out
