"""Test helpers imported by test modules (conftest.py only declares fixtures): how pytester runs load
the plugin, and a home without this machine's model caches."""

from __future__ import annotations

import json
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


#: gates of the fake model: q8_0 passes, q4_0 fails its overall kl_mean
GATES = """
version: 1
models:
  tiny:
    q8_0:
      overall: {kl_mean: "< 0.5", top1: "> 0.5"}
    q4_0:
      overall: {kl_mean: "< 0.0001"}
      coding: {top1: "> 0.2"}
"""

ARGS = ["--kv-chunks", "8"]

#: the fake model's cache noise is scaled by FAKE_NOISE_SCALE: a "regression" for baseline tests
SCALED_CONFTEST = """
import os
from pytest_kvquality.testing import FakeEngine

def pytest_kvquality_make_engine(config):
    return FakeEngine(noise_scale=float(os.environ.get("FAKE_NOISE_SCALE", "1")))
"""


def measured(kv_project: pytest.Pytester, fake_model: Path, caches: str) -> dict[str, tuple[float, float]]:
    """The fake model's overall mean KLD and its σ between chunks (what gates use) per cache config,
    from a first run's JSON."""
    kv_project.runpytest("--kv-model", str(fake_model), "--kv-cache", caches, *ARGS,
                         "--kv-thresholds", str(kv_project.path), "--kv-json", "measured.json")
    doc = json.loads((kv_project.path / "measured.json").read_text())
    return {r["cache"]: (r["kl_mean"], r["stats"]["bounds"]["kl_mean"]["se"]) for r in doc["results"]
            if r["category"] == "overall"}


def run_with_scale(kv_project: pytest.Pytester, fake_model: Path, monkeypatch: pytest.MonkeyPatch,
                   scale: float, *extra: str) -> pytest.RunResult:
    monkeypatch.setenv("FAKE_NOISE_SCALE", str(scale))
    return kv_project.runpytest("--kv-model", str(fake_model), "--kv-cache", "q8_0,q4_0", *ARGS,
                                "--kv-thresholds", str(kv_project.path), *extra)
