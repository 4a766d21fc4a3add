"""How long a gate takes on one GPU for the released models' geometry (docs/results.md).

    python benchmarks/real_geometry.py qwen3.6-35b-a3b --out DIR --ctx 512 --long 32768 \
        --perplexity /tmp/kvq/bin/llama-perplexity

No real Qwen 3.6 or Gemma 4 weights are reachable here, so the model is written on the spot with
their geometry (layers, widths, heads, head sizes, experts, vocabulary: ``synthetic.REAL``) and
random Q4_0 weights (``synthetic.write(quant="Q4_0")``). Then, through the plugin's engine: load
time, the f16 reference over the whole built-in corpus, evaluations of f16, q8_0 and q4_0 caches,
scored tok/s, peak VRAM (nvidia-smi, sampled) and the worker's peak RSS; and llama-perplexity's
forward-only rate (plain perplexity, no KL) on the same model, n_ctx and batch. ``--tiny`` runs the
same steps on a tiny model of the architecture, to check the script on a CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import resource
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from pytest_kvquality import synthetic
from pytest_kvquality.cache_config import CacheConfig
from pytest_kvquality.corpus import builtin_corpus, chunk_tokens
from pytest_kvquality.engine.client import WorkerEngine
from pytest_kvquality.engine.protocol import ModelLoad
from pytest_kvquality.metrics import summarize
from pytest_kvquality.resolve import bundled_gguf

CACHES = ("f16", "q8_0", "q4_0")
TINY_OF = {"qwen3.6-35b-a3b": "qwen35moe-mtp", "gemma4-31b": "gemma4", "gemma4-26b-a4b": "gemma4-moe"}


class VramSampler:
    """Peak GPU memory in use while it runs (nvidia-smi every 200 ms); None without nvidia-smi."""

    def __init__(self) -> None:
        self.peak_mib: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=5).stdout
                used = sum(float(x) for x in out.split())
                self.peak_mib = max(self.peak_mib or 0.0, used)
            except (OSError, ValueError, subprocess.TimeoutExpired):
                return
            self._stop.wait(0.2)

    def __enter__(self) -> VramSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def forward_only_rate(exe: str, model: str, text: Path, n_ctx: int, chunks: int, batch: int) -> dict[str, Any]:
    """llama-perplexity without KL: tokens through the model per second, between its log's first
    chunk and its final estimate (model load and tokenizing left out, as in our figure)."""
    cmd = [exe, "-m", model, "-f", str(text), "-c", str(n_ctx), "-b", str(batch), "-ub", str(min(batch, 512)),
           "--chunks", str(chunks), "-fa", "on", "-ngl", "999"]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    log = p.stdout + p.stderr
    # its log lines carry timestamps (min.s.ms.us): from "calculating perplexity" to "Final estimate"
    stamp = r"(\d+)\.(\d+)\.(\d+)\.(\d+) I "
    begin = re.search(stamp + r"perplexity: calculating perplexity over (\d+) chunks", log)
    end = re.search(stamp + r"Final estimate", log)
    if p.returncode != 0 or begin is None or end is None:
        return {"error": log[-1500:], "command": " ".join(cmd)}

    def seconds(m: re.Match[str]) -> float:
        return int(m.group(1)) * 60 + int(m.group(2)) + int(m.group(3)) / 1e3 + int(m.group(4)) / 1e6

    n = int(begin.group(5)) * n_ctx
    took = seconds(end) - seconds(begin)
    return {"tokens": n, "seconds": took, "tok_s": n / took, "wall_seconds": wall, "batch": batch}


def bench_rate(exe: str, model: str, n_ctx: int, batch: int, cache: str = "f16") -> dict[str, Any]:
    """llama-bench prompt processing of n_ctx tokens from an empty cache (no logits): the forward
    pass alone, as our evaluation runs it per chunk (same batch and micro-batch, flash attention)."""
    cmd = [exe, "-m", model, "-p", str(n_ctx), "-n", "0", "-b", str(batch), "-ub", str(min(batch, 512)), "-fa", "1",
           "-ngl", "999", "-ctk", cache, "-ctv", cache, "-r", "3", "-o", "json"]
    p = subprocess.run(cmd, capture_output=True, text=True)
    try:
        rows = json.loads(p.stdout)
        return {"tok_s": float(rows[0]["avg_ts"]), "stddev": float(rows[0]["stddev_ts"]), "cache": cache,
                "batch": batch}
    except (ValueError, KeyError, IndexError):
        return {"error": (p.stdout + p.stderr)[-1500:], "command": " ".join(cmd)}


def corpus_chunks(engine: WorkerEngine, model: ModelLoad, n_ctx: int, whole: bool, limit: int | None) -> np.ndarray:
    """Every chunk (at most ``limit`` per category) at n_ctx; ``whole``: the categories as one text."""
    texts = builtin_corpus().texts
    if whole:
        return chunk_tokens(engine.tokenize(model, "\n\n".join(texts.values())), n_ctx, limit, "all")
    return np.concatenate([chunk_tokens(engine.tokenize(model, t), n_ctx, limit, c) for c, t in texts.items()])


def measure(engine: WorkerEngine, model: ModelLoad, n_ctx: int, whole: bool, args: argparse.Namespace,
            text: Path) -> dict[str, Any]:
    chunks = corpus_chunks(engine, model, n_ctx, whole, args.max_chunks)
    caches = args.caches.split(",")
    f16 = CacheConfig.parse("f16")
    ref = engine.reference(model, f16, chunks, seed=0)
    scored = len(ref.rows)
    out: dict[str, Any] = {"n_ctx": n_ctx, "chunks": int(chunks.shape[0]), "scored_tokens": scored,
                           "reference_seconds": ref.seconds, "configs": {}}
    for i, label in enumerate(caches):
        if i + 1 < len(caches):  # as the session does: the next one's contexts made while this one runs
            engine.prepare(model, CacheConfig.parse(caches[i + 1]), chunks)
        run = engine.evaluate(model, CacheConfig.parse(label), chunks, ref.rows)
        s = summarize(run.stats)
        out["configs"][label] = {
            "eval_seconds": run.seconds, "scored_tok_s": scored / run.seconds,
            "processed_tok_s": chunks.size / run.seconds, "kl_mean": s.kl_mean, "top1": s.top1,
            "context_seconds": run.context.context_seconds, "decode_seconds": run.context.decode_seconds,
            **{k: getattr(run.context, k) for k in ("kv_bytes_per_token", "kv_cache_mib", "kv_mib_per_32k",
                                               "kv_mib_per_128k", "kv_swa_cells", "recurrent_state_mib",
                                               "kv_mismatch", "kv_devices", "logits_contexts",
                                               "device_reduction")}}
        print(f"  n_ctx {n_ctx} {label}: {run.seconds:.1f} s (context {(run.context.context_seconds or 0):.1f} s, "
              f"in llama.cpp {(run.context.decode_seconds or 0):.1f} s), {scored / run.seconds:,.0f} scored tok/s, "
              f"KLD {s.kl_mean:.5f}, top-1 {100 * s.top1:.2f} %, {run.context.logits_contexts} context(s)",
              flush=True)
    if args.perplexity:
        batch = 2048  # llama-perplexity's default and ours (--kv-batch 2048, --kv-ubatch 512)
        out["llama_perplexity"] = forward_only_rate(args.perplexity, model.path, text, n_ctx,
                                                    min(int(chunks.shape[0]), args.max_ppl_chunks), batch)
        fo = out["llama_perplexity"].get("tok_s")
        if fo:
            for c in out["configs"].values():
                c["vs_forward_only"] = c["processed_tok_s"] / fo
        print(f"  n_ctx {n_ctx} llama-perplexity forward only: {out['llama_perplexity']}", flush=True)
    if args.bench:
        out["llama_bench"] = {c: bench_rate(args.bench, model.path, n_ctx, 2048, c) for c in caches}
        for label, c in out["configs"].items():
            rate = out["llama_bench"][label].get("tok_s")
            if rate:
                c["vs_llama_bench"] = c["processed_tok_s"] / rate
        print(f"  n_ctx {n_ctx} llama-bench pp{n_ctx}: {out['llama_bench']}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", choices=sorted(synthetic.REAL))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--long", type=int, default=0, help="a long n_ctx, on the corpus as one text (0: none)")
    ap.add_argument("--perplexity", default="", help="llama-perplexity built from the same tree")
    ap.add_argument("--max-ppl-chunks", type=int, default=64)
    ap.add_argument("--bench", default="", help="llama-bench built from the same tree")
    ap.add_argument("--caches", default=",".join(CACHES),
                    help="cache configurations in the order evaluated (each one's contexts made while the one "
                         "before runs; the first's when needed)")
    ap.add_argument("--max-chunks", type=int, default=None, help="at most N chunks per category (default: all)")
    ap.add_argument("--tiny", action="store_true", help="a tiny model of the architecture (checks the script)")
    ap.add_argument("--keep", action="store_true", help="keep the written model")
    ap.add_argument("--model-dir", type=Path, default=Path("/tmp/kvq-real"), help="where the model is written")
    ap.add_argument("--write-only", action="store_true", help="write the model file and stop")
    ap.add_argument("--long-only", action="store_true", help="only the --long n_ctx")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    args.model_dir.mkdir(parents=True, exist_ok=True)
    geometry = synthetic.TINY[TINY_OF[args.model]] if args.tiny else synthetic.REAL[args.model]
    # the bundled Gemma's tokenizer (on the GPU host: the staged file, as in tests/test_real_model.py)
    tokenizer = bundled_gguf()
    path = args.model_dir / f"{args.model}{'-tiny' if args.tiny else ''}.Q4_0.gguf"
    t0 = time.perf_counter()
    if not path.exists():  # written earlier (--write-only) is reused
        synthetic.write(path, geometry, tokenizer, seed=1, quant="Q4_0")
    result: dict[str, Any] = {"model": args.model, "tiny": args.tiny, "file_gib": path.stat().st_size / 2**30,
                              "env": {k: v for k, v in os.environ.items() if k.startswith("KVQ_")},
                              "write_seconds": time.perf_counter() - t0, "geometry": geometry.__dict__}
    if args.write_only:
        print(f"{path}: {result['file_gib']:.1f} GiB in {result['write_seconds']:.0f} s")
        return
    print(f"{args.model}: wrote {result['file_gib']:.1f} GiB in {result['write_seconds']:.0f} s", flush=True)
    text = args.out / "corpus.txt"
    text.write_text("\n\n".join(builtin_corpus().texts.values()), encoding="utf-8")
    engine = WorkerEngine(args.out / "worker-logs")
    model = ModelLoad(str(path), -1)
    try:
        with VramSampler() as vram:
            t0 = time.perf_counter()
            result["describe"] = dataclasses.asdict(engine.describe(model))
            result["load_seconds"] = time.perf_counter() - t0
            print(f"  loaded in {result['load_seconds']:.1f} s: {result['describe']}", flush=True)
            result["runs"] = [] if args.long_only else [measure(engine, model, args.ctx, False, args, text)]
            if args.long:
                result["runs"].append(measure(engine, model, args.long, True, args, text))
        result["peak_vram_mib"] = vram.peak_mib
    finally:
        engine.close()
        if not args.keep:
            path.unlink(missing_ok=True)
    # the worker has exited: its peak resident set is among the waited-for children's
    result["peak_worker_rss_gib"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    (args.out / f"{args.model}.json").write_text(json.dumps(result, indent=1, default=str), encoding="utf-8")
    print(json.dumps({k: v for k, v in result.items() if k not in ("runs", "geometry", "describe")}), flush=True)


if __name__ == "__main__":
    main()
