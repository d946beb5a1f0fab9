import itertools
import json

import pytest
import torch

from saelab.config import DataConfig
from saelab.data import (
    begin_and_separator_ids,
    iter_documents,
    kjv_documents,
    pack_contexts,
    python_docs_documents,
    token_contexts,
)
from saelab.errors import SaelabError


def test_embedded_corpora_are_real_english():
    kjv = kjv_documents()
    assert len(kjv) == 1189  # chapters of the KJV
    assert any("In the beginning God created the heaven and the earth." in d for d in kjv)
    docs = python_docs_documents()
    assert len(docs) > 500 and sum(map(len, docs)) > 500_000


def test_packing_is_an_exact_concatenation(tokenizer):
    docs = ["The quick brown fox.", "Jumps over the lazy dog, twice.", "A third short document here."] * 5
    length = 9
    contexts = list(pack_contexts(docs, tokenizer, length))
    begin, separator = begin_and_separator_ids(tokenizer)
    assert all(c.shape == (length,) and c[0] == begin for c in contexts)
    stream = []
    for i, doc in enumerate(docs):
        stream += ([separator] if i else []) + tokenizer(doc, add_special_tokens=False)["input_ids"]
    bodies = torch.cat([c[1:] for c in contexts]).tolist()
    assert len(contexts) == len(stream) // (length - 1)
    assert bodies == stream[: len(bodies)]


def test_order_is_deterministic_per_seed(tokenizer):
    first = [c.tolist() for c in itertools.islice(token_contexts(DataConfig(seed=1), tokenizer), 5)]
    again = [c.tolist() for c in itertools.islice(token_contexts(DataConfig(seed=1), tokenizer), 5)]
    other = [c.tolist() for c in itertools.islice(token_contexts(DataConfig(seed=2), tokenizer), 5)]
    assert first == again and first != other


def test_local_text_and_jsonl_files(tmp_path, tokenizer):
    (tmp_path / "a.txt").write_text("First paragraph of text here.\n\nSecond paragraph, also text.\n")
    docs = list(iter_documents(DataConfig(corpus=str(tmp_path / "a.txt"))))
    assert sorted(d.strip() for d in docs) == ["First paragraph of text here.", "Second paragraph, also text."]
    rows = [{"body": f"document number {i} has some words in it"} for i in range(20)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    config = DataConfig(corpus=str(tmp_path / "d.jsonl"), text_column="body", context_length=16)
    contexts = list(token_contexts(config, tokenizer))
    assert len(contexts) > 5
    with pytest.raises(SaelabError, match="no column 'text'.*body"):
        list(iter_documents(DataConfig(corpus=str(tmp_path / "d.jsonl"))))


def test_corpus_with_no_text_is_a_clear_error(tmp_path, tokenizer):
    (tmp_path / "empty.txt").write_text("\n\n   \n")
    with pytest.raises(SaelabError, match="no text"):
        list(token_contexts(DataConfig(corpus=str(tmp_path / "empty.txt")), tokenizer))


def test_unreachable_hub_dataset_is_a_clear_error():
    with pytest.raises(SaelabError, match="Could not open corpus"):
        list(iter_documents(DataConfig(corpus="no-such-org/no-such-dataset")))
