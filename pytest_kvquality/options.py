"""Command-line options, their ini mirrors, and the resolved settings of a run.

Precedence: command line, then ini (pytest.ini / pyproject ``[tool.pytest.ini_options]``),
then environment (``KVQ_REF_DIR``, ``KVQ_CACHE_DIR``), then defaults.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from .cache_config import DEFAULT_REFERENCE, CacheConfig
from .environment import default_cache_dir
from .gating import GATE_MODES, INCONCLUSIVE_POLICIES

if TYPE_CHECKING:  # baseline.py reads reports, which need numpy: imported when options are read
    from .baseline import Criterion

DEFAULT_N_CTX = 512
DEFAULT_CACHES = "q8_0,q4_0"
PACKAGE_DIR = Path(__file__).parent


def shipped_thresholds_dir() -> Path:
    inside = PACKAGE_DIR / "thresholds"  # installed wheel
    return inside if inside.is_dir() else PACKAGE_DIR.parent / "thresholds"  # source checkout


# (option, ini key, ini type, help) -- every option has an ini mirror
OPTIONS: list[tuple[str, str, str, str, dict[str, Any]]] = [
    ("--kv-model", "kv_models", "args",
     "model to evaluate: a registered alias (e.g. gemma3-270m), a path to a .gguf file, or a "
     "Hugging Face repository file (owner/repo:QUANT, owner/repo/file.gguf); repeatable",
     {"action": "append", "default": None}),
    ("--kv-download", "kv_download", "bool",
     "fetch a model named as owner/repo:QUANT (or a registry entry with hf:) that is not in the local "
     "caches, with huggingface_hub into the Hugging Face hub cache", {"action": "store_true", "default": None}),
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
    ("--kv-ref-model", "kv_ref_model", "string",
     "reference model (alias or .gguf) when it is not the candidate, e.g. higher-precision weights; "
     "it must share the tokenizer", {}),
    ("--kv-swa-full", "kv_swa_full", "bool",
     "keep sliding-window layers' KV cache at full n_ctx (llama.cpp's --swa-full); default off, as "
     "llama-server runs, so the reported memory is what a deployment allocates",
     {"action": "store_true", "default": None}),
    ("--kv-exact", "kv_exact", "bool",
     "evaluate the reference alongside the candidate with full logits (no cached reference)",
     {"action": "store_true", "default": None}),
    ("--kv-require", "kv_require", "bool",
     "fail instead of skipping when a model or the GPU is missing (for CI gates)",
     {"action": "store_true", "default": None}),
    ("--kv-gate", "kv_gate", "string",
     "what a threshold compares: 'bound' (one-sided 95 % confidence bound, default) or 'mean'",
     {"choices": GATE_MODES}),
    ("--kv-inconclusive", "kv_inconclusive", "string",
     "verdict when the 95 % bounds straddle a threshold: fail (default), warn or pass",
     {"choices": INCONCLUSIVE_POLICIES}),
    ("--kv-storage", "kv_storage", "string",
     "where --kv-save/--kv-compare keep baselines (default: .kvquality in the rootdir)", {}),
    ("--kv-save", "kv_save", "string", "save this run's results as a baseline named NAME", {}),
    ("--kv-compare", "kv_compare", "string",
     "compare with a saved baseline: NUM, NAME, or the latest when no value is given",
     {"nargs": "?", "const": "latest", "default": None}),
    ("--kv-compare-fail", "kv_compare_fail", "args",
     "fail on a regression against --kv-compare: METRIC:X% (relative) or METRIC:X (absolute), "
     "e.g. kl_mean:10% or top1:0.005; repeatable", {"action": "append", "default": None}),
    ("--kv-markdown", "kv_markdown", "string",
     "write a Markdown summary (table and failed gates) to this path; also appended to "
     "$GITHUB_STEP_SUMMARY when that is set", {}),
]


def add_options(parser: pytest.Parser) -> None:
    group = parser.getgroup("kvquality", "KV-cache quality (pytest-kvquality)")
    for opt, ini, ini_type, help_text, kwargs in OPTIONS:
        group.addoption(opt, dest=ini, help=help_text.replace("%", "%%"), **kwargs)  # argparse formats help
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


def _from_command_line(config: pytest.Config, name: str) -> bool:
    value = config.getoption(name)
    return value is not None and value != []


def _path(config: pytest.Config, name: str) -> Path | None:
    """A path option: from the command line relative to the current directory, from the ini file
    relative to the ini file's folder (as pytest resolves its own ``paths`` ini values)."""
    value = _get(config, name)
    if value is None:
        return None
    p = Path(os.path.expanduser(str(value)))
    if not _from_command_line(config, name) and not p.is_absolute() and config.inipath is not None:
        p = config.inipath.parent / p
    return p


def _int(config: pytest.Config, name: str, flag: str) -> int | None:
    """A whole-number option; a value that is not one is a usage error naming where it came from."""
    value = _get(config, name)
    if value is None:
        return None
    if isinstance(value, int):
        return value
    text = str(value).strip()
    try:
        return int(text)
    except ValueError:
        where = f"{flag}" if _from_command_line(config, name) else f"{name} = {value} in {config.inipath}"
        raise pytest.UsageError(f"pytest-kvquality: {where}: {text!r} is not a whole number") from None


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
    ref_model: str | None = None
    #: leave out corpus categories too short for n_ctx instead of failing (the sweep's long contexts)
    skip_short_categories: bool = False
    exact: bool = False
    swa_full: bool = False
    download: bool = False
    require: bool = False
    gate: str = "bound"
    inconclusive: str = "fail"
    storage: Path | None = None
    save: str | None = None
    compare: str | None = None
    compare_fail: list[Criterion] = field(default_factory=list)
    markdown_path: Path | None = None
    #: --kv-model given on the command line (an unknown one is a usage error; from the ini, a skip)
    models_from_command_line: bool = False
    #: --kv-thresholds given (a file among them that gates no selected model is an error)
    thresholds_given: bool = False

    @classmethod
    def from_config(cls, config: pytest.Config) -> KVOptions:
        from .baseline import BASELINE_NAME, BaselineError, Criterion

        o = cls()
        models = _get(config, "kv_models")
        o.models = [str(m) for m in models] if models else []
        caches = _get(config, "kv_cache")
        o.caches = CacheConfig.parse_list(str(caches)) if caches else None
        n_ctx = _int(config, "kv_ctx", "--kv-ctx")
        if n_ctx is not None:
            o.n_ctx = n_ctx
        if o.n_ctx < 8 or o.n_ctx % 2:
            raise pytest.UsageError(f"--kv-ctx must be an even number >= 8, got {o.n_ctx}")
        o.chunks = _int(config, "kv_chunks", "--kv-chunks")
        if o.chunks is not None and o.chunks < 1:
            raise pytest.UsageError(f"--kv-chunks must be >= 1, got {o.chunks}")
        o.corpus = _path(config, "kv_corpus")
        o.thresholds = _as_paths(config, _get(config, "kv_thresholds")) or [shipped_thresholds_dir()]
        ref_dir = _path(config, "kv_ref_dir") or os.environ.get("KVQ_REF_DIR")
        if ref_dir:
            o.ref_dir = Path(os.path.expanduser(str(ref_dir)))
        o.regen = bool(_get(config, "kv_regen"))
        o.json_path = _path(config, "kv_json")
        gl = _int(config, "kv_gpu_layers", "--kv-gpu-layers")
        o.gpu_layers = gl if gl is not None else -1
        o.registries = _as_paths(config, _get(config, "kv_registry"))
        ref_cache = _get(config, "kv_ref_cache")
        if ref_cache:
            o.ref_cache = CacheConfig.parse(str(ref_cache))
        ref_model = _get(config, "kv_ref_model")
        o.ref_model = str(ref_model) if ref_model else None
        o.exact = bool(_get(config, "kv_exact"))
        o.swa_full = bool(_get(config, "kv_swa_full"))
        o.download = bool(_get(config, "kv_download"))
        o.require = bool(_get(config, "kv_require"))
        o.gate = str(_get(config, "kv_gate") or "bound")
        o.inconclusive = str(_get(config, "kv_inconclusive") or "fail")
        for name, value, allowed in (("--kv-gate", o.gate, GATE_MODES),
                                     ("--kv-inconclusive", o.inconclusive, INCONCLUSIVE_POLICIES)):
            if value not in allowed:
                raise pytest.UsageError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
        o.storage = _path(config, "kv_storage") or config.rootpath / ".kvquality"
        o.save = _get(config, "kv_save")
        if o.save is not None and not BASELINE_NAME.match(str(o.save)):  # refused now, not after the run
            raise pytest.UsageError(f"pytest-kvquality: --kv-save {o.save!r}: a baseline name uses letters, "
                                    "digits, '.', '_' and '-' only (e.g. feature-kv-fix)")
        o.compare = _get(config, "kv_compare")
        try:  # a bad --kv-compare-fail is a usage error now, not at the end of the run
            o.compare_fail = [Criterion.parse(str(x)) for x in (_get(config, "kv_compare_fail") or [])]
        except BaselineError as e:
            raise pytest.UsageError(f"pytest-kvquality: {e}") from e
        if o.compare_fail and o.compare is None:
            raise pytest.UsageError("--kv-compare-fail needs --kv-compare (the baseline to compare with)")
        o.markdown_path = _path(config, "kv_markdown")
        o.models_from_command_line = _from_command_line(config, "kv_models")
        o.thresholds_given = bool(_get(config, "kv_thresholds"))
        return o


def check_rootdir(config: pytest.Config) -> None:
    """pytest picks its rootdir and ini file before this plugin's options exist, so the value of a
    space-separated ``--kv-corpus /x`` counts as a test path there and can move both (the project's
    pytest.ini then goes unread, baselines land elsewhere). Refuse that run, naming the fix."""
    try:
        from _pytest.config.findpaths import determine_setup
    except ImportError:  # pragma: no cover - a pytest without it: nothing to compare with
        return
    o = config.option
    if not hasattr(o, "file_or_dir"):  # --help, --version: nothing runs
        return
    try:
        rootpath, inipath, *_ = determine_setup(
            inifile=o.inifilename, override_ini=o.override_ini, args=list(o.file_or_dir or []),
            rootdir_cmd_arg=o.rootdir or None, invocation_dir=config.invocation_params.dir)
    except (TypeError, AttributeError):  # pragma: no cover - another pytest's signature: cannot check
        return
    if (rootpath, inipath) == (config.rootpath, config.inipath):
        return
    ours = [opt for opt, *_ in OPTIONS]
    args = list(config.invocation_params.args)
    spaced = [f"{a} {args[i + 1]}" for i, a in enumerate(args[:-1])
              if a in ours and os.path.exists(os.path.join(config.invocation_params.dir, args[i + 1]))]
    raise pytest.UsageError(
        f"pytest-kvquality: pytest took a value of {', '.join(spaced) or 'a --kv-* option'} for a test path "
        f"while choosing its rootdir, so the rootdir became {config.rootpath} (ini file "
        f"{config.inipath or 'none'}) instead of {rootpath} ({inipath or 'none'}). Write the option with "
        f"'=', e.g. {spaced[0].replace(' ', '=', 1) if spaced else '--kv-corpus=/path'}.")

