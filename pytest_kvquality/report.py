"""Reporting: the terminal table and the ``--kv-json`` file, from results merged across workers."""

from __future__ import annotations

import json
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .cache_config import CacheConfig
from .metrics import KLSummary
from .thresholds import OVERALL

JSON_SCHEMA_VERSION = 1


@dataclass
class ResultRecord:
    """One (model, cache config, n_ctx, category) row: what the table and JSON show."""

    model: str
    model_sha256: str
    cache: str
    n_ctx: int
    category: str
    summary: KLSummary
    eval_seconds: float
    exact: bool
    context: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        c = CacheConfig.parse(self.cache)
        s = self.summary
        return {
            "model": self.model, "model_sha256": self.model_sha256, "cache": self.cache,
            "type_k": c.type_k, "type_v": c.type_v, "rotation": c.rotation,
            "flash_attn": c.flash_attn, "n_ctx": self.n_ctx, "category": self.category,
            "kl_mean": s.kl_mean, "kl_mean_unc": s.kl_mean_unc, "kl_median": s.kl_median,
            "kl_p99": s.kl_p99, "kl_max": s.kl_max, "top1": s.top1, "top1_unc": s.top1_unc,
            "dp_rms": s.dp_rms, "ppl_ratio": s.ppl_ratio, "n_tokens": s.n_tokens,
            "eval_seconds": self.eval_seconds, "exact_reference": self.exact,
            "rotation_applied_k": self.context.get("rotation_k"),
            "rotation_applied_v": self.context.get("rotation_v"),
            "kv_cache_mib": self.context.get("kv_cache_mib"),
            "stats": s.to_dict(),
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ResultRecord:
        return cls(d["model"], d["model_sha256"], d["cache"], d["n_ctx"], d["category"],
                   KLSummary.from_dict(d["stats"]), d["eval_seconds"], d["exact_reference"],
                   {k: d[f"{j}"] for k, j in (("rotation_k", "rotation_applied_k"),
                                              ("rotation_v", "rotation_applied_v"),
                                              ("kv_cache_mib", "kv_cache_mib")) if d.get(j) is not None})


@dataclass
class VerdictRecord:
    test_id: str
    model: str
    cache: str
    category: str
    metric: str
    rule: str
    value: float
    uncertainty: float
    passed: bool

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class Report:
    """Everything the run measured; mergeable across xdist workers."""

    records: list[ResultRecord] = field(default_factory=list)
    verdicts: list[VerdictRecord] = field(default_factory=list)
    environment: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def merge(self, other: Report) -> None:
        have = {(r.model, r.cache, r.n_ctx, r.category) for r in self.records}
        self.records += [r for r in other.records
                         if (r.model, r.cache, r.n_ctx, r.category) not in have]
        seen = {v.test_id for v in self.verdicts}
        self.verdicts += [v for v in other.verdicts if v.test_id not in seen]
        for k, v in other.environment.items():
            self.environment.setdefault(k, v)
        self.notes += [n for n in other.notes if n not in self.notes]

    def dumps(self) -> str:
        return json.dumps({
            "records": [r.to_json() for r in self.records],
            "verdicts": [v.to_json() for v in self.verdicts],
            "environment": self.environment, "notes": self.notes,
        })

    @classmethod
    def loads(cls, text: str) -> Report:
        d = json.loads(text)
        return cls([ResultRecord.from_json(r) for r in d["records"]],
                   [VerdictRecord(**v) for v in d["verdicts"]], d["environment"], d["notes"])

    def write_json(self, path: Path) -> None:
        doc = {
            "schema_version": JSON_SCHEMA_VERSION,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "environment": {**self.environment, "python": platform.python_version(),
                            "machine": platform.machine(), "platform": platform.platform()},
            "results": [r.to_json() for r in self.sorted_records()],
            "thresholds": [v.to_json() for v in self.verdicts],
            "notes": self.notes,
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(doc, indent=2) + "\n")

    def sorted_records(self) -> list[ResultRecord]:
        def order(r: ResultRecord) -> tuple[str, str, int, int, str]:
            return (r.model, r.cache, r.n_ctx, 1 if r.category == OVERALL else 0, r.category)
        return sorted(self.records, key=order)

    def verdict_for(self, model: str, cache: str, category: str) -> str:
        vs = [v for v in self.verdicts
              if (v.model, v.cache, v.category) == (model, cache, category)]
        if not vs:
            return "-"
        failed = sum(not v.passed for v in vs)
        return f"FAIL {failed}/{len(vs)}" if failed else f"pass {len(vs)}"

    def table(self) -> list[str]:
        """The summary table as lines: model x cache config x category."""
        head = ("model", "cache", "n_ctx", "category", "tokens", "mean KLD ± σ", "p99 KLD",
                "same top", "RMS Δp", "gates")
        rows = []
        for r in self.sorted_records():
            s = r.summary
            rows.append((
                r.model, r.cache, str(r.n_ctx), r.category, str(s.n_tokens),
                f"{s.kl_mean:.5f} ± {s.kl_mean_unc:.5f}", f"{s.kl_p99:.4f}",
                f"{100 * s.top1:.2f} %", f"{100 * s.dp_rms:.2f} %",
                self.verdict_for(r.model, r.cache, r.category),
            ))
        widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
        fmt = "  ".join(f"{{:<{w}}}" if i < 4 else f"{{:>{w}}}" for i, w in enumerate(widths))
        lines = [fmt.format(*head), fmt.format(*("-" * w for w in widths))]
        lines += [fmt.format(*row) for row in rows]
        return lines
