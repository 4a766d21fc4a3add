"""What a sweep measured: rows, weights x cache compounding, the grid it ran over. Saved as sweep.json."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..cache_config import UNQUANTIZED, CacheConfig, CacheConfigError
from ..results import ConfigResult
from ..thresholds import OVERALL


class SweepError(Exception):
    """A sweep that cannot start or go on; the message says why and what to do."""


DEFAULT_TYPES = "f16,q8_0,q4_0"
DEFAULT_WEIGHTS_CACHE = "q8_0,q4_0"
#: timed rounds per speed phase in ``--speed`` (after one warm-up); the median is kept
SPEED_ROUNDS = 3


@dataclass
class SweepRow:
    """One evaluated (model, n_ctx, cache config)."""

    model: str
    n_ctx: int
    cache: CacheConfig
    kl_mean: float
    kl_mean_unc: float
    top1: float
    categories: dict[str, float]
    kv_bytes_per_token: float | None
    positions: list[dict[str, Any]]
    eval_seconds: float
    cpu_fallback: bool
    n_tokens: int = 0
    #: llama.cpp's prompt-processing and generation tokens/s with this cache (``--speed``)
    speed: dict[str, float] = field(default_factory=dict)
    #: KV MiB at 32k of context by llama.cpp's cell rule (sliding-window caches do not grow with n_ctx)
    kv_mib_per_32k: float | None = None

    @classmethod
    def of(cls, r: ConfigResult) -> SweepRow:
        o = r.overall
        return cls(r.model, r.n_ctx, r.cache, o.kl_mean, o.kl_mean_unc, o.top1,
                   {c: s.kl_mean for c, s in r.categories.items() if c != OVERALL},
                   r.context.kv_bytes_per_token, r.positions or [], r.eval_seconds,
                   bool(r.context.kv_cpu_fallback), o.n_tokens, kv_mib_per_32k=r.context.kv_mib_per_32k)

    @property
    def key(self) -> tuple[str, int, str]:
        return self.model, self.n_ctx, self.cache.label

    @property
    def scored_per_s(self) -> float:
        """End-to-end evaluation throughput: scored tokens per second, model and KL math included."""
        return self.n_tokens / self.eval_seconds if self.eval_seconds > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "n_ctx": self.n_ctx, "cache": self.cache.label,
                "type_k": self.cache.type_k, "type_v": self.cache.type_v, "rotation": self.cache.rotation,
                "kl_mean": self.kl_mean, "kl_mean_unc": self.kl_mean_unc, "top1": self.top1,
                "categories": self.categories, "kv_bytes_per_token": self.kv_bytes_per_token,
                "kv_mib_per_32k": self.kv_mib_per_32k,
                "positions": self.positions, "eval_seconds": self.eval_seconds, "n_tokens": self.n_tokens,
                "scored_per_s": self.scored_per_s, "speed": self.speed, "cpu_fallback": self.cpu_fallback}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> SweepRow:
        return cls(d["model"], d["n_ctx"], CacheConfig.parse(d["cache"]), d["kl_mean"], d["kl_mean_unc"],
                   d["top1"], d["categories"], d["kv_bytes_per_token"], d["positions"], d["eval_seconds"],
                   d["cpu_fallback"], d.get("n_tokens", 0), d.get("speed", {}), d.get("kv_mib_per_32k"))


@dataclass
class Compounding:
    """KL of lower-precision weights, of a quantized cache, and of both, against one reference."""

    weights: str
    cache: str
    kl_weights: float
    kl_cache: float
    kl_both: float
    top1_both: float

    @property
    def excess(self) -> float:
        """How far the combined loss is from the sum of the parts (0: they simply add up)."""
        return self.kl_both - (self.kl_weights + self.kl_cache)

    def to_json(self) -> dict[str, Any]:
        return {**self.__dict__, "sum": self.kl_weights + self.kl_cache, "excess": self.excess}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Compounding:
        return cls(d["weights"], d["cache"], d["kl_weights"], d["kl_cache"], d["kl_both"], d["top1_both"])


@dataclass
class Sweep:
    rows: list[SweepRow] = field(default_factory=list)
    compounding: list[Compounding] = field(default_factory=list)
    environment: dict[str, Any] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def has(self, key: tuple[str, int, str]) -> bool:
        return any(r.key == key for r in self.rows)

    def to_json(self) -> dict[str, Any]:
        return {"environment": self.environment, "rows": [r.to_json() for r in self.rows],
                "compounding": [c.to_json() for c in self.compounding], "failures": self.failures,
                "notes": self.notes}

    @classmethod
    def load(cls, path: Path) -> Sweep:
        """An earlier sweep.json, to resume or extend; a damaged one is an error, never silently dropped."""
        try:
            d = json.loads(path.read_text())
            return cls([SweepRow.from_json(r) for r in d["rows"]],
                       [Compounding.from_json(c) for c in d["compounding"]], d["environment"], d["failures"],
                       d["notes"])
        except (OSError, ValueError, KeyError, TypeError, CacheConfigError) as e:
            raise SweepError(f"sweep: cannot read {path}: {e!r}; move it away (or drop --resume)") from e


def grid(k_types: Sequence[str], v_types: Sequence[str], rotations: Sequence[bool],
         extra: Sequence[CacheConfig] = ()) -> list[CacheConfig]:
    """K × V × rotation, then ``extra`` configs; rotation off only where something is quantized
    (it changes nothing else)."""
    out: list[CacheConfig] = []
    for k in k_types:
        for v in v_types:
            for rot in rotations:
                if not rot and {k, v} <= UNQUANTIZED:
                    continue
                c = CacheConfig(k, v, rot)
                if c not in out:
                    out.append(c)
    return out + [c for c in dict.fromkeys(extra) if c not in out]


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points (bytes, kld) no other point beats on both (fewer bytes and lower KLD)."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    front, best = [], float("inf")
    for i in order:
        if points[i][1] < best:
            front.append(i)
            best = points[i][1]
    return front




def by_model_and_context(rows: list[SweepRow]) -> dict[tuple[str, int], list[SweepRow]]:
    """Rows by (model, n_ctx), in the order measured."""
    out: dict[tuple[str, int], list[SweepRow]] = {}
    for r in rows:
        out.setdefault((r.model, r.n_ctx), []).append(r)
    return out
