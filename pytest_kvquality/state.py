"""The plugin's one façade: ``KVState``, kept in ``config.stash``, which every hook hands off to. It
builds the run (options, registry, session, threshold files), answers items and fixtures, and
finishes the run (merging xdist workers' reports, writing the outputs)."""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any, TypeVar

import pytest

from .cache_config import CacheConfig, CacheConfigError
from .engine.protocol import Engine
from .options import DEFAULT_CACHES, KVOptions, check_rootdir
from .outputs import RunOutputs, finish
from .registry import ModelNotFound, Registry, RegistryError
from .report import Report, SkipRecord
from .resolve import check_available, gating_alias
from .results import ConfigResult
from .session import KVSession, ModelUnavailable
from .thresholds import threshold_files

STATE = pytest.StashKey["KVState"]()
T = TypeVar("T")


class KVState:
    """Per-run plugin state, kept in ``config.stash``."""

    def __init__(self, config: pytest.Config, options: KVOptions, session: KVSession) -> None:
        self.config = config
        self.options = options
        self.session = session
        self.report = Report()
        #: what the end of the run wrote and compared (set by pytest_sessionfinish)
        self.outputs: RunOutputs | None = None
        self.threshold_paths = threshold_files(options.thresholds) if options.models else []
        # --kv-model value by canonical alias, so a path keeps working under its alias
        self.model_names: dict[str, str] = {}
        for name in options.models:
            self.model_names.setdefault(self.alias_of(name), name)

    def alias_of(self, name: str) -> str:
        """The name a --kv-model value is gated under (``resolve.gating_alias``)."""
        return gating_alias(name, self.session.registry, self.options.cache_dir, os.environ)

    def known_model(self, name: str) -> str | None:
        if self.session.registry.lookup(name) is not None:
            return self.session.registry.canonical(name)
        return name if name in self.model_names else None

    def speed_caches(self) -> list[CacheConfig]:
        """Configs a ``kv_cache`` test runs for: --kv-cache, else f16 next to the defaults."""
        return self.options.caches or CacheConfig.parse_list("f16," + DEFAULT_CACHES)

    def categories(self) -> list[str]:
        return self.session.corpus.categories

    def model_name(self, alias: str) -> str:
        """The --kv-model value (alias or path) behind a canonical alias."""
        return self.model_names.get(alias, alias)

    def _available(self, alias: str, work: Callable[[], T]) -> T:
        """Run ``work``; an unavailable model skips the item (fails it under --kv-require), and the
        skip is counted for the summary, so a gate that did not run is in plain sight."""
        try:
            return work()
        except ModelUnavailable as e:
            if self.options.require:
                pytest.fail(f"--kv-require is set and model {alias} is not available: {e}", pytrace=False)
            self.session.skipped.append(SkipRecord(alias, str(e)))
            pytest.skip(str(e))

    def speed_target(self, alias: str, cache: CacheConfig, phase: str) -> Callable[[], float]:
        """A timed pass for kv_speed."""
        return self._available(alias, lambda: self.session.speed_target(self.model_name(alias), cache, phase))

    def run(self, alias: str, cache: CacheConfig) -> ConfigResult:
        """Evaluate for an item."""
        return self._available(alias, lambda: self.session.evaluate(self.model_name(alias), cache))


def get_state(config: pytest.Config) -> KVState:
    return config.stash[STATE]


def configure(config: pytest.Config) -> KVState:
    """The run's state: options read and checked, models named on the command line found (or a usage
    error that says where it looked), the session, progress lines on the terminal."""
    check_rootdir(config)
    try:
        options = KVOptions.from_config(config)
        registry = Registry.load(options.registries)
    except (CacheConfigError, RegistryError) as e:
        raise pytest.UsageError(f"pytest-kvquality: {e}") from e
    if options.models_from_command_line:
        _check_models_available(config, options, registry)
    state = KVState(config, options, KVSession(options, _engine_factory(config, options), registry))
    for warning in rpc_warnings(options.rpc):
        state.session.notes.append(warning)
        config.issue_config_time_warning(pytest.PytestConfigWarning(f"pytest-kvquality: {warning}"), stacklevel=2)
    if config.get_verbosity() >= 0:  # -q hides progress
        state.session.progress = _progress_printer(config)
    return state


def rpc_warnings(rpc: str) -> list[str]:
    """A warning per --kv-rpc server outside loopback and the private ranges (the protocol has no
    authentication); nothing is sent to any server here."""
    from .engine.rpc import is_private, parse_servers

    public = [s for s in parse_servers(rpc) if not is_private(s.host)]
    return [f"--kv-rpc server {s.endpoint} is not on loopback or a private network: llama.cpp's RPC protocol is "
            "unauthenticated, so anyone who can reach it can use it" for s in public]


def _check_models_available(config: pytest.Config, options: KVOptions, registry: Registry) -> None:
    capture = config.pluginmanager.getplugin("capturemanager")
    # a download's progress bar goes to the terminal, not into pytest's capture
    with capture.global_and_fixture_disabled() if capture and options.download else nullcontext():
        for name in options.models:
            try:
                check_available(registry, name, os.environ, options.cache_dir, options.download)
            except ModelNotFound as e:
                raise pytest.UsageError(f"pytest-kvquality: --kv-model {name}: {e}") from e


def _engine_factory(config: pytest.Config, options: KVOptions) -> Callable[[], Engine]:
    """A conftest's ``pytest_kvquality_make_engine`` (the fake), else the model worker, which gets
    this xdist worker's GPU."""
    def make_engine() -> Engine:
        custom: Engine | None = config.hook.pytest_kvquality_make_engine(config=config)
        if custom is not None:
            return custom
        from .engine.client import WorkerEngine, worker_gpu_env

        env = worker_gpu_env(os.environ, os.environ.get("PYTEST_XDIST_WORKER"), per_worker=options.gpus_per_worker)
        return WorkerEngine(options.cache_dir / "logs", env=env,
                            reply_timeout=float(options.rpc_timeout) if options.rpc else None)

    return make_engine


def _progress_printer(config: pytest.Config) -> Callable[[str], None]:
    def progress(text: str) -> None:  # the reporter registers after us: look it up when used
        reporter = config.pluginmanager.get_plugin("terminalreporter")
        capture = config.pluginmanager.get_plugin("capturemanager")
        if reporter is None:
            return
        if capture is None:
            reporter.write_line(f"[kvquality] {text}")
            return
        with capture.global_and_fixture_disabled():  # progress is written during a test
            reporter.write_line(f"[kvquality] {text}")

    return progress


def finish_session(session: pytest.Session) -> None:
    """Merge this process's results; on an xdist worker hand them to the controller, else write the
    outputs and compare baselines (a regression sets the exit status); stop the model worker."""
    state = session.config.stash.get(STATE, None)
    if state is None:
        return
    state.report.merge(state.session.to_report())
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:
        workeroutput["kvquality"] = state.report.dumps()
    else:
        state.outputs = finish(state.report, state.options, session)
    state.session.close()


def merge_worker(node: Any) -> None:
    """On the xdist controller: merge a finished worker's results."""
    data = getattr(node, "workeroutput", {}).get("kvquality")
    state = node.config.stash.get(STATE, None)
    if data and state is not None:
        state.report.merge(Report.loads(data))
