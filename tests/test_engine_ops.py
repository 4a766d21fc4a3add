"""The worker protocol (engine/ops.py): declared once, every Engine method covered, values survive
the trip through a real pipe bit for bit."""

from __future__ import annotations

import dataclasses
import importlib.util
import io
import os
import subprocess
import sys

import numpy as np
import pytest

from pytest_kvquality.cache_config import CacheConfig
from pytest_kvquality.engine import ipc
from pytest_kvquality.engine.ops import OPS, TEST_OPS, call_args, decode, encode
from pytest_kvquality.engine.protocol import (
    CandidateRun,
    ContextFacts,
    DivergenceRun,
    Engine,
    GenerationRun,
    ModelLoad,
    ReferenceRun,
)
from pytest_kvquality.generation import Divergence, Generations
from pytest_kvquality.metrics import ReferenceRows, TokenStats
from pytest_kvquality.sequences import Sequences


def _through_pipe(tp: object, value: object) -> object:
    buf = io.BytesIO()
    ipc.send(buf, *encode(tp, value))
    buf.seek(0)
    return decode(tp, *ipc.recv(buf))


def test_every_engine_method_is_an_operation_and_nothing_else_is() -> None:
    methods = {n for n in dir(Engine) if not n.startswith("_") and callable(getattr(Engine, n))} - {"close"}
    assert set(OPS) == methods
    assert not set(TEST_OPS) & set(OPS)


def test_an_evaluation_request_and_its_reply_survive_the_pipe() -> None:
    op = OPS["evaluate_exact"]
    args = op.args(model=ModelLoad("/m.gguf", 0, True), cache=CacheConfig.parse("q8_0/q4_0:norot"),
                   ref_model=ModelLoad("/r.gguf"), ref_cache=CacheConfig.parse("f16"),
                   chunks=Sequences.of([np.arange(6, dtype=np.int32), np.arange(3, dtype=np.int32)],
                                       [np.array([0, 2, 2, 0, 3, 0], np.uint8), np.array([4, 4, 0], np.uint8)]))
    back = _through_pipe(op.args, args)
    assert call_args(back).keys() == call_args(args).keys()
    assert back.model == args.model and back.ref_model == args.ref_model
    assert back.cache == args.cache and back.ref_cache == args.ref_cache
    assert back.chunks.digest() == args.chunks.digest() and back.chunks.tokens.dtype == np.int32
    z = np.linspace(0, 1, 5, dtype=np.float64)
    stats = TokenStats(z, z + 1, z + 2, z + 3, np.array([1, 0, 1, 1, 0], bool))
    facts = ContextFacts(rotation_k=True, kv_devices=("CPU", "CUDA0"), kv_cache_mib=1.5, logits_contexts=2)
    reply = _through_pipe(CandidateRun, CandidateRun(2.5, stats, facts))
    assert isinstance(reply, CandidateRun) and reply.seconds == 2.5 and reply.context == facts
    for f in dataclasses.fields(TokenStats):
        assert np.array_equal(getattr(reply.stats, f.name), getattr(stats, f.name))


def test_a_generation_and_its_divergence_survive_the_pipe() -> None:
    rows = _through_pipe(ReferenceRun, ReferenceRun(0.0, _rows(3))).rows
    sent = GenerationRun(1.5, Generations(np.array([[5, 6, 7]], np.int32), np.array([3], np.int32), rows), 2)
    got = _through_pipe(GenerationRun, sent)
    assert got.decoded == 2 and np.array_equal(got.generations.tokens, sent.generations.tokens)
    assert not got.generations.rows.differences(rows)
    div = DivergenceRun(0.5, Divergence(np.array([3, 1], np.int32), np.array([np.nan, 0.25], np.float32), 3), 4)
    back = _through_pipe(DivergenceRun, div)
    assert back.divergence.n_tokens == 3 and np.array_equal(back.divergence.first, [3, 1])
    assert np.isnan(back.divergence.kl[0]) and back.divergence.kl[1] == np.float32(0.25)


def _rows(n: int) -> ReferenceRows:
    rng = np.random.default_rng(0)
    return ReferenceRows(rng.integers(0, 9, n).astype(np.int32), rng.random(n).astype(np.float32),
                         rng.integers(0, 9, (n, 4)).astype(np.int32), rng.random((n, 4)).astype(np.float32),
                         rng.integers(0, 9, (n, 2)).astype(np.int32), rng.random((n, 2)).astype(np.float32),
                         rng.random(n))


def test_a_context_fact_nobody_declared_is_refused_not_dropped() -> None:
    with pytest.raises(TypeError, match="kv_new_thing"):
        ContextFacts.from_info({"kv_cells": 4, "kv_new_thing": 1})


@pytest.mark.parametrize(("value", "offloaded", "probes"), [
    ("off", True, False), ("0", True, False), ("on", False, True), ("", True, True), ("", False, False)])
def test_the_placement_probe_switch_means_what_it_says(value: str, offloaded: bool, probes: bool) -> None:
    """``KVQ_PLACEMENT_PROBE=off`` once still probed (only ``0`` was understood). Asked in a child
    process: llama_cpp is never imported in pytest's."""
    code = ("import types, pytest_kvquality.engine.llama as l\n"
            f"print(l._wants_probe(types.SimpleNamespace(gpu_layers={999 if offloaded else 0})))")
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("needs llama-cpp-python")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "KVQ_PLACEMENT_PROBE": value},
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out == str(probes)
