#!/usr/bin/env bash
# On the GPU host (its staging kit is outside this repository), after `source .gpu/bin/env.sh`: the test suite, the
# bundled Gemma on the full built-in corpus at n_ctx 512, long documents at n_ctx 8192, and the
# throughput benchmarks. Everything it measures lands in $OUT (docs/results.md is built from it).
#   stage: tests | full | long | bench | memory | speed | oom | multigpu | sweep | sweep512 | sweep8k
#          | variants | compaction | kernels | agent | scale | startup | evalkernel | geometry | transfer | footprint | reuse | e2e | prepare | device | device-geometry | forward | pinned-qwen | pinned-gemma | trace | outputs | hostwait | hosttrace | fixcheck | evals32k
#          | default | default32k
#          | all (default all; the sweeps, variants, compaction,
#          kernels, agent, scale, startup and multigpu run only when named)
# The sweep wants every K/V pair on the GPU: start the build with GPU_FA_ALL_QUANTS=1 (an option of the staging kit).
set -uo pipefail
OUT="${OUT:-/tmp/kvq-out}"; mkdir -p "$OUT"
export KVQ_CACHE_DIR="${KVQ_CACHE_DIR:-/tmp/kvq-cache}" KVQ_GEMMA_GGUF="${KVQ_GPU_MODEL:?source env.sh}"
REG="$KVQ_CACHE_DIR/registry.yaml"; mkdir -p "$KVQ_CACHE_DIR"
printf 'version: 1\nmodels:\n  gemma3-270m:\n    path: %s\n    chat_template: gemma3\n' "$KVQ_GPU_MODEL" > "$REG"
P="python3 -m pytest -p pytest_kvquality.plugin -p no:cacheprovider --kv-registry=$REG"
# the Python path with the gguf writer of the llama.cpp just built (benchmarks/real_geometry.py writes models with it)
WITH_GGUF="${PYTHONPATH:-}:$PWD:$(ls -d /tmp/kvq/src/llama_cpp_python-*/vendor/llama.cpp/gguf-py 2>/dev/null)"
stage="${1:-all}"
T=""; [ -x /usr/bin/time ] && T="/usr/bin/time -v"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/gpu.txt" 2>&1
if [ "$stage" = tests ] || [ "$stage" = all ]; then
  $T $P tests -q -rs 2>&1 | tee "$OUT/tests.log" | tail -15
fi
if [ "$stage" = full ] || [ "$stage" = all ]; then
  $T $P --kv-model gemma3-270m -m kvquality \
    --kv-cache f16,q8_0,q4_0,q8_0:norot,q4_0:norot,q8_0/q4_0 \
    --kv-json="$OUT/full-512.json" 2>&1 | tee "$OUT/full-512.log" | grep -v "^\[kvquality\]" | tail -45
fi
if [ "$stage" = long ] || [ "$stage" = all ]; then
  mkdir -p /tmp/kvq-long/corpus /tmp/kvq-long/no-thresholds
  cp pytest_kvquality/corpus_data/long_documents.txt /tmp/kvq-long/corpus/
  $T $P --kv-model gemma3-270m -m kvquality --kv-corpus=/tmp/kvq-long/corpus \
    --kv-ctx 8192 --kv-cache q8_0,q4_0 --kv-thresholds=/tmp/kvq-long/no-thresholds --kv-json="$OUT/long-8192.json" 2>&1 \
    | tee "$OUT/long-8192.log" | grep -v "^\[kvquality\]" | tail -20
fi
if [ "$stage" = bench ] || [ "$stage" = all ]; then  # includes the reduction's scaling over 1..16 threads
  KVQ_BENCH_ROUNDS="${KVQ_BENCH_ROUNDS:-5}" KVQ_BENCH_CHUNKS=23 $P benchmarks/test_throughput.py \
    --benchmark-json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log" | tail -25
fi
if [ "$stage" = compaction ]; then  # where a reference build's time goes: real rows over 1..32 threads,
  # then the build/eval ratio with the row pool at 8, 16 and 32 threads
  python3 benchmarks/compaction_real_rows.py 1 2 4 8 16 32 2>/dev/null | tee "$OUT/compaction.log"
  for t in 8 16 32; do
    KVQ_THREADS=$t KVQ_BENCH_ROUNDS=3 KVQ_BENCH_CHUNKS=23 $P benchmarks/test_throughput.py -k vs_llama \
      --benchmark-json "$OUT/bench-threads-$t.json" > "$OUT/bench-threads-$t.log" 2>&1
  done
fi
if [ "$stage" = scale ]; then  # issue 17: RPC against local, where a short run's fixed costs go, scored tok/s
  # (start the build with GPU_RPC=1 GPU_TOOLS="llama-perplexity llama-bench" for ggml-rpc-server and the oracles)
  python3 benchmarks/rpc_throughput.py --server /tmp/kvq/bin/ggml-rpc-server --chunks 23 --rounds 3 \
    --out "$OUT/rpc.json" 2>&1 | tee "$OUT/rpc.log" | tail -4
  python3 benchmarks/startup.py --perplexity /tmp/kvq/bin/llama-perplexity --out "$OUT/startup.json" \
    > "$OUT/startup.log" 2>&1; tail -30 "$OUT/startup.log"
  KVQ_BENCH_ROUNDS=3 KVQ_BENCH_CHUNKS=23 KVQ_LLAMA_PERPLEXITY=/tmp/kvq/bin/llama-perplexity $P \
    benchmarks/test_throughput.py -k vs_llama --benchmark-json "$OUT/bench-vs-llama.json" 2>&1 | tail -4
  KVQ_RPC_SERVER=/tmp/kvq/bin/ggml-rpc-server $P tests/test_real_rpc.py tests/test_rpc.py tests/test_placement_cache.py \
    -q 2>&1 | tail -4
fi
if [ "$stage" = evalkernel ]; then  # issue 17: the evaluation's pass over the vocabulary compiled (this tree) against
  # the code before it (a copy of that tree in .old-src, numpy's exp), alternated; then the reduction of one chunk over
  # 1..16 threads for both, and the numpy mirror of the new pass (KVQ_COMPILED=0)
  here="$PWD"
  for r in 1 2; do
    for side in new old; do
      d="$here"; [ "$side" = old ] && d="$here/.old-src"
      (cd "$d" && KVQ_BENCH_ROUNDS=3 KVQ_BENCH_CHUNKS=23 KVQ_LLAMA_PERPLEXITY=/tmp/kvq/bin/llama-perplexity $P \
        benchmarks/test_throughput.py -k vs_llama --benchmark-json "$OUT/vs-llama-$side-$r.json" 2>&1 | tail -2)
    done
  done
  for side in new old numpy; do
    d="$here"; [ "$side" = old ] && d="$here/.old-src"; c=1; [ "$side" = numpy ] && c=0
    (cd "$d" && KVQ_COMPILED=$c $P benchmarks/test_throughput.py -k "scaling or kl_math_against" \
      --benchmark-json "$OUT/scaling-$side.json" 2>&1 | grep -E "^test_|passed|failed")
  done
  $P tests/test_normalizer.py tests/test_kernels.py tests/test_metrics.py -q 2>&1 | tail -2
fi
if [ "$stage" = geometry ] || [ "$stage" = geometry-throughput ]; then  # issue 17: llama-perplexity's batch
  # geometry. Scored tok/s of the default (4 chunks per decode), of --kv-batch 512 (one chunk per decode, one
  # micro-batch of 512) and of the code before (.old-src: two 256-token halves per chunk), alternated
  here="$PWD"; mkdir -p /tmp/geo
  for r in 1 2; do
    for v in new-2048 new-512 old; do
      d="$here"; b=2048; [ "$v" = new-512 ] && b=512; [ "$v" = old ] && d="$here/.old-src"
      (cd "$d" && KVQ_BENCH_BATCH=$b KVQ_BENCH_ROUNDS=3 KVQ_BENCH_CHUNKS=23 KVQ_LLAMA_PERPLEXITY=/tmp/kvq/bin/llama-perplexity \
        $P benchmarks/test_throughput.py -k vs_llama --benchmark-json "/tmp/geo/tp-$v-$r.json" 2>&1 | tail -1)
    done
  done
  tar czf "$OUT/geometry-throughput.tar.gz" -C /tmp/geo .
fi
if [ "$stage" = geometry ] || [ "$stage" = geometry-agreement ]; then  # our numbers against llama-perplexity's
  # at three geometries (its default first), the n_ctx 32,768 memory target, a short run's whole process
  mkdir -p /tmp/geo2
  KVQ_LLAMA_PERPLEXITY=/tmp/kvq/bin/llama-perplexity python3 benchmarks/agreement.py --chunks 16 --cache q4_0,q8_0 \
    --batch 2048,512,256 --out /tmp/geo2/agreement.json 2>&1 | grep "^b "
  $P benchmarks/test_memory.py --benchmark-json /tmp/geo2/memory.json 2>&1 | tail -2
  python3 benchmarks/startup.py --quick --rounds 3 --out /tmp/geo2/startup-quick.json 2>&1 | tail -4
  tar czf "$OUT/geometry-agreement.tar.gz" -C /tmp/geo2 .
fi
if [ "$stage" = transfer ]; then  # issue 17: where a scoring decode's time goes (forward pass, logits copy), two
  # contexts decoding on two threads, the host's copy bandwidth; then scored tok/s with decode-ahead on and off
  mkdir -p /tmp/tr
  python3 - <<'PY' 2>&1 | tee /tmp/tr/torch-d2h.txt
import time, torch
x = torch.empty(256 * 2**20, dtype=torch.float32, device="cuda")
for pin in (True, False):
    h = torch.empty(x.shape, dtype=torch.float32, pin_memory=pin)
    h.copy_(x); torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(5):
        h.copy_(x)
    torch.cuda.synchronize()
    print(f"D2H 1 GiB, pinned={pin}: {5 * x.numel() * 4 / (time.perf_counter() - t) / 1e9:.1f} GB/s")
PY
  python3 benchmarks/logits_transfer.py "$KVQ_GPU_MODEL" --out /tmp/tr/transfer.json 2>/tmp/tr/transfer.err \
    | tee /tmp/tr/transfer.log
  for r in 1 2; do
    for a in 1 0; do
      KVQ_DECODE_AHEAD=$a KVQ_BENCH_ROUNDS=3 KVQ_BENCH_CHUNKS=23 KVQ_LLAMA_PERPLEXITY=/tmp/kvq/bin/llama-perplexity \
        $P benchmarks/test_throughput.py -k vs_llama --benchmark-json "/tmp/tr/tp-ahead$a-$r.json" 2>&1 | tail -1
    done
  done
  tar czf "$OUT/transfer.tar.gz" -C /tmp/tr .
fi
if [ "$stage" = footprint ]; then  # issue 17: the n_ctx 32,768 memory target and a short run's start-up, at the
  # default geometry (one context at long n_ctx)
  mkdir -p /tmp/fp
  $P benchmarks/test_memory.py --benchmark-json /tmp/fp/memory.json 2>&1 | tail -2
  python3 benchmarks/startup.py --perplexity /tmp/kvq/bin/llama-perplexity --rounds 3 --out /tmp/fp/startup.json \
    > /tmp/fp/startup.log 2>&1; tail -30 /tmp/fp/startup.log
  tar czf "$OUT/footprint.tar.gz" -C /tmp/fp .
fi
if [ "$stage" = reuse ]; then  # issue 17: contexts kept between evaluations and reductions in place: scored
  # tok/s (decode-ahead on, off, on), the n_ctx 32,768 memory target, a short run's whole process, the same
  # bits through CUDA for kept contexts and for two contexts decoding on two threads
  mkdir -p /tmp/ru
  for a in 1 0 1; do
    KVQ_DECODE_AHEAD=$a KVQ_BENCH_ROUNDS=3 KVQ_BENCH_CHUNKS=23 KVQ_LLAMA_PERPLEXITY=/tmp/kvq/bin/llama-perplexity \
      $P benchmarks/test_throughput.py -k vs_llama --benchmark-json "/tmp/ru/tp-ahead$a-$RANDOM.json" 2>&1 | tail -1
  done
  $P benchmarks/test_memory.py --benchmark-json /tmp/ru/memory.json 2>&1 | tail -1
  python3 benchmarks/startup.py --quick --rounds 3 --out /tmp/ru/startup-quick.json 2>&1 | tail -4
  $P tests/test_real_model.py -k "kept_between or two_contexts" -q 2>&1 | tail -2
  tar czf "$OUT/reuse.tar.gz" -C /tmp/ru .
fi
if [ "$stage" = startup-quick ]; then  # the whole-process figures only
  python3 benchmarks/startup.py --quick --rounds 3 --out "$OUT/startup-quick.json" 2>&1 | tail -12
fi
if [ "$stage" = startup ]; then  # the start-up breakdown alone (before/after: KVQ_PRESTART=0, no placement cache)
  python3 benchmarks/startup.py --perplexity /tmp/kvq/bin/llama-perplexity --rounds 5 --out "$OUT/startup.json" \
    > "$OUT/startup.log" 2>&1; tail -30 "$OUT/startup.log"
  KVQ_RPC_SERVER=/tmp/kvq/bin/ggml-rpc-server $P tests/test_real_rpc.py tests/test_rpc.py tests/test_placement_cache.py \
    -q 2>&1 | tail -4
fi
if [ "$stage" = kernels ]; then  # the compiled compaction (default) against numpy (KVQ_COMPILED=0),
  # alternated so drift on the host does not favour one: real rows over 1..16 threads, then build/eval
  for c in 1 0; do
    KVQ_COMPILED=$c python3 benchmarks/compaction_real_rows.py 1 2 4 8 16 2>/dev/null | tee "$OUT/compaction-compiled-$c.log"
  done
  for c in 1 0 1 0; do
    KVQ_COMPILED=$c KVQ_BENCH_ROUNDS=5 KVQ_BENCH_CHUNKS=23 $P benchmarks/test_throughput.py -k vs_llama \
      --benchmark-json "$OUT/bench-compiled-$c-$RANDOM.json" 2>&1 | tail -3
  done
fi
if [ "$stage" = variants ]; then  # what each engine setting buys
  for v in "KVQ_OVERLAP=0" "KVQ_LLAMA_THREADS=16" "KVQ_LLAMA_THREADS=4 KVQ_THREADS=12"; do
    env $v KVQ_BENCH_ROUNDS=5 KVQ_BENCH_CHUNKS=23 $P benchmarks/test_throughput.py -k vs_llama \
      --benchmark-json "$OUT/bench-${v//[ =]/_}.json" > "$OUT/bench-${v//[ =]/_}.log" 2>&1
  done
fi
if [ "$stage" = memory ] || [ "$stage" = all ]; then
  $P benchmarks/test_memory.py --benchmark-json "$OUT/memory.json" 2>&1 | tee "$OUT/memory.log" | tail -8
fi
if [ "$stage" = speed ] || [ "$stage" = all ]; then  # speed, memory and quality side by side
  $P benchmarks/test_kv_speed.py --kv-model gemma3-270m --kv-cache f16,q8_0,q4_0,q8_0/q4_0 \
    --kv-json="$OUT/speed-512.json" --kv-markdown="$OUT/speed-512.md" --benchmark-json "$OUT/speed-bench.json" \
    2>&1 | tee "$OUT/speed-512.log" | grep -v "^\[kvquality\]" | tail -30
fi
if [ "$stage" = oom ] || [ "$stage" = all ]; then  # a KV cache larger than the GPU: a clear error
  python3 - <<'PY' 2>&1 | tee "$OUT/oom.log"
import os
import numpy as np
from pytest_kvquality.cache_config import CacheConfig
from pytest_kvquality.engine.client import WorkerEngine
from pytest_kvquality.engine.protocol import EngineError, ModelLoad
e = WorkerEngine()
try:
    e.speed(ModelLoad(os.environ["KVQ_GPU_MODEL"], -1), CacheConfig.parse("f32"), 1 << 24, "pp", np.zeros(8, np.int32))
    print("no error?")
except EngineError as err:
    print(str(err)[:3000])
finally:
    e.close()
PY
fi
# The agent corpus (issue 16): every K = V type of the sweep grid on the chat transcripts, with generation
# divergence (16 prompts per category, 128 tokens), the same caches on the text corpus, and llama-bench's tg
# for the decode rate (needs GPU_TOOLS="llama-bench" and GPU_FA_ALL_QUANTS=1 at build time).
if [ "$stage" = agent ]; then
  # iq4_nl left out: this build runs its KV ops on the CPU even with GPU_FA_ALL_QUANTS (47 scored tok/s)
  AGENT_CACHES="${AGENT_CACHES:-f16,q8_0,q5_1,q5_0,q4_1,q4_0,q8_0/q4_0}"
  mkdir -p /tmp/kvq-none
  [ "${AGENT_TESTS:-1}" = 1 ] && $P tests/test_real_agent.py tests/test_chat.py tests/test_generation.py -q 2>&1 \
    | tee "$OUT/agent-tests.log" | tail -4
  [ "${AGENT_TEXT:-1}" = 1 ] && $T $P --kv-model gemma3-270m -m kvquality --kv-cache $AGENT_CACHES --kv-thresholds=/tmp/kvq-none \
    --kv-json="$OUT/text-512.json" 2>&1 | tee "$OUT/text-512.log" | grep -v "^\[kvquality\]" | tail -16
  $T $P --kv-model gemma3-270m -m kvquality --kv-corpus builtin:agent --kv-cache $AGENT_CACHES --kv-gen 16 \
    --kv-gen-tokens 128 --kv-json="$OUT/agent.json" --kv-markdown="$OUT/agent.md" 2>&1 | tee "$OUT/agent.log" \
    | grep -v "^\[kvquality\]" | tail -30
  if [ -x /tmp/kvq/bin/llama-bench ]; then
    for c in f16 q8_0 q4_0; do
      /tmp/kvq/bin/llama-bench -m "$KVQ_GPU_MODEL" -p 0 -n 128 -d 0,1024 -ctk $c -ctv $c -fa 1 -ngl 99 -r 5 \
        -o json > "$OUT/llama-bench-tg-$c.json" 2> "$OUT/llama-bench-tg-$c.log"
    done
  fi
fi
# The model-selection sweep: every cache type llama.cpp accepts, rotation on and off. n_ctx 512: the
# full K x V grid with speed, plus weights x cache; n_ctx 8192: K only, V only and K = V. Results
# accumulate in $SWEEP (--resume), so the stages may run in separate calls; each copies the report to $OUT.
SWEEP="${KVQ_SWEEP_DIR:-/tmp/kvq-sweep}"
TYPES=f16,q8_0,q5_1,q5_0,q4_1,q4_0,iq4_nl
S="python3 -m pytest_kvquality sweep --kv-registry $REG --kv-model gemma3-270m --resume --out $SWEEP"
if [ "$stage" = sweep ] || [ "$stage" = sweep512 ]; then
  $S --kv-ctx 512 --kv-chunks "${KVQ_SWEEP_CHUNKS:-4}" --k-types $TYPES --v-types $TYPES --rotation on,off \
    --kv-cache f32,bf16 --speed --weights Q3_K_M,Q2_K 2>&1 | tee -a "$OUT/sweep.log" | tail -5
fi
if [ "$stage" = sweep ] || [ "$stage" = sweep8k ]; then
  sym=""; for t in q8_0 q5_1 q5_0 q4_1 q4_0 iq4_nl; do sym="$sym,f16/$t,f16/$t:norot,$t,$t:norot"; done
  $S --kv-ctx 8192 --kv-chunks "${KVQ_SWEEP_LONG_CHUNKS:-2}" --k-types $TYPES --v-types f16 --rotation on,off \
    --kv-cache "${sym#,}" 2>&1 | tee -a "$OUT/sweep.log" | tail -5
fi
case "$stage" in sweep*) cp -r "$SWEEP" "$OUT/sweep" ;; esac
if [ "$stage" = multigpu ]; then  # one GPU per xdist worker: sample which GPU each worker process uses
  ( for i in $(seq 1 90); do nvidia-smi --query-compute-apps=pid,gpu_uuid,used_memory --format=csv,noheader; sleep 1; done ) \
    > "$OUT/multigpu-smi.log" 2>&1 &
  smi=$!
  $P --kv-model gemma3-270m -m kvquality -n 2 --dist loadgroup --kv-cache q8_0,q4_0,q8_0:norot,q4_0:norot \
    --kv-regen --kv-json="$OUT/multigpu.json" 2>&1 | tee "$OUT/multigpu.log" | grep -v "^\[kvquality\]" | tail -20
  kill $smi 2>/dev/null
  python3 - "$OUT/multigpu-smi.log" <<'PY' | tee "$OUT/multigpu-check.txt"
import sys
seen = {}
for line in open(sys.argv[1]):
    parts = [p.strip() for p in line.split(",")]
    if len(parts) == 3 and parts[0].isdigit():
        seen.setdefault(parts[0], set()).add(parts[1])
one_each = all(len(g) == 1 for g in seen.values())
distinct = len({next(iter(g)) for g in seen.values()}) == len(seen) if one_each else False
print({pid: sorted(g) for pid, g in seen.items()})
print("one GPU per model worker:", "yes" if seen and one_each and distinct else "NO")
PY
  nvidia-smi -L >> "$OUT/multigpu-smi.log"
fi
if [ "$stage" = e2e ]; then  # issue 17's own measure: the whole built-in corpus at n_ctx 512, four cache
  # configs one after another, references cached (the first run builds them): scored tok/s per config
  # from --kv-json (scored tokens / its eval_seconds), and each run's whole process
  mkdir -p /tmp/e2e/no-gates
  for r in build cached1 cached2; do
    /usr/bin/time -f "$r wall %e s" $P --kv-model gemma3-270m -m kvquality --kv-cache q8_0,q4_0,q8_0/q4_0,q4_0:norot \
      --kv-thresholds=/tmp/e2e/no-gates --kv-json="/tmp/e2e/$r.json" 2>&1 | grep -E "wall|passed|failed|error" | tail -2
    python3 benchmarks/e2e_rate.py "/tmp/e2e/$r.json"
  done
  tar czf "$OUT/e2e.tar.gz" -C /tmp/e2e .
fi
if [ "$stage" = prepare ]; then  # issue 17: the next configuration's contexts made on a background thread while the
  # current one decodes (KVQ_PREPARE=1, the GPU default) against made when needed (0): issue 17's end-to-end measure,
  # alternated, references cached by a first run; the same numbers either way; the CUDA bit-identity tests
  mkdir -p /tmp/pa/no-gates
  G="--kv-model gemma3-270m -m kvquality --kv-cache q8_0,q4_0,q8_0/q4_0,q4_0:norot --kv-thresholds=/tmp/pa/no-gates"
  /usr/bin/time -f "build wall %e s" $P $G --kv-json=/tmp/pa/build.json 2>&1 | grep -E "wall|passed|failed|rror" | tail -2
  for r in 1 2 3; do
    for p in 1 0; do
      KVQ_PREPARE=$p /usr/bin/time -f "prepare=$p run $r: whole process %e s" $P $G --kv-json="/tmp/pa/p$p-$r.json" 2>&1 \
        | grep -E "whole|failed|rror" | tail -2
      python3 benchmarks/e2e_rate.py "/tmp/pa/p$p-$r.json" | tail -5
    done
  done
  python3 - <<'PY'
import json
strip = lambda p: [{k: v for k, v in r.items() if k != "eval_seconds"} for r in json.load(open(p))["results"]]
print("prepare on and off, same numbers:", all(strip(f"/tmp/pa/p1-{r}.json") == strip(f"/tmp/pa/p0-{r}.json") for r in (1, 2, 3)))
PY
  $P tests/test_real_model.py tests/test_context_cache.py -q -k "prepared or kept or two_contexts or prepar" 2>&1 | tail -2
  tar czf "$OUT/prepare.tar.gz" -C /tmp/pa .
fi
if [ "$stage" = device ]; then  # issue 17: each scored row reduced on the GPU (KVQ_DEVICE_REDUCTION=1, the GPU
  # default) against on the host (0): issue 17's end-to-end measure, alternated, references cached by a first run;
  # how far the numbers move; the real-model tests of it through CUDA
  mkdir -p /tmp/dv/no-gates
  G="--kv-model gemma3-270m -m kvquality --kv-cache q8_0,q4_0,q8_0/q4_0,q4_0:norot --kv-thresholds=/tmp/dv/no-gates"
  /usr/bin/time -f "build wall %e s" $P $G --kv-json=/tmp/dv/build.json 2>&1 | grep -E "wall|passed|failed|rror" | tail -2
  for r in 1 2 3; do
    for d in 1 0; do
      KVQ_DEVICE_REDUCTION=$d /usr/bin/time -f "device=$d run $r: whole process %e s" $P $G \
        --kv-json="/tmp/dv/d$d-$r.json" 2>&1 | grep -E "whole|failed|rror" | tail -2
      python3 benchmarks/e2e_rate.py "/tmp/dv/d$d-$r.json" | tail -5
    done
  done
  python3 - <<'PY'
from pathlib import Path
from pytest_kvquality.report import Report
rec = lambda p: {(r.cache, r.category): r.summary for r in Report.loads(Path(p).read_text()).sorted_records()}
a, b = rec("/tmp/dv/d1-1.json"), rec("/tmp/dv/d0-1.json")
worst = {f: max(abs(getattr(a[k], f) - getattr(b[k], f)) / max(abs(getattr(b[k], f)), 1e-12) for k in a)
         for f in ("kl_mean", "ppl_ratio", "dp_mean", "top1")}
print("device against host, largest relative difference over configs x categories:", worst)
PY
  $P tests/test_real_device_reduction.py -q 2>&1 | tail -2
  tar czf "$OUT/device.tar.gz" -C /tmp/dv .
fi
if [ "$stage" = device-geometry ]; then  # issue 17: the Qwen 3.6 35B-A3B geometry at n_ctx 512 and 32,768 with the
  # rows reduced on the GPU, against llama-bench's forward-only rate
  PYTHONPATH="$WITH_GGUF" \
    KVQ_DEVICE_REDUCTION=1 python3 benchmarks/real_geometry.py qwen3.6-35b-a3b --out /tmp/dg --ctx 512 --long 32768 \
    --bench /tmp/kvq/bin/llama-bench 2>&1 | grep -v "^ *loaded" | tail -12
  cp /tmp/dg/*.json "$OUT/" 2>/dev/null
fi
if [ "$stage" = forward ]; then  # issue 17: our forward pass against llama-bench's at n_ctx 32,768, and what producing
  # the scored rows costs (the output head alone, then with our reduction); llama-perplexity's rate on the same geometry
  # (start the build with GPU_TOOLS="llama-bench llama-perplexity")
  python3 benchmarks/forward_pass_profile.py --ctx 32768 --bench /tmp/kvq/bin/llama-bench 2>&1 \
    | grep --line-buffered -E "^#|^round|^llama-bench" | tee "$OUT/forward-gemma.txt"
  PYTHONPATH="$WITH_GGUF" python3 benchmarks/real_geometry.py qwen3.6-35b-a3b --out /tmp/fw --write-only \
    --keep --model-dir /tmp/kvq-real
  python3 benchmarks/forward_pass_profile.py --model /tmp/kvq-real/qwen3.6-35b-a3b.Q4_0.gguf --ctx 32768 --rounds 1 \
    --only 0,2,10,11 --bench /tmp/kvq/bin/llama-bench 2>&1 | grep --line-buffered -E "^#|^round|^llama-bench" \
    | tee "$OUT/forward-qwen.txt"
  PYTHONPATH="$WITH_GGUF" KVQ_DEVICE_REDUCTION=1 python3 benchmarks/real_geometry.py qwen3.6-35b-a3b \
    --out /tmp/fw --long 32768 --long-only --keep --model-dir /tmp/kvq-real --perplexity /tmp/kvq/bin/llama-perplexity \
    2>&1 | grep -v "^ *loaded" | tail -6
  cp /tmp/fw/*.json "$OUT/" 2>/dev/null
fi
if [ "$stage" = pinned-qwen ]; then  # issue 17: what a context's first scored decode costs with llama.cpp's output
  # buffers pinned (the default) and in plain host memory (GGML_CUDA_NO_PINNED=1): the CUDA tests of the reduction, the
  # profile and whole evaluations at n_ctx 32,768 on the Qwen geometry, then at 512 with the rows reduced on the host
  # and on the device (start the build with GPU_TOOLS="llama-bench llama-perplexity")
  $P tests/test_real_device_reduction.py -q 2>&1 | tail -2 | tee "$OUT/device-tests.txt"
  PYTHONPATH="$WITH_GGUF" python3 benchmarks/real_geometry.py qwen3.6-35b-a3b --out /tmp/pn --write-only \
    --keep --model-dir /tmp/kvq-real
  python3 benchmarks/forward_pass_profile.py --model /tmp/kvq-real/qwen3.6-35b-a3b.Q4_0.gguf --ctx 32768 --rounds 1 \
    --only 0,10,11,12,13 2>&1 | grep --line-buffered -E "^#|^round|^llama-bench" | tee "$OUT/pinned-qwen.txt"
  for u in 1 0; do
    NP=""; [ "$u" = 1 ] && NP="GGML_CUDA_NO_PINNED=1"
    env $NP PYTHONPATH="$WITH_GGUF" KVQ_DEVICE_REDUCTION=1 python3 benchmarks/real_geometry.py qwen3.6-35b-a3b --out "/tmp/pn/u$u" --long 32768 --long-only --keep \
      --model-dir /tmp/kvq-real 2>&1 | grep -v "^ *loaded" | tail -4
    cp "/tmp/pn/u$u/qwen3.6-35b-a3b.json" "$OUT/qwen-32k-unpinned$u.json" 2>/dev/null
  done
  PYTHONPATH="$WITH_GGUF" python3 - <<'PY' | tee "$OUT/perplexity-32k.txt"
import sys
from pathlib import Path
sys.path.insert(0, "benchmarks")
from real_geometry import forward_only_rate
t = Path("/tmp/pn/u1/corpus.txt")
print("llama-perplexity, Qwen geometry, n_ctx 32768:", forward_only_rate("/tmp/kvq/bin/llama-perplexity",
      "/tmp/kvq-real/qwen3.6-35b-a3b.Q4_0.gguf", t, 32768, 2, 2048))
PY
  for d in 0 1; do
    NP=""; [ "$d" = 1 ] && NP="GGML_CUDA_NO_PINNED=1"
    env $NP PYTHONPATH="$WITH_GGUF" KVQ_DEVICE_REDUCTION=$d python3 benchmarks/real_geometry.py \
      qwen3.6-35b-a3b --out "/tmp/pn/s$d" --ctx 512 --keep --model-dir /tmp/kvq-real 2>&1 | grep -v "^ *loaded" | tail -4
    cp "/tmp/pn/s$d/qwen3.6-35b-a3b.json" "$OUT/qwen-512-device$d.json" 2>/dev/null
  done
fi
if [ "$stage" = pinned-gemma ]; then  # issue 17, the same on the bundled Gemma: references built unpinned and pinned,
  # issue 17's end-to-end measure with the rows reduced on the device, unpinned and pinned, alternated; the profile
  mkdir -p /tmp/pn/no-gates
  E="--kv-model gemma3-270m -m kvquality --kv-cache q8_0,q4_0,q8_0/q4_0,q4_0:norot --kv-thresholds=/tmp/pn/no-gates"
  # the references built with the output buffers not pinned (a cache of its own), then pinned (the cache the runs use)
  KVQ_CACHE_DIR=/tmp/pn/cache-u1 GGML_CUDA_NO_PINNED=1 /usr/bin/time -f "references built, unpinned: whole process %e s" \
    $P $E --kv-json=/tmp/pn/build-u1.json 2>&1 | grep -E "whole|failed|rror" | tail -2
  /usr/bin/time -f "references built, pinned: whole process %e s" $P $E --kv-json=/tmp/pn/build.json 2>&1 \
    | grep -E "whole|failed|rror" | tail -2
  for r in 1 2; do
    for u in 1 0 h; do  # device unpinned, device pinned, host path (pinned)
      NP=""; [ "$u" = 1 ] && NP="GGML_CUDA_NO_PINNED=1"
      D=1; [ "$u" = h ] && D=0
      env $NP KVQ_DEVICE_REDUCTION=$D /usr/bin/time -f "device=$D unpinned=$u run $r: \
whole process %e s" $P $E --kv-json="/tmp/pn/d-u$u-$r.json" 2>&1 | grep -E "whole|failed|rror" | tail -2
      python3 benchmarks/e2e_rate.py "/tmp/pn/d-u$u-$r.json" | tail -1
    done
  done
  python3 benchmarks/forward_pass_profile.py --ctx 32768 --only 10,11,12,13 2>&1 \
    | grep --line-buffered -E "^#|^round" | tee "$OUT/pinned-gemma.txt"
  tar czf "$OUT/pinned.tar.gz" -C /tmp/pn --exclude='*.gguf' .
fi
if [ "$stage" = trace ]; then  # issue 17: every CUDA kernel of a steady 32,768-token chunk's last call without
  # output rows and of its first with them (ncu), Qwen 3.6 geometry, rows reduced on the device
  PYTHONPATH="$WITH_GGUF" python3 benchmarks/real_geometry.py qwen3.6-35b-a3b --out /tmp/tr --write-only \
    --keep --model-dir /tmp/kvq-real
  NCU=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
  "$NCU" --version > "$OUT/ncu.txt" 2>&1
  python3 benchmarks/kernel_trace.py --ncu "$NCU" --timeout 200 ${TRACE_STEADY_ONLY:+--steady-only} \
    --model /tmp/kvq-real/qwen3.6-35b-a3b.Q4_0.gguf 2>&1 | tee "$OUT/trace-qwen.txt"
fi
if [ "$stage" = hostwait ]; then  # issue 17: where a scored micro-batch's ~10 ms beyond its GPU work go: each
  # call's median time inside llama_decode with and without output rows, not waited for (forward alone, the
  # reduction) and waited for (the host's work plus the GPU's, one after the other; ncu gives the GPU's part)
  PYTHONPATH="$WITH_GGUF" python3 benchmarks/real_geometry.py qwen3.6-35b-a3b --out /tmp/tr --write-only \
    --keep --model-dir /tmp/kvq-real
  python3 benchmarks/forward_pass_profile.py --model /tmp/kvq-real/qwen3.6-35b-a3b.Q4_0.gguf --only 0,2,11,15 \
    --rounds 2 2>&1 | grep --line-buffered -E "^#|^round" | tee "$OUT/hostwait-qwen.txt"
fi
if [ "$stage" = outputs ]; then  # issue 17: the engine with only llama.cpp's output buffers unpinned
  # (engine/host_pinning) on whole evaluations at n_ctx 32,768, Qwen 3.6 geometry; then a context's first call
  # with output rows, all host buffers unpinned, with and without malloc's huge pages (their clearing the suspect)
  PYTHONPATH="$WITH_GGUF" KVQ_DEVICE_REDUCTION=1 python3 benchmarks/real_geometry.py qwen3.6-35b-a3b --out /tmp/ou \
    --long 32768 --long-only --keep --model-dir /tmp/kvq-real 2>&1 | grep -v "^ *loaded" | tail -4
  cp /tmp/ou/qwen3.6-35b-a3b.json "$OUT/qwen-32k-outputs-unpinned.json" 2>/dev/null
  { grep . /sys/kernel/mm/transparent_hugepage/enabled /sys/kernel/mm/transparent_hugepage/defrag; ldd --version | head -1
    free -g | head -2; } > "$OUT/host.txt" 2>&1
  for tun in "" glibc.malloc.hugetlb=1; do
    GLIBC_TUNABLES=$tun python3 benchmarks/forward_pass_profile.py --model /tmp/kvq-real/qwen3.6-35b-a3b.Q4_0.gguf \
      --only 12 --rounds 1 2>&1 | grep --line-buffered -E "^#|^round" | sed "s/^/[${tun:-default}] /" \
      | tee -a "$OUT/first-use-qwen.txt"
  done
fi
if [ "$stage" = hosttrace ]; then  # issue 17: the host's CUDA and scheduler calls inside each llama_decode of a steady
  # 32,768-token chunk, forward pass alone and rows reduced on the device (benchmarks/host_trace.py); then the same
  # two variants with ggml-cuda's CUDA graphs off, for what replaying them saves
  PYTHONPATH="$WITH_GGUF" python3 benchmarks/real_geometry.py qwen3.6-35b-a3b --out /tmp/tr --write-only \
    --keep --model-dir /tmp/kvq-real
  python3 benchmarks/host_trace.py --model /tmp/kvq-real/qwen3.6-35b-a3b.Q4_0.gguf --variants 0,11 2>&1 \
    | tee "$OUT/hosttrace-qwen.txt"
  GGML_CUDA_DISABLE_GRAPHS=1 python3 benchmarks/forward_pass_profile.py --model /tmp/kvq-real/qwen3.6-35b-a3b.Q4_0.gguf \
    --only 0,11 --rounds 1 2>&1 | grep --line-buffered -E "^#|^round" | tee "$OUT/graphs-off-qwen.txt"
fi
if [ "$stage" = fixcheck ]; then  # issue 17: micro-batches without scored rows reduce one row into the trash row, so no
  # decode re-reserves llama.cpp's compute buffers: the host trace and the profile again, the CUDA tests of the reduction
  Q=/tmp/kvq-real/qwen3.6-35b-a3b.Q4_0.gguf
  PYTHONPATH="$WITH_GGUF" python3 benchmarks/real_geometry.py qwen3.6-35b-a3b --out /tmp/tr --write-only --keep --model-dir /tmp/kvq-real
  python3 benchmarks/host_trace.py --model $Q --variants 0,11 > "$OUT/hosttrace-fixed-qwen.txt" 2>&1
  grep -v "^    " "$OUT/hosttrace-fixed-qwen.txt"
  python3 benchmarks/forward_pass_profile.py --model $Q --only 0,11,14 --rounds 2 2>&1 | grep --line-buffered -E "^#|^round" \
    | tee "$OUT/profile-fixed-qwen.txt"
  $P tests/test_real_device_reduction.py -q 2>&1 | tail -2 | tee "$OUT/device-tests.txt"
fi
if [ "$stage" = evals32k ]; then  # issue 17: whole evaluations, Qwen geometry, n_ctx 32,768, rows reduced on the device,
  # the next configuration's contexts made and primed while the current one runs (KVQ_PREPARE=1, the GPU default) and
  # made when needed (0), alternated; then the forward pass alone and llama-bench on the same host, for the ratio
  mkdir -p /tmp/ev
  Q=/tmp/kvq-real/qwen3.6-35b-a3b.Q4_0.gguf
  PYTHONPATH="$WITH_GGUF" python3 benchmarks/real_geometry.py qwen3.6-35b-a3b --out /tmp/tr --write-only --keep --model-dir /tmp/kvq-real
  for r in ${EVAL_ROUNDS:-1 2}; do for k in 0 1; do
    KVQ_PREPARE=$k PYTHONPATH="$WITH_GGUF" KVQ_DEVICE_REDUCTION=1 python3 benchmarks/real_geometry.py \
      qwen3.6-35b-a3b --out "/tmp/ev/prepare$k-$r" --long 32768 --long-only --keep --model-dir /tmp/kvq-real 2>&1 \
      | grep -v "^ *loaded" | grep -v "^{" | tail -3
    cp "/tmp/ev/prepare$k-$r/qwen3.6-35b-a3b.json" "$OUT/qwen-32k-prepare$k-$r.json" 2>/dev/null
  done; done
  [ -n "${NO_FORWARD:-}" ] || python3 benchmarks/forward_pass_profile.py --model $Q --only 0,11 --rounds 1 \
    ${BENCH:+--bench /tmp/kvq/bin/llama-bench} 2>&1 | grep --line-buffered -E "^#|^round|^llama-bench" \
    | tee "$OUT/forward-same-host${EVAL_ROUNDS:+-${EVAL_ROUNDS// /}}.txt"
fi
if [ "$stage" = default ]; then  # issue 17 with the GPU default (KVQ_DEVICE_REDUCTION unset: rows reduced on the GPU when
  # llama.cpp's sampler rows fit in half the available host memory): issue 17's end-to-end measure at n_ctx 512, three
  # rounds, against the host path (0) once per round; which path each result says it took; the worker's peak RSS
  # (/usr/bin/time's maximum covers the waited-for worker); then peak RSS at n_ctx 512 and 32,768 with the default
  mkdir -p /tmp/df/no-gates
  grep MemAvailable /proc/meminfo | tee "$OUT/meminfo.txt"
  G="--kv-model gemma3-270m -m kvquality --kv-cache q8_0,q4_0,q8_0/q4_0,q4_0:norot --kv-thresholds=/tmp/df/no-gates"
  /usr/bin/time -f "build wall %e s, max RSS %M KB" $P $G --kv-json=/tmp/df/build.json 2>&1 | grep -E "wall|passed|failed|rror" | tail -2
  for r in 1 2 3; do
    for d in default 0; do
      if [ $d = default ]; then E="env -u KVQ_DEVICE_REDUCTION"; else E="env KVQ_DEVICE_REDUCTION=0"; fi
      $E /usr/bin/time -f "$d run $r: whole process %e s, max RSS %M KB" $P $G --kv-json="/tmp/df/$d-$r.json" 2>&1 \
        | grep -E "whole|failed|rror" | tail -2
      python3 benchmarks/e2e_rate.py "/tmp/df/$d-$r.json" | tail -1
      python3 -c "import json,sys; r=json.load(open(sys.argv[1]))['results']; print('  device_reduction:', sorted({str(x.get('device_reduction')) for x in r}))" "/tmp/df/$d-$r.json"
    done
  done 2>&1 | tee "$OUT/default-512.txt"
  tar czf "$OUT/default-512.tar.gz" -C /tmp/df .
  $P benchmarks/test_memory.py --benchmark-json "$OUT/memory-default.json" 2>&1 | tail -3 | tee "$OUT/memory-default.txt"
fi
if [ "$stage" = default32k ]; then  # issue 17 with the GPU default at n_ctx 32,768, Qwen 3.6 geometry: whole evaluations
  # (contexts made ahead, the GPU default), with llama-perplexity's own forward-only run over the same two chunks, then
  # the forward pass alone after warm-up on the same host
  Q=/tmp/kvq-real/qwen3.6-35b-a3b.Q4_0.gguf
  PYTHONPATH="$WITH_GGUF" python3 benchmarks/real_geometry.py qwen3.6-35b-a3b --out /tmp/tr --write-only --keep --model-dir /tmp/kvq-real
  for r in ${EVAL_ROUNDS:-1 2}; do
    env -u KVQ_DEVICE_REDUCTION PYTHONPATH="$WITH_GGUF" python3 benchmarks/real_geometry.py qwen3.6-35b-a3b \
      --out "/tmp/d32/$r" --long 32768 --long-only --keep --model-dir /tmp/kvq-real \
      ${PPL:+--perplexity /tmp/kvq/bin/llama-perplexity} ${CACHES:+--caches $CACHES} 2>&1 | grep -v "^ *loaded" | tail -5
    cp "/tmp/d32/$r/qwen3.6-35b-a3b.json" "$OUT/qwen-32k-default${CACHES:+-${CACHES//,/-}}-$r.json" 2>/dev/null
  done
  [ -n "${NO_FORWARD:-}" ] || python3 benchmarks/forward_pass_profile.py --model $Q --only 0,11 --rounds 1 2>&1 \
    | grep --line-buffered -E "^#|^round" | tee "$OUT/forward-same-host-default.txt"
fi
