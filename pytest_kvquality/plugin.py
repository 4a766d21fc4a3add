"""pytest-kvquality: options, hooks and fixtures. The work is done elsewhere (docs/design.md)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from . import __version__
from .options import add_options

MARKERS = ("kvquality: a KV-cache quality gate or measurement",
           "xdist_group(name): run items of one group on one xdist worker",
           "kv_gpu: needs a GPU build of llama-cpp-python (skipped without one, failed under --kv-require)")

if TYPE_CHECKING:
    from pytest_benchmark.fixture import BenchmarkFixture

    from .cache_config import CacheConfig
    from .results import ConfigResult, SpeedResult
    from .session import KVSession


def pytest_addoption(parser: pytest.Parser) -> None:
    """Register the ``--kv-*`` options and their ini mirrors."""
    add_options(parser)


def pytest_addhooks(pluginmanager: pytest.PytestPluginManager) -> None:
    """Offer ``pytest_kvquality_make_engine`` to conftests (fakes in tests)."""
    from . import hookspecs

    pluginmanager.add_hookspecs(hookspecs)


def pytest_configure(config: pytest.Config) -> None:
    """Build the run's state and put the threshold files of the selected models on the collection list."""
    for marker in MARKERS:
        config.addinivalue_line("markers", marker)
    from .collect import start

    start(config)


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> pytest.Collector | None:
    """Collect the threshold files chosen for this run (and no other YAML)."""
    from .collect import threshold_file

    return threshold_file(file_path, parent)


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config,
                                  items: list[pytest.Item]) -> None:
    """Add a measurement item for each selected (model, cache config) that has no threshold."""
    from .collect import add_measure_items

    add_measure_items(session, config, items)


def pytest_collection_finish(session: pytest.Session) -> None:
    """The order the items evaluate (model, cache config) in, for the session to look ahead."""
    from .collect import plan_order

    plan_order(session)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Run tests that use ``kv_model`` (or ``kv_eval``) once per ``--kv-model``, and tests that
    use ``kv_cache`` once per ``--kv-cache`` config."""
    from .state import get_state

    if "kv_model" in metafunc.fixturenames:
        names: list[str | None] = [*get_state(metafunc.config).model_names] or [None]
        metafunc.parametrize("kv_model", names, indirect=True,
                            ids=[str(n) if n else "no-kv-model" for n in names])
    if "kv_cache" in metafunc.fixturenames:
        caches = get_state(metafunc.config).speed_caches()
        metafunc.parametrize("kv_cache", caches, ids=[c.label for c in caches])


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Skip ``kv_gpu`` tests without a GPU build (fail them under --kv-require)."""
    if item.get_closest_marker("kv_gpu") is None:
        return
    from .environment import host_backend
    from .state import get_state

    backend = host_backend()
    if backend.gpu is None:
        reason = (f"needs a GPU build of llama-cpp-python; llama-cpp-python {backend.llama_cpp_python} "
                  f"here is a CPU build")
        if get_state(item.config).options.require:
            pytest.fail(f"{reason} and --kv-require is set", pytrace=False)
        pytest.skip(reason)


def pytest_report_header(config: pytest.Config) -> list[str]:
    """Plugin and llama.cpp versions, the backend, what will be measured, where references live."""
    from .environment import host_backend
    from .state import get_state

    state = get_state(config)
    o = state.options
    b = host_backend()
    lines = [f"kvquality {__version__}: llama-cpp-python {b.llama_cpp_python} (ggml {b.ggml}), {b.label}; "
             f"references in {o.ref_dir}"]
    if not o.models:
        return [*lines, "kvquality: no --kv-model given"]
    gate = "95 % bound" if o.gate == "bound" else "plain mean"
    return [*lines, f"kvquality: models {', '.join(o.models)}; n_ctx {o.n_ctx}; reference {o.ref_cache.label}"
                    f"{' (exact, no cache)' if o.exact else ''}; gates on the {gate}, inconclusive -> "
                    f"{o.inconclusive}"]


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, exitstatus: int,
                            config: pytest.Config) -> None:
    """Print the results table (merged from all xdist workers), the baseline comparison, notes."""
    from .outputs import write_terminal_summary
    from .state import get_state

    state = get_state(config)
    write_terminal_summary(terminalreporter, state.report, state.options, state.outputs)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Merge results; on a worker hand them to the xdist controller, else write the outputs and
    compare baselines (a regression sets the exit status); stop the model worker."""
    from .state import finish_session

    finish_session(session)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: Any) -> None:
    """On the xdist controller: merge a worker's results."""
    from .state import merge_worker

    merge_worker(node)


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="session")
def kv_session(pytestconfig: pytest.Config) -> KVSession:
    """The run's evaluation session: models, references and memoised results."""
    from .state import get_state

    return get_state(pytestconfig).session


@pytest.fixture
def kv_model(request: pytest.FixtureRequest) -> str:
    """The ``--kv-model`` under test (tests using it run once per model)."""
    from .state import get_state

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
    from .state import get_state

    state = get_state(pytestconfig)

    def evaluate(spec: str | None = None, *, k: str = "f16", v: str | None = None,
                 rotation: bool = True, flash_attn: bool = True) -> ConfigResult:
        cache: CacheConfig = (CacheConfig.parse(spec) if spec
                              else CacheConfig(k, v or k, rotation, flash_attn))
        result: ConfigResult = state.run(kv_model, cache)
        return result

    return evaluate


@pytest.fixture
def kv_speed(kv_model: str, benchmark: BenchmarkFixture, pytestconfig: pytest.Config) -> Callable[..., SpeedResult]:
    """``kv_speed(cache, "pp" | "tg", rounds=5)``: time prompt processing (n_ctx tokens in
    batches) or generation (128 tokens, one per decode) with pytest-benchmark, so
    ``--benchmark-compare-fail`` works on it; tokens/s go to the summary table and JSON."""
    from .speed import measure_speed
    from .state import get_state

    return measure_speed(get_state(pytestconfig), kv_model, benchmark)

