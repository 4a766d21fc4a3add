"""Does a "95 %" gate bound hold 95 %? The resampling check behind docs/calibration.md.

Each category's chunks are the population. A round draws ``k`` chunks per category with
replacement, so the truth is known exactly (the population's value), computes the gate bounds the
way a gate does (``uncertainty.gate_bounds``, the shipping code), and records whether a gate set at
the truth would pass. A correct one-sided 95 % bound lets such a gate pass at most ~5 % of the
time. llama.cpp's token-level bound (mean ± 1.645 σ, order-statistic bounds for percentiles) is
computed on the same draws for comparison.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .markdown import markdown_table
from .metrics import TokenStats, mean_and_uncertainty, percentile, quantile_bounds
from .thresholds import OVERALL
from .uncertainty import MIN_CHUNKS, QUANTILE_METRICS, Z_LEVEL, Stratum, gate_bounds

#: metrics checked, and whether a gate on them wants the value high (top1) or low (the rest)
CHECKED = {"kl_mean": False, "top1": True, "dp_rms": False, "ln_ppl_ratio": False,
           "kl_median": False, "kl_p99": False}


@dataclass
class CalibrationData:
    """Per-token statistics of one or more cache configs, per category, in chunk order."""

    rows_per_chunk: int
    configs: dict[str, dict[str, TokenStats]] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> CalibrationData:
        """An .npz written by ``benchmarks/calibration.py collect``."""
        with np.load(path) as z:
            data = cls(int(z["rows_per_chunk"]))
            parts: dict[tuple[str, str], dict[str, np.ndarray]] = {}
            for key in z.files:
                if key.count("|") == 2:
                    cfg, cat, name = key.split("|")
                    parts.setdefault((cfg, cat), {})[name] = z[key]
        for (cfg, cat), arrays in sorted(parts.items()):
            data.configs.setdefault(cfg, {})[cat] = TokenStats(**arrays)
        return data


@dataclass(frozen=True)
class Rate:
    """False-pass rates of gates set at the truth, over ``rounds`` resampled slices."""

    config: str
    scope: str
    metric: str
    chunks: int
    rounds: int
    false_pass_token_sigma: float
    false_pass_chunk_bound: float
    #: median over rounds of (chunk-level standard error) / (token-level standard error), means only
    se_ratio: float

    @property
    def simulation_error(self) -> float:
        return math.sqrt(0.05 * 0.95 / self.rounds)


def _truth(cats: dict[str, TokenStats], metric: str) -> float:
    """The population value under the resampling design (equal chunks per category)."""
    if metric in QUANTILE_METRICS:
        (stats,) = cats.values()
        return percentile(np.sort(stats.kld), QUANTILE_METRICS[metric])
    per_cat: dict[str, Callable[[TokenStats], float]] = {
        "kl_mean": lambda s: float(np.mean(s.kld, dtype=np.float64)),
        "top1": lambda s: float(np.mean(s.same_top)),
        "dp_rms": lambda s: float(np.mean(np.asarray(s.p_diff, np.float64) ** 2)),
        "ln_ppl_ratio": lambda s: float(np.mean(np.asarray(s.nll, np.float64) - s.nll_base))}
    value = float(np.mean([per_cat[metric](s) for s in cats.values()]))
    return math.sqrt(value) if metric == "dp_rms" else value


def _token_sigma_bounds(stats: TokenStats, metric: str) -> tuple[float, float, float]:
    """(low, high, se) as llama.cpp's token-level σ gives them."""
    n = len(stats)
    if metric in QUANTILE_METRICS:
        low, high = quantile_bounds(np.sort(stats.kld), QUANTILE_METRICS[metric], Z_LEVEL)
        return low, high, 0.0
    if metric == "top1":
        p = float(np.mean(stats.same_top))
        se = math.sqrt(p * (1 - p) / (n - 1))
        return p - Z_LEVEL * se, p + Z_LEVEL * se, se
    x = {"kl_mean": np.asarray(stats.kld, np.float64),
         "dp_rms": np.asarray(stats.p_diff, np.float64) ** 2,
         "ln_ppl_ratio": np.asarray(stats.nll, np.float64) - stats.nll_base}[metric]
    mean, se = mean_and_uncertainty(x.sum(), (x * x).sum(), n)
    if metric == "dp_rms":  # llama.cpp's delta method; the se returned is that of the mean of Δp²
        rms = math.sqrt(mean)
        se_rms = 0.5 / rms * se if rms > 0 else 0.0
        return rms - Z_LEVEL * se_rms, rms + Z_LEVEL * se_rms, se
    return mean - Z_LEVEL * se, mean + Z_LEVEL * se, se


def _draw(stats: TokenStats, rows: int, picks: np.ndarray) -> TokenStats:
    idx = (picks[:, None] * rows + np.arange(rows)[None, :]).ravel()
    return TokenStats(*(a[idx] for a in stats.arrays().values()))


def false_pass_rates(cats: dict[str, TokenStats], rows: int, k: int, rounds: int, seed: int,
                     config: str = "", scopes: list[str] | None = None) -> list[Rate]:
    """False-pass rates per scope (each category, and ``overall`` over all of them) and metric."""
    rng = np.random.default_rng(seed)
    populations = {c: len(s) // rows for c, s in cats.items()}
    scopes = scopes or [*cats, OVERALL]
    truths = {(scope, m): _truth(cats if scope == OVERALL else {scope: cats[scope]}, m)
              for scope in scopes for m in CHECKED if not (scope == OVERALL and m in QUANTILE_METRICS)}
    passes_old = dict.fromkeys(truths, 0)
    passes_new = dict.fromkeys(truths, 0)
    ratios: dict[tuple[str, str], list[float]] = {key: [] for key in truths}
    for _ in range(rounds):
        drawn = {c: _draw(s, rows, rng.integers(0, populations[c], k)) for c, s in cats.items()}
        for scope in scopes:
            parts = list(drawn.values()) if scope == OVERALL else [drawn[scope]]
            pool = [Stratum(p, rows) for p in drawn.values()]  # a run's every category, as a gate sees it
            new = gate_bounds([Stratum(p, rows) for p in parts], pool)
            pooled = TokenStats.concat(parts)
            for metric, higher in CHECKED.items():
                if (scope, metric) not in truths:
                    continue
                truth = truths[(scope, metric)]
                low, high, se_old = _token_sigma_bounds(pooled, metric)
                b = new[metric]
                if higher:
                    passes_old[(scope, metric)] += low > truth
                    passes_new[(scope, metric)] += (not b.undecided) and b.low > truth
                else:
                    passes_old[(scope, metric)] += high < truth
                    passes_new[(scope, metric)] += (not b.undecided) and b.high < truth
                if se_old > 0 and metric not in QUANTILE_METRICS:
                    ratios[(scope, metric)].append(b.se / se_old)
    return [Rate(config, scope, metric, k, rounds, passes_old[(scope, metric)] / rounds,
                 passes_new[(scope, metric)] / rounds,
                 float(np.median(ratios[(scope, metric)])) if ratios[(scope, metric)] else math.nan)
            for scope, metric in truths]


def calibration_rates(data: CalibrationData, chunk_counts: list[int], rounds: int, seed: int,
                      jobs: int = 1) -> list[Rate]:
    """Every config of ``data`` at every chunk count (``jobs`` processes; the same numbers however many)."""
    tasks = [(data.configs[config], data.rows_per_chunk, k, rounds, seed, config)
             for config in data.configs for k in chunk_counts]
    if jobs <= 1:
        return [r for t in tasks for r in false_pass_rates(*t)]
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(jobs) as pool:
        return [r for rates in pool.map(_rates, tasks) for r in rates]


def _rates(task: tuple[dict[str, TokenStats], int, int, int, int, str]) -> list[Rate]:
    return false_pass_rates(*task)


def _pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def calibration_tables(rates: list[Rate]) -> str:
    """Markdown: per metric and chunk count, the worst false-pass rate over the scopes (each category
    and overall) for each cache config, llama.cpp's token-level σ → the chunk-level bound; then the
    full rows."""
    configs = list(dict.fromkeys(r.config for r in rates))
    counts = sorted({r.chunks for r in rates})
    rounds = rates[0].rounds if rates else 0
    summary = []
    for metric in CHECKED:
        for k in counts:
            cells = []
            for cfg in configs:
                mine = [r for r in rates if r.config == cfg and r.metric == metric and r.chunks == k]
                old = max(r.false_pass_token_sigma for r in mine)
                new = max(r.false_pass_chunk_bound for r in mine)
                cells.append(f"{_pct(old)} → " + (f"refused (< {MIN_CHUNKS})" if k < MIN_CHUNKS else _pct(new)))
            summary.append([metric, str(k), *cells])
    detail = [[r.config, r.scope, r.metric, str(r.chunks), _pct(r.false_pass_token_sigma),
               _pct(r.false_pass_chunk_bound), "—" if math.isnan(r.se_ratio) else f"{r.se_ratio:.2f}"]
              for r in rates]
    sim = _pct(math.sqrt(0.05 * 0.95 / rounds)) if rounds else "—"
    return "\n\n".join([
        f"Worst false-pass rate over the scopes (each category, and overall for the means), {rounds} "
        f"resampled runs per row; simulation error at 5 %: ± {sim}. Token σ → chunk bound:",
        markdown_table(["metric", "chunks per category", *configs], summary, align="lr" + "r" * len(configs)),
        "Every row (σ chunk ÷ σ token: the median ratio of the standard errors, means only):",
        markdown_table(["cache", "scope", "metric", "chunks per category", "false pass, token σ",
                        "false pass, chunk bound", "σ chunk ÷ σ token"], detail, align="lllrrrr"),
    ])
