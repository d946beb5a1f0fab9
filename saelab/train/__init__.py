"""Training: the step function, the batch streams, the multi-SAE trainer."""

from saelab.train.step import train_step
from saelab.train.trainer import Trainer, train

__all__ = ["Trainer", "train", "train_step"]
