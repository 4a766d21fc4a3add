"""The acceptance test of the metric definitions: the bundled Gemma 3 270M against
``llama-perplexity --kl-divergence`` (built from the same llama-cpp-python sdist by
scripts/install-llama.sh), on 2 chunks of the built-in coding text at n_ctx 512 in llama-perplexity's
default geometry (contexts of 4 sequences, both chunks in one decode): mean KLD within 0.5 % and Same
top p within 0.1 percentage point with the cached compact reference; to the printed digits in exact
mode. (Two chunks, not four: each is one 512-token forward pass per cache on each side, and these
tests are the longest part of CI; the digits compared do not need more.)

One module, one xdist group: the llama-perplexity runs, the f16 reference and the q4_0 runs are
made once and read by several tests (``pytest -n 2 --dist loadgroup`` keeps them on one worker).
"""

from __future__ import annotations

import pytest
from oracle import assert_matches, assert_same_logits, llama_perplexity_kld

from pytest_kvquality.cache_config import CacheConfig
from pytest_kvquality.corpus import builtin_corpus
from pytest_kvquality.engine.client import WorkerEngine
from pytest_kvquality.engine.protocol import CandidateRun, ModelLoad, ReferenceRun
from pytest_kvquality.metrics import TokenStats, summarize

pytestmark = [pytest.mark.real_model, pytest.mark.xdist_group("oracle")]

N_CTX = 512
N_CHUNKS = 2
ROWS_PER_CHUNK = N_CTX // 2 - 1


@pytest.fixture(scope="module")
def coding_reference(engine: WorkerEngine, gemma: ModelLoad, coding_chunks) -> ReferenceRun:  # type: ignore[no-untyped-def]
    """The f16 reference of the coding chunks, built once for the tests that read it."""
    return engine.reference(gemma, CacheConfig.parse("f16"), coding_chunks, seed=0)


@pytest.fixture(scope="module")
def first_chunk_reference(engine: WorkerEngine, gemma: ModelLoad, coding_chunks) -> ReferenceRun:  # type: ignore[no-untyped-def]
    """The f16 reference of the first chunk decoded alone (on a GPU the batch geometry moves the
    logits, so rows of the two-chunk reference are not its)."""
    return engine.reference(gemma, CacheConfig.parse("f16"), coding_chunks[:1], seed=0)


@pytest.fixture(scope="module")
def llama_perplexity_q4_0(tmp_path_factory: pytest.TempPathFactory, gemma: ModelLoad) -> dict[str, float]:
    return llama_perplexity_kld(tmp_path_factory.mktemp("llama-perplexity"), gemma.path,
                                builtin_corpus().texts["coding"], N_CTX, N_CHUNKS, CacheConfig.parse("q4_0"))


@pytest.fixture(scope="module")
def q4_0_exact(engine: WorkerEngine, gemma: ModelLoad, coding_chunks) -> CandidateRun:  # type: ignore[no-untyped-def]
    """q4_0 against the full f16 logits (exact mode), side by side."""
    return engine.evaluate_exact(gemma, CacheConfig.parse("q4_0"), gemma, CacheConfig.parse("f16"), coding_chunks)


@pytest.fixture(scope="module")
def q4_0_cached(engine: WorkerEngine, gemma: ModelLoad, coding_chunks,  # type: ignore[no-untyped-def]
                coding_reference: ReferenceRun) -> CandidateRun:
    """q4_0 against the cached compact f16 reference, as every gate runs."""
    assert len(coding_reference.rows) == N_CHUNKS * ROWS_PER_CHUNK
    return engine.evaluate(gemma, CacheConfig.parse("q4_0"), coding_chunks, coding_reference.rows)


def test_exact_mode_equals_llama_perplexity(q4_0_exact: CandidateRun, llama_perplexity_q4_0: dict[str, float]) -> None:
    assert_matches(summarize(q4_0_exact.stats), llama_perplexity_q4_0)
    assert_same_logits(summarize(q4_0_exact.stats), llama_perplexity_q4_0)
    assert q4_0_exact.context.decode_sequences == 4 and q4_0_exact.context.n_ubatch == 512  # its defaults


def test_cached_compact_reference_equals_llama_perplexity(q4_0_cached: CandidateRun,
                                                          llama_perplexity_q4_0: dict[str, float]) -> None:
    assert_matches(summarize(q4_0_cached.stats), llama_perplexity_q4_0)


def _assert_compact_within_one_percent(compact: TokenStats, exact: TokenStats) -> None:
    assert (compact.same_top == exact.same_top).all()
    assert summarize(compact).kl_mean == pytest.approx(summarize(exact).kl_mean, rel=0.01)


def test_compact_reference_is_within_one_percent_of_exact_with_exact_top1(
    engine: WorkerEngine, gemma: ModelLoad, coding_chunks, first_chunk_reference: ReferenceRun,  # type: ignore[no-untyped-def]
    q4_0_cached: CandidateRun, q4_0_exact: CandidateRun,
) -> None:
    """The cached reference (1,940 bytes per token instead of 524 KB) against the exact mode: q4_0 on
    the chunks both oracle tests ran, and q8_0 on one, whose small KL is where the tail estimate
    weighs most, against the chunk's own reference."""
    _assert_compact_within_one_percent(q4_0_cached.stats, q4_0_exact.stats)
    f16, q8 = CacheConfig.parse("f16"), CacheConfig.parse("q8_0")
    one = coding_chunks[:1]
    compact = engine.evaluate(gemma, q8, one, first_chunk_reference.rows).stats
    exact = engine.evaluate_exact(gemma, q8, gemma, f16, one).stats
    _assert_compact_within_one_percent(compact, exact)


def test_rotation_off_is_worse_than_rotation_on_for_q4_0(
    engine: WorkerEngine, gemma: ModelLoad, coding_chunks, coding_reference: ReferenceRun,  # type: ignore[no-untyped-def]
    q4_0_cached: CandidateRun,
) -> None:
    off_run = engine.evaluate(gemma, CacheConfig.parse("q4_0:norot"), coding_chunks, coding_reference.rows)
    # on 6,120 tokens of the corpus: 0.193 (rotation off) vs 0.152 (on)
    assert summarize(off_run.stats).kl_mean > summarize(q4_0_cached.stats).kl_mean
    # what llama.cpp reported when it created each context
    assert q4_0_cached.context.rotation_k is True and q4_0_cached.context.rotation_v is True
    assert off_run.context.rotation_k is False and off_run.context.rotation_v is False
    assert q4_0_cached.context.kv_cache_mib > 0


def test_f16_cache_against_its_own_reference_is_lossless(
    engine: WorkerEngine, gemma: ModelLoad, coding_chunks, first_chunk_reference: ReferenceRun,  # type: ignore[no-untyped-def]
) -> None:
    s = summarize(engine.evaluate(gemma, CacheConfig.parse("f16"), coding_chunks[:1], first_chunk_reference.rows).stats)
    assert s.top1 == 1.0
    assert abs(s.kl_mean) < 1e-5
