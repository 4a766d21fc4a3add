"""Collection: threshold files become one pytest item per threshold; models without thresholds get a
measurement item per cache config, so every evaluated configuration shows in the table."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .cache_config import CacheConfig
from .corpus import CorpusError, corpus_name
from .engine.protocol import EngineError
from .gating import Outcome, decide, describe
from .options import DEFAULT_CACHES, shipped_thresholds_dir
from .report import VerdictRecord
from .results import Verdict
from .state import STATE, KVState, configure, get_state
from .thresholds import Threshold, ThresholdError, file_corpus, load_thresholds


class ThresholdFailed(AssertionError):
    """A threshold that the measurement did not meet (or could not decide, under --kv-inconclusive=fail)."""


class InconclusiveGate(pytest.PytestWarning):
    """A threshold whose 95 % bounds straddle the limit, under --kv-inconclusive=warn."""


class ThresholdFile(pytest.File):
    def collect(self) -> Iterator[pytest.Item]:
        state = get_state(self.config)
        try:
            categories = state.categories()
        except CorpusError as e:
            raise self.CollectError(f"cannot read the corpus: {e}") from e
        try:
            corpus = other_corpus(self.path, state)
            if corpus is not None:
                why = f"its gates were measured on corpus {corpus}, this run scores {corpus_name(state.options.corpus)}"
                named = {p.resolve() for p in state.options.thresholds if not p.is_dir()}
                if state.options.thresholds_given and self.path.resolve() in named:  # asked for by name: its
                    # gates must not vanish; in a folder, the files of other corpora are skipped
                    raise self.CollectError(f"{self.path}: {why} (--kv-corpus {corpus} runs them)")
                state.session.notes.append(f"{self.path.name}: {why}; not applied")
                return
            thresholds = load_thresholds(self.path, state.known_model, categories)
        except ThresholdError as e:
            raise self.CollectError(f"invalid threshold file: {e}") from e
        wanted = state.options.caches
        for t in thresholds:
            if t.model in state.model_names and (wanted is None or t.cache in wanted):
                if t.metric.startswith("gen_"):
                    self._check_generation(t, state)
                yield ThresholdItem.from_parent(self, name=t.test_id, threshold=t)

    def _check_generation(self, t: Threshold, state: KVState) -> None:
        """A generation gate makes the run generate; one that generations of N tokens can never meet
        is an error here, not a failure found after minutes of decoding."""
        state.session.wants_generation = True
        n, agree = state.options.gen_tokens, state.options.gen_agree
        if t.metric == "gen_first_divergence_median" and t.higher_is_better and t.limit >= n:
            raise self.CollectError(f"{t.path}:{t.line}: {t.rule} can never be met: generations stop at "
                                    f"--kv-gen-tokens {n}, so the median first divergence is at most {n}")
        if t.metric == "gen_prefix_agree" and agree > n:
            raise self.CollectError(f"{t.path}:{t.line}: gen_prefix_agree counts the first --kv-gen-agree {agree} "
                                    f"tokens but generations stop at --kv-gen-tokens {n}")


class KVItemBase(pytest.Item):
    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None) -> Any:
        if isinstance(excinfo.value, (ThresholdFailed, EngineError)):
            return str(excinfo.value)
        return super().repr_failure(excinfo, style)


class ThresholdItem(KVItemBase):
    def __init__(self, *, threshold: Threshold, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.threshold = threshold
        self.add_marker("kvquality")
        # pytest -n N --dist loadgroup keeps one (model, cache) on one worker: evaluated once
        self.add_marker(pytest.mark.xdist_group(f"{threshold.model}::{threshold.cache.label}"))

    def runtest(self) -> None:
        t = self.threshold
        state = get_state(self.config)
        result = state.run(t.model, t.cache)
        summary = result[t.category]
        decision = decide(t, summary, state.options.gate)
        verdict = Verdict(t, decision, summary.n_tokens, state.options.gate)
        state.session.record_verdict(verdict)
        self.user_properties += VerdictRecord.of(verdict).junit_properties(result.n_ctx)
        if decision.outcome is Outcome.PASS:
            return
        where = (f"(model {t.model}, cache {t.cache.label}, category {t.category}, {summary.n_tokens} tokens, "
                 f"n_ctx {result.n_ctx}; {t.path}:{t.line})")
        message = f"{t.model} [{t.cache.label}] {t.category}: {describe(t, decision)} {where}"
        if decision.outcome is Outcome.FAIL:
            raise ThresholdFailed(message)
        policy = state.options.inconclusive
        if policy == "fail":
            raise ThresholdFailed(f"{message}; --kv-inconclusive=fail")
        if policy == "warn":
            warnings.warn(InconclusiveGate(message), stacklevel=1)

    def reportinfo(self) -> tuple[Path, int | None, str]:
        return self.path, self.threshold.line - 1, f"{self.threshold.test_id}: {self.threshold.rule}"


class MeasureItem(KVItemBase):
    """Evaluates one (model, cache config) that has no thresholds, so it shows in the report."""

    def __init__(self, *, model: str, cache: CacheConfig, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.model = model
        self.cache = cache
        self.add_marker("kvquality")
        self.add_marker(pytest.mark.xdist_group(f"{model}::{cache.label}"))

    def runtest(self) -> None:
        get_state(self.config).run(self.model, self.cache)

    def reportinfo(self) -> tuple[Path, int | None, str]:
        return self.path, None, f"{self.model}::{self.cache.label}::measure"


class MeasureCollector(pytest.Collector):
    """Parent of the measurement items; not a file, created after collection."""

    def collect(self) -> list[pytest.Item | pytest.Collector]:
        return []


def other_corpus(path: Path, state: KVState) -> str | None:
    """The corpus a threshold file's gates were measured on, when it is not this run's; None when
    they apply (the file names none, or this one)."""
    corpus = file_corpus(path)
    return corpus if corpus is not None and corpus != corpus_name(state.options.corpus) else None


def check_threshold_files(state: KVState) -> None:
    """Before collection (on the xdist controller too): a gate written twice (two files, or one
    config spelled two ways) or a --kv-thresholds path that gates none of the selected models is a
    usage error, not a gate that silently never runs. Files that do not parse are left to
    collection, which reports them with file, line and key."""
    where: dict[tuple[str, CacheConfig, str, str], Threshold] = {}
    gated: dict[Path, set[str]] = {}
    for path in state.threshold_paths:
        try:
            if other_corpus(path, state) is not None:  # gates of another corpus: not this run's
                continue
            thresholds = load_thresholds(path, state.known_model, None)
        except ThresholdError:
            continue
        gated[path] = {t.model for t in thresholds}
        for t in thresholds:
            key = (t.model, t.cache, t.category, t.metric)
            if key in where and t.model in state.model_names:
                first = where[key]
                raise pytest.UsageError(
                    f"pytest-kvquality: the gate {t.test_id} is defined twice: {first.path}:{first.line} "
                    f"({first.rule}) and {t.path}:{t.line} ({t.rule}); keep one")
            where[key] = t
    if not state.options.thresholds_given:
        return
    for given in state.options.thresholds:
        root = given.resolve()
        files = [p for p in gated if p == root or root in p.parents]
        models = set().union(*(gated[p] for p in files)) if files else set()
        if files and not models & set(state.model_names):
            raise pytest.UsageError(
                f"pytest-kvquality: --kv-thresholds {given} gates {', '.join(sorted(models)) or 'no model'}, none "
                f"of the selected models ({', '.join(state.model_names) or 'no --kv-model'}); its gates would "
                "not run")


def add_measure_items(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    state = get_state(config)
    if not state.model_names:
        return
    covered = {(i.threshold.model, i.threshold.cache) for i in items if isinstance(i, ThresholdItem)}
    tested = {m for m, _ in covered}
    tested |= {state.alias_of(str(i.callspec.params["kv_model"])) for i in items
               if hasattr(i, "callspec") and i.callspec.params.get("kv_model")}
    parent = MeasureCollector.from_parent(session, name="kvquality", path=config.rootpath,
                                          nodeid="kvquality")
    for alias in state.model_names:
        caches = state.options.caches
        if caches is None:
            # nothing else measures this model: measure the default configs so the run says something
            if alias in tested:
                continue
            caches = CacheConfig.parse_list(DEFAULT_CACHES)
        for cache in caches:
            if (alias, cache) not in covered:
                items.append(MeasureItem.from_parent(
                    parent, name=f"{alias}::{cache.label}::measure", model=alias, cache=cache))


def plan_order(session: pytest.Session) -> None:
    """Tell the run's session which (model, cache config) its items evaluate, in order, so the engine
    can make the next one's contexts ahead (``KVSession.planned``). Not on an xdist worker: it is
    handed its items as it goes, so the collected order says nothing of its own."""
    state = session.config.stash.get(STATE, None)
    if state is None or hasattr(session.config, "workerinput"):
        return
    order: list[tuple[str, CacheConfig]] = []
    for item in session.items:
        key = ((item.threshold.model, item.threshold.cache) if isinstance(item, ThresholdItem)
               else (item.model, item.cache) if isinstance(item, MeasureItem) else None)
        if key is not None and key not in order:
            order.append(key)
    state.session.planned = order


def start(config: pytest.Config) -> None:
    """Build the run's state (``state.configure``), check the threshold files of the selected models
    and put them on the collection list."""
    state = configure(config)
    check_threshold_files(state)
    config.stash[STATE] = state
    for p in state.threshold_paths:
        if str(p) not in config.args:
            config.args.append(str(p))


def threshold_file(file_path: Path, parent: pytest.Collector) -> pytest.Collector | None:
    """A threshold file chosen for this run (and no other YAML) as a collector."""
    state = parent.config.stash.get(STATE, None)
    if state is None or file_path.resolve() not in state.threshold_paths:
        return None
    resolved = file_path.resolve()
    try:
        resolved.relative_to(parent.config.rootpath)
    except ValueError:  # outside the rootdir: shipped files get a short stable id, others their full path
        shipped = resolved.parent == shipped_thresholds_dir().resolve()
        nodeid = f"thresholds/{file_path.name}" if shipped else resolved.as_posix()
        return ThresholdFile.from_parent(parent, path=file_path, nodeid=nodeid)
    return ThresholdFile.from_parent(parent, path=file_path)
