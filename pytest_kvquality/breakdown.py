"""Where the loss hits: mean KLD by the reference's confidence (its top-1 probability, in buckets as
exllamav3's model_diff reports them) and, for chat corpora, by span (assistant text, tool-call JSON,
the prompt under ``score: all``)."""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from .metrics import TokenStats, mean_and_uncertainty
from .sequences import SPAN_NAMES

#: edges of the reference top-1 probability buckets
CONFIDENCE_EDGES = (0.0, 0.25, 0.5, 0.75, 0.9, 0.99, 1.0)


@dataclass(frozen=True)
class Slice:
    """The tokens of one bucket or span: how many, their mean KLD (± llama.cpp's standard error,
    tokens taken as independent: descriptive, not a gate) and top-1 agreement."""

    label: str
    n_tokens: int
    kl_mean: float
    kl_mean_unc: float
    top1: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Slice:
        return cls(str(d["label"]), int(d["n_tokens"]), float(d["kl_mean"]), float(d["kl_mean_unc"]),
                   float(d["top1"]))


def _slice(label: str, stats: TokenStats, sel: npt.NDArray[np.bool_]) -> Slice:
    kld = stats.kld[sel].astype(np.float64)
    mean, unc = mean_and_uncertainty(kld.sum(), (kld * kld).sum(), kld.size)
    return Slice(label, int(kld.size), mean, unc, float(stats.same_top[sel].mean()) if kld.size else 0.0)


def confidence_profile(stats: TokenStats, ref_top_p: npt.NDArray[np.floating[Any]]) -> list[Slice]:
    """Mean KLD by the reference's top-1 probability; empty buckets are left out."""
    if ref_top_p.size != len(stats):
        raise ValueError(f"{ref_top_p.size} reference probabilities for {len(stats)} tokens")
    out = []
    for lo, hi in itertools.pairwise(CONFIDENCE_EDGES):
        sel = (ref_top_p >= lo) & ((ref_top_p < hi) if hi < 1.0 else (ref_top_p <= hi))
        if sel.any():
            out.append(_slice(f"p_top1 {lo:g}-{hi:g}", stats, sel))
    return out


def span_profile(stats: TokenStats, spans: npt.NDArray[np.uint8]) -> list[Slice]:
    """Mean KLD by span label; a text corpus has one span (``text``), reported too."""
    if spans.size != len(stats):
        raise ValueError(f"{spans.size} span labels for {len(stats)} tokens")
    return [_slice(name, stats, spans == label) for label, name in SPAN_NAMES.items() if (spans == label).any()]
