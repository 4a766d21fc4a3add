"""Rows reduced where the logits are (``engine/device_reduction``, ``KVQ_DEVICE_REDUCTION``): the
engine hands each decode the ids of exactly its rows, and reads back the statistics the host pass
gives. The fake reduces "on the device" with the host's own pass, so here the two must agree to the
bit; through llama.cpp they agree to float32 rounding (``tests/test_real_model.py``)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from pytest_kvquality.cache_config import CacheConfig
from pytest_kvquality.corpus import builtin_corpus, chunk_tokens
from pytest_kvquality.engine import local
from pytest_kvquality.engine.fake import FAKE_KV, FAKE_VOCAB, FakeModel
from pytest_kvquality.engine.pipeline import SAMPLER_HOST_ROWS, reduce_on_device
from pytest_kvquality.engine.protocol import CandidateRun, ModelFacts, ModelLoad, ScoredView
from pytest_kvquality.environment import HostBackend, host_backend
from pytest_kvquality.metrics import compact_ids, kl_compact, kl_reduced
from pytest_kvquality.normalizer import normalize_rows
from pytest_kvquality.testing import FakeContext, FakeEngine

F16, Q4 = CacheConfig.parse("f16"), CacheConfig.parse("q4_0")


def evaluate(model: ModelLoad, on_device: str, monkeypatch: pytest.MonkeyPatch, n_ctx: int = 128) -> CandidateRun:
    monkeypatch.setenv("KVQ_DEVICE_REDUCTION", on_device)
    engine = FakeEngine(threads=2)
    texts = builtin_corpus().texts
    # two categories back to back: the ids of one sequence must never reach another's rows
    chunks = np.concatenate([chunk_tokens(engine.tokenize(model, texts[c]), n_ctx, 3, c)
                             for c in ("science", "coding")])
    ref = engine.reference(model, F16, chunks, seed=0).rows
    run = engine.evaluate(model, Q4, chunks, ref)
    engine.close()
    return run


@pytest.mark.parametrize("overlap", ["0", "1"], ids=["one-context", "two-contexts-decoding-ahead"])
@pytest.mark.parametrize(("n_batch", "n_ubatch", "n_ctx"), [(256, 512, 128), (512, 512, 128), (64, 64, 128)],
                         ids=["two-chunks-per-decode", "four-chunks-per-decode", "long-chunks"])
def test_rows_reduced_on_the_device_give_the_host_s_statistics(
    fake_model: Path, monkeypatch: pytest.MonkeyPatch, n_batch: int, n_ubatch: int, n_ctx: int, overlap: str
) -> None:
    """With one context, and with two taking groups in turn, each decoding on its own thread (the GPU
    default for short chunks)."""
    monkeypatch.setenv("KVQ_OVERLAP", overlap)
    model = ModelLoad(str(fake_model), 0, n_batch=n_batch, n_ubatch=n_ubatch)
    host = evaluate(model, "0", monkeypatch, n_ctx)
    device = evaluate(model, "1", monkeypatch, n_ctx)
    assert (host.context.device_reduction, device.context.device_reduction) == (False, True)
    assert device.context.logits_contexts == (2 if overlap == "1" and n_batch > n_ctx else 1)
    for name, values in host.stats.arrays().items():
        assert np.array_equal(values, device.stats.arrays()[name]), name


def test_a_row_given_another_row_s_ids_changes_the_statistics(
    fake_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The test above can fail: ids handed to the wrong rows (here, each decode's reversed) move KL."""
    model = ModelLoad(str(fake_model), 0, n_batch=256)
    host = evaluate(model, "0", monkeypatch)
    reduced = FakeContext.reduced_rows

    def misaligned(self: FakeContext, group: list[tuple[np.ndarray, np.ndarray]],
                   ids: list[np.ndarray]) -> Iterator[ScoredView]:
        return reduced(self, group, [i[::-1] for i in ids])

    monkeypatch.setattr(FakeContext, "reduced_rows", misaligned)
    device = evaluate(model, "1", monkeypatch)
    assert not np.array_equal(host.stats.kld, device.stats.kld)


def test_the_default_on_a_cpu_build_is_the_host(fake_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KVQ_DEVICE_REDUCTION", raising=False)
    engine = FakeEngine(threads=2)
    model = ModelLoad(str(fake_model), 0)
    chunks = chunk_tokens(engine.tokenize(model, builtin_corpus().texts["science"]), 128, 2, "science")
    run = engine.evaluate(model, Q4, chunks, engine.reference(model, F16, chunks, seed=0).rows)
    engine.close()
    assert run.context.device_reduction is False


def test_kl_reduced_reads_what_kl_compact_computes(fake_model: Path) -> None:
    """The reduced row's layout (argmax as float, log-normalizer, logits at ``compact_ids``) read back
    as ``kl_compact`` reads a whole row; a row whose normalizer is not finite reads NaN."""
    engine = FakeEngine(threads=1)
    model = ModelLoad(str(fake_model), 0)
    chunks = chunk_tokens(engine.tokenize(model, builtin_corpus().texts["coding"]), 64, 1, "coding")
    ref = engine.reference(model, F16, chunks, seed=0).rows
    nxt = chunks[0, 33:64].astype(np.int32)
    logits = np.random.default_rng(5).standard_normal((len(ref), 512)).astype(np.float32) * 4
    logits[3, 7] = np.inf
    rows = normalize_rows(logits, compact_ids(ref, nxt))
    reduced = np.column_stack([rows.imax.astype(np.float32), rows.norm, rows.gathered])
    reduced[3, 1] = np.inf  # a device's normalizer of a row with +inf
    got, want = kl_reduced(reduced, ref).arrays(), kl_compact(logits, ref, nxt).arrays()
    for name, values in want.items():
        assert np.array_equal(values, got[name], equal_nan=True), name
    assert np.isnan(got["nll"][3])
    engine.close()


GIB = 1 << 30


@pytest.mark.parametrize(("said", "on_gpu", "available", "expected"), [
    (None, True, 32 * GIB, True),  # host rows fit in half of what is available: the GPU default
    (None, True, 32 * GIB - 1, False),  # one byte short of twice the host rows
    (None, True, None, False),  # available memory unknown (not Linux)
    (None, False, 1 << 50, False),  # output layer on the CPU (a CPU build, partial offload, RPC)
    ("1", False, None, True),  # asked for: as asked (the CPU build's tests use it)
    ("0", True, 1 << 50, False),
])
def test_rows_are_reduced_on_the_gpu_by_default_when_their_host_rows_fit(
    monkeypatch: pytest.MonkeyPatch, said: str | None, on_gpu: bool, available: int | None, expected: bool
) -> None:
    """llama.cpp reserves four n_vocab-wide host rows per output row while the reduction's sampler is
    attached; by default that must take at most half of the host's available memory (16 GiB here)."""
    if said is None:
        monkeypatch.delenv("KVQ_DEVICE_REDUCTION", raising=False)
    else:
        monkeypatch.setenv("KVQ_DEVICE_REDUCTION", said)
    assert reduce_on_device(on_gpu, 16 * GIB, available) is expected


def fake_on_a_gpu(monkeypatch: pytest.MonkeyPatch, available: int, gpu: str | None = "CUDA",
                  gpu_layers: int = 999) -> None:
    """The fake as llama.cpp on a GPU build with every layer offloaded (the output layer too), and the
    memory the host says is available."""
    facts = FakeModel.describe

    def offloaded(self: FakeModel) -> ModelFacts:
        return dataclasses.replace(facts(self), gpu_layers=gpu_layers)

    monkeypatch.delenv("KVQ_DEVICE_REDUCTION", raising=False)
    monkeypatch.setattr(FakeModel, "describe", offloaded)
    monkeypatch.setattr(local, "host_backend", lambda: HostBackend("0.3.36", "0.0.0", gpu))
    monkeypatch.setattr(local, "memory_available_bytes", lambda: available)


def held_sampler_rows(model: ModelLoad) -> int:
    """Host bytes of the sampler rows of every context the engine may hold: (2 kept + 1 in use + 1
    prepared) sets of two contexts, four n_vocab-wide float rows per output row of a micro-batch."""
    return 8 * SAMPLER_HOST_ROWS * model.n_ubatch * FAKE_VOCAB * 4


@pytest.mark.parametrize(("spare", "expected"), [(0, True), (-1, False)], ids=["fits", "one-byte-short"])
def test_the_engine_weighs_every_context_it_may_hold(fake_model: Path, monkeypatch: pytest.MonkeyPatch,
                                                      spare: int, expected: bool) -> None:
    """The default decides on the engine's own count of contexts and the model's vocabulary and
    micro-batch, once per model (a run does not switch paths as its contexts take memory); the result
    says which path made it, and both give the same statistics here."""
    model = ModelLoad(str(fake_model), -1, n_batch=512, n_ubatch=512)
    fake_on_a_gpu(monkeypatch, 2 * held_sampler_rows(model) + spare)
    engine = FakeEngine(threads=2)
    assert engine.max_held_contexts() == 8
    chunks = chunk_tokens(engine.tokenize(model, builtin_corpus().texts["science"]), 128, 4, "science")
    ref = engine.reference(model, F16, chunks, seed=0).rows
    run = engine.evaluate(model, Q4, chunks, ref)
    monkeypatch.setattr(local, "memory_available_bytes", lambda: 1 << 50 if spare else 0)
    again = engine.evaluate(model, Q4, chunks, ref)  # the host's memory changed: the default did not
    monkeypatch.setenv("KVQ_DEVICE_REDUCTION", "0")
    host = engine.evaluate(model, Q4, chunks, ref)
    engine.close()
    assert (run.context.device_reduction, again.context.device_reduction) == (expected, expected)
    assert host.context.device_reduction is False
    assert np.array_equal(run.stats.kld, host.stats.kld)


@pytest.mark.parametrize("where", ["cpu-build", "output-layer-on-the-cpu", "rpc-server"])
def test_the_default_stays_on_the_host_where_the_output_layer_is_not_on_a_local_gpu(
    fake_model: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """A CPU build gains nothing; a partly offloaded model computes its output rows on the CPU (llama.cpp
    offloads the output layer only past n_layer layers); an RPC server's rows are not this host's GPU's."""
    fake_on_a_gpu(monkeypatch, 1 << 50, gpu=None if where == "cpu-build" else "CUDA",
                  gpu_layers=FAKE_KV[0] if where == "output-layer-on-the-cpu" else 999)
    model = ModelLoad(str(fake_model), -1, rpc="127.0.0.1:50052" if where == "rpc-server" else "")
    engine = FakeEngine(threads=1)
    chunks = chunk_tokens(engine.tokenize(model, builtin_corpus().texts["science"]), 128, 2, "science")
    run = engine.evaluate(model, Q4, chunks, engine.reference(model, F16, chunks, seed=0).rows)
    engine.close()
    assert run.context.device_reduction is False


@pytest.mark.parametrize(("env", "unpinned"), [
    ({}, host_backend().gpu is not None),  # the GPU default may reduce on the device
    ({"KVQ_DEVICE_REDUCTION": "1"}, True),
    ({"KVQ_DEVICE_REDUCTION": "1", "KVQ_UNPINNED_OUTPUTS": "0"}, False),
    ({"KVQ_UNPINNED_OUTPUTS": "1"}, True),
])
def test_output_buffers_are_unpinned_exactly_when_no_row_is_copied_out_of_them(env: dict[str, str],
                                                                               unpinned: bool) -> None:
    """A worker that reduces rows on the device installs the switch that gives llama.cpp's output
    buffers plain host memory (``engine/host_pinning``), before any context, and nothing else is
    unpinned; the host path, which copies every scored row into them, keeps them pinned. Which
    decodes flip it: ``tests/test_real_device_reduction.py``."""
    script = ("from pytest_kvquality.engine import llama, host_pinning; llama.init_backend(); import os; "
              "print(host_pinning.installed(), host_pinning.visible(), os.environ.get('GGML_CUDA_NO_PINNED'))")
    clean = {k: v for k, v in os.environ.items()
             if k not in ("KVQ_DEVICE_REDUCTION", "KVQ_UNPINNED_OUTPUTS", "GGML_CUDA_NO_PINNED")}
    out = subprocess.run([sys.executable, "-c", script], env={**clean, **env}, capture_output=True, text=True,
                         check=True).stdout.split()
    assert out[-3:] == [str(unpinned), "False", "None"]
