"""Command-line options, their ini mirrors, and the resolved settings of a run.

Precedence: command line, then ini (pytest.ini / pyproject ``[tool.pytest.ini_options]``),
then environment (``KVQ_REF_DIR``, ``KVQ_CACHE_DIR``), then defaults.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from .cache_config import DEFAULT_REFERENCE, CacheConfig

DEFAULT_N_CTX = 512
DEFAULT_CACHES = "q8_0,q4_0"
PACKAGE_DIR = Path(__file__).parent


def _shipped_thresholds_dir() -> Path:
    inside = PACKAGE_DIR / "thresholds"  # installed wheel
    return inside if inside.is_dir() else PACKAGE_DIR.parent / "thresholds"  # source checkout


# (option, ini key, ini type, help) -- every option has an ini mirror
OPTIONS: list[tuple[str, str, str, str, dict[str, Any]]] = [
    ("--kv-model", "kv_models", "args",
     "model to evaluate: a registered alias (e.g. gemma3-270m) or a path to a .gguf file; "
     "repeatable", {"action": "append", "default": None}),
    ("--kv-cache", "kv_cache", "string",
     "cache configs, comma-separated: 'q8_0,q4_0' (K=V), 'q8_0/q4_0' (K/V), 'q4_0:norot' "
     "(rotation off), ':nofa' (flash attention off); default: those in the thresholds, "
     f"else {DEFAULT_CACHES}", {}),
    ("--kv-ctx", "kv_ctx", "string", f"context size n_ctx (default {DEFAULT_N_CTX})", {"type": int}),
    ("--kv-chunks", "kv_chunks", "string", "at most N chunks per category (default: all)",
     {"type": int}),
    ("--kv-corpus", "kv_corpus", "string",
     "corpus: .txt files (category = file stem), .jsonl with text/category, or a directory; "
     "default: the built-in corpus", {}),
    ("--kv-thresholds", "kv_thresholds", "paths",
     "threshold YAML file or directory; repeatable (default: the shipped thresholds)",
     {"action": "append", "default": None}),
    ("--kv-ref-dir", "kv_ref_dir", "string",
     "reference cache directory (env KVQ_REF_DIR; default: the user cache dir)", {}),
    ("--kv-regen", "kv_regen", "bool", "recompute the references even when cached",
     {"action": "store_true", "default": None}),
    ("--kv-json", "kv_json", "string", "write results as JSON to this path", {}),
    ("--kv-gpu-layers", "kv_gpu_layers", "string",
     "layers to offload to the GPU (-1 = all, the default when the build has a GPU)", {"type": int}),
    ("--kv-registry", "kv_registry", "paths", "model registry YAML (aliases -> paths); repeatable",
     {"action": "append", "default": None}),
    ("--kv-ref-cache", "kv_ref_cache", "string",
     f"cache config of the reference (default {DEFAULT_REFERENCE.label})", {}),
    ("--kv-exact", "kv_exact", "bool",
     "evaluate the reference alongside the candidate with full logits (no cached reference)",
     {"action": "store_true", "default": None}),
    ("--kv-require", "kv_require", "bool",
     "fail instead of skipping when a model is missing (for CI gates)",
     {"action": "store_true", "default": None}),
]


def add_options(parser: pytest.Parser) -> None:
    group = parser.getgroup("kvquality", "KV-cache quality (pytest-kvquality)")
    for opt, ini, ini_type, help_text, kwargs in OPTIONS:
        group.addoption(opt, dest=ini, help=help_text, **kwargs)
        parser.addini(ini, help=f"default for {opt}: {help_text}", type=ini_type)  # type: ignore[arg-type]


def _get(config: pytest.Config, name: str) -> Any:
    value = config.getoption(name)
    if value is None or value == []:
        value = config.getini(name)
        if value in ("", [], None):
            return None
    return value


def _as_paths(config: pytest.Config, value: Any) -> list[Path]:
    if value is None:
        return []
    return [Path(os.path.expanduser(str(v))) for v in value]


def default_cache_dir() -> Path:
    env = os.environ.get("KVQ_CACHE_DIR")
    if env:
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_cache_dir("pytest-kvquality"))


@dataclass
class KVOptions:
    models: list[str] = field(default_factory=list)
    caches: list[CacheConfig] | None = None
    n_ctx: int = DEFAULT_N_CTX
    chunks: int | None = None
    corpus: Path | None = None
    thresholds: list[Path] = field(default_factory=list)
    ref_dir: Path = field(default_factory=lambda: default_cache_dir() / "references")
    cache_dir: Path = field(default_factory=default_cache_dir)
    regen: bool = False
    json_path: Path | None = None
    gpu_layers: int = -1
    registries: list[Path] = field(default_factory=list)
    ref_cache: CacheConfig = DEFAULT_REFERENCE
    exact: bool = False
    require: bool = False

    @classmethod
    def from_config(cls, config: pytest.Config) -> KVOptions:
        o = cls()
        models = _get(config, "kv_models")
        o.models = [str(m) for m in models] if models else []
        caches = _get(config, "kv_cache")
        o.caches = CacheConfig.parse_list(str(caches)) if caches else None
        n_ctx = _get(config, "kv_ctx")
        if n_ctx is not None:
            o.n_ctx = int(n_ctx)
        if o.n_ctx < 8 or o.n_ctx % 2:
            raise pytest.UsageError(f"--kv-ctx must be an even number >= 8, got {o.n_ctx}")
        chunks = _get(config, "kv_chunks")
        o.chunks = int(chunks) if chunks is not None else None
        if o.chunks is not None and o.chunks < 1:
            raise pytest.UsageError(f"--kv-chunks must be >= 1, got {o.chunks}")
        corpus = _get(config, "kv_corpus")
        o.corpus = Path(os.path.expanduser(str(corpus))) if corpus else None
        o.thresholds = _as_paths(config, _get(config, "kv_thresholds")) or [_shipped_thresholds_dir()]
        ref_dir = _get(config, "kv_ref_dir") or os.environ.get("KVQ_REF_DIR")
        if ref_dir:
            o.ref_dir = Path(os.path.expanduser(str(ref_dir)))
        o.regen = bool(_get(config, "kv_regen"))
        js = _get(config, "kv_json")
        o.json_path = Path(str(js)) if js else None
        gl = _get(config, "kv_gpu_layers")
        o.gpu_layers = int(gl) if gl is not None else -1
        o.registries = _as_paths(config, _get(config, "kv_registry"))
        ref_cache = _get(config, "kv_ref_cache")
        if ref_cache:
            o.ref_cache = CacheConfig.parse(str(ref_cache))
        o.exact = bool(_get(config, "kv_exact"))
        o.require = bool(_get(config, "kv_require"))
        return o
