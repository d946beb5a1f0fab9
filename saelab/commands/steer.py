"""`saelab steer`: complete --prompt with and without steering by SAE latents (saelab.steering), with the
next-token loss on --reference for each strength."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import NamedTuple

from saelab.config import SteerCommand, SteerConfig
from saelab.errors import SaelabError


class Steered(NamedTuple):
    """The completions at one strength and the next-token loss on the reference with that steering."""

    alpha: float
    completions: list[str]
    reference_loss: float


@dataclass
class SteerResult:
    """The options run, the SAE's hook, a note on the model (or None), the clean completions and reference loss,
    and one `Steered` per --alpha."""

    options: SteerConfig
    hook: str
    note: str | None
    baseline: list[str]
    clean_loss: float
    steered: list[Steered]

    def lines(self) -> list[str]:
        options = self.options
        lines = [f"note: {self.note}"] if self.note else []
        lines.append(
            f"prompt: {options.prompt!r}   {options.mode} latent(s) {options.feature} at {options.positions} "
            f"positions of {self.hook}"
        )
        lines += [f"baseline: {text!r}" for text in self.baseline]
        for alpha, completions, loss in self.steered:
            lines += [f"alpha {alpha:g}: {text!r}" for text in completions]
            lines.append(
                f"    next-token loss on the reference: {loss:.3f} (clean {self.clean_loss:.3f}, "
                f"change {loss - self.clean_loss:+.3f})"
            )
        return lines


def run(command: SteerCommand, progress: bool = True) -> SteerResult:
    """The baseline and steered completions of --prompt and the reference losses, for each --alpha, with a progress
    bar (stderr) over the generation steps unless `progress` is False (--quiet)."""
    from tqdm.auto import tqdm

    from saelab.analysis.evaluate import eval_model_name
    from saelab.models import load_model
    from saelab.sae.io import load_saes
    from saelab.steering import Steering, generate, intervention_for, next_token_loss, with_alpha

    options = command.steer
    if not options.sae or not options.feature:
        raise SaelabError("Name the SAE and the latent(s): saelab steer --sae DIR --feature I [--alpha A].")
    ((_, sae, hook),) = load_saes([options.sae], command.model.device)
    model_name, note = eval_model_name([sae], [options.sae], command.model.model)
    model = load_model(model_name, device=command.model.device, dtype=command.model.model_dtype)
    base = intervention_for(options.mode, options.feature, options.alpha[0], _positions(options.positions))
    Steering(sae, [base])  # bad features fail before any generation
    reference = options.reference or options.prompt
    samples = {
        "max_new_tokens": options.max_new_tokens,
        "temperature": options.temperature,
        "n": options.n,
        "seed": options.seed,
    }
    steps = (1 + len(options.alpha)) * options.max_new_tokens  # one step: a token for each of the --n completions
    with tqdm(total=steps, desc="generating", unit="step", disable=not progress, file=sys.stderr) as bar:
        clean_loss = next_token_loss(model, reference)
        baseline = generate(model, options.prompt, **samples, progress=bar)
        steered = []
        for alpha in options.alpha:
            bar.set_postfix_str(f"alpha {alpha:g}")
            steering = [with_alpha(base, alpha)]
            loss = next_token_loss(model, reference, sae, steering)
            completions = generate(model, options.prompt, sae, steering, **samples, progress=bar)
            steered.append(Steered(alpha, completions, loss))
    return SteerResult(options, hook, note, baseline, clean_loss, steered)


def _positions(text: str) -> int | str:
    """--positions: an int (that position and later) or a name ("all", "prompt", "generated")."""
    return int(text) if text.lstrip("-").isdigit() else text
