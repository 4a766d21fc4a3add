#!/usr/bin/env bash
# Build llama-cpp-python from its sdist into the active Python, with llama.cpp's RPC backend
# (GGML_RPC, for --kv-rpc), keeping the CMake build tree; then build from the same tree (same
# llama.cpp, same flags) llama-perplexity, the tool our numbers are checked against, and
# ggml-rpc-server, whose protocol must match the client's; and install that tree's gguf-py.
# Idempotent: a finished build is reused.
#   KVQ_BUILD_DIR (default .build)   LLAMA_CPP_PYTHON_VERSION (default 0.3.36)   CMAKE_ARGS (extra)
set -euo pipefail
VER="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
B="$(mkdir -p "${KVQ_BUILD_DIR:-$ROOT/.build}" && cd "${KVQ_BUILD_DIR:-$ROOT/.build}" && pwd)"
SRC="$B/src/llama_cpp_python-$VER"
JOBS="$(nproc)"
if [ ! -f "$SRC/pyproject.toml" ]; then
  mkdir -p "$B/dl" "$B/src"
  python -m pip download -q --no-binary :all: --no-deps "llama-cpp-python==$VER" -d "$B/dl"
  tar xzf "$B/dl/llama_cpp_python-$VER.tar.gz" -C "$B/src"
fi
if python -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$VER')" 2>/dev/null \
   && grep -q '^GGML_RPC:BOOL=ON' "$B/cmake/CMakeCache.txt" 2>/dev/null; then
  echo "llama-cpp-python $VER already installed from $B"
else
  echo "building llama-cpp-python $VER ($JOBS jobs; ~10 min on 2 cores)"
  CMAKE_BUILD_PARALLEL_LEVEL="$JOBS" CMAKE_ARGS="-DLLAVA_BUILD=OFF -DGGML_RPC=ON ${CMAKE_ARGS:-}" \
    python -m pip install -q "$SRC" --config-settings=build-dir="$B/cmake"
fi
if [ ! -x "$B/cmake/bin/llama-perplexity" ]; then
  echo "building llama-perplexity from the same tree"
  cmake -S "$SRC" -B "$B/cmake" -DLLAMA_BUILD_TOOLS=ON > "$B/reconfigure.log"
  cmake --build "$B/cmake" --target llama-perplexity -j "$JOBS" > "$B/perplexity-build.log"
fi
if [ ! -x "$B/cmake/bin/ggml-rpc-server" ]; then
  echo "building ggml-rpc-server from the same tree"
  cmake -S "$SRC" -B "$B/cmake" -DLLAMA_BUILD_TOOLS=ON -DGGML_RPC=ON > "$B/reconfigure.log"
  cmake --build "$B/cmake" --target ggml-rpc-server -j "$JOBS" > "$B/rpc-server-build.log"
fi
ln -sf "$B/cmake/bin/llama-perplexity" "$B/llama-perplexity"
ln -sf "$B/cmake/bin/ggml-rpc-server" "$B/ggml-rpc-server"
# the gguf writer of the same llama.cpp: its constants (qwen35moe, gemma4 keys) match the loader's;
# the tests write tiny models of each architecture with it (pytest_kvquality/synthetic.py)
python -m pip install -q "$SRC/vendor/llama.cpp/gguf-py"
echo "llama-perplexity: $B/llama-perplexity; ggml-rpc-server: $B/ggml-rpc-server"
