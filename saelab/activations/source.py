"""ActivationSource: run a TransformerBridge over token contexts and return per-token activations.

All requested hooks are read in one forward pass, which stops as soon as the last of them has fired
(TransformerLens' `stop_at_layer` is also passed, but native models ignore it and still run the
unembedding, which dominates a small model's cost). With
`with_grads`, the pass runs to the logits and back: each hook adds a zero tensor that requires grad, so
d(loss)/d(zero) is exactly d(loss)/d(activation) without cutting any path through other hooks.
"""

from __future__ import annotations

import functools
import itertools
import threading
from collections.abc import Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F

from saelab.activations.batch import ActivationBatch
from saelab.activations.hooks import per_token, resolve_hooks, stop_at_layer
from saelab.data import begin_and_separator_ids, special_token_ids
from saelab.errors import SaelabError


class _AllHooksFired(Exception):
    """Raised from the last hook to end the forward pass early; never escapes `harvest`."""


class ActivationSource:
    """Per-token activations at several hooks of `model` from one forward pass per batch of contexts.

    hooks:           hook names (validated against the model)
    with_grads:      also return d(sum of next-token CE)/d(activation) at each hook (causal LMs only)
    include_special: keep BOS/separator/padding positions (excluded by default)
    """

    def __init__(self, model, hooks: Sequence[str], with_grads: bool = False, include_special: bool = False):
        self.model = model
        self.specs = resolve_hooks(model, hooks)
        self.hooks = [s.name for s in self.specs]
        self.with_grads = with_grads
        # The hooks go onto the shared model for one pass, so passes from two threads (the trainer's prefetch
        # thread and a resampling draw) must not overlap.
        self._one_pass_at_a_time = threading.Lock()
        self.stop_at_layer = None if with_grads else stop_at_layer(self.specs)
        self.excluded = torch.tensor([] if include_special else special_token_ids(model.tokenizer), dtype=torch.long)
        begin, _ = begin_and_separator_ids(model.tokenizer)
        acts, _ = self.harvest(torch.tensor([[begin, begin]]))
        self.dims = {hook: a.shape[-1] for hook, a in acts.items()}

    def harvest(self, tokens: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
        """tokens [batch, pos] -> (acts, grads): hook -> [batch, pos, d]; grads None unless with_grads. Thread-safe."""
        with self._one_pass_at_a_time:
            return self._harvest(tokens)

    def _harvest(self, tokens: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
        batch, positions = tokens.shape
        tokens = tokens.to(self.model.cfg.device)
        captured: dict[str, torch.Tensor] = {}
        if not self.with_grads:

            def save(act, hook, name):
                captured[name] = act.detach().clone()
                if len(captured) == len(self.hooks):
                    raise _AllHooksFired

            with torch.no_grad():
                try:
                    self.model.run_with_hooks(
                        tokens,
                        fwd_hooks=[(n, functools.partial(save, name=n)) for n in self.hooks],
                        stop_at_layer=self.stop_at_layer,
                    )
                except _AllHooksFired:
                    pass
            return {n: per_token(n, captured[n], batch, positions) for n in self.hooks}, None

        zeros: dict[str, torch.Tensor] = {}

        def tap(act, hook, name):
            captured[name] = act.detach().clone()
            zeros[name] = torch.zeros_like(act, requires_grad=True)
            return act + zeros[name]

        with torch.enable_grad():
            logits = self.model.run_with_hooks(
                tokens, fwd_hooks=[(n, functools.partial(tap, name=n)) for n in self.hooks], return_type="logits"
            )
            if not isinstance(logits, torch.Tensor) or logits.dim() != 3 or logits.shape[:2] != tokens.shape:
                raise SaelabError("with_grads needs a causal language model that returns [batch, pos, vocab] logits.")
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten(), reduction="sum"
            )
            grads = torch.autograd.grad(loss, [zeros[n] for n in self.hooks])
        acts = {n: per_token(n, captured[n], batch, positions) for n in self.hooks}
        return acts, {n: per_token(n, g, batch, positions) for n, g in zip(self.hooks, grads)}

    def batch(self, tokens: torch.Tensor, first_context: int = 0) -> ActivationBatch:
        """tokens [batch, pos] -> ActivationBatch of the kept tokens (special positions dropped unless included).

        Context indices are first_context, first_context+1, ... for the rows of `tokens`.
        """
        acts, grads = self.harvest(tokens)
        batch, positions = tokens.shape
        context = torch.arange(first_context, first_context + batch).repeat_interleave(positions)
        position = torch.arange(positions).repeat(batch)
        token_ids = tokens.flatten().cpu()
        keep = ~torch.isin(token_ids, self.excluded)

        def flat(t: torch.Tensor) -> torch.Tensor:
            return t.flatten(0, 1).cpu()[keep]

        return ActivationBatch(
            acts={n: flat(a) for n, a in acts.items()},
            token_ids=token_ids[keep],
            context=context[keep],
            position=position[keep],
            grads=None if grads is None else {n: flat(g) for n, g in grads.items()},
        )

    def stream(
        self, contexts: Iterable[torch.Tensor], batch_contexts: int, first_context: int = 0
    ) -> Iterator[ActivationBatch]:
        """Harvest an iterable of [pos] context tensors, `batch_contexts` per forward pass, in order."""
        iterator = iter(contexts)
        index = first_context
        while chunk := list(itertools.islice(iterator, batch_contexts)):
            yield self.batch(torch.stack(chunk), first_context=index)
            index += len(chunk)
