"""Multi-process training on torch.distributed, launched by torchrun: the process group, ranks and reductions.

Two ways to use W processes (NCCL on CUDA, one GPU per LOCAL_RANK; gloo on CPU; the same code otherwise):

- Data parallel (--distributed, implied by any torchrun launch of W > 1 processes): every rank holds every run.
  Each global batch of --batch-size tokens is split into W equal slices, one per rank. The loss runs through
  DistributedDataParallel, which averages the gradients during backward; as the slices have equal size, and
  the top-k family's normalised MSE divides by the variance of the whole global batch (`global_variance`, passed
  as StepContext.batch_variance),
  the update is the one a single process makes from the whole batch, up to float rounding. Firing counts are
  summed before the dead-latent counters see them, logged metrics are averaged (FVU from global sums) and
  batch-level inference state (BatchTopK / choice thresholds, running frequencies) is averaged after every step,
  so all ranks hold the same numbers. Batch-level *selection* (BatchTopK, choice SAEs) picks within each rank's
  slice, as in sparsify: their codes are those of a B/W-token batch.
- Module split (--distribute-modules): the runs are dealt to the ranks (`assign_runs`); each rank trains its
  runs on the full global batch, exactly as a single process would. No gradient traffic.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from saelab.config import TrainConfig
from saelab.devices import check_device
from saelab.errors import SaelabError
from saelab.sae.base import SAE, LossOutput, StepContext

SINGLE, DATA, MODULES = "single", "data", "modules"


@dataclass(frozen=True)
class World:
    """This process's place in the job: rank of size, how the work is split (SINGLE, DATA or MODULES), the
    device runs train on, and whether launch() created the process group (and shutdown() must destroy it)."""

    rank: int = 0
    size: int = 1
    mode: str = SINGLE
    device: torch.device = torch.device("cpu")
    owns_group: bool = False

    @property
    def main(self) -> bool:
        """Rank 0: the process that writes shared files and shows progress."""
        return self.rank == 0

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    def any(self, flag: bool) -> bool:
        """Whether `flag` is true on any rank (every rank must call it at the same point)."""
        if self.size == 1:
            return flag
        reduced = torch.tensor([int(flag)], device=self.device)
        dist.all_reduce(reduced, op=dist.ReduceOp.MAX)
        return bool(reduced)


def launch(train: TrainConfig, device: str) -> World:
    """Join the torchrun job described by the environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT).

    Without torchrun (no WORLD_SIZE) training is single-process, on `device` (the model's --device), and asking
    for --distributed or --distribute-modules is an error; a torchrun job of one process is single-process too.
    In a job of several processes, 'cuda...' trains on cuda:LOCAL_RANK over NCCL, anything else on the CPU over gloo.
    """
    asked = train.distributed or train.distribute_modules
    if "WORLD_SIZE" not in os.environ:
        if asked:
            raise SaelabError(
                "--distributed and --distribute-modules need processes started by torchrun, e.g. "
                "`torchrun --nproc_per_node 2 -m saelab train ...` (add --nnodes/--node-rank/--master-addr for "
                "several machines)."
            )
        return World(device=check_device(device))
    size = int(os.environ["WORLD_SIZE"])
    if size == 1:
        return World(device=check_device(device))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = check_device(device).type == "cuda"
    torch_device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    owns_group = not dist.is_initialized()
    if owns_group:
        if cuda:
            torch.cuda.set_device(torch_device)
        # A module split meets only at the end, when the ranks with the smaller share may wait for hours.
        timeout = datetime.timedelta(days=7) if train.distribute_modules else None
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout)
    return World(rank, size, MODULES if train.distribute_modules else DATA, torch_device, owns_group)


def shutdown(world: World) -> None:
    """Leave the job: destroy the process group if launch() created it."""
    if world.owns_group and dist.is_initialized():
        dist.destroy_process_group()


@dataclass(frozen=True)
class Placement:
    """Every choice that depends on this process's place in the job, made once (`place`).

    part:       (rank, ranks): the slice of each global batch this process reads ((0, 1): all of it)
    writes:     whether it writes checkpoints, metrics and SAEs (rank 0; with a module split, every rank its own)
    checkpoint: its checkpoint's file name; metrics: its metrics file's name
    replicate:  whether each SAE trains as a data-parallel Replica
    model_device: where a live harvest runs the model (this rank's GPU), or None for --device as given
    """

    world: World
    part: tuple[int, int]
    writes: bool
    checkpoint: str
    metrics: str
    replicate: bool
    model_device: str | None

    def my_runs(self, sizes: list[int]) -> list[int]:
        """Indices of the runs this process trains, of runs with `sizes` (parameters): all of them, or its share of
        a module split (`assign_runs`)."""
        if self.world.mode != MODULES:
            return list(range(len(sizes)))
        return [i for i, rank in enumerate(assign_runs(sizes, self.world.size)) if rank == self.world.rank]


def place(world: World, batch_size: int, n_runs: int, checkpoint: str, metrics: str) -> Placement:
    """The Placement of this process for `n_runs` runs on global batches of `batch_size` tokens; `checkpoint` and
    `metrics` are the single-process file names (a module split's ranks write `<stem>.rank<r><suffix>`)."""
    if world.mode == DATA and batch_size % world.size:
        raise SaelabError(
            f"--batch-size {batch_size} (the global batch) does not split into {world.size} equal slices, one per "
            f"process; use a multiple of {world.size}."
        )
    if world.mode == MODULES and n_runs < world.size:
        raise SaelabError(
            f"--distribute-modules shares {n_runs} run(s) (hooks x sweep entries) among {world.size} processes; "
            f"start at most {n_runs} (torchrun --nproc_per_node), or use --distributed to split batches instead."
        )
    split = world.mode == MODULES

    def own(name: str) -> str:
        stem, _, suffix = name.partition(".")
        return f"{stem}.rank{world.rank}.{suffix}" if split else name

    return Placement(world, (world.rank, world.size) if world.mode == DATA else (0, 1), world.main or split,
                     own(checkpoint), own(metrics), world.mode == DATA,
                     str(world.device) if world.device.type == "cuda" else None)


def assign_runs(sizes: list[int], ranks: int) -> list[int]:
    """Rank of each run, balancing the sum of `sizes` (e.g. parameters) per rank: largest runs first, each to
    the least-loaded rank (lowest rank on ties). Every rank gets at least one run when len(sizes) >= ranks."""
    load = [0] * ranks
    owner = [0] * len(sizes)
    for run in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        rank = min(range(ranks), key=lambda r: (load[r], r))
        owner[run] = rank
        load[rank] += sizes[run]
    return owner


@torch.no_grad()
def global_variance(target: torch.Tensor) -> torch.Tensor:
    """target [n, d], this rank's slice of the global batch -> sum over the global batch of ||t - mean||^2
    (the mean over all N tokens of all ranks), times n / N: this rank's share, so that the ranks' mean of
    sum_local ||t - t_hat||^2 / share is the global sum_all ||t - t_hat||^2 / variance."""
    target = target.detach()
    sums = torch.cat([target.sum(dim=0), target.new_tensor([len(target)])])
    dist.all_reduce(sums)
    mean, total = sums[:-1] / sums[-1], sums[-1]
    variance = (target - mean).pow(2).sum()
    dist.all_reduce(variance)
    return variance * (len(target) / total)


class _TrainingLoss(nn.Module):
    """The module DDP wraps: forward is the SAE's training loss, so DDP's hooks reduce every gradient it yields,
    those of saelab.kernels' custom autograd functions included."""

    def __init__(self, sae: SAE):
        super().__init__()
        self.sae = sae

    def forward(self, x_n: torch.Tensor, ctx: StepContext) -> LossOutput:
        return self.sae.training_loss(x_n, ctx)


class Replica:
    """One SAE's data-parallel copy on this rank: the DDP-wrapped loss and the reductions a step needs.

    DDP broadcasts rank 0's parameters and buffers when it is built, so every rank starts from the same SAE.
    """

    def __init__(self, sae: SAE, world: World):
        self.sae, self.size = sae, world.size
        # Every variant's training loss reaches all its parameters, so DDP need not search the graph for unused ones.
        # Buffers are not broadcast before each forward: sync_inference_state averages the ones training updates.
        self.ddp = DistributedDataParallel(
            _TrainingLoss(sae), forward_sync_buffers=False, find_unused_parameters=False
        )
        # Batch-level inference state (thresholds, running frequencies); the constant input scale is never updated.
        self.state_buffers = [b for name, b in sae.named_buffers() if b.is_floating_point() and name != "input_scale"]

    def training_loss(self, x_n: torch.Tensor, ctx: StepContext) -> LossOutput:
        """x_n [B/W, d_in], this rank's slice. The loss is this rank's estimate of the global batch loss."""
        return self.ddp(x_n, ctx._replace(batch_variance=global_variance))

    def all_finite(self, loss: torch.Tensor) -> bool:
        """Whether every rank's loss is finite (all must skip a bad step together, or the all-reduce would hang)."""
        finite = torch.isfinite(loss.detach()).to(torch.int32)
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        return bool(finite)

    @torch.no_grad()
    def sync_inference_state(self) -> None:
        """Average the batch-level inference state each rank updated from its own slice."""
        for buffer in self.state_buffers:
            dist.all_reduce(buffer)
            buffer /= self.size

    @torch.no_grad()
    def sum_(self, counts: torch.Tensor) -> torch.Tensor:
        """In place: counts summed over the ranks (e.g. [d_sae] firing counts)."""
        dist.all_reduce(counts)
        return counts

    @torch.no_grad()
    def mean(self, values: dict[str, float]) -> dict[str, float]:
        """Per-rank scalars (each a mean over the rank's slice) -> their mean over the ranks, the global value."""
        packed = torch.tensor(list(values.values()), dtype=torch.float64, device=self.sae.W_dec.device)
        dist.all_reduce(packed)
        return dict(zip(values, (packed / self.size).tolist()))

    @torch.no_grad()
    def fvu(self, x: torch.Tensor, x_hat: torch.Tensor) -> float:
        """x, x_hat [B/W, d_in] raw activations of this rank's slice -> FVU of the global batch."""
        parts = torch.stack([(x - x_hat).pow(2).sum(), global_variance(x)]).double()
        dist.all_reduce(parts)
        return float(parts[0] / parts[1].clamp_min(1e-12))


__all__ = ["DATA", "MODULES", "SINGLE", "Placement", "Replica", "World", "assign_runs", "global_variance", "launch",
           "place", "shutdown"]
