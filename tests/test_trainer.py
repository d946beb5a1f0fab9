import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import saelab.train.history as history_module
from saelab.activations import ActivationCache
from saelab.config import DataConfig, HarvestConfig, ModelConfig, SAEConfig, TrainConfig
from saelab.errors import Interrupted, SaelabError
from saelab.sae import load_sae
from saelab.train.command import TrainCommand
from saelab.train.trainer import Run, Trainer, learning_rate, plan_runs

HOOKS = ["blocks.1.hook_resid_post", "blocks.0.hook_mlp_out"]


def command(tmp_path, cache, **train) -> TrainCommand:
    options = {"cache": str(cache), "out": str(tmp_path / "run"), "train_tokens": 256 * 30, "batch_size": 256,
               "lr": 3e-3, "lr_warmup_steps": 5, "log_every": 3, "checkpoint_every": 7, "init_tokens": 2048}
    options.update(train)
    return TrainCommand(
        model=ModelConfig(model="tiny-native"), data=DataConfig(context_length=32),
        harvest=HarvestConfig(hooks=HOOKS[:1]), train=TrainConfig(**options),
        sae=SAEConfig(k=8, expansion=4),
    )


@pytest.fixture(scope="module")
def cache(tmp_path_factory, tiny_model, cache_config):
    folder = tmp_path_factory.mktemp("train-cache")
    config = cache_config(folder, hooks=HOOKS, n_tokens=32 * 160, shard_tokens=32 * 40)
    from saelab.activations import build_cache

    return build_cache(config, model=tiny_model, progress=False).path


def test_learning_rate_schedule():
    rates = [learning_rate(1.0, s, total=100, warmup=10, decay_fraction=0.2) for s in range(100)]
    assert rates[0] == pytest.approx(0.1) and rates[9] == 1.0 and rates[50] == 1.0 and rates[79] == 1.0
    assert rates[80] == pytest.approx(1.0) and rates[90] == pytest.approx(0.5) and rates[99] == pytest.approx(0.05)


def test_runs_are_hooks_times_sweep_entries(tmp_path, cache):
    cmd = command(tmp_path, cache, sweep=["k=4", "k=16,lr=1e-3"])
    cmd.harvest.hooks = HOOKS
    runs = plan_runs(cmd)
    assert [r.name for r in runs] == [f"{h}__{s}" for h in HOOKS for s in ("k=4", "k=16_lr=1e-3")]
    assert [r.sections["sae"].k for r in runs] == [4, 16, 4, 16] and runs[1].train.lr == 1e-3
    assert cmd.sae.k == 8  # the base config is untouched


@pytest.mark.parametrize(
    "sweep, message",
    [(["kk=3"], "not an SAE or per-run training option"), (["k:3"], "not key=value"),
     (["k=three"], "not a valid int"), (["architecture=nope"], "Known architectures: .*topk")],
)
def test_bad_sweeps_fail_before_any_work(tmp_path, cache, sweep, message):
    with pytest.raises(SaelabError, match=message):
        plan_runs(command(tmp_path, cache, sweep=sweep))


def test_k_larger_than_the_dictionary_is_refused(tmp_path, cache):
    cmd = command(tmp_path, cache)
    cmd.sae.k = 1000
    with pytest.raises(SaelabError, match="--k must be between 1 and d_sae=256"):
        Trainer(cmd, progress=False)


def test_training_reduces_fvu_and_saves_a_folded_sae_that_works_on_raw_activations(tmp_path, cache):
    cmd = command(tmp_path, cache, train_tokens=256 * 60, checkpoint_every=100)
    trainer = Trainer(cmd, progress=False)
    folders = trainer.fit()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["fvu"] < 0.5 * records[0]["fvu"] and records[-1]["l0"] == 8.0
    x = ActivationCache(cache).read(torch.arange(500)).acts[HOOKS[0]]
    saved = load_sae(folders[0])
    assert saved.input_scale == 1 and saved.metadata["folded_input_scale"] == pytest.approx(
        float(trainer.runs[0].sae.input_scale))
    torch.testing.assert_close(saved(x), trainer.runs[0].sae(x), atol=1e-5, rtol=1e-5)
    assert "plotly" in (tmp_path / "run" / "training_curves.html").read_text()[:100_000]


@pytest.mark.parametrize("mode", ["mutual", "feature"])
def test_batch_level_variants_are_saved_calibrated_to_k(tmp_path, cache, mode):
    cmd = command(tmp_path, cache, train_tokens=256 * 12, checkpoint_every=100)
    cmd.sae.architecture = "choice"
    cmd.choice.choice_mode = mode
    trainer = Trainer(cmd, progress=False)
    saved = load_sae(trainer.fit()[0])
    sample = trainer.stream.sample(cmd.train.init_tokens, draw=trainer.total_steps).acts[HOOKS[0]]
    with torch.no_grad():
        fired = (saved.encode(sample) != 0).sum()
    assert abs(int(fired) - 8 * len(sample)) <= 0.01 * 8 * len(sample)  # k per token on the calibration sample


def interrupt_at_step_17(monkeypatch, trainer: Trainer) -> None:
    """Run `trainer` until Ctrl-C arrives at step 17 (it checkpoints there)."""
    original = Run.step

    def interrupt_at_17(self, batch, step, total, log):
        if step == 17:
            raise KeyboardInterrupt
        return original(self, batch, step, total, log)

    monkeypatch.setattr(Run, "step", interrupt_at_17)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    monkeypatch.setattr(Run, "step", original)


def test_interrupted_training_resumes_to_the_identical_result(tmp_path, cache, monkeypatch):
    reference = Trainer(command(tmp_path / "a", cache), progress=False)
    reference.fit()
    interrupt_at_step_17(monkeypatch, Trainer(command(tmp_path / "b", cache), progress=False))
    assert torch.load(tmp_path / "b" / "run" / "checkpoint.pt", weights_only=False)["step"] == 17
    with pytest.raises(SaelabError, match="Pass --resume"):
        Trainer(command(tmp_path / "b", cache), progress=False)
    resumed = Trainer(command(tmp_path / "b", cache, resume=True), progress=False)
    assert resumed.start_step == 17
    resumed.fit()
    for mine, theirs in zip(resumed.runs[0].sae.state_dict().values(), reference.runs[0].sae.state_dict().values()):
        assert torch.equal(mine, theirs)

    def strip(path):
        return [{k: v for k, v in json.loads(line).items() if k not in ("seconds", "data_wait")} for line in path.read_text().splitlines()]

    assert strip(tmp_path / "b" / "run" / "metrics.jsonl") == strip(tmp_path / "a" / "run" / "metrics.jsonl")


def signal_during_step_17(monkeypatch, trainer: Trainer, signum: int) -> None:
    """Run `trainer` with `signum` sent to this process while the first of its runs takes step 17."""
    original = Run.step

    def signal_at_17(self, batch, step, total, log):
        if step == 17 and self is trainer.runs[0]:
            os.kill(os.getpid(), signum)
        return original(self, batch, step, total, log)

    monkeypatch.setattr(Run, "step", signal_at_17)
    with pytest.raises(Interrupted, match="after step 18 of 30.*--resume") as stopped:
        trainer.fit()
    assert stopped.value.signum == signum
    monkeypatch.setattr(Run, "step", original)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_mid_sweep_stops_every_run_after_the_same_step_and_resumes_exactly(tmp_path, cache, monkeypatch, signum):
    def sweep(folder, **train):
        cmd = command(folder, cache, sweep=["k=4", "k=8"], checkpoint_every=100, **train)
        cmd.harvest.hooks = HOOKS  # 2 hooks x 2 sweep entries = 4 runs stepping on each batch
        return cmd

    reference = Trainer(sweep(tmp_path / "a"), progress=False)
    reference.fit()
    signal_during_step_17(monkeypatch, Trainer(sweep(tmp_path / "b"), progress=False), signum)
    resumed = Trainer(sweep(tmp_path / "b", resume=True), progress=False)
    assert resumed.start_step == 18 and len(resumed.runs) == 4
    resumed.fit()
    for mine, theirs in zip(resumed.runs, reference.runs, strict=True):
        for a, b in zip(mine.sae.state_dict().values(), theirs.sae.state_dict().values(), strict=True):
            assert torch.equal(a, b)


def test_a_second_signal_mid_step_keeps_the_last_consistent_checkpoint(tmp_path, cache, monkeypatch):
    def sweep(folder, **train):
        return command(folder, cache, sweep=["k=4", "k=8"], checkpoint_every=7, **train)

    reference = Trainer(sweep(tmp_path / "a"), progress=False)
    reference.fit()
    trainer = Trainer(sweep(tmp_path / "b"), progress=False)
    original = Run.step

    def two_signals_in_the_second_run(self, batch, step, total, log):
        if step == 17 and self is trainer.runs[1]:  # the first run has already stepped on batch 17
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, batch, step, total, log)

    monkeypatch.setattr(Run, "step", two_signals_in_the_second_run)
    with pytest.raises(Interrupted, match="at once by a second SIGINT.*--resume"):
        trainer.fit()
    monkeypatch.setattr(Run, "step", original)
    resumed = Trainer(sweep(tmp_path / "b", resume=True), progress=False)
    assert resumed.start_step == 14  # the periodic checkpoint, not a half-stepped 17
    resumed.fit()
    for mine, theirs in zip(resumed.runs, reference.runs, strict=True):
        for a, b in zip(mine.sae.state_dict().values(), theirs.sae.state_dict().values(), strict=True):
            assert torch.equal(a, b)


def test_sigterm_ends_the_cli_with_a_checkpoint_a_sentence_and_status_143(tmp_path, cache):
    out = tmp_path / "run"
    args = [sys.executable, "-m", "saelab", "train", "--model", "tiny-native", "--cache", str(cache), "--out", str(out),
            "--hooks", HOOKS[0], "--k", "8", "--expansion", "4", "--batch-size", "64", "--train-tokens", str(64 * 100_000),
            "--init-tokens", "1024", "--log-every", "1", "--quiet"]
    process = subprocess.Popen(args, stderr=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and metrics.stat().st_size) and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM
    lines = stderr.strip().splitlines()
    assert lines[-1].startswith("saelab: stopped by SIGTERM after step") and "Traceback" not in stderr
    step = torch.load(out / "checkpoint.pt", weights_only=True)["step"]
    assert step >= 1 and f"after step {step} of 100000" in lines[-1]


def test_resume_with_another_config_or_nothing_to_resume(tmp_path, cache):
    with pytest.raises(SaelabError, match="Nothing to resume"):
        Trainer(command(tmp_path, cache, resume=True), progress=False)
    Trainer(command(tmp_path, cache, train_tokens=256 * 8), progress=False).fit()
    other = command(tmp_path, cache, train_tokens=256 * 8, resume=True)
    other.sae.k = 4
    with pytest.raises(SaelabError, match="another config.*sae.k: checkpoint 8, now 4"):
        Trainer(other, progress=False)


class _RunsCode:
    def __reduce__(self):  # unpickling this would call print(...) with the marker: it must never happen
        return (print, ("SAELAB-PICKLE-RAN",))


@pytest.mark.parametrize("content", ["pickle", "empty dict", "truncated"])
def test_a_crafted_or_foreign_checkpoint_runs_nothing_and_is_one_sentence(tmp_path, cache, capsys, content):
    out = tmp_path / "run"
    out.mkdir()
    if content == "pickle":
        torch.save({"step": 3, "identity": {}, "rng": _RunsCode(), "runs": {}}, out / "checkpoint.pt")
    elif content == "empty dict":
        torch.save({}, out / "checkpoint.pt")
    else:
        torch.save({"step": 3}, out / "checkpoint.pt")
        (out / "checkpoint.pt").write_bytes((out / "checkpoint.pt").read_bytes()[:40])
    with pytest.raises(SaelabError, match="checkpoint.pt is not a (readable )?saelab checkpoint") as caught:
        Trainer(command(tmp_path, cache, resume=True), progress=False)
    assert "\n" not in str(caught.value)
    assert "SAELAB-PICKLE-RAN" not in capsys.readouterr().out


def test_nan_loss_stops_with_step_and_a_good_checkpoint(tmp_path, cache, monkeypatch):
    original = ActivationCache.read

    def poisoned(self, index, hooks=None, grads=False):
        batch = original(self, index, hooks, grads)
        if len(index) == 256 and poisoned.calls == 12:
            batch.acts[HOOKS[0]][3, 0] = float("nan")
        poisoned.calls += len(index) == 256
        return batch

    poisoned.calls = 0
    monkeypatch.setattr(ActivationCache, "read", poisoned)
    with pytest.raises(SaelabError, match="became NaN/Inf at step 12.*checkpoint of the last good state"):
        Trainer(command(tmp_path, cache), progress=False).fit()
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert state["step"] == 12
    assert all(torch.isfinite(t).all() for t in state["runs"][HOOKS[0]]["sae"].values())


def test_nan_in_the_initialisation_sample_stops_before_anything_is_written(tmp_path, cache, monkeypatch):
    original = ActivationCache.read

    def poisoned(self, index, hooks=None, grads=False):
        batch = original(self, index, hooks, grads)
        batch.acts[HOOKS[0]][5, 2] = float("inf")
        return batch

    monkeypatch.setattr(ActivationCache, "read", poisoned)
    with pytest.raises(SaelabError, match=f"initialisation sample holds NaN/Inf activations at {HOOKS[0]} \\(1 of 2048"):
        Trainer(command(tmp_path, cache), progress=False)
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_a_full_disk_while_checkpointing_says_how_to_resume_the_training(tmp_path, cache, monkeypatch):
    import saelab.activations.cache as cache_module

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cache_module.os, "fsync", full)
    with pytest.raises(SaelabError, match="Disk full while writing .*checkpoint.pt.*then run the same command with --resume") as raised:
        Trainer(command(tmp_path, cache), progress=False).fit()
    assert "storage-dtype" not in str(raised.value)  # the cache's advice does not apply


def test_saved_sae_folders_get_the_usual_permissions(tmp_path, cache):
    folder = Trainer(command(tmp_path, cache, train_tokens=256 * 2), progress=False).fit()[0]
    umask = os.umask(0)
    os.umask(umask)
    assert folder.stat().st_mode & 0o777 == 0o777 & ~umask


def test_cache_without_the_hook_is_a_clear_error(tmp_path, cache):
    cmd = command(tmp_path, cache)
    cmd.harvest.hooks = ["blocks.0.hook_resid_pre"]
    with pytest.raises(SaelabError, match="has no hook 'blocks.0.hook_resid_pre'; it holds"):
        Trainer(cmd, progress=False)


def test_relu_2023_form_resamples_dead_latents_at_the_given_steps(tmp_path, cache):
    cmd = command(tmp_path, cache, train_tokens=256 * 12)
    cmd.sae.architecture = "relu"
    cmd.l1.decoder_norm, cmd.l1.resample_steps = "unit", [6]
    cmd.aux.dead_tokens = 256 * 3  # silent for 3 steps = dead
    trainer = Trainer(cmd, progress=False)
    sae = trainer.runs[0].sae
    with torch.no_grad():
        sae.b_enc[:50] = -1e4  # these 50 latents can never fire (and ReLU gives them no gradient)
    trainer.fit()
    assert trainer.resample_events == [(HOOKS[0], 6, 50)]
    assert sae.b_enc[:50].abs().max() < 1  # reset to 0 at step 6, then trained: no longer unable to fire


def test_latent_history_holds_every_latents_firings_between_log_steps(tmp_path, cache, monkeypatch):
    import saelab.train.trainer as trainer_module
    from saelab.analysis.dead import LatentHistory

    per_step = []  # [d_sae] per step, recounted from the dense code
    train_step = trainer_module.train_step

    def recording_step(*args, **kwargs):
        out = train_step(*args, **kwargs)
        per_step.append((out.code.dense() != 0).sum(dim=0))
        return out

    monkeypatch.setattr(trainer_module, "train_step", recording_step)
    cmd = command(tmp_path, cache, log_every=4)  # 30 steps: records after steps 0, 4, 8, ..., 28 and 29
    trainer = Trainer(cmd, progress=False)
    folder = trainer.fit()[0]
    history = LatentHistory.load(folder)
    fired = torch.stack(per_step)  # [30 steps, d_sae]
    closing = [0, 4, 8, 12, 16, 20, 24, 28, 29]
    expected = torch.stack([fired[a + 1 : b + 1].sum(0) for a, b in zip([-1, *closing], closing)])
    assert torch.equal(history.counts, expected)
    assert history.tokens.tolist() == [256 * (s + 1) for s in closing]
    last_fired = torch.where(fired > 0, torch.arange(30)[:, None], -1).max(dim=0).values
    assert torch.equal(history.since_fired, 256 * (29 - last_fired))  # never fired: 256 * 30 tokens
    assert history.dead_tokens == cmd.aux.dead_tokens and history.info["run"] == HOOKS[0]
    assert load_sae(folder).d_sae == history.d_sae  # the SAE loader ignores the history file


def test_recorder_merges_adjacent_records_and_keeps_the_totals(monkeypatch):
    monkeypatch.setattr(history_module, "MAX_HISTORY_RECORDS", 4)
    recorder = history_module.LatentRecorder(6, torch.device("cpu"))
    rows = torch.randint(0, 1000, (11, 6), generator=torch.Generator().manual_seed(0))
    for i, row in enumerate(rows):
        recorder.add(row)
        recorder.log_step(100 * (i + 1), last=i == 10)
    # 4 records -> 2 (pairs), then one per 2 log steps -> 4 -> 2 (spans of 4), then the last 3 close one record
    assert recorder.tokens == [400, 800, 1100] and recorder.log_steps_per_record == 4
    assert [c.tolist() for c in recorder.counts] == [rows[0:4].sum(0).tolist(), rows[4:8].sum(0).tolist(),
                                                     rows[8:11].sum(0).tolist()]
    assert torch.equal(torch.stack(recorder.counts).sum(0).long(), rows.sum(0))


def test_resumed_run_writes_the_same_latent_history(tmp_path, cache, monkeypatch):
    from safetensors.torch import load_file

    monkeypatch.setattr(history_module, "MAX_HISTORY_RECORDS", 4)  # merges before and after the interruption

    def relu_command(root, **train):
        cmd = command(root, cache, log_every=2, **train)
        cmd.sae.architecture = "relu"
        cmd.l1.decoder_norm, cmd.l1.resample_steps = "unit", [6, 20]
        cmd.aux.dead_tokens = 256 * 3
        return cmd

    def trainer_with_dead_latents(cmd):
        trainer = Trainer(cmd, progress=False)
        with torch.no_grad():
            trainer.runs[0].sae.b_enc[:50] = -1e4  # silent until resampled
        return trainer

    trainer_with_dead_latents(relu_command(tmp_path / "a")).fit()
    interrupt_at_step_17(monkeypatch, trainer_with_dead_latents(relu_command(tmp_path / "b")))
    Trainer(relu_command(tmp_path / "b", resume=True), progress=False).fit()
    reference = load_file(tmp_path / "a" / "run" / HOOKS[0] / "latent_history.safetensors")
    resumed = load_file(tmp_path / "b" / "run" / HOOKS[0] / "latent_history.safetensors")
    assert reference["resample_steps"].tolist() == [6, 20] and reference["resample_offsets"][1] >= 50
    assert 2 <= len(reference["tokens"]) < 4
    assert reference.keys() == resumed.keys()
    assert all(torch.equal(reference[k], resumed[k]) for k in reference)


def test_a_second_writer_on_the_same_out_is_refused_until_the_first_is_done(tmp_path, cache):
    first = Trainer(command(tmp_path, cache, train_tokens=256 * 4), progress=False)
    with pytest.raises(SaelabError, match="Another saelab process is writing to .*run; wait for it"):
        Trainer(command(tmp_path, cache, train_tokens=256 * 4), progress=False)
    first.fit()
    with pytest.raises(SaelabError, match="Pass --resume") as failed:  # a failed set-up holds no lock ...
        Trainer(command(tmp_path, cache, train_tokens=256 * 4), progress=False)
    assert failed.traceback  # ... even while its traceback (and so the half-built Trainer) is kept
    Trainer(command(tmp_path, cache, train_tokens=256 * 4, resume=True), progress=False).fit()  # free again


def test_a_fresh_run_starts_its_metrics_over(tmp_path, cache):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 0, "run": "old"}\n' * 3)
    Trainer(command(tmp_path, cache, train_tokens=256 * 4), progress=False).fit()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["run"] != "old" for r in records) and len({r["step"] for r in records}) == len(records)


def test_the_saved_sae_records_the_precision_auto_resolved_to(tmp_path, cache, monkeypatch):
    """--precision auto follows the CPU's bf16 units; the SAE's metadata says which precision trained it, and the
    bf16 run is a different (autocast) computation that lands close to the float32 one."""
    import saelab.devices

    saes = {}
    for units in (True, False):
        monkeypatch.setattr(saelab.devices, "cpu_has_bf16_units", lambda units=units: units)
        cmd = command(tmp_path / str(units), cache, train_tokens=256 * 8)
        Trainer(cmd, progress=False).fit()
        saes[units] = load_sae(tmp_path / str(units) / "run" / HOOKS[0])
    assert saes[True].metadata["precision"] == "bf16" and saes[False].metadata["precision"] == "fp32"
    assert not torch.equal(saes[True].W_enc, saes[False].W_enc)
    torch.testing.assert_close(saes[True].W_enc, saes[False].W_enc, atol=2e-2, rtol=0)
