"""What a run measured, as data: records merged across xdist workers and the ``--kv-json`` document
(docs/json-schema.md). Showing it (the terminal table, Markdown) is ``render.py``."""

from __future__ import annotations

import json
import math
import platform
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .breakdown import Slice
from .cache_config import CacheConfig
from .engine.protocol import ContextFacts
from .files import atomic_write
from .metrics import KLSummary
from .results import ConfigResult, SpeedResult, Verdict
from .thresholds import OVERALL

#: version of the --kv-json document (docs/json-schema.md); bumped on any incompatible change
JSON_SCHEMA_VERSION = 3
#: versions read back (baselines): version 2 differs only in fields a comparison does not read
READABLE_SCHEMA_VERSIONS = (2, 3)

#: context facts in each JSON result under another name (the rest keep theirs)
RENAMED_FACTS = {"rotation_k": "rotation_applied_k", "rotation_v": "rotation_applied_v"}
#: context facts copied into each JSON result (docs/json-schema.md)
JSON_FACTS = ("rotation_k", "rotation_v", "kv_cache_mib", "kv_cells", "kv_cache_mib_expected", "kv_bytes_per_token",
              "kv_mib_per_32k", "kv_mib_per_128k", "kv_swa_cells", "kv_swa_full", "recurrent_state_mib",
              "kv_mismatch", "kv_devices", "kv_cpu_fallback", "weight_devices", "kv_layer_devices", "rpc_servers",
              "split_mode", "tensor_split", "decode_sequences", "n_ubatch", "device_reduction")


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
    context: ContextFacts = field(default_factory=ContextFacts)
    #: mean KLD by context position (pooled over the categories: on the overall record only)
    positions: list[dict[str, Any]] | None = None
    reference_model: str | None = None
    #: mean KLD by reference confidence and by span (overall record only), generation divergence
    confidence: list[Slice] | None = None
    spans: list[Slice] | None = None
    generation: dict[str, Any] | None = None

    @property
    def key(self) -> tuple[str, str, int, str]:
        return (self.model, self.cache, self.n_ctx, self.category)

    def to_json(self) -> dict[str, Any]:
        c = CacheConfig.parse(self.cache)
        s = self.summary
        facts = self.context.to_dict()
        return {
            "model": self.model, "model_sha256": self.model_sha256, "cache": self.cache,
            "type_k": c.type_k, "type_v": c.type_v, "rotation": c.rotation,
            "flash_attn": c.flash_attn, "n_ctx": self.n_ctx, "category": self.category,
            "kl_mean": s.kl_mean, "kl_mean_unc": s.kl_mean_unc, "kl_median": s.kl_median,
            "kl_p99": s.kl_p99, "kl_max": s.kl_max, "top1": s.top1, "top1_unc": s.top1_unc,
            "dp_rms": s.dp_rms, "ppl_ratio": s.ppl_ratio, "n_tokens": s.n_tokens,
            "eval_seconds": self.eval_seconds, "exact_reference": self.exact,
            **{RENAMED_FACTS.get(k, k): facts.get(k) for k in JSON_FACTS},
            "reference_model": self.reference_model,
            "positions": self.positions,
            "confidence": None if self.confidence is None else [x.to_dict() for x in self.confidence],
            "spans": None if self.spans is None else [x.to_dict() for x in self.spans],
            "generation": self.generation,
            "stats": s.to_dict(),
        }

    @classmethod
    def of(cls, r: ConfigResult, category: str) -> ResultRecord:
        overall = category == OVERALL
        gen = r.generation.get(category)
        return cls(r.model, r.model_sha256, r.cache.label, r.n_ctx, category, r.categories[category], r.eval_seconds,
                   r.exact, r.context, r.positions if overall else None, r.reference_model,
                   r.confidence if overall else None, r.spans if overall else None,
                   gen.to_dict() if gen is not None else None)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ResultRecord:
        facts = {k: d[RENAMED_FACTS.get(k, k)] for k in JSON_FACTS if d.get(RENAMED_FACTS.get(k, k)) is not None}
        return cls(d["model"], d["model_sha256"], d["cache"], d["n_ctx"], d["category"],
                   KLSummary.from_dict(d["stats"]), d["eval_seconds"], d["exact_reference"],
                   ContextFacts.from_info(facts), d.get("positions"), d.get("reference_model"),
                   _slices(d.get("confidence")), _slices(d.get("spans")), d.get("generation"))


def _slices(data: list[dict[str, Any]] | None) -> list[Slice] | None:
    return None if data is None else [Slice.from_dict(x) for x in data]


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
    outcome: str
    low: float = 0.0
    high: float = 0.0
    chunks_to_decide: int | None = None
    gate: str = "bound"
    n_tokens: int = 0
    n_chunks: int = 0
    method: str = ""
    reason: str = ""

    def to_json(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        for k in ("low", "high"):  # an unknown percentile bound is infinite: null in JSON
            if isinstance(d[k], float) and math.isinf(d[k]):
                d[k] = None
        return d

    def junit_properties(self, n_ctx: int | None = None) -> list[tuple[str, object]]:
        """The JUnit ``<properties>`` of this gate's test case (docs/ci.md, "JUnit"): the plugin's, and
        the merge's, which has no n_ctx to give."""
        return [("kv_metric", self.metric), ("kv_value", self.value), ("kv_uncertainty", self.uncertainty),
                ("kv_lower_bound", self.low), ("kv_upper_bound", self.high), ("kv_threshold", self.rule),
                ("kv_verdict", self.outcome), ("kv_gate", self.gate), ("kv_n_tokens", self.n_tokens),
                *([("kv_n_ctx", n_ctx)] if n_ctx is not None else []), ("kv_model", self.model),
                ("kv_cache", self.cache), ("kv_category", self.category)]

    @classmethod
    def of(cls, v: Verdict) -> VerdictRecord:
        t, d = v.threshold, v.decision
        return cls(t.test_id, t.model, t.cache.label, t.category, t.metric, t.rule, d.value, d.uncertainty, d.passed,
                   d.outcome.value, d.low, d.high, d.chunks_to_decide, v.gate, v.n_tokens, d.n_chunks, d.method,
                   d.reason)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> VerdictRecord:
        d = {f.name: d[f.name] for f in fields(cls) if f.name in d}
        d["low"] = -math.inf if d.get("low", 0.0) is None else d.get("low", 0.0)
        d["high"] = math.inf if d.get("high", 0.0) is None else d.get("high", 0.0)
        return cls(**d)


@dataclass(frozen=True)
class SkipRecord:
    """An item that did not run because its model is not available here."""

    model: str
    reason: str


@dataclass
class SpeedRecord:
    """Prompt processing (pp) or generation (tg) speed of one (model, cache config)."""

    model: str
    cache: str
    phase: str
    n_ctx: int
    n_tokens: int
    tokens_per_s: float

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def of(cls, sp: SpeedResult) -> SpeedRecord:
        return cls(sp.model, sp.cache.label, sp.phase, sp.n_ctx, sp.n_tokens, sp.tokens_per_s)


@dataclass(frozen=True)
class RunOutcome:
    """How the pytest run that wrote a document ended: what ``merge`` needs to see a shard whose gates
    all passed but whose run failed (a crashed evaluation, an error, no tests collected)."""

    exit_status: int
    tests_collected: int
    tests_failed: int

    def problem(self) -> str | None:
        """Why this run cannot count as passed (None: it passed)."""
        if self.exit_status == 0:
            return None
        if self.exit_status == 5:
            return "its pytest run collected no tests (exit status 5)"
        return f"its pytest run exited with status {self.exit_status} ({self.tests_failed} test(s) failed)"


@dataclass
class Report:
    """Everything the run measured; mergeable across xdist workers."""

    records: list[ResultRecord] = field(default_factory=list)
    verdicts: list[VerdictRecord] = field(default_factory=list)
    environment: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    speeds: list[SpeedRecord] = field(default_factory=list)
    skipped: list[SkipRecord] = field(default_factory=list)
    #: set when the document is written at the end of a run (None in older documents)
    run: RunOutcome | None = None

    @classmethod
    def of(cls, results: Iterable[ConfigResult], verdicts: Iterable[Verdict], speeds: Iterable[SpeedResult], *,
           notes: list[str], skipped: list[SkipRecord], environment: dict[str, Any]) -> Report:
        """The report of one process's typed results (merged across xdist workers later)."""
        rep = cls(notes=list(notes), skipped=list(skipped))
        rep.records = [ResultRecord.of(r, cat) for r in results for cat in r.categories]
        rep.verdicts = [VerdictRecord.of(v) for v in verdicts]
        rep.speeds = [SpeedRecord.of(sp) for sp in speeds]
        rep.environment.update(environment)
        return rep

    def merge(self, other: Report) -> None:
        self.skipped += other.skipped
        have = {r.key for r in self.records}
        self.records += [r for r in other.records if r.key not in have]
        seen = {v.test_id for v in self.verdicts}
        self.verdicts += [v for v in other.verdicts if v.test_id not in seen]
        timed = {(s.model, s.cache, s.phase, s.n_ctx) for s in self.speeds}
        self.speeds += [s for s in other.speeds if (s.model, s.cache, s.phase, s.n_ctx) not in timed]
        for k, v in other.environment.items():
            if isinstance(v, dict) and isinstance(self.environment.get(k), dict):
                self.environment[k] = {**v, **self.environment[k]}
            else:
                self.environment.setdefault(k, v)
        self.notes += [n for n in other.notes if n not in self.notes]

    # ------------------------------------------------------------ JSON

    def document(self) -> dict[str, Any]:
        """The --kv-json document (docs/json-schema.md)."""
        return {
            "schema_version": JSON_SCHEMA_VERSION,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "environment": {**self.environment, "python": platform.python_version(),
                            "machine": platform.machine(), "platform": platform.platform()},
            "results": [r.to_json() for r in self.sorted_records()],
            "thresholds": [v.to_json() for v in self.verdicts],
            "speed": [s.to_json() for s in self.speeds],
            "notes": self.notes,
            "skipped": [dict(s.__dict__) for s in self.skipped],
            "run": None if self.run is None else dict(self.run.__dict__),
        }

    @classmethod
    def from_document(cls, doc: dict[str, Any]) -> Report:
        if doc.get("schema_version") not in READABLE_SCHEMA_VERSIONS:
            raise ValueError(f"schema_version {doc.get('schema_version')!r}; this plugin reads "
                             f"{JSON_SCHEMA_VERSION}")
        return cls([ResultRecord.from_json(r) for r in doc["results"]],
                   [VerdictRecord.from_json(v) for v in doc["thresholds"]],
                   dict(doc["environment"]), list(doc["notes"]),
                   [SpeedRecord(**s) for s in doc.get("speed", [])],
                   [SkipRecord(**s) for s in doc.get("skipped", [])],
                   RunOutcome(**doc["run"]) if doc.get("run") else None)

    def dumps(self) -> str:
        return json.dumps(self.document())

    @classmethod
    def loads(cls, text: str) -> Report:
        return cls.from_document(json.loads(text))

    def write_json(self, path: Path) -> None:
        atomic_write(path, json.dumps(self.document(), indent=2) + "\n")

    # ------------------------------------------------------------ queries

    def sorted_records(self) -> list[ResultRecord]:
        def order(r: ResultRecord) -> tuple[str, str, int, int, str]:
            return (r.model, r.cache, r.n_ctx, 1 if r.category == OVERALL else 0, r.category)
        return sorted(self.records, key=order)

    def verdict_for(self, model: str, cache: str, category: str | None = None) -> tuple[str, str | None]:
        """('pass 3' | 'FAIL 1/3' | 'inconclusive 1/3' | '-', colour) over a config's gates."""
        vs = [v for v in self.verdicts if (v.model, v.cache) == (model, cache)
              and (category is None or v.category == category)]
        if not vs:
            return "-", None
        failed = sum(v.outcome == "fail" for v in vs)
        unsure = sum(v.outcome == "inconclusive" for v in vs)
        if failed:
            return f"FAIL {failed}/{len(vs)}", "red"
        if unsure:
            return f"inconclusive {unsure}/{len(vs)}", "yellow"
        return f"pass {len(vs)}", "green"

    def speed_of(self, model: str, cache: str, phase: str) -> float | None:
        for s in self.speeds:
            if (s.model, s.cache, s.phase) == (model, cache, phase):
                return s.tokens_per_s
        return None

    def configs(self) -> dict[str, list[str]]:
        """Cache configs per model, in table order (results, then speed-only configs)."""
        out: dict[str, list[str]] = {}
        for r in self.sorted_records():
            if r.cache not in out.setdefault(r.model, []):
                out[r.model].append(r.cache)
        for s in self.speeds:
            if s.cache not in out.setdefault(s.model, []):
                out[s.model].append(s.cache)
        return out

    def failed_gates(self) -> list[VerdictRecord]:
        return [v for v in self.verdicts if v.outcome != "pass"]
