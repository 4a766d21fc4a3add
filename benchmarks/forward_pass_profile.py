"""Our contexts' forward pass against llama-bench's on the same model and n_ctx (issue 17,
benchmarks/README §7): the forward pass alone (no row read) of one long chunk, decoded by our
context parameters and by variants that each change one thing towards llama-bench's, alternated in
rounds; two variants that also produce the second half's rows on the device, as an evaluation
does; then llama-bench on the same model, n_ctx and cache.

    python benchmarks/forward_pass_profile.py [--model PATH] [--ctx 32768] [--bench LLAMA_BENCH]
"""

from __future__ import annotations

import argparse
import ctypes
import os
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import llama_cpp  # before numpy (engine/llama.py says why)
import numpy as np

from pytest_kvquality.cache_config import CacheConfig
from pytest_kvquality.corpus import builtin_corpus, chunk_tokens
from pytest_kvquality.engine import device_reduction, llama
from pytest_kvquality.engine.protocol import ModelLoad
from pytest_kvquality.resolve import bundled_gguf


@dataclass(frozen=True)
class Variant:
    """One way of decoding a chunk: context parameters changed by ``change``, ``per_call`` tokens per
    decode, which rows are read, whether each call is waited for, and the tokens."""

    name: str
    change: Callable[[Any], None] = lambda p: None
    per_call: int = 512
    last_row: bool = False  # llama-bench asks for the last row of each call
    waited: bool = False
    random_tokens: bool = False  # llama-bench decodes random tokens
    #: the second half's rows asked for, as an evaluation scores them, and turned on the device into
    #: llama.cpp's greedy argmax ("greedy": the output head without our reduction) or our reduction
    #: read once per chunk ("reduced": what ``KVQ_DEVICE_REDUCTION=1`` decodes)
    scored: str = ""
    #: llama.cpp's host buffers in plain memory (``GGML_CUDA_NO_PINNED``): "all" of them, or "outputs"
    #: only, as the engine does with the device reduction: the variable set just around the calls that
    #: grow the output buffers (its compute buffers reserved pinned first, in a one-token decode)
    unpinned: str = ""


def _threads(n: int) -> Callable[[Any], None]:
    def change(p: Any) -> None:
        p.n_threads = p.n_threads_batch = n
    return change


def _set(**fields: Any) -> Callable[[Any], None]:
    def change(p: Any) -> None:
        for k, v in fields.items():
            setattr(p, k, v)
    return change


def _bench_params(p: Any) -> None:
    """llama-bench's context parameters (``to_llama_cparams``): llama.cpp's defaults and its fields."""
    d = llama_cpp.llama_context_default_params()
    for name in ("n_ctx", "n_batch", "n_ubatch", "type_k", "type_v", "flash_attn_type", "swa_full"):
        setattr(d, name, getattr(p, name))
    d.n_threads = d.n_threads_batch = os.cpu_count() or 1
    ctypes.memmove(ctypes.addressof(p), ctypes.addressof(d), ctypes.sizeof(d))


def variants() -> list[Variant]:
    cores = os.cpu_count() or 1
    return [
        Variant("ours"),
        Variant("ours, last row of each call read", last_row=True),
        Variant("ours, each call waited for", waited=True),
        Variant("ours, random tokens", random_tokens=True),
        Variant(f"n_threads {cores}", _threads(cores)),
        Variant("n_threads 1", _threads(1)),
        Variant("n_outputs_max_per_seq 1 (llama.cpp's default)", _set(n_outputs_max_per_seq=1)),
        Variant("kv_unified", _set(kv_unified=True)),
        Variant("llama-bench's parameters, random tokens, last row", _bench_params, last_row=True, random_tokens=True),
        Variant("n_batch 2048 per call, last row", _set(n_batch=2048), per_call=2048, last_row=True),
        Variant("second half's rows: llama.cpp's argmax on the device", scored="greedy"),
        Variant("second half's rows: our reduction, one read per chunk", scored="reduced"),
        Variant("our reduction, host buffers not pinned", scored="reduced", unpinned="all"),
        Variant("llama.cpp's argmax, host buffers not pinned", scored="greedy", unpinned="all"),
        Variant("our reduction, only the output buffers not pinned", scored="reduced", unpinned="outputs"),
        Variant("our reduction, each call waited for", scored="reduced", waited=True),
    ]


class Run:
    """A context of one variant and the chunk it decodes."""

    def __init__(self, model: llama.LlamaModel, v: Variant, n_ctx: int, chunk: np.ndarray) -> None:
        self.v = v
        if v.unpinned == "all":  # read by ggml-cuda at each host-buffer allocation; this script has one thread
            os.environ["GGML_CUDA_NO_PINNED"] = "1"
        p = llama._context_params(model, CacheConfig.parse(os.environ.get("KVQ_PROFILE_CACHE", "q8_0")), n_ctx, 1,
                                  max(512, v.per_call), 512)
        v.change(p)
        t = time.perf_counter()
        self.ctx = llama_cpp.llama_init_from_model(model.model, p)
        assert self.ctx, f"no context for {v.name}"
        self.created = time.perf_counter() - t
        #: seconds of the context's first call with output rows, waited for before and after: where
        #: llama.cpp sizes its output buffers (and reserves again after a sampler was attached)
        self.first_scored: float | None = None
        #: seconds inside each llama_decode call of the last ``decode``, and whether it had output rows
        #: (a reduction's trash row not counted)
        self.per_call: list[tuple[float, bool]] = []
        #: the most output rows one decode asked for: llama.cpp's output buffers hold them
        self.output_rows = 0
        self.batch, self.tok, self.pos, self.out = llama.token_batch(v.per_call)
        rng = np.random.default_rng(0)
        self.chunk = rng.integers(1, model.n_vocab, chunk.size).astype(np.int32) if v.random_tokens else chunk
        self.chunk[0] = chunk[0]
        self.chain: Any = None
        self.reduction: device_reduction.DeviceReduction | None = None
        if v.scored == "greedy":
            self.chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
            llama_cpp.llama_sampler_chain_add(self.chain, llama_cpp.llama_sampler_init_greedy())
            assert llama_cpp.llama_set_sampler(self.ctx, 0, self.chain), "llama.cpp refused the greedy sampler"
        elif v.scored == "reduced":
            dll = device_reduction.library()
            assert dll is not None, "no device reduction here"
            self.reduction = device_reduction.DeviceReduction(dll, self.ctx, model.n_vocab, 242, n_ctx, 1)
            self.ids = rng.integers(0, model.n_vocab, (n_ctx, 242)).astype(np.int32)

    def decode(self, upto: int, around: Callable[[int, bool], None] | None = None) -> tuple[float, float, int]:
        """Seconds for the first ``upto`` tokens from an empty cache; seconds inside llama_decode; calls.
        ``around(call, before)`` runs just before and just after each llama_decode call (kernel_trace.py
        starts and stops its profiler there)."""
        if self.reduction is not None and self.output_rows == 0:
            # as the engine does (LlamaContext._reserve_pinned): llama.cpp's reservation after the sampler
            # was attached, made in a one-token decode whose one row goes to the trash row, pinned
            self.tok[0], self.pos[0], self.out[0] = self.chunk[0], 0, 1
            self.reduction.begin(self.ids[:0])
            self.reduction.trash(1)
            self.batch.n_tokens = 1
            assert llama_cpp.llama_decode(self.ctx, self.batch) == 0
            self.reduction.collect(0)
            self.output_rows = 1
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.ctx), True)
        llama_cpp.llama_synchronize(self.ctx)
        scored = np.arange(upto) >= upto // 2 if self.v.scored else np.zeros(upto, bool)
        if self.reduction is not None:
            self.reduction.begin(self.ids[: int(scored.sum())])
        inside, calls, first = 0.0, 0, 0
        self.per_call = []
        t0 = time.perf_counter()
        for a in range(0, upto, self.v.per_call):
            size = min(self.v.per_call, upto - a)
            self.tok[:size] = self.chunk[a : a + size]
            self.pos[:size] = np.arange(a, a + size, dtype=np.int32)
            self.out[:size] = scored[a : a + size]
            if self.v.last_row:
                self.out[size - 1] = 1
            has_rows = bool(self.out[:size].any())  # rows of the chunk's own (not a trash row)
            if self.reduction is not None:  # as the engine does: a row into the trash row when none
                first += self.reduction.announce(first, self.out[:size])
            self.batch.n_tokens = size
            first_scored = self.first_scored is None and has_rows
            # as the engine does: only a decode that grows the output buffers sees the variable
            grows = int(self.out[:size].sum()) > self.output_rows
            if first_scored:
                llama_cpp.llama_synchronize(self.ctx)
            if grows and self.v.unpinned == "outputs":
                os.environ["GGML_CUDA_NO_PINNED"] = "1"
            if around is not None:
                around(calls, True)
            t = time.perf_counter()
            assert llama_cpp.llama_decode(self.ctx, self.batch) == 0
            if around is not None:
                around(calls, False)
            if grows and self.v.unpinned == "outputs":
                os.environ.pop("GGML_CUDA_NO_PINNED", None)
            self.output_rows = max(self.output_rows, int(self.out[:size].sum()))
            if first_scored:
                llama_cpp.llama_synchronize(self.ctx)
                self.first_scored = time.perf_counter() - t
            inside += time.perf_counter() - t
            calls += 1
            if self.v.waited:
                llama_cpp.llama_synchronize(self.ctx)
            # waited: the call's host work and its GPU work one after the other (kernel_trace.py gives
            # the GPU's part); else: how long the host stays inside llama_decode
            self.per_call.append((time.perf_counter() - t, has_rows))
        if self.reduction is not None:
            self.reduction.collect(first)
        llama_cpp.llama_synchronize(self.ctx)
        return time.perf_counter() - t0, inside, calls

    def close(self) -> None:
        if self.reduction is not None:
            self.reduction.detach(ctx_alive=True)
        if self.chain is not None:
            llama_cpp.llama_set_sampler(self.ctx, 0, None)
            llama_cpp.llama_sampler_free(self.chain)
        llama_cpp.llama_batch_free(self.batch)
        llama_cpp.llama_free(self.ctx)
        if self.v.unpinned == "all":
            os.environ.pop("GGML_CUDA_NO_PINNED", None)


def bench(exe: str, model: str, n_ctx: int, extra: list[str]) -> str:
    cache = os.environ.get("KVQ_PROFILE_CACHE", "q8_0")
    cmd = [exe, "-m", model, "-p", str(n_ctx), "-n", "0", "-ub", "512", "-ctk", cache, "-ctv", cache, "-fa", "1",
           "-ngl", "999", "-r", "3", "-o", "csv", *extra]
    out = subprocess.run(cmd, capture_output=True, text=True)
    rows = out.stdout.strip().splitlines()
    if len(rows) < 2:
        return "no output: " + out.stderr[-300:]
    head, row = rows[0].split(","), rows[-1].split(",")
    values = {k.strip('"'): v.strip('"') for k, v in zip(head, row, strict=False)}
    return f"{float(values['avg_ts']):>9,.0f} tok/s (stddev {float(values['stddev_ts']):,.0f})"


def model_and_chunk(path: str, n_ctx: int) -> tuple[llama.LlamaModel, np.ndarray]:
    """The model on the GPU and one chunk of ``n_ctx`` tokens of the built-in corpus (repeated to fill it)."""
    llama.init_backend()
    model = llama.LlamaBackend().load(ModelLoad(path, -1))
    tokens = model.tokenize("\n\n".join(builtin_corpus().texts.values()))
    return model, chunk_tokens(np.tile(tokens, 1 + n_ctx // tokens.size), n_ctx, 1, "all")[0].copy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="")
    ap.add_argument("--ctx", type=int, default=32768)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--bench", default="", help="llama-bench of the same tree")
    ap.add_argument("--only", default="", help="comma-separated variant numbers (default: all)")
    args = ap.parse_args()
    path = args.model or str(bundled_gguf())
    model, chunk = model_and_chunk(path, args.ctx)
    chosen = [v for i, v in enumerate(variants()) if not args.only or str(i) in args.only.split(",")]
    print(f"# {path}, n_ctx {args.ctx}, cache {os.environ.get('KVQ_PROFILE_CACHE', 'q8_0')}, "
          f"one chunk per variant and round after 2,048 tokens of warm-up", flush=True)
    for rnd in range(args.rounds):
        for v in chosen:
            run = Run(model, v, args.ctx, chunk)
            # the context's first use: llama.cpp sizes (pins and clears) its output buffers at the first
            # decode with output rows, which for the scored variants is here, outside the timed chunk
            warm = run.decode(min(2048, args.ctx))[0]
            llama._debug = []
            s, inside, calls = run.decode(args.ctx)
            logged, llama._debug = len(llama._debug), None
            run.close()
            split = {rows: [t for t, r in run.per_call if r == rows] for rows in (False, True)}
            medians = ", ".join(f"median call {'with' if rows else 'without'} output rows "
                                f"{1e3 * float(np.median(ts)):.2f} ms" for rows, ts in split.items() if ts)
            print(f"round {rnd}: {v.name:<52} {args.ctx / s:>9,.0f} tok/s  {s:6.2f} s  "
                  f"{1e3 * inside / calls:6.2f} ms inside each of {calls} llama_decode calls, "
                  f"{logged / calls:.1f} debug lines per call; first {min(2048, args.ctx)} tokens of the context "
                  f"{warm:.2f} s (context made in {run.created:.2f} s, its first call with output rows "
                  f"{run.first_scored or 0:.2f} s); {medians}", flush=True)
    model.close()
    if args.bench:
        for extra in (["-b", "512"], ["-b", "2048"], ["-b", "512", "-t", "4"]):
            print(f"llama-bench pp{args.ctx} {' '.join(extra)}: {bench(args.bench, path, args.ctx, extra)}", flush=True)


if __name__ == "__main__":
    main()
