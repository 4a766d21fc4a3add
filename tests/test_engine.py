"""The in-process engine on the fake model: results do not depend on how rows are split across threads."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pytest_kvquality.cache_config import CacheConfig
from pytest_kvquality.corpus import builtin_corpus, chunk_tokens
from pytest_kvquality.engine.protocol import ModelLoad
from pytest_kvquality.testing import FakeEngine


def every_output(engine: FakeEngine, model: ModelLoad, category: str, n_chunks: int) -> list[dict[str, np.ndarray]]:
    """Reference rows, a cached-reference q4_0 evaluation and an exact one, as arrays."""
    chunks = chunk_tokens(engine.tokenize(model, builtin_corpus().texts[category]), 128, n_chunks, category)
    ref = engine.reference(model, CacheConfig.parse("f16"), chunks, seed=0).rows
    run = engine.evaluate(model, CacheConfig.parse("q4_0"), chunks, ref)
    exact = engine.evaluate_exact(model, CacheConfig.parse("q4_0"), model, CacheConfig.parse("f16"), chunks)
    engine.close()
    return [ref.arrays(), run.stats.arrays(), exact.stats.arrays()]


def test_chunks_decoded_together_come_back_in_order(fake_model: Path) -> None:
    """The fake's logits do not depend on the decode geometry (llama.cpp's do, in the last bits): one
    chunk per decode, two, or all at once (n_batch / n_ctx of them, as llama-perplexity) give the
    same rows in the same order."""
    outputs = [every_output(FakeEngine(threads=2), ModelLoad(str(fake_model), 0, n_batch=n_batch), "science", 5)
               for n_batch in (128, 256, 2048)]
    for other in outputs[1:]:
        for mine, theirs in zip(outputs[0], other, strict=True):
            for name in mine:
                assert np.array_equal(mine[name], theirs[name]), name


def test_threads_do_not_change_a_single_bit(fake_model: Path) -> None:
    model = ModelLoad(str(fake_model), 0)
    results = [every_output(FakeEngine(threads=threads), model, "science", 3) for threads in (1, 3)]
    for one, three in zip(results[0], results[1], strict=True):
        for name in one:
            assert np.array_equal(one[name], three[name]), name


def test_overlapping_the_math_with_decoding_does_not_change_a_single_bit(
    fake_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the fake, like llama.cpp, overwrites its logits buffer at the next decode: a pipeline that
    # reduced a stale view would read NaNs or the next batch
    model = ModelLoad(str(fake_model), 0)
    results = []
    for overlap in ("0", "1"):
        monkeypatch.setenv("KVQ_OVERLAP", overlap)
        results.append(every_output(FakeEngine(threads=2), model, "coding", 4))
    assert np.isfinite(results[1][1]["kld"]).all()
    for plain, overlapped in zip(results[0], results[1], strict=True):
        for name in plain:
            assert np.array_equal(plain[name], overlapped[name]), name


def test_two_contexts_lend_each_chunks_last_batch_and_no_view_outlives_its_decode(
    fake_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Overlapping, chunks alternate between two contexts and the last batch of each is reduced in
    llama.cpp's buffer. The reductions are slowed here so that, if a context decoded again before
    its lent batch was reduced, the reduction would read the next chunk's logits (or NaNs)."""
    import pytest_kvquality.engine.local as engine_mod

    monkeypatch.setenv("KVQ_OVERLAP", "0")
    plain = every_output(FakeEngine(threads=2), ModelLoad(str(fake_model), 0), "coding", 5)
    slow_kl, slow_compact = engine_mod._kl_compact_block, engine_mod._compact_block

    def slowly(fn: Any) -> Any:
        def run(*args: Any) -> Any:
            time.sleep(0.02)
            return fn(*args)
        return run

    monkeypatch.setattr(engine_mod, "_kl_compact_block", slowly(slow_kl))
    monkeypatch.setattr(engine_mod, "_compact_block", slowly(slow_compact))
    monkeypatch.setenv("KVQ_OVERLAP", "1")
    # n_batch 128: one chunk per decode, in two blocks (one reduced before the next decode, one lent:
    # 10 of each over two runs); 256: two chunks per decode, each in two interleaved blocks, all lent,
    # and the fifth alone (4 + 4 + 1 lent, 1 reduced first per run). Decoded ahead (the default with
    # two contexts), a block that the next call overwrites is copied on the decoding thread and lent
    for n_batch, alternate, ahead, counts in ((128, "1", "0", (10, 10)), (128, "0", "1", (0, 20)),
                                              (256, "1", "0", (18, 2)), (128, "1", "1", (20, 0)),
                                              (256, "1", "1", (20, 0))):
        monkeypatch.setenv("KVQ_ALTERNATE", alternate)
        monkeypatch.setenv("KVQ_DECODE_AHEAD", ahead)
        model = ModelLoad(str(fake_model), 0, n_batch=n_batch)
        engine = FakeEngine(threads=2)
        chunks = chunk_tokens(engine.tokenize(model, builtin_corpus().texts["coding"]), 128, 5, "coding")
        ref = engine.reference(model, CacheConfig.parse("f16"), chunks, seed=0).rows
        run = engine.evaluate(model, CacheConfig.parse("q4_0"), chunks, ref)
        pipeline = engine._pipeline
        assert pipeline is not None
        assert (pipeline.in_place, pipeline.waited) == counts, (n_batch, alternate, ahead)
        assert run.context.logits_contexts == (2 if alternate == "1" else 1)
        engine.close()
        for name, values in ref.arrays().items():
            assert np.array_equal(values, plain[0][name]), (n_batch, alternate, ahead, name)
        for name, values in run.stats.arrays().items():
            assert np.array_equal(values, plain[1][name]), (n_batch, alternate, ahead, name)


def test_a_second_context_that_cannot_be_created_costs_speed_not_numbers(
    fake_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pytest_kvquality.testing import FakeContext, FakeModel

    model = ModelLoad(str(fake_model), 0)
    monkeypatch.setenv("KVQ_OVERLAP", "1")
    alternating = every_output(FakeEngine(threads=2), model, "science", 3)
    created: list[FakeContext] = []
    real_context = FakeModel.context

    def only_one(self: FakeModel, cache: CacheConfig, n_ctx: int, n_seq: int = 1,
                 n_ubatch: int | None = None) -> FakeContext:
        if created:
            raise RuntimeError("out of memory: llama.cpp could not allocate a context")
        created.append(real_context(self, cache, n_ctx, n_seq, n_ubatch))
        return created[-1]

    monkeypatch.setattr(FakeModel, "context", only_one)
    engine = FakeEngine(threads=2)
    chunks = chunk_tokens(engine.tokenize(model, builtin_corpus().texts["science"]), 128, 3, "science")
    ref = engine.reference(model, CacheConfig.parse("f16"), chunks, seed=0).rows
    created.clear()
    run = engine.evaluate(model, CacheConfig.parse("q4_0"), chunks, ref)
    engine.close()
    assert run.context.logits_contexts == 1
    assert "out of memory" in run.context.second_context_error
    for name, values in run.stats.arrays().items():
        assert np.array_equal(values, alternating[1][name]), name


def test_compact_estimate_tracks_the_exact_value_on_the_fake_model(fake_model: Path) -> None:
    model = ModelLoad(str(fake_model), 0)
    engine = FakeEngine(top_k=32, tail_samples=16, threads=2)
    chunks = chunk_tokens(engine.tokenize(model, builtin_corpus().texts["coding"]), 128, 6, "coding")
    ref = engine.reference(model, CacheConfig.parse("f16"), chunks, seed=0).rows
    f16 = CacheConfig.parse("f16")
    for cache, tolerance in (("q4_0", "relative"), ("q8_0", "absolute")):
        compact = engine.evaluate(model, CacheConfig.parse(cache), chunks, ref).stats
        exact = engine.evaluate_exact(model, CacheConfig.parse(cache), model, f16, chunks).stats
        assert np.array_equal(compact.same_top, exact.same_top)  # top-1 is always exact
        error = abs(float(compact.kld.mean()) - float(exact.kld.mean()))
        # the tail estimate's noise is absolute: a few 1e-4 over ~400 tokens of this tail-heavy toy
        assert error < (0.02 * float(exact.kld.mean()) if tolerance == "relative" else 3e-4), cache
    engine.close()


def test_each_xdist_worker_gets_its_own_gpu(tmp_path: Path) -> None:
    from pytest_kvquality.engine.client import worker_gpu_env

    no_driver = tmp_path / "absent"
    env = {"CUDA_VISIBLE_DEVICES": "0,1,2,3", "PATH": "/bin"}
    assert worker_gpu_env(env, "gw0", no_driver)["CUDA_VISIBLE_DEVICES"] == "0"
    assert worker_gpu_env(env, "gw2", no_driver)["CUDA_VISIBLE_DEVICES"] == "2"
    assert worker_gpu_env(env, "gw5", no_driver)["CUDA_VISIBLE_DEVICES"] == "1"  # more workers than GPUs: wrap
    assert worker_gpu_env(env, None, no_driver)["CUDA_VISIBLE_DEVICES"] == "0,1,2,3"  # no xdist: all of them
    assert worker_gpu_env({"CUDA_VISIBLE_DEVICES": "7"}, "gw3", no_driver)["CUDA_VISIBLE_DEVICES"] == "7"
    assert "CUDA_VISIBLE_DEVICES" not in worker_gpu_env({"PATH": "/bin"}, "gw1", no_driver)  # no GPU at all
    assert worker_gpu_env(env, "gw1", no_driver)["PATH"] == "/bin"


def test_without_cuda_visible_devices_the_workers_split_the_gpus_the_driver_lists(tmp_path: Path) -> None:
    """Found on a 2-GPU host: with CUDA_VISIBLE_DEVICES unset, each worker spread its model over both GPUs."""
    from pytest_kvquality.engine.client import worker_gpu_env

    gpus = tmp_path / "gpus"  # what /proc/driver/nvidia/gpus holds: one folder per GPU, named by PCI address
    for bus in ("0000:18:00.0", "0000:2a:00.0"):
        (gpus / bus).mkdir(parents=True)
    assert worker_gpu_env({}, "gw0", gpus)["CUDA_VISIBLE_DEVICES"] == "0"
    assert worker_gpu_env({}, "gw1", gpus)["CUDA_VISIBLE_DEVICES"] == "1"
    assert worker_gpu_env({}, "gw2", gpus)["CUDA_VISIBLE_DEVICES"] == "0"
    assert "CUDA_VISIBLE_DEVICES" not in worker_gpu_env({}, None, gpus)  # one process: left to llama.cpp
    assert worker_gpu_env({"CUDA_VISIBLE_DEVICES": ""}, "gw1", gpus)["CUDA_VISIBLE_DEVICES"] == ""  # GPUs hidden
