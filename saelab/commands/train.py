"""`saelab train`: train every run of the command (saelab.train.trainer) and report the saved SAE folders."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from saelab.train.command import TrainCommand


@dataclass
class TrainResult:
    """The saved SAE folders (none on the other ranks of a torchrun job) and the --out folder."""

    folders: list[Path]
    out: Path

    def lines(self) -> list[str]:
        if not self.folders:
            return []
        return [*(f"saved SAE: {folder}" for folder in self.folders),
                f"metrics: {self.out}/metrics.jsonl, curves: {self.out}/training_curves.html"]


def run(command: TrainCommand, progress: bool = True) -> TrainResult:
    from saelab.train.trainer import train

    return TrainResult(train(command, progress=progress), Path(command.train.out))
