"""Models named the ecosystem's way (``owner/repo:QUANT``, ``owner/repo/file.gguf``), found where
users' tools keep them: the Hugging Face hub cache, llama.cpp's cache, LM Studio and Ollama.

No network here (``download.py`` fetches). Each place looked is recorded, so a model that is not
found is an error that lists them all.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

#: llama.cpp's default tag when ``-hf owner/repo`` names no quant
DEFAULT_QUANT = "Q4_K_M"
SPLIT = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$", re.IGNORECASE)
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
OLLAMA_MODEL_LAYER = "application/vnd.ollama.image.model"
_REPO = r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*"


@dataclass(frozen=True)
class HubRef:
    """A GGUF in a Hugging Face repository: one file, or the quant llama.cpp's ``-hf`` would pick."""

    repo: str
    file: str | None = None
    quant: str | None = None
    revision: str | None = None
    sha256: str | None = None

    @property
    def tag(self) -> str:
        """The quant asked for, or llama.cpp's default."""
        return self.quant or DEFAULT_QUANT

    @property
    def label(self) -> str:
        return f"{self.repo}/{self.file}" if self.file else f"{self.repo}:{self.tag}"

    def wants(self, filename: str) -> bool:
        """Is ``filename`` (a name inside the repo) the file this names, or the first part of it?"""
        name = filename.rsplit("/", 1)[-1]
        if self.file:
            return filename == self.file or name == self.file
        if not name.lower().endswith(".gguf") or name.lower().startswith("mmproj"):
            return False
        split = SPLIT.search(name)
        if split and split.group(1) != "00001":
            return False
        stem = name[: split.start()] if split else name[: -len(".gguf")]
        quant = self.tag.lower()
        return stem.lower() == quant or bool(re.search(r"[-_.]" + re.escape(quant) + "$", stem.lower()))

    def pick(self, filenames: list[str]) -> str | None:
        """The file this names among a repo's files: the shortest matching name (``Q4_K_M`` before
        ``UD-Q4_K_M``), then the first in order."""
        matching = sorted((f for f in filenames if self.wants(f)), key=lambda f: (len(f), f))
        return matching[0] if matching else None


def parse_ref(text: str) -> HubRef | None:
    """``owner/repo:QUANT``, ``owner/repo/file.gguf`` or ``owner/repo`` (quant Q4_K_M); None for
    anything else (an alias, a local path)."""
    if text.startswith((".", "/", "~")) or os.path.exists(os.path.expanduser(text)):
        return None
    if text.lower().endswith(".gguf") and text.count("/") < 2:  # dir/model.gguf: a local path
        return None
    m = re.fullmatch(rf"({_REPO})(?::([A-Za-z0-9_.-]+))?", text)
    if m:
        return HubRef(m.group(1), quant=m.group(2).upper() if m.group(2) else None)
    m = re.fullmatch(rf"({_REPO})/(.+\.gguf)", text, re.IGNORECASE)
    if m:
        return HubRef(m.group(1), file=m.group(2))
    return None


@dataclass(frozen=True)
class Found:
    """A local copy: the file to load (a split model's first part), the place it came from, and its
    sha256 when the place states it (the hub's blob name, Ollama's digest), so it is not re-hashed."""

    path: Path
    where: str
    sha256: str | None = None


@dataclass
class Search:
    """Where a model was looked for, in order, for the message when it was not found."""

    looked: list[str] = field(default_factory=list)


def home(env: Mapping[str, str]) -> Path:
    return Path(env.get("HOME") or os.path.expanduser("~"))


def hub_cache(env: Mapping[str, str]) -> Path:
    """The Hugging Face hub cache, by huggingface_hub's rules (HF_HUB_CACHE, HF_HOME/hub, default)."""
    if env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE"):
        return Path(env.get("HF_HUB_CACHE") or env["HUGGINGFACE_HUB_CACHE"]).expanduser()
    if env.get("HF_HOME"):
        return Path(env["HF_HOME"]).expanduser() / "hub"
    xdg = env.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else home(env) / ".cache") / "huggingface" / "hub"


def llama_cpp_caches(env: Mapping[str, str]) -> list[Path]:
    """llama.cpp's caches: LLAMA_CACHE (today's llama.cpp keeps -hf downloads there in the hub
    layout), and the former default ~/.cache/llama.cpp with flat ``owner_repo_file.gguf`` names."""
    xdg = env.get("XDG_CACHE_HOME")
    former = (Path(xdg) if xdg else home(env) / ".cache") / "llama.cpp"
    given = [Path(env["LLAMA_CACHE"]).expanduser()] if env.get("LLAMA_CACHE") else []
    return list(dict.fromkeys([*given, former]))


def lm_studio_roots(env: Mapping[str, str]) -> list[Path]:
    return [home(env) / ".lmstudio" / "models", home(env) / ".cache" / "lm-studio" / "models"]


def ollama_roots(env: Mapping[str, str]) -> list[Path]:
    given = [Path(env["OLLAMA_MODELS"]).expanduser()] if env.get("OLLAMA_MODELS") else []
    return list(dict.fromkeys([*given, home(env) / ".ollama" / "models", Path("/usr/share/ollama/.ollama/models")]))


def find_local(ref: HubRef, env: Mapping[str, str], search: Search) -> Found | None:
    """The first local copy of ``ref``, in the order of docs/models.md: hub cache, llama.cpp, LM Studio,
    Ollama."""
    for found in _candidates(ref, env, search):
        return found
    return None


def _candidates(ref: HubRef, env: Mapping[str, str], search: Search) -> Iterator[Found]:
    hub = hub_cache(env)
    yield from _in_hub_layout(ref, hub, "Hugging Face hub cache", search)
    for root in llama_cpp_caches(env):
        if root != hub:
            yield from _in_hub_layout(ref, root, "llama.cpp cache", search)
        yield from _in_flat_dir(ref, root, ref.repo.replace("/", "_") + "_", "llama.cpp cache (former layout)",
                                search)
    owner, name = ref.repo.split("/", 1)
    for root in lm_studio_roots(env):
        yield from _in_flat_dir(ref, root / owner / name, "", "LM Studio models", search)
    for root in ollama_roots(env):
        yield from _in_ollama(ref, root, search)


def _in_hub_layout(ref: HubRef, root: Path, what: str, search: Search) -> Iterator[Found]:
    """A ``models--owner--repo`` tree, read through huggingface_hub's cache API."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    folder = root / ("models--" + ref.repo.replace("/", "--"))
    search.looked.append(f"{what}: {folder}")
    if not folder.is_dir():
        return
    try:
        info = scan_cache_dir(root)
    except (CacheNotFound, OSError):
        return
    for repo in info.repos:
        if repo.repo_type != "model" or repo.repo_id.lower() != ref.repo.lower():
            continue
        revisions = [r for r in repo.revisions if ref.revision is None or r.commit_hash.startswith(ref.revision)
                     or ref.revision in r.refs]
        # the ref ``main`` first, then the newest
        revisions.sort(key=lambda r: ("main" not in r.refs, -r.last_modified))
        for rev in revisions:
            files = {str(f.file_path.relative_to(rev.snapshot_path)): f for f in rev.files}
            chosen = ref.pick(sorted(files))
            if chosen is None or not _parts_present(files[chosen].file_path):
                continue
            blob = files[chosen].blob_path.name
            yield Found(files[chosen].file_path, f"found in the {what} {root} (revision {rev.commit_hash[:12]})",
                        blob if SHA256_HEX.match(blob) else None)


def _in_flat_dir(ref: HubRef, folder: Path, prefix: str, what: str, search: Search) -> Iterator[Found]:
    search.looked.append(f"{what}: {folder}/{prefix}*.gguf")
    if not folder.is_dir():
        return
    names = sorted(p.name[len(prefix):] for p in folder.iterdir() if p.name.startswith(prefix) and p.is_file())
    chosen = ref.pick(names)
    if chosen is not None and _parts_present(folder / (prefix + chosen)):
        yield Found(folder / (prefix + chosen), f"found in the {what} {folder}")


def _in_ollama(ref: HubRef, root: Path, search: Search) -> Iterator[Found]:
    """``ollama pull hf.co/owner/repo:QUANT``: manifest -> the model layer -> ``blobs/sha256-<hex>``."""
    tags = root / "manifests" / "hf.co" / ref.repo
    search.looked.append(f"Ollama: {tags}/{ref.tag}")
    if ref.file or not tags.is_dir():
        return
    for manifest in sorted(tags.iterdir()):
        if manifest.name.lower() != ref.tag.lower():
            continue
        try:
            layers = json.loads(manifest.read_text("utf-8")).get("layers", [])
        except (OSError, ValueError):
            continue
        for layer in layers:
            digest = str(layer.get("digest", ""))
            if layer.get("mediaType") == OLLAMA_MODEL_LAYER and digest.startswith("sha256:"):
                blob = root / "blobs" / digest.replace(":", "-")
                if blob.is_file():
                    yield Found(blob, f"found in Ollama's models {root} (manifest {manifest})",
                                digest.split(":", 1)[1])


def split_part_names(first: str) -> list[str]:
    """Every part of a split GGUF named by its first part (llama.cpp loads the others from the same
    folder); [first] for a single file."""
    m = SPLIT.search(first)
    if not m:
        return [first]
    total = int(m.group(2))
    return [f"{first[: m.start()]}-{i:05d}-of-{total:05d}.gguf" for i in range(1, total + 1)]


def split_parts(first: Path) -> list[Path]:
    return [first.with_name(n) for n in split_part_names(first.name)]


def _parts_present(first: Path) -> bool:
    return all(p.exists() for p in split_parts(first))


def fetch_command(ref: HubRef) -> str:
    what = ref.file or f"--include '*{ref.tag}*.gguf'"
    return f"pytest --kv-model {ref.label} --kv-download   (or: hf download {ref.repo} {what})"
