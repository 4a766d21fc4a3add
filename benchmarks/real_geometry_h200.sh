#!/bin/bash
# On the GPU host, after the GPU host's staging (build, model, wait) (see benchmarks/README.md): the real-geometry
# runs of docs/results.md for one model, default settings (two contexts taking chunks in turn), then
# the n_ctx 512 evaluations again with one context (KVQ_ALTERNATE=0), in the same session.
#   bash benchmarks/real_geometry_h200.sh qwen3.6-35b-a3b 32768 OUT_DIR
set -eu
model=$1 long=$2 out=$3
source .gpu/bin/env.sh
export PYTHONPATH="$PYTHONPATH:$PWD:$(ls -d /tmp/kvq/src/llama_cpp_python-*/vendor/llama.cpp/gguf-py)"
export KVQ_GEMMA_GGUF=$KVQ_GPU_MODEL KVQ_CACHE_DIR=/tmp/kvq-cache
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 benchmarks/real_geometry.py "$model" --out "$out/two-contexts" --ctx 512 --long "$long" \
  --bench /tmp/kvq/bin/llama-bench --keep 2>&1 | tee "$out/$model-two-contexts.log"
KVQ_ALTERNATE=0 python3 benchmarks/real_geometry.py "$model" --out "$out/one-context" --ctx 512 --keep \
  2>&1 | tee "$out/$model-one-context.log"
