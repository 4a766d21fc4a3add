"""corpus.py, corpus_gen.py and agent_gen.py: the built-in corpora, user corpora, chunking."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pytest_kvquality import agent_gen, corpus_gen
from pytest_kvquality.corpus import (
    AGENT_CORPUS,
    AGENT_FILE,
    BUILTIN_DIR,
    CorpusError,
    builtin_corpus,
    chunk_tokens,
    load_corpus,
)

#: the agent corpus's file, as measured on the H200 (docs/results.md)
AGENT_SHA256 = "5dd45e830e7df82b8d51585924124c07bdd9b78098360da9a2a96c639fa5a77e"


def test_builtin_corpus_is_regenerated_byte_for_byte(tmp_path: Path) -> None:
    corpus_gen.write(tmp_path)
    for name in ("coding", "science", "tool_calling", "long_documents"):
        assert (tmp_path / f"{name}.txt").read_bytes() == (BUILTIN_DIR / f"{name}.txt").read_bytes()


def test_agent_corpus_is_regenerated_byte_for_byte(tmp_path: Path) -> None:
    """The shipped transcripts are agent_gen.py's output (the H200 figures in docs/results.md were
    measured on these bytes: sha256 below)."""
    agent_gen.write(tmp_path / "agent.jsonl")
    assert (tmp_path / "agent.jsonl").read_bytes() == AGENT_FILE.read_bytes()
    assert hashlib.sha256(AGENT_FILE.read_bytes()).hexdigest() == AGENT_SHA256
    corpus = load_corpus(AGENT_CORPUS)
    assert corpus.name == AGENT_CORPUS and corpus.is_chat
    # the same bytes whatever the hash seed (a tie once went by a set's iteration order)
    code = "import hashlib, pytest_kvquality.agent_gen as g; print(hashlib.sha256(g.generate().encode()).hexdigest())"
    for seed in ("1", "2"):
        out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONHASHSEED": seed},
                             capture_output=True, text=True, check=True).stdout.strip()
        assert out == AGENT_SHA256
    assert {c: len(t) for c, t in corpus.chats.items()} == {"chat": 16, "tool_use": 16, "long_session": 10}


def test_builtin_corpus_has_four_categories_and_long_documents() -> None:
    c = builtin_corpus()
    assert c.categories == ["coding", "science", "tool_calling", "long_documents"]
    docs = c.texts["long_documents"].split("Operations manual ")[1:]
    # at least 8k tokens each: Gemma's tokenizer gives < 4.5 bytes per token on this text
    assert len(docs) >= 2 and all(len(d) > 8_000 * 4.5 for d in docs)
    assert json.loads(c.texts["tool_calling"].split("\n}\n")[0] + "\n}")["messages"]


def test_user_corpus_jsonl_and_text(tmp_path: Path) -> None:
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "legal.txt").write_text("Article 1. " * 10)
    (tmp_path / "c" / "mixed.jsonl").write_text(
        '{"text": "a b c", "category": "chat"}\n\n{"text": "d e f"}\n{"text": "g", "category": "chat"}\n'
    )
    c = load_corpus(tmp_path / "c")
    assert c.texts == {"legal": "Article 1. " * 10, "chat": "a b c\n\ng", "default": "d e f"}


@pytest.mark.parametrize(("name", "content", "message"), [
    ("bad.jsonl", b'{"category": "x"}\n', "needs a string field 'text'"),
    ("bad.jsonl", b"{not json\n", "not valid JSON"),
    ("latin.txt", "caf\u00e9".encode("latin-1"), "is not UTF-8"),
    ("empty.txt", b"  \n", "has no text"),
])
def test_bad_corpora_are_reported(tmp_path: Path, name: str, content: bytes, message: str) -> None:
    p = tmp_path / name
    p.write_bytes(content)
    with pytest.raises(CorpusError, match=message):
        load_corpus(p)


def test_chunking_follows_llama_perplexity() -> None:
    tokens = np.arange(10_000, dtype=np.int32)
    chunks = chunk_tokens(tokens, 512, None, "x")
    assert chunks.shape == (19, 512)  # partial last chunk dropped
    assert chunk_tokens(tokens, 512, 3, "x").shape == (3, 512)
    with pytest.raises(CorpusError, match="needs at least 1024"):
        chunk_tokens(tokens[:1000], 512, None, "x")
