"""Gate bounds that respect how scored tokens depend on each other.

Tokens of one chunk share their context, so they are not independent draws: on real logits
llama.cpp's token-level σ understates the uncertainty by up to 2.3x, and a gate set at the true
value passed up to 42 % of the time instead of 5 % (docs/calibration.md). Here each chunk is one
observation:

* means (kl_mean, dp_mean, ln_ppl_ratio and ppl_ratio, dp_rms through the mean of Δp²): batch
  means over chunks, stratified by category (the overall figure pools categories of different
  length and difficulty); a Student-t quantile on Welch-Satterthwaite degrees of freedom, each
  category's from its chunk count and a kurtosis of at least ``KURTOSIS_FLOOR``; each category's
  variance at least its token-level one times the run's largest design effect; and for the
  right-skewed means the larger of that and a log-normal (Cox) bound;
* top1, a proportion: a Wilson bound at the effective sample size p(1-p)/SE² (the number of
  chunks where that is undefined, e.g. every token agrees), with the same t quantile;
* percentiles and the median: Woodruff's interval, the same chunk-level standard error applied to
  the fraction of tokens below the estimate, turned back into values;
* kl_max: the observed maximum is a lower bound of the true one; nothing bounds it from above.

Fewer than ``MIN_CHUNKS`` chunks in a category of the statistic leave the bound undecided: a gate
on it cannot pass (the chunk-level spread cannot be estimated from fewer).

Longer than our ~350-line limit on purpose: the bound methods (heavy-tail t, log-normal, Wilson,
Woodruff) share the chunk statistics and are chosen among per metric; docs/gates.md explains them as one.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import numpy.typing as npt

from .metrics import TokenStats, percentile

#: one-sided confidence level of every gate bound
LEVEL = 0.95
#: chunks each category of a gated statistic needs before its bound can decide a gate
MIN_CHUNKS = 8
#: kurtosis assumed of chunk means at the least: measured on real logits it reaches 13 (q8_0 KLD on
#: code, one chunk at 3x the mean); normal data would be 3 (docs/calibration.md)
KURTOSIS_FLOOR = 12.0
#: one-sided normal quantiles: the bound's level, and the power asked of "chunks to decide"
Z_LEVEL = 1.6448536269514722
Z_POWER = 1.6448536269514722

F64 = npt.NDArray[np.float64]


@dataclass(frozen=True)
class Stratum:
    """One category's per-token statistics, in chunk order (``rows_per_chunk`` tokens a chunk)."""

    stats: TokenStats
    rows_per_chunk: int

    @property
    def n_chunks(self) -> int:
        return len(self.stats) // self.rows_per_chunk if self.rows_per_chunk > 0 else 0

    def chunk_means(self, values: npt.NDArray[np.float64]) -> F64:
        k, r = self.n_chunks, self.rows_per_chunk
        means: F64 = values[: k * r].reshape(k, r).mean(axis=1)
        return means


@dataclass(frozen=True)
class GateBound:
    """A statistic with its one-sided 95 % bounds, from the chunk-level spread."""

    value: float
    #: standard error behind the bounds (0 where the bound is not from a standard error)
    se: float
    low: float
    high: float
    n_chunks: int
    dof: float
    method: str
    #: why the bound cannot decide a gate (too few chunks), else ""
    undecided: str = ""
    #: fewest chunks in one category of the statistic
    min_chunks: int = 0

    def to_dict(self) -> dict[str, float | int | str | None]:
        d = asdict(self)
        for k in ("low", "high"):  # JSON has no infinity
            d[k] = None if math.isinf(d[k]) else d[k]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, float | int | str | None]) -> GateBound:
        low = -math.inf if d["low"] is None else float(d["low"])  # type: ignore[arg-type]
        high = math.inf if d["high"] is None else float(d["high"])  # type: ignore[arg-type]
        return cls(float(d["value"]), float(d["se"]), low, high, int(d["n_chunks"]),  # type: ignore[arg-type]
                   float(d["dof"]), str(d["method"]), str(d.get("undecided") or ""),  # type: ignore[arg-type]
                   int(d.get("min_chunks") or 0))  # type: ignore[arg-type]


# ------------------------------------------------------------------ Student t, without scipy


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularized incomplete beta function (Lentz's method)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    ln = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(ln) * _betacf(a, b, x) / a
    return 1.0 - math.exp(ln) * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, dof: float) -> float:
    """P(T <= t) for Student's t with ``dof`` (real, > 0) degrees of freedom."""
    tail = 0.5 * _betainc(dof / 2.0, 0.5, dof / (dof + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, dof: float) -> float:
    """The ``p`` quantile of Student's t. dof may be fractional; it is rounded down (to 0.1 below 50,
    to a whole number below 1000, to 1000 above), which only widens an interval, slightly, and lets
    a cache answer repeated calls."""
    dof = math.floor(dof * 10.0) / 10.0 if dof < 50 else float(math.floor(min(dof, 1000.0)))
    return _t_quantile(p, max(dof, 0.1))


@functools.lru_cache(maxsize=4096)
def _t_quantile(p: float, dof: float) -> float:
    lo, hi = -1e3, 1e3
    for _ in range(64):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, dof) < p:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


# ------------------------------------------------------------------ stratified batch means


def heavy_tail_dof(k: int, kurtosis: float) -> float:
    """Degrees of freedom of a variance estimated from ``k`` chunk means of this kurtosis: the
    precision of s² is 2/(k-1) + (κ-3)/k in units of σ⁴, and t's dof are 2 over that (k-1 for
    normal data; far fewer for heavy-tailed chunk KL)."""
    if k < 2:
        return 1.0
    return max(2.0 / (2.0 / (k - 1) + max(kurtosis - 3.0, 0.0) / k), 1.0)


@dataclass(frozen=True)
class _Mean:
    value: float
    se: float
    dof: float
    n_chunks: int
    min_chunks: int
    n_tokens: int


def _stratified_mean(strata: list[Stratum], per_token: Callable[[TokenStats], F64],
                     pool: list[Stratum] | None = None) -> _Mean:
    """Token-weighted mean over strata, its batch-means standard error and Welch-Satterthwaite
    degrees of freedom from heavy-tail-aware per-stratum dof. Each stratum's variance is at least
    its i.i.d. one times the design effect pooled over ``pool`` (all categories of the run): a slice
    that happens to miss a category's rare heavy chunks looks tighter than the category is, and the
    other categories' chunk-to-token variance ratio is the evidence against that."""
    n = [s.n_chunks * s.rows_per_chunk for s in strata]
    total = sum(n)
    values = [per_token(s.stats)[:n_c] for s, n_c in zip(strata, n, strict=True)]
    chunk_means = [s.chunk_means(x) for s, x in zip(strata, values, strict=True)]
    kurtosis = max(KURTOSIS_FLOOR, _pooled_kurtosis(chunk_means))
    deff = _design_effect(pool or strata, per_token)
    value = var = var_iid = ws_denominator = 0.0
    for s, n_c, x, means in zip(strata, n, values, chunk_means, strict=True):
        if n_c == 0:
            continue
        w = n_c / total
        value += w * float(x.mean())
        v_iid = w * w * (float(x.var(ddof=1)) / n_c if n_c > 1 else 0.0)
        var_iid += v_iid
        k = s.n_chunks
        if k >= 2:
            v = max(w * w * float(means.var(ddof=1)) / k, deff * v_iid)
            var += v
            ws_denominator += v * v / heavy_tail_dof(k, kurtosis)
    ks = [s.n_chunks for s in strata]
    dof = var * var / ws_denominator if ws_denominator > 0 else heavy_tail_dof(min(ks, default=1), kurtosis)
    se = math.sqrt(max(var, var_iid))
    return _Mean(value, se, max(dof, 1.0), sum(ks), min(ks) if ks else 0, total)


def _design_effect(pool: list[Stratum], per_token: Callable[[TokenStats], F64]) -> float:
    """The largest over categories of (chunk-level variance of the mean) ÷ (token-level one), at least 1."""
    ratios = []
    for s in pool:
        n_c = s.n_chunks * s.rows_per_chunk
        if s.n_chunks < 2:
            continue
        x = per_token(s.stats)[:n_c]
        iid = float(x.var(ddof=1)) / n_c
        if iid > 0:
            ratios.append(float(s.chunk_means(x).var(ddof=1)) / s.n_chunks / iid)
    return max(max(ratios), 1.0) if ratios else 1.0


def _pooled_kurtosis(chunk_means: list[F64]) -> float:
    """Fourth standardized moment of the chunk means, each stratum centred and scaled by its own."""
    z = [(m - m.mean()) / m.std() for m in chunk_means if m.size >= 2 and m.std() > 0]
    return float(np.mean(np.concatenate(z) ** 4)) if z else 3.0


def _lognormal_upper(stratum: Stratum, per_token: Callable[[TokenStats], F64], dof: float) -> float | None:
    """Upper bound of a positive mean from the log of its chunk means (Cox's method), which widens
    with the skew that the t interval misses; None where a chunk mean is not positive (values at
    zero, or a KL estimate below it: no log-normal shape to read, the t bound stands alone)."""
    means = stratum.chunk_means(per_token(stratum.stats)[: stratum.n_chunks * stratum.rows_per_chunk])
    k = means.size
    if k < 2 or not np.all(means > 0):
        return None
    logs = np.log(means)
    s2 = float(logs.var(ddof=1))
    t = t_quantile(LEVEL, dof)
    return math.exp(float(logs.mean()) + s2 / 2.0 + t * math.sqrt(s2 / k + s2 * s2 / (2.0 * (k - 1))))


def _undecided(strata: list[Stratum]) -> str:
    short = [s for s in strata if s.n_chunks < MIN_CHUNKS]
    if not short:
        return ""
    fewest = min(s.n_chunks for s in short)
    return (f"{fewest} chunk{'s' if fewest != 1 else ''} where a bound needs at least {MIN_CHUNKS} per "
            "category (chunks share their context, so the spread is measured across chunks)")


def _f64(name: str) -> Callable[[TokenStats], F64]:
    return lambda s: np.asarray(getattr(s, name), np.float64)


def _skewed_upper(strata: list[Stratum], per_token: Callable[[TokenStats], F64], m: _Mean) -> float:
    """Upper bound that sees the skew: each stratum's margin from its log-normal bound, the margins
    added with the strata's weights (for one stratum: that stratum's bound). Added, not combined in
    quadrature: a stratum's margin here covers a tail the others' do not offset."""
    total = sum(s.n_chunks * s.rows_per_chunk for s in strata)
    margin = 0.0
    for s in strata:
        n_c = s.n_chunks * s.rows_per_chunk
        if n_c == 0:
            continue
        mean_c = float(per_token(s.stats)[:n_c].mean())
        upper_c = _lognormal_upper(s, per_token, m.dof)
        if upper_c is not None:
            margin += n_c / total * max(upper_c - mean_c, 0.0)
    return m.value + margin


def _mean_bound(strata: list[Stratum], pool: list[Stratum], per_token: Callable[[TokenStats], F64], method: str,
                transform: Callable[[float], float] = lambda x: x, positive: bool = False) -> GateBound:
    m = _stratified_mean(strata, per_token, pool)
    t = t_quantile(LEVEL, m.dof)
    low, high = m.value - t * m.se, m.value + t * m.se
    if positive and m.min_chunks >= 2:  # skewed upward: the log-normal bound as well
        high = max(high, _skewed_upper(strata, per_token, m))
        method += " (t and log-normal)"
    return GateBound(transform(m.value), m.se, transform(low), transform(high), m.n_chunks, m.dof, method,
                     _undecided(strata), m.min_chunks)


def wilson_bounds(p: float, n_eff: float, z: float) -> tuple[float, float]:
    """One-sided Wilson score bounds of a proportion at an effective sample size."""
    z2n = z * z / n_eff
    centre = (p + z2n / 2.0) / (1.0 + z2n)
    half = z / (1.0 + z2n) * math.sqrt(p * (1.0 - p) / n_eff + z * z / (4.0 * n_eff * n_eff))
    return max(centre - half, 0.0), min(centre + half, 1.0)


def _top1_bound(strata: list[Stratum], pool: list[Stratum]) -> GateBound:
    m = _stratified_mean(strata, _f64("same_top"), pool)
    p = m.value
    # effective sample size: what the chunk-level spread says; the chunks alone where it cannot say
    n_eff = p * (1.0 - p) / (m.se * m.se) if m.se > 0 and 0.0 < p < 1.0 else float(m.n_chunks)
    n_eff = max(min(n_eff, float(m.n_tokens)), 1.0)
    t = t_quantile(LEVEL, m.dof)
    low, high = wilson_bounds(p, n_eff, t)
    if m.min_chunks >= 2:  # disagreement is skewed upward: its log-normal bound as well
        disagreement = _stratified_mean(strata, lambda s: 1.0 - np.asarray(s.same_top, np.float64), pool)
        low = min(low, 1.0 - _skewed_upper(strata, lambda s: 1.0 - np.asarray(s.same_top, np.float64),
                                           disagreement))
    return GateBound(p, m.se, max(low, 0.0), high, m.n_chunks, m.dof, f"Wilson at n_eff {n_eff:.0f}",
                     _undecided(strata), m.min_chunks)


def _quantile_bound(strata: list[Stratum], pool: list[Stratum], values: F64, fraction: float) -> GateBound:
    """Woodruff's interval: bound the fraction of tokens at or below the estimate, then read the
    values there (``values``: the strata's KLD, sorted)."""
    if values.size == 0:
        return GateBound(0.0, 0.0, -math.inf, math.inf, 0, 1.0, "Woodruff", _undecided(strata) or "no tokens")
    q = percentile(values, fraction)
    m = _stratified_mean(strata, lambda s: (s.kld <= q).astype(np.float64), pool)
    se = max(m.se, math.sqrt(fraction * (1.0 - fraction) / values.size))
    t = t_quantile(LEVEL, m.dof)
    f_low, f_high = fraction - t * se, fraction + t * se
    low = percentile(values, f_low) if f_low >= 0.0 else -math.inf
    high = percentile(values, f_high) if f_high <= 1.0 else math.inf
    return GateBound(q, se, low, high, m.n_chunks, m.dof, "Woodruff", _undecided(strata), m.min_chunks)


def _max_bound(strata: list[Stratum]) -> GateBound:
    ks = [s.n_chunks for s in strata]
    top = max((float(s.stats.kld.max()) for s in strata if len(s.stats)), default=0.0)
    return GateBound(top, 0.0, top, math.inf, sum(ks), 1.0,
                     "observed maximum: a lower bound; a sample gives no upper bound", _undecided(strata),
                     min(ks) if ks else 0)


QUANTILE_METRICS = {"kl_median": 0.5, "kl_p90": 0.90, "kl_p95": 0.95, "kl_p99": 0.99, "kl_p999": 0.999}


def gate_bounds(strata: list[Stratum], pool: list[Stratum] | None = None) -> dict[str, GateBound]:
    """The one-sided 95 % bounds of every threshold metric over these strata (categories); ``pool``
    is every category of the run, whose design effect floors each one's variance (default: ``strata``)."""
    strata = [s for s in strata if s.n_chunks > 0]
    pool = [s for s in (pool or strata) if s.n_chunks > 0]
    ln_ratio: Callable[[TokenStats], F64] = lambda s: np.asarray(s.nll, np.float64) - s.nll_base  # noqa: E731
    dp2: Callable[[TokenStats], F64] = lambda s: np.asarray(s.p_diff, np.float64) ** 2  # noqa: E731
    out = {
        "kl_mean": _mean_bound(strata, pool, _f64("kld"), "batch means", positive=True),
        "dp_mean": _mean_bound(strata, pool, _f64("p_diff"), "batch means"),
        "ln_ppl_ratio": _mean_bound(strata, pool, ln_ratio, "batch means"),
        "ppl_ratio": _mean_bound(strata, pool, ln_ratio, "batch means of ln ratio", math.exp),
        "dp_rms": _mean_bound(strata, pool, dp2, "batch means of Δp²", lambda x: math.sqrt(max(x, 0.0)),
                              positive=True),
        "top1": _top1_bound(strata, pool),
        "kl_max": _max_bound(strata),
    }
    values = np.sort(np.concatenate([s.stats.kld[: s.n_chunks * s.rows_per_chunk] for s in strata])
                     if strata else np.zeros(0, np.float32))
    for name, fraction in QUANTILE_METRICS.items():
        out[name] = _quantile_bound(strata, pool, values, fraction)
    return out


def chunks_to_decide(bound: GateBound, limit: float, upper: bool) -> int | None:
    """Chunks per category at which the bound (the upper one if ``upper``) would clear ``limit`` with
    95 % probability if the value stays where it is (its half-width shrinks as 1/sqrt(chunks));
    None where more chunks cannot help."""
    gap = abs(bound.value - limit)
    half = (bound.high - bound.value) if upper else (bound.value - bound.low)
    if gap == 0.0 or not 0.0 < half < math.inf or bound.min_chunks <= 0:
        return None
    t = t_quantile(LEVEL, bound.dof)
    return max(math.ceil(bound.min_chunks * (half * (t + Z_POWER) / t / gap) ** 2), MIN_CHUNKS)
