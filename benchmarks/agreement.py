"""Our numbers against llama-perplexity's at its default batch geometry, and at other geometries.

Run: ``python benchmarks/agreement.py [--chunks 8] [--cache q4_0,q8_0] [--batch 2048,512] [--out A.json]``.
For each cache config and each ``--kv-batch`` value: our evaluation (cached compact reference and
exact mode) and ``llama-perplexity --kl-divergence -b B`` on the same chunks of the coding text,
bundled Gemma 3 270M, n_ctx 512. Prints mean KLD, same top, PPL and their differences; the JSON
keeps every figure. ``KVQ_LLAMA_PERPLEXITY`` points at the binary (default .build/llama-perplexity).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from oracle import llama_perplexity_kld  # noqa: E402

from pytest_kvquality.cache_config import CacheConfig  # noqa: E402
from pytest_kvquality.corpus import builtin_corpus, chunk_tokens  # noqa: E402
from pytest_kvquality.engine.client import WorkerEngine  # noqa: E402
from pytest_kvquality.engine.protocol import ModelLoad  # noqa: E402
from pytest_kvquality.metrics import summarize  # noqa: E402
from pytest_kvquality.resolve import bundled_gguf  # noqa: E402

N_CTX = 512


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--cache", default="q4_0,q8_0")
    ap.add_argument("--batch", default="2048,512")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    path = str(bundled_gguf())
    text = builtin_corpus().texts["coding"]
    f16 = CacheConfig.parse("f16")
    rows = []
    engine = WorkerEngine()
    try:
        for batch in (int(b) for b in a.batch.split(",")):
            model = ModelLoad(path, -1, n_batch=batch)
            chunks = chunk_tokens(engine.tokenize(model, text), N_CTX, a.chunks, "coding")
            ref = engine.reference(model, f16, chunks, seed=0)
            for label in a.cache.split(","):
                cache = CacheConfig.parse(label)
                ours = summarize(engine.evaluate(model, cache, chunks, ref.rows).stats)
                exact = summarize(engine.evaluate_exact(model, cache, model, f16, chunks).stats)
                with tempfile.TemporaryDirectory() as tmp:
                    theirs = llama_perplexity_kld(Path(tmp), path, text, N_CTX, a.chunks, cache, batch=batch)
                row = {"batch": batch, "cache": label, "ours_kl_mean": ours.kl_mean, "exact_kl_mean": exact.kl_mean,
                       "llama_kl_mean": theirs["kl_mean"], "ours_top1": ours.top1, "exact_top1": exact.top1,
                       "llama_top1": theirs["top1"], "ours_ppl": ours.ppl, "llama_ppl": theirs["ppl"],
                       "exact_kl_rel": exact.kl_mean / theirs["kl_mean"] - 1,
                       "compact_kl_rel": ours.kl_mean / theirs["kl_mean"] - 1,
                       "top1_points": 100 * (exact.top1 - theirs["top1"])}
                rows.append(row)
                print(f"b {batch:5d} {label:8s} KLD ours {ours.kl_mean:.6f} exact {exact.kl_mean:.6f} llama "
                      f"{theirs['kl_mean']:.6f} (exact {row['exact_kl_rel']:+.3%}, "
                      f"compact {row['compact_kl_rel']:+.3%}); "
                      f"same top exact {100 * exact.top1:.3f} % llama {100 * theirs['top1']:.3f} %; "
                      f"PPL {ours.ppl:.4f} / {theirs['ppl']:.4f}", flush=True)
    finally:
        engine.close()
    if a.out:
        a.out.write_text(json.dumps({"model": path, "n_ctx": N_CTX, "chunks": a.chunks, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
