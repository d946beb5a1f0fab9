"""Training progress: the progress bar, metrics.jsonl, the optional wandb run, and the share of time spent waiting
for data."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Self

from tqdm.auto import tqdm

from saelab.errors import SaelabError


class TrainingLog:
    """One training loop's log. Every `log_every` steps (and at the last step) each run's metrics become a line of
    `metrics` (when given) and of wandb (when started), with `data_wait`: the share of the interval since the last
    log step spent waiting for batches."""

    def __init__(self, metrics: Path | None, wandb_run, total_steps: int, start_step: int, log_every: int,
                 batch_size: int, n_runs: int, progress: bool):
        self.file = open(metrics, "a") if metrics is not None else None  # noqa: SIM115 (closed in close())
        self.wandb_run = wandb_run
        self.total_steps, self.log_every, self.batch_size = total_steps, log_every, batch_size
        self.bar = tqdm(total=total_steps, initial=start_step, unit="step", desc=f"training {n_runs} SAE(s)",
                        disable=not progress)
        self.started = time.time()
        self.since, self.waited = time.perf_counter(), 0.0  # start of the current log interval, data wait before it
        self.data_wait = 0.0

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.close()
        if self.file is not None:
            self.file.close()

    def is_log_step(self, step: int) -> bool:
        return step % self.log_every == 0 or step == self.total_steps - 1

    def begin_step(self, step: int, wait_seconds: float) -> None:
        """Before a log step: the data-wait share of the interval since the last one (wait_seconds: the feed's
        total so far)."""
        if self.is_log_step(step):
            now = time.perf_counter()
            self.data_wait = round((wait_seconds - self.waited) / max(now - self.since, 1e-9), 4)
            self.since, self.waited = now, wait_seconds

    def record(self, step: int, run: str, metrics: dict[str, float]) -> None:
        """One run's metrics at a log step."""
        line = {"step": step, "tokens": (step + 1) * self.batch_size, "run": run,
                "seconds": round(time.time() - self.started, 2), **metrics, "data_wait": self.data_wait}
        if self.file is not None:
            self.file.write(json.dumps(line) + "\n")
            if self.wandb_run is not None:
                self.wandb_run.log({f"{run}/{k}": v for k, v in line.items()}, step=step)
        self.bar.set_postfix(fvu=f"{metrics['fvu']:.3f}", l0=f"{metrics['l0']:.1f}")

    def end_step(self, step: int) -> None:
        if self.is_log_step(step) and self.file is not None:
            self.file.flush()  # so `tail -f metrics.jsonl` shows progress
        self.bar.update(1)

    def note(self, message: str) -> None:
        """A line above the progress bar (e.g. a resampling event)."""
        self.bar.write(message)

    def finish(self) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish()


def start_wandb(config: dict[str, Any], out: Path):
    """A wandb run in `out` for project saelab, logging `config`."""
    try:
        import wandb
    except ImportError as exc:
        raise SaelabError("--wandb needs the wandb package: pip install wandb (WANDB_MODE=offline logs locally).") from exc
    return wandb.init(project="saelab", dir=str(out), config=config)
