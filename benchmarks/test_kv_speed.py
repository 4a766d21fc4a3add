"""Prompt-processing and generation speed per cache config, next to quality in the summary table.

Run with a model: ``pytest benchmarks/test_kv_speed.py --kv-model gemma3-270m --kv-cache f16,q8_0,q4_0``
(without ``--kv-model`` these skip). pytest-benchmark times each round, so ``--benchmark-save`` and
``--benchmark-compare-fail`` work on them; the tokens/s in the KV-cache table are llama.cpp's own time.
"""

from __future__ import annotations

import pytest


@pytest.mark.parametrize("phase", ["pp", "tg"])
def test_kv_speed(kv_speed, kv_cache, phase: str) -> None:  # type: ignore[no-untyped-def]
    result = kv_speed(kv_cache, phase, rounds=5)
    assert result.tokens_per_s > 0
