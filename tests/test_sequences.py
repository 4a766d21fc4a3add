"""sequences.py: what the engine decodes and scores; text chunks keep llama-perplexity's positions."""

from __future__ import annotations

import numpy as np
import pytest

from pytest_kvquality.sequences import ASSISTANT, TEXT, TOOL_CALL, Sequences


def test_halves_score_positions_n_ctx_over_2_to_n_ctx_minus_2() -> None:
    chunks = np.arange(24, dtype=np.int32).reshape(3, 8)
    seqs = Sequences.halves(chunks)
    assert seqs.is_halves() and seqs.n_rows == 3 * 3
    assert seqs.scored(1).tolist() == [4, 5, 6]
    assert seqs.next_tokens(1).tolist() == [13, 14, 15]  # each scored position predicts the next token
    assert set(seqs.row_spans().tolist()) == {TEXT}


def test_the_digest_holds_the_scored_positions_and_their_labels() -> None:
    tokens = [np.arange(6, dtype=np.int32)]
    a = Sequences.of(tokens, [np.array([0, 2, 2, 0, 0, 0], np.uint8)])
    b = Sequences.of(tokens, [np.array([0, 2, 2, 2, 0, 0], np.uint8)])
    c = Sequences.of(tokens, [np.array([0, 2, 3, 0, 0, 0], np.uint8)])
    assert len({a.digest(), b.digest(), c.digest()}) == 3
    assert not a.is_halves()


def test_variable_lengths_are_padded_and_the_last_position_cannot_be_scored() -> None:
    seqs = Sequences.of([np.arange(2, 7, dtype=np.int32), np.arange(3, dtype=np.int32)],
                        [np.array([0, ASSISTANT, ASSISTANT, TOOL_CALL, 0], np.uint8), np.array([1, 0, 0], np.uint8)])
    assert seqs.width == 5 and seqs.lengths.tolist() == [5, 3]
    assert seqs.sequence(1).tolist() == [0, 1, 2]
    assert seqs.rows_per_sequence().tolist() == [3, 1]
    assert seqs.first_rows().tolist() == [0, 3, 4]
    assert seqs.row_spans().tolist() == [ASSISTANT, ASSISTANT, TOOL_CALL, 1]
    with pytest.raises(ValueError, match="last position"):
        Sequences.of([np.arange(3, dtype=np.int32)], [np.array([0, 0, 2], np.uint8)])
