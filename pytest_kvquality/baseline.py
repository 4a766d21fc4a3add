"""Baselines, as pytest-benchmark keeps them for speed: ``--kv-save NAME`` stores this run's
results, ``--kv-compare [NUM|NAME]`` shows the deltas against one, ``--kv-compare-fail
kl_mean:10%`` (relative) or ``top1:0.005`` (absolute) fails the run on a regression.

Baselines are the ``--kv-json`` document, stored as ``NNNN_NAME.json`` in the storage folder.
A comparison warns, but does not fail, when the two runs differ in what decides the numbers:
model sha256, llama.cpp version, corpus, reference cache config.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from .files import atomic_write
from .report import Report, ResultRecord

#: metrics a comparison shows and --kv-compare-fail may name; top1 is the only higher-is-better one
COMPARED_METRICS = ("kl_mean", "kl_median", "kl_p99", "kl_max", "top1", "dp_rms", "ppl_ratio")
HIGHER_IS_BETTER = frozenset({"top1"})
_FILE = re.compile(r"^(\d{4})_(.+)\.json$")
#: what a --kv-save name may hold (it becomes part of a file name)
BASELINE_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


class BaselineError(ValueError):
    """A baseline that cannot be saved, found or read; or a bad --kv-compare-fail."""


@dataclass(frozen=True)
class Criterion:
    """``kl_mean:10%``: fail when kl_mean gets worse than the baseline by more than 10 %."""

    metric: str
    amount: float
    relative: bool

    @classmethod
    def parse(cls, text: str) -> Criterion:
        metric, sep, amount = text.partition(":")
        metric = metric.strip()
        if not sep or metric not in COMPARED_METRICS:
            raise BaselineError(f"--kv-compare-fail {text!r}: expected METRIC:X% or METRIC:X with METRIC one "
                                f"of {', '.join(COMPARED_METRICS)}")
        relative = amount.strip().endswith("%")
        try:
            value = float(amount.strip().rstrip("%"))
        except ValueError:
            raise BaselineError(f"--kv-compare-fail {text!r}: {amount!r} is not a number") from None
        if value < 0:
            raise BaselineError(f"--kv-compare-fail {text!r}: the allowed change cannot be negative")
        return cls(metric, value / 100.0 if relative else value, relative)

    @property
    def label(self) -> str:
        return f"{self.metric}:{self.amount * 100:g}%" if self.relative else f"{self.metric}:{self.amount:g}"

    def worsening(self, old: float, new: float) -> float:
        """How much worse ``new`` is than ``old`` (negative: better)."""
        return old - new if self.metric in HIGHER_IS_BETTER else new - old

    def regressed(self, old: float, new: float) -> bool:
        """Worse by more than allowed; a value that is not a finite number on either side cannot be
        shown to be no worse, so it counts as a regression."""
        if not (math.isfinite(old) and math.isfinite(new)):
            return True
        allowed = self.amount * abs(old) if self.relative else self.amount
        return self.worsening(old, new) > allowed + 1e-12


@dataclass
class Delta:
    key: tuple[str, str, int, str]
    metric: str
    old: float
    new: float
    regressed_by: list[Criterion] = field(default_factory=list)

    @property
    def change(self) -> float:
        return self.new - self.old

    @property
    def relative_change(self) -> float | None:
        return self.change / abs(self.old) if self.old else None

    def describe(self) -> str:
        model, cache, n_ctx, category = self.key
        rel = self.relative_change
        pct = f" ({100 * rel:+.1f} %)" if rel is not None else ""
        return (f"{model} [{cache}] n_ctx {n_ctx} {category}: {self.metric} {self.old:.6g} -> {self.new:.6g}"
                f"{pct}")


@dataclass
class Comparison:
    baseline: str
    deltas: list[Delta]
    regressions: list[Delta]
    environment_warnings: list[str]
    only_in_baseline: list[tuple[str, str, int, str]]
    #: --kv-compare-fail criteria that compared nothing: each fails the run, as a regression does
    uncompared: list[str] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return bool(self.regressions or self.uncompared)

    def lines(self) -> list[str]:
        """Human-readable lines: environment warnings, then deltas of kl_mean and top1 per row."""
        out = [f"compared with baseline {self.baseline}"]
        out += [f"warning: {w}" for w in self.environment_warnings]
        for d in self.deltas:
            if d.metric in ("kl_mean", "top1"):
                flag = f"  REGRESSION ({', '.join(c.label for c in d.regressed_by)})" if d.regressed_by else ""
                out.append(f"  {d.describe()}{flag}")
        for key in self.only_in_baseline:
            out.append(f"  {key[0]} [{key[1]}] n_ctx {key[2]} {key[3]}: in the baseline, not measured now")
        out += [f"  NOT COMPARED: {text}" for text in self.uncompared]
        return out


#: environment keys whose change makes numbers incomparable (warned about, not failed)
_ENV_THAT_MATTERS = {
    "llama_cpp_python": "llama-cpp-python version",
    "llama_cpp": "llama.cpp version",
    "corpus_sha256": "corpus",
    "reference_cache": "reference cache config",
}


def environment_differences(old: dict[str, object], new: dict[str, object],
                            old_name: str = "the baseline") -> list[str]:
    """What differs between two runs' environments that decides the numbers (``old_name``: what the
    older one is called in the message)."""
    out = []
    for key, what in _ENV_THAT_MATTERS.items():
        if key in old and key in new and old[key] != new[key]:
            out.append(f"the {what} differs from {old_name}'s ({old[key]} -> {new[key]})")
    old_models, new_models = old.get("models") or {}, new.get("models") or {}
    if isinstance(old_models, dict) and isinstance(new_models, dict):
        for model, sha in new_models.items():
            if model in old_models and old_models[model] != sha:
                out.append(f"model {model} is a different file (sha256 {str(old_models[model])[:12]}… -> "
                           f"{str(sha)[:12]}…)")
    return out


def _metric(r: ResultRecord, metric: str) -> float:
    value, _ = r.summary.metric(metric)
    return value


def compare(baseline_name: str, baseline: Report, current: Report, criteria: list[Criterion]) -> Comparison:
    old = {r.key: r for r in baseline.records}
    deltas, regressions = [], []
    for r in current.sorted_records():
        b = old.get(r.key)
        if b is None:
            continue
        for metric in COMPARED_METRICS:
            d = Delta(r.key, metric, _metric(b, metric), _metric(r, metric))
            d.regressed_by = [c for c in criteria if c.metric == metric and c.regressed(d.old, d.new)]
            deltas.append(d)
            if d.regressed_by:
                regressions.append(d)
    now = {r.key for r in current.records}
    compared = {d.metric for d in deltas}
    uncompared = [f"--kv-compare-fail {c.label}: the baseline {baseline_name} has none of this run's "
                  f"(model, cache, n_ctx, category) rows, so nothing was compared; a gate that cannot "
                  f"compare fails" for c in criteria if c.metric not in compared]
    return Comparison(baseline_name, deltas, regressions,
                      environment_differences(baseline.environment, current.environment),
                      sorted(k for k in old if k not in now), uncompared)


class BaselineStorage:
    """``NNNN_NAME.json`` files in one folder; numbers grow with each save."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def entries(self) -> list[tuple[int, str, Path]]:
        if not self.root.is_dir():
            return []
        found = [(int(m.group(1)), m.group(2), p) for p in self.root.iterdir()
                 if (m := _FILE.match(p.name))]
        return sorted(found)

    def save(self, name: str, report: Report) -> Path:
        if not BASELINE_NAME.match(name):
            raise BaselineError(f"--kv-save {name!r}: use letters, digits, '.', '_' and '-' only")
        number = max((n for n, _, _ in self.entries()), default=0) + 1
        path = self.root / f"{number:04d}_{name}.json"
        atomic_write(path, json.dumps(report.document(), indent=2) + "\n")
        return path

    def find(self, spec: str) -> Path:
        """``latest``, a number (``3`` or ``0003``), or a name (the newest save of that name)."""
        entries = self.entries()
        if not entries:
            raise BaselineError(f"no saved baselines in {self.root} (save one with --kv-save NAME)")
        if spec == "latest":
            return entries[-1][2]
        if spec.isdigit():
            hits = [p for n, _, p in entries if n == int(spec)]
        else:
            hits = [p for _, name, p in entries if name == spec or p.stem == spec]
        if not hits:
            have = ", ".join(p.stem for _, _, p in entries)
            raise BaselineError(f"no baseline {spec!r} in {self.root}; saved: {have}")
        return hits[-1]

    @staticmethod
    def load(path: Path) -> Report:
        try:
            return Report.from_document(json.loads(path.read_text("utf-8")))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise BaselineError(f"baseline {path} cannot be read: {e}") from e
