"""How llama-perplexity lays chunks out in a decode; plain integers, so the options and the reference
keys use it without importing the engine."""

from __future__ import annotations


def decode_geometry(n_batch: int, n_ubatch: int, n_ctx: int) -> tuple[int, int]:
    """Chunks decoded at once and the micro-batch, as llama-perplexity derives them: n_seq =
    max(1, n_batch / n_ctx) sequences, each in its own KV stream; the micro-batch no larger than
    what one decode holds."""
    n_seq = max(1, n_batch // n_ctx)
    return n_seq, min(n_ubatch, n_batch, n_seq * n_ctx)
