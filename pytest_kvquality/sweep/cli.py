"""The sweep's command line: its arguments (the plugin's shared options declared once, in
``options.OPTIONS``) and ``run_sweep``; ``pytest_kvquality.cli`` puts it under ``sweep``."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence

from ..engine.protocol import Engine
from ..options import DEFAULT_N_CTX, add_to_argparse
from .data import DEFAULT_TYPES, DEFAULT_WEIGHTS_CACHE, Sweep
from .run import run

#: the plugin's options the sweep takes as they are (``options.OPTIONS``)
SHARED_OPTIONS = ("--kv-model", "--kv-chunks", "--kv-corpus", "--kv-registry", "--kv-ref-dir", "--kv-gpu-layers")


def add_sweep_arguments(p: argparse.ArgumentParser) -> None:
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


def run_sweep(argv: Sequence[str], engine_factory: Callable[[], Engine] | None = None,
              say: Callable[[str], None] | None = None) -> Sweep:
    """``sweep ARGV`` (without the word ``sweep``): run the grid, write the report."""
    parser = argparse.ArgumentParser(prog="python -m pytest_kvquality sweep")
    add_sweep_arguments(parser)
    return run(parser.parse_args(argv), " ".join(argv), engine_factory, say)
