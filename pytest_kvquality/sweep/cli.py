"""``python -m pytest_kvquality``: ``sweep`` (run a grid), ``report`` (redraw a report from its
sweep.json), ``options-table`` (the README's options table, from the plugin's one table)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from ..engine.protocol import Engine
from ..options import DEFAULT_N_CTX, add_to_argparse, options_table
from .data import DEFAULT_TYPES, DEFAULT_WEIGHTS_CACHE, Sweep, SweepError
from .report import write_report
from .run import run

#: the plugin's options the sweep takes as they are (``options.OPTIONS``)
SHARED_OPTIONS = ("--kv-model", "--kv-chunks", "--kv-corpus", "--kv-registry", "--kv-ref-dir", "--kv-gpu-layers")


def _add_sweep_arguments(p: argparse.ArgumentParser) -> None:
    add_to_argparse(p, SHARED_OPTIONS, {"--kv-model": {"required": True}})
    p.add_argument("--k-types", default=DEFAULT_TYPES, help=f"K cache types (default {DEFAULT_TYPES})")
    p.add_argument("--v-types", default=DEFAULT_TYPES, help=f"V cache types (default {DEFAULT_TYPES})")
    p.add_argument("--rotation", default="on,off", help="on, off or on,off (default)")
    p.add_argument("--kv-cache", default="", help="more cache configs outside the grid, in the plugin's syntax "
                                                  "(e.g. f32,bf16,q4_0:norot)")
    p.add_argument("--kv-ctx", default=str(DEFAULT_N_CTX), help="context sizes, e.g. 512,8192")
    p.add_argument("--speed", action="store_true",
                   help="also time prompt processing (n_ctx tokens) and generation (128 tokens) per config")
    p.add_argument("--resume", action="store_true",
                   help="keep the results already in OUT/sweep.json and measure only what is missing "
                        "(also extends a sweep with new configs or n_ctx)")
    p.add_argument("--weights", default="", help="requantize the first model's weights to these types "
                                                 "(e.g. Q3_K_M,Q2_K) and measure weights x cache compounding")
    p.add_argument("--weights-cache", default=DEFAULT_WEIGHTS_CACHE,
                   help=f"cache configs for the compounding table (default {DEFAULT_WEIGHTS_CACHE})")
    p.add_argument("--out", default="kvq-sweep", help="output directory (default kvq-sweep)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pytest_kvquality")
    commands = p.add_subparsers(dest="command", required=True)
    _add_sweep_arguments(commands.add_parser(
        "sweep", help="grid of models x K types x V types x rotation: a model-selection report",
        description="Grid of models x K types x V types x rotation: a model-selection report."))
    report = commands.add_parser("report", help="redraw DIR/report.md and its plots from DIR/sweep.json")
    report.add_argument("dir", type=Path)
    commands.add_parser("options-table", help="print the README's options table")
    return p


def run_sweep(argv: Sequence[str], engine_factory: Callable[[], Engine] | None = None,
              say: Callable[[str], None] | None = None) -> Sweep:
    """``sweep ARGV`` (without the word ``sweep``): run the grid, write the report."""
    return run(build_parser().parse_args(["sweep", *argv]), " ".join(argv), engine_factory, say)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # argparse: usage printed
        return int(e.code or 0)
    try:
        if args.command == "options-table":
            print(options_table())
            return 0
        if args.command == "report":  # e.g. plots on a machine with matplotlib
            write_report(Sweep.load(args.dir / "sweep.json"), args.dir)
            print(f"report: {args.dir / 'report.md'}")
            return 0
        sweep = run(args, " ".join(argv[1:]))
    except SweepError as e:
        print(e, file=sys.stderr)
        return 2
    print(f"{len(sweep.rows)} configs measured, {len(sweep.failures)} not; report: {Path(args.out) / 'report.md'}")
    return 1 if sweep.failures else 0
