"""What the live dashboard computes: one SAE in its model, loaded once, answering the feature pages' questions.

    live = LiveSAE(sae, model, sae_folder="runs/sae")
    live.activations("And God said", latent=5789)        # per-token activations of the latent, top latents of the text
    live.steer(5789, "add", 8.0, "In the beginning")     # completions with and without steering, and the loss change
    live.set_label(5789, "LORD", "notes")                # the SAE's labels.json

Every method takes plain values (what a request carries), checks them with the same option checks as the CLI
(a SaelabError says what is wrong) and returns JSON-ready dicts. Model work holds one lock: steering hooks the
model, so two requests must not run it at once; everything else (pages, data files) is served meanwhile.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import torch

from saelab.errors import SaelabError
from saelab.labels import Label, labels_json, read_labels, set_label
from saelab.sae.base import SAE
from saelab.sae.io import recorded_hook

TOP_LATENTS = 12
MAX_NEW_TOKENS = 128


class LiveSAE:
    """sae: a loaded SAE (eval mode) whose metadata names its hook; model: the TransformerBridge it reads;
    sae_folder: its local folder (labels.json lives there; None: no label editing); max_text_tokens: the longest
    text or prompt accepted, in tokens."""

    def __init__(self, sae: SAE, model: Any, sae_folder: str | Path | None = None, max_text_tokens: int = 512):
        self.sae, self.model = sae, model
        self.hook = recorded_hook(sae, "The SAE")
        self.sae_folder = Path(sae_folder) if sae_folder is not None and Path(sae_folder).is_dir() else None
        self.max_text_tokens = max_text_tokens
        self.lock = threading.Lock()

    def info(self) -> dict[str, Any]:
        """What the pages need to know: the SAE's shape and hook, the model, limits, and whether labels are editable."""
        return {
            "hook": self.hook,
            "model": str(self.sae.metadata.get("model", "")),
            "d_sae": self.sae.d_sae,
            "signed": bool(self.sae.signed),
            "max_text_tokens": self.max_text_tokens,
            "max_new_tokens": MAX_NEW_TOKENS,
            "labels_editable": self.sae_folder is not None,
        }

    def _latent(self, latent: Any) -> int:
        if isinstance(latent, bool) or not isinstance(latent, int) or not 0 <= latent < self.sae.d_sae:
            raise SaelabError(f"The latent must be a whole number from 0 to {self.sae.d_sae - 1}; got {latent!r}.")
        return latent

    def _tokens(self, text: Any, what: str) -> torch.Tensor:
        """text -> its tokens [1, pos] (BOS prepended), refusing empty or too long text."""
        from saelab.steering import to_tokens

        if not isinstance(text, str) or not text.strip():
            raise SaelabError(f"Type some {what} first.")
        tokens = to_tokens(self.model, text)
        if tokens.shape[1] - 1 > self.max_text_tokens:
            raise SaelabError(
                f"The {what} is {tokens.shape[1] - 1} tokens; the server takes at most {self.max_text_tokens} "
                "(saelab serve --max-text-tokens)."
            )
        return tokens

    @torch.no_grad()
    def activations(self, text: Any, latent: Any) -> dict[str, Any]:
        """The text's tokens (special tokens left out) with `latent`'s activation at each, and the TOP_LATENTS
        latents with the largest |activation| anywhere in the text: {"tokens" [pos], "acts" [pos], "top": [{"latent",
        "max" (its largest |activation|, signed), "position", "token", "firing" (tokens it fires on)}]}."""
        from saelab.analysis.splice import splice_keep_mask
        from saelab.steering import feature_activations

        latent = self._latent(latent)
        tokens = self._tokens(text, "text")
        with self.lock:
            pieces, code = feature_activations(self.model, self.sae, tokens[0])
        keep = splice_keep_mask(self.model, tokens)[0].cpu()
        code = code[keep]  # [pos, d_sae]
        pieces = [piece for piece, kept in zip(pieces, keep.tolist()) if kept]
        strongest = code.abs().max(0)  # values and positions [d_sae]
        order = strongest.values.topk(min(TOP_LATENTS, self.sae.d_sae)).indices
        top = [
            {
                "latent": int(i),
                "max": float(code[strongest.indices[i], i]),
                "position": int(strongest.indices[i]),
                "token": pieces[int(strongest.indices[i])],
                "firing": int((code[:, i] != 0).sum()),
            }
            for i in order.tolist()
            if strongest.values[i] > 0
        ]
        return {"tokens": pieces, "acts": code[:, latent].tolist(), "top": top}

    @torch.no_grad()
    def steer(
        self, latent: Any, mode: Any, alpha: Any, prompt: Any, max_new_tokens: Any = 24, reference: Any = ""
    ) -> dict[str, Any]:
        """Greedy completions of `prompt` without and with the intervention (saelab.steering.intervention_for: add,
        clamp or project, at strength alpha, at every position), and the next-token loss (nats) of `reference`
        under both; an empty reference is the prompt followed by the clean completion, the text the model would
        write. {"clean", "steered", "reference", "clean_loss", "steered_loss", "loss_change"}."""
        from saelab.config import SteerConfig
        from saelab.steering import generate, intervention_for, next_token_loss

        latent = self._latent(latent)
        if isinstance(max_new_tokens, int) and max_new_tokens > MAX_NEW_TOKENS:
            raise SaelabError(f"The server generates at most {MAX_NEW_TOKENS} new tokens; got {max_new_tokens}.")
        options = SteerConfig(
            feature=[latent], mode=mode, alpha=[alpha], prompt=prompt, max_new_tokens=max_new_tokens,
            reference=reference,
        )  # fmt: skip  (the CLI's checks: mode, a finite alpha, token counts)
        self._tokens(options.prompt, "prompt")
        if options.reference:
            self._tokens(options.reference, "reference text")
        steering = [intervention_for(options.mode, [latent], options.alpha[0])]
        with self.lock:
            clean = generate(self.model, options.prompt, max_new_tokens=options.max_new_tokens)[0]
            steered = generate(self.model, options.prompt, self.sae, steering, max_new_tokens=options.max_new_tokens)[0]
            text = options.reference or options.prompt + clean
            clean_loss = next_token_loss(self.model, text)
            steered_loss = next_token_loss(self.model, text, self.sae, steering)
        return {
            "clean": clean,
            "steered": steered,
            "reference": text,
            "clean_loss": clean_loss,
            "steered_loss": steered_loss,
            "loss_change": steered_loss - clean_loss,
        }

    def labels(self) -> dict[int, Label]:
        """The SAE's labels, read fresh from its labels.json ({} without a local folder)."""
        return read_labels(self.sae_folder) if self.sae_folder is not None else {}

    def set_label(self, latent: Any, label: Any, notes: Any = "") -> dict[str, dict[str, str]]:
        """Label (or, with both empty, unlabel) a latent in the SAE's labels.json; returns every label as JSON."""
        if self.sae_folder is None:
            raise SaelabError("This SAE was not loaded from a local folder, so there is no labels file to write.")
        if not isinstance(label, str) or not isinstance(notes, str):
            raise SaelabError("A label and its notes are text.")
        return labels_json(set_label(self.sae_folder, self._latent(latent), label, notes, d_sae=self.sae.d_sae))
