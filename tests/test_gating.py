"""Verdicts (gating.py) from the chunk-level bounds a summary carries: pass, fail, inconclusive."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from pytest_kvquality.cache_config import CacheConfig
from pytest_kvquality.gating import Outcome, decide, describe
from pytest_kvquality.metrics import KLSummary
from pytest_kvquality.thresholds import Threshold
from pytest_kvquality.uncertainty import MIN_CHUNKS, GateBound, t_quantile


def gate(rule: str, metric: str = "kl_mean") -> Threshold:
    op, limit = rule.split()
    return Threshold(Path("t.yaml"), 1, "m", CacheConfig.parse("q4_0"), "overall", metric, op, float(limit))


def summary(kl_mean: float, se: float, chunks: int = 32, top1: float = 0.9, top1_se: float = 0.01) -> KLSummary:
    """A summary whose bounds are mean ± t(31)·se, as batch means over 32 chunks would give."""
    t = t_quantile(0.95, chunks - 1)
    undecided = "too few chunks" if chunks < MIN_CHUNKS else ""

    def bound(value: float, s: float) -> GateBound:
        return GateBound(value, s, value - t * s, value + t * s, chunks, chunks - 1.0, "batch means", undecided,
                         chunks)

    return KLSummary(n_tokens=chunks * 255, kl_mean=kl_mean, kl_mean_unc=se / 2, top1=top1, top1_unc=top1_se / 2,
                     bounds={"kl_mean": bound(kl_mean, se), "top1": bound(top1, top1_se)})


T31 = t_quantile(0.95, 31)  # 1.6955


@pytest.mark.parametrize(("rule", "kl_mean", "outcome"), [
    ("< 0.12", 0.100, Outcome.PASS),          # upper bound 0.100 + 1.6955 * 0.005 = 0.1085 < 0.12
    ("< 0.12", 0.118, Outcome.INCONCLUSIVE),  # 0.118 < 0.12 but its upper bound 0.1265 is not
    ("< 0.12", 0.122, Outcome.INCONCLUSIVE),  # 0.122 >= 0.12 but its lower bound 0.1135 is not
    ("< 0.12", 0.140, Outcome.FAIL),          # lower bound 0.1315 >= 0.12
    ("<= 0.12", 0.1115, Outcome.PASS),        # upper bound 0.11998 <= 0.12
])
def test_upper_limit_gates_use_the_one_sided_95_percent_bound(rule: str, kl_mean: float, outcome: Outcome) -> None:
    assert decide(gate(rule), summary(kl_mean, 0.005)).outcome is outcome


@pytest.mark.parametrize(("top1", "outcome"), [(0.95, Outcome.PASS), (0.905, Outcome.INCONCLUSIVE),
                                                (0.85, Outcome.FAIL)])
def test_lower_limit_gates_use_the_lower_bound(top1: float, outcome: Outcome) -> None:
    assert decide(gate("> 0.9", "top1"), summary(0.1, 0.01, top1=top1)).outcome is outcome


def test_the_gate_reads_the_chunk_bound_not_llama_cpp_sigma() -> None:
    """kl_mean_unc (token-level, half the chunk σ here) would pass this gate; the chunk bound does not."""
    s = summary(0.118, 0.004)
    assert s.kl_mean + 1.645 * s.kl_mean_unc < 0.122
    assert decide(gate("< 0.122"), s).outcome is Outcome.INCONCLUSIVE


def test_mean_mode_compares_the_bare_value() -> None:
    assert decide(gate("< 0.12"), summary(0.118, 0.005), mode="mean").outcome is Outcome.PASS
    assert decide(gate("< 0.12"), summary(0.122, 0.005), mode="mean").outcome is Outcome.FAIL


def test_too_few_chunks_cannot_pass_but_can_fail() -> None:
    few = summary(0.01, 0.0, chunks=4)  # σ = 0 must not turn the bound into a bare mean
    d = decide(gate("< 0.5"), few)
    assert d.outcome is Outcome.INCONCLUSIVE and d.chunks_to_decide == MIN_CHUNKS
    assert f"run at least {MIN_CHUNKS} chunks per category (--kv-chunks)" in describe(gate("< 0.5"), d)
    assert decide(gate("< 0.005"), few).outcome is Outcome.FAIL  # the value itself is over the limit


def test_an_inconclusive_verdict_says_how_many_chunks_would_decide_it() -> None:
    d = decide(gate("< 0.12"), summary(0.118, 0.005))
    # half-width t·se must shrink below the 0.002 gap with 95 % power: 32 · ((t + 1.645)·se / gap)²
    assert d.chunks_to_decide == math.ceil(32 * ((T31 + 1.6448536269514722) * 0.005 / 0.002) ** 2)
    assert f"about {d.chunks_to_decide:,} chunks per category would decide it" in describe(gate("< 0.12"), d)
    on_it = decide(gate("< 0.118"), summary(0.118, 0.005))
    assert on_it.chunks_to_decide is None and "more chunks will not decide it" in describe(gate("< 0.118"), on_it)


def test_a_result_without_chunk_bounds_is_inconclusive() -> None:
    d = decide(gate("< 9"), KLSummary(n_tokens=100, kl_mean=0.1))
    assert d.outcome is Outcome.INCONCLUSIVE and "no chunk-level bound" in d.reason


def test_kl_max_can_fail_but_never_pass_on_a_bound() -> None:
    b = GateBound(0.5, 0.0, 0.5, math.inf, 32, 1.0, "observed maximum", "", 32)
    s = KLSummary(n_tokens=100, kl_max=0.5, bounds={"kl_max": b})
    assert decide(gate("< 0.4", "kl_max"), s).outcome is Outcome.FAIL
    d = decide(gate("< 0.6", "kl_max"), s)
    assert d.outcome is Outcome.INCONCLUSIVE
    assert "a sample gives no upper bound for the maximum" in describe(gate("< 0.6", "kl_max"), d)
    assert decide(gate("< 0.6", "kl_max"), s, mode="mean").outcome is Outcome.PASS


def test_a_generation_gate_on_a_result_without_generations_is_inconclusive_not_a_crash() -> None:
    """A baseline or merged document from a run without --kv-gen: nothing to read, nothing passes."""
    d = decide(gate("> 0.5", "gen_identical"), summary(0.1, 0.005))
    assert d.outcome is Outcome.INCONCLUSIVE and "no generations were run" in d.reason
