"""Reference compaction against the evaluation's KL math on real Gemma rows, over 1..N threads.

Run: ``python benchmarks/compaction_real_rows.py [THREADS ...]`` (a script, not a pytest
benchmark: it imports llama_cpp before numpy, which the CUDA build needs, and holds ~1 GB of
f16-cache logits of the bundled model: 3rd chunk of each built-in category, 1,020 scored rows).
The synthetic rows of ``test_reduction_scaling_over_threads`` have ~900 tokens above the cutoff;
real rows have many more, and the compaction's cost grows with them.
"""

from __future__ import annotations

import os
import sys
import time

from pytest_kvquality.engine import llama as llama_backend  # llama_cpp first, then numpy

llama_backend.init_backend()

import numpy as np  # noqa: E402

from pytest_kvquality.cache_config import CacheConfig  # noqa: E402
from pytest_kvquality.compaction import compact_rows  # noqa: E402
from pytest_kvquality.corpus import builtin_corpus, chunk_tokens  # noqa: E402
from pytest_kvquality.engine.pipeline import RowParallel  # noqa: E402
from pytest_kvquality.engine.protocol import DEFAULT_TAIL_SAMPLES, DEFAULT_TOP_K  # noqa: E402
from pytest_kvquality.kernels import kernel_name  # noqa: E402
from pytest_kvquality.metrics import LOG_P_CUTOFF, kl_compact  # noqa: E402
from pytest_kvquality.normalizer import log_normalizer  # noqa: E402
from pytest_kvquality.resolve import bundled_gguf  # noqa: E402

ROWS_PER_CHUNK = 255


def real_rows() -> np.ndarray:
    path = str(bundled_gguf())
    model = llama_backend.LlamaModel(path, -1)
    ctx = model.context(CacheConfig.parse("f16"), 512)
    out = []
    for category, text in builtin_corpus().texts.items():
        chunk = chunk_tokens(model.tokenize(text), 512, 3, category)[2]
        out += [np.array(x) for x in ctx.scored_logits(chunk)]
    ctx.close()
    model.close()
    return np.concatenate(out)


def main() -> None:
    logits = real_rows()
    n = logits.shape[0]
    nxt = np.random.default_rng(0).integers(0, logits.shape[1], n)
    u0 = np.random.default_rng(1).random(n)
    _, norm = log_normalizer(logits)
    above = (logits > (norm + LOG_P_CUTOFF)[:, None]).sum(axis=1)
    print(f"{n} rows, compaction in {kernel_name()}; tokens above the cutoff p10/p50/p90/max: "
          f"{' / '.join(str(int(x)) for x in np.percentile(above, [10, 50, 90, 100]))}")
    ref = compact_rows(logits, nxt, DEFAULT_TOP_K, DEFAULT_TAIL_SAMPLES, u0)
    for threads in [int(t) for t in sys.argv[1:]] or [1, 2, 4, 8, 16]:
        if threads > (os.cpu_count() or 1):
            continue
        pool = RowParallel(threads)
        work = {
            "evaluation": lambda a, b: kl_compact(logits[a:b], ref.slice(a, b), nxt[a:b]),
            "reference": lambda a, b: compact_rows(logits[a:b], nxt[a:b], DEFAULT_TOP_K, DEFAULT_TAIL_SAMPLES, u0[a:b]),
        }
        rates = {}
        for name, fn in work.items():
            best = float("inf")
            for _ in range(3):
                t0 = time.perf_counter()
                for c in range(0, n, ROWS_PER_CHUNK):
                    pool.map(ROWS_PER_CHUNK, lambda a, b, c=c, fn=fn: fn(c + a, c + b))
                best = min(best, time.perf_counter() - t0)
            rates[name] = n / best
        pool.close()
        print(f"threads {threads:2d}: evaluation {rates['evaluation']:7.0f} rows/s, reference "
              f"{rates['reference']:7.0f} rows/s, ratio {rates['evaluation'] / rates['reference']:.2f}", flush=True)


if __name__ == "__main__":
    main()
