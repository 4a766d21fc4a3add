"""llama-cpp-python behind the ``LogitsBackend`` interface, through the low-level batch API.

Imported only inside the model worker, and before numpy there (see worker.py):
on the CUDA build a numpy import ahead of ``llama_cpp`` made the model load
segfault. Logits are requested for the scored positions only and handed out
one decoded batch at a time, so memory never holds n_ctx x n_vocab floats.

Longer than our ~350-line limit on purpose: all of llama.cpp's low-level API is here (model,
context, log capture, placement probe, quantizer), so no other module imports ``llama_cpp`` but
``llama_devices`` (ggml's device registry, RPC servers).
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np

from .. import kv_memory
from ..cache_config import GGML_TYPE_IDS, CacheConfig
from ..environment import cpu_threads, default_cache_dir, env_flag
from ..files import atomic_produce
from ..llama_log import OUT_OF_MEMORY, context_log_facts, kv_placement, model_buffers
from . import device_reduction, host_pinning, llama_devices
from .pipeline import unpinned_output_buffers
from .placement_cache import PlacementCache
from .protocol import BackendInfo, ModelFacts, ModelLoad, ScoredView, TokenPieces, group_length
from .rpc import parse_servers

#: Upper bound on the logits buffer of a generation or speed context's batch (rows x n_vocab x 4 bytes);
#: scoring contexts hold what llama-perplexity's geometry asks for (``LlamaContext``).
LOGITS_BUDGET_BYTES = 256 * 1024 * 1024


class ModelLoadError(RuntimeError):
    """llama.cpp could not load the model file."""


class ContextError(RuntimeError):
    """llama.cpp could not create a context with the asked-for cache configuration."""


_GGML_LOG_DEBUG, _GGML_LOG_CONT = 1, 5
_KV_LAYER_LINE = b"llama_kv_cache: layer "
_last_level = 0
#: Recent log lines, parsed after a context is created (rotation flags, KV cache size; with a line per
#: layer and cache, a 128-layer model writes ~300 of them).
_recent: collections.deque[str] = collections.deque(maxlen=4000)
#: Debug lines collected while a placement probe runs (None: debug lines are dropped).
_debug: list[str] | None = None
#: Held while a context is created or freed: creation reads ``_recent`` and sets environment
#: variables, and contexts are created on a background thread while others decode
#: (``ContextCache.prepare``).
_creating = threading.RLock()


@llama_cpp.llama_log_callback  # type: ignore[untyped-decorator]
def _log_to_stderr(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    # fd 2 is the worker's log file; the client shows its tail when something fails.
    # Debug lines (thousands per context) are dropped so the tail stays useful.
    global _last_level
    if level != _GGML_LOG_CONT:
        _last_level = level
    if not text:
        return
    if _last_level != _GGML_LOG_DEBUG:
        os.write(2, text)
        _recent.append(text.decode("utf-8", errors="replace"))
    elif text.startswith(_KV_LAYER_LINE):  # which layers hold a KV cache (kv_memory.py)
        _recent.append(text.decode("utf-8", errors="replace"))
    elif _debug is not None:
        _debug.append(text.decode("utf-8", errors="replace"))


def backend_info() -> BackendInfo:
    return BackendInfo(
        llama_cpp_python=llama_cpp.__version__,
        llama_cpp=f"vendored in llama-cpp-python {llama_cpp.__version__}",
        gpu_offload=llama_devices.has_local_gpu(),
        system_info=llama_cpp.llama_print_system_info().decode(errors="replace").strip(),
        cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"),
    )


#: --kv-split to llama.cpp's split modes
SPLIT_MODES = {"none": llama_cpp.LLAMA_SPLIT_MODE_NONE, "layer": llama_cpp.LLAMA_SPLIT_MODE_LAYER,
               "row": llama_cpp.LLAMA_SPLIT_MODE_ROW, "tensor": llama_cpp.LLAMA_SPLIT_MODE_TENSOR}


class LlamaModel:
    """One loaded GGUF file; contexts with different caches are created from it."""

    def __init__(self, load: ModelLoad) -> None:
        self.path = path = load.path
        self.load = load
        self.swa_full = load.swa_full
        params = llama_cpp.llama_model_default_params()
        rpc_devices = llama_devices.add_rpc_servers(parse_servers(load.rpc))
        offload = llama_devices.has_local_gpu() or bool(rpc_devices)
        params.n_gpu_layers = (999 if load.gpu_layers < 0 else load.gpu_layers) if offload else 0
        # weight repacking off: the AMX repack kernels segfault on the CPUs here
        params.use_extra_bufts = False
        params.split_mode = SPLIT_MODES[load.split_mode]
        # both arrays are read by the load below and must live as long as its call
        self._devices = _device_list(rpc_devices)
        if self._devices is not None:
            params.devices = ctypes.addressof(self._devices)
        self._tensor_split = _tensor_split(load.tensor_split)
        if self._tensor_split is not None:
            params.tensor_split = ctypes.cast(self._tensor_split, ctypes.POINTER(ctypes.c_float))
        self.gpu_layers = int(params.n_gpu_layers)
        self.split_facts = load.spread_facts()
        _recent.clear()
        self.model = llama_cpp.llama_model_load_from_file(path.encode(), params)
        #: where the weights went (MiB per buffer, from llama.cpp's log), e.g. CPU_Mapped, RPC0[host:port]
        self.weight_devices = model_buffers("".join(_recent))
        if not self.model:
            if OUT_OF_MEMORY.search("".join(_recent)):
                raise ModelLoadError(f"out of memory: llama.cpp could not allocate the weights of {path} "
                                     f"({self.gpu_layers} layers on the GPU); offload fewer with --kv-gpu-layers")
            raise ModelLoadError(f"llama.cpp could not load {path}")
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(self.vocab))
        self.add_bos = bool(llama_cpp.llama_vocab_get_add_bos(self.vocab))
        self.bos = int(llama_cpp.llama_vocab_bos(self.vocab))
        self._placements: dict[tuple[CacheConfig, int], dict[str, Any]] = {}
        self._geometry: kv_memory.Geometry | None = None

    @property
    def geometry(self) -> kv_memory.Geometry:
        """Per-layer KV geometry from the GGUF header (read once)."""
        if self._geometry is None:
            self._geometry = kv_memory.Geometry.from_file(Path(self.path))
        return self._geometry

    def describe(self) -> ModelFacts:
        buf = ctypes.create_string_buffer(256)
        llama_cpp.llama_model_desc(self.model, buf, 256)
        template = llama_cpp.llama_model_chat_template(self.model, None)
        eos = int(llama_cpp.llama_vocab_eos(self.vocab))
        return ModelFacts(desc=buf.value.decode(errors="replace"), n_vocab=self.n_vocab,
                          n_layer=int(llama_cpp.llama_model_n_layer(self.model)),
                          n_ctx_train=int(llama_cpp.llama_model_n_ctx_train(self.model)), gpu_layers=self.gpu_layers,
                          chat_template=template.decode("utf-8", errors="replace") if template else "",
                          bos_token=self._piece(self.bos).decode("utf-8", errors="replace") if self.bos >= 0 else "",
                          eos_token=self._piece(eos).decode("utf-8", errors="replace") if eos >= 0 else "")

    def _piece(self, token: int) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, 64, 0, True)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, -n, 0, True)
        return buf.raw[:n]

    def is_eog(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self.vocab, token))

    def tokenize_pieces(self, text: str) -> TokenPieces:
        """Special tokens parsed (a chat template writes them as text), BOS added where the model
        wants one and the text has none; each token's byte offset from its piece."""
        data = text.encode("utf-8")
        tokens = self._tokenize(data, add_special=False, parse_special=True)
        n = tokens.size
        lengths = np.array([len(self._piece(int(t))) for t in tokens], np.int64)
        if int(lengths.sum()) != len(data):
            raise RuntimeError(f"the tokenizer's pieces give {int(lengths.sum())} bytes for a text of {len(data)}: "
                               "token offsets cannot be known")
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]) if n else np.zeros(0, np.int64)
        if self.add_bos and (not n or tokens[0] != self.bos):
            tokens, starts = np.concatenate([[self.bos], tokens]).astype(np.int32), np.concatenate([[0], starts])
        return TokenPieces(tokens, starts.astype(np.int64))

    def tokenize(self, text: str) -> np.ndarray:
        return self._tokenize(text.encode("utf-8"), add_special=True, parse_special=False)

    def _tokenize(self, data: bytes, add_special: bool, parse_special: bool) -> np.ndarray:
        """``llama_tokenize``, with a second call when the first buffer was too small."""
        n_max = len(data) + 16
        buf = (llama_cpp.llama_token * n_max)()
        n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buf, n_max, add_special, parse_special)
        if n < 0:
            n_max = -n
            buf = (llama_cpp.llama_token * n_max)()
            n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buf, n_max, add_special, parse_special)
        return np.ctypeslib.as_array(buf)[:n].astype(np.int32)

    def placement(self, cache: CacheConfig, n_ctx: int, params: Any) -> dict[str, Any]:
        """Where the KV ops of this cache config run: probed once per build, devices, model file,
        config and geometry, then read from the placement cache (``placement_cache``)."""
        if not _wants_probe(self):
            return {}
        if (cache, n_ctx) not in self._placements:
            store = PlacementCache(default_cache_dir() / "placement")
            key = self._placement_key(cache, n_ctx, params)
            facts = store.get(key)
            if facts is None:
                facts = kv_placement_probe(self, params)
                if facts:
                    store.put(key, facts)
            self._placements[(cache, n_ctx)] = facts
        return dict(self._placements[(cache, n_ctx)])

    def _placement_key(self, cache: CacheConfig, n_ctx: int, params: Any) -> dict[str, Any]:
        st = os.stat(self.path)
        return {"llama_cpp_python": llama_cpp.__version__, "system": llama_cpp.llama_print_system_info().decode(),
                "devices": [f"{d.name}|{d.description}|{d.registry}" for d in llama_devices.devices()],
                "model": [os.path.realpath(self.path), st.st_size, st.st_mtime_ns], "load": repr(self.load),
                "cache": cache.label, "n_ctx": n_ctx, "n_batch": int(params.n_batch), "n_ubatch": int(params.n_ubatch),
                "swa_full": bool(params.swa_full), "env": os.environ.get("CUDA_VISIBLE_DEVICES")}

    def context(self, cache: CacheConfig, n_ctx: int, n_seq: int = 1, n_ubatch: int | None = None) -> LlamaContext:
        return LlamaContext(self, cache, n_ctx, n_seq, n_ubatch)

    def close(self) -> None:
        if self.model:
            llama_cpp.llama_model_free(self.model)
            self.model = None


class LlamaContext:
    """A context with one cache configuration; yields scored logits as llama-perplexity decodes them.

    Scoring contexts (``n_ubatch`` given) take the geometry of ``decode_geometry``:
    ``n_seq`` chunks in one decode, each in its own sequence and KV stream, so llama.cpp splits the
    batch into micro-batches exactly as it does for llama-perplexity; a lone sequence is decoded one
    micro-batch per call (the same micro-batches as one large call, with at most one micro-batch of
    logits on the host). Generation and speed contexts (``n_ubatch`` None) decode one sequence in
    batches of ``LOGITS_BUDGET_BYTES`` worth of rows.
    """

    def __init__(self, model: LlamaModel, cache: CacheConfig, n_ctx: int, n_seq: int = 1,
                 n_ubatch: int | None = None) -> None:
        self.model = model
        self.n_ctx = n_ctx
        self.n_seq = n_seq
        if n_ubatch is None:
            rows = max(32, LOGITS_BUDGET_BYTES // (4 * model.n_vocab))
            self.n_batch = n_ubatch = min(n_ctx, max(rows, 256))
        else:  # several sequences: one call holds them all; one: a call per micro-batch
            self.n_batch = n_seq * n_ctx if n_seq > 1 else n_ubatch
        p = _context_params(model, cache, n_ctx, n_seq, self.n_batch, n_ubatch)
        t_create = time.perf_counter()
        with _creating:
            self._create(model, cache, n_ctx, n_seq, p, t_create)

    def _create(self, model: LlamaModel, cache: CacheConfig, n_ctx: int, n_seq: int, p: Any, t_create: float) -> None:
        # llama.cpp reads LLAMA_ATTN_ROT_DISABLE (atoi) when the KV cache is created. The variable is
        # set to 0 or 1, never removed: other threads may be inside llama.cpp, whose getenv calls
        # must not see the environment's array reallocated
        os.environ["LLAMA_ATTN_ROT_DISABLE"] = "0" if cache.rotation else "1"
        try:
            placement = model.placement(cache, n_ctx, p)
            _recent.clear()
            self.ctx = llama_cpp.llama_init_from_model(model.model, p)
        finally:
            os.environ["LLAMA_ATTN_ROT_DISABLE"] = "0"
        if not self.ctx:
            log = "".join(_recent)
            what = (f"cache {cache.label} (type_k={cache.type_k}, type_v={cache.type_v}, "
                    f"flash_attn={cache.flash_attn}), n_ctx {n_ctx}" + (f" x {n_seq} sequences" if n_seq > 1 else "")
                    + f", model {model.path}")
            if OUT_OF_MEMORY.search(log):
                hint = "lower --kv-ctx" + (" or --kv-batch" if n_seq > 1 else "") + (
                    " or offload fewer layers (--kv-gpu-layers)" if model.gpu_layers > 0 else "")
                raise ContextError(f"out of memory: llama.cpp could not allocate a context for {what}; {hint}")
            raise ContextError(f"llama.cpp could not create a context for {what}")
        log = "".join(_recent)
        self.info = context_log_facts(log)
        self.info.update(_memory_facts(model, cache, n_ctx, int(p.n_ubatch), log))
        self.info["gpu_layers"] = model.gpu_layers
        self.info["weight_devices"] = list(model.weight_devices)
        self.info["decode_sequences"] = n_seq
        self.info["n_ubatch"] = int(p.n_ubatch)
        self.info.update(model.split_facts)
        self.info.update(placement)
        # where an evaluation's time goes (benchmarks/real_geometry.py): creating the context (and the
        # placement probe), and inside llama.cpp's decode and logits calls; the rest is ours
        self.info["context_seconds"] = time.perf_counter() - t_create
        self.info["decode_seconds"] = 0.0
        self.n_ubatch = int(p.n_ubatch)
        self._reduction: device_reduction.DeviceReduction | None = None
        #: the most output rows one decode of this context asked for: llama.cpp's output buffers hold them
        self._output_rows = 0
        #: whether llama.cpp has decoded since the reduction's samplers were attached (and so reserved again)
        self._reserved = True
        self.batch, self._tok, self._pos, self._out = token_batch(self.n_batch)

    def _run(self, size: int, at: int) -> None:
        """Decode the first ``size`` tokens of the batch (``at``: the position, for the error), the
        call's time counted in ``decode_seconds``; not waited for."""
        self.batch.n_tokens = size
        t = time.perf_counter()
        rc = llama_cpp.llama_decode(self.ctx, self.batch)
        self.info["decode_seconds"] += time.perf_counter() - t
        if rc != 0:
            raise RuntimeError(f"llama_decode failed with code {rc} at position {at}")

    def _decode(self, size: int, at: int) -> np.ndarray | None:
        """Decode the first ``size`` tokens of the batch; a view of the logits rows asked for, valid
        until the next decode (None: none asked for)."""
        self._run(size, at)
        n_out = int(self._out[:size].sum())
        t = time.perf_counter()
        ptr = llama_cpp.llama_get_logits(self.ctx) if n_out else None  # waits for the GPU
        self.info["decode_seconds"] += time.perf_counter() - t
        return None if ptr is None else np.ctypeslib.as_array(ptr, shape=(n_out, self.model.n_vocab))

    def _bos(self, tokens: np.ndarray) -> np.ndarray:
        tokens = tokens.astype(np.int32, copy=True)
        if self.model.add_bos:
            tokens[0] = self.model.bos
        return tokens

    def scored_logits(self, group: list[tuple[np.ndarray, np.ndarray]]) -> Iterator[ScoredView]:
        """Decode the group from an empty cache (``LogitsContext.scored_logits``)."""
        n = group_length(group, self.n_seq, self.n_ctx)
        if self._reduction is not None:  # raw logits again, in output buffers sized without the sampler
            self._reduction.detach(ctx_alive=True)
            self._reduction = None
            self._output_rows = 0
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.ctx), True)
        if self.n_seq > 1:
            # one call holding all the micro-batches, so the logits come back in batch order, not
            # reordered on the host (llama.cpp's output reorder moved ~4 GB per 4 Gemma chunks: 1,800
            # against 6,600 scored tok/s on the H200)
            blocks = [block for ubatch in self._micro_batches(group, n) for block in ubatch]
            at = self._fill(blocks, [self._bos(t) for t, _ in group], group)
            view = self._decode(at, 0)
            first = 0
            for s, a, b in blocks:
                k = int(group[s][1][a:b].sum())
                if k and view is not None:
                    yield ScoredView(s, view[first : first + k], True)
                first += k
            return
        tokens, want = self._bos(group[0][0]), group[0][1]
        for start in range(0, n, self.n_batch):
            size = min(self.n_batch, n - start)
            self._tok[:size] = tokens[start : start + size]
            self._pos[:size] = np.arange(start, start + size, dtype=np.int32)
            self._out[:size] = want[start : start + size]
            view = self._decode(size, start)
            if view is not None:
                yield ScoredView(0, view, start + size >= n)

    def _micro_batches(self, group: list[tuple[np.ndarray, np.ndarray]], n: int) -> list[list[tuple[int, int, int]]]:
        """llama-perplexity's micro-batches of a group of m sequences in the order llama.cpp computes
        them: the next n_ubatch / m tokens of each sequence in turn (what its equal split takes from a
        batch of m whole sequences), each as (member, start, end) blocks."""
        m = len(group)
        step = max(1, self.n_ubatch // m)
        return [[(s, a, min(a + step, n)) for s in range(m)] for a in range(0, n, step)]

    def _fill(self, blocks: list[tuple[int, int, int]], member_tokens: list[np.ndarray],
              group: list[tuple[np.ndarray, np.ndarray]]) -> int:
        """Write the (member, start, end) blocks into the batch from its first row; the rows written."""
        at = 0
        seq_id = self.batch.seq_id  # one malloc per token in llama_batch_init: set one by one
        for s, a, b in blocks:
            rows = slice(at, at + b - a)
            self._tok[rows] = member_tokens[s][a:b]
            self._pos[rows] = np.arange(a, b, dtype=np.int32)
            self._out[rows] = group[s][1][a:b]
            for i in range(at, at + b - a):
                seq_id[i][0] = s
            at += b - a
        return at

    def reduces_on_device(self) -> bool:
        return device_reduction.library() is not None

    def _reduction_for(self, width: int) -> device_reduction.DeviceReduction:
        if self._reduction is not None and self._reduction.width != width:
            self._reduction.detach(ctx_alive=True)
            self._reduction = None
        if self._reduction is None:
            dll = device_reduction.library()
            if dll is None:
                raise RuntimeError("the reduction on the device is not available here")
            # a group scores at most every row of its n_seq sequences
            self._reduction = device_reduction.DeviceReduction(dll, self.ctx, self.model.n_vocab, width,
                                                               self.n_seq * self.n_ctx, self.n_seq)
            self._reserved = False
        return self._reduction

    def _reserve_pinned(self, first_token: int, reduction: device_reduction.DeviceReduction) -> None:
        """Make llama.cpp redo its scheduler's reservation (due after a sampler is attached) in a decode
        that grows its output buffers by one row only, so that its host buffer of inputs stays pinned:
        one token, its row reduced into the trash row, the cache cleared after it."""
        self._tok[0], self._pos[0], self._out[0] = first_token, 0, 1
        reduction.trash(1)
        self._run(1, 0)
        self._output_rows = max(self._output_rows, 1)
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.ctx), True)

    def reduced_rows(self, group: list[tuple[np.ndarray, np.ndarray]], ids: list[np.ndarray]) -> Iterator[ScoredView]:
        """``scored_logits``'s micro-batches, one per decode, each row reduced on the device
        (``device_reduction``): the same micro-batches, so the same logits, of which only (ids + 2)
        floats per row come back, all at once after the group's last decode (no decode waited for)."""
        n = group_length(group, self.n_seq, self.n_ctx)
        reduction = self._reduction_for(int(ids[0].shape[1]))
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.ctx), True)
        member_tokens = [self._bos(t) for t, _ in group]
        ubatches = self._micro_batches(group, n)
        # each micro-batch's (member, rows) in output order, and the ids of those rows
        counts = [[(s, int(group[s][1][a:b].sum())) for s, a, b in ubatch] for ubatch in ubatches]
        done = [0] * len(group)
        parts = []
        for s, k in (block for ks in counts for block in ks):
            parts.append(ids[s][done[s] : done[s] + k])
            done[s] += k
        reduction.begin(np.concatenate(parts) if parts else np.zeros((0, reduction.width), np.int32))
        grows_first = bool(counts) and max(1, sum(k for _, k in counts[0])) > self._output_rows
        if not self._reserved and grows_first and host_pinning.installed():
            self._reserve_pinned(int(member_tokens[0][0]), reduction)
        self._reserved = True
        first = 0
        for ubatch in ubatches:
            size = self._fill(ubatch, member_tokens, group)
            rows = reduction.announce(first, self._out[:size])  # a row into the trash row when none
            # a decode that grows llama.cpp's output buffers makes them unpinned: nothing is read from them
            out_rows = max(rows, 1)
            with host_pinning.outputs_unpinned() if out_rows > self._output_rows else contextlib.nullcontext():
                self._run(size, ubatch[0][1])
            self._output_rows = max(self._output_rows, out_rows)
            first += rows
        t = time.perf_counter()
        reduced = reduction.collect(first)  # waits for the device
        self.info["decode_seconds"] += time.perf_counter() - t
        first = 0
        for s, k in (block for ks in counts for block in ks):
            if k:
                yield ScoredView(s, reduced[first : first + k], True)
            first += k

    def next_logits(self, tokens: np.ndarray, start: int) -> np.ndarray:
        """Decode ``tokens`` at positions ``start ..`` (0: from an empty cache) and return a view of
        the last one's logits, valid until the next decode: one step of a greedy generation."""
        if start == 0:
            llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.ctx), True)
        if start + tokens.size > self.n_ctx:
            raise RuntimeError(f"generation reached position {start + tokens.size}, past the context of {self.n_ctx}")
        for a in range(0, tokens.size, self.n_batch):
            size = min(self.n_batch, tokens.size - a)
            self._tok[:size] = tokens[a : a + size]
            self._pos[:size] = np.arange(start + a, start + a + size, dtype=np.int32)
            self._out[:size] = 0
            self._out[size - 1] = a + size == tokens.size
            self._run(size, start + a)
        ptr = llama_cpp.llama_get_logits(self.ctx)
        row: np.ndarray = np.ctypeslib.as_array(ptr, shape=(1, self.model.n_vocab))[0]
        return row

    def decode_timed(self, tokens: np.ndarray, one_by_one: bool) -> None:
        """Decode tokens from an empty cache, as llama-bench does: a prompt in batches with the
        last logits only (pp), or one token per decode with logits each time (tg)."""
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.ctx), True)
        step = 1 if one_by_one else self.n_batch
        for start in range(0, tokens.size, step):
            size = min(step, tokens.size - start)
            self._tok[:size] = tokens[start : start + size]
            self._pos[:size] = np.arange(start, start + size, dtype=np.int32)
            self._out[:size] = 0
            self._out[size - 1] = 1
            self.batch.n_tokens = size
            rc = llama_cpp.llama_decode(self.ctx, self.batch)
            if rc != 0:
                raise RuntimeError(f"llama_decode failed with code {rc} at position {start}")
        llama_cpp.llama_synchronize(self.ctx)

    def close(self) -> None:
        if self.ctx:
            with _creating:
                llama_cpp.llama_batch_free(self.batch)
                llama_cpp.llama_free(self.ctx)
                self.ctx = None
                if self._reduction is not None:  # the context held its samplers: freed after it
                    self._reduction.detach(ctx_alive=False)
                    self._reduction = None


def token_batch(n: int) -> tuple[Any, np.ndarray, np.ndarray, np.ndarray]:
    """A llama.cpp batch of ``n`` tokens, each in sequence 0, and numpy views of its tokens,
    positions and output flags (free it with ``llama_batch_free``)."""
    batch = llama_cpp.llama_batch_init(n, 0, 1)
    for i in range(n):
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = 0
    tok = np.ctypeslib.as_array(batch.token, shape=(n,))
    pos = np.ctypeslib.as_array(batch.pos, shape=(n,))
    out = np.ctypeslib.as_array(ctypes.cast(batch.logits, ctypes.POINTER(ctypes.c_int8)), shape=(n,))
    return batch, tok, pos, out


def _device_list(rpc_devices: list[str]) -> Any:
    """The devices a model may use: None (llama.cpp's default: every GPU, RPC servers first) unless this
    process has RPC servers, when only this model's servers and the local accelerators are given, in
    llama.cpp's default order, so a model without --kv-rpc never lands on a server added for another."""
    if not llama_devices.rpc_added():
        return None
    chosen = llama_devices.device_handles(rpc_devices)
    return (ctypes.c_void_p * (len(chosen) + 1))(*chosen, None)


def _tensor_split(text: str) -> Any:
    """--kv-tensor-split 3,1: the share of the model per device, as llama.cpp's --tensor-split."""
    if not text:
        return None
    shares = [float(x) for x in text.split(",")]
    n = int(llama_cpp.llama_max_devices())
    if len(shares) > n:
        raise ValueError(f"--kv-tensor-split {text!r}: {len(shares)} shares for at most {n} devices")
    return (ctypes.c_float * n)(*shares, *([0.0] * (n - len(shares))))


def _context_params(model: LlamaModel, cache: CacheConfig, n_ctx: int, n_seq: int, n_batch: int,
                    n_ubatch: int) -> Any:
    """llama.cpp's context parameters: ``n_seq`` sequences of ``n_ctx``, each in its own KV stream
    (not unified, as llama-perplexity runs), scored logits only."""
    p = llama_cpp.llama_context_default_params()
    p.n_ctx = n_seq * n_ctx
    p.n_batch = n_batch
    p.n_ubatch = min(n_batch, n_ubatch)
    p.n_seq_max = n_seq
    # every scored row of a sequence may be reduced on the device in one decode (device_reduction);
    # llama.cpp's default allows one
    p.n_outputs_max_per_seq = 0
    p.kv_unified = False
    p.swa_full = model.swa_full
    # a fully offloaded model leaves llama.cpp's CPU threads little to do, and they compete with
    # the KL reduction (H200 host, 16 cores: 4 threads gave +12 % scored tok/s over 16)
    cores = cpu_threads()
    threads = int(os.environ.get("KVQ_LLAMA_THREADS") or (min(4, cores) if model.gpu_layers > 0 else cores))
    p.n_threads = threads
    p.n_threads_batch = threads
    p.type_k = GGML_TYPE_IDS[cache.type_k]
    p.type_v = GGML_TYPE_IDS[cache.type_v]
    p.flash_attn_type = (
        llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
        if cache.flash_attn
        else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
    )
    return p


def _memory_facts(model: LlamaModel, cache: CacheConfig, n_ctx: int, n_ubatch: int, log: str) -> dict[str, Any]:
    """KV memory of this context as llama.cpp allocated it (kv_memory.py)."""
    alloc = kv_memory.parse_allocation(log)
    if not alloc.blocks:
        return {}
    mem = kv_memory.kv_memory(alloc, model.geometry, cache, n_ctx, n_ubatch=n_ubatch, swa_full=model.swa_full,
                              flash_attn=cache.flash_attn)
    facts: dict[str, Any] = {
        "kv_bytes_per_token": mem.bytes_per_token,
        "kv_cache_mib_expected": round(mem.kv_bytes / 2**20, 4),
        "kv_mib_per_32k": mem.at[32768],
        "kv_mib_per_128k": mem.at[131072],
        "kv_swa_cells": mem.swa_cells,
        "kv_swa_full": model.swa_full,
        "recurrent_state_mib": mem.recurrent_mib,
    }
    if mem.mismatch:
        facts["kv_mismatch"] = mem.mismatch
    return facts


def _wants_probe(model: LlamaModel) -> bool:
    """``KVQ_PLACEMENT_PROBE`` on or off; by default only when layers are offloaded."""
    said = env_flag("KVQ_PLACEMENT_PROBE", None)
    return model.gpu_layers > 0 if said is None else said


def kv_placement_probe(model: LlamaModel, params: Any) -> dict[str, Any]:
    """Where llama.cpp's scheduler puts the graph nodes that read or write the KV cache.

    A K/V pair without a kernel on the GPU (CUDA has flash-attention kernels for a few pairs
    unless built with GGML_CUDA_FA_ALL_QUANTS) silently runs on the CPU; a throwaway context
    created with ``GGML_SCHED_DEBUG=2`` lists each node's backend, which is parsed here.
    """
    global _debug
    _debug = []
    os.environ["GGML_SCHED_DEBUG"] = "2"
    try:
        ctx = llama_cpp.llama_init_from_model(model.model, params)
    finally:
        os.environ["GGML_SCHED_DEBUG"] = "0"  # set, not removed (see LlamaContext._create)
        lines, _debug = "".join(_debug).splitlines(), None
    if not ctx:
        return {}
    llama_cpp.llama_free(ctx)
    facts = kv_placement("\n".join(lines))
    if facts.get("kv_devices"):
        # with some layers left on the CPU (--kv-gpu-layers N, RPC splits) their KV ops run there by design
        whole = model.gpu_layers >= int(llama_cpp.llama_model_n_layer(model.model))
        facts["kv_cpu_fallback"] = whole and "CPU" in facts["kv_devices"]
    return facts


#: weight types a GGUF can be requantized to (llama.cpp's LLAMA_FTYPE_MOSTLY_*)
WEIGHT_TYPES = ("Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q4_K_M", "Q4_K_S", "Q4_0", "Q3_K_L", "Q3_K_M",
                "Q3_K_S", "Q2_K")


def quantize(src: str, dst: str, weight_type: str) -> None:
    """Requantize a GGUF file's weights (``llama_model_quantize``, requantizing allowed)."""
    if weight_type not in WEIGHT_TYPES:
        raise ValueError(f"unknown weight type {weight_type!r}; known: {', '.join(WEIGHT_TYPES)}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{weight_type}")
    params.allow_requantize = True
    params.nthread = cpu_threads()

    def quantize_to(tmp: Path) -> None:
        rc = llama_cpp.llama_model_quantize(src.encode(), str(tmp).encode(), ctypes.byref(params))
        if rc != 0:
            raise RuntimeError(f"llama_model_quantize({src} -> {weight_type}) failed with code {rc}")

    atomic_produce(Path(dst), quantize_to, suffix=".gguf")


_initialised = False


def init_backend() -> None:
    global _initialised
    if not _initialised:
        # the variables contexts are created under exist from now on, so setting them later never
        # grows the environment while another thread is inside llama.cpp (see LlamaContext._create)
        for name in ("LLAMA_ATTN_ROT_DISABLE", "GGML_SCHED_DEBUG"):
            os.environ.setdefault(name, "0")
        # its switch for unpinned output buffers goes into the environment before any other thread
        if unpinned_output_buffers():
            host_pinning.install()
        llama_cpp.llama_log_set(_log_to_stderr, ctypes.c_void_p(0))
        llama_cpp.llama_backend_init()
        _initialised = True


class LlamaBackend:
    """llama.cpp as a ``LogitsBackend``."""

    def info(self) -> BackendInfo:
        return backend_info()

    def load(self, model: ModelLoad) -> LlamaModel:
        if not os.path.isfile(model.path):
            raise FileNotFoundError(f"model file {model.path} does not exist")
        return LlamaModel(model)

    def quantize(self, src: str, dst: str, weight_type: str) -> None:
        quantize(src, dst, weight_type)
