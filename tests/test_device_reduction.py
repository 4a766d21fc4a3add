"""Rows reduced where the logits are (``engine/device_reduction``, ``KVQ_DEVICE_REDUCTION``): the
engine hands each decode the ids of exactly its rows, and reads back the statistics the host pass
gives. The fake reduces "on the device" with the host's own pass, so here the two must agree to the
bit; through llama.cpp they agree to float32 rounding (``tests/test_real_model.py``)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from pytest_kvquality.cache_config import CacheConfig
from pytest_kvquality.corpus import builtin_corpus, chunk_tokens
from pytest_kvquality.engine.pipeline import reduce_on_device
from pytest_kvquality.engine.protocol import CandidateRun, ModelLoad, ScoredView
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


def test_the_default_is_the_host(fake_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
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


@pytest.mark.parametrize(("said", "expected"), [(None, False), ("1", True), ("0", False)])
def test_it_runs_only_when_asked_for(monkeypatch: pytest.MonkeyPatch, said: str | None, expected: bool) -> None:
    """Asked for, never a default (pipeline.reduce_on_device says why: llama.cpp's host buffers)."""
    if said is None:
        monkeypatch.delenv("KVQ_DEVICE_REDUCTION", raising=False)
    else:
        monkeypatch.setenv("KVQ_DEVICE_REDUCTION", said)
    assert reduce_on_device() is expected


@pytest.mark.parametrize(("env", "unpinned"), [
    ({}, False),
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
