"""Where a long chunk's decode time goes with each way of reading its scored rows: the forward pass
alone (no row asked for), the raw logits copied to the host, and the rows reduced on the device
(``engine/device_reduction``); per micro-batch, and the scheduler's graph splits of one decode with
the reduction attached (``GGML_SCHED_DEBUG``).

    python benchmarks/device_reduction_profile.py [--ctx 8192] [--chunks 2] [--model PATH] [--bench LLAMA_BENCH]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import time

import llama_cpp  # before numpy (engine/llama.py says why)
import numpy as np

from pytest_kvquality.cache_config import CacheConfig
from pytest_kvquality.corpus import builtin_corpus, chunk_tokens
from pytest_kvquality.engine import llama
from pytest_kvquality.engine.protocol import ModelLoad
from pytest_kvquality.resolve import bundled_gguf


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ctx", type=int, default=8192)
    ap.add_argument("--chunks", type=int, default=2)
    ap.add_argument("--width", type=int, default=242, help="ids per row (top_k + tail_samples + 1)")
    ap.add_argument("--model", default="")
    ap.add_argument("--bench", default="", help="llama-bench of the same tree: pp at -b 512 and -b 2048")
    args = ap.parse_args()
    llama.init_backend()
    model = llama.LlamaBackend().load(ModelLoad(args.model or str(bundled_gguf()), -1))
    text = "\n\n".join(builtin_corpus().texts.values())
    chunks = chunk_tokens(model.tokenize(text), args.ctx, args.chunks, "all")
    ctx = model.context(CacheConfig.parse("q8_0"), args.ctx, 1, 512)
    scored = np.zeros(args.ctx, bool)
    scored[args.ctx // 2 :] = True
    rng = np.random.default_rng(0)
    ids = [rng.integers(0, model.n_vocab, (int(scored.sum()), args.width)).astype(np.int32)]

    def forward(c: np.ndarray, synced: bool) -> None:
        """One micro-batch per call, no row asked for; ``synced``: waiting for each, as a call whose
        rows are read does."""
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx.ctx), True)
        for a in range(0, c.size, ctx.n_batch):
            size = min(ctx.n_batch, c.size - a)
            ctx._tok[:size] = c[a : a + size]
            ctx._pos[:size] = np.arange(a, a + size, dtype=np.int32)
            ctx._out[:size] = 0
            ctx.batch.n_tokens = size
            assert llama_cpp.llama_decode(ctx.ctx, ctx.batch) == 0
            if synced:
                llama_cpp.llama_synchronize(ctx.ctx)

    ways = {
        "forward only": lambda c: forward(c, False),
        "forward, each call waited": lambda c: forward(c, True),
        "raw logits to the host": lambda c: list(ctx.scored_logits([(c, scored)])),
        "reduced on the device": lambda c: list(ctx.reduced_rows([(c, scored)], ids)),
    }
    n_out_ubatches = max(1, args.chunks * int(scored.sum()) // ctx.n_ubatch)
    for rnd in range(2):
        base = None
        for name, run in ways.items():
            t = time.perf_counter()
            for c in chunks:
                run(c)
            llama_cpp.llama_synchronize(ctx.ctx)
            s = time.perf_counter() - t
            base = s if base is None else base
            extra = (s - base) / n_out_ubatches * 1e3
            print(f"round {rnd}: {name:<24} {s:6.2f} s  ({chunks.size / s:8,.0f} tok/s; "
                  f"+{extra:5.1f} ms per scored micro-batch over forward only)", flush=True)
    ctx.close()
    os.environ["GGML_SCHED_DEBUG"] = "2"  # read when the scheduler is created
    llama._debug = []
    ctx = model.context(CacheConfig.parse("q8_0"), args.ctx, 1, 512)
    list(ctx.reduced_rows([(chunks[0], scored)], ids))
    lines, llama._debug = "".join(llama._debug).splitlines(), None
    os.environ["GGML_SCHED_DEBUG"] = "0"
    splits = [line for line in lines if "SPLIT" in line]
    print(f"scheduler splits logged with the reduction attached: {len(splits)}")
    for line in splits[-8:]:
        print("  " + line[:240])
    ctx.close()
    model.close()
    if args.bench:
        for b in (512, 2048):
            cmd = [args.bench, "-m", args.model or str(bundled_gguf()), "-p", str(args.ctx), "-n", "0", "-b", str(b),
                   "-ub", "512", "-ctk", "q8_0", "-ctv", "q8_0", "-fa", "1", "-r", "3", "-o", "csv"]
            out = subprocess.run(cmd, capture_output=True, text=True).stdout.strip().splitlines()
            print(f"llama-bench pp{args.ctx} -b {b}: {out[-1] if out else 'no output'}")


if __name__ == "__main__":
    main()
