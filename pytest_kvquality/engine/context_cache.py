"""Scoring contexts kept from one evaluation to the next with the same model, cache and n_ctx.

Creating a context costs more than a short run's decoding: on the H200, llama.cpp pins and clears
a 1 GiB logits buffer for each context at its first 4-chunk decode, and frees it with the context.
A gate evaluates one cache configuration on each category in a row (and references in f16 between
them), so the last two sets of contexts are kept. Every decode starts from a cleared KV cache, so a
kept context gives the same bits as a new one (tested on the fake and through llama.cpp).

The first evaluation of each configuration still pays for its set. When the session knows which
configuration comes next, the set is created (and its buffers grown) on a background thread while
the current one decodes (``prepare``); sets given up are closed on that thread too.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
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


def _as_new(held: ContextSet) -> ContextSet:
    for ctx in held.contexts:  # the facts are this evaluation's: nothing created, no decode yet
        ctx.info.update(context_seconds=0.0, decode_seconds=0.0)
    return held


def _made(pending: Future[ContextSet]) -> ContextSet | None:
    """A prepared set, or None if preparing it failed (said in the worker's log; the caller creates it
    again, which fails with llama.cpp's own reason if the cause lasts)."""
    try:
        return pending.result()
    except Exception as e:  # any failure: the set is made again on the caller's thread
        print(f"pytest-kvquality: contexts prepared ahead could not be made ({type(e).__name__}: {e}); "
              "creating them when needed", file=sys.stderr)
        return None


class ContextCache:
    """At most ``keep`` sets of contexts not in use, the most recently used first, and at most one set
    being prepared for the evaluation expected next.

    Only the caller's thread touches the lists; the background thread runs ``create`` and
    ``close_all`` calls and hands sets back through futures, one job at a time, in order."""

    def __init__(self, keep: int = 2) -> None:
        self.keep = keep
        self._idle: list[ContextSet] = []
        self._pending: dict[ContextKey, Future[ContextSet]] = {}
        #: a set named by ``prepare``, started on the background thread by the next ``take``
        self._named: tuple[ContextKey, Callable[[], ContextSet]] | None = None
        self._background: ThreadPoolExecutor | None = None
        #: sets created, reused, and created ahead then used (for tests and benchmarks)
        self.created = 0
        self.reused = 0
        self.prepared = 0

    def prepare(self, key: ContextKey, create: Callable[[], ContextSet]) -> None:
        """Create the set for ``key`` on the background thread once the next ``take`` has its own set,
        so that it never competes with making the set in use; unless it is kept or being prepared, or
        another is named."""
        if self._named or key in self._pending or any(held.key == key for held in self._idle):
            return
        self._named = (key, create)

    def take(self, key: ContextKey, create: Callable[[], ContextSet]) -> ContextSet:
        """The idle set made for ``key``, the one prepared for it, or a new one; then the set named
        for another key starts being prepared. If creating a set fails (out of memory, most likely)
        while other sets are kept or prepared, those are closed and it is tried once more."""
        held = self._take(key, create)
        if self._named is not None and self._named[0] == key:
            self._named = None  # made just now
        if self._named is not None and not self._pending:  # one set prepared at a time
            named, self._named = self._named, None
            if self._background is None:
                self._background = ThreadPoolExecutor(1, thread_name_prefix="kvq-prepare")
            self._pending[named[0]] = self._background.submit(named[1])
        return held

    def _take(self, key: ContextKey, create: Callable[[], ContextSet]) -> ContextSet:
        for i, held in enumerate(self._idle):
            if held.key == key:
                self.reused += 1
                return _as_new(self._idle.pop(i))
        pending = self._pending.pop(key, None)
        if pending is not None and (prepared := _made(pending)) is not None:
            self.prepared += 1
            return _as_new(prepared)
        try:
            made = create()
        except RuntimeError:
            if not self._idle and not self._pending:
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
            self._close(self._idle.pop())

    def _close(self, held: ContextSet) -> None:
        """Close a set given up: on the background thread when there is one (freeing pinned buffers
        takes as long as pinning them), else now."""
        if self._background is None:
            close_all(held.contexts)
        else:
            self._background.submit(close_all, held.contexts)

    def _settle(self, which: Callable[[ContextKey], bool]) -> None:
        """Close the idle and prepared sets ``which`` picks, and wait until the background thread is idle."""
        for held in [h for h in self._idle if which(h.key)]:
            self._idle.remove(held)
            close_all(held.contexts)
        for key in [k for k in self._pending if which(k)]:
            if (made := _made(self._pending.pop(key))) is not None:
                close_all(made.contexts)
        if self._named is not None and which(self._named[0]):
            self._named = None
        if self._background is not None:
            self._background.submit(lambda: None).result()  # its jobs run in order: all earlier ones are done

    def drop_model(self, model: ModelLoad) -> None:
        """Close the sets of ``model`` (before the model itself is closed)."""
        self._settle(lambda key: key[0] == model)

    def clear(self) -> None:
        self._settle(lambda key: True)

    def close(self) -> None:
        self.clear()
        if self._background is not None:
            self._background.shutdown()
            self._background = None
