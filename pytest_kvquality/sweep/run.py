"""Running a sweep: the grid over one engine, resumable, each config saved as it is measured."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import __version__
from ..cache_config import CacheConfig, CacheConfigError
from ..engine.protocol import SPEED_PHASES, Engine, EngineError
from ..environment import default_cache_dir, host_backend
from ..files import atomic_write
from ..options import KVOptions
from ..registry import Registry, RegistryError
from ..session import KVSession, ModelUnavailable
from .data import SPEED_ROUNDS, Compounding, Sweep, SweepError, SweepRow, grid
from .report import write_report


def run(args: argparse.Namespace, command: str, engine_factory: Callable[[], Engine] | None = None,
        say: Callable[[str], None] | None = None) -> Sweep:
    """Run the grid the parsed command line (``cli.sweep_parser``) asks for and write the report;
    returns what it measured."""
    say = say or (lambda text: print(text, file=sys.stderr, flush=True))
    try:
        caches = grid(_parse_list(args.k_types), _parse_list(args.v_types),
                      [r == "on" for r in _parse_list(args.rotation)], CacheConfig.parse_list(args.kv_cache))
        weights_caches = CacheConfig.parse_list(args.weights_cache)
        registry = Registry.load(args.kv_registry or [])
    except (CacheConfigError, RegistryError) as e:
        raise SweepError(f"sweep: {e}") from e
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sweep = _start(args.resume, out, command, say)
    engine = (engine_factory or _worker_engine)()
    try:
        for n_ctx in (int(x) for x in _parse_list(args.kv_ctx)):
            _measure_grid(sweep, args, KVSession(_options(args, n_ctx), lambda: engine, registry), caches, out, say)
        if args.weights:
            _compounding(sweep, args, engine, registry, weights_caches, say)
    finally:
        engine.close()
        _save(sweep, out)
    write_report(sweep, out)
    return sweep


def _parse_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _worker_engine() -> Engine:
    from ..engine.client import WorkerEngine

    return WorkerEngine(default_cache_dir() / "logs")


def _start(resume: bool, out: Path, command: str, say: Callable[[str], None]) -> Sweep:
    """A new sweep, or with ``resume`` the one in OUT/sweep.json (if it was measured the same way)."""
    backend = host_backend()
    environment = {"plugin": __version__, "llama_cpp_python": backend.llama_cpp_python, "ggml": backend.ggml,
                   "backend": backend.label, "date": time.strftime("%Y-%m-%d"), "commands": [command]}
    if not (resume and (out / "sweep.json").exists()):
        return Sweep(environment=environment)
    sweep = Sweep.load(out / "sweep.json")
    _check_resumable(sweep.environment, environment, out)
    sweep.failures = []  # what failed before is tried again
    sweep.environment["commands"] = sweep.environment.get("commands", []) + environment["commands"]
    say(f"sweep: resuming {out / 'sweep.json'}: {len(sweep.rows)} configs already measured")
    return sweep


def _measure_grid(sweep: Sweep, args: argparse.Namespace, session: KVSession, caches: list[CacheConfig],
                  out: Path, say: Callable[[str], None]) -> None:
    """Every model x cache config at the session's n_ctx not measured yet, saved one by one."""
    n_ctx = session.options.n_ctx
    session.progress = say
    corpus = {"corpus": session.corpus.name, "corpus_sha256": session.corpus.content_hash()}
    _check_resumable(sweep.environment, corpus, out)
    sweep.environment.update(corpus)
    for model in args.kv_models:
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


#: what must match for a resumed sweep's rows to be comparable with the new ones
RESUME_KEYS = ("llama_cpp_python", "ggml", "backend", "corpus_sha256")


def _check_resumable(saved: dict[str, Any], now: dict[str, Any], out: Path) -> None:
    """Refuse to mix rows measured with another llama.cpp, backend or corpus into one report."""
    differ = [f"{k}: {saved[k]} there, {now[k]} now" for k in RESUME_KEYS
              if k in saved and k in now and saved[k] != now[k]]
    if differ:
        raise SweepError(f"sweep: {out / 'sweep.json'} was measured differently ({'; '.join(differ)}); "
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
    o = KVOptions(n_ctx=n_ctx, chunks=args.kv_chunks, ref_model=ref_model, skip_short_categories=True)
    o.gpu_layers = -1 if args.kv_gpu_layers is None else args.kv_gpu_layers
    o.corpus = Path(args.kv_corpus) if args.kv_corpus else None
    if args.kv_ref_dir:
        o.ref_dir = Path(args.kv_ref_dir)
    return o


def _compounding(sweep: Sweep, args: argparse.Namespace, engine: Engine, registry: Registry,
                 caches: list[CacheConfig], say: Callable[[str], None]) -> None:
    """KL(weights only), KL(cache only), KL(both) against the first model with an f16 cache."""
    n_ctx = int(_parse_list(args.kv_ctx)[0])
    base_name = args.kv_models[0]
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
