"""What the engine decodes and which positions it scores: token sequences (one per chunk or chat
transcript) with a span label per position.

Text corpora score llama-perplexity's way (``Sequences.halves``): every chunk is n_ctx tokens and
positions n_ctx/2 .. n_ctx-2 are scored. Chat corpora (``chat.py``) score the positions whose
*next* token the assistant produced. Position p's logits predict token p+1, so a scored label at p
means "the token at p+1 is scored".
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

#: span labels of a scored position (0: not scored)
NOT_SCORED, TEXT, ASSISTANT, TOOL_CALL, PROMPT = 0, 1, 2, 3, 4
#: names of the labels in reports (``spans`` of a result)
SPAN_NAMES = {TEXT: "text", ASSISTANT: "assistant", TOOL_CALL: "tool_call", PROMPT: "prompt"}


@dataclass(frozen=True)
class Sequences:
    """``tokens`` (n_seq x width, int32; zeros past each length), ``lengths`` (n_seq) and ``spans``
    (n_seq x width, uint8): the label of each position whose logits are scored, 0 where not."""

    tokens: npt.NDArray[np.int32]
    lengths: npt.NDArray[np.int32]
    spans: npt.NDArray[np.uint8]

    @classmethod
    def halves(cls, chunks: npt.NDArray[np.int32]) -> Sequences:
        """llama-perplexity's scoring: positions n_ctx/2 .. n_ctx-2 of each full chunk."""
        n_seq, n_ctx = chunks.shape
        spans = np.zeros((n_seq, n_ctx), np.uint8)
        spans[:, n_ctx // 2 : n_ctx - 1] = TEXT
        return cls(np.ascontiguousarray(chunks, np.int32), np.full(n_seq, n_ctx, np.int32), spans)

    @classmethod
    def of(cls, seqs: list[npt.NDArray[np.int32]], spans: list[npt.NDArray[np.uint8]]) -> Sequences:
        """Variable-length sequences padded to the longest."""
        width = max((s.size for s in seqs), default=0)
        tokens = np.zeros((len(seqs), width), np.int32)
        labels = np.zeros((len(seqs), width), np.uint8)
        for i, (t, sp) in enumerate(zip(seqs, spans, strict=True)):
            if sp.size != t.size or (t.size and sp[-1] != NOT_SCORED):
                raise ValueError("a sequence's last position predicts nothing and cannot be scored")
            tokens[i, : t.size] = t
            labels[i, : t.size] = sp
        return cls(tokens, np.array([s.size for s in seqs], np.int32), labels)

    def __len__(self) -> int:
        return int(self.lengths.shape[0])

    @property
    def width(self) -> int:
        return int(self.tokens.shape[1])

    def sequence(self, i: int) -> npt.NDArray[np.int32]:
        return self.tokens[i, : self.lengths[i]]

    def scored(self, i: int) -> npt.NDArray[np.intp]:
        """Scored positions of sequence ``i``, ascending."""
        return np.flatnonzero(self.spans[i, : self.lengths[i]])

    def next_tokens(self, i: int) -> npt.NDArray[np.int64]:
        """The tokens the scored positions of sequence ``i`` predict."""
        out: npt.NDArray[np.int64] = self.tokens[i, self.scored(i) + 1].astype(np.int64)
        return out

    def row_spans(self) -> npt.NDArray[np.uint8]:
        """The span label of every scored row, in scoring order (sequence by sequence)."""
        return np.concatenate([self.spans[i, self.scored(i)] for i in range(len(self))]) if len(self) else \
            np.zeros(0, np.uint8)

    def rows_per_sequence(self) -> npt.NDArray[np.int64]:
        return np.array([self.scored(i).size for i in range(len(self))], np.int64)

    def first_rows(self) -> npt.NDArray[np.int64]:
        """The scored row each sequence's rows start at, then the number of rows (len + 1 values)."""
        return np.concatenate([[0], np.cumsum(self.rows_per_sequence())]).astype(np.int64)

    @property
    def n_rows(self) -> int:
        return int(self.rows_per_sequence().sum())

    def is_halves(self) -> bool:
        """Scored llama-perplexity's way (every text corpus)?"""
        return bool(len(self)) and np.array_equal(self.spans, Sequences.halves(self.tokens).spans) and \
            bool(np.all(self.lengths == self.width))

    def digest(self) -> str:
        """What a reference was built from: tokens, lengths and the scored positions with their labels."""
        h = hashlib.sha256(b"sequences-v1")
        for a in (self.lengths, self.tokens, self.spans):
            h.update(str(a.shape).encode() + np.ascontiguousarray(a).tobytes())
        return h.hexdigest()

    def arrays(self) -> dict[str, np.ndarray]:
        return {"tokens": self.tokens, "lengths": self.lengths, "spans": self.spans}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> Sequences:
        return cls(arrays["tokens"], arrays["lengths"], arrays["spans"])


def as_sequences(chunks: Sequences | npt.NDArray[np.int32]) -> Sequences:
    """Sequences as they are; a bare chunk array scored llama-perplexity's way."""
    return chunks if isinstance(chunks, Sequences) else Sequences.halves(chunks)
