"""Peak memory of an evaluation at long context: it must not grow with n_ctx × n_vocab.

``Llama(logits_all=True)`` would hold n_ctx × n_vocab float32 logits: 32 GiB at n_ctx 32,768
with Gemma's 262,144-token vocabulary. The engine asks llama.cpp for the scored rows only and
reduces them one micro-batch at a time where llama.cpp left them, so peak RSS is the model, the KV
cache, llama.cpp's logits buffer for one micro-batch (n_ubatch × n_vocab floats: 512 MiB at
llama-perplexity's micro-batch of 512, which our numbers must match; four times that with rows
reduced on the GPU, the default there, whose sampler rows llama.cpp reserves beside the logits) and
the compact reference.
Target: peak RSS ≤ model size + that buffer + 1.25 GiB at n_ctx 32,768 (1.5 GiB in all at the
micro-batch of 256 the engine used before it took llama-perplexity's geometry).

The 32,768 case runs one chunk (16,383 scored tokens): seconds on a GPU, several minutes on the
2-core CPU, so there it runs only with ``KVQ_BENCH_LONG=1``.
"""

from __future__ import annotations

import resource
from pathlib import Path

import numpy as np
import pytest

from pytest_kvquality.cache_config import CacheConfig
from pytest_kvquality.corpus import builtin_corpus, chunk_tokens
from pytest_kvquality.engine.client import WorkerEngine
from pytest_kvquality.engine.pipeline import SAMPLER_HOST_ROWS
from pytest_kvquality.engine.protocol import ModelLoad
from pytest_kvquality.environment import env_flag, host_backend
from pytest_kvquality.resolve import bundled_gguf

GIB = 1 << 30


def gemma() -> ModelLoad:
    return ModelLoad(str(bundled_gguf()), -1)


@pytest.mark.parametrize("n_ctx", [512, 32768])
def test_peak_rss_does_not_grow_with_context_times_vocabulary(benchmark, n_ctx: int, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    if n_ctx > 4096 and host_backend().gpu is None and not env_flag("KVQ_BENCH_LONG", False):
        pytest.skip("n_ctx 32,768 on a CPU build takes minutes: set KVQ_BENCH_LONG=1 to run it")
    model = gemma()
    engine = WorkerEngine(tmp_path / "logs")
    try:
        text = "\n\n".join(builtin_corpus().texts.values())  # ~68k Gemma tokens: two 32k chunks
        chunks = chunk_tokens(engine.tokenize(model, text), n_ctx, 1, "all")
        ref = engine.reference(model, CacheConfig.parse("f16"), chunks, 0)
        run = benchmark.pedantic(engine.evaluate, args=(model, CacheConfig.parse("q4_0"), chunks, ref.rows),
                                 rounds=1, iterations=1)
        peak = engine.peak_rss_bytes()
    finally:
        engine.close()
    model_bytes = Path(model.path).stat().st_size
    logits_all = n_ctx * 262_144 * 4
    benchmark.extra_info.update({
        "n_ctx": n_ctx, "scored_tokens": len(run.stats), "worker_peak_rss_gib": (peak or 0) / GIB,
        "pytest_peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB,
        "model_gib": model_bytes / GIB, "logits_all_would_need_gib": logits_all / GIB,
        "kv_cache_mib": run.context.kv_cache_mib, "reference_mib": sum(
            a.nbytes for a in ref.rows.arrays().values()) / 2**20,
        "scored_tok_per_s": len(run.stats) / run.seconds, "gpu": host_backend().gpu,
    })
    assert np.isfinite(run.stats.kld).all()
    # rows reduced on the GPU (the default there, ``pipeline.reduce_on_device``): llama.cpp holds four
    # n_vocab-wide host rows per output row while the reduction's sampler is attached, one without
    rows = SAMPLER_HOST_ROWS if run.context.device_reduction else 1
    logits_buffer = rows * min(model.n_ubatch, n_ctx) * 262_144 * 4
    benchmark.extra_info["device_reduction"] = run.context.device_reduction
    benchmark.extra_info["target_gib"] = (model_bytes + logits_buffer + 1.25 * GIB) / GIB
    if peak is not None:
        assert peak <= model_bytes + logits_buffer + 1.25 * GIB, f"worker peak RSS {peak / GIB:.2f} GiB"
