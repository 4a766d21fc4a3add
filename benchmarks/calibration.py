"""Calibration of the gate bounds: how often does a gate set exactly at the true value pass?

Two steps, so the model time is paid once:

    python benchmarks/calibration.py collect OUT.npz --kv-model gemma3-270m --kv-cache q8_0,q4_0 [--kv-ctx 512]
    python benchmarks/calibration.py resample OUT.npz [--chunks 8,12,16,24] [--rounds 4000] [--markdown T.md]

``collect`` evaluates the built-in corpus (whole, or ``--kv-chunks N`` per category) and keeps the
per-token statistics in chunk order. ``resample`` treats each category's chunks as the population:
it draws k chunks per category with replacement (the truth is then exactly the population's value),
computes each gated metric's one-sided 95 % bound the way a gate does, and counts how often a gate
set at the true value passes. A correct bound passes at most ~5 % of the time; the old token-level σ
is shown beside it for comparison. docs/calibration.md holds the published table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def collect(args: argparse.Namespace) -> None:
    """Per-token statistics of each (cache config, category), in chunk order, saved to an .npz file."""
    from pytest_kvquality.cache_config import CacheConfig
    from pytest_kvquality.engine.client import WorkerEngine
    from pytest_kvquality.options import KVOptions
    from pytest_kvquality.registry import Registry
    from pytest_kvquality.session import KVSession

    options = KVOptions(n_ctx=args.kv_ctx, chunks=args.kv_chunks, skip_short_categories=True)
    engine = WorkerEngine(options.cache_dir / "logs")
    registry = Registry.load([Path(p) for p in args.kv_registry])
    session = KVSession(options, lambda: engine, registry)
    session.progress = print
    arrays: dict[str, np.ndarray] = {"rows_per_chunk": np.array(args.kv_ctx // 2 - 1)}
    try:
        model = session.model(args.kv_model)
        spec = session.load_spec(model)
        for cache in CacheConfig.parse_list(args.kv_cache):
            for cat, chunks in session.chunks(model).items():
                ref = session.reference(model, cat, chunks)
                run = engine.evaluate(spec, cache, chunks, ref)
                for name, values in run.stats.arrays().items():
                    arrays[f"{cache.label}|{cat}|{name}"] = values
                print(f"{cache.label} {cat}: {chunks.shape[0]} chunks, {len(run.stats)} tokens, "
                      f"{len(run.stats) / run.seconds:.0f} tok/s")
    finally:
        engine.close()
    arrays["environment"] = np.array(str(session.backend_info()))
    np.savez_compressed(args.out, **arrays)
    print(f"saved {args.out}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("collect", help="evaluate and keep per-token statistics")
    c.add_argument("out")
    c.add_argument("--kv-model", default="gemma3-270m")
    c.add_argument("--kv-cache", default="q8_0,q4_0")
    c.add_argument("--kv-ctx", type=int, default=512)
    c.add_argument("--kv-chunks", type=int, default=None)
    c.add_argument("--kv-registry", action="append", default=[])
    r = sub.add_parser("resample", help="false-pass rates of gates set at the true value")
    r.add_argument("data")
    r.add_argument("--chunks", default="8,12,16,24")
    r.add_argument("--rounds", type=int, default=4000)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--markdown", default=None)
    r.add_argument("--jobs", type=int, default=1, help="processes (the numbers do not depend on it)")
    args = parser.parse_args(argv)
    if args.command == "collect":
        collect(args)
    else:
        from pytest_kvquality.calibration import CalibrationData, calibration_rates, calibration_tables

        data = CalibrationData.load(Path(args.data))
        counts = [int(k) for k in args.chunks.split(",")]
        table = calibration_tables(calibration_rates(data, counts, args.rounds, args.seed, args.jobs))
        print(table)
        if args.markdown:
            Path(args.markdown).write_text(table + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
