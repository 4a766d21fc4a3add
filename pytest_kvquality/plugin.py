"""pytest-kvquality: options, hooks and fixtures. The work is done elsewhere (see README, "Design")."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from . import __version__
from .options import KVOptions, add_options

if TYPE_CHECKING:
    from .cache_config import CacheConfig
    from .session import ConfigResult, KVSession


def pytest_addoption(parser: pytest.Parser) -> None:
    """Register the ``--kv-*`` options and their ini mirrors."""
    add_options(parser)


def pytest_addhooks(pluginmanager: pytest.PytestPluginManager) -> None:
    """Offer ``pytest_kvquality_make_engine`` to conftests (fakes in tests)."""
    from . import hookspecs

    pluginmanager.add_hookspecs(hookspecs)


def pytest_configure(config: pytest.Config) -> None:
    """Build the run's state and put the threshold files of the selected models on the collection list."""
    config.addinivalue_line("markers", "kvquality: a KV-cache quality gate or measurement")
    config.addinivalue_line("markers", "xdist_group(name): run items of one group on one xdist worker")
    from .cache_config import CacheConfigError
    from .collect import STATE, KVState
    from .registry import Registry, RegistryError
    from .session import KVSession

    try:
        options = KVOptions.from_config(config)
        registry = Registry.load(options.registries)
    except (CacheConfigError, RegistryError) as e:
        raise pytest.UsageError(f"pytest-kvquality: {e}") from e

    def make_engine() -> Any:
        custom = config.hook.pytest_kvquality_make_engine(config=config)
        if custom is not None:
            return custom
        import os

        from .engine import WorkerEngine, worker_gpu_env

        env = worker_gpu_env(os.environ, os.environ.get("PYTEST_XDIST_WORKER"))
        return WorkerEngine(options.cache_dir / "logs", env=env)

    state = KVState(config, options, KVSession(options, make_engine, registry))
    config.stash[STATE] = state
    if config.get_verbosity() >= 0:  # -q hides progress
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

        state.session.progress = progress
    for p in state.threshold_paths:
        if str(p) not in config.args:
            config.args.append(str(p))


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> pytest.Collector | None:
    """Collect the threshold files chosen for this run (and no other YAML)."""
    from .collect import STATE, ThresholdFile

    state = parent.config.stash.get(STATE, None)
    if state is None or file_path.resolve() not in state.threshold_paths:
        return None
    try:
        file_path.resolve().relative_to(parent.config.rootpath)
    except ValueError:  # shipped or out-of-tree file: a short, stable node id
        return ThresholdFile.from_parent(parent, path=file_path, nodeid=f"thresholds/{file_path.name}")
    return ThresholdFile.from_parent(parent, path=file_path)


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config,
                                  items: list[pytest.Item]) -> None:
    """Add a measurement item for each selected (model, cache config) that has no threshold."""
    from .collect import add_measure_items

    add_measure_items(session, config, items)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Run tests that use ``kv_model`` (or ``kv_eval``) once per ``--kv-model``."""
    if "kv_model" in metafunc.fixturenames:
        from .collect import get_state

        names: list[str | None] = [*get_state(metafunc.config).model_names] or [None]
        metafunc.parametrize("kv_model", names, indirect=True,
                            ids=[str(n) if n else "no-kv-model" for n in names])


def pytest_report_header(config: pytest.Config) -> list[str]:
    """Say what will be measured and where references are kept."""
    from .collect import get_state

    state = get_state(config)
    o = state.options
    if not o.models:
        return [f"kvquality {__version__}: no --kv-model given"]
    return [
        f"kvquality {__version__}: models {', '.join(o.models)}; n_ctx {o.n_ctx}; "
        f"reference {o.ref_cache.label}{' (exact, no cache)' if o.exact else ''}",
        f"kvquality references: {o.ref_dir}",
    ]


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    """Print the results table (merged from all xdist workers)."""
    from .collect import get_state

    state = get_state(config)
    report = state.report
    report.merge(state.session.to_report())
    if not report.records and not report.notes:
        return
    terminalreporter.write_sep("=", "KV-cache quality")
    env = report.environment
    if env:
        terminalreporter.write_line(
            f"llama-cpp-python {env.get('llama_cpp_python', '?')}, "
            f"{'GPU' if env.get('gpu_offload') else 'CPU'}, reference {state.options.ref_cache.label}, "
            f"corpus {env.get('corpus', '?')}"
        )
    for line in report.table():
        terminalreporter.write_line(line)
    for note in report.notes:
        terminalreporter.write_line(f"note: {note}", yellow=True)
    if state.options.json_path:
        terminalreporter.write_line(f"results written to {state.options.json_path}")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Write ``--kv-json``, hand results to the xdist controller, stop the model worker."""
    from .collect import STATE

    state = session.config.stash.get(STATE, None)
    if state is None:
        return
    report = state.report
    report.merge(state.session.to_report())
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:
        workeroutput["kvquality"] = report.dumps()
    elif state.options.json_path and report.records:
        report.write_json(state.options.json_path)
    state.session.close()


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: Any) -> None:
    """On the xdist controller: merge a worker's results."""
    from .collect import STATE
    from .report import Report

    data = getattr(node, "workeroutput", {}).get("kvquality")
    state = node.config.stash.get(STATE, None)
    if data and state is not None:
        state.report.merge(Report.loads(data))


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="session")
def kv_session(pytestconfig: pytest.Config) -> KVSession:
    """The run's evaluation session: models, references and memoised results."""
    from .collect import get_state

    return get_state(pytestconfig).session


@pytest.fixture
def kv_model(request: pytest.FixtureRequest) -> str:
    """The ``--kv-model`` under test (tests using it run once per model)."""
    from .collect import get_state

    name = getattr(request, "param", None)
    if name is None:
        if get_state(request.config).options.require:
            pytest.fail("no --kv-model given and --kv-require is set", pytrace=False)
        pytest.skip("no --kv-model given")
    return str(name)


@pytest.fixture
def kv_eval(kv_model: str, pytestconfig: pytest.Config) -> Callable[..., ConfigResult]:
    """``kv_eval(k="q4_0", v="q4_0", rotation=True)`` -> statistics against the cached reference.

    Also ``kv_eval("q8_0/q4_0:norot")``. The result has ``.overall`` and
    ``result["coding"]`` summaries, and ``result.kl_mean`` etc. for overall.
    """
    from .cache_config import CacheConfig
    from .collect import get_state

    state = get_state(pytestconfig)

    def evaluate(spec: str | None = None, *, k: str = "f16", v: str | None = None,
                 rotation: bool = True, flash_attn: bool = True) -> ConfigResult:
        cache: CacheConfig = (CacheConfig.parse(spec) if spec
                              else CacheConfig(k, v or k, rotation, flash_attn))
        result: ConfigResult = state.run(kv_model, cache)
        return result

    return evaluate

