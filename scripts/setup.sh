#!/usr/bin/env bash
# Fresh-machine setup: a virtualenv in .venv with llama-cpp-python built from its sdist (plus
# llama-perplexity from the same build, for the comparison test), this plugin, and the test tools.
# Idempotent: a second run reuses what is there. ~7 minutes on 2 cores the first time.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pip install -q --upgrade pip
bash scripts/install-llama.sh
python -m pip install -q -e ".[test]"
python -c "import llama_cpp, pytest_kvquality; print('ready: llama-cpp-python', llama_cpp.__version__)"
