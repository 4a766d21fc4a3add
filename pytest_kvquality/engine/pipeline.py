"""Overlapping the KL math with llama.cpp's next decode, without a wrong bit: ``RowParallel`` splits
a batch's rows over threads, ``Pipeline`` decides which logits views can be reduced while another
context decodes and which before the next decode, ``decoded_in_turn`` gives each context its thread."""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from ..environment import cpu_threads, env_flag, host_backend

T = TypeVar("T")
B = TypeVar("B")
G = TypeVar("G")

#: Smallest row block handed to one thread (smaller blocks cost more in overhead than they save).
MIN_ROWS_PER_TASK = 8


class RowParallel:
    """Reduces the rows of a logits batch on several threads (numpy releases the GIL).

    Each batch is finished before the next decode overwrites llama.cpp's logits
    buffer, so no copy of the n_rows x n_vocab block is ever made.
    """

    def __init__(self, threads: int | None = None) -> None:
        env = os.environ.get("KVQ_THREADS")
        self.threads = max(1, threads or (int(env) if env else cpu_threads()))
        self._pool = ThreadPoolExecutor(self.threads) if self.threads > 1 else None

    def map(self, n_rows: int, fn: Callable[[int, int], T]) -> list[T]:
        if self._pool is None or n_rows < 2 * MIN_ROWS_PER_TASK:
            return [fn(0, n_rows)]
        step = max(MIN_ROWS_PER_TASK, -(-n_rows // self.threads))
        bounds = [(a, min(a + step, n_rows)) for a in range(0, n_rows, step)]
        return list(self._pool.map(lambda ab: fn(*ab), bounds))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()


def overlap_default(offloaded: bool) -> bool:
    """Overlap the KL math with the next decode? ``KVQ_OVERLAP=1/0`` decides; by default only when
    the model runs on a GPU, where the host's cores are otherwise idle during a decode (on a CPU
    build, llama.cpp's threads already use every core)."""
    said = env_flag("KVQ_OVERLAP", None)
    return offloaded if said is None else said


@dataclass(frozen=True)
class ScoredBatch:
    """One decoded batch: the tokens its rows predict and the logits views llama.cpp returned."""

    next_tokens: np.ndarray
    logits: tuple[np.ndarray, ...]
    #: the context whose buffer these views are, when the views stay valid until that context decodes
    #: again (the last batch of a chunk, with contexts taking chunks in turn); None: reduce them first
    held_by: int | None = None
    #: the row of the whole run this batch's first row is (batches of a group come interleaved)
    first_row: int = 0


class Pipeline:
    """Reduces the rows of one context's decode while the other context decodes.

    llama.cpp overwrites a context's logits buffer at that context's next decode. With two contexts
    taking groups of chunks in turn, a group's rows stay valid while the other context decodes the
    next group: they are reduced in place, and ``held`` hands that reduction to whoever decodes the
    context next, to wait for. Any other batch (a long chunk's micro-batches, or with one context)
    is reduced in place before the next decode: with the compiled pass that takes about as long as
    the copy into a spare buffer that used to let it overlap, and it holds no second GiB of logits.
    Results come back in row order, so nothing changes a bit of the output.
    """

    def __init__(self, rows: RowParallel) -> None:
        self.rows = rows
        self._reducer = ThreadPoolExecutor(1)
        self._held: dict[int, list[Future[Any]]] = {}
        #: batches reduced before the next decode, and batches lent (reduced while another context decodes)
        self.waited = 0
        self.in_place = 0

    def held(self, holder: int) -> list[Future[Any]]:
        """The reductions still reading the views context ``holder`` lent; they are no longer tracked
        here, so whoever decodes that context next must wait for them first."""
        return self._held.pop(holder, [])

    def run(self, batches: Iterator[ScoredBatch],
            reduce: Callable[[np.ndarray, tuple[np.ndarray, ...], int], list[T]]) -> list[T]:
        pending: list[tuple[int, Future[list[T]]]] = []
        try:
            for batch in batches:
                future = self._reducer.submit(reduce, batch.next_tokens, batch.logits, batch.first_row)
                pending.append((batch.first_row, future))
                if batch.held_by is None:  # the next decode overwrites it: reduced before asking for it
                    wait([future])
                    self.waited += 1
                else:
                    self._held.setdefault(batch.held_by, []).append(future)
                    self.in_place += 1
        except BaseException:  # let running reductions finish before the views go away
            for _, f in pending:
                f.cancel()
            for _, f in pending:
                if not f.cancelled():
                    f.exception()
            raise
        finally:
            self._held.clear()
        return in_row_order([(row, f.result()) for row, f in pending])

    def close(self) -> None:
        self._reducer.shutdown()


def in_row_order(parts: list[tuple[int, list[T]]]) -> list[T]:
    """Each batch's results, batches sorted by their first row (a stable sort: equal rows keep order)."""
    out: list[T] = []
    for _, result in sorted(parts, key=lambda part: part[0]):
        out += result
    return out


def chunks_alternate() -> bool:
    """Two contexts taking groups of chunks in turn when overlapping (``KVQ_ALTERNATE=0`` turns it
    off: one context, each decode's rows reduced before the next; for measuring what it buys)."""
    return env_flag("KVQ_ALTERNATE", True) is not False


def decode_ahead() -> bool:
    """With two contexts, decode each group on its context's own thread while the group before is
    reduced, so that on a GPU one context's logits copy overlaps the other's forward pass
    (``KVQ_DECODE_AHEAD=0``: one thread decodes both in turn, as before; for measuring what it buys)."""
    return env_flag("KVQ_DECODE_AHEAD", True) is not False


def prepare_ahead(offloaded: bool) -> bool:
    """Create the next configuration's contexts while the current one decodes, when the session says
    which comes next (``ContextCache.prepare``)? ``KVQ_PREPARE=1/0`` decides; by default only on a
    GPU, where a new context's first decode pins and clears ~1 GiB of host memory for its logits
    (on a CPU build creating a context is cheap and the priming decode would take the cores)."""
    said = env_flag("KVQ_PREPARE", None)
    return offloaded if said is None else said


#: n_vocab-wide host rows llama.cpp reserves per output row of a decode while a backend sampler is
#: attached (``llama_context::output_reserve``: the logits, the sampler's logits and probabilities,
#: its candidates), against one without
SAMPLER_HOST_ROWS = 4


def device_reduction_asked(env: Mapping[str, str] | None = None) -> bool | None:
    """``KVQ_DEVICE_REDUCTION=1/0``: rows reduced on the device, or on the host; unset: ``reduce_on_device``
    decides, once per model (``LocalEngine._reduces_on_device``)."""
    return env_flag("KVQ_DEVICE_REDUCTION", None, env)


def may_reduce_on_device(env: Mapping[str, str] | None = None) -> bool:
    """Whether a worker started with ``env`` may reduce rows on the device: asked for, or not refused
    on a GPU build (decided before the worker starts, for its malloc tunables and pinning switch)."""
    said = device_reduction_asked(env)
    return host_backend().gpu is not None if said is None else said


def reduce_on_device(output_on_gpu: bool, host_bytes: int, available_bytes: int | None,
                     env: Mapping[str, str] | None = None) -> bool:
    """Reduce each scored row where llama.cpp computed it (``engine/device_reduction``)?
    ``KVQ_DEVICE_REDUCTION=1/0`` decides. Unset: yes when the model's output layer is on a GPU and
    the host memory llama.cpp then reserves for every context the engine may hold (``host_bytes``:
    ``SAMPLER_HOST_ROWS`` n_vocab-wide rows per output row of a micro-batch, 2 GiB per context at
    Gemma's 262,144 tokens) is at most half of what the host has available.

    Why by default: where copying rows bounds the rate it is ~3x faster (H200, issue 17's measure:
    the bundled Gemma's four configurations at n_ctx 512, 26,500-28,900 scored tok/s against
    8,500-9,100 on the host, benchmarks/README.md §12). Why not always: that memory, and a CPU build
    gains nothing from it. Its normalizer is ggml's, equal to the host pass's to float32 rounding
    (mean KLD within 0.01 %); each result says which path made it (``device_reduction``)."""
    said = device_reduction_asked(env)
    if said is not None:
        return said
    return output_on_gpu and available_bytes is not None and 2 * host_bytes <= available_bytes


def unpinned_output_buffers(env: Mapping[str, str] | None = None) -> bool:
    """Give llama.cpp's output buffers plain memory instead of pinned (``engine/host_pinning``)?
    ``KVQ_UNPINNED_OUTPUTS=1/0`` decides; by default exactly when rows may be reduced on the device
    (``may_reduce_on_device``; the switch is flipped only around decodes that reduce there). Then no
    row is copied out of them, so pinning them buys nothing, while pinning a context's 2 GiB of
    sampling rows holds up the CUDA calls of the context decoding beside it (H200, issue 17's
    measure: 14,100-14,900 scored tok/s with all host buffers unpinned against 11,400-11,500
    pinned). The host path copies every scored row into them and keeps them pinned."""
    said = env_flag("KVQ_UNPINNED_OUTPUTS", None, env)
    return may_reduce_on_device(env) if said is None else said


def huge_pages(env: Mapping[str, str] | None = None) -> bool:
    """Ask glibc's malloc for transparent huge pages in the worker (``host_pinning.with_malloc_tunables``)?
    ``KVQ_HUGE_PAGES=1/0`` decides; by default exactly when the output buffers are unpinned, where a
    context's first scored decode clears 2-4 GiB of fresh plain memory (H200, Qwen 3.6 geometry:
    that decode 0.58 s against 1.13 s; whole n_ctx 32,768 evaluations 8.7-9.1 s against 9.6-9.9 s)."""
    said = env_flag("KVQ_HUGE_PAGES", None, env)
    return unpinned_output_buffers(env) if said is None else said


def keep_freed_memory(env: Mapping[str, str] | None = None) -> bool:
    """Have glibc's malloc in the worker keep freed memory for reuse instead of returning it to the
    system (``host_pinning.with_malloc_tunables``)? ``KVQ_KEEP_FREED_MEMORY=1/0`` decides; by default
    exactly when the output buffers are unpinned: each configuration's context then clears its 2-4
    GiB of output buffers in pages the previous context already faulted in (H200, Qwen 3.6 geometry,
    n_ctx 32,768: whole evaluations 7.9-8.0 s against 8.2-8.4 s, one round)."""
    said = env_flag("KVQ_KEEP_FREED_MEMORY", None, env)
    return unpinned_output_buffers(env) if said is None else said


def decoded_in_turn(groups: list[G], decode: Callable[[int, G], Iterable[T]], n_contexts: int,
                    held: Callable[[int], list[Future[Any]]], ahead: bool) -> Generator[Iterable[T], None, None]:
    """Group g decoded by context ``g % n_contexts``, each after the reductions still reading the
    views it lent last time (``held``, e.g. ``Pipeline.held``). ``ahead``: group g+1 is decoded on
    its context's own thread while group g's views are reduced (``decode`` must then return views
    that stay valid until that context decodes again); each context is still used by one thread at a
    time and decodes the same groups, so no bit changes."""
    if not ahead:
        for g, group in enumerate(groups):
            wait(held(g % n_contexts))
            yield decode(g % n_contexts, group)
        return
    threads = [ThreadPoolExecutor(1) for _ in range(n_contexts)]

    def decode_after(source: int, group: G, lent: list[Future[Any]]) -> list[T]:
        wait(lent)
        return list(decode(source, group))

    pending: deque[Future[list[T]]] = deque()

    def submit(g: int) -> None:
        pending.append(threads[g % n_contexts].submit(decode_after, g % n_contexts, groups[g], held(g % n_contexts)))

    try:
        if groups:
            submit(0)
        for g in range(len(groups)):
            if g + 1 < len(groups):  # after group g-1's views were all handed out (and so held)
                submit(g + 1)
            yield pending.popleft().result()
    finally:  # no decode may outlive the generator: the contexts are closed after it
        for f in pending:
            f.cancel()
        for t in threads:
            t.shutdown(wait=True)
