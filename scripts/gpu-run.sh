#!/usr/bin/env bash
# On the GPU host (see shared/gpu/README.md), after `source .gpu/bin/env.sh`: the test suite, the
# bundled Gemma on the full built-in corpus at n_ctx 512, long documents at n_ctx 8192, and the
# throughput benchmarks. Everything it measures lands in $OUT (docs/results.md is built from it).
#   stage: tests | full | long | bench | all (default all)
set -uo pipefail
OUT="${OUT:-/tmp/kvq-out}"; mkdir -p "$OUT"
export KVQ_CACHE_DIR="${KVQ_CACHE_DIR:-/tmp/kvq-cache}" KVQ_GEMMA_GGUF="${KVQ_GPU_MODEL:?source env.sh}"
REG="$KVQ_CACHE_DIR/registry.yaml"; mkdir -p "$KVQ_CACHE_DIR"
printf 'version: 1\nmodels:\n  gemma3-270m:\n    path: %s\n' "$KVQ_GPU_MODEL" > "$REG"
P="python3 -m pytest -p pytest_kvquality.plugin -p no:cacheprovider --kv-registry $REG"
stage="${1:-all}"
T=""; [ -x /usr/bin/time ] && T="/usr/bin/time -v"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/gpu.txt" 2>&1
if [ "$stage" = tests ] || [ "$stage" = all ]; then
  $T $P tests -q -rs 2>&1 | tee "$OUT/tests.log" | tail -15
fi
if [ "$stage" = full ] || [ "$stage" = all ]; then
  $T $P --kv-model gemma3-270m -m kvquality \
    --kv-cache f16,q8_0,q4_0,q8_0:norot,q4_0:norot,q8_0/q4_0 \
    --kv-json "$OUT/full-512.json" 2>&1 | tee "$OUT/full-512.log" | grep -v "^\[kvquality\]" | tail -45
fi
if [ "$stage" = long ] || [ "$stage" = all ]; then
  mkdir -p /tmp/kvq-long/corpus /tmp/kvq-long/no-thresholds
  cp pytest_kvquality/corpus_data/long_documents.txt /tmp/kvq-long/corpus/
  $T $P --kv-model gemma3-270m -m kvquality --kv-corpus /tmp/kvq-long/corpus \
    --kv-ctx 8192 --kv-cache q8_0,q4_0 --kv-thresholds /tmp/kvq-long/no-thresholds --kv-json "$OUT/long-8192.json" 2>&1 \
    | tee "$OUT/long-8192.log" | grep -v "^\[kvquality\]" | tail -20
fi
if [ "$stage" = bench ] || [ "$stage" = all ]; then
  KVQ_BENCH_CHUNKS=23 $P benchmarks --benchmark-json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log" | tail -25
fi
