"""Where a short cached run's fixed costs go (issue 17): one category (science, 20 chunks of 512 = 5,100
scored tokens), one cache config (q4_0), the f16 reference cached, as a whole pytest process; then
its parts one by one, and llama-perplexity's whole process on the same text.

    KVQ_CACHE_DIR=/tmp/kvq-cache python3 benchmarks/startup.py --perplexity /tmp/kvq/bin/llama-perplexity --out s.json

Parts: Python start-up with pytest and the plugin imported (``pytest --version``), collection
(``--collect-only``), the model worker's spawn with llama.cpp imported and its backends initialised
(CUDA included: the first ``info`` call), the model load, tokenizing the corpus, creating the
context (and the placement probe's throwaway one), llama.cpp's decode calls, and the rest of the
evaluation (the KL reduction, not hidden behind the decodes). Each whole-process figure is the
median of ``--rounds`` runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from importlib.metadata import entry_points
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pytest_kvquality.cache_config import CacheConfig  # noqa: E402
from pytest_kvquality.corpus import builtin_corpus, chunk_tokens  # noqa: E402
from pytest_kvquality.engine.client import WorkerEngine  # noqa: E402
from pytest_kvquality.engine.protocol import ModelLoad  # noqa: E402
from pytest_kvquality.resolve import bundled_gguf  # noqa: E402

CHUNKS = int(os.environ.get("KVQ_STARTUP_CHUNKS", "20"))


def wall(cmd: list[str], cwd: Path, env: dict[str, str] | None = None, rounds: int = 3) -> float:
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd)
        times.append(time.perf_counter() - t)
        if done.returncode not in (0, 1):
            raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--perplexity", type=lambda s: str(Path(s).resolve()), help="llama-perplexity of the same build")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="the whole-process figures only")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    model = str(bundled_gguf())
    work = Path(os.environ.get("KVQ_CACHE_DIR", "/tmp/kvq-cache")) / "startup"
    corpus, no_gates, project = work / "corpus", work / "no-thresholds", work / "project"
    for d in (corpus, no_gates, project):  # an empty project: a user's tests would be collected, not ours
        d.mkdir(parents=True, exist_ok=True)
    text = builtin_corpus().texts["science"]
    (corpus / "science.txt").write_text(text)
    registry = work / "registry.yaml"
    registry.write_text(f"version: 1\nmodels:\n  gemma3-270m:\n    path: {model}\n")
    installed = any(ep.value == "pytest_kvquality.plugin" for ep in entry_points(group="pytest11"))
    load = [] if installed else ["-p", "pytest_kvquality.plugin"]  # the GPU host runs an uninstalled checkout
    pytest_cmd = [sys.executable, "-m", "pytest", *load, "-p", "no:cacheprovider", "-q", f"--kv-registry={registry}"]
    run = [*pytest_cmd, "--kv-model", "gemma3-270m", "-m", "kvquality", f"--kv-corpus={corpus}", "--kv-chunks",
           str(CHUNKS), "--kv-cache", "q4_0", f"--kv-thresholds={no_gates}"]
    out: dict[str, object] = {"model": model, "chunks": CHUNKS, "scored_tokens": CHUNKS * 255}
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}"}
    wall(run, project, env, rounds=1)  # builds and caches the f16 reference (and the placement probe's findings)
    out["pytest_whole_s"] = wall(run, project, env, rounds=args.rounds)
    # as before issue 17: the placement probe run in every process
    before = []
    for _ in range(args.rounds):
        shutil.rmtree(work.parent / "placement", ignore_errors=True)
        before.append(wall(run, project, env, rounds=1))
    out["pytest_whole_probing_s"] = statistics.median(before)
    out["pytest_whole_no_probe_s"] = wall(run, project, {**env, "KVQ_PLACEMENT_PROBE": "0"}, rounds=args.rounds)
    if args.quick:
        args.out.write_text(json.dumps(out, indent=2) + "\n")
        print(json.dumps(out, indent=2))
        return
    out["pytest_version_s"] = wall([*pytest_cmd, "--version"], project, env, rounds=args.rounds)
    out["pytest_collect_s"] = wall([*run, "--collect-only"], project, env, rounds=args.rounds)

    parts: dict[str, float] = {}
    t = time.perf_counter()
    engine = WorkerEngine(work / "logs")
    engine.info()
    parts["worker_spawn_and_backend_init_s"] = time.perf_counter() - t
    load = ModelLoad(model, -1)
    t = time.perf_counter()
    engine.describe(load)
    parts["model_load_s"] = time.perf_counter() - t
    t = time.perf_counter()
    tokens = engine.tokenize(load, text)
    parts["tokenize_s"] = time.perf_counter() - t
    chunks = chunk_tokens(tokens, 512, CHUNKS, "science")
    ref = engine.reference(load, CacheConfig.parse("f16"), chunks, 0).rows
    t = time.perf_counter()
    cand = engine.evaluate(load, CacheConfig.parse("q4_0"), chunks, ref)
    total = time.perf_counter() - t
    facts = cand.context
    parts["evaluate_s"] = total
    parts["evaluate_context_creation_s"] = facts.context_seconds or 0.0
    parts["evaluate_llama_decode_s"] = facts.decode_seconds or 0.0
    parts["evaluate_rest_s"] = total - parts["evaluate_context_creation_s"] - parts["evaluate_llama_decode_s"]
    engine.close()
    out["parts"] = parts

    if args.perplexity:
        txt = work / "science.txt"
        txt.write_text(text)
        base = work / "base.bin"
        common = [args.perplexity, "-m", model, "-c", "512", "--chunks", str(CHUNKS), "-fa", "on", "-ngl", "999",
                  "--kl-divergence-base", str(base)]
        subprocess.run([*common, "-f", str(txt)], check=True, capture_output=True)
        out["llama_perplexity_whole_s"] = wall([*common, "--kl-divergence", "-ctk", "q4_0", "-ctv", "q4_0"],
                                               work, rounds=args.rounds)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
