"""RPC throughput against local (issue 17): the bundled Gemma 3 270M evaluated at q4_0 with a cached f16
reference, n_ctx 512, coding text, (1) all layers on this machine's GPU, (2) all layers on a
``ggml-rpc-server`` that holds the GPU, the model worker seeing no GPU of its own
(``CUDA_VISIBLE_DEVICES=``), (3) half the layers on that server, the rest on the host's CPU. The
server runs on 127.0.0.1 of the same host, so the figures are the protocol's cost without a network.

    python3 benchmarks/rpc_throughput.py --server /tmp/kvq/bin/ggml-rpc-server --chunks 23 --out rpc.json

On a CPU-only machine (no GPU to lend), the server holds a CPU device and (1) is the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pytest_kvquality.cache_config import CacheConfig
from pytest_kvquality.corpus import builtin_corpus, chunk_tokens
from pytest_kvquality.engine.client import WorkerEngine
from pytest_kvquality.engine.protocol import CandidateRun, ModelLoad
from pytest_kvquality.metrics import ReferenceRows, summarize
from pytest_kvquality.resolve import bundled_gguf


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def timed_eval(engine: WorkerEngine, model: ModelLoad, chunks: object, ref: ReferenceRows,
               rounds: int) -> tuple[float, CandidateRun]:
    """Mean seconds of ``rounds`` evaluations after a one-chunk warm-up (model load, kernels)."""
    q4 = CacheConfig.parse("q4_0")
    engine.evaluate(model, q4, chunks[:1], ref.slice(0, 255))  # type: ignore[index]
    walls, run = [], None
    for _ in range(rounds):
        t = time.perf_counter()
        run = engine.evaluate(model, q4, chunks, ref)  # type: ignore[arg-type]
        walls.append(time.perf_counter() - t)
    assert run is not None
    return sum(walls) / len(walls), run


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--server", required=True, help="ggml-rpc-server of the same build")
    p.add_argument("--chunks", type=int, default=23)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--half-layers", type=int, default=10, help="layers offloaded in the half case (of 19)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    path = str(bundled_gguf())
    logs = Path(os.environ.get("OUT", "/tmp")) / "rpc-logs"
    local_engine = WorkerEngine(logs)
    local = ModelLoad(path, -1)
    tokens = local_engine.tokenize(local, builtin_corpus().texts["coding"])
    chunks = chunk_tokens(tokens, 512, args.chunks, "coding")
    ref = local_engine.reference(local, CacheConfig.parse("f16"), chunks, 0).rows
    scored = len(ref)
    out: dict[str, object] = {"chunks": args.chunks, "scored_tokens": scored, "rounds": args.rounds}
    wall, run = timed_eval(local_engine, local, chunks, ref, args.rounds)
    base = run.stats
    out["local"] = {"seconds": wall, "scored_tok_per_s": scored / wall, "context": run.context.to_dict(),
                    "kl_mean": summarize(base).kl_mean}
    local_engine.close()

    port = free_port()
    server = subprocess.Popen([args.server, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                              stderr=open(logs / "rpc-server.log", "wb"))
    try:
        for _ in range(300):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # the worker's own GPU hidden: layers go to the server
        for name, layers in (("rpc_all", -1), ("rpc_half", args.half_layers)):
            engine = WorkerEngine(logs, env=env, reply_timeout=600)
            try:
                model = ModelLoad(path, layers, rpc=f"127.0.0.1:{port}")
                wall, run = timed_eval(engine, model, chunks, ref, args.rounds)
            finally:
                engine.close()
            s = run.stats
            out[name] = {"seconds": wall, "scored_tok_per_s": scored / wall, "vs_local": (scored / wall)
                         / out["local"]["scored_tok_per_s"],  # type: ignore[index]
                         "context": run.context.to_dict(), "kl_mean": summarize(s).kl_mean,
                         "bit_identical_to_local": bool((s.kld == base.kld).all()
                                                        and (s.same_top == base.same_top).all()),
                         "max_abs_kld_diff": float(abs(s.kld - base.kld).max()),
                         "top1_agreement_with_local": float((s.same_top == base.same_top).mean())}
            print(name, json.dumps({k: v for k, v in out[name].items() if k != "context"}), flush=True)  # type: ignore[union-attr]
    finally:
        server.kill()
        server.wait()
    print("local", json.dumps({k: v for k, v in out["local"].items() if k != "context"}))  # type: ignore[union-attr]
    args.out.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
