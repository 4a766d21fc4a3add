"""Threshold files: YAML gates such as ``gemma3-270m / q4_0 / overall / kl_mean < 0.25``.

Schema (version 1)::

    version: 1
    corpus: builtin          # optional: the gates apply only to runs on this corpus
    models:
      MODEL_ALIAS:
        CACHE_CONFIG:            # q4_0 | q8_0/q4_0 | q4_0:norot | ...
          CATEGORY_OR_overall:
            METRIC: "< 0.12"     # comparators: < <= > >=

Loaded with ``yaml.safe_load`` semantics (the safe loader's node tree), with
duplicate keys rejected and the line of every key kept for error messages.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .cache_config import CacheConfig, CacheConfigError
from .metrics import THRESHOLD_METRICS

OVERALL = "overall"
SCHEMA_VERSION = 1

COMPARATORS: dict[str, Callable[[float, float], bool]] = {
    "<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge,
}
_RULE = re.compile(r"^\s*(<=|>=|<|>)\s*(\S+)\s*$")


class ThresholdError(ValueError):
    """A threshold file that cannot be used: file, line, key and reason."""

    def __init__(self, path: Path, line: int | None, key: str, reason: str) -> None:
        where = f"{path}:{line}" if line else str(path)
        super().__init__(f"{where}: {key}: {reason}" if key else f"{where}: {reason}")
        self.path, self.line, self.key, self.reason = path, line, key, reason


@dataclass(frozen=True)
class Threshold:
    path: Path
    line: int
    model: str
    cache: CacheConfig
    category: str
    metric: str
    op: str
    limit: float

    @property
    def test_id(self) -> str:
        return f"{self.model}::{self.cache.label}::{self.category}::{self.metric}"

    @property
    def rule(self) -> str:
        return f"{self.metric} {self.op} {self.limit:g}"

    def passes(self, value: float) -> bool:
        return bool(COMPARATORS[self.op](float(value), self.limit))

    @property
    def higher_is_better(self) -> bool:
        return self.op in (">", ">=")


@dataclass(frozen=True)
class _Entry:
    key: str
    line: int
    node: yaml.Node


def _mapping(path: Path, node: yaml.Node, where: str) -> list[_Entry]:
    if not isinstance(node, yaml.MappingNode):
        raise ThresholdError(path, node.start_mark.line + 1, where, "expected a mapping")
    seen: dict[str, int] = {}
    out = []
    for k, v in node.value:
        if not isinstance(k, yaml.ScalarNode):
            raise ThresholdError(path, k.start_mark.line + 1, where, "keys must be plain scalars")
        key = str(k.value)
        line = k.start_mark.line + 1
        if key in seen:
            raise ThresholdError(
                path, line, f"{where}.{key}" if where else key,
                f"duplicate key (first defined on line {seen[key]})",
            )
        seen[key] = line
        out.append(_Entry(key, line, v))
    return out


def _scalar(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
    return loader.construct_object(node, deep=True)


def parse_rule(text: Any) -> tuple[str, float]:
    """``"< 0.12"`` -> ("<", 0.12)."""
    if not isinstance(text, str):
        raise ValueError(f"expected a quoted rule like \"< 0.12\", got {text!r}")
    m = _RULE.match(text)
    if not m:
        raise ValueError(f"expected '<', '<=', '>' or '>=' and a number, got {text!r}")
    try:
        value = float(m.group(2))
    except ValueError:
        raise ValueError(f"threshold {m.group(2)!r} is not a number") from None
    if not math.isfinite(value):  # "< inf" would always pass, "> nan" never decide
        raise ValueError(f"threshold {m.group(2)!r} is not a finite number")
    return m.group(1), value


def load_thresholds(
    path: Path, known_models: Callable[[str], str | None], categories: list[str] | None
) -> list[Threshold]:
    """Parse and validate one file. ``known_models`` maps a name to its canonical alias or None;
    ``categories`` None skips the category check (a look before the corpus is read)."""
    loader, top = _read_top(path)
    models = _mapping(path, top["models"].node, "models")
    if not models:
        raise ThresholdError(path, top["models"].line, "models", "no models: the file would make no gates")
    allowed_categories = [OVERALL, *(categories or [])]
    out: list[Threshold] = []
    #: one gate per (model, cache config, category, metric), however the cache config is written
    seen: dict[tuple[str, CacheConfig, str, str], int] = {}
    for m in models:
        model = known_models(m.key)
        if model is None:
            raise ThresholdError(path, m.line, f"models.{m.key}",
                                 "unknown model (not registered, not a --kv-model path stem)")
        for c in _nonempty(path, m, f"models.{m.key}", "cache configs"):
            where = f"models.{m.key}.{c.key}"
            try:
                cache = CacheConfig.parse(c.key)
            except CacheConfigError as e:
                raise ThresholdError(path, c.line, where, str(e)) from e
            for cat in _nonempty(path, c, where, "categories"):
                cwhere = f"{where}.{cat.key}"
                if categories is not None and cat.key not in allowed_categories:
                    raise ThresholdError(path, cat.line, cwhere,
                                         f"unknown category; known: {', '.join(allowed_categories)}")
                for met in _nonempty(path, cat, cwhere, "metrics"):
                    t = _threshold(path, loader, met, f"{cwhere}.{met.key}", model, cache, cat.key)
                    gate = (model, cache, cat.key, met.key)
                    if gate in seen:
                        raise ThresholdError(path, met.line, f"{cwhere}.{met.key}",
                                             f"the same gate as line {seen[gate]} ({cache.label} / {cat.key} / "
                                             f"{met.key}): one gate, one rule")
                    seen[gate] = met.line
                    out.append(t)
    return out


def file_corpus(path: Path) -> str | None:
    """The corpus a file's gates were measured on (its ``corpus:`` key: ``builtin``, ``builtin:agent``,
    a corpus file or folder name), or None: gates for any corpus with these categories."""
    loader, top = _read_top(path)
    if "corpus" not in top:
        return None
    value = _scalar(loader, top["corpus"].node)
    if not isinstance(value, str) or not value:
        raise ThresholdError(path, top["corpus"].line, "corpus", "must be a corpus name (builtin, builtin:agent, ...)")
    return value


def _read_top(path: Path) -> tuple[yaml.SafeLoader, dict[str, _Entry]]:
    """The file's YAML root as entries by key, with ``version`` checked and ``models`` present."""
    try:
        text = path.read_text("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ThresholdError(path, None, "", f"cannot be read ({e})") from e
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(e, "problem", None) or str(e)
        raise ThresholdError(path, line, "", f"YAML syntax error: {problem}") from e
    if root is None:
        raise ThresholdError(path, None, "", "file is empty")
    top = {e.key: e for e in _mapping(path, root, "")}
    unknown_top = set(top) - {"version", "models", "corpus"}
    if unknown_top:
        k = sorted(unknown_top)[0]
        raise ThresholdError(path, top[k].line, k, "unknown top-level key (expected version, corpus, models)")
    if "version" not in top:
        raise ThresholdError(path, 1, "version", f"missing; this plugin reads version {SCHEMA_VERSION}")
    version = _scalar(loader, top["version"].node)
    if version != SCHEMA_VERSION:
        raise ThresholdError(path, top["version"].line, "version",
                             f"unsupported version {version!r}; this plugin reads {SCHEMA_VERSION}")
    if "models" not in top:
        raise ThresholdError(path, None, "models", "missing")
    return loader, top


def _threshold(path: Path, loader: yaml.SafeLoader, met: _Entry, where: str, model: str, cache: CacheConfig,
               category: str) -> Threshold:
    if met.key not in THRESHOLD_METRICS:
        raise ThresholdError(path, met.line, where, f"unknown metric; known: {', '.join(THRESHOLD_METRICS)}")
    try:
        op, limit = parse_rule(_scalar(loader, met.node))
    except ValueError as e:
        raise ThresholdError(path, met.line, where, str(e)) from e
    return Threshold(path, met.line, model, cache, category, met.key, op, limit)


def _nonempty(path: Path, entry: _Entry, where: str, what: str) -> list[_Entry]:
    """The entries of a mapping that must hold gates: an empty one would silently make none."""
    entries = _mapping(path, entry.node, where)
    if not entries:
        raise ThresholdError(path, entry.line, where, f"no {what}: this entry would make no gates")
    return entries


def threshold_files(paths: list[Path]) -> list[Path]:
    """Expand directories to their ``*.yaml``/``*.yml`` files, keeping order, dropping repeats."""
    out: list[Path] = []
    for p in paths:
        found = sorted([*p.glob("*.yaml"), *p.glob("*.yml")]) if p.is_dir() else [p]
        for f in found:
            r = f.resolve()
            if r not in out:
                out.append(r)
    return out
