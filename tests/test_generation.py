"""generation.py and the engine's greedy decoding: where two caches' generations first part, the KL
there, censoring at N, and bounds over prompts."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from pytest_kvquality.cache_config import CacheConfig
from pytest_kvquality.engine.protocol import ModelLoad
from pytest_kvquality.generation import Divergence, summarize_generation
from pytest_kvquality.metrics import kl_exact
from pytest_kvquality.sequences import Sequences
from pytest_kvquality.testing import FakeEngine

N = 24


@pytest.fixture
def prompts(fake_model: Path) -> Sequences:
    engine = FakeEngine()
    toks = engine.tokenize(ModelLoad(str(fake_model)), "The reactor's coolant loop runs at 290 degrees. " * 40)
    return Sequences.of([toks[i * 37 : i * 37 + 20 + i] for i in range(12)],
                        [np.zeros(20 + i, np.uint8) for i in range(12)])


def test_the_same_cache_reproduces_every_generation(fake_model: Path, prompts: Sequences) -> None:
    engine, spec = FakeEngine(), ModelLoad(str(fake_model))
    ref = engine.generate_reference(spec, CacheConfig.parse("f16"), prompts, N, 0)
    assert (ref.generations.lengths == N).all() and len(ref.generations.rows) == N * len(prompts)
    same = engine.generate(spec, CacheConfig.parse("f16"), prompts, ref.generations).divergence
    assert (same.first == N).all() and np.isnan(same.kl).all()


def test_divergence_is_the_first_differing_token_and_its_kl_is_measured_there(
        fake_model: Path, prompts: Sequences) -> None:
    """Replays each diverged prompt by hand: the tokens agree up to ``first``, differ there, and the
    KL at that point is the one between the two caches' full distributions on the shared prefix."""
    engine, spec = FakeEngine(top_k=256, tail_samples=64), ModelLoad(str(fake_model))  # a near-exact reference
    ref = engine.generate_reference(spec, CacheConfig.parse("f16"), prompts, N, 0).generations
    div = engine.generate(spec, CacheConfig.parse("q4_0"), prompts, ref).divergence
    assert (div.first < N).sum() >= len(prompts) // 2
    model = engine.backend.load(spec)
    base, cand = model.context(CacheConfig.parse("f16"), 256), model.context(CacheConfig.parse("q4_0"), 256)
    for i in np.flatnonzero(div.first < N):
        j = int(div.first[i])
        prefix = np.concatenate([prompts.sequence(i), ref.tokens[i, :j]]).astype(np.int32)
        p, q = base.next_logits(prefix, 0).copy(), cand.next_logits(prefix, 0).copy()
        assert int(np.argmax(p)) == ref.tokens[i, j] != int(np.argmax(q))
        exact = float(kl_exact(q[None], p[None], np.array([ref.tokens[i, j]])).kld[0])
        assert div.kl[i] == pytest.approx(exact, rel=0.02, abs=1e-4)


def test_a_median_at_n_is_censored_and_its_upper_bound_open() -> None:
    identical = Divergence(np.full(10, N, np.int32), np.full(10, np.nan, np.float32), N)
    summary, bounds = summarize_generation([identical], agree=8)
    assert summary.median_censored and summary.values["gen_identical"] == 1.0
    b = bounds["gen_first_divergence_median"]
    assert b.low == N and math.isinf(b.high)
    assert summary.values["gen_kl_at_divergence"] == 0.0  # nothing diverged


def test_few_prompts_cannot_decide_a_gate() -> None:
    few = Divergence(np.array([3, 5, N], np.int32), np.array([0.1, 0.2, np.nan], np.float32), N)
    _, bounds = summarize_generation([few], agree=4)
    assert "3 prompts" in bounds["gen_identical"].undecided
    many = Divergence(np.array([3, 5, N] * 4, np.int32), np.array([0.1, 0.2, np.nan] * 4, np.float32), N)
    _, bounds = summarize_generation([many], agree=4)
    assert not bounds["gen_identical"].undecided


def test_bounds_come_from_prompts_resampled_within_categories() -> None:
    """Two categories, one all-identical and one all-diverged: resampled within each, the pooled
    share identical is exactly one half in every draw, so its bounds collapse onto it."""
    a = Divergence(np.full(8, N, np.int32), np.full(8, np.nan, np.float32), N)
    b = Divergence(np.full(8, 2, np.int32), np.full(8, 0.3, np.float32), N)
    summary, bounds = summarize_generation([a, b], agree=4)
    assert summary.values["gen_identical"] == 0.5
    assert bounds["gen_identical"].low == bounds["gen_identical"].high == 0.5
