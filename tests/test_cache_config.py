"""cache_config.py: K/V cache config spellings, their errors, KV bytes per token."""

from __future__ import annotations

import pytest

from pytest_kvquality.cache_config import CacheConfig, CacheConfigError


def test_kv_bytes_per_token_follow_the_block_sizes() -> None:
    # Gemma 3 270M: 18 layers, 1 KV head, 256-wide heads
    assert CacheConfig.parse("f16").kv_bytes_per_token(18, 1, 256, 256) == 18 * 2 * 256 * 2
    assert CacheConfig.parse("q8_0").kv_bytes_per_token(18, 1, 256, 256) == 18 * 2 * 8 * 34
    assert CacheConfig.parse("q8_0/q4_0").kv_bytes_per_token(18, 1, 256, 256) == 18 * (8 * 34 + 8 * 18)


@pytest.mark.parametrize(("text", "k", "v", "rot", "fa", "label"), [
    ("q4_0", "q4_0", "q4_0", True, True, "q4_0"),
    ("q8_0/q4_0", "q8_0", "q4_0", True, True, "q8_0/q4_0"),
    ("q4_0:norot", "q4_0", "q4_0", False, True, "q4_0:norot"),
    ("f16:nofa", "f16", "f16", True, False, "f16:nofa"),
    ("Q8_0/IQ4_NL:norot", "q8_0", "iq4_nl", False, True, "q8_0/iq4_nl:norot"),
])
def test_cache_config_spellings(text: str, k: str, v: str, rot: bool, fa: bool, label: str) -> None:
    c = CacheConfig.parse(text)
    assert (c.type_k, c.type_v, c.rotation, c.flash_attn, c.label) == (k, v, rot, fa, label)
    assert CacheConfig.parse(c.label) == c


@pytest.mark.parametrize(("text", "message"), [
    ("q3_0", "unknown KV cache type 'q3_0'"),
    ("q4_0:nofa", "quantized V cache (q4_0) needs flash attention"),
    ("q4_0:fast", "unknown suffix ':fast'"),
    ("q8_0/q4_0/f16", "expected 'K' or 'K/V'"),
])
def test_bad_cache_configs_say_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(CacheConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        CacheConfig.parse(text)


def test_quantized_k_with_f16_v_may_run_without_flash_attention() -> None:
    assert CacheConfig.parse("q8_0/f16:nofa").flash_attn is False
