"""Gate verdicts from one-sided 95 % confidence bounds, so a gate does not flip on noise.

``kl_mean < 0.12`` passes when the upper bound of mean KLD is below 0.12, fails when the lower
bound is at or above it, and is *inconclusive* in between; the verdict then says how many chunks
per category would decide it. The bounds come from the spread between chunks, not between tokens
(``uncertainty.py`` says why and how); with too few chunks a gate cannot pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # numpy stays out of the plugin's import (options.py reads the constants below)
    from .metrics import KLSummary
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
    #: chunks per category that would likely decide an inconclusive verdict (None: more would not help)
    chunks_to_decide: int | None = None
    #: how the bounds were made ("batch means", "Wilson at n_eff 412", ...) and their degrees of freedom
    method: str = ""
    n_chunks: int = 0
    #: why the bound could not decide (too few chunks), else ""
    reason: str = ""

    @property
    def passed(self) -> bool:
        return self.outcome is Outcome.PASS


def decide(t: Threshold, summary: KLSummary, mode: str = "bound") -> Decision:
    """Pass, fail or inconclusive for one threshold against one summary."""
    from .uncertainty import MIN_CHUNKS, chunks_to_decide

    if t.metric.startswith("gen_") and t.metric not in summary.generation:
        return Decision(Outcome.INCONCLUSIVE, math.nan, 0.0, -math.inf, math.inf,
                        reason="no generations were run for this result (--kv-gen)")
    value, _ = summary.metric(t.metric)
    bound = summary.bounds.get(t.metric)
    if bound is None:  # a summary without chunk structure (e.g. read from an old document)
        return Decision(Outcome.INCONCLUSIVE, value, 0.0, -math.inf, math.inf,
                        reason="no chunk-level bound was computed for this result")
    if mode == "mean":
        outcome = Outcome.PASS if t.passes(value) else Outcome.FAIL
        return Decision(outcome, value, bound.se, value, value, method="bare mean (--kv-gate mean)",
                        n_chunks=bound.n_chunks)

    def verdict(outcome: Outcome, chunks: int | None = None, reason: str = "") -> Decision:
        return Decision(outcome, value, bound.se, bound.low, bound.high, chunks, bound.method, bound.n_chunks, reason)

    if bound.undecided:  # too few chunks: the value alone may still prove a failure, never a pass
        return verdict(Outcome.INCONCLUSIVE if t.passes(value) else Outcome.FAIL, MIN_CHUNKS, bound.undecided)
    # the bound on the side that must clear the threshold, and the one that proves it cannot
    clears, blocks = (bound.high, bound.low) if not t.higher_is_better else (bound.low, bound.high)
    if t.passes(clears):
        return verdict(Outcome.PASS)
    if not t.passes(blocks):
        return verdict(Outcome.FAIL)
    return verdict(Outcome.INCONCLUSIVE, chunks_to_decide(bound, t.limit, upper=not t.higher_is_better))


def describe(t: Threshold, d: Decision) -> str:
    """One line: the value, its bound and what decided the verdict."""
    side = "upper" if not t.higher_is_better else "lower"
    bound = d.high if not t.higher_is_better else d.low
    text = f"{t.metric} = {d.value:.6g}"
    if d.uncertainty > 0:
        text += f" ± {d.uncertainty:.2g}"
    if d.low != d.high and not math.isinf(bound):
        text += f" (95 % {side} bound {bound:.6g}; {d.method}, {d.n_chunks} chunks)"
    if d.outcome is Outcome.PASS:
        return f"{text} meets {t.op} {t.limit:g}"
    if d.outcome is Outcome.FAIL:
        return f"{text}: threshold {t.op} {t.limit:g} not met"
    if d.reason:
        more = d.reason + (f"; run at least {d.chunks_to_decide} chunks per category (--kv-chunks)"
                           if d.chunks_to_decide else "")
        return f"{text}: inconclusive against {t.op} {t.limit:g}: {more}"
    if d.chunks_to_decide:
        more = f"about {d.chunks_to_decide:,} chunks per category would decide it"
    elif t.metric == "kl_max":
        more = "a sample gives no upper bound for the maximum; gate a percentile (kl_p999) or use --kv-gate mean"
    elif math.isinf(bound):
        more = "too few tokens to bound this percentile at 95 %; score more chunks"
    else:
        more = "the value sits on the threshold; more chunks will not decide it"
    return f"{text}: inconclusive against {t.op} {t.limit:g} (the 95 % bounds straddle it); {more}"
