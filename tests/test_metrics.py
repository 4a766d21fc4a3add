"""The numerical core against hand-computed cases and llama.cpp's formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pytest_kvquality.compaction import compact_reference
from pytest_kvquality.kernels import compiled_kernels, compiler
from pytest_kvquality.metrics import (
    TokenStats,
    kl_compact,
    kl_exact,
    mean_and_uncertainty,
    median,
    percentile,
    quantile_bounds,
    summarize,
)
from pytest_kvquality.normalizer import log_normalizer


def logits_of(probs: list[float]) -> np.ndarray:
    return np.log(np.asarray(probs, np.float64)).astype(np.float32)


def test_kl_of_two_three_token_distributions_matches_hand_computation() -> None:
    p = [0.5, 0.25, 0.25]  # reference
    q = [0.25, 0.5, 0.25]  # candidate
    base = logits_of(p)[None, :] + 3.0  # a constant shift must not matter
    cand = logits_of(q)[None, :] - 1.0
    stats = kl_exact(cand, base, np.array([1]))
    expected = 0.5 * math.log(0.5 / 0.25) + 0.25 * math.log(0.25 / 0.5)  # = 0.25 ln 2
    assert stats.kld[0] == pytest.approx(expected, rel=1e-6)
    assert stats.nll[0] == pytest.approx(-math.log(0.5), rel=1e-6)       # candidate on token 1
    assert stats.nll_base[0] == pytest.approx(-math.log(0.25), rel=1e-6)  # reference on token 1
    assert stats.p_diff[0] == pytest.approx(0.5 - 0.25, rel=1e-6)
    assert not stats.same_top[0]  # argmax 1 vs 0


def test_identical_distributions_have_zero_kl_and_agree_on_top1() -> None:
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((5, 50)).astype(np.float32)
    stats = kl_exact(logits, logits.copy(), np.arange(5))
    assert np.allclose(stats.kld, 0.0, atol=1e-6)
    assert stats.same_top.all()
    assert np.allclose(stats.p_diff, 0.0, atol=1e-7)


def test_reference_tokens_below_the_cutoff_are_left_out_like_llama_cpp() -> None:
    # token 2 has log p = -20 in the reference: llama.cpp skips it (log p <= -16)
    base = np.array([[0.0, 0.0, -20.0]], np.float32)
    cand = np.array([[0.0, 0.0, 5.0]], np.float32)
    stats = kl_exact(cand, base, np.array([0]))
    lse_b = math.log(2 + math.exp(-20))
    lse_c = math.log(2 + math.exp(5))
    expected = 2 * math.exp(-lse_b) * ((0 - lse_b) - (0 - lse_c))
    assert stats.kld[0] == pytest.approx(expected, rel=1e-5)


def test_log_normalizer_is_argmax_plus_log_sum_exp() -> None:
    x = np.array([[1.0, 3.0, 2.0], [5.0, 5.0, -1.0]], np.float32)
    imax, norm = log_normalizer(x)
    assert imax.tolist() == [1, 0]  # first maximum wins, as in llama.cpp
    assert norm[0] == pytest.approx(math.log(math.exp(1) + math.exp(3) + math.exp(2)), rel=1e-6)


def test_mean_and_uncertainty_follow_llama_cpp() -> None:
    values = np.arange(1, 13, dtype=np.float64)  # 12 values
    mean, unc = mean_and_uncertainty(values.sum(), (values**2).sum(), values.size)
    assert mean == pytest.approx(6.5)
    assert unc == pytest.approx(math.sqrt(((values**2).mean() - 6.5**2) / 11))
    # ten values or fewer: llama.cpp reports no uncertainty
    assert mean_and_uncertainty(10.0, 20.0, 10)[1] == 0.0


def test_percentile_and_median_interpolate_like_llama_cpp() -> None:
    v = np.array([0.0, 1.0, 2.0, 10.0], np.float32)
    assert percentile(v, 0.5) == pytest.approx(1.5)
    assert percentile(v, 0.9) == pytest.approx(2 + 0.7 * 8)  # p = 2.7
    assert percentile(v, 0.0) == 0.0 and percentile(v, 1.0) == 10.0
    assert median(v) == pytest.approx(1.5)
    assert median(np.array([3.0, 4.0, 9.0])) == 4.0


def test_summary_of_known_token_values() -> None:
    n = 20
    stats = TokenStats(
        kld=np.linspace(0.0, 0.19, n, dtype=np.float32),
        p_diff=np.full(n, 0.1, np.float32),
        nll=np.full(n, math.log(4.0), np.float32),
        nll_base=np.full(n, math.log(2.0), np.float32),
        same_top=np.array([True] * 15 + [False] * 5),
    )
    s = summarize(stats)
    assert s.n_tokens == n
    assert s.kl_mean == pytest.approx(0.095, rel=1e-5)
    assert s.kl_max == pytest.approx(0.19) and s.kl_min == 0.0
    assert s.ppl == pytest.approx(4.0, rel=1e-5)
    assert s.ppl_base == pytest.approx(2.0, rel=1e-5)
    assert s.ppl_ratio == pytest.approx(2.0, rel=1e-5)
    assert s.ln_ppl_ratio == pytest.approx(math.log(2.0), rel=1e-5)
    assert s.top1 == pytest.approx(0.75)
    assert s.top1_unc == pytest.approx(math.sqrt(0.75 * 0.25 / 19))
    assert s.dp_rms == pytest.approx(0.1, rel=1e-5)
    assert s.dp_mean == pytest.approx(0.1, rel=1e-5)


HAS_CC = compiler() is not None


@pytest.fixture(params=["numpy", "C"])
def compaction(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Runs a test on the numpy compaction and on the compiled one (where there is a C compiler)."""
    if request.param == "C" and not HAS_CC:
        pytest.skip("no C compiler: the compaction runs in numpy only")
    monkeypatch.setenv("KVQ_COMPILED", "1" if request.param == "C" else "0")
    assert (compiled_kernels() is not None) == (request.param == "C")
    return str(request.param)


def test_compact_reference_is_exact_when_the_whole_vocabulary_fits(compaction: str) -> None:
    rng = np.random.default_rng(3)
    base = (rng.standard_normal((6, 40)) * 2).astype(np.float32)
    cand = base + (rng.standard_normal((6, 40)) * 0.3).astype(np.float32)
    nxt = rng.integers(0, 40, 6)
    ref = compact_reference(base, nxt, k=40, m=8, rng=rng)
    exact, compact = kl_exact(cand, base, nxt), kl_compact(cand, ref, nxt)
    assert np.allclose(compact.kld, exact.kld, rtol=1e-5, atol=1e-7)
    assert (compact.same_top == exact.same_top).all()
    assert np.allclose(compact.nll_base, exact.nll_base, rtol=1e-6)


def test_compact_reference_tail_estimate_is_unbiased_where_a_lumped_tail_is_not(compaction: str) -> None:
    rng = np.random.default_rng(4)
    n, vocab = 400, 3000
    base = (rng.standard_normal((n, vocab)) * 1.5).astype(np.float32)
    cand = base + (rng.standard_normal((n, vocab)) * 0.5).astype(np.float32)
    nxt = rng.integers(0, vocab, n)
    exact = kl_exact(cand, base, nxt).kld.astype(np.float64).mean()
    estimates = [kl_compact(cand, compact_reference(base, nxt, 32, 16, np.random.default_rng(s)),
                            nxt).kld.astype(np.float64).mean() for s in range(8)]
    # most of this distribution's mass is in the tail (flat logits): a hard case
    standard_error = np.std(estimates, ddof=1) / np.sqrt(len(estimates))
    assert abs(np.mean(estimates) - exact) < max(3 * standard_error, 1e-4)
    assert np.mean(estimates) == pytest.approx(exact, rel=0.02)
    lumped = []  # top-32 exact plus the tail as one bucket: biased low (log-sum inequality)
    for i in range(n):
        lp_b = base[i] - np.log(np.exp(base[i].astype(np.float64)).sum())
        lp_c = cand[i] - np.log(np.exp(cand[i].astype(np.float64)).sum())
        top = np.argsort(-lp_b)[:32]
        rest = np.setdiff1d(np.arange(vocab), top)
        pb, pc = np.exp(lp_b[rest]).sum(), np.exp(lp_c[rest]).sum()
        lumped.append((np.exp(lp_b[top]) * (lp_b[top] - lp_c[top])).sum() + pb * np.log(pb / pc))
    assert np.mean(lumped) < 0.9 * exact


def test_compact_reference_keeps_the_top1_token_exactly(compaction: str) -> None:
    rng = np.random.default_rng(5)
    base = rng.standard_normal((50, 1000)).astype(np.float32)
    ref = compact_reference(base, np.zeros(50, np.int64), 16, 8, rng)
    assert (ref.argmax == base.argmax(axis=1)).all()
    assert (ref.top_ids[:, 0] == base.argmax(axis=1)).all()


def test_order_statistic_bounds_of_percentiles() -> None:
    values = np.sort(np.random.default_rng(0).exponential(size=20000))
    low, high = quantile_bounds(values, 0.99, 1.6448536269514722)
    true_p99 = -math.log(0.01)
    assert low < true_p99 < high
    assert high - low < 0.25
    assert quantile_bounds(values[:100], 0.999, 1.64) == (float(values[98]), math.inf)  # too few for p99.9
