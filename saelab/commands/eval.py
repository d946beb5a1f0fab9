"""`saelab eval`: evaluate SAE folders on held-out text in one pass (saelab.analysis.evaluate) and write a JSON per
SAE (eval.json in its folder) or one --out file."""

from __future__ import annotations

import dataclasses
import itertools
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from saelab import __version__
from saelab.analysis.evaluate import eval_model_name, evaluate, format_table, heldout_skip, json_ready
from saelab.analysis.metrics import CONFIDENCE
from saelab.config import EvalCommand
from saelab.errors import SaelabError
from saelab.files import write_json

EVAL_JSON = "eval.json"


@dataclass
class EvalResult:
    """results: one JSON-ready dict per SAE (as written); written: the JSON files."""

    results: list[dict[str, Any]]
    written: list[Path]

    def lines(self) -> list[str]:
        first = self.results[0]
        return [
            *format_table(self.results).split("\n"),
            f"{first['n_tokens']:,} tokens in {first['seconds']:.0f} s; metrics: {', '.join(map(str, self.written))}",
        ]


def run(command: EvalCommand, progress: bool = True) -> EvalResult:
    """Evaluate command.eval.sae in the model they record (or --model) on the text after what they were trained on."""
    from saelab.models import load_model
    from saelab.sae.io import load_saes

    options = command.eval
    if not options.sae:
        raise SaelabError("Name the SAE folders to evaluate: --sae DIR [DIR ...].")
    if options.n_tokens <= 0 or options.batch_contexts <= 0:
        raise SaelabError("--n-tokens and --batch-contexts must be positive.")
    if options.outlier_norm < 0 or options.bootstrap_resamples < 0:
        raise SaelabError("--outlier-norm and --bootstrap-resamples must be 0 (off) or positive.")
    started = time.perf_counter()
    loaded = load_saes(options.sae, command.model.device)
    names = [sae.folder for sae in loaded]
    saes = [sae.sae for sae in loaded]
    model_name, model_note = eval_model_name(saes, names, command.model.model)
    skip, skip_note = heldout_skip([sae.metadata for sae in saes], command.data, options.skip_contexts)
    for note in (model_note, skip_note):
        if note:
            print(f"saelab: note: {note}", file=sys.stderr)
    model = load_model(model_name, device=command.model.device, dtype=command.model.model_dtype)
    contexts = _held_out_contexts(command, model, skip)
    results = evaluate(
        saes,
        model,
        contexts,
        names=names,
        downstream=options.downstream,
        mean_tokens=options.mean_tokens,
        batch_contexts=options.batch_contexts,
        dense_threshold=options.dense_threshold,
        skip_positions=options.skip_positions,
        outlier_norm=options.outlier_norm,
        bootstrap_resamples=options.bootstrap_resamples,
        bootstrap_seed=options.bootstrap_seed,
        progress=progress,
    )
    run_info = {
        "model": model_name,
        "data": dataclasses.asdict(command.data),
        "skip_contexts": skip,
        "skip_positions": options.skip_positions,
        "outlier_norm": options.outlier_norm,
        "bootstrap": {
            "resamples": options.bootstrap_resamples,
            "seed": options.bootstrap_seed,
            "confidence": CONFIDENCE,
        },
        "n_tokens": len(contexts) * command.data.context_length,
        "seconds": round(time.perf_counter() - started, 1),
        "saelab_version": __version__,
    }
    results = [json_ready({**result, "format": _format(folder), **run_info}) for result, folder in zip(results, names)]
    if options.out:
        payload = results[0] if len(results) == 1 else {"evaluations": results}
        return EvalResult(results, [write_json(options.out, payload)])
    return EvalResult(results, [write_json(Path(folder) / EVAL_JSON, r) for r, folder in zip(results, names)])


def _held_out_contexts(command: EvalCommand, model, skip: int) -> list:
    """The [context_length] token contexts to evaluate on: enough for --n-tokens, after the first `skip`."""
    from saelab.data import token_contexts

    n_contexts = math.ceil(command.eval.n_tokens / command.data.context_length)
    stream = token_contexts(command.data, model.tokenizer, model.cfg.n_ctx)
    contexts = list(itertools.islice(stream, skip, skip + n_contexts))
    if not contexts:
        raise SaelabError(
            f"The corpus holds no text after the {skip} skipped contexts; lower --skip-contexts or use another --seed."
        )
    return contexts


def _format(folder: str) -> str:
    """The folder's SAE format: "saelens" or "saelab"."""
    from saelab.sae.saelens import WEIGHTS as SAELENS_WEIGHTS

    return "saelens" if (Path(folder) / SAELENS_WEIGHTS).is_file() else "saelab"
