"""Evaluation text: the built-in corpus, user corpora, and llama.cpp's chunking.

A corpus is an ordered mapping category -> text. Each category's text is
tokenized on its own (with BOS, as ``llama-perplexity`` does for its input
file) and cut into chunks of ``n_ctx`` tokens.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt

from .chat import ChatError, Transcript, transcript

BUILTIN_DIR = Path(__file__).parent / "corpus_data"
BUILTIN_CATEGORIES = ("coding", "science", "tool_calling", "long_documents")
DEFAULT_CATEGORY = "default"
#: the built-in agent corpus (chat transcripts with tools, ``agent_gen.py``): ``--kv-corpus builtin:agent``
AGENT_CORPUS = "builtin:agent"
AGENT_FILE = BUILTIN_DIR / "agent.jsonl"


#: the name of the pooled figure (thresholds.OVERALL); no category may take it
POOLED = "overall"


class CorpusError(ValueError):
    """A corpus that cannot be read or is too short to evaluate."""


@dataclass(frozen=True)
class Corpus:
    """Text per category (chunked llama-perplexity's way), or chat transcripts per category (each
    one sequence, scored where the assistant speaks); never both."""

    name: str
    texts: dict[str, str]
    chats: dict[str, list[Transcript]] = field(default_factory=dict)

    @property
    def categories(self) -> list[str]:
        return list(self.chats or self.texts)

    @property
    def is_chat(self) -> bool:
        return bool(self.chats)

    def content_hash(self) -> str:
        h = hashlib.sha256()
        for cat, text in self.texts.items():
            h.update(cat.encode() + b"\0" + text.encode("utf-8") + b"\0")
        for cat, records in self.chats.items():
            for t in records:
                h.update(b"chat\0" + cat.encode() + b"\0" + t.digest_text().encode("utf-8") + b"\0")
        return h.hexdigest()


BUILTIN_CORPUS = "builtin"


def corpus_name(path: str | Path | None) -> str:
    """The name a corpus goes by (threshold files' ``corpus:``), known without reading it."""
    if path is None:
        return BUILTIN_CORPUS
    p = Path(path)
    return AGENT_CORPUS if p.name == AGENT_CORPUS else p.name


def builtin_corpus() -> Corpus:
    texts = {c: (BUILTIN_DIR / f"{c}.txt").read_text("utf-8") for c in BUILTIN_CATEGORIES}
    return Corpus(BUILTIN_CORPUS, texts)


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise CorpusError(f"corpus file {path} is not UTF-8 (byte {e.start}: {e.reason})") from e
    except OSError as e:
        raise CorpusError(f"corpus file {path} cannot be read: {e.strerror}") from e


def _read_jsonl(path: Path, chats: dict[str, list[Transcript]]) -> dict[str, str]:
    """Text records (``text``, ``category``) by category; chat records (``messages``) go to ``chats``."""
    parts: dict[str, list[str]] = {}
    for lineno, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise CorpusError(f"{path}:{lineno}: not valid JSON ({e.msg})") from e
        if isinstance(record, dict) and "messages" in record:
            try:
                t = transcript(record, f"{path}:{lineno}", DEFAULT_CATEGORY)
            except ChatError as e:
                raise CorpusError(str(e)) from e
            chats.setdefault(t.category, []).append(t)
            continue
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise CorpusError(f"{path}:{lineno}: each JSONL record needs a string field 'text' (text) or a list "
                              "'messages' (chat)")
        cat = record.get("category", DEFAULT_CATEGORY)
        if not isinstance(cat, str) or not cat:
            raise CorpusError(f"{path}:{lineno}: 'category' must be a non-empty string")
        parts.setdefault(cat, []).append(record["text"])
    return {c: "\n\n".join(t) for c, t in parts.items()}


def load_corpus(path: str | Path) -> Corpus:
    """Read ``.txt`` files (category = file stem), ``.jsonl`` files, or a directory of both; or a
    built-in corpus by name (``builtin:agent``)."""
    p = Path(path)
    if p.name == AGENT_CORPUS:  # from an ini file the name arrives behind the ini's folder
        return _named(load_corpus(AGENT_FILE), AGENT_CORPUS)
    if not p.exists():
        raise CorpusError(f"corpus path {p} does not exist")
    files = sorted(f for f in p.iterdir() if f.suffix in (".txt", ".jsonl")) if p.is_dir() else [p]
    if not files:
        raise CorpusError(f"corpus directory {p} has no .txt or .jsonl files")
    texts: dict[str, str] = {}
    chats: dict[str, list[Transcript]] = {}
    for f in files:
        found = _read_jsonl(f, chats) if f.suffix == ".jsonl" else {f.stem: _read_text(f)}
        for cat, text in found.items():
            texts[cat] = texts[cat] + "\n\n" + text if cat in texts else text
    if chats and texts:
        raise CorpusError(f"corpus {p} mixes text ({', '.join(texts)}) and chat transcripts ({', '.join(chats)}); "
                          "a corpus is scored one way: split it into two runs")
    if POOLED in chats:
        raise CorpusError(f"corpus {p}: a category may not be named {POOLED!r}, the name of the figure pooled "
                          "over all categories; rename the records' 'category'")
    if chats:
        return Corpus(corpus_name(p), {}, chats)
    empty = [c for c, t in texts.items() if not t.strip()]
    if empty:
        raise CorpusError(f"corpus {p}: category {empty[0]!r} has no text")
    if POOLED in texts:  # its row and gates would be confused with the pooled figure
        raise CorpusError(f"corpus {p}: a category may not be named {POOLED!r}, the name of the figure pooled "
                          "over all categories; rename the file or the records' 'category'")
    return Corpus(corpus_name(p), texts)


def _named(corpus: Corpus, name: str) -> Corpus:
    return Corpus(name, corpus.texts, corpus.chats)


def chunk_tokens(
    tokens: npt.NDArray[np.int32], n_ctx: int, max_chunks: int | None, category: str
) -> npt.NDArray[np.int32]:
    """Cut tokens into ``n_ctx`` chunks as llama-perplexity does (a trailing partial chunk is dropped).

    llama-perplexity refuses inputs shorter than ``2 * n_ctx`` tokens; so do we.
    """
    if tokens.size < 2 * n_ctx:
        raise CorpusError(
            f"category {category!r} tokenizes to {tokens.size} tokens; evaluating with "
            f"n_ctx={n_ctx} needs at least {2 * n_ctx} (llama-perplexity's rule). Add text "
            "or lower --kv-ctx."
        )
    n_chunk = tokens.size // n_ctx
    if max_chunks is not None:
        n_chunk = min(n_chunk, max_chunks)
    return np.ascontiguousarray(tokens[: n_chunk * n_ctx].reshape(n_chunk, n_ctx), np.int32)

