"""Speed and size benchmarks (pytest-benchmark). Run: ``.venv/bin/pytest benchmarks``.

Each benchmark stores its headline figure in ``extra_info`` so ``--benchmark-json``
keeps it next to the machine info; benchmarks/README.md lists measured figures.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import numpy as np
import pytest

from pytest_kvquality.cache_config import CacheConfig
from pytest_kvquality.compaction import compact_reference, compact_rows
from pytest_kvquality.corpus import builtin_corpus, chunk_tokens
from pytest_kvquality.engine.client import WorkerEngine
from pytest_kvquality.engine.local import _compact_block, _kl_compact_block
from pytest_kvquality.engine.pipeline import RowParallel
from pytest_kvquality.engine.protocol import DEFAULT_TAIL_SAMPLES as M
from pytest_kvquality.engine.protocol import DEFAULT_TOP_K as K
from pytest_kvquality.engine.protocol import ModelLoad
from pytest_kvquality.kernels import kernel_name
from pytest_kvquality.metrics import kl_compact, kl_exact
from pytest_kvquality.reference import ReferenceKey, write_reference
from pytest_kvquality.resolve import bundled_gguf

ROOT = Path(__file__).resolve().parent.parent
GEMMA_VOCAB = 262_144
ROWS = 255  # scored rows of one n_ctx=512 chunk
N_CHUNKS = int(os.environ.get("KVQ_BENCH_CHUNKS", "4"))
#: --kv-batch of the real-model benchmark (default llama-perplexity's 2048: 4 chunks of 512 per decode)
N_BATCH = int(os.environ.get("KVQ_BENCH_BATCH", "2048"))


@pytest.fixture(scope="module")
def gemma_like_logits() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    base = (rng.standard_normal((ROWS, GEMMA_VOCAB)) * 3).astype(np.float32)
    cand = base + (rng.standard_normal((ROWS, GEMMA_VOCAB)) * 0.3).astype(np.float32)
    return base, cand, rng.integers(0, GEMMA_VOCAB, ROWS)


def test_kl_math_against_compact_reference(benchmark, gemma_like_logits) -> None:  # type: ignore[no-untyped-def]
    """The per-chunk KL reduction of a candidate: one log-sum-exp, an argmax, gathers."""
    base, cand, nxt = gemma_like_logits
    ref = compact_reference(base, nxt, K, M, np.random.default_rng(1))
    benchmark(kl_compact, cand, ref, nxt)
    benchmark.extra_info["scored_tokens_per_s"] = ROWS / benchmark.stats.stats.mean


def test_kl_math_exact(benchmark, gemma_like_logits) -> None:  # type: ignore[no-untyped-def]
    base, cand, nxt = gemma_like_logits
    benchmark(kl_exact, cand, base, nxt)
    benchmark.extra_info["scored_tokens_per_s"] = ROWS / benchmark.stats.stats.mean


def test_reference_compression(benchmark, gemma_like_logits) -> None:  # type: ignore[no-untyped-def]
    base, _, nxt = gemma_like_logits
    benchmark(compact_reference, base, nxt, K, M, np.random.default_rng(1))
    benchmark.extra_info["scored_tokens_per_s"] = ROWS / benchmark.stats.stats.mean


@pytest.fixture(scope="module")
def peaked_logits() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows shaped like Gemma's: ~900 tokens above the -16 cutoff (real rows: 38 / 894 / 8,586 at
    p10 / p50 / p90), where the reference compaction does its top-k and tail work."""
    rng = np.random.default_rng(0)
    base = rng.standard_normal((ROWS, GEMMA_VOCAB)).astype(np.float32)
    base[:, :1000] += (rng.uniform(8, 22, (ROWS, 1)) + 3 * rng.standard_normal((ROWS, 1000))).astype(np.float32)
    cand = base + (rng.standard_normal((ROWS, GEMMA_VOCAB)) * 0.3).astype(np.float32)
    return base, cand, rng.integers(0, GEMMA_VOCAB, ROWS)


@pytest.mark.parametrize("threads", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("work", ["evaluation", "reference"])
def test_reduction_scaling_over_threads(benchmark, peaked_logits, work: str, threads: int) -> None:  # type: ignore[no-untyped-def]
    """One chunk's KL reduction (evaluation) or compaction (reference build) on the engine's row
    threads: the build stays within 1.5x an evaluation only if both scale alike."""
    if threads > (os.cpu_count() or 1):
        pytest.skip(f"{threads} threads on a {os.cpu_count()}-core host")
    base, cand, nxt = peaked_logits
    u0 = np.random.default_rng(1).random(ROWS)
    rows = RowParallel(threads)
    try:
        if work == "evaluation":
            ref = compact_rows(base, nxt, K, M, u0)
            benchmark(rows.map, ROWS, partial(_kl_compact_block, cand, ref, nxt))
        else:
            benchmark(rows.map, ROWS, partial(_compact_block, base, nxt, u0, K, M))
    finally:
        rows.close()
    benchmark.extra_info.update({"rows_per_s": ROWS / benchmark.stats.stats.mean, "threads": threads,
                                 "compaction": kernel_name()})


def test_reference_bytes_per_scored_token(benchmark, gemma_like_logits, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """On-disk size of the compact reference (llama-perplexity's base file: 524 KB per token)."""
    base, _, nxt = gemma_like_logits
    rows = compact_reference(base, nxt, K, M, np.random.default_rng(1))
    key = ReferenceKey("0" * 64, "0" * 64, 512, "f16", "bench", K, M, 0)
    path = tmp_path / "r.kvqref"
    benchmark.pedantic(write_reference, args=(path, key, rows, {}), rounds=3)
    per_token = path.stat().st_size / ROWS
    benchmark.extra_info["bytes_per_scored_token"] = per_token
    assert per_token <= 2048


# ---------------------------------------------------------------- real model vs llama-perplexity


def _llama_perplexity() -> Path | None:
    p = Path(os.environ.get("KVQ_LLAMA_PERPLEXITY", ROOT / ".build" / "llama-perplexity"))
    return p if p.exists() else None


@pytest.fixture(scope="module")
def gemma_setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[WorkerEngine, ModelLoad, np.ndarray]]:
    path = bundled_gguf()  # $KVQ_GEMMA_GGUF: e.g. the staged model on the GPU host
    model = ModelLoad(str(path), -1, n_batch=N_BATCH)
    engine = WorkerEngine(tmp_path_factory.mktemp("logs"))
    tokens = engine.tokenize(model, builtin_corpus().texts["coding"])
    yield engine, model, chunk_tokens(tokens, 512, N_CHUNKS, "coding")
    engine.close()


def test_candidate_evaluation_vs_llama_perplexity(benchmark, gemma_setup, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Scored tok/s of a q4_0 evaluation with the reference cached, against llama-perplexity's KL mode.

    Both sides: bundled Gemma 3 270M, coding text, n_ctx 512, the same chunks, the same batch
    geometry (``KVQ_BENCH_BATCH``, default llama-perplexity's 2048 with micro-batches of 512),
    weight repacking off. The ratio (ours / llama-perplexity) is the figure of merit.
    """
    engine, model, chunks = gemma_setup
    q4, f16 = CacheConfig.parse("q4_0"), CacheConfig.parse("f16")
    rounds = int(os.environ.get("KVQ_BENCH_ROUNDS", "1"))
    # the build and the evaluation are timed alike: one warm-up chunk each (first context, kernels),
    # then the mean of `rounds` whole runs
    engine.reference(model, f16, chunks[:1], 0)
    ref_walls = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        ref = engine.reference(model, f16, chunks, 0)
        ref_walls.append(time.perf_counter() - t0)
    ref_wall = sum(ref_walls) / rounds
    engine.evaluate(model, q4, chunks[:1], ref.rows.slice(0, 255))
    run = benchmark.pedantic(engine.evaluate, args=(model, q4, chunks, ref.rows), rounds=rounds, iterations=1)
    scored = len(ref.rows)
    ours = scored / benchmark.stats.stats.mean
    benchmark.extra_info.update({"scored_tokens": scored, "ours_tok_per_s": ours,
                                 "reference_build_s": ref_wall, "reference_build_rounds_s": ref_walls,
                                 "reference_vs_eval": ref_wall / benchmark.stats.stats.mean,
                                 "eval_engine_s": run.seconds, "compaction": engine.info().compaction,
                                 # where the last round's time went: inside llama.cpp's decode and logits
                                 # calls (the forward pass and the logits' copy to the host), the rest ours
                                 "decode_s": run.context.decode_seconds, "n_batch": N_BATCH,
                                 "decode_sequences": run.context.decode_sequences,
                                 "context_s": run.context.context_seconds})
    exe = _llama_perplexity()
    if exe is None:
        pytest.skip("llama-perplexity not built (scripts/install-llama.sh); only our figure recorded")
    text = tmp_path / "coding.txt"
    text.write_text(builtin_corpus().texts["coding"])
    common = [str(exe), "-m", model.path, "-c", "512", "-b", str(N_BATCH), "-ub", str(min(N_BATCH, 512)), "--chunks",
              str(N_CHUNKS), "-fa", "on", "-nr", "--kl-divergence-base", str(tmp_path / "base.bin")]
    subprocess.run([*common, "-f", str(text)], check=True, capture_output=True)
    t0 = time.perf_counter()
    out = subprocess.run([*common, "--kl-divergence", "-ctk", "q4_0", "-ctv", "q4_0"], check=True,
                         capture_output=True, text=True)
    theirs_wall = time.perf_counter() - t0
    assert re.search(r"Mean    KLD", out.stdout + out.stderr)
    theirs = scored / theirs_wall
    benchmark.extra_info.update({"llama_perplexity_tok_per_s": theirs, "ratio": ours / theirs})
