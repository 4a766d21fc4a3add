"""Gate verdicts from one-sided 95 % confidence bounds, so a gate does not flip on noise.

``kl_mean < 0.12`` passes when the upper bound of mean KLD is below 0.12, fails when the lower
bound is at or above it, and is *inconclusive* in between; the verdict then says about how many
scored tokens would decide it (the bound's half-width shrinks as 1/sqrt(n)).

Bounds: mean ± z·σ with llama.cpp's standard errors for means and rates (kl_mean, top1, dp_rms,
ppl_ratio, ...); distribution-free order-statistic bounds for medians and percentiles; none for
kl_max (it is a property of this corpus, not an estimate).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

from .metrics import Z_95, KLSummary
from .thresholds import Threshold

GATE_MODES = ("bound", "mean")
INCONCLUSIVE_POLICIES = ("fail", "warn", "pass")


class Outcome(str, Enum):
    PASS = "pass"
    FAIL = "fail"
    INCONCLUSIVE = "inconclusive"


@dataclass(frozen=True)
class Decision:
    """A threshold's verdict with the numbers behind it."""

    outcome: Outcome
    value: float
    uncertainty: float
    low: float
    high: float
    #: scored tokens that would likely decide an inconclusive verdict (None: more would not help)
    tokens_to_decide: int | None = None

    @property
    def passed(self) -> bool:
        return self.outcome is Outcome.PASS


def bounds(summary: KLSummary, metric: str, z: float = Z_95) -> tuple[float, float, float, float]:
    """(value, uncertainty, low, high) of a metric: the one-sided bounds at level ``z``."""
    value, unc = summary.metric(metric)
    order = summary.order_bounds.get(metric)
    if order is not None:
        return value, unc, order[0], order[1]
    return value, unc, value - z * unc, value + z * unc


def decide(t: Threshold, summary: KLSummary, mode: str = "bound") -> Decision:
    """Pass, fail or inconclusive for one threshold against one summary."""
    value, unc, low, high = bounds(summary, t.metric)
    if mode == "mean" or (low == high == value):
        return Decision(Outcome.PASS if t.passes(value) else Outcome.FAIL, value, unc, value, value)
    # the bound on the side that must clear the threshold, and the one that proves it cannot
    clears, blocks = (high, low) if not t.higher_is_better else (low, high)
    if t.passes(clears):
        return Decision(Outcome.PASS, value, unc, low, high)
    if not t.passes(blocks):
        return Decision(Outcome.FAIL, value, unc, low, high)
    return Decision(Outcome.INCONCLUSIVE, value, unc, low, high,
                    tokens_to_decide(value, low, high, t.limit, summary.n_tokens))


def tokens_to_decide(value: float, low: float, high: float, limit: float, n_tokens: int) -> int | None:
    """Tokens at which the bound's half-width (∝ 1/sqrt(n)) would no longer reach the threshold."""
    gap = abs(value - limit)
    half_width = max(high - value, value - low)
    if gap == 0.0 or half_width <= 0.0 or n_tokens <= 0 or math.isinf(half_width):
        return None
    return math.ceil(n_tokens * (half_width / gap) ** 2)


def describe(t: Threshold, d: Decision) -> str:
    """One line: the value, its bound and what decided the verdict."""
    side = "upper" if not t.higher_is_better else "lower"
    bound = d.high if not t.higher_is_better else d.low
    text = f"{t.metric} = {d.value:.6g} ± {d.uncertainty:.2g}"
    if d.low != d.high:
        text += f" (95 % {side} bound {bound:.6g})"
    if d.outcome is Outcome.PASS:
        return f"{text} meets {t.op} {t.limit:g}"
    if d.outcome is Outcome.FAIL:
        return f"{text}: threshold {t.op} {t.limit:g} not met"
    if d.tokens_to_decide:
        more = f"about {d.tokens_to_decide:,} scored tokens would decide it"
    elif math.isinf(d.low) or math.isinf(d.high):
        more = "too few tokens to bound this percentile at 95 %; score more tokens"
    else:
        more = "the value sits on the threshold; more tokens will not decide it"
    return f"{text}: inconclusive against {t.op} {t.limit:g} (the 95 % bounds straddle it); {more}"
