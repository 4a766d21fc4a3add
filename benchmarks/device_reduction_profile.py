"""Where a long chunk's decode time goes with each way of reading its scored rows: the forward pass
alone (no row asked for), the raw logits copied to the host, and the rows reduced on the device
(``engine/device_reduction``); per micro-batch, and the scheduler's graph splits of one decode with
the reduction attached (``GGML_SCHED_DEBUG``).

    python benchmarks/device_reduction_profile.py [--ctx 8192] [--chunks 2] [--model PATH]
"""

from __future__ import annotations

import argparse
import os
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
    args = ap.parse_args()
    llama.init_backend()
    model = llama.LlamaBackend().load(ModelLoad(args.model or str(bundled_gguf()), -1))
    text = "\n\n".join(builtin_corpus().texts.values())
    chunks = chunk_tokens(model.tokenize(text), args.ctx, args.chunks, "all")
    ctx = model.context(CacheConfig.parse("q8_0"), args.ctx, 1, 512)
    scored = np.zeros(args.ctx, bool)
    scored[args.ctx // 2 :] = True
    none = np.zeros(args.ctx, bool)
    rng = np.random.default_rng(0)
    ids = [rng.integers(0, model.n_vocab, (int(scored.sum()), args.width)).astype(np.int32)]
    ways = {
        "forward only": lambda c: list(ctx.scored_logits([(c, none)])),
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


if __name__ == "__main__":
    main()
