"""``LocalEngine``: evaluations in this process, on any ``LogitsBackend`` (llama.cpp inside the model
worker, the numpy fake in fast tests)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Generator, Iterable, Iterator
from contextlib import closing, contextmanager
from functools import partial
from typing import Any, TypeVar

import numpy as np

from ..cache_config import CacheConfig
from ..compaction import compact_rows
from ..decode_geometry import decode_geometry
from ..environment import host_backend, memory_available_bytes
from ..generation import Divergence, Generations
from ..metrics import ReferenceRows, TokenStats, compact_ids, kl_compact, kl_exact, kl_reduced
from ..sequences import Sequences, as_sequences
from . import host_pinning
from .context_cache import ContextCache, ContextSet, close_all
from .pipeline import (
    SAMPLER_HOST_ROWS,
    Pipeline,
    RowParallel,
    ScoredBatch,
    chunks_alternate,
    decode_ahead,
    decoded_in_turn,
    device_reduction_asked,
    in_row_order,
    overlap_default,
    prepare_ahead,
    reduce_on_device,
)
from .protocol import (
    DEFAULT_TAIL_SAMPLES,
    DEFAULT_TOP_K,
    SPEED_PHASES,
    BackendInfo,
    CandidateRun,
    ContextFacts,
    DivergenceRun,
    EngineError,
    GenerationRun,
    LogitsBackend,
    LogitsContext,
    LogitsModel,
    ModelFacts,
    ModelLoad,
    ReferenceRun,
    SpeedRun,
    TokenPieces,
)

#: Seconds between progress reports of a long reference build or evaluation.
PROGRESS_EVERY_S = 5.0

T = TypeVar("T")


#: a group of sequences (tokens, scored positions); a source decodes one (its sequences' indices and
#: inputs) -> (member, arrays, lasting) per decoded block
Group = list[tuple[np.ndarray, np.ndarray]]
Blocks = Iterator[tuple[int, tuple[np.ndarray, ...], bool]]
Source = Callable[[list[int], Group], Blocks]


def _offloaded(ctx: LogitsContext) -> bool:
    return int(ctx.info.get("gpu_layers", 0)) > 0


def _logits_sources(contexts: list[LogitsContext]) -> list[Source]:
    return [partial(_one_array_batches, ctx) for ctx in contexts]


def _one_array_batches(ctx: LogitsContext, indices: list[int], group: Group) -> Blocks:
    return ((v.member, (v.logits,), v.lasting) for v in ctx.scored_logits(group))


def _reduced_batches(ctx: LogitsContext, row_ids: Callable[[int], np.ndarray], indices: list[int],
                     group: Group) -> Blocks:
    return ((v.member, (v.logits,), v.lasting) for v in ctx.reduced_rows(group, [row_ids(i) for i in indices]))


def _groups(seqs: Sequences, n_seq: int) -> Iterator[list[int]]:
    """The sequences with scored positions, in order, in groups of up to ``n_seq`` of equal length
    (decoded at once, as llama-perplexity decodes its chunks)."""
    group: list[int] = []
    for i in range(len(seqs)):
        if not seqs.next_tokens(i).size:  # nothing scored: nothing to decode
            continue
        if group and (len(group) == n_seq or seqs.lengths[i] != seqs.lengths[group[0]]):
            yield group
            group = []
        group.append(i)
    if group:
        yield group


def _group_inputs(seqs: Sequences, group: list[int]) -> Group:
    """What a context decodes for a group: each sequence's tokens and which positions are scored."""
    return [(seqs.sequence(i), seqs.spans[i, : seqs.lengths[i]] > 0) for i in group]


def _widest_group(seqs: Sequences, n_seq: int) -> Group:
    """The group asking for the most logits rows: decoding it once grows a context's logits buffer
    to what the whole evaluation needs."""
    groups = list(_groups(seqs, n_seq))
    if not groups:
        return []
    return _group_inputs(seqs, max(groups, key=lambda g: sum(seqs.next_tokens(i).size for i in g)))


def _busiest_micro_batch(seqs: Sequences, n_ubatch: int) -> Group:
    """For chunks decoded a micro-batch per call: the micro-batch asking for the most logits rows, as
    a group of its own; decoding it once grows a context's logits buffer to what the whole evaluation
    needs, at the cost of one micro-batch instead of a whole long chunk."""
    best: tuple[int, int, int] = (0, 0, 0)  # rows, sequence, start
    for i in range(len(seqs)):
        scored = seqs.spans[i, : seqs.lengths[i]] > 0
        for a in range(0, scored.size, n_ubatch):
            best = max(best, (int(scored[a : a + n_ubatch].sum()), i, a))
    rows, i, a = best
    if not rows:
        return []
    return [(seqs.sequence(i)[a : a + n_ubatch], seqs.spans[i, a : min(a + n_ubatch, seqs.lengths[i])] > 0)]


def _one_decode_per_group(model: ModelLoad, n_ctx: int) -> bool:
    """Each group of chunks is one decode (short chunks): the contexts are worth a second one, keeping
    and preparing; a long chunk decoded a micro-batch per call lends only its last (1 of 64 at n_ctx
    32,768), and its contexts' buffers are better freed."""
    n_seq, n_ubatch = decode_geometry(model.n_batch, model.n_ubatch, n_ctx)
    return n_seq > 1 or n_ctx <= n_ubatch


def _nothing_held(source: int) -> list[Any]:
    return []


def _generation_ctx(prompts: Sequences, n_tokens: int) -> int:
    """A context that holds the longest prompt and its generation."""
    return int(prompts.lengths.max(initial=0)) + n_tokens


def _empty_rows(k: int, m: int) -> ReferenceRows:
    z = np.zeros(0, np.float32)
    return ReferenceRows(np.zeros(0, np.int32), z, np.zeros((0, k), np.int32), np.zeros((0, k), np.float32),
                         np.zeros((0, m), np.int32), np.zeros((0, m), np.float32), np.zeros(0, np.float64))


def _context_facts(contexts: list[LogitsContext]) -> ContextFacts:
    """The first context's facts; the time spent in llama.cpp summed over all of them."""
    facts = dict(contexts[0].info)
    for key in ("context_seconds", "decode_seconds"):
        if key in facts:
            facts[key] = sum(float(c.info.get(key, 0.0)) for c in contexts)
    return ContextFacts.from_info(facts)


def _compact_block(logits: np.ndarray, nxt: np.ndarray, u0: np.ndarray, k: int, m: int,
                   a: int, b: int) -> ReferenceRows:
    return compact_rows(logits[a:b], nxt[a:b], k, m, u0[a:b])


def _kl_compact_block(logits: np.ndarray, ref: ReferenceRows, nxt: np.ndarray, a: int, b: int) -> TokenStats:
    return kl_compact(logits[a:b], ref.slice(a, b), nxt[a:b])


def _kl_exact_block(cand: np.ndarray, base: np.ndarray, nxt: np.ndarray, a: int, b: int) -> TokenStats:
    return kl_exact(cand[a:b], base[a:b], nxt[a:b])


class LocalEngine:
    """Runs evaluations in this process; keeps the last model loaded."""

    def __init__(self, backend: LogitsBackend, top_k: int = DEFAULT_TOP_K,
                 tail_samples: int = DEFAULT_TAIL_SAMPLES, threads: int | None = None) -> None:
        self.backend = backend
        self.top_k = top_k
        self.tail_samples = tail_samples
        self.rows = RowParallel(threads)
        self._pipeline: Pipeline | None = None
        #: the last evaluations' contexts, kept for the next evaluation that can use them
        self.kept = ContextCache()
        self._speed_ctx: tuple[tuple[ModelLoad, CacheConfig, int], LogitsContext] | None = None
        self._models: dict[ModelLoad, LogitsModel] = {}
        #: ``_reduces_on_device``'s default per model, decided at its first evaluation
        self._device_default: dict[ModelLoad, bool] = {}
        #: called now and then during long runs with chunks done, total, scored tokens, seconds
        self.on_progress: Callable[[dict[str, Any]], None] | None = None
        self._last_tick = 0.0

    def _tick(self, done: int, total: int, tokens: int, t0: float) -> None:
        now = time.perf_counter()
        if self.on_progress is None or done == total or now - max(self._last_tick, t0) < PROGRESS_EVERY_S:
            return
        self._last_tick = now
        self.on_progress({"chunks": done, "total": total, "tokens": tokens, "seconds": now - t0})

    def _scored_batches(
        self, seqs: Sequences, sources: list[Source], n_seq: int, t0: float, lender: Pipeline | None,
    ) -> Generator[ScoredBatch, None, None]:
        """Every decoded block of every sequence with the row it starts at (the sequences of a group
        come back interleaved, as llama.cpp computes them), group g of ``_groups`` from
        ``sources[g % len(sources)]``; with a ``lender`` and two sources, the blocks that stay valid
        until their context decodes again are lent in place (see ``Pipeline``)."""
        lend = lender is not None and len(sources) > 1
        first_rows = seqs.first_rows()
        tokens = 0
        groups = list(_groups(seqs, n_seq))

        ahead = lend and decode_ahead()  # each context decodes on its own thread (see decoded_in_turn)

        def decode(source: int, group: list[int]) -> Iterable[tuple[int, tuple[np.ndarray, ...], bool]]:
            views = sources[source](group, _group_inputs(seqs, group))
            if not ahead:
                return views
            # decoded ahead, a group's views are all taken before any is reduced: a view that the
            # context's next call overwrites (a long chunk's micro-batch) is copied first
            return [(m, arrays if lasting else tuple(a.copy() for a in arrays), True) for m, arrays, lasting in views]

        held = lender.held if lender is not None else _nothing_held
        with closing(decoded_in_turn(groups, decode, len(sources), held, ahead)) as decoded:
            for g, (group, views) in enumerate(zip(groups, decoded, strict=True)):
                source = g % len(sources)
                nxt = [seqs.next_tokens(i) for i in group]
                done = [0] * len(group)
                for member, arrays, lasting in views:
                    n = arrays[0].shape[0]
                    if done[member] + n > nxt[member].size:
                        raise EngineError(f"sequence {group[member]}: more logits rows came back than positions "
                                          "are scored")
                    yield ScoredBatch(nxt[member][done[member] : done[member] + n], arrays,
                                      source if lend and lasting else None,
                                      int(first_rows[group[member]]) + done[member])
                    done[member] += n
                for m, i in enumerate(group):
                    if done[m] != nxt[m].size:
                        raise EngineError(f"sequence {i}: {nxt[m].size} positions are scored but {done[m]} "
                                          "logits rows came back")
                # progress once the whole group is decoded: its sequences finish together, and a count
                # taken after the first of them read a quarter of the chunks done in a group's time
                tokens += sum(done)
                self._tick(group[-1] + 1, len(seqs), tokens, t0)

    def _reduce_all(
        self, seqs: Sequences, sources: list[Source], n_seq: int,
        reduce: Callable[[np.ndarray, tuple[np.ndarray, ...], int], list[T]], overlap: bool, t0: float,
    ) -> list[T]:
        """Every batch through ``reduce(next_tokens, logits, first_row)``, in order; overlapped with
        the decoding when ``overlap`` (see ``overlap_default``)."""
        if overlap:
            if self._pipeline is None:
                self._pipeline = Pipeline(self.rows)
            batches = self._scored_batches(seqs, sources, n_seq, t0, self._pipeline)
            try:
                return self._pipeline.run(batches, reduce)
            finally:  # now, not when a traceback lets go of it: its decode threads use the contexts
                batches.close()
        done = [(batch.first_row, reduce(batch.next_tokens, batch.logits, batch.first_row))
                for batch in self._scored_batches(seqs, sources, n_seq, t0, None)]
        return in_row_order(done)

    def _scoring_context(self, model: ModelLoad, cache: CacheConfig, n_ctx: int) -> LogitsContext:
        """A context decoding chunks in llama-perplexity's geometry (``decode_geometry``)."""
        n_seq, n_ubatch = decode_geometry(model.n_batch, model.n_ubatch, n_ctx)
        return self._model(model).context(cache, n_ctx, n_seq, n_ubatch)

    @contextmanager
    def _scoring(self, model: ModelLoad, cache: CacheConfig, n_ctx: int) -> Iterator[ContextSet]:
        """The contexts of one evaluation: kept ones if they fit (``ContextCache``), else new; kept
        for the next one afterwards, closed if the evaluation fails."""
        held = self.kept.take((model, cache, n_ctx), partial(self._contexts, model, cache, n_ctx))
        try:
            yield held
        except BaseException:
            close_all(held.contexts)
            raise
        self.kept.put(held)

    def _contexts(self, model: ModelLoad, cache: CacheConfig, n_ctx: int) -> ContextSet:
        """The context(s) that decode the chunks, and whether to overlap. Overlapping, a second
        context takes every other group of chunks, so each group's rows are reduced while the other
        decodes; if it cannot be created (memory), one context does the work, reducing each decode's
        rows before the next. Rows reduced on the device take the same contexts: two decoding on their
        own threads keep the GPU busy while each waits for its rows (on the Qwen 3.6 geometry at n_ctx
        512 one context was 30 % slower)."""
        first = self._scoring_context(model, cache, n_ctx)
        one_decode_per_group = _one_decode_per_group(model, n_ctx)
        overlap = overlap_default(_offloaded(first))
        contexts = [first]
        if overlap and chunks_alternate() and one_decode_per_group:
            try:
                contexts.append(self._scoring_context(model, cache, n_ctx))
            except RuntimeError as e:  # out of memory: the copies are slower, never wrong
                first.info["second_context_error"] = str(e)
        first.info["logits_contexts"] = len(contexts)
        return ContextSet((model, cache, n_ctx), contexts, overlap, keep=one_decode_per_group)

    def prepare(self, model: ModelLoad, cache: CacheConfig, chunks: Sequences | np.ndarray) -> None:
        """A hint that ``cache`` on ``chunks`` is evaluated after the coming evaluation: on a GPU
        (``prepare_ahead``), its contexts are created on a background thread while that one decodes, and
        each decodes once the widest group of ``chunks`` (long chunks: their busiest micro-batch) so
        llama.cpp grows its logits buffers before the evaluation needs them. Every decode starts
        from a cleared cache, so results never depend on it."""
        seqs = as_sequences(chunks)
        n_ctx = seqs.width
        if not (len(seqs) and prepare_ahead(self._model(model).describe().gpu_layers > 0)):
            return
        n_seq, n_ubatch = decode_geometry(model.n_batch, model.n_ubatch, n_ctx)
        one_decode = _one_decode_per_group(model, n_ctx)
        group = _widest_group(seqs, n_seq) if one_decode else _busiest_micro_batch(seqs, n_ubatch)
        if group:  # else nothing is scored: the evaluation decodes nothing
            self.kept.prepare((model, cache, n_ctx), partial(self._primed_contexts, model, cache, n_ctx, group))

    def _primed_contexts(self, model: ModelLoad, cache: CacheConfig, n_ctx: int, group: Group) -> ContextSet:
        """``_contexts``, each having decoded ``group`` as the evaluation will (on the background
        thread; the model is loaded)."""
        held = self._contexts(model, cache, n_ctx)
        width = self.top_k + self.tail_samples + 1
        try:
            for ctx in held.contexts:
                if self._reduces_on_device(model, ctx):
                    ids = [np.zeros((int(want.sum()), width), np.int32) for _, want in group]
                    views = ctx.reduced_rows(group, ids)
                else:
                    views = ctx.scored_logits(group)
                for _ in views:
                    pass
        except BaseException:
            close_all(held.contexts)
            raise
        return held

    def _reduces_on_device(self, model: ModelLoad, ctx: LogitsContext) -> bool:
        """``pipeline.reduce_on_device`` for an evaluation of ``model``: its output layer on a local GPU
        (not an RPC server's), and the sampler rows of every context the cache may hold at once
        (kept, in use, prepared; two each) against the host memory available at its first evaluation.
        The default is decided once per model, so a run does not change paths as its own contexts
        take memory."""
        if not ctx.reduces_on_device():
            return False
        asked = device_reduction_asked()
        if asked is not None:
            return asked
        if model not in self._device_default:
            facts = self._model(model).describe()
            output_on_gpu = host_backend().gpu is not None and not model.rpc and facts.gpu_layers > facts.n_layer
            host_bytes = self.max_held_contexts() * SAMPLER_HOST_ROWS * model.n_ubatch * facts.n_vocab * 4
            self._device_default[model] = reduce_on_device(output_on_gpu, host_bytes, memory_available_bytes())
        return self._device_default[model]

    def max_held_contexts(self) -> int:
        """Scoring contexts alive at once at most: the kept sets, the one in use and the one prepared,
        two contexts each."""
        return (self.kept.keep + 2) * 2

    def _own_context(self, model: ModelLoad, cache: CacheConfig, n_ctx: int) -> LogitsContext:
        """A generation or speed context; kept scoring contexts are closed first, for its memory."""
        self.kept.clear()
        return self._model(model).context(cache, n_ctx)

    def _model(self, model: ModelLoad) -> LogitsModel:
        if model not in self._models:
            # keep at most two models (candidate + reference): free the rest first
            while len(self._models) >= 2:
                old = next(iter(self._models))
                self.kept.drop_model(old)
                if self._speed_ctx is not None and self._speed_ctx[0][0] == old:
                    self._speed_ctx[1].close()
                    self._speed_ctx = None
                self._models.pop(old).close()
            self._models[model] = self.backend.load(model)
        return self._models[model]

    def info(self) -> BackendInfo:
        from ..kernels import kernel_name

        return dataclasses.replace(self.backend.info(), compaction=kernel_name())

    def describe(self, model: ModelLoad) -> ModelFacts:
        return self._model(model).describe()

    def tokenize(self, model: ModelLoad, text: str) -> np.ndarray:
        return self._model(model).tokenize(text)

    def reference(
        self, model: ModelLoad, cache: CacheConfig, chunks: Sequences | np.ndarray, seed: int
    ) -> ReferenceRun:
        t0 = time.perf_counter()
        rng = np.random.default_rng(seed)
        seqs = as_sequences(chunks)

        # one sampling offset per scored row, drawn in row order: the same whatever the batches or threads
        u0_all = np.asarray(rng.random(seqs.n_rows))

        def reduce(nxt: np.ndarray, arrays: tuple[np.ndarray, ...], row: int) -> list[ReferenceRows]:
            (logits,) = arrays
            n = logits.shape[0]
            u0 = u0_all[row : row + n]
            return self.rows.map(n, partial(_compact_block, logits, nxt, u0, self.top_k, self.tail_samples))

        with self._scoring(model, cache, seqs.width) as held:
            parts = self._reduce_all(seqs, _logits_sources(held.contexts), held.contexts[0].n_seq, reduce,
                                     held.overlap, t0)
        host_pinning.release_freed_memory()
        return ReferenceRun(time.perf_counter() - t0, ReferenceRows.concat(parts))

    def evaluate(
        self, model: ModelLoad, cache: CacheConfig, chunks: Sequences | np.ndarray, ref: ReferenceRows
    ) -> CandidateRun:
        t0 = time.perf_counter()
        seqs = as_sequences(chunks)

        def reduce(nxt: np.ndarray, arrays: tuple[np.ndarray, ...], row: int) -> list[TokenStats]:
            (logits,) = arrays
            n = logits.shape[0]
            return self.rows.map(n, partial(_kl_compact_block, logits, ref.slice(row, row + n), nxt))

        def reduced(nxt: np.ndarray, arrays: tuple[np.ndarray, ...], row: int) -> list[TokenStats]:
            return [kl_reduced(arrays[0], ref.slice(row, row + arrays[0].shape[0]))]

        first_rows = seqs.first_rows()

        def row_ids(i: int) -> np.ndarray:
            return compact_ids(ref.slice(int(first_rows[i]), int(first_rows[i + 1])), seqs.next_tokens(i))

        with self._scoring(model, cache, seqs.width) as held:
            on_device = len(ref) > 0 and self._reduces_on_device(model, held.contexts[0])
            if on_device:
                parts = self._reduce_all(seqs, [partial(_reduced_batches, ctx, row_ids) for ctx in held.contexts],
                                         held.contexts[0].n_seq, reduced, held.overlap, t0)
            else:
                parts = self._reduce_all(seqs, _logits_sources(held.contexts), held.contexts[0].n_seq, reduce,
                                         held.overlap, t0)
            held.contexts[0].info["device_reduction"] = on_device
            facts = _context_facts(held.contexts)
        stats = TokenStats.concat(parts)
        if len(stats) != len(ref):
            raise EngineError(f"reference has {len(ref)} rows but the corpus scored {len(stats)}")
        return CandidateRun(time.perf_counter() - t0, stats, facts)

    def evaluate_exact(
        self,
        model: ModelLoad,
        cache: CacheConfig,
        ref_model: ModelLoad,
        ref_cache: CacheConfig,
        chunks: Sequences | np.ndarray,
    ) -> CandidateRun:
        t0 = time.perf_counter()
        seqs = as_sequences(chunks)
        n_ctx = seqs.width
        self.kept.clear()  # two contexts of its own, created for each call
        ref_ctx = self._scoring_context(ref_model, ref_cache, n_ctx)
        cand_ctx = self._scoring_context(model, cache, n_ctx)

        def both(indices: list[int], group: Group) -> Blocks:
            for a, b in zip(ref_ctx.scored_logits(group), cand_ctx.scored_logits(group), strict=True):
                yield a.member, (a.logits, b.logits), a.lasting and b.lasting

        def reduce(nxt: np.ndarray, arrays: tuple[np.ndarray, ...], row: int) -> list[TokenStats]:
            base, cand = arrays
            return self.rows.map(cand.shape[0], partial(_kl_exact_block, cand, base, nxt))

        try:
            parts = self._reduce_all(seqs, [both], min(ref_ctx.n_seq, cand_ctx.n_seq), reduce,
                                     overlap_default(_offloaded(cand_ctx)), t0)
        finally:
            cand_ctx.close()
            ref_ctx.close()
        return CandidateRun(time.perf_counter() - t0, TokenStats.concat(parts), ContextFacts.from_info(cand_ctx.info))

    def tokenize_pieces(self, model: ModelLoad, text: str) -> TokenPieces:
        return self._model(model).tokenize_pieces(text)

    def _greedy(self, ctx: LogitsContext, prompts: Sequences,
                step: Callable[[int, int, np.ndarray], int | None], t0: float) -> tuple[int, float]:
        """Decode each prompt from an empty cache, then one token per decode: ``step(prompt, position,
        logits)`` reads the logits (a view, valid until the next decode) and returns the token to feed
        next, or None to end that prompt. Returns the tokens decoded one by one and the seconds spent
        on the prompts."""
        decoded, prefill = 0, 0.0
        for i in range(len(prompts)):
            prompt = prompts.sequence(i)
            t_prompt = time.perf_counter()
            logits = ctx.next_logits(prompt, 0)
            prefill += time.perf_counter() - t_prompt
            j = 0
            while (token := step(i, j, logits)) is not None:
                logits = ctx.next_logits(np.array([token], np.int32), prompt.size + j)
                decoded += 1
                j += 1
            self._tick(i + 1, len(prompts), decoded, t0)
        return decoded, prefill

    def generate_reference(self, model: ModelLoad, cache: CacheConfig, prompts: Sequences, n_tokens: int,
                           seed: int) -> GenerationRun:
        """Greedy generations of up to ``n_tokens`` per prompt, each step's distribution kept compact."""
        t0 = time.perf_counter()
        rng = np.random.default_rng(seed)
        m = self._model(model)
        tokens = np.full((len(prompts), n_tokens), -1, np.int32)
        lengths = np.zeros(len(prompts), np.int32)
        rows: list[ReferenceRows] = []

        def step(i: int, j: int, logits: np.ndarray) -> int | None:
            t = int(np.argmax(logits))
            rows.append(compact_rows(logits[None, :], np.array([t]), self.top_k, self.tail_samples,
                                     np.asarray(rng.random(1))))
            tokens[i, j], lengths[i] = t, j + 1
            return None if m.is_eog(t) or j + 1 == n_tokens else t

        ctx = self._own_context(model, cache, _generation_ctx(prompts, n_tokens))
        try:
            decoded, prefill = self._greedy(ctx, prompts, step, t0)
        finally:
            ctx.close()
        gens = Generations(tokens, lengths, ReferenceRows.concat(rows) if rows else _empty_rows(self.top_k,
                                                                                           self.tail_samples))
        return GenerationRun(time.perf_counter() - t0, gens, decoded, prefill)

    def generate(self, model: ModelLoad, cache: CacheConfig, prompts: Sequences, ref: Generations) -> DivergenceRun:
        """Greedy generations against the reference's, each stopped at its first differing token."""
        t0 = time.perf_counter()
        if len(ref.lengths) != len(prompts):
            raise EngineError(f"{len(prompts)} prompts but {len(ref.lengths)} reference generations")
        first = np.full(len(prompts), ref.n_tokens, np.int32)
        kl = np.full(len(prompts), np.nan, np.float32)
        offsets = ref.offsets()

        def step(i: int, j: int, logits: np.ndarray) -> int | None:
            want = int(ref.tokens[i, j])
            if int(np.argmax(logits)) != want:
                row = int(offsets[i]) + j
                kl[i] = kl_compact(logits[None, :], ref.rows.slice(row, row + 1), np.array([want])).kld[0]
                first[i] = j
                return None
            return None if j + 1 == ref.lengths[i] else want  # all of it reproduced: identical

        ctx = self._own_context(model, cache, _generation_ctx(prompts, ref.n_tokens))
        try:
            decoded, prefill = self._greedy(ctx, prompts, step, t0)
        finally:
            ctx.close()
        return DivergenceRun(time.perf_counter() - t0, Divergence(first, kl, ref.n_tokens), decoded,
                             ContextFacts.from_info(ctx.info), prefill)

    def speed(self, model: ModelLoad, cache: CacheConfig, n_ctx: int, phase: str,
              tokens: np.ndarray) -> SpeedRun:
        """Time one prompt-processing or generation pass; the context is kept between rounds."""
        if phase not in SPEED_PHASES:
            raise EngineError(f"unknown speed phase {phase!r} (known: {', '.join(SPEED_PHASES)})")
        key = (model, cache, n_ctx)
        if self._speed_ctx is None or self._speed_ctx[0] != key:
            if self._speed_ctx is not None:
                self._speed_ctx[1].close()
                self._speed_ctx = None
            self._speed_ctx = (key, self._own_context(model, cache, n_ctx))
        ctx = self._speed_ctx[1]
        t0 = time.perf_counter()
        ctx.decode_timed(tokens, one_by_one=phase == "tg")
        return SpeedRun(time.perf_counter() - t0, int(tokens.size), ContextFacts.from_info(ctx.info))

    def quantize(self, src: str, dst: str, weight_type: str) -> None:
        """Write ``dst``: the weights of ``src`` requantized to ``weight_type`` (e.g. Q3_K_M)."""
        self.backend.quantize(src, dst, weight_type)

    def close(self) -> None:
        self.kept.close()
        if self._speed_ctx is not None:
            self._speed_ctx[1].close()
            self._speed_ctx = None
        for m in self._models.values():
            m.close()
        self._models.clear()
        if self._pipeline is not None:
            self._pipeline.close()
        self.rows.close()
