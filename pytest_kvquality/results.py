"""What a run produces, typed: one model x cache config's statistics (``ConfigResult``), a gate's
verdict, a speed measurement; and the two summaries computed from per-token statistics."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .breakdown import Slice
from .cache_config import CacheConfig
from .engine.protocol import ContextFacts
from .gating import Decision
from .generation import GenerationSummary
from .metrics import KLSummary, TokenStats, mean_and_uncertainty, summarize
from .thresholds import OVERALL, Threshold
from .uncertainty import Stratum, gate_bounds

#: context-position buckets of the per-position profile (over the scored second half of a chunk)
POSITION_BUCKETS = 8


@dataclass
class ConfigResult:
    """Statistics of one model with one cache config, per category and overall."""

    model: str
    model_sha256: str
    cache: CacheConfig
    n_ctx: int
    categories: dict[str, KLSummary]
    eval_seconds: float
    exact: bool = False
    #: what llama.cpp decided for the candidate context: rotation_k/v, kv_cache_mib, ...
    context: ContextFacts = field(default_factory=ContextFacts)
    #: mean KLD by context position, pooled over the categories (``position_profile``)
    positions: list[dict[str, Any]] = field(default_factory=list)
    #: the --kv-ref-model alias when another GGUF is the reference
    reference_model: str | None = None
    #: mean KLD by the reference's top-1 probability, and by span (assistant, tool_call, text), pooled
    confidence: list[Slice] = field(default_factory=list)
    spans: list[Slice] = field(default_factory=list)
    #: generation divergence per category and overall (empty when no generations were run)
    generation: dict[str, GenerationSummary] = field(default_factory=dict)

    @property
    def overall(self) -> KLSummary:
        return self.categories[OVERALL]

    def __getitem__(self, category: str) -> KLSummary:
        return self.categories[category]

    # the overall statistics a test asserts on most; every other one is ``result.overall.<field>``
    @property
    def n_tokens(self) -> int:
        return self.overall.n_tokens

    @property
    def kl_mean(self) -> float:
        return self.overall.kl_mean

    @property
    def kl_median(self) -> float:
        return self.overall.kl_median

    @property
    def kl_p99(self) -> float:
        return self.overall.kl_p99

    @property
    def kl_max(self) -> float:
        return self.overall.kl_max

    @property
    def top1(self) -> float:
        return self.overall.top1

    @property
    def dp_rms(self) -> float:
        return self.overall.dp_rms

    @property
    def ppl_ratio(self) -> float:
        return self.overall.ppl_ratio


def summarize_with_bounds(per_cat: dict[str, TokenStats], rows_per_chunk: int | dict[str, int]) -> dict[str, KLSummary]:
    """llama.cpp's summary per category and overall, each with its chunk-level gate bounds (the
    overall ones stratified by category); ``rows_per_chunk`` may differ by category (chat corpora)."""
    rows = rows_per_chunk if isinstance(rows_per_chunk, dict) else dict.fromkeys(per_cat, rows_per_chunk)
    strata = {cat: Stratum(s, rows[cat]) for cat, s in per_cat.items()}
    summaries = {}
    for cat, s in per_cat.items():
        summaries[cat] = summarize(s)
        summaries[cat].bounds = gate_bounds([strata[cat]], list(strata.values()))
    summaries[OVERALL] = summarize(TokenStats.concat(list(per_cat.values())))
    summaries[OVERALL].bounds = gate_bounds(list(strata.values()))
    return summaries


def position_profile(per_cat: dict[str, TokenStats], n_ctx: int,
                     buckets: int = POSITION_BUCKETS) -> list[dict[str, Any]]:
    """Mean KLD by context position: llama-perplexity scores positions n_ctx/2 .. n_ctx-2 of each
    chunk, so each category's tokens repeat that range chunk after chunk."""
    first, rows = n_ctx // 2, n_ctx // 2 - 1
    kld = np.concatenate([s.kld for s in per_cat.values()]) if per_cat else np.zeros(0, np.float32)
    pos = np.concatenate([first + np.arange(len(s)) % rows for s in per_cat.values()]) if per_cat else kld
    edges = np.linspace(first, first + rows, min(buckets, rows) + 1).round().astype(int)
    out = []
    for lo, hi in itertools.pairwise(edges):
        sel = kld[(pos >= lo) & (pos < hi)].astype(np.float64)
        if sel.size:
            mean, unc = mean_and_uncertainty(sel.sum(), (sel * sel).sum(), sel.size)
            out.append({"start": int(lo), "end": int(hi), "kl_mean": mean, "kl_mean_unc": unc,
                        "n_tokens": int(sel.size)})
    return out


@dataclass
class Verdict:
    threshold: Threshold
    decision: Decision
    n_tokens: int
    gate: str = "bound"


@dataclass
class SpeedResult:
    """Prompt-processing or generation speed of one (model, cache config), from pytest-benchmark."""

    model: str
    cache: CacheConfig
    phase: str
    n_ctx: int
    n_tokens: int
    tokens_per_s: float
