"""Scoring contexts kept from one evaluation to the next with the same model, cache and n_ctx.

Creating a context costs more than a short run's decoding: on the H200, llama.cpp pins and clears
a 1 GiB logits buffer for each context at its first 4-chunk decode, and frees it with the context.
A gate evaluates one cache configuration on each category in a row (and references in f16 between
them), so the last two sets of contexts are kept. Every decode starts from a cleared KV cache, so a
kept context gives the same bits as a new one (tested on the fake and through llama.cpp).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..cache_config import CacheConfig
from .protocol import LogitsContext, ModelLoad

#: what a set of scoring contexts was made for: the model, the cache configuration, n_ctx
ContextKey = tuple[ModelLoad, CacheConfig, int]


@dataclass
class ContextSet:
    """The contexts of one evaluation (two when the KL math overlaps the decoding) and whether it does."""

    key: ContextKey
    contexts: list[LogitsContext]
    overlap: bool
    #: worth keeping: each group of chunks is one decode, so creating the contexts weighs; a long
    #: chunk's many decodes outweigh it, and its contexts' buffers are better freed
    keep: bool = True


def close_all(contexts: list[LogitsContext]) -> None:
    for ctx in contexts:
        ctx.close()


class ContextCache:
    """At most ``keep`` sets of contexts not in use, the most recently used first."""

    def __init__(self, keep: int = 2) -> None:
        self.keep = keep
        self._idle: list[ContextSet] = []
        #: sets created and sets reused (for tests and benchmarks)
        self.created = 0
        self.reused = 0

    def take(self, key: ContextKey, create: Callable[[], ContextSet]) -> ContextSet:
        """The idle set made for ``key``, or a new one; if creating it fails (out of memory, most
        likely) while other sets are kept, those are closed and it is tried once more."""
        for i, held in enumerate(self._idle):
            if held.key == key:
                self.reused += 1
                for ctx in held.contexts:  # the facts are this evaluation's: nothing created, no decode yet
                    ctx.info.update(context_seconds=0.0, decode_seconds=0.0)
                return self._idle.pop(i)
        try:
            made = create()
        except RuntimeError:
            if not self._idle:
                raise
            self.clear()
            made = create()
        self.created += 1
        return made

    def put(self, held: ContextSet) -> None:
        """Keep a set whose evaluation ended normally, if worth it (one that failed is closed by the caller)."""
        if not held.keep:
            close_all(held.contexts)
            return
        self._idle.insert(0, held)
        while len(self._idle) > self.keep:
            close_all(self._idle.pop().contexts)

    def drop_model(self, model: ModelLoad) -> None:
        """Close the sets of ``model`` (before the model itself is closed)."""
        for held in [h for h in self._idle if h.key[0] == model]:
            self._idle.remove(held)
            close_all(held.contexts)

    def clear(self) -> None:
        while self._idle:
            close_all(self._idle.pop().contexts)
