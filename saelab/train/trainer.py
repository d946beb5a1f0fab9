"""The training loop: several SAEs (hooks x sweep entries) from one activation stream.

    runs   = plan_runs(cmd, dims)           # one Run per (hook, sweep entry): SAE + Adam + dead-latent counters
    stream = open_stream(cmd, ...)          # cache (built if missing) or live harvest, reproducible by step
    for step, batch in stream:              # every run takes its hook's activations from the same batch
        run.step(batch, step)               # train_step: loss, backward, clip, Adam, decoder renormalisation

Checkpoints (`checkpoint.pt`, written atomically every --checkpoint-every steps, on Ctrl-C and on a NaN loss)
hold every run's SAE, optimiser and counters; `--resume` continues from one to the same result as an
uninterrupted run. Metrics go to `metrics.jsonl` (and wandb if asked); at the end each SAE is saved, folded,
to `<out>/<run name>/` with `sae.safetensors` + `cfg.json`, and `training_curves.html` plots the logs. Beside
each SAE, `latent_history.safetensors` holds how often every latent fired between log steps, its final tokens
since last firing and the resampling events (`LatentRecorder`; read by saelab.analysis.dead).

Under torchrun (saelab.train.distributed): data parallel keeps this layout, written by rank 0 alone (the
checkpoint is the single-process one, so either kind of run resumes the other). With --distribute-modules each
rank r writes `checkpoint.rank<r>.pt` and `metrics.rank<r>.jsonl` for its runs and saves their SAEs; at the end
rank 0 merges the metrics into `metrics.jsonl` (the lines a single process would write) and plots them.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import re
import signal
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from saelab.activations import ActivationBatch
from saelab.activations.cache import write_atomic
from saelab.config import TrainConfig, to_dict
from saelab.devices import autocast_dtype
from saelab.errors import Interrupted, SaelabError
from saelab.locking import FolderLock
from saelab.sae.base import SAE, StepContext
from saelab.sae.io import save_sae
from saelab.sae.refit import refit_decoder
from saelab.sae.registry import create_sae, sae_class, sae_sections
from saelab.train.command import TrainCommand
from saelab.train.distributed import MODULES, Replica, World, launch, place, shutdown
from saelab.train.history import LATENT_HISTORY, LatentRecorder
from saelab.train.interrupt import StopSignals
from saelab.train.log import TrainingLog, start_wandb
from saelab.train.resample import resample_dead_latents
from saelab.train.step import train_step
from saelab.train.stream import Prefetcher, open_stream

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
_PER_RUN_TRAIN_OPTIONS = ("lr", "adam_beta1", "adam_beta2", "grad_clip", "lr_warmup_steps", "lr_decay_fraction")
CHECKPOINT_KEYS = {"step", "identity", "rng", "runs"}
# Options that do not change what is computed (device only up to float rounding); a resumed run may differ in these.
# A data-parallel checkpoint is the single-process one (rank 0's), so --distributed is free too.
_RESUME_FREE = {("train", "resume"), ("train", "log_every"), ("train", "checkpoint_every"), ("train", "wandb"),
                ("model", "device"), ("train", "distributed")}


@dataclass
class RunSpec:
    """One SAE to train: which hook, its SAE sections, and its optimiser settings."""

    name: str
    hook: str
    sections: dict[str, Any]  # section name -> config dataclass (sae, aux, topk, ...)
    train: TrainConfig
    overrides: dict[str, str] = field(default_factory=dict)


def _option_owner(cmd: TrainCommand, key: str) -> tuple[str, type]:
    for name in sae_sections():
        section = getattr(cmd, name)
        hints = typing.get_type_hints(type(section))
        if key in hints:
            return name, hints[key]
    if key in _PER_RUN_TRAIN_OPTIONS:
        return "train", typing.get_type_hints(TrainConfig)[key]
    raise SaelabError(
        f"Sweep option '{key}' is not an SAE or per-run training option. Use names like k, architecture, l1_coef, "
        f"{', '.join(_PER_RUN_TRAIN_OPTIONS)}."
    )


def parse_sweep_entry(cmd: TrainCommand, entry: str) -> dict[str, tuple[str, str, Any]]:
    """'k=16,architecture=jumprelu' -> {key: (section, raw text, typed value)}."""
    parsed = {}
    for item in filter(None, (part.strip() for part in entry.split(","))):
        if "=" not in item:
            raise SaelabError(f"Sweep entry '{entry}': '{item}' is not key=value (e.g. 'k=16,architecture=topk').")
        key, raw = (s.strip() for s in item.split("=", 1))
        section, tp = _option_owner(cmd, key.replace("-", "_"))
        origin = typing.get_origin(tp)
        try:
            if tp is bool:
                value: Any = raw.lower() in ("1", "true", "yes", "on")
            elif origin is list:
                value = [typing.get_args(tp)[0](v) for v in raw.split()]
            else:
                value = tp(raw)
        except ValueError as exc:
            raise SaelabError(f"Sweep entry '{entry}': {key}={raw!r} is not a valid {tp.__name__}.") from exc
        parsed[key.replace("-", "_")] = (section, raw, value)
    return parsed


def plan_runs(cmd: TrainCommand) -> list[RunSpec]:
    """One run per (hook, sweep entry); no sweep means one run per hook."""
    entries = cmd.train.sweep or [""]
    runs = []
    for hook in cmd.harvest.hooks:
        for entry in entries:
            parsed = parse_sweep_entry(cmd, entry)
            sections = {name: copy.deepcopy(getattr(cmd, name)) for name in sae_sections()}
            train = copy.deepcopy(cmd.train)
            for key, (section, _, value) in parsed.items():
                setattr(train if section == "train" else sections[section], key, value)
            sae_class(sections["sae"].architecture)  # unknown architecture: fail before any work
            suffix = "__" + "_".join(f"{k}={raw}" for k, (_, raw, _) in parsed.items()) if parsed else ""
            name = re.sub(r"[^A-Za-z0-9_.=-]", "-", hook + suffix)
            runs.append(RunSpec(name, hook, sections, train, {k: raw for k, (_, raw, _) in parsed.items()}))
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise SaelabError(f"Two runs would share a name ({names}); make the sweep entries differ.")
    return runs


def learning_rate(base: float, step: int, total: int, warmup: int, decay_fraction: float) -> float:
    """Linear warmup over `warmup` steps, constant, then linear decay to 0 over the last decay_fraction."""
    factor = min(1.0, (step + 1) / max(1, warmup))
    decay_start = total * (1 - decay_fraction)
    if decay_fraction > 0 and step >= decay_start:
        factor *= max(0.0, (total - step) / (total * decay_fraction))
    return base * factor


class Run:
    """One SAE in training: the model, its Adam, and how many tokens each latent has gone without firing."""

    def __init__(self, spec: RunSpec, d_in: int, metadata: dict, seed: int, device: torch.device | None = None):
        self.spec = spec
        options = {name: spec.sections[name] for name in sae_sections() if name != "sae"}
        with torch.random.fork_rng():  # the init is a function of --seed alone (same for every sweep entry)
            torch.manual_seed(seed)
            self.sae: SAE = create_sae(d_in, spec.sections["sae"], options, {"hook": spec.hook, **metadata})
        if device is not None:
            self.sae.to(device)
        self.replica: Replica | None = None  # data-parallel training: set by the Trainer once the SAE is initialised
        self.lr = spec.train.lr or self.sae.default_learning_rate()
        self.optimizer = torch.optim.Adam(  # fused: one pass over each parameter's memory (measured in bench_step.py)
            self.sae.parameters(), lr=self.lr, betas=(spec.train.adam_beta1, spec.train.adam_beta2), fused=True
        )
        self.since_fired = torch.zeros(self.sae.d_sae, dtype=torch.long, device=self.sae.W_dec.device)
        self.history = LatentRecorder(self.sae.d_sae, self.sae.W_dec.device)
        self.dead_tokens = spec.sections["aux"].dead_tokens
        self.autocast = autocast_dtype(spec.train.precision, self.sae.W_dec.device)
        self.sae.metadata["precision"] = "bf16" if self.autocast is torch.bfloat16 else "fp32"  # what auto chose

    @torch.no_grad()
    def initialize(self, sample: ActivationBatch) -> None:
        """Input scale c = sqrt(d_in) / E||x|| (constant mode) and the variant's data-dependent init."""
        x = sample.acts[self.spec.hook].float()
        finite = torch.isfinite(x).all(dim=1)
        if not bool(finite.all()):
            raise SaelabError(
                f"The initialisation sample holds NaN/Inf activations at {self.spec.hook} ({int((~finite).sum())} of "
                f"{len(x)} tokens); nothing was trained or saved. A float16 model can overflow: use --model-dtype "
                "float32 or bfloat16."
            )
        self.sae.input_norm.fit(x)
        x_n, _ = self.sae.normalize(x)
        self.sae.initialize_from_data(x_n[:32_768])

    def step(self, batch: ActivationBatch, step: int, total: int, log: bool) -> dict[str, float] | None:
        """One optimiser step on this run's hook; returns metrics when `log`. Raises _NonFinite on a NaN loss."""
        train = self.spec.train
        lr = learning_rate(self.lr, step, total, train.lr_warmup_steps, train.lr_decay_fraction)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        device = self.sae.W_dec.device
        x = batch.acts[self.spec.hook].to(device).float()  # data parallel: this rank's slice of the batch
        x_n, stats = self.sae.normalize(x)
        grads = None
        if self.sae.needs_lm_grads and batch.grads is not None:
            grads = self.sae.input_norm.grads_to_sae(batch.grads[self.spec.hook].to(device).float(), stats)
        warmup = self.sae.sparsity_warmup_fraction() * total
        ctx = StepContext(
            sparsity_scale=min(1.0, step / warmup) if warmup > 0 else 1.0,
            dead=self.since_fired >= self.dead_tokens,
            grads=grads,
        )
        out = train_step(self.sae, self.optimizer, x_n, ctx, train.grad_clip, self.replica, self.autocast)
        if not torch.isfinite(out.loss):
            raise _NonFinite(self.spec.name, step)
        with torch.no_grad():
            firing_counts = out.code.firing_counts()
            tokens = len(x)
            if self.replica is not None:  # every rank counts the global batch, so all agree on what is dead
                firing_counts = self.replica.sum_(firing_counts)
                tokens *= self.replica.size
            self.since_fired += tokens
            self.since_fired[firing_counts > 0] = 0
            self.history.add(firing_counts)
            if not log:
                return None
            self.history.log_step((step + 1) * train.batch_size, last=step == total - 1)
            x_hat = self.sae.denormalize(out.x_hat, stats)
            if self.replica is None:
                fvu = float((x - x_hat).pow(2).sum() / (x - x.mean(dim=0)).pow(2).sum().clamp_min(1e-12))
            else:
                fvu = self.replica.fvu(x, x_hat)
            metrics = {
                "loss": float(out.loss),
                **{k: float(v) for k, v in out.terms.items()},
                "fvu": fvu,
                "l0": out.code.l0(),
                "dead_fraction": float((self.since_fired >= self.dead_tokens).float().mean()),
                "lr": lr,
            }
            if self.replica is not None:  # per-rank means over equal slices: their mean is the global batch's
                metrics.update(self.replica.mean({k: metrics[k] for k in ("loss", *out.terms, "l0")}))
            return metrics

    @torch.no_grad()
    def calibrate(self, sample: ActivationBatch) -> None:
        """Fix the SAE's inference state from a training `sample` once training ends (see SAE.calibrate_inference)."""
        x_n, _ = self.sae.normalize(sample.acts[self.spec.hook].to(self.sae.W_dec.device).float())
        self.sae.calibrate_inference(x_n)

    def refit(self, sample: ActivationBatch) -> None:
        """Refit the decoder to the frozen codes of a training `sample` (saelab.sae.refit); the held-out MSE before
        and after goes into the SAE's metadata."""
        x_n, _ = self.sae.normalize(sample.acts[self.spec.hook].to(self.sae.W_dec.device).float())
        self.sae.metadata["decoder_refit"] = refit_decoder(self.sae, x_n)._asdict()

    def resample_due(self, steps_done: int) -> bool:
        """The variant's resampling of dead latents is due after this many steps (SAE.resample_schedule)."""
        return steps_done in self.sae.resample_schedule()[0]

    @torch.no_grad()
    def resample(self, sample: ActivationBatch, steps_done: int) -> int:
        """Re-initialise latents dead for dead_tokens from a loss-weighted `sample`; returns how many."""
        x_n, _ = self.sae.normalize(sample.acts[self.spec.hook].float())
        losses = (self.sae.decode(self.sae.encode_normalized(x_n).dense()) - x_n).pow(2).sum(dim=1)
        dead = self.since_fired >= self.dead_tokens
        generator = torch.Generator().manual_seed(steps_done)
        count = resample_dead_latents(self.sae, self.optimizer, dead, x_n, losses, self.sae.resample_schedule()[1],
                                      generator)
        self.since_fired[dead] = 0  # give resampled latents a fresh window
        self.history.resampled(steps_done, steps_done * self.spec.train.batch_size, dead.nonzero().squeeze(1))
        return count

    def state(self) -> dict[str, Any]:
        return {"sae": self.sae.state_dict(), "optimizer": self.optimizer.state_dict(),
                "since_fired": self.since_fired, "metadata": self.sae.metadata, "d_in": self.sae.d_in,
                "history": self.history.state()}

    def load_state(self, state: dict[str, Any]) -> None:
        if state["d_in"] != self.sae.d_in:
            raise SaelabError(
                f"Run {self.spec.name}: the checkpoint's SAE has d_in={state['d_in']} but the activations have "
                f"d_in={self.sae.d_in}. Resume with the same cache and hooks, or start a new --out."
            )
        self.sae.load_state_dict(state["sae"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.since_fired = state["since_fired"].to(self.sae.W_dec.device)
        self.history.load_state(state["history"])
        self.sae.metadata = state["metadata"]


class _NonFinite(Exception):
    def __init__(self, run: str, step: int):
        super().__init__(run, step)
        self.run, self.step = run, step


def _resume_identity(cmd: TrainCommand) -> dict[str, Any]:
    full = to_dict(cmd)
    return {s: {k: v for k, v in opts.items() if (s, k) not in _RESUME_FREE} for s, opts in full.items()}


class Trainer:
    """Trains every planned run from one stream. `fit()` returns the folders of the saved SAEs.

    `world` (saelab.train.distributed.launch) is this process's place in a torchrun job; by default the only one.
    """

    def __init__(self, cmd: TrainCommand, model=None, progress: bool = True, world: World | None = None):
        self.lock: FolderLock | None = None
        try:
            self._setup(cmd, model, progress, world or World())
        except BaseException:  # a failed set-up frees --out at once (a kept traceback would hold the lock)
            if self.lock is not None:
                self.lock.release()
            raise

    def _setup(self, cmd: TrainCommand, model, progress: bool, world: World) -> None:
        self.all_specs = plan_runs(cmd)
        self.total_steps = cmd.train.train_tokens // cmd.train.batch_size
        if self.total_steps < 1:
            raise SaelabError(f"--train-tokens ({cmd.train.train_tokens}) is less than one batch ({cmd.train.batch_size}).")
        self.placement = place(world, cmd.train.batch_size, len(self.all_specs), CHECKPOINT, METRICS)
        if self.placement.model_device is not None:
            cmd = dataclasses.replace(cmd, model=dataclasses.replace(cmd.model, device=self.placement.model_device))
        self.cmd, self.world, self.progress = cmd, world, progress and world.main
        self.out = Path(cmd.train.out)
        self.writes = self.placement.writes
        self.lock = FolderLock(self.out) if world.main else None  # held until fit() returns: one writer per --out
        self.checkpoint, self.metrics = self.out / self.placement.checkpoint, self.out / self.placement.metrics
        self._check_checkpoint_matches_resume()
        world.barrier()  # no rank writes a checkpoint before every rank has looked for one
        self.stream = self._open_stream(model)
        metadata = {"model": cmd.model.model, "source": self.stream.description, **self.stream.provenance}
        self.runs = [Run(spec, self.stream.dims[spec.hook], metadata, cmd.data.seed, world.device) for spec in self.specs]
        self.start_step = 0
        self.resample_events: list[tuple[str, int, int]] = []  # (run, after step, latents resampled)
        if cmd.train.resume and self.checkpoint.exists():
            self._load_checkpoint(self.checkpoint)
        else:  # a new run, or a --distribute-modules rank stopped before its first checkpoint: start its runs over
            self._initialize_runs()
        if self.placement.replicate:
            for run in self.runs:
                run.replica = Replica(run.sae, world)

    def _check_checkpoint_matches_resume(self) -> None:
        """A checkpoint in --out needs --resume, and --resume needs one."""
        found = any(self.out.glob("checkpoint*.pt"))
        if found and not self.cmd.train.resume:
            raise SaelabError(
                f"{self.out} already holds a training checkpoint. Pass --resume to continue it, or choose another --out."
            )
        if self.cmd.train.resume and not found:
            raise SaelabError(f"Nothing to resume: {self.checkpoint} does not exist. Drop --resume to start a new run.")

    def _open_stream(self, model):
        """The activation stream of every hook this process's runs read (sets self.specs, those runs)."""
        specs = self.all_specs
        need_grads = any(sae_class(spec.sections["sae"].architecture).needs_lm_grads for spec in specs)
        stream = open_stream(self.cmd, list(dict.fromkeys(spec.hook for spec in specs)), need_grads, model=model,
                             progress=self.progress, part=self.placement.part, processes=self.world.size)
        sizes = [(s.sections["sae"].d_sae or s.sections["sae"].expansion * stream.dims[s.hook]) * stream.dims[s.hook]
                 for s in specs]
        self.specs = [specs[i] for i in self.placement.my_runs(sizes)]
        if len(self.specs) < len(specs):
            stream.keep_hooks(list(dict.fromkeys(spec.hook for spec in self.specs)))
        return stream

    def _initialize_runs(self) -> None:
        """A fresh start: drop old metrics and initialise every run from one sample."""
        if self.writes and self.metrics.exists():
            self.metrics.unlink()
        sample = self.stream.sample(self.cmd.train.init_tokens)
        for run in self.runs:
            run.initialize(sample)

    # -- checkpoints ---------------------------------------------------------------------------------
    def _save_checkpoint(self, step: int) -> None:
        if not self.writes:
            return
        buffer = io.BytesIO()
        torch.save({"step": step, "identity": _resume_identity(self.cmd), "rng": torch.get_rng_state(),
                    "runs": {run.spec.name: run.state() for run in self.runs}}, buffer)
        self.out.mkdir(parents=True, exist_ok=True)
        write_atomic(self.checkpoint, buffer.getvalue(), resume="run the same command with --resume to continue")

    def _load_checkpoint(self, path: Path) -> None:
        try:  # weights_only: tensors and plain containers only, so a crafted file cannot run code
            state = torch.load(path, weights_only=True, map_location=self.world.device)
        except Exception as exc:  # torch raises several types for a truncated, foreign or unsafe file
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise SaelabError(f"{path} is not a readable saelab checkpoint ({reason}). Start a new --out.") from exc
        if not isinstance(state, dict) or not CHECKPOINT_KEYS <= state.keys():
            raise SaelabError(
                f"{path} is not a saelab checkpoint (it lacks {', '.join(sorted(CHECKPOINT_KEYS))}). "
                "Resume from the folder the run wrote, or start a new --out."
            )
        if state["identity"] != _resume_identity(self.cmd):
            old, new = state["identity"], _resume_identity(self.cmd)
            diffs = [f"{s}.{k}: checkpoint {old.get(s, {}).get(k)!r}, now {v!r}"
                     for s, opts in new.items() for k, v in opts.items() if old.get(s, {}).get(k) != v]
            raise SaelabError(
                f"The checkpoint in {self.out} comes from another config ({'; '.join(diffs)}). "
                "Resume with the same options, or choose another --out."
            )
        if set(state["runs"]) != {run.spec.name for run in self.runs}:
            raise SaelabError(
                f"{path} holds the runs {sorted(state['runs'])}, but this process now trains "
                f"{sorted(run.spec.name for run in self.runs)}. Resume with as many processes as the run was started with."
            )
        for run in self.runs:
            run.load_state(state["runs"][run.spec.name])
        torch.set_rng_state(state["rng"].cpu())
        self.start_step = state["step"]
        if self.writes and self.metrics.exists():  # drop lines logged after the checkpoint, as an uninterrupted run never wrote them
            kept = [line for line in self.metrics.read_text().splitlines() if json.loads(line)["step"] < self.start_step]
            self.metrics.write_text("".join(line + "\n" for line in kept))

    # -- the loop ------------------------------------------------------------------------------------
    def fit(self) -> list[Path]:
        """Train to --train-tokens (from the checkpoint when resuming); returns the saved SAE folders (on rank 0
        of a torchrun job those of every run, on the other ranks none)."""
        try:
            return self._fit()
        finally:
            if self.lock is not None:
                self.lock.release()

    def _fit(self) -> list[Path]:
        """The loop: step every run on each batch, then resample, checkpoint and look for a stop signal."""
        train = self.cmd.train
        self.out.mkdir(parents=True, exist_ok=True)
        if self.world.main:
            (self.out / "config.json").write_text(json.dumps(to_dict(self.cmd), indent=2))
        wandb_run = start_wandb(to_dict(self.cmd), self.out) if train.wandb and self.world.main else None
        step, stopped_by = self.start_step, None
        self.stepped = 0  # runs that have stepped on the current batch (0 once the step, resampling included, is done)
        try:
            with (TrainingLog(self.metrics if self.writes else None, wandb_run, self.total_steps, step, train.log_every,
                              train.batch_size, len(self.runs), self.progress) as log,
                  Prefetcher(self.stream.batches(step), self.world.device) as batches, StopSignals() as stop):
                for batch in batches:
                    if step >= self.total_steps:
                        break
                    log.begin_step(step, batches.wait_seconds)
                    self._step_runs(batch, step, log)
                    step += 1
                    log.end_step(step - 1)
                    self._resample_due_runs(step, log)
                    self.stepped = 0
                    if step % train.checkpoint_every == 0:
                        self._save_checkpoint(step)
                    if self.world.any(stop.received is not None):  # every rank stops after the same step
                        stopped_by = stop.received or signal.SIGTERM  # None here: another rank got the signal
                        break
        except _NonFinite as exc:
            self._save_checkpoint(exc.step)
            raise SaelabError(
                f"The loss of run {exc.run} became NaN/Inf at step {exc.step}; training stopped and a checkpoint of "
                f"the last good state is in {self.checkpoint}. Lower --lr (or check the activations), then "
                "start again; --resume would continue with the same settings."
            ) from exc
        except KeyboardInterrupt:  # a second signal, mid-step: a checkpoint here is consistent only before any run stepped
            if self.stepped == 0:
                self._save_checkpoint(step)
            raise
        self._save_checkpoint(step)
        if stopped_by is not None:
            raise Interrupted(stopped_by, self._stopped_message(step, stopped_by))
        log.finish()
        return self._finish(step)

    def _step_runs(self, batch: ActivationBatch, step: int, log: TrainingLog) -> None:
        """One optimiser step of every run on `batch`, logging their metrics at log steps."""
        for run in self.runs:
            metrics = run.step(batch, step, self.total_steps, log.is_log_step(step))
            if metrics is not None:
                log.record(step, run.spec.name, metrics)
            self.stepped += 1

    def _resample_due_runs(self, steps_done: int, log: TrainingLog) -> None:
        """Resample the dead latents of the runs whose schedule asks for it after `steps_done` steps."""
        for run in self.runs:
            if run.resample_due(steps_done):
                count = run.resample(self.stream.sample(self.cmd.train.init_tokens, draw=steps_done), steps_done)
                self.resample_events.append((run.spec.name, steps_done, count))
                if self.writes:
                    log.note(f"{run.spec.name}: resampled {count} dead latents after step {steps_done}")

    def _stopped_message(self, step: int, signum: int) -> str:
        name = signal.Signals(signum).name
        return (f"stopped by {name} after step {step} of {self.total_steps}; the checkpoint in {self.checkpoint} "
                "holds it. Run the same command with --resume to continue to the same result.")

    def _finish(self, step: int) -> list[Path]:
        folders = []
        calibration = None
        refit_samples: dict[int, ActivationBatch] = {}  # by size: a sweep may set decoder_refit_tokens per run
        for run in self.runs if self.writes else []:
            if run.sae.calibrates_inference:
                calibration = calibration or self.stream.sample(self.cmd.train.init_tokens, draw=self.total_steps)
                run.calibrate(calibration)
            refit_tokens = run.spec.train.decoder_refit_tokens
            if run.sae.refits_decoder and refit_tokens:
                if refit_tokens not in refit_samples:
                    refit_samples[refit_tokens] = self.stream.sample(refit_tokens, draw=self.total_steps + 1)
                run.refit(refit_samples[refit_tokens])
            run.sae.metadata.update(trained_tokens=step * self.cmd.train.batch_size, run=run.spec.name,
                                    sweep=run.spec.overrides)
            folder = save_sae(run.sae, self.out / run.spec.name)
            info = {"run": run.spec.name, "hook": run.spec.hook, "dead_tokens": run.dead_tokens,
                    "batch_size": self.cmd.train.batch_size, "log_every": self.cmd.train.log_every}
            write_atomic(folder / LATENT_HISTORY, run.history.to_bytes(run.since_fired, info))
            folders.append(folder)
        if self.world.mode == MODULES:
            self.world.barrier()  # every rank has saved its SAEs and closed its metrics file
            if not self.world.main:
                return []
            self._merge_metrics()
            folders = [self.out / spec.name for spec in self.all_specs]
        if not self.world.main:
            return []
        write_training_curves(self.out / METRICS, self.out / "training_curves.html")
        return folders

    def _merge_metrics(self) -> None:
        """metrics.rank<r>.jsonl files -> metrics.jsonl, ordered by step and then as plan_runs orders the runs."""
        order = {spec.name: i for i, spec in enumerate(self.all_specs)}
        lines = [line for rank in range(self.world.size) if (self.out / f"metrics.rank{rank}.jsonl").exists()
                 for line in (self.out / f"metrics.rank{rank}.jsonl").read_text().splitlines()]
        lines.sort(key=lambda line: (json.loads(line)["step"], order[json.loads(line)["run"]]))
        write_atomic(self.out / METRICS, "".join(line + "\n" for line in lines).encode())


def write_training_curves(metrics: Path, html: Path) -> None:
    """Plot loss, FVU, L0 and dead fraction against tokens for every run (a self-contained plotly page)."""
    from plotly.subplots import make_subplots

    records = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    panels = ("loss", "fvu", "l0", "dead_fraction")
    figure = make_subplots(rows=2, cols=2, subplot_titles=panels)
    for run in dict.fromkeys(r["run"] for r in records):
        rows = [r for r in records if r["run"] == run]
        for i, key in enumerate(panels):
            figure.add_scatter(x=[r["tokens"] for r in rows], y=[r[key] for r in rows], name=run, legendgroup=run,
                               showlegend=i == 0, row=i // 2 + 1, col=i % 2 + 1)
    figure.update_xaxes(title_text="tokens")
    figure.update_layout(title="saelab training curves", height=700)
    figure.write_html(html, include_plotlyjs=True)


def train(cmd: TrainCommand, model=None, progress: bool = True) -> list[Path]:
    """Train every run of `cmd`; returns the saved SAE folders. Under torchrun this process joins the job
    (saelab.train.distributed) and trains its part; only rank 0 returns folders."""
    world = launch(cmd.train, cmd.model.device)
    try:
        return Trainer(cmd, model=model, progress=progress, world=world).fit()
    finally:
        shutdown(world)


__all__ = ["Run", "RunSpec", "Trainer", "learning_rate", "plan_runs", "train",
           "write_training_curves"]
