"""Shared fixtures: fake GGUF models and a pytester project wired to the fake engine."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from helpers import LOAD_PLUGIN, isolate_model_caches, measured

from pytest_kvquality import kernels
from pytest_kvquality.corpus import builtin_corpus, chunk_tokens
from pytest_kvquality.engine.client import WorkerEngine
from pytest_kvquality.engine.protocol import ModelLoad
from pytest_kvquality.resolve import bundled_gguf
from pytest_kvquality.testing import CONFTEST, write_fake_gguf


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "real_model: runs the bundled Gemma 3 270M through llama.cpp")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Real-model tests first: under ``-n 2 --dist loadgroup`` (the README's command) both workers
    start on the long tests and finish together on the short ones."""
    items.sort(key=lambda item: item.get_closest_marker("real_model") is None)


@pytest.fixture(scope="module")
def gemma() -> ModelLoad:
    """The bundled Gemma 3 270M, all layers on the GPU when there is one (``$KVQ_GEMMA_GGUF``: another
    copy of it, e.g. the staged file on the GPU host)."""
    return ModelLoad(str(bundled_gguf()), -1)


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerEngine]:
    """A model worker for the module's real-model tests, closed after them."""
    e = WorkerEngine(tmp_path_factory.mktemp("worker-logs"))
    yield e
    e.close()


@pytest.fixture(scope="module")
def coding_chunks(request: pytest.FixtureRequest, engine: WorkerEngine, gemma: ModelLoad) -> np.ndarray:
    """The built-in coding text in the test module's ``N_CHUNKS`` (default 1) chunks of ``N_CTX`` tokens."""
    tokens = engine.tokenize(gemma, builtin_corpus().texts["coding"])
    return chunk_tokens(tokens, request.module.N_CTX, getattr(request.module, "N_CHUNKS", 1), "coding")


@pytest.fixture
def fresh_kernels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The compiled kernels built into this test's own cache, and no test sees another's loaded library."""
    monkeypatch.setenv("KVQ_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("KVQ_COMPILED", raising=False)
    kernels.reset()
    yield
    kernels.reset()


@pytest.fixture
def fake_model(tmp_path: Path) -> Path:
    """A tiny GGUF file the fake engine loads as a model."""
    return write_fake_gguf(tmp_path / "models" / "tiny.gguf", seed=7)


@pytest.fixture
def kv_project(pytester: pytest.Pytester, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    """A pytester directory whose conftest swaps in the fake engine and a private cache dir."""
    pytester.makeconftest(CONFTEST)
    pytester.makeini(f"""
        [pytest]
        {LOAD_PLUGIN}
        kv_ref_dir = {tmp_path / "refs"}
        kv_ctx = 64
    """)
    monkeypatch.setenv("KVQ_CACHE_DIR", str(tmp_path / "cache"))
    isolate_model_caches(monkeypatch, tmp_path / "home")
    return pytester


@pytest.fixture
def straddling(kv_project: pytest.Pytester, fake_model: Path) -> Path:
    """Gates from measured values: q4_0 passes clearly (8σ of room), q4_0/f16 sits at +0.5σ,
    inside the one-sided 95 % band, so neither pass nor fail can be claimed."""
    m = measured(kv_project, fake_model, "q4_0,q4_0/f16")
    (q4, q4_unc), (k4, k4_unc) = m["q4_0"], m["q4_0/f16"]
    kv_project.makefile(".yaml", gates=f"""
version: 1
models:
  tiny:
    q4_0:
      overall: {{kl_mean: "< {q4 + 8 * q4_unc:.6f}"}}
      coding: {{kl_mean: "< 9"}}
    q4_0/f16:
      overall: {{kl_mean: "< {k4 + 0.5 * k4_unc:.6f}"}}
""")
    return kv_project.path / "gates.yaml"
