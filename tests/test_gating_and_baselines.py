"""Order statistics, baseline criteria and llama.cpp log parsing: pure functions, hand-made inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pytest_kvquality.baseline import BaselineError, Criterion, environment_differences
from pytest_kvquality.cache_config import CacheConfig
from pytest_kvquality.llama_log import OUT_OF_MEMORY, context_log_facts, kv_placement
from pytest_kvquality.metrics import quantile_bounds


def test_order_statistic_bounds_of_percentiles() -> None:
    values = np.sort(np.random.default_rng(0).exponential(size=20000))
    low, high = quantile_bounds(values, 0.99, 1.6448536269514722)
    true_p99 = -math.log(0.01)
    assert low < true_p99 < high
    assert high - low < 0.25
    assert quantile_bounds(values[:100], 0.999, 1.64) == (float(values[98]), math.inf)  # too few for p99.9


@pytest.mark.parametrize(("text", "old", "new", "regressed"), [
    ("kl_mean:10%", 0.100, 0.109, False), ("kl_mean:10%", 0.100, 0.111, True),
    ("kl_mean:10%", 0.100, 0.050, False),  # better is never a regression
    ("top1:0.005", 0.900, 0.896, False), ("top1:0.005", 0.900, 0.894, True),
    ("top1:0.5%", 0.900, 0.894, True),    # 0.5 % of 0.9 = 0.0045
    ("kl_p99:0", 1.0, 1.0, False), ("kl_p99:0", 1.0, 1.0001, True),
    ("kl_mean:10%", math.nan, 0.141, True),  # a NaN baseline cannot show that nothing got worse
    ("kl_mean:10%", 0.1, math.inf, True), ("top1:0.5", 0.9, math.nan, True),
])
def test_compare_fail_criteria(text: str, old: float, new: float, regressed: bool) -> None:
    assert Criterion.parse(text).regressed(old, new) is regressed


@pytest.mark.parametrize("text", ["kl_mean", "bogus:10%", "kl_mean:lots", "top1:-1"])
def test_bad_compare_fail_criteria_are_refused(text: str) -> None:
    with pytest.raises(BaselineError):
        Criterion.parse(text)


def test_environment_differences_that_matter_are_named() -> None:
    old = {"llama_cpp_python": "0.3.36", "corpus_sha256": "a", "models": {"m": "111"}, "python": "3.11"}
    new = {"llama_cpp_python": "0.3.37", "corpus_sha256": "a", "models": {"m": "222"}, "python": "3.12"}
    diffs = environment_differences(old, new)
    assert len(diffs) == 2
    assert "llama-cpp-python version differs" in diffs[0] and "model m is a different file" in diffs[1]


SCHED_DEBUG = """
## SPLIT #0: CUDA0 # 0 inputs
node # 36 (FLASH_ATTN):              node_36 (   4K) [CUDA0         ] use=1,c=1:  (reshaped) (view) ( (   4K) \
[CUDA0 ] cache_k_l0 (view) (p (  68K) [CUDA0 ] cache_v_l0 (view) (p (  36K
node # 37 (  MUL_MAT):              node_37 (   4K) [CUDA0         ] use=1,c=1:  attn_out.weight (  1M) [CUDA0 ]
## SPLIT #1: CPU # 3 inputs
node # 88 (FLASH_ATTN):              node_88 (   4K) [  CPU         ] use=1,c=1:  (reshaped) (view) ( (   4K) \
[  CPU ] cache_k_l1 (view) (p (  68K) [  CPU ] cache_v_l1 (view) (p (  36K
"""


def test_kv_placement_finds_kv_ops_left_on_the_cpu() -> None:
    assert kv_placement(SCHED_DEBUG) == {"kv_devices": ["CPU", "CUDA0"], "kv_cpu_ops": ["FLASH_ATTN"]}
    assert kv_placement("nothing here") == {}


def test_context_facts_add_up_both_caches_of_a_sliding_window_model() -> None:
    log = """
llama_kv_cache: size =    0.30 MiB (   256 cells,   3 layers,  1/1 seqs), K (q8_0):    0.20 MiB, V (q4_0):    0.11 MiB
llama_kv_cache: attn_rot_k = 1, n_embd_head_k_all = 256
llama_kv_cache: attn_rot_v = 0, n_embd_head_k_all = 256
llama_kv_cache: size =    1.52 MiB (   256 cells,  15 layers,  1/1 seqs), K (q8_0):    1.00 MiB, V (q4_0):    0.53 MiB
llama_context: flash_attn            = enabled
"""
    facts = context_log_facts(log)
    assert facts == {"rotation_k": True, "rotation_v": False, "kv_cache_mib": 1.82, "kv_cells": 256,
                     "kv_layers": 18, "flash_attn": "enabled"}
    assert OUT_OF_MEMORY.search("ggml_backend_cpu_buffer_type_alloc_buffer: failed to allocate buffer")
    assert not OUT_OF_MEMORY.search("llama_init_from_model: failed to initialize the context: bad type")


def test_kv_bytes_per_token_follow_the_block_sizes() -> None:
    # Gemma 3 270M: 18 layers, 1 KV head, 256-wide heads
    assert CacheConfig.parse("f16").kv_bytes_per_token(18, 1, 256, 256) == 18 * 2 * 256 * 2
    assert CacheConfig.parse("q8_0").kv_bytes_per_token(18, 1, 256, 256) == 18 * 2 * 8 * 34
    assert CacheConfig.parse("q8_0/q4_0").kv_bytes_per_token(18, 1, 256, 256) == 18 * (8 * 34 + 8 * 18)
