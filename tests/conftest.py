"""Shared fixtures: fake GGUF models and a pytester project wired to the fake engine."""

from __future__ import annotations

from importlib.metadata import entry_points
from pathlib import Path

import pytest

from pytest_kvquality.testing import CONFTEST, write_fake_gguf

PLUGIN_INSTALLED = any(ep.value == "pytest_kvquality.plugin" for ep in entry_points(group="pytest11"))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "real_model: runs the bundled Gemma 3 270M through llama.cpp")
    config.addinivalue_line("markers", "needs_gpu: needs a CUDA build and a GPU")


@pytest.fixture
def fake_model(tmp_path: Path) -> Path:
    """A tiny GGUF file the fake engine loads as a model."""
    return write_fake_gguf(tmp_path / "models" / "tiny.gguf", seed=7)


@pytest.fixture
def kv_project(pytester: pytest.Pytester, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    """A pytester directory whose conftest swaps in the fake engine and a private cache dir."""
    if not PLUGIN_INSTALLED:  # an uninstalled checkout (e.g. the GPU host): load it by name
        pytester.plugins.append("pytest_kvquality.plugin")
    pytester.makeconftest(CONFTEST)
    pytester.makeini(f"""
        [pytest]
        kv_ref_dir = {tmp_path / "refs"}
        kv_ctx = 64
    """)
    monkeypatch.setenv("KVQ_CACHE_DIR", str(tmp_path / "cache"))
    return pytester
