"""KL-divergence statistics with the exact definitions of ``llama-perplexity --kl-divergence``.

No model: every function here is testable on hand-made logits. Each row's argmax and
log-normalizer, the one pass over the vocabulary, is ``normalizer.py`` (compiled where a compiler
is found, numpy otherwise, the same bits); how a reference is compressed (top k plus tail samples)
is ``compaction.py``.

The per-token reduction mirrors ``log_softmax(...)`` in llama.cpp's
``tools/perplexity/perplexity.cpp`` and the summary mirrors the end of its
``kl_divergence(...)``: the same cutoff (base log-probabilities at or below -16
are left out of the KL sum), the same uncertainties, the same percentile rule.

Longer than our ~350-line limit on purpose: every definition taken from ``perplexity.cpp`` is in
this one file, to be read side by side with it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from .normalizer import ROW_BLOCK, log_normalizer, normalize_rows

if TYPE_CHECKING:
    from .uncertainty import GateBound

#: llama.cpp skips reference tokens whose log-probability is at or below this.
LOG_P_CUTOFF = np.float32(-16.0)

#: Log-probability written where a compact reference has fewer tokens than slots.
PAD_LOGP = np.float32(-100.0)

#: One-sided 95 % normal quantile, P(Z > z) = 0.05: the level of every gate bound.
Z_95 = 1.6448536269514722

F32 = npt.NDArray[np.float32]
I32 = npt.NDArray[np.int32]


@dataclass
class TokenStats:
    """Per scored token values, the raw material of every statistic."""

    kld: F32
    p_diff: F32
    nll: F32
    nll_base: F32
    same_top: npt.NDArray[np.bool_]

    @classmethod
    def empty(cls) -> TokenStats:
        z = np.zeros(0, np.float32)
        return cls(z, z.copy(), z.copy(), z.copy(), np.zeros(0, bool))

    @classmethod
    def concat(cls, parts: list[TokenStats]) -> TokenStats:
        if not parts:
            return cls.empty()
        return cls(
            *(np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(cls))
        )

    def __len__(self) -> int:
        return int(self.kld.shape[0])

    def arrays(self) -> dict[str, np.ndarray]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class ReferenceRows:
    """A compact reference distribution for each scored position.

    ``top_*`` hold the ``k`` most likely tokens exactly; the rest of the
    distribution above the cutoff (the tail, total mass ``tail_mass``) is
    represented by ``m`` tokens drawn in proportion to their probability
    (systematic sampling), which makes the tail term of the KL sum an unbiased
    estimate instead of the biased-low lumped bucket. (A control-variate form,
    (P-Q) + sum p (r - 1 - log r), was tried: its heavy right tail where the
    candidate promotes unlikely tokens made it read low on real models.)
    """

    argmax: I32
    next_logp: F32
    top_ids: I32
    top_logp: F32
    tail_ids: I32
    tail_logp: F32
    tail_mass: npt.NDArray[np.float64]

    def __len__(self) -> int:
        return int(self.argmax.shape[0])

    def arrays(self) -> dict[str, np.ndarray]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> ReferenceRows:
        return cls(**{f.name: arrays[f.name] for f in fields(cls)})

    def differences(self, other: ReferenceRows) -> list[str]:
        """Names of the arrays whose dtype, shape or any bit differs from ``other``'s."""
        return [name for name, mine in self.arrays().items()
                if mine.dtype != getattr(other, name).dtype or not np.array_equal(mine, getattr(other, name))]

    def slice(self, start: int, stop: int) -> ReferenceRows:
        return ReferenceRows(*(getattr(self, f.name)[start:stop] for f in fields(self)))

    @classmethod
    def concat(cls, parts: list[ReferenceRows]) -> ReferenceRows:
        return cls(
            *(np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(cls))
        )


def base_next_logp(base_logits: F32, imax: I32, norm: F32, next_tokens: npt.NDArray[Any]) -> F32:
    """Reference log-probability of the actual next token, floored as llama.cpp stores it.

    llama.cpp keeps reference log-probabilities as uint16 over
    ``[max(min_logit, max_logit - 16), max_logit]``; anything below reads back
    as the floor. PPL(base), the PPL ratio and Δp use that floored value. The row minimum
    never decides it (it is at most the next token's logit), so no pass over the row is needed.
    """
    rows = np.arange(base_logits.shape[0])
    logit = base_logits[rows, next_tokens]
    floor = base_logits[rows, imax] + LOG_P_CUTOFF
    out: F32 = (np.maximum(logit, floor) - norm).astype(np.float32)
    return out


def _token_terms(
    next_logit: F32, imax: I32, norm: F32, nll_base: F32, ref_argmax: I32
) -> tuple[F32, F32, npt.NDArray[np.bool_]]:
    nll = (norm - next_logit).astype(np.float32)
    p_diff = (np.exp(-nll) - np.exp(-nll_base)).astype(np.float32)
    return nll, p_diff, imax == ref_argmax


def kl_exact(cand_logits: F32, base_logits: F32, next_tokens: I32) -> TokenStats:
    """Per-token statistics from full candidate and reference logits (no compression)."""
    imax, norm = log_normalizer(cand_logits)
    bmax, bnorm = log_normalizer(base_logits)
    n = cand_logits.shape[0]
    kld = np.empty(n, np.float32)
    for s in range(0, n, ROW_BLOCK):
        e = min(s + ROW_BLOCK, n)
        base_logp = base_logits[s:e] - bnorm[s:e, None]
        cand_logp = cand_logits[s:e] - norm[s:e, None]
        keep = base_logp > LOG_P_CUTOFF
        p = np.where(keep, np.exp(base_logp), np.float32(0))
        kld[s:e] = np.einsum("ij,ij->i", p.astype(np.float64), (base_logp - cand_logp))
    nll_base = -base_next_logp(base_logits, bmax, bnorm, next_tokens)
    next_logit = cand_logits[np.arange(n), next_tokens]
    nll, p_diff, same = _token_terms(next_logit, imax, norm, nll_base, bmax)
    return TokenStats(kld, p_diff, nll, nll_base, same)


def compact_ids(ref: ReferenceRows, next_tokens: npt.NDArray[Any]) -> I32:
    """What ``kl_compact`` reads from each candidate row: the reference's top and tail tokens, then
    the next token ([rows, top_k + tail_samples + 1])."""
    out: I32 = np.concatenate([ref.top_ids, ref.tail_ids, np.asarray(next_tokens, np.int32)[:, None]], axis=1)
    return out


def kl_compact(cand_logits: F32, ref: ReferenceRows, next_tokens: npt.NDArray[Any]) -> TokenStats:
    """Per-token statistics against a compact reference: one pass over each row's vocabulary
    (argmax, log-sum-exp and the gathers of ``compact_ids``, compiled where a compiler is found),
    then a few vector operations on the gathered values (``kl_gathered``)."""
    rows = normalize_rows(cand_logits, compact_ids(ref, next_tokens))
    return kl_gathered(rows.imax, rows.norm, rows.gathered, ref)


def kl_reduced(reduced: F32, ref: ReferenceRows) -> TokenStats:
    """``kl_compact`` from rows reduced where the logits were (``engine/device_reduction``): each row
    argmax (as float), log-normalizer, then the logits at ``compact_ids``."""
    norm = reduced[:, 1]
    norm = np.where(np.isfinite(norm), norm, np.float32(np.nan)).astype(np.float32)
    return kl_gathered(reduced[:, 0].astype(np.int32), norm, np.ascontiguousarray(reduced[:, 2:]), ref)


def kl_gathered(imax: I32, norm: F32, gathered: F32, ref: ReferenceRows) -> TokenStats:
    """KL = the top tokens' terms (exact) + tail mass x the mean of log(p/q) over the tail
    samples (drawn in proportion to p, so an unbiased estimate of the tail's terms)."""
    k, m = ref.top_ids.shape[1], ref.tail_ids.shape[1]
    top_logp = ref.top_logp.astype(np.float64)
    cand_top = (gathered[:, :k] - norm[:, None]).astype(np.float64)
    p_top = np.where(ref.top_logp > LOG_P_CUTOFF, np.exp(top_logp), 0.0)
    kld = (p_top * (top_logp - cand_top)).sum(axis=1)
    if m:
        cand_tail = (gathered[:, k : k + m] - norm[:, None]).astype(np.float64)
        kld += ref.tail_mass * (ref.tail_logp - cand_tail).mean(axis=1)
    nll_base = (-ref.next_logp).astype(np.float32)
    nll, p_diff, same = _token_terms(gathered[:, -1], imax, norm, nll_base, ref.argmax)
    return TokenStats(kld.astype(np.float32), p_diff, nll, nll_base, same)


def mean_and_uncertainty(total: float, total2: float, count: int) -> tuple[float, float]:
    """llama.cpp's mean and standard error of the mean (0 below 11 values)."""
    if count < 1:
        return 0.0, 0.0
    total, total2 = float(total), float(total2)
    f = total / count
    df = total2 / count - f * f
    return f, (math.sqrt(df / (count - 1)) if df > 0 and count > 10 else 0.0)


def covariance(suma: float, sumb: float, sumab: float, count: int) -> float:
    """llama.cpp's covariance of the two means (0 below 10 values)."""
    if count < 10:
        return 0.0
    suma, sumb, sumab = float(suma), float(sumb), float(sumab)
    return (sumab / count - (suma / count) * (sumb / count)) / (count - 1)


def percentile(sorted_values: np.ndarray, fraction: float) -> float:
    """llama.cpp's percentile: linear interpolation at ``fraction * (n - 1)``."""
    if fraction <= 0:
        return float(sorted_values[0])
    if fraction >= 1:
        return float(sorted_values[-1])
    p = fraction * (sorted_values.size - 1)
    ip = int(p)
    p -= ip
    hi = min(ip + 1, sorted_values.size - 1)
    return float((1 - p) * sorted_values[ip] + p * sorted_values[hi])


def quantile_bounds(sorted_values: np.ndarray, fraction: float, z: float) -> tuple[float, float]:
    """One-sided order-statistic bounds of a quantile (normal approximation to the binomial).

    Distribution-free: the true quantile lies below the upper bound with probability ~Φ(z).
    Where the rank needed is beyond the data (too few tokens for that tail), the bound is infinite.
    """
    n = sorted_values.size
    spread = z * math.sqrt(n * fraction * (1.0 - fraction))
    hi_rank = math.ceil(n * fraction + spread)
    lo_rank = math.floor(n * fraction - spread)
    high = float(sorted_values[hi_rank - 1]) if 1 <= hi_rank <= n else math.inf
    low = float(sorted_values[lo_rank - 1]) if 1 <= lo_rank <= n else -math.inf
    return low, high


def median(sorted_values: np.ndarray) -> float:
    n = sorted_values.size
    if n % 2 == 0:
        return float(0.5 * (sorted_values[n // 2] + sorted_values[n // 2 - 1]))
    return float(sorted_values[n // 2])


KL_PERCENTILES = {"p999": 0.999, "p99": 0.99, "p95": 0.95, "p90": 0.90,
                  "p10": 0.10, "p5": 0.05, "p1": 0.01, "p01": 0.001}
DP_PERCENTILES = {"p999": 0.999, "p99": 0.99, "p95": 0.95, "p90": 0.90, "p75": 0.75,
                  "p25": 0.25, "p10": 0.10, "p5": 0.05, "p1": 0.01, "p01": 0.001}


@dataclass
class KLSummary:
    """Everything ``llama-perplexity --kl-divergence`` prints, as numbers."""

    n_tokens: int
    ppl: float = 0.0
    ppl_unc: float = 0.0
    ppl_base: float = 0.0
    ppl_base_unc: float = 0.0
    ln_ppl_cor: float = 0.0
    ln_ppl_ratio: float = 0.0
    ln_ppl_ratio_unc: float = 0.0
    ppl_ratio: float = 0.0
    ppl_ratio_unc: float = 0.0
    ppl_diff: float = 0.0
    ppl_diff_unc: float = 0.0
    kl_mean: float = 0.0
    kl_mean_unc: float = 0.0
    kl_max: float = 0.0
    kl_median: float = 0.0
    kl_min: float = 0.0
    kl_percentiles: dict[str, float] = field(default_factory=dict)
    dp_mean: float = 0.0
    dp_mean_unc: float = 0.0
    dp_max: float = 0.0
    dp_median: float = 0.0
    dp_min: float = 0.0
    dp_percentiles: dict[str, float] = field(default_factory=dict)
    dp_rms: float = 0.0
    dp_rms_unc: float = 0.0
    top1: float = 0.0
    top1_unc: float = 0.0
    #: one-sided 95 % order-statistic bounds (low, high) of the median and percentiles of KLD,
    #: treating tokens as independent (shown; gates read ``bounds``)
    order_bounds: dict[str, tuple[float, float]] = field(default_factory=dict)
    #: what gates read: each threshold metric's bounds from the chunk-level spread (uncertainty.py)
    bounds: dict[str, GateBound] = field(default_factory=dict)
    #: generation divergence (``generation.GEN_METRICS``), when generations were run
    generation: dict[str, float] = field(default_factory=dict)

    @property
    def kl_p99(self) -> float:
        return self.kl_percentiles.get("p99", 0.0)

    def metric(self, name: str) -> tuple[float, float]:
        """Value and uncertainty of a threshold metric (uncertainty 0 where llama.cpp gives none)."""
        table: dict[str, tuple[float, float]] = {
            "kl_mean": (self.kl_mean, self.kl_mean_unc),
            "kl_median": (self.kl_median, 0.0),
            "kl_max": (self.kl_max, 0.0),
            "top1": (self.top1, self.top1_unc),
            "dp_rms": (self.dp_rms, self.dp_rms_unc),
            "dp_mean": (self.dp_mean, self.dp_mean_unc),
            "ppl_ratio": (self.ppl_ratio, self.ppl_ratio_unc),
            "ln_ppl_ratio": (self.ln_ppl_ratio, self.ln_ppl_ratio_unc),
        }
        for key, _frac in KL_PERCENTILES.items():
            table["kl_" + key] = (self.kl_percentiles.get(key, 0.0), 0.0)
        for key, value in self.generation.items():
            table[key] = (value, 0.0)
        if name not in table:
            raise KeyError(name)
        return table[name]

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        # JSON has no infinity: an unknown bound (too few tokens for that percentile) is null
        out["order_bounds"] = {k: [None if math.isinf(x) else x for x in v] for k, v in self.order_bounds.items()}
        out["bounds"] = {k: b.to_dict() for k, b in self.bounds.items()}
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> KLSummary:
        from .uncertainty import GateBound

        s = cls(**{f.name: data[f.name] for f in fields(cls)
                   if f.name in data and f.name not in ("order_bounds", "bounds")})
        s.order_bounds = {k: (-math.inf if lo is None else lo, math.inf if hi is None else hi)
                          for k, (lo, hi) in data.get("order_bounds", {}).items()}
        s.bounds = {k: GateBound.from_dict(b) for k, b in data.get("bounds", {}).items()}
        return s


#: Metric names a threshold may use.
THRESHOLD_METRICS = (
    "kl_mean", "kl_median", "kl_max", "kl_p999", "kl_p99", "kl_p95", "kl_p90",
    "top1", "dp_rms", "dp_mean", "ppl_ratio", "ln_ppl_ratio",
    # generation divergence (generation.py), measured when a threshold names one or --kv-gen is set
    "gen_first_divergence_median", "gen_identical", "gen_prefix_agree", "gen_kl_at_divergence",
)


def summarize(stats: TokenStats) -> KLSummary:
    """Reduce per-token values to llama.cpp's summary statistics."""
    n = len(stats)
    s = KLSummary(n_tokens=n)
    if n == 0:
        return s
    nll = stats.nll.astype(np.float64)
    nll_base = stats.nll_base.astype(np.float64)
    kld = stats.kld.astype(np.float64)
    p_diff = stats.p_diff.astype(np.float64)

    log_ppl, log_ppl_unc = mean_and_uncertainty(nll.sum(), (nll * nll).sum(), n)
    s.ppl = math.exp(log_ppl)
    s.ppl_unc = s.ppl * log_ppl_unc
    log_base, log_base_unc = mean_and_uncertainty(nll_base.sum(), (nll_base * nll_base).sum(), n)
    s.ppl_base = math.exp(log_base)
    s.ppl_base_unc = s.ppl_base * log_base_unc
    cov = covariance(nll.sum(), nll_base.sum(), (nll * nll_base).sum(), n)
    denom = log_ppl_unc * log_base_unc
    s.ln_ppl_cor = cov / denom if denom > 0 else 0.0
    s.ln_ppl_ratio = log_ppl - log_base
    s.ln_ppl_ratio_unc = math.sqrt(max(log_ppl_unc**2 + log_base_unc**2 - 2.0 * cov, 0.0))
    s.ppl_ratio = math.exp(s.ln_ppl_ratio)
    s.ppl_ratio_unc = s.ppl_ratio * s.ln_ppl_ratio_unc
    ppl_cov = s.ppl * s.ppl_base * cov
    s.ppl_diff = s.ppl - s.ppl_base
    s.ppl_diff_unc = math.sqrt(max(s.ppl_unc**2 + s.ppl_base_unc**2 - 2.0 * ppl_cov, 0.0))

    s.kl_mean, s.kl_mean_unc = mean_and_uncertainty(kld.sum(), (kld * kld).sum(), n)
    ks = np.sort(stats.kld)
    s.kl_max, s.kl_min, s.kl_median = float(ks[-1]), float(ks[0]), median(ks)
    s.kl_percentiles = {k: percentile(ks, f) for k, f in KL_PERCENTILES.items()}
    s.order_bounds = {"kl_" + k: quantile_bounds(ks, f, Z_95) for k, f in KL_PERCENTILES.items()}
    s.order_bounds["kl_median"] = quantile_bounds(ks, 0.5, Z_95)

    p_diff2 = p_diff * p_diff
    s.dp_mean, s.dp_mean_unc = mean_and_uncertainty(p_diff.sum(), p_diff2.sum(), n)
    ds = np.sort(stats.p_diff)
    s.dp_max, s.dp_min, s.dp_median = float(ds[-1]), float(ds[0]), median(ds)
    s.dp_percentiles = {k: percentile(ds, f) for k, f in DP_PERCENTILES.items()}
    mse, mse_unc = mean_and_uncertainty(p_diff2.sum(), (p_diff2 * p_diff2).sum(), n)
    s.dp_rms = math.sqrt(mse)
    s.dp_rms_unc = 0.5 / s.dp_rms * mse_unc if s.dp_rms > 0 else 0.0

    same = int(stats.same_top.sum())
    s.top1 = same / n
    s.top1_unc = math.sqrt(s.top1 * (1.0 - s.top1) / (n - 1)) if n > 1 else 0.0
    return s
