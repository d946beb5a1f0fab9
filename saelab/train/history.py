"""Per-latent firing history of one training run, recorded by the trainer and read by saelab.analysis.dead."""

from __future__ import annotations

import json
from typing import Any

import torch
from safetensors.torch import save as safetensors_bytes

LATENT_HISTORY = "latent_history.safetensors"
HISTORY_FORMAT = "saelab-latent-history/1"
MAX_HISTORY_RECORDS = 512


class LatentRecorder:
    """How often each latent of one run fires over training: one record per log step, at most MAX_HISTORY_RECORDS.

    A record holds the firings of every latent since the previous record (int32 [d_sae]) and the tokens trained
    so far. When MAX_HISTORY_RECORDS records have accumulated, adjacent pairs are merged (counts summed, the later
    token count kept) and from then on a record is taken every second log step (then every fourth, ...), so a long
    run keeps between MAX/2 and MAX records of equal span, and the totals stay exact. The last step always closes
    a record. Resampling events (after which step, and which latents) are kept too.
    """

    def __init__(self, d_sae: int, device: torch.device):
        self.window = torch.zeros(d_sae, dtype=torch.long, device=device)  # firings since the last record
        self.counts: list[torch.Tensor] = []  # int32 [d_sae] per record, on the CPU
        self.tokens: list[int] = []
        self.log_steps_per_record = 1
        self.log_steps_pending = 0
        self.resamples: list[tuple[int, int, torch.Tensor]] = []  # (after step, tokens, int64 latent indices)

    def add(self, firing_counts: torch.Tensor) -> None:
        """firing_counts: [d_sae] tokens of this step on which each latent fired."""
        self.window += firing_counts

    def log_step(self, tokens: int, last: bool) -> None:
        """Called at every log step, after add(); `tokens` is the number trained so far."""
        self.log_steps_pending += 1
        if self.log_steps_pending < self.log_steps_per_record and not last:
            return
        self.counts.append(self.window.to(device="cpu", dtype=torch.int32))
        self.tokens.append(tokens)
        self.window.zero_()
        self.log_steps_pending = 0
        if len(self.counts) >= MAX_HISTORY_RECORDS:
            unpaired = len(self.counts) - len(self.counts) % 2
            merged = [a + b for a, b in zip(self.counts[0::2], self.counts[1::2])]
            self.counts = merged + self.counts[unpaired:]
            self.tokens = self.tokens[1::2] + self.tokens[unpaired:]
            self.log_steps_per_record *= 2

    def resampled(self, steps_done: int, tokens: int, latents: torch.Tensor) -> None:
        """latents: int64 [n] re-initialised after `steps_done` steps (`tokens` trained)."""
        self.resamples.append((steps_done, tokens, latents.detach().to("cpu", torch.long)))

    def state(self) -> dict[str, Any]:
        return {
            "window": self.window,
            "counts": self.counts,
            "tokens": self.tokens,
            "resamples": self.resamples,
            "log_steps_per_record": self.log_steps_per_record,
            "log_steps_pending": self.log_steps_pending,
        }

    def load_state(self, state: dict[str, Any]) -> None:
        self.window = state["window"].to(self.window.device)
        self.counts, self.tokens, self.resamples = state["counts"], state["tokens"], state["resamples"]
        self.log_steps_per_record, self.log_steps_pending = state["log_steps_per_record"], state["log_steps_pending"]

    def to_bytes(self, since_fired: torch.Tensor, metadata: dict[str, Any]) -> bytes:
        """The latent_history.safetensors file: counts int32 [n_records, d_sae], tokens int64 [n_records],
        since_fired int64 [d_sae], resample_steps / resample_tokens int64 [n_events], resample_offsets int64
        [n_events + 1] into resample_latents int64 [sum of resampled]; `metadata` (with dead_tokens) as JSON."""
        d_sae = self.window.numel()
        latents = [indices for _, _, indices in self.resamples]
        tensors = {
            "counts": torch.stack(self.counts) if self.counts else torch.zeros(0, d_sae, dtype=torch.int32),
            "tokens": torch.tensor(self.tokens, dtype=torch.long),
            "since_fired": since_fired.detach().to("cpu", torch.long),
            "resample_steps": torch.tensor([step for step, _, _ in self.resamples], dtype=torch.long),
            "resample_tokens": torch.tensor([tokens for _, tokens, _ in self.resamples], dtype=torch.long),
            "resample_offsets": torch.tensor([0] + [len(i) for i in latents], dtype=torch.long).cumsum(0),
            "resample_latents": torch.cat(latents) if latents else torch.zeros(0, dtype=torch.long),
        }
        info = {"format": HISTORY_FORMAT, "log_steps_per_record": self.log_steps_per_record, **metadata}
        return safetensors_bytes(tensors, metadata={"saelab": json.dumps(info)})
