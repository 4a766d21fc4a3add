"""Shared fixtures: fake GGUF models and a pytester project wired to the fake engine."""

from __future__ import annotations

import os
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from pytest_kvquality.testing import CONFTEST, write_fake_gguf

#: Is the plugin loaded by its entry point? Not in an uninstalled checkout (the GPU host runs one
#: with -p pytest_kvquality.plugin), nor with PYTEST_DISABLE_PLUGIN_AUTOLOAD set.
PLUGIN_AUTOLOADED = not os.environ.get("PYTEST_DISABLE_PLUGIN_AUTOLOAD") and any(
    ep.value == "pytest_kvquality.plugin" for ep in entry_points(group="pytest11"))
#: ini line that loads the plugin in pytester runs when the entry point does not
LOAD_PLUGIN = "" if PLUGIN_AUTOLOADED else "addopts = -p pytest_kvquality.plugin"
#: the same, for command lines (a subprocess, or a run whose ini file is not found)
PLUGIN_ARGS = [] if PLUGIN_AUTOLOADED else ["-p", "pytest_kvquality.plugin"]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "real_model: runs the bundled Gemma 3 270M through llama.cpp")


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


def isolate_model_caches(monkeypatch: pytest.MonkeyPatch, home: Path) -> None:
    """Point every place models are looked for (hub.py) into ``home``, so no test sees this machine's."""
    monkeypatch.setenv("HOME", str(home))
    for var in ("HF_HOME", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "LLAMA_CACHE", "OLLAMA_MODELS", "XDG_CACHE_HOME",
                "HF_HUB_OFFLINE", "HF_ENDPOINT", "HF_TOKEN"):
        monkeypatch.delenv(var, raising=False)
