"""The evaluation engine: a small interface, an in-process implementation, a worker client.

``Engine`` is what the plugin talks to. ``LocalEngine`` runs evaluations in
this process on any ``LogitsBackend`` (llama.cpp inside the worker, a fake in
fast tests). ``WorkerEngine`` runs a ``LocalEngine`` over llama.cpp in a child
process, so a native crash fails the tests that needed it, with the tail of
the llama.cpp log, instead of killing pytest.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np

from . import ipc
from .cache_config import CacheConfig
from .environment import env_flag
from .metrics import ReferenceRows, TokenStats, compact_rows, kl_compact, kl_exact

#: Reference compression: exact top-k tokens and m tail samples per scored position.
DEFAULT_TOP_K = 144
DEFAULT_TAIL_SAMPLES = 96
#: Seconds between progress reports of a long reference build or evaluation.
PROGRESS_EVERY_S = 5.0
#: Lines of the llama.cpp log shown when the worker fails.
LOG_TAIL_LINES = 40


class EngineError(RuntimeError):
    """An evaluation failed; the message says which model, cache and why."""


class WorkerCrash(EngineError):
    """The model worker process died (native crash, OOM kill)."""


@dataclass(frozen=True)
class ModelLoad:
    """How to load a model: the file, how many layers go to the GPU (-1: all), and whether its
    contexts keep sliding-window layers at full size (llama.cpp's swa_full; llama-server's default
    is off, and so is ours)."""

    path: str
    gpu_layers: int = -1
    swa_full: bool = False


@dataclass
class Timed:
    seconds: float


@dataclass
class ReferenceRun(Timed):
    rows: ReferenceRows


@dataclass
class CandidateRun(Timed):
    stats: TokenStats
    #: what llama.cpp decided for the candidate context (rotation_k/v, kv_cache_mib, ...)
    context: dict[str, Any] = field(default_factory=dict)


@dataclass
class SpeedRun(Timed):
    """One timed decode: ``seconds`` spent in llama.cpp, measured where it ran."""

    n_tokens: int
    context: dict[str, Any] = field(default_factory=dict)


#: speed phases: prompt processing (a batch) and token generation (one token per decode)
SPEED_PHASES = ("pp", "tg")


class Engine(Protocol):
    """What the plugin needs from a model runtime."""

    #: reference compression settings (part of the reference cache key)
    top_k: int
    tail_samples: int

    def info(self) -> dict[str, Any]: ...

    def describe(self, model: ModelLoad) -> dict[str, Any]: ...

    def tokenize(self, model: ModelLoad, text: str) -> np.ndarray: ...

    def reference(
        self, model: ModelLoad, cache: CacheConfig, chunks: np.ndarray, seed: int
    ) -> ReferenceRun: ...

    def evaluate(
        self, model: ModelLoad, cache: CacheConfig, chunks: np.ndarray, ref: ReferenceRows
    ) -> CandidateRun: ...

    def evaluate_exact(
        self,
        model: ModelLoad,
        cache: CacheConfig,
        ref_model: ModelLoad,
        ref_cache: CacheConfig,
        chunks: np.ndarray,
    ) -> CandidateRun: ...

    def speed(self, model: ModelLoad, cache: CacheConfig, n_ctx: int, phase: str,
              tokens: np.ndarray) -> SpeedRun: ...

    def quantize(self, src: str, dst: str, weight_type: str) -> None: ...

    def close(self) -> None: ...


class LogitsContext(Protocol):
    info: dict[str, Any]

    def scored_logits(self, chunk: np.ndarray) -> Iterator[np.ndarray]: ...

    def decode_timed(self, tokens: np.ndarray, one_by_one: bool) -> None: ...

    def close(self) -> None: ...


class LogitsModel(Protocol):
    def tokenize(self, text: str) -> np.ndarray: ...

    def describe(self) -> dict[str, Any]: ...

    def context(self, cache: CacheConfig, n_ctx: int) -> LogitsContext: ...

    def close(self) -> None: ...


class LogitsBackend(Protocol):
    def info(self) -> dict[str, Any]: ...

    def load(self, model: ModelLoad) -> LogitsModel: ...

    def quantize(self, src: str, dst: str, weight_type: str) -> None: ...


def _next_tokens(chunk: np.ndarray, start: int, n: int) -> np.ndarray:
    """Tokens predicted by scored rows ``start .. start+n`` (offsets from n_ctx/2)."""
    first = chunk.shape[0] // 2 + 1
    return chunk[first + start : first + start + n].astype(np.int64)


T = TypeVar("T")
B = TypeVar("B")

#: Smallest row block handed to one thread (smaller blocks cost more in overhead than they save).
MIN_ROWS_PER_TASK = 8


class RowParallel:
    """Reduces the rows of a logits batch on several threads (numpy releases the GIL).

    Each batch is finished before the next decode overwrites llama.cpp's logits
    buffer, so no copy of the n_rows x n_vocab block is ever made.
    """

    def __init__(self, threads: int | None = None) -> None:
        env = os.environ.get("KVQ_THREADS")
        self.threads = max(1, threads or (int(env) if env else (os.cpu_count() or 1)))
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
    #: again (the last batch of a chunk, with contexts taking chunks in turn); None: copy them first
    held_by: int | None = None


class Pipeline:
    """Reduces batch j on the row pool while llama.cpp decodes batch j+1.

    llama.cpp overwrites a context's logits buffer at that context's next decode. With two contexts
    taking chunks in turn, the last batch of a chunk stays valid while the other context decodes the
    next chunk: it is reduced in place, and ``reclaim`` waits for that reduction before its context
    decodes again. Any other batch is first copied (with every row thread) into one of two slots; a
    slot is reused only once its reduction is done. Results come back in batch order, so neither
    changes a bit of the output.
    """

    def __init__(self, rows: RowParallel) -> None:
        self.rows = rows
        self._reducer = ThreadPoolExecutor(1)
        self._copier = ThreadPoolExecutor(rows.threads)
        self._slots: list[list[np.ndarray]] = [[], []]
        self._held: dict[int, Future[Any]] = {}
        #: batches copied into a slot and batches reduced where llama.cpp left them (for tests, benchmarks)
        self.copied = 0
        self.in_place = 0

    def _copy(self, slot: list[np.ndarray], arrays: tuple[np.ndarray, ...]) -> tuple[np.ndarray, ...]:
        out = []
        for i, a in enumerate(arrays):
            if len(slot) <= i or slot[i].shape[0] < a.shape[0] or slot[i].shape[1:] != a.shape[1:]:
                buf = np.empty_like(a)
                slot[i:i + 1] = [buf]
            dst = slot[i][: a.shape[0]]
            step = max(1, -(-a.shape[0] // self.rows.threads))
            spans = [(lo, lo + step) for lo in range(0, a.shape[0], step)]
            list(self._copier.map(partial(_copy_rows, dst, a), spans))
            out.append(dst)
        return tuple(out)

    def reclaim(self, holder: int) -> None:
        """Wait until nothing still reads the views context ``holder`` lent (before it decodes again)."""
        held = self._held.pop(holder, None)
        if held is not None:
            wait([held])

    def run(self, batches: Iterator[ScoredBatch],
            reduce: Callable[[np.ndarray, tuple[np.ndarray, ...], int], list[T]]) -> list[T]:
        pending: list[Future[list[T]]] = []
        in_slot: list[Future[list[T]] | None] = [None, None]
        row = copied = 0
        try:
            for batch in batches:
                if batch.held_by is None:
                    s = copied % 2
                    busy = in_slot[s]
                    if busy is not None:
                        wait([busy])
                    future = self._reducer.submit(reduce, batch.next_tokens,
                                                  self._copy(self._slots[s], batch.logits), row)
                    in_slot[s] = future
                    copied += 1
                else:
                    future = self._reducer.submit(reduce, batch.next_tokens, batch.logits, row)
                    self._held[batch.held_by] = future
                    self.in_place += 1
                pending.append(future)
                row += batch.next_tokens.shape[0]
        except BaseException:  # let running reductions finish before the slots and views go away
            for f in pending:
                f.cancel()
            for f in pending:
                if not f.cancelled():
                    f.exception()
            raise
        finally:
            self._held.clear()
            self.copied += copied
        out: list[T] = []
        for f in pending:
            out += f.result()
        return out

    def close(self) -> None:
        self._reducer.shutdown()
        self._copier.shutdown()


def _copy_rows(dst: np.ndarray, src: np.ndarray, span: tuple[int, int]) -> None:
    np.copyto(dst[span[0]:span[1]], src[span[0]:span[1]])


def _offloaded(ctx: LogitsContext) -> bool:
    return int(ctx.info.get("gpu_layers", 0)) > 0


def chunks_alternate() -> bool:
    """Two contexts taking chunks in turn when overlapping (``KVQ_ALTERNATE=0`` turns it off: one
    context, every batch copied, as before; for measuring what it buys)."""
    return env_flag("KVQ_ALTERNATE", True) is not False


def _logits_sources(contexts: list[LogitsContext]) -> list[Callable[[np.ndarray], Iterator[tuple[np.ndarray, ...]]]]:
    return [partial(_one_array_batches, ctx) for ctx in contexts]


def _one_array_batches(ctx: LogitsContext, chunk: np.ndarray) -> Iterator[tuple[np.ndarray, ...]]:
    return ((x,) for x in ctx.scored_logits(chunk))


def _close(contexts: list[LogitsContext]) -> None:
    for ctx in contexts:
        ctx.close()


def _context_facts(contexts: list[LogitsContext]) -> dict[str, Any]:
    """The first context's facts; the time spent in llama.cpp summed over all of them."""
    facts = dict(contexts[0].info)
    for key in ("context_seconds", "decode_seconds"):
        if key in facts:
            facts[key] = sum(float(c.info.get(key, 0.0)) for c in contexts)
    return facts


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
        self._speed_ctx: tuple[tuple[ModelLoad, CacheConfig, int], LogitsContext] | None = None
        self._models: dict[ModelLoad, LogitsModel] = {}
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
        self, chunks: np.ndarray, sources: list[Callable[[np.ndarray], Iterator[tuple[np.ndarray, ...]]]],
        t0: float, lender: Pipeline | None,
    ) -> Iterator[ScoredBatch]:
        """Every decoded batch of every chunk, chunk i from ``sources[i % len(sources)]``; with a
        ``lender`` and two sources, the last batch of each chunk is lent in place (see ``Pipeline``)."""
        lend = lender is not None and len(sources) > 1
        per_chunk = chunks.shape[1] - 1 - chunks.shape[1] // 2  # scored rows: positions n_ctx/2 .. n_ctx-2
        tokens = 0
        for i, chunk in enumerate(chunks):
            source = i % len(sources)
            if lender is not None:
                lender.reclaim(source)  # its last views must be reduced before it decodes again
            done = 0
            for arrays in sources[source](chunk):
                n = arrays[0].shape[0]
                last = done + n == per_chunk
                yield ScoredBatch(_next_tokens(chunk, done, n), arrays, source if lend and last else None)
                done += n
            tokens += done
            self._tick(i + 1, len(chunks), tokens, t0)

    def _reduce_all(
        self, chunks: np.ndarray, sources: list[Callable[[np.ndarray], Iterator[tuple[np.ndarray, ...]]]],
        reduce: Callable[[np.ndarray, tuple[np.ndarray, ...], int], list[T]], overlap: bool, t0: float,
    ) -> list[T]:
        """Every batch through ``reduce(next_tokens, logits, first_row)``, in order; overlapped with
        the decoding when ``overlap`` (see ``overlap_default``)."""
        if overlap:
            if self._pipeline is None:
                self._pipeline = Pipeline(self.rows)
            return self._pipeline.run(self._scored_batches(chunks, sources, t0, self._pipeline), reduce)
        out: list[T] = []
        row = 0
        for batch in self._scored_batches(chunks, sources, t0, None):
            out += reduce(batch.next_tokens, batch.logits, row)
            row += batch.next_tokens.shape[0]
        return out

    def _contexts(self, model: ModelLoad, cache: CacheConfig, n_ctx: int) -> tuple[list[LogitsContext], bool]:
        """The context(s) that decode the chunks, and whether to overlap. Overlapping, a second
        context takes every other chunk, so the last batch of each is reduced without a copy while
        the other decodes; if it cannot be created (memory), one context and copies do the work."""
        first = self._model(model).context(cache, n_ctx)
        overlap = overlap_default(_offloaded(first))
        contexts = [first]
        if overlap and chunks_alternate():
            try:
                contexts.append(self._model(model).context(cache, n_ctx))
            except RuntimeError as e:  # out of memory: the copies are slower, never wrong
                first.info["second_context_error"] = str(e)
        first.info["logits_contexts"] = len(contexts)
        return contexts, overlap

    def _model(self, model: ModelLoad) -> LogitsModel:
        if model not in self._models:
            # keep at most two models (candidate + reference): free the rest first
            while len(self._models) >= 2:
                old = next(iter(self._models))
                if self._speed_ctx is not None and self._speed_ctx[0][0] == old:
                    self._speed_ctx[1].close()
                    self._speed_ctx = None
                self._models.pop(old).close()
            self._models[model] = self.backend.load(model)
        return self._models[model]

    def info(self) -> dict[str, Any]:
        from .kernels import kernel_name

        return {**self.backend.info(), "compaction": kernel_name()}

    def describe(self, model: ModelLoad) -> dict[str, Any]:
        return self._model(model).describe()

    def tokenize(self, model: ModelLoad, text: str) -> np.ndarray:
        return self._model(model).tokenize(text)

    def reference(
        self, model: ModelLoad, cache: CacheConfig, chunks: np.ndarray, seed: int
    ) -> ReferenceRun:
        t0 = time.perf_counter()
        rng = np.random.default_rng(seed)
        contexts, overlap = self._contexts(model, cache, chunks.shape[1])

        def reduce(nxt: np.ndarray, arrays: tuple[np.ndarray, ...], row: int) -> list[ReferenceRows]:
            (logits,) = arrays
            n = logits.shape[0]
            u0 = np.asarray(rng.random(n))  # per batch, in batch order: the same on any thread count
            return self.rows.map(n, partial(_compact_block, logits, nxt, u0, self.top_k, self.tail_samples))

        try:
            parts = self._reduce_all(chunks, _logits_sources(contexts), reduce, overlap, t0)
        finally:
            _close(contexts)
        return ReferenceRun(time.perf_counter() - t0, ReferenceRows.concat(parts))

    def evaluate(
        self, model: ModelLoad, cache: CacheConfig, chunks: np.ndarray, ref: ReferenceRows
    ) -> CandidateRun:
        t0 = time.perf_counter()
        contexts, overlap = self._contexts(model, cache, chunks.shape[1])

        def reduce(nxt: np.ndarray, arrays: tuple[np.ndarray, ...], row: int) -> list[TokenStats]:
            (logits,) = arrays
            n = logits.shape[0]
            return self.rows.map(n, partial(_kl_compact_block, logits, ref.slice(row, row + n), nxt))

        try:
            parts = self._reduce_all(chunks, _logits_sources(contexts), reduce, overlap, t0)
        finally:
            _close(contexts)
        stats = TokenStats.concat(parts)
        if len(stats) != len(ref):
            raise EngineError(f"reference has {len(ref)} rows but the corpus scored {len(stats)}")
        return CandidateRun(time.perf_counter() - t0, stats, _context_facts(contexts))

    def evaluate_exact(
        self,
        model: ModelLoad,
        cache: CacheConfig,
        ref_model: ModelLoad,
        ref_cache: CacheConfig,
        chunks: np.ndarray,
    ) -> CandidateRun:
        t0 = time.perf_counter()
        n_ctx = chunks.shape[1]
        ref_ctx = self._model(ref_model).context(ref_cache, n_ctx)
        cand_ctx = self._model(model).context(cache, n_ctx)

        def both(chunk: np.ndarray) -> Iterator[tuple[np.ndarray, ...]]:
            return zip(ref_ctx.scored_logits(chunk), cand_ctx.scored_logits(chunk), strict=True)

        def reduce(nxt: np.ndarray, arrays: tuple[np.ndarray, ...], row: int) -> list[TokenStats]:
            base, cand = arrays
            return self.rows.map(cand.shape[0], partial(_kl_exact_block, cand, base, nxt))

        try:
            parts = self._reduce_all(chunks, [both], reduce, overlap_default(_offloaded(cand_ctx)), t0)
        finally:
            cand_ctx.close()
            ref_ctx.close()
        return CandidateRun(time.perf_counter() - t0, TokenStats.concat(parts), dict(cand_ctx.info))

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
            self._speed_ctx = (key, self._model(model).context(cache, n_ctx))
        ctx = self._speed_ctx[1]
        t0 = time.perf_counter()
        ctx.decode_timed(tokens, one_by_one=phase == "tg")
        return SpeedRun(time.perf_counter() - t0, int(tokens.size), dict(ctx.info))

    def quantize(self, src: str, dst: str, weight_type: str) -> None:
        """Write ``dst``: the weights of ``src`` requantized to ``weight_type`` (e.g. Q3_K_M)."""
        self.backend.quantize(src, dst, weight_type)

    def close(self) -> None:
        if self._speed_ctx is not None:
            self._speed_ctx[1].close()
            self._speed_ctx = None
        for m in self._models.values():
            m.close()
        self._models.clear()
        if self._pipeline is not None:
            self._pipeline.close()
        self.rows.close()


#: One entry per NVIDIA GPU the driver knows, readable without starting CUDA.
NVIDIA_GPUS_DIR = Path("/proc/driver/nvidia/gpus")


def visible_gpus(environ: Mapping[str, str], gpus_dir: Path = NVIDIA_GPUS_DIR) -> list[str]:
    """CUDA device indices a process started with ``environ`` would see: ``CUDA_VISIBLE_DEVICES``
    when set, else every GPU the NVIDIA driver lists (CUDA's default). Never initialises CUDA."""
    if "CUDA_VISIBLE_DEVICES" in environ:
        return [d.strip() for d in environ["CUDA_VISIBLE_DEVICES"].split(",") if d.strip()]
    try:
        return [str(i) for i in range(sum(1 for _ in gpus_dir.iterdir()))]
    except OSError:
        return []


def worker_gpu_env(environ: Mapping[str, str], xdist_worker: str | None,
                   gpus_dir: Path = NVIDIA_GPUS_DIR) -> dict[str, str]:
    """One GPU per pytest-xdist worker: worker ``gw<k>`` sees only the k-th (mod n) visible device.
    Set in the model worker's environment, before CUDA initialises; without it llama.cpp spreads
    every worker's model over all the GPUs."""
    env = dict(environ)
    if xdist_worker and xdist_worker.startswith("gw") and xdist_worker[2:].isdigit():
        devices = visible_gpus(environ, gpus_dir)
        if len(devices) > 1:
            env["CUDA_VISIBLE_DEVICES"] = devices[int(xdist_worker[2:]) % len(devices)]
    return env


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            return f"killed by signal {-code}"
        if name == "SIGKILL":  # nobody else kills our worker this way
            return ("killed by signal SIGKILL (most likely the kernel's out-of-memory killer: the model, "
                    "its KV cache at this n_ctx and one logits batch did not fit in host memory)")
        return f"killed by signal {name}"
    return f"exited with status {code}"


class WorkerEngine:
    """Client of the model worker (``python -m pytest_kvquality.worker``).

    The worker is started on first use and again after a crash. Its stdout and
    stderr (where llama.cpp logs) go to a log file whose tail is quoted in errors.
    """

    #: the worker's LocalEngine runs with the defaults
    top_k = DEFAULT_TOP_K
    tail_samples = DEFAULT_TAIL_SAMPLES

    def __init__(self, log_dir: Path | None = None, env: dict[str, str] | None = None) -> None:
        self.log_dir = Path(log_dir or tempfile.mkdtemp(prefix="kvq-worker-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.env = env
        self._proc: subprocess.Popen[bytes] | None = None
        self._to: Any = None
        self._from: Any = None
        self._log_path: Path | None = None
        self._starts = 0
        self.on_progress: Callable[[dict[str, Any]], None] | None = None

    @property
    def log_path(self) -> Path | None:
        return self._log_path

    def _start(self) -> None:
        self._starts += 1
        self._log_path = self.log_dir / f"worker-{os.getpid()}-{self._starts}.log"
        log = open(self._log_path, "wb")
        c2w_r, c2w_w = os.pipe()
        w2c_r, w2c_w = os.pipe()
        env = dict(os.environ if self.env is None else self.env)
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "pytest_kvquality.worker", str(c2w_r), str(w2c_w)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, pass_fds=(c2w_r, w2c_w),
            env=env, start_new_session=True,
        )
        log.close()
        os.close(c2w_r)
        os.close(w2c_w)
        self._to = os.fdopen(c2w_w, "wb")
        self._from = os.fdopen(w2c_r, "rb")

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        if self._log_path is None or not self._log_path.exists():
            return "(no worker log)"
        text = self._log_path.read_bytes().decode("utf-8", errors="replace")
        return "\n".join(text.rstrip().splitlines()[-lines:])

    def _call(self, header: dict[str, Any], arrays: dict[str, np.ndarray] | None = None,
              what: str = "") -> ipc.Message:
        if self._proc is None or self._proc.poll() is not None:
            self._start()
        assert self._proc is not None
        try:
            ipc.send(self._to, header, arrays)
            reply, out = ipc.recv(self._from)
            while "progress" in reply:  # a long request reports as it goes
                if self.on_progress is not None:
                    self.on_progress(reply["progress"])
                reply, out = ipc.recv(self._from)
        except (ipc.ChannelClosed, BrokenPipeError) as e:
            code = self._proc.wait()
            self._discard()
            raise WorkerCrash(
                f"the model worker {_describe_exit(code)} while {what or header['op']}.\n"
                f"Last lines of the llama.cpp log ({self._log_path}):\n{self.log_tail()}"
            ) from e
        except BaseException:  # Ctrl-C mid-request: the worker is still busy with it and the
            self._stop()      # channel is out of step, so it cannot be reused or asked to exit
            raise
        if "error" in reply:
            raise EngineError(
                f"{reply['error']}\nLast lines of the llama.cpp log ({self._log_path}):\n"
                f"{self.log_tail(15)}"
            )
        return reply, out

    def _discard(self) -> None:
        for f in (self._to, self._from):
            try:
                if f is not None:
                    f.close()
            except OSError:
                pass
        self._proc = None
        self._to = self._from = None

    @staticmethod
    def _model_args(model: ModelLoad, prefix: str = "") -> dict[str, Any]:
        return {prefix + "path": model.path, prefix + "gpu_layers": model.gpu_layers,
                prefix + "swa_full": model.swa_full}

    @staticmethod
    def _cache_args(cache: CacheConfig, prefix: str = "") -> dict[str, Any]:
        return {prefix + "cache": cache.label}

    def info(self) -> dict[str, Any]:
        info: dict[str, Any] = self._call({"op": "info"}, what="reading backend info")[0]["info"]
        return info

    def describe(self, model: ModelLoad) -> dict[str, Any]:
        reply, _ = self._call({"op": "describe", **self._model_args(model)},
                              what=f"loading {model.path}")
        described: dict[str, Any] = reply["model"]
        return described

    def tokenize(self, model: ModelLoad, text: str) -> np.ndarray:
        _, out = self._call({"op": "tokenize", **self._model_args(model)},
                            {"text": np.frombuffer(text.encode("utf-8"), np.uint8)},
                            what=f"tokenizing with {model.path}")
        return out["tokens"]

    def reference(
        self, model: ModelLoad, cache: CacheConfig, chunks: np.ndarray, seed: int
    ) -> ReferenceRun:
        reply, out = self._call(
            {"op": "reference", "seed": seed, **self._model_args(model), **self._cache_args(cache)},
            {"chunks": chunks}, what=f"building the {cache.label} reference of {model.path}",
        )
        return ReferenceRun(reply["seconds"], ReferenceRows.from_arrays(out))

    def evaluate(
        self, model: ModelLoad, cache: CacheConfig, chunks: np.ndarray, ref: ReferenceRows
    ) -> CandidateRun:
        reply, out = self._call(
            {"op": "evaluate", **self._model_args(model), **self._cache_args(cache)},
            {"chunks": chunks, **{"ref_" + k: v for k, v in ref.arrays().items()}},
            what=f"evaluating {model.path} with cache {cache.label}",
        )
        return CandidateRun(reply["seconds"], TokenStats(**out), reply.get("context", {}))

    def evaluate_exact(
        self,
        model: ModelLoad,
        cache: CacheConfig,
        ref_model: ModelLoad,
        ref_cache: CacheConfig,
        chunks: np.ndarray,
    ) -> CandidateRun:
        header = {"op": "exact", **self._model_args(model), **self._cache_args(cache),
                  **self._model_args(ref_model, "ref_"), **self._cache_args(ref_cache, "ref_")}
        reply, out = self._call(header, {"chunks": chunks},
                                what=f"evaluating {model.path} with cache {cache.label} (exact)")
        return CandidateRun(reply["seconds"], TokenStats(**out), reply.get("context", {}))

    def speed(self, model: ModelLoad, cache: CacheConfig, n_ctx: int, phase: str,
              tokens: np.ndarray) -> SpeedRun:
        reply, _ = self._call(
            {"op": "speed", "n_ctx": n_ctx, "phase": phase, **self._model_args(model),
             **self._cache_args(cache)},
            {"tokens": tokens}, what=f"timing {phase} of {model.path} with cache {cache.label}",
        )
        return SpeedRun(reply["seconds"], reply["n_tokens"], reply.get("context", {}))

    def peak_rss_bytes(self) -> int | None:
        """The worker's peak resident memory so far (Linux ``VmHWM``; None elsewhere or when not running)."""
        if self._proc is None or self._proc.poll() is not None:
            return None
        try:
            status = Path(f"/proc/{self._proc.pid}/status").read_text()
        except OSError:
            return None
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        return None

    def quantize(self, src: str, dst: str, weight_type: str) -> None:
        self._call({"op": "quantize", "src": src, "dst": dst, "weight_type": weight_type},
                   what=f"requantizing {src} to {weight_type}")

    def sleep_for_test(self, seconds: float) -> None:
        """Keep the worker busy (used by the tests that kill it during a request)."""
        self._call({"op": "sleep", "seconds": seconds}, what="sleeping for a test")

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def crash_for_test(self) -> None:
        """Make the worker segfault on purpose (used by the crash-isolation tests)."""
        self._call({"op": "segfault"}, what="running a deliberate crash")

    def close(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            try:
                ipc.send(self._to, {"op": "exit"})
            except (BrokenPipeError, OSError):
                pass
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._discard()

    def _stop(self) -> None:
        """Kill the worker now (it has no state worth keeping: models reload, references are whole
        files written by the parent) and forget it; the next call starts a fresh one."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._discard()
