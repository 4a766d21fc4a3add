"""Command-line options, their ini mirrors, and the resolved settings of a run.

Precedence: command line, then ini (pytest.ini / pyproject ``[tool.pytest.ini_options]``),
then environment (``KVQ_REF_DIR``, ``KVQ_CACHE_DIR``), then defaults.

Longer than our ~350-line limit on purpose: about half of it is the table of every option, which
is the point of the module.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import pytest

from .cache_config import DEFAULT_REFERENCE, CacheConfig
from .decode_geometry import decode_geometry
from .environment import default_cache_dir
from .gating import GATE_MODES, INCONCLUSIVE_POLICIES
from .markdown import markdown_table

if TYPE_CHECKING:  # baseline.py reads reports, which need numpy: imported when options are read
    from .baseline import Criterion

DEFAULT_N_CTX = 512
DEFAULT_CACHES = "q8_0,q4_0"
PACKAGE_DIR = Path(__file__).parent


def shipped_thresholds_dir() -> Path:
    inside = PACKAGE_DIR / "thresholds"  # installed wheel
    return inside if inside.is_dir() else PACKAGE_DIR.parent / "thresholds"  # source checkout


Kind = Literal["text", "int", "flag", "path", "paths", "texts"]

#: the ini type pytest gives each kind of option
_INI_TYPES: dict[str, str] = {"text": "string", "int": "string", "flag": "bool", "path": "string", "paths": "paths",
                              "texts": "args"}


@dataclass(frozen=True)
class Option:
    """One option, declared once: its flag, ``KVOptions`` field, kind, help (also the README's text),
    and how its text becomes a value. ``add_options``, ``KVOptions.from_config``, the sweep's command
    line and the README's options table are all made from ``OPTIONS``."""

    flag: str
    dest: str
    kind: Kind
    help: str
    metavar: str = ""
    choices: tuple[str, ...] = ()
    #: the value as read to the value kept; raises ``pytest.UsageError`` or a ``ValueError`` naming the problem
    parse: Callable[[Any], Any] | None = None
    #: --kv-compare: the value when the flag is given without one
    bare_value: str | None = None
    #: the ini key, when it is not the flag with underscores (``kv_models`` for the repeatable --kv-model)
    ini_key: str = ""

    @property
    def ini(self) -> str:
        return self.ini_key or self.flag[2:].replace("-", "_")

    @property
    def repeatable(self) -> bool:
        return self.kind in ("paths", "texts")

    def argparse_kwargs(self) -> dict[str, Any]:
        """How argparse (pytest's and the sweep's) declares it."""
        kwargs: dict[str, Any] = {"help": self.help.replace("%", "%%").replace("`", "")}
        if self.repeatable:
            kwargs.update(action="append", default=None)
        elif self.kind == "flag":
            kwargs.update(action="store_true", default=None)
        elif self.bare_value is not None:
            kwargs.update(nargs="?", const=self.bare_value, default=None)
        if self.kind == "int":
            kwargs["type"] = int
        if self.choices:
            kwargs["choices"] = self.choices
        return kwargs

    def readme_row(self) -> tuple[str, str, str]:
        value = f" [{self.metavar}]" if self.bare_value is not None else f" {self.metavar}" if self.metavar else ""
        if self.choices:
            value = " " + "\\|".join(self.choices)
        more = " (repeatable)" if self.repeatable else ""
        return f"`{self.flag}{value}`{more}", f"`{self.ini}`", self.help


def _criteria(texts: list[str]) -> list[Criterion]:
    from .baseline import BaselineError, Criterion

    try:  # a bad --kv-compare-fail is a usage error now, not at the end of the run
        return [Criterion.parse(t) for t in texts]
    except BaselineError as e:
        raise pytest.UsageError(f"pytest-kvquality: {e}") from e


def _baseline_name(text: str) -> str:
    from .baseline import BASELINE_NAME

    if not BASELINE_NAME.match(text):  # refused now, not after the run
        raise pytest.UsageError(f"pytest-kvquality: --kv-save {text!r}: a baseline name uses letters, "
                                "digits, '.', '_' and '-' only (e.g. feature-kv-fix)")
    return text


def _n_ctx(n: int) -> int:
    if n < 8 or n % 2:
        raise pytest.UsageError(f"--kv-ctx must be an even number >= 8, got {n}")
    return n


def _chunks(n: int) -> int:
    if n < 1:
        raise pytest.UsageError(f"--kv-chunks must be >= 1, got {n}")
    return n


def _rpc_servers(text: str) -> str:
    from .engine.rpc import parse_servers

    try:
        return ",".join(server.endpoint for server in parse_servers(text))
    except ValueError as e:
        raise pytest.UsageError(f"pytest-kvquality: {e}") from e


def _tensor_split(text: str) -> str:
    try:
        shares = [float(x) for x in text.split(",")]
    except ValueError:
        shares = []
    if not shares or any(x < 0 for x in shares) or not sum(shares) > 0:
        raise pytest.UsageError(f"pytest-kvquality: --kv-tensor-split {text!r}: expected shares such as 3,1 "
                                "(non-negative numbers, not all zero)")
    return ",".join(f"{x:g}" for x in shares)


#: --kv-split: llama.cpp's split modes
SPLIT_MODES = ("layer", "row", "tensor", "none")


def _at_least(flag: str, low: int) -> Callable[[int], int]:
    def check(n: int) -> int:
        if n < low:
            raise pytest.UsageError(f"{flag} must be >= {low}, got {n}")
        return n

    return check


OPTIONS: tuple[Option, ...] = (
    Option("--kv-model", "models", "texts",
           "model to evaluate: a registered alias (`gemma3-270m`, `qwen3.6-35b`, ...), a path to a `.gguf`, or "
           "a Hugging Face repository file as llama.cpp's `-hf` names it (`owner/repo:QUANT`, "
           "`owner/repo/file.gguf`)", "NAME", ini_key="kv_models"),
    Option("--kv-download", "download", "flag",
           "fetch a repository model (`owner/repo:QUANT`, or a registry entry with `hf:`) that is not in the "
           "local caches, with huggingface_hub into the Hugging Face hub cache"),
    Option("--kv-cache", "caches", "text",
           "cache configs, comma-separated: `q8_0,q4_0` (K = V), `q8_0/q4_0` (K / V), `q4_0:norot` (Hadamard "
           "rotation off), `f16:nofa` (flash attention off); default: those in the thresholds, else "
           f"`{DEFAULT_CACHES}`", "LIST", parse=lambda text: CacheConfig.parse_list(str(text))),
    Option("--kv-ctx", "n_ctx", "int", f"context size n_ctx (default {DEFAULT_N_CTX})", "N", parse=_n_ctx),
    Option("--kv-chunks", "chunks", "int", "at most N chunks per category (default: all)", "N", parse=_chunks),
    Option("--kv-corpus", "corpus", "path",
           "corpus: `.txt` files (category = file stem), `.jsonl` with `text` and `category` or chat `messages`, "
           "a directory, or `builtin:agent` (chat transcripts with tools); default: the built-in text corpus",
           "PATH"),
    Option("--kv-chat-template", "chat_template", "text",
           "chat template for chat corpora: a shipped name (`gemma3`) or a Jinja file; default: the registry "
           "entry's, else the GGUF's `tokenizer.chat_template`", "NAME|PATH"),
    Option("--kv-gen", "gen_prompts", "int",
           "greedy-decode N prompts per category with the reference and each cache and report where they first "
           f"diverge (default 0: off, or {16} when a threshold gates a `gen_*` metric)", "N",
           parse=_at_least("--kv-gen", 0)),
    Option("--kv-gen-tokens", "gen_tokens", "int", "tokens generated per prompt (default 128)", "N",
           parse=_at_least("--kv-gen-tokens", 1)),
    Option("--kv-gen-agree", "gen_agree", "int",
           "`gen_prefix_agree` counts prompts whose first N generated tokens agree (default 32)", "N",
           parse=_at_least("--kv-gen-agree", 1)),
    Option("--kv-thresholds", "thresholds", "paths",
           "threshold YAML file or directory (default: the shipped `thresholds/`)", "PATH"),
    Option("--kv-ref-dir", "ref_dir", "path",
           "reference cache directory (env `KVQ_REF_DIR`; default `<user cache>/pytest-kvquality/references`)",
           "DIR"),
    Option("--kv-regen", "regen", "flag", "rebuild the references even when cached"),
    Option("--kv-json", "json_path", "path", "write every result as JSON to this path", "PATH"),
    Option("--kv-gpu-layers", "gpu_layers", "int",
           "layers to offload to the GPU (-1 = all, the default when the build has a GPU)", "N"),
    Option("--kv-rpc", "rpc", "text",
           "llama.cpp RPC servers that take the model's layers and their KV cache: `ggml-rpc-server`s built "
           "from the same llama.cpp (docs/scale.md); the protocol is unauthenticated, keep them on a private "
           "network", "HOST:PORT,…", parse=_rpc_servers),
    Option("--kv-rpc-timeout", "rpc_timeout", "int",
           "with `--kv-rpc`: seconds without a word from the model worker before it is stopped and the test "
           "fails (a server that stopped answering; default 600)", "S", parse=_at_least("--kv-rpc-timeout", 1)),
    Option("--kv-split", "split_mode", "text",
           "how a model is spread over several devices, as llama.cpp's `--split-mode` (default `layer`)",
           choices=SPLIT_MODES),
    Option("--kv-tensor-split", "tensor_split", "text",
           "each device's share of the model, as llama.cpp's `--tensor-split` (e.g. `3,1`)", "A,B,…",
           parse=_tensor_split),
    Option("--kv-gpus-per-worker", "gpus_per_worker", "int",
           "GPUs each pytest-xdist worker's model gets (default 1; a model needing two GPUs runs under "
           "`-n 2` on four)", "N", parse=_at_least("--kv-gpus-per-worker", 1)),
    Option("--kv-registry", "registries", "paths", "model registry YAML (aliases -> paths, sha256)", "PATH"),
    Option("--kv-ref-cache", "ref_cache", "text",
           f"cache config of the reference (default `{DEFAULT_REFERENCE.label}`)", "CFG",
           parse=lambda text: CacheConfig.parse(str(text))),
    Option("--kv-ref-model", "ref_model", "text",
           "a different GGUF as the reference (e.g. higher-precision weights of the same model; the tokenizer "
           "must match, it is checked): measures weights and cache losses together", "NAME"),
    Option("--kv-exact", "exact", "flag",
           "evaluate the reference alongside the candidate with full logits (no cached reference)"),
    Option("--kv-batch", "n_batch", "int",
           "tokens per decode, as llama-perplexity's `-b` (default 2048): n_batch / n_ctx chunks are decoded "
           "at once, each in its own sequence, as llama-perplexity does; the geometry changes the last bits of "
           "the logits, so references are kept per geometry", "N", parse=_at_least("--kv-batch", 1)),
    Option("--kv-ubatch", "n_ubatch", "int",
           "tokens per micro-batch, as llama-perplexity's `-ub` (default 512); a scored micro-batch's logits "
           "are held on the host (n_ubatch x n_vocab x 4 bytes; four times that per context where rows are "
           "reduced on the GPU)", "N", parse=_at_least("--kv-ubatch", 1)),
    Option("--kv-swa-full", "swa_full", "flag",
           "keep sliding-window layers' KV cache at full n_ctx (llama.cpp's `--swa-full`); default off, as "
           "llama-server runs, so the reported memory is what a deployment allocates"),
    Option("--kv-require", "require", "flag",
           "a missing model, or a `kv_gpu` test without a GPU build, fails instead of skipping (for CI gates: "
           "a skip passes silently)"),
    Option("--kv-gate", "gate", "text",
           "what a threshold compares: `bound` (the one-sided 95 % confidence bound, default) or `mean`",
           choices=GATE_MODES),
    Option("--kv-inconclusive", "inconclusive", "text",
           "the verdict when the 95 % bounds straddle a threshold: `fail` (default), `warn` or `pass`",
           choices=INCONCLUSIVE_POLICIES),
    Option("--kv-storage", "storage", "path", "where baselines live (default `.kvquality/` in the rootdir)",
           "DIR"),
    Option("--kv-save", "save", "text", "save this run's results as baseline `NNNN_NAME.json`", "NAME",
           parse=_baseline_name),
    Option("--kv-compare", "compare", "text",
           "compare with a saved baseline: NUM, NAME, or the latest when no value is given", "NUM|NAME",
           bare_value="latest"),
    Option("--kv-compare-fail", "compare_fail", "texts",
           "fail on a regression against `--kv-compare`: `METRIC:X%` (relative) or `METRIC:X` (absolute), "
           "e.g. `kl_mean:10%` or `top1:0.005`", "EXPR", parse=_criteria),
    Option("--kv-markdown", "markdown_path", "path",
           "write a Markdown summary (table and failed gates) to this path; also appended to "
           "`$GITHUB_STEP_SUMMARY` when that is set", "PATH"),
)
OPTION_BY_FLAG = {o.flag: o for o in OPTIONS}


def add_options(parser: pytest.Parser) -> None:
    group = parser.getgroup("kvquality", "KV-cache quality (pytest-kvquality)")
    for o in OPTIONS:
        group.addoption(o.flag, dest=o.ini, **o.argparse_kwargs())
        parser.addini(o.ini, help=f"default for {o.flag}: {o.help}".replace("`", ""),
                      type=_INI_TYPES[o.kind])  # type: ignore[arg-type]


def add_to_argparse(parser: argparse.ArgumentParser, flags: Sequence[str],
                    overrides: dict[str, dict[str, Any]] | None = None) -> None:
    """Declare some of the plugin's options on another command line (the sweep's), as the plugin does."""
    for flag in flags:
        o = OPTION_BY_FLAG[flag]
        parser.add_argument(o.flag, dest=o.ini, **{**o.argparse_kwargs(), **(overrides or {}).get(flag, {})})


def options_table() -> str:
    """The README's options table (``python -m pytest_kvquality options-table``)."""
    return markdown_table(["option", "ini key", "what it does"], [o.readme_row() for o in OPTIONS], "lll")


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
    chat_template: str | None = None
    gen_prompts: int = 0
    gen_tokens: int = 128
    gen_agree: int = 32
    json_path: Path | None = None
    gpu_layers: int = -1
    rpc: str = ""
    rpc_timeout: int = 600
    split_mode: str = "layer"
    tensor_split: str = ""
    gpus_per_worker: int = 1
    registries: list[Path] = field(default_factory=list)
    ref_cache: CacheConfig = DEFAULT_REFERENCE
    ref_model: str | None = None
    #: leave out corpus categories too short for n_ctx instead of failing (the sweep's long contexts)
    skip_short_categories: bool = False
    exact: bool = False
    n_batch: int = 2048
    n_ubatch: int = 512
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
        """Every option of ``OPTIONS`` read, checked and parsed; then the defaults that depend on others."""
        o = cls()
        given: set[str] = set()
        for opt in OPTIONS:
            value = _read(config, opt)
            if value is not None:
                setattr(o, opt.dest, opt.parse(value) if opt.parse else value)
                given.add(opt.dest)
        o.thresholds_given = "thresholds" in given
        o.thresholds = o.thresholds or [shipped_thresholds_dir()]
        env_ref_dir = os.environ.get("KVQ_REF_DIR")
        if "ref_dir" not in given and env_ref_dir:
            o.ref_dir = Path(os.path.expanduser(env_ref_dir))
        o.storage = o.storage or config.rootpath / ".kvquality"
        if o.compare_fail and o.compare is None:
            raise pytest.UsageError("--kv-compare-fail needs --kv-compare (the baseline to compare with)")
        together = decode_geometry(o.n_batch, o.n_ubatch, o.n_ctx)[0]  # chunks per decode
        if together > 1 and o.n_ubatch < together:
            raise pytest.UsageError(
                f"--kv-ubatch {o.n_ubatch} is smaller than the {together} chunks each decode holds (--kv-batch "
                f"{o.n_batch} / --kv-ctx {o.n_ctx}): a micro-batch takes at least one token of each, so llama.cpp "
                f"would not decode the geometry asked for; raise --kv-ubatch or lower --kv-batch")
        o.models_from_command_line = _from_command_line(config, "kv_models")
        return o


def _read(config: pytest.Config, opt: Option) -> Any:
    """An option's value from the command line or the ini file, by its kind; None when not given."""
    if opt.kind == "int":
        return _int(config, opt.ini, opt.flag)
    if opt.kind == "path":
        return _path(config, opt.ini)
    raw = _get(config, opt.ini)
    if raw is None:
        return None
    if opt.kind == "paths":
        return _as_paths(config, raw)
    if opt.kind == "texts":
        return [str(v) for v in raw]
    if opt.kind == "flag":
        return bool(raw)
    text = str(raw)
    if opt.choices and text not in opt.choices:
        raise pytest.UsageError(f"{opt.flag} must be one of {', '.join(opt.choices)}, got {text!r}")
    return text


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
    ours = [opt.flag for opt in OPTIONS]
    args = list(config.invocation_params.args)
    spaced = [f"{a} {args[i + 1]}" for i, a in enumerate(args[:-1])
              if a in ours and os.path.exists(os.path.join(config.invocation_params.dir, args[i + 1]))]
    raise pytest.UsageError(
        f"pytest-kvquality: pytest took a value of {', '.join(spaced) or 'a --kv-* option'} for a test path "
        f"while choosing its rootdir, so the rootdir became {config.rootpath} (ini file "
        f"{config.inipath or 'none'}) instead of {rootpath} ({inipath or 'none'}). Write the option with "
        f"'=', e.g. {spaced[0].replace(' ', '=', 1) if spaced else '--kv-corpus=/path'}.")

