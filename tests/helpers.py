"""Test helpers imported by test modules (conftest.py only declares fixtures): how pytester runs load
the plugin, and a home without this machine's model caches."""

from __future__ import annotations

import os
from importlib.metadata import entry_points
from pathlib import Path

import pytest

#: Is the plugin loaded by its entry point? Not in an uninstalled checkout (the GPU host runs one
#: with -p pytest_kvquality.plugin), nor with PYTEST_DISABLE_PLUGIN_AUTOLOAD set.
PLUGIN_AUTOLOADED = not os.environ.get("PYTEST_DISABLE_PLUGIN_AUTOLOAD") and any(
    ep.value == "pytest_kvquality.plugin" for ep in entry_points(group="pytest11"))
#: ini line that loads the plugin in pytester runs when the entry point does not
LOAD_PLUGIN = "" if PLUGIN_AUTOLOADED else "addopts = -p pytest_kvquality.plugin"
#: the same, for command lines (a subprocess, or a run whose ini file is not found)
PLUGIN_ARGS = [] if PLUGIN_AUTOLOADED else ["-p", "pytest_kvquality.plugin"]


def isolate_model_caches(monkeypatch: pytest.MonkeyPatch, home: Path) -> None:
    """Point every place models are looked for (hub.py) into ``home``, so no test sees this machine's."""
    monkeypatch.setenv("HOME", str(home))
    for var in ("HF_HOME", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "LLAMA_CACHE", "OLLAMA_MODELS", "XDG_CACHE_HOME",
                "HF_HUB_OFFLINE", "HF_ENDPOINT", "HF_TOKEN"):
        monkeypatch.delenv(var, raising=False)
