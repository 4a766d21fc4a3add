"""``python -m pytest_kvquality sweep``: the model-selection report.

A grid of models × K types × V types × rotation on/off × n_ctx, evaluated with the plugin's
engine, references and cache, plus weights × cache compounding (requantized variants of the first
model against its own f16-cache reference). Writes ``report.md``, ``sweep.json`` and, when
matplotlib is installed, ``pareto.png`` and ``positions.png``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import __version__
from .cache_config import UNQUANTIZED, CacheConfig, CacheConfigError
from .engine.protocol import SPEED_PHASES, Engine, EngineError
from .environment import default_cache_dir, host_backend
from .files import atomic_write
from .markdown import markdown_table
from .options import DEFAULT_N_CTX, KVOptions
from .registry import Registry, RegistryError
from .session import ConfigResult, KVSession, ModelUnavailable
from .thresholds import OVERALL

DEFAULT_TYPES = "f16,q8_0,q4_0"
DEFAULT_WEIGHTS_CACHE = "q8_0,q4_0"
#: timed rounds per speed phase in ``--speed`` (after one warm-up); the median is kept
SPEED_ROUNDS = 3


@dataclass
class SweepRow:
    """One evaluated (model, n_ctx, cache config)."""

    model: str
    n_ctx: int
    cache: CacheConfig
    kl_mean: float
    kl_mean_unc: float
    top1: float
    categories: dict[str, float]
    kv_bytes_per_token: float | None
    positions: list[dict[str, Any]]
    eval_seconds: float
    cpu_fallback: bool
    n_tokens: int = 0
    #: llama.cpp's prompt-processing and generation tokens/s with this cache (``--speed``)
    speed: dict[str, float] = field(default_factory=dict)
    #: KV MiB at 32k of context by llama.cpp's cell rule (sliding-window caches do not grow with n_ctx)
    kv_mib_per_32k: float | None = None

    @classmethod
    def of(cls, r: ConfigResult) -> SweepRow:
        o = r.overall
        return cls(r.model, r.n_ctx, r.cache, o.kl_mean, o.kl_mean_unc, o.top1,
                   {c: s.kl_mean for c, s in r.categories.items() if c != OVERALL},
                   r.context.kv_bytes_per_token, r.positions or [], r.eval_seconds,
                   bool(r.context.kv_cpu_fallback), o.n_tokens, kv_mib_per_32k=r.context.kv_mib_per_32k)

    @property
    def key(self) -> tuple[str, int, str]:
        return self.model, self.n_ctx, self.cache.label

    @property
    def scored_per_s(self) -> float:
        """End-to-end evaluation throughput: scored tokens per second, model and KL math included."""
        return self.n_tokens / self.eval_seconds if self.eval_seconds > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "n_ctx": self.n_ctx, "cache": self.cache.label,
                "type_k": self.cache.type_k, "type_v": self.cache.type_v, "rotation": self.cache.rotation,
                "kl_mean": self.kl_mean, "kl_mean_unc": self.kl_mean_unc, "top1": self.top1,
                "categories": self.categories, "kv_bytes_per_token": self.kv_bytes_per_token,
                "kv_mib_per_32k": self.kv_mib_per_32k,
                "positions": self.positions, "eval_seconds": self.eval_seconds, "n_tokens": self.n_tokens,
                "scored_per_s": self.scored_per_s, "speed": self.speed, "cpu_fallback": self.cpu_fallback}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> SweepRow:
        return cls(d["model"], d["n_ctx"], CacheConfig.parse(d["cache"]), d["kl_mean"], d["kl_mean_unc"],
                   d["top1"], d["categories"], d["kv_bytes_per_token"], d["positions"], d["eval_seconds"],
                   d["cpu_fallback"], d.get("n_tokens", 0), d.get("speed", {}), d.get("kv_mib_per_32k"))


@dataclass
class Compounding:
    """KL of lower-precision weights, of a quantized cache, and of both, against one reference."""

    weights: str
    cache: str
    kl_weights: float
    kl_cache: float
    kl_both: float
    top1_both: float

    @property
    def excess(self) -> float:
        """How far the combined loss is from the sum of the parts (0: they simply add up)."""
        return self.kl_both - (self.kl_weights + self.kl_cache)

    def to_json(self) -> dict[str, Any]:
        return {**self.__dict__, "sum": self.kl_weights + self.kl_cache, "excess": self.excess}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Compounding:
        return cls(d["weights"], d["cache"], d["kl_weights"], d["kl_cache"], d["kl_both"], d["top1_both"])


@dataclass
class Sweep:
    rows: list[SweepRow] = field(default_factory=list)
    compounding: list[Compounding] = field(default_factory=list)
    environment: dict[str, Any] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def has(self, key: tuple[str, int, str]) -> bool:
        return any(r.key == key for r in self.rows)

    def to_json(self) -> dict[str, Any]:
        return {"environment": self.environment, "rows": [r.to_json() for r in self.rows],
                "compounding": [c.to_json() for c in self.compounding], "failures": self.failures,
                "notes": self.notes}

    @classmethod
    def load(cls, path: Path) -> Sweep:
        """An earlier sweep.json, to resume or extend; a damaged one is an error, never silently dropped."""
        try:
            d = json.loads(path.read_text())
            return cls([SweepRow.from_json(r) for r in d["rows"]],
                       [Compounding.from_json(c) for c in d["compounding"]], d["environment"], d["failures"],
                       d["notes"])
        except (OSError, ValueError, KeyError, TypeError, CacheConfigError) as e:
            raise SystemExit(f"sweep: cannot read {path}: {e!r}; move it away (or drop --resume)") from e


def grid(k_types: Sequence[str], v_types: Sequence[str], rotations: Sequence[bool],
         extra: Sequence[CacheConfig] = ()) -> list[CacheConfig]:
    """K × V × rotation, then ``extra`` configs; rotation off only where something is quantized
    (it changes nothing else)."""
    out: list[CacheConfig] = []
    for k in k_types:
        for v in v_types:
            for rot in rotations:
                if not rot and {k, v} <= UNQUANTIZED:
                    continue
                c = CacheConfig(k, v, rot)
                if c not in out:
                    out.append(c)
    return out + [c for c in dict.fromkeys(extra) if c not in out]


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points (bytes, kld) no other point beats on both (fewer bytes and lower KLD)."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    front, best = [], float("inf")
    for i in order:
        if points[i][1] < best:
            front.append(i)
            best = points[i][1]
    return front


def _parse_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pytest_kvquality sweep",
                                description="Grid of models x K types x V types x rotation: a model-selection report.")
    p.add_argument("--kv-model", action="append", required=True, help="alias or .gguf path; repeatable")
    p.add_argument("--k-types", default=DEFAULT_TYPES, help=f"K cache types (default {DEFAULT_TYPES})")
    p.add_argument("--v-types", default=DEFAULT_TYPES, help=f"V cache types (default {DEFAULT_TYPES})")
    p.add_argument("--rotation", default="on,off", help="on, off or on,off (default)")
    p.add_argument("--kv-cache", default="", help="more cache configs outside the grid, in the plugin's syntax "
                                                  "(e.g. f32,bf16,q4_0:norot)")
    p.add_argument("--speed", action="store_true",
                   help="also time prompt processing (n_ctx tokens) and generation (128 tokens) per config")
    p.add_argument("--resume", action="store_true",
                   help="keep the results already in OUT/sweep.json and measure only what is missing "
                        "(also extends a sweep with new configs or n_ctx)")
    p.add_argument("--kv-ctx", default=str(DEFAULT_N_CTX), help="context sizes, e.g. 512,8192")
    p.add_argument("--kv-chunks", type=int, default=None, help="at most N chunks per category")
    p.add_argument("--kv-corpus", default=None, help="corpus path (default: the built-in corpus)")
    p.add_argument("--kv-registry", action="append", default=[], help="model registry YAML; repeatable")
    p.add_argument("--kv-ref-dir", default=None, help="reference cache directory")
    p.add_argument("--kv-gpu-layers", type=int, default=-1)
    p.add_argument("--weights", default="", help="requantize the first model's weights to these types "
                                                 "(e.g. Q3_K_M,Q2_K) and measure weights x cache compounding")
    p.add_argument("--weights-cache", default=DEFAULT_WEIGHTS_CACHE,
                   help=f"cache configs for the compounding table (default {DEFAULT_WEIGHTS_CACHE})")
    p.add_argument("--out", default="kvq-sweep", help="output directory (default kvq-sweep)")
    return p


def run_sweep(argv: Sequence[str], engine_factory: Callable[[], Engine] | None = None,
              say: Callable[[str], None] | None = None) -> Sweep:
    """Run the grid and write the report; returns what it measured."""
    args = build_parser().parse_args(list(argv))
    say = say or (lambda text: print(text, file=sys.stderr, flush=True))
    try:
        caches = grid(_parse_list(args.k_types), _parse_list(args.v_types),
                      [r == "on" for r in _parse_list(args.rotation)], CacheConfig.parse_list(args.kv_cache))
        weights_caches = CacheConfig.parse_list(args.weights_cache)
        registry = Registry.load([Path(r) for r in args.kv_registry])
    except (CacheConfigError, RegistryError) as e:
        raise SystemExit(f"sweep: {e}") from e
    if engine_factory is None:
        from .engine.client import WorkerEngine

        cache_dir = default_cache_dir()
        engine_factory = lambda: WorkerEngine(cache_dir / "logs")  # noqa: E731
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    backend = host_backend()
    environment = {"plugin": __version__, "llama_cpp_python": backend.llama_cpp_python, "ggml": backend.ggml,
                   "backend": backend.label, "date": time.strftime("%Y-%m-%d"), "commands": [" ".join(argv)]}
    sweep = Sweep(environment=environment)
    if args.resume and (out / "sweep.json").exists():
        sweep = Sweep.load(out / "sweep.json")
        _check_resumable(sweep.environment, environment, out)
        sweep.failures = []  # what failed before is tried again
        sweep.environment["commands"] = sweep.environment.get("commands", []) + environment["commands"]
        say(f"sweep: resuming {out / 'sweep.json'}: {len(sweep.rows)} configs already measured")
    engine = engine_factory()
    try:
        for n_ctx in (int(x) for x in _parse_list(args.kv_ctx)):
            options = _options(args, n_ctx)
            session = KVSession(options, lambda: engine, registry)
            session.progress = say
            corpus = {"corpus": session.corpus.name, "corpus_sha256": session.corpus.content_hash()}
            _check_resumable(sweep.environment, corpus, out)
            sweep.environment.update(corpus)
            for model in args.kv_model:
                for cache in caches:
                    if sweep.has((_alias(session, model), n_ctx, cache.label)):
                        continue
                    say(f"sweep: {model} {cache.label} n_ctx {n_ctx}")
                    try:
                        sweep.rows.append(_measure(session, model, cache, args.speed))
                    except (EngineError, ModelUnavailable, ValueError) as e:
                        sweep.failures.append(f"{model} {cache.label} n_ctx {n_ctx}: {e}")
                    sweep.notes += [n for n in session.notes if n not in sweep.notes]
                    _save(sweep, out)  # an interrupted sweep keeps every config measured so far
        if args.weights:
            _compounding(sweep, args, engine, registry, weights_caches, say)
    finally:
        engine.close()
        _save(sweep, out)
    write_report(sweep, out)
    return sweep


#: what must match for a resumed sweep's rows to be comparable with the new ones
RESUME_KEYS = ("llama_cpp_python", "ggml", "backend", "corpus_sha256")


def _check_resumable(saved: dict[str, Any], now: dict[str, Any], out: Path) -> None:
    """Refuse to mix rows measured with another llama.cpp, backend or corpus into one report."""
    differ = [f"{k}: {saved[k]} there, {now[k]} now" for k in RESUME_KEYS
              if k in saved and k in now and saved[k] != now[k]]
    if differ:
        raise SystemExit(f"sweep: {out / 'sweep.json'} was measured differently ({'; '.join(differ)}); "
                         "its rows would not compare with new ones: use another --out")


def _alias(session: KVSession, model: str) -> str:
    """The name a model's rows carry (its registry alias), or the argument when it cannot be found."""
    try:
        return session.model(model).alias
    except ModelUnavailable:
        return model


def _measure(session: KVSession, model: str, cache: CacheConfig, speed: bool) -> SweepRow:
    row = SweepRow.of(session.evaluate(model, cache))
    for phase in SPEED_PHASES if speed else ():
        run = session.speed_target(model, cache, phase)
        run()  # warm-up: the first pass pays for graph building and allocation
        row.speed[phase] = session.record_speed(model, cache, phase, [run() for _ in range(SPEED_ROUNDS)]).tokens_per_s
    return row


def _save(sweep: Sweep, out: Path) -> None:
    atomic_write(out / "sweep.json", json.dumps(sweep.to_json(), indent=2) + "\n")


def _options(args: argparse.Namespace, n_ctx: int, ref_model: str | None = None) -> KVOptions:
    o = KVOptions(n_ctx=n_ctx, chunks=args.kv_chunks, gpu_layers=args.kv_gpu_layers, ref_model=ref_model,
                  skip_short_categories=True)
    o.corpus = Path(args.kv_corpus) if args.kv_corpus else None
    if args.kv_ref_dir:
        o.ref_dir = Path(args.kv_ref_dir)
    return o


def _compounding(sweep: Sweep, args: argparse.Namespace, engine: Engine, registry: Registry,
                 caches: list[CacheConfig], say: Callable[[str], None]) -> None:
    """KL(weights only), KL(cache only), KL(both) against the first model with an f16 cache."""
    n_ctx = int(_parse_list(args.kv_ctx)[0])
    base_name = args.kv_model[0]
    options = _options(args, n_ctx, ref_model=base_name)
    session = KVSession(options, lambda: engine, registry)
    session.progress = say
    base = session.model(base_name)
    f16 = CacheConfig("f16", "f16")
    for weight_type in _parse_list(args.weights):
        variant = options.cache_dir / "models" / f"{base.path.stem}-requant-{weight_type}.gguf"
        if not variant.exists():
            say(f"sweep: requantizing {base.path.name} to {weight_type}")
            variant.parent.mkdir(parents=True, exist_ok=True)
            engine.quantize(str(base.path), str(variant), weight_type)
        try:
            w_only = session.evaluate(str(variant), f16).overall
            for cache in caches:
                if any(c.weights == weight_type and c.cache == cache.label for c in sweep.compounding):
                    continue
                c_only = session.evaluate(base_name, cache).overall
                both = session.evaluate(str(variant), cache).overall
                sweep.compounding.append(Compounding(weight_type, cache.label, w_only.kl_mean, c_only.kl_mean,
                                                     both.kl_mean, both.top1))
        except (EngineError, ModelUnavailable, ValueError) as e:
            sweep.failures.append(f"weights {weight_type}: {e}")


# ---------------------------------------------------------------- the report


def write_report(sweep: Sweep, out: Path) -> None:
    """report.md and the plots, from what ``sweep`` holds (run_sweep has saved sweep.json already)."""
    plots = _plots(sweep, out)
    (out / "report.md").write_text(markdown(sweep, plots))


def _table(head: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    return [*markdown_table(head, rows).split("\n"), ""]


def markdown(sweep: Sweep, plots: list[str] | str) -> str:
    env = sweep.environment
    out = ["# KV-cache model-selection report", "",
           f"{env.get('date')} · pytest-kvquality {env.get('plugin')} · llama-cpp-python "
           f"{env.get('llama_cpp_python')} (ggml {env.get('ggml')}) · {env.get('backend')} · corpus "
           f"{env.get('corpus', '?')}", "",
           *(f"`python -m pytest_kvquality sweep {c}`" for c in env.get("commands", [env.get("command", "")])), ""]
    for (model, n_ctx), rows in _groups(sweep.rows).items():
        out += [f"## {model}, n_ctx {n_ctx}", ""]
        by = {r.cache: r for r in rows}
        ks, vs = _grid_axes([r.cache for r in rows])
        out += ["Mean KLD, K type × V type (rotation on):", ""]
        out += _table(["K \\ V", *vs], [[k, *(_fmt(by.get(CacheConfig(k, v, True))) for v in vs)] for k in ks])
        quantized = [c for c in ks if c not in UNQUANTIZED]
        if quantized:
            out += ["Which half carries the loss — K only, V only, both (rotation on):", ""]
            out += _table(["type", "K only (V f16)", "V only (K f16)", "both"],
                          [[t, _fmt(by.get(CacheConfig(t, "f16", True))), _fmt(by.get(CacheConfig("f16", t, True))),
                            _fmt(by.get(CacheConfig(t, t, True)))] for t in quantized])
        rot = [(c, by[c], by.get(CacheConfig(c.type_k, c.type_v, False))) for c in by if c.rotation and c.quantized]
        if any(off is not None for _, _, off in rot):
            out += ["Hadamard rotation on and off:", ""]
            out += _table(["cache", "rotation on", "rotation off", "off / on"],
                          [[f"`{c.label}`", _fmt(on), _fmt(off),
                            f"{off.kl_mean / on.kl_mean:.2f}×" if off and on.kl_mean > 0 else "-"]
                           for c, on, off in rot])
        cats = list(dict.fromkeys(c for r in rows for c in r.categories))
        phases = [p for p in SPEED_PHASES if any(p in r.speed for r in rows)]
        out += ["Per category (mean KLD), memory, top-1 and throughput (scored tokens/s of the evaluation"
                + (", llama.cpp's pp/tg tokens/s" if phases else "") + "; ⚠ CPU: KV ops fell back to the CPU):", ""]
        out += _table(["cache", *cats, "overall ± σ", "same top", "KV B/token", "KV MiB per 32k", "scored tok/s",
                       *(f"{p} tok/s" for p in phases)],
                      [[f"`{r.cache.label}`" + (" ⚠ CPU" if r.cpu_fallback else ""),
                        *(f"{r.categories.get(c, 0):.5f}" for c in cats), f"{r.kl_mean:.5f} ± {r.kl_mean_unc:.5f}",
                        f"{100 * r.top1:.2f} %", f"{r.kv_bytes_per_token:,.0f}" if r.kv_bytes_per_token else "-",
                        f"{r.kv_mib_per_32k:,.0f}" if r.kv_mib_per_32k is not None else "-",
                        f"{r.scored_per_s:,.0f}", *(f"{r.speed[p]:,.0f}" if p in r.speed else "-" for p in phases)]
                       for r in rows])
        if rows and rows[0].positions:
            spans = [f"{p['start']}–{p['end'] - 1}" for p in rows[0].positions]
            out += ["Mean KLD by context position (the scored second half of each chunk):", ""]
            out += _table(["cache", *spans],
                          [[f"`{r.cache.label}`", *(f"{p['kl_mean']:.4f}" for p in r.positions)] for r in rows])
        front = pareto_front([(r.kv_bytes_per_token or 0.0, r.kl_mean) for r in rows])
        out += ["Pareto front (no other config has both fewer KV bytes and lower mean KLD): "
                + ", ".join(f"`{rows[i].cache.label}`" + (" ⚠ CPU" if rows[i].cpu_fallback else "") for i in front),
                ""]
    if sweep.compounding:
        out += ["## Weights × cache", "",
                "Against the original weights with an f16 cache: lower-precision weights alone, the cache alone, "
                "both; `excess` = both − (weights + cache).", ""]
        out += _table(["weights", "cache", "KL weights", "KL cache", "sum", "KL both", "excess", "same top (both)"],
                      [[c.weights, f"`{c.cache}`", f"{c.kl_weights:.5f}", f"{c.kl_cache:.5f}",
                        f"{c.kl_weights + c.kl_cache:.5f}", f"{c.kl_both:.5f}", f"{c.excess:+.5f}",
                        f"{100 * c.top1_both:.2f} %"] for c in sweep.compounding])
    if isinstance(plots, str):
        out += [f"Plots: {plots}", ""]
    else:
        out += [f"![{Path(p).stem}]({Path(p).name})" for p in plots] + [""]
    if sweep.failures:
        out += ["## Not measured", "", *(f"* {f}" for f in sweep.failures), ""]
    if sweep.notes:
        out += ["## Notes", "", *(f"* {n}" for n in sweep.notes), ""]
    return "\n".join(out)


def _grid_axes(caches: Sequence[CacheConfig]) -> tuple[list[str], list[str]]:
    """K and V types of the K × V table: those paired with more than one other type (a lone
    ``f32`` or ``bf16`` added with --kv-cache is in the per-category table, not a sparse column)."""
    pairs = {(c.type_k, c.type_v) for c in caches}
    ks = list(dict.fromkeys(k for k, _ in pairs if sum(1 for kk, _ in pairs if kk == k) > 1))
    vs = list(dict.fromkeys(v for _, v in pairs if sum(1 for _, vv in pairs if vv == v) > 1))
    order = list(dict.fromkeys(t for c in caches for t in (c.type_k, c.type_v)))
    if not ks or not vs:  # no grid at all: one column and row per config
        ks = list(dict.fromkeys(c.type_k for c in caches))
        vs = list(dict.fromkeys(c.type_v for c in caches))
    return sorted(ks, key=order.index), sorted(vs, key=order.index)


def _fmt(r: SweepRow | None) -> str:
    return f"{r.kl_mean:.5f}" if r is not None else "-"


def _groups(rows: list[SweepRow]) -> dict[tuple[str, int], list[SweepRow]]:
    out: dict[tuple[str, int], list[SweepRow]] = {}
    for r in rows:
        out.setdefault((r.model, r.n_ctx), []).append(r)
    return out


def _plots(sweep: Sweep, out: Path) -> list[str] | str:
    """PNG plots with matplotlib (an optional extra); the reason when there are none."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install 'pytest-kvquality[plots]'); tables only"
    made = []
    groups = _groups(sweep.rows)
    if groups:
        fig, axes = _panels(plt, len(groups))
        for ax, ((model, n_ctx), rows) in zip(axes, groups.items(), strict=True):
            positive = [r.kl_mean for r in rows if r.kl_mean > 0]
            floor = min(positive) / 3 if positive else 1e-6  # lossless configs drawn on the floor
            pts = [(r.kv_bytes_per_token or 0.0, max(r.kl_mean, floor)) for r in rows]
            front = sorted(pareto_front(pts), key=lambda i: pts[i][0])
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=14, alpha=0.5, label="every config")
            ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], "o--", color="C3", linewidth=1,
                    markersize=5, label="Pareto front")
            for n, i in enumerate(front):  # only the front is labelled: a full grid would be unreadable
                label = rows[i].cache.label + (" (0)" if rows[i].kl_mean <= 0 else "") + \
                    (" CPU!" if rows[i].cpu_fallback else "")
                ax.annotate(label, pts[i], fontsize=7, xytext=(4, 6 if n % 2 else -11), textcoords="offset points")
            _label_log_axes(ax, "KV cache bytes per token", "mean KLD against f16 (log)", f"{model}, n_ctx {n_ctx}", 8)
        made.append(_finish(plt, fig, "KV cache: quality against memory", out / "pareto.png"))
    # position profiles of the symmetric configs (K = V, rotation on): one panel per n_ctx
    by_ctx: dict[int, list[SweepRow]] = {}
    for r in sweep.rows:
        if r.positions and r.cache.quantized and r.cache.type_k == r.cache.type_v and r.cache.rotation:
            by_ctx.setdefault(r.n_ctx, []).append(r)
    if by_ctx:
        fig, axes = _panels(plt, len(by_ctx))
        for ax, (n_ctx, rows) in zip(axes, sorted(by_ctx.items()), strict=True):
            for r in rows:
                ax.plot([(p["start"] + p["end"]) / 2 for p in r.positions], [p["kl_mean"] for p in r.positions],
                        marker="o", markersize=3, label=f"{r.model} {r.cache.label}")
            _label_log_axes(ax, "context position", "mean KLD (log)", f"n_ctx {n_ctx}", 7)
        made.append(_finish(plt, fig, "Mean KLD by context position (K = V, rotation on)", out / "positions.png"))
    return made


def _panels(plt: Any, count: int) -> tuple[Any, Any]:
    """A figure with ``count`` panels side by side, and the row of their axes."""
    fig, axes = plt.subplots(1, count, figsize=(6.5 * count, 4.8), squeeze=False)
    return fig, axes[0]


def _label_log_axes(ax: Any, xlabel: str, ylabel: str, title: str, legend_size: int) -> None:
    """Axis labels, a log y axis, the panel title and the legend."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend(fontsize=legend_size)


def _finish(plt: Any, fig: Any, title: str, path: Path) -> str:
    """Title, lay out, write and close a figure; returns where it went."""
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


USAGE = ("usage: python -m pytest_kvquality sweep --kv-model MODEL [options]  (--help for the options)\n"
         "       python -m pytest_kvquality report DIR  (redraw DIR/report.md and plots from DIR/sweep.json)")


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) == 2 and args[0] == "report":  # e.g. plots on a machine with matplotlib
        out = Path(args[1])
        write_report(Sweep.load(out / "sweep.json"), out)
        print(f"report: {out / 'report.md'}")
        return 0
    if not args or args[0] != "sweep":
        print(USAGE, file=sys.stderr)
        return 2
    sweep = run_sweep(args[1:])
    out = Path(build_parser().parse_args(args[1:]).out)
    print(f"{len(sweep.rows)} configs measured, {len(sweep.failures)} not; report: {out / 'report.md'}")
    return 1 if sweep.failures else 0
