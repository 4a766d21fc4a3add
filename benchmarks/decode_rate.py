"""Where a greedy generation step's time goes, against llama-bench's tg: the same context decoding one
token at a time (a) as the speed op does (``decode_timed``: llama_decode only), (b) as generation
does (``next_logits`` + argmax), (c) with the reference's compaction of each step's row as well.

    python benchmarks/decode_rate.py MODEL.gguf [CACHE ...]

Prints tokens per second for each; run on the GPU host after ``source .gpu/bin/env.sh``.
"""

from __future__ import annotations

import sys
import time

# isort: off
from pytest_kvquality.engine.llama import LlamaBackend, init_backend  # llama_cpp before numpy (engine/worker.py)
import numpy as np
# isort: on

from pytest_kvquality.cache_config import CacheConfig
from pytest_kvquality.compaction import compact_rows
from pytest_kvquality.engine.protocol import ModelLoad

N = 128


def main() -> None:
    init_backend()
    model = LlamaBackend().load(ModelLoad(sys.argv[1], -1))
    for label in sys.argv[2:] or ["f16", "q8_0", "q4_0"]:
        ctx = model.context(CacheConfig.parse(label), 1024)
        tokens = np.arange(1000, 1000 + N, dtype=np.int32)
        ctx.decode_timed(tokens[:8], one_by_one=True)  # warm up
        t = time.perf_counter()
        ctx.decode_timed(tokens, one_by_one=True)
        bench = N / (time.perf_counter() - t)
        for compact in (False, True):
            rng = np.random.default_rng(0)
            logits = ctx.next_logits(tokens[:1], 0)
            t = time.perf_counter()
            for j in range(1, N):
                nxt = int(np.argmax(logits))
                if compact:
                    compact_rows(logits[None, :], np.array([nxt]), 144, 96, np.asarray(rng.random(1)))
                logits = ctx.next_logits(np.array([nxt], np.int32), j)
            rate = (N - 1) / (time.perf_counter() - t)
            print(f"{label}: llama_decode only {bench:,.0f} tok/s; generation step "
                  f"{'with compaction' if compact else 'argmax only'} {rate:,.0f} tok/s", flush=True)
        ctx.close()
    model.close()


if __name__ == "__main__":
    main()
