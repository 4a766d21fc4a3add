"""Where a scoring decode's time goes on a GPU (issue 17): the forward pass, the copy of the scored
rows' logits to the host, and whether two contexts decoding in two threads overlap one's copy with
the other's forward pass.

    python benchmarks/logits_transfer.py MODEL.gguf [--groups 24] [--ctx 512 --batch 2048] [--out F.json]

Modes, each over the same groups of 4 chunks x 512 tokens (llama-perplexity's default geometry,
255 scored rows per chunk): ``serial`` (one context, decode then fetch, as the engine does per
context), ``no_rows`` (the same decodes asking for one row per chunk: the forward pass without the
copy), ``two_serial`` (two contexts in turn from one thread), ``two_threads`` (two contexts, each
decoded by its own thread). Run on the GPU host after ``source .gpu/bin/env.sh``.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from typing import Any

# isort: off
from pytest_kvquality.engine.llama import LlamaBackend, LlamaContext, init_backend  # llama_cpp before numpy
import numpy as np
# isort: on

from pytest_kvquality.cache_config import CacheConfig
from pytest_kvquality.decode_geometry import decode_geometry
from pytest_kvquality.engine.protocol import ModelLoad


def groups(n: int, n_seq: int, n_ctx: int, rows: bool) -> list[list[tuple[np.ndarray, np.ndarray]]]:
    rng = np.random.default_rng(0)
    want = np.zeros(n_ctx, bool)
    if rows:
        want[n_ctx // 2 : n_ctx - 1] = True
    else:
        want[n_ctx - 2] = True
    return [[(rng.integers(100, 20000, n_ctx).astype(np.int32), want) for _ in range(n_seq)] for _ in range(n)]


def drain(ctx: LlamaContext, group: list[tuple[np.ndarray, np.ndarray]]) -> int:
    return sum(v.logits.shape[0] for v in ctx.scored_logits(group))


def timed(fn: Any) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--groups", type=int, default=24)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--batch", type=int, default=2048, help="llama-perplexity's -b (its -ub is 512)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    init_backend()
    model = LlamaBackend().load(ModelLoad(args.model, -1))
    n_ctx = args.ctx
    n_seq, n_ubatch = decode_geometry(args.batch, 512, n_ctx)
    f16 = CacheConfig.parse("f16")
    a = model.context(f16, n_ctx, n_seq, n_ubatch)
    b = model.context(f16, n_ctx, n_seq, n_ubatch)
    full, none = groups(args.groups, n_seq, n_ctx, True), groups(args.groups, n_seq, n_ctx, False)
    scored = args.groups * n_seq * (n_ctx // 2 - 1)
    for g in full[:2]:  # warm up both
        drain(a, g)
        drain(b, g)
    out: dict[str, Any] = {"groups": args.groups, "n_ctx": n_ctx, "n_seq": n_seq, "n_ubatch": n_ubatch,
                           "scored_rows": scored, "row_bytes": 4 * model.n_vocab}

    def serial() -> None:
        for g in full:
            drain(a, g)

    def no_rows() -> None:
        for g in none:
            drain(a, g)

    def two_serial() -> None:
        for i, g in enumerate(full):
            drain((a, b)[i % 2], g)

    def two_threads() -> None:
        def run(ctx: LlamaContext, part: list[Any]) -> None:
            for g in part:
                drain(ctx, g)
        ts = [threading.Thread(target=run, args=(c, full[i::2])) for i, c in enumerate((a, b))]
        for t in ts:
            t.start()
        for t in ts:
            t.join()

    modes = {"serial": serial, "no_rows": no_rows, "two_serial": two_serial, "two_threads": two_threads}
    for rnd in range(args.rounds):
        for name, fn in modes.items():
            s = timed(fn)
            out.setdefault(name, []).append(s)
            print(f"round {rnd} {name}: {s:.3f} s, {scored / s:,.0f} scored tok/s "
                  f"({args.groups * n_seq * n_ctx / s:,.0f} processed tok/s)", flush=True)
    best = {k: min(v) for k, v in out.items() if isinstance(v, list)}
    copy_s = best["serial"] - best["no_rows"]
    out["copy_gb_s"] = scored * out["row_bytes"] / copy_s / 1e9 if copy_s > 0 else None
    print(f"best: {best}; the rows' copy ~{copy_s:.3f} s -> {out['copy_gb_s']} GB/s", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
    a.close()
    b.close()
    model.close()


if __name__ == "__main__":
    main()
