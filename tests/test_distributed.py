"""Multi-process training on gloo: processes spawned here play torchrun's part (RANK, WORLD_SIZE, MASTER_* in the
environment). Data parallel must give the single-process SAE up to float rounding, a module split exactly the SAEs
trained one after another, and a job that loses a rank must resume from its checkpoint to the same result."""

import json
import os
import signal
import socket
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from saelab.config import DataConfig, HarvestConfig, ModelConfig, SAEConfig, TrainConfig
from saelab.errors import SaelabError
from saelab.train.command import TrainCommand
from saelab.train.distributed import assign_runs
from saelab.train.trainer import Run, Trainer, train

HOOKS = ["blocks.1.hook_resid_post", "blocks.0.hook_mlp_out"]
STEPS = 24


def command(out, cache, hooks=HOOKS[:1], sae=None, **train_options) -> TrainCommand:
    options = {"cache": str(cache), "out": str(out), "train_tokens": 256 * STEPS, "batch_size": 256, "lr": 3e-3,
               "lr_warmup_steps": 5, "log_every": 3, "checkpoint_every": 7, "init_tokens": 2048,
               "precision": "fp32"}  # equal to one process to fp32 rounding; bf16 GEMMs round a half batch apart
    options.update(train_options)
    return TrainCommand(model=ModelConfig(model="tiny-native"), data=DataConfig(context_length=32),
                        harvest=HarvestConfig(hooks=list(hooks)), train=TrainConfig(**options),
                        sae=sae or SAEConfig(k=8, expansion=4))


def aux_command(out, cache, **train_options) -> TrainCommand:
    """Many latents that go dead within 2 steps: AuxK works every step, on the sparse kernels (density 4/1024)."""
    cmd = command(out, cache, sae=SAEConfig(k=4, expansion=16), **train_options)
    cmd.aux.dead_tokens = 256 * 2
    return cmd


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, size: int, port: int, jobs: list, errors: str, kill_rank_at_step: tuple | None) -> None:
    """One rank: trains each TrainCommand of `jobs` in turn via saelab.train.train, as `saelab train` under torchrun
    would; SaelabError messages are appended to the file `errors` as '<job index> <rank> <message>' lines.
    Several jobs share one process group, created here (train() then joins it); one job creates its own."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    if len(jobs) > 1:
        dist.init_process_group("gloo")
    if kill_rank_at_step is not None and kill_rank_at_step[0] == rank:
        original = Run.step

        def killed(self, batch, step, total, log):
            if step == kill_rank_at_step[1]:
                os.kill(os.getpid(), signal.SIGKILL)
            return original(self, batch, step, total, log)

        Run.step = killed
    for index, cmd in enumerate(jobs):
        try:
            train(cmd, progress=False)
        except SaelabError as exc:
            with open(errors, "a") as f:
                f.write(f"{index} {rank} {exc}\n")
        except Exception:
            traceback.print_exc()
            raise
    if dist.is_initialized():
        dist.destroy_process_group()


def run_ranks(size: int, jobs: list, tmp_path, kill_rank_at_step: tuple | None = None) -> list[str]:
    """Spawn `size` ranks running `jobs`; returns the SaelabError lines they reported."""
    errors = tmp_path / f"errors-{_free_port()}.txt"
    mp.spawn(_worker, args=(size, _free_port(), jobs, str(errors), kill_rank_at_step), nprocs=size, join=True)
    return errors.read_text().splitlines() if errors.exists() else []


@pytest.fixture(scope="module")
def cache(tmp_path_factory, tiny_model, cache_config):
    from saelab.activations import build_cache

    folder = tmp_path_factory.mktemp("ddp-cache")
    config = cache_config(folder, hooks=HOOKS, n_tokens=32 * 160, shard_tokens=32 * 40)
    return build_cache(config, model=tiny_model, progress=False).path


def sae_state(folder) -> dict[str, torch.Tensor]:
    return load_file(folder / "sae.safetensors")


def metrics(out) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in ("seconds", "data_wait")}
            for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def two_rank_runs(cache, tmp_path_factory):
    """One spawn of two ranks for every multi-process case below (each spawn costs seconds of imports)."""
    root = tmp_path_factory.mktemp("ddp")
    jobs = [
        command(root / "topk", cache, distributed=True),
        aux_command(root / "aux", cache, distributed=True),
        command(root / "split", cache, hooks=HOOKS, sweep=["k=4", "k=8,lr=1e-3"], distribute_modules=True),
        command(root / "odd", cache, batch_size=255, distributed=True),
        command(root / "crowded", cache, distribute_modules=True),
    ]
    errors = run_ranks(2, jobs, root)
    return root, errors


def test_data_parallel_topk_equals_one_process(two_rank_runs, cache, tmp_path, one_thread):
    root, _ = two_rank_runs
    reference = Trainer(command(tmp_path, cache), progress=False)
    [folder] = reference.fit()
    mine, theirs = sae_state(root / "topk" / HOOKS[0]), sae_state(folder)
    for key in theirs:
        torch.testing.assert_close(mine[key], theirs[key], rtol=1e-4, atol=1e-5)
    for a, b in zip(metrics(root / "topk"), metrics(tmp_path), strict=True):
        assert a.keys() == b.keys() and a["step"] == b["step"] and a["l0"] == b["l0"]
        for key in ("loss", "mse", "fvu", "dead_fraction"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6)
    assert not (root / "topk" / "checkpoint.rank1.pt").exists() and (root / "topk" / "training_curves.html").exists()


def test_data_parallel_aux_loss_on_sparse_kernels_and_dead_statistics_equal_one_process(
        two_rank_runs, cache, tmp_path, one_thread):
    root, _ = two_rank_runs
    [folder] = Trainer(aux_command(tmp_path, cache), progress=False).fit()
    assert max(r["auxk"] for r in metrics(tmp_path)) > 0 and max(r["dead_fraction"] for r in metrics(tmp_path)) > 0
    mine, theirs = sae_state(root / "aux" / HOOKS[0]), sae_state(folder)
    for key in theirs:
        torch.testing.assert_close(mine[key], theirs[key], rtol=1e-4, atol=1e-5)
    for a, b in zip(metrics(root / "aux"), metrics(tmp_path), strict=True):
        assert a["auxk"] == pytest.approx(b["auxk"], rel=1e-4, abs=1e-6)
        assert a["dead_fraction"] == b["dead_fraction"]
    history, reference = (load_file(f / "latent_history.safetensors") for f in (root / "aux" / HOOKS[0], folder))
    assert all(torch.equal(history[k], reference[k]) for k in reference)  # firing counts, since_fired


def test_module_split_equals_training_one_after_another(two_rank_runs, cache, tmp_path, one_thread):
    root, _ = two_rank_runs
    cmd = command(tmp_path, cache, hooks=HOOKS, sweep=["k=4", "k=8,lr=1e-3"])
    folders = Trainer(cmd, progress=False).fit()
    assert len(folders) == 4
    for folder in folders:
        mine, theirs = sae_state(root / "split" / folder.name), sae_state(folder)
        assert all(torch.equal(mine[k], theirs[k]) for k in theirs)
    assert metrics(root / "split") == metrics(tmp_path)  # merged from the ranks' files, in single-process order
    ranks = {rank: torch.load(root / "split" / f"checkpoint.rank{rank}.pt", weights_only=False) for rank in (0, 1)}
    assert sorted(n for state in ranks.values() for n in state["runs"]) == sorted(f.name for f in folders)


def test_bad_requests_are_clear_errors(two_rank_runs, cache, tmp_path, monkeypatch):
    _, errors = two_rank_runs
    assert sorted(line.split(" ", 2)[:2] for line in errors) == [["3", "0"], ["3", "1"], ["4", "0"], ["4", "1"]]
    assert all("--batch-size 255 (the global batch) does not split into 2 equal slices" in line
               for line in errors if line.startswith("3 "))
    assert all("shares 1 run(s) (hooks x sweep entries) among 2 processes; start at most 1" in line
               for line in errors if line.startswith("4 "))
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(SaelabError, match="need processes started by torchrun"):
        train(command(tmp_path, cache, distributed=True), progress=False)


def test_assign_runs_balances_sizes():
    assert assign_runs([1, 1, 1, 1], 2) == [0, 1, 0, 1]
    assert assign_runs([8, 1, 1, 4, 2], 2) == [0, 1, 1, 1, 1]  # 8 | 4 + 2 + 1 + 1
    assert sorted(set(assign_runs([5, 5, 5], 3))) == [0, 1, 2]


@pytest.mark.parametrize("mode", ["topk", "split"])
def test_a_killed_rank_resumes_from_the_checkpoint_to_the_uninterrupted_result(two_rank_runs, cache, tmp_path, mode):
    root, _ = two_rank_runs
    out = tmp_path / mode

    def job(**options):
        if mode == "topk":
            return command(out, cache, distributed=True, **options)
        return command(out, cache, hooks=HOOKS, sweep=["k=4", "k=8,lr=1e-3"], distribute_modules=True, **options)

    with pytest.raises(mp.ProcessExitedException):
        run_ranks(2, [job()], tmp_path, kill_rank_at_step=(1, 17))
    if mode == "topk":  # rank 0 writes the one checkpoint; the job stopped with rank 1
        assert torch.load(out / "checkpoint.pt", weights_only=False)["step"] == 14
        assert not (out / HOOKS[0]).exists()
    else:  # each rank checkpoints its own runs; rank 0 runs at its own pace until the job stops it, so it may
        # have checkpointed at any multiple of 7, finished, or (when slow to start) written nothing yet
        rank0 = out / "checkpoint.rank0.pt"
        if rank0.exists():
            assert torch.load(rank0, weights_only=False)["step"] in (7, 14, 21, STEPS)
        assert torch.load(out / "checkpoint.rank1.pt", weights_only=False)["step"] == 14
    assert run_ranks(2, [job(resume=True)], tmp_path) == []
    for folder in (root / mode).iterdir():
        if folder.is_dir():
            mine, theirs = sae_state(out / folder.name), sae_state(folder)
            assert all(torch.equal(mine[k], theirs[k]) for k in theirs)
    assert metrics(out) == metrics(root / mode)
