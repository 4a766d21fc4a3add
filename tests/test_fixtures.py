"""The fixtures: kv_eval in a user's test, kv_speed with pytest-benchmark"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import ARGS


def test_kv_eval_fixture_in_a_users_test(kv_project: pytest.Pytester, fake_model: Path) -> None:
    kv_project.makepyfile(test_user="""
        def test_q8_0_is_nearly_lossless(kv_eval):
            result = kv_eval("q8_0")
            assert result.kl_mean < 0.05
            assert result["coding"].top1 > 0.8
            assert set(result.categories) == {"coding", "science", "tool_calling", "long_documents", "overall"}

        def test_q4_0_k_and_v_set_independently(kv_eval):
            both = kv_eval(k="q4_0", v="q4_0")
            k_only = kv_eval(k="q4_0", v="f16")
            assert k_only.kl_mean < both.kl_mean
            assert both.overall.n_tokens == 4 * 8 * 31
    """)
    result = kv_project.runpytest("--kv-model", str(fake_model), "--kv-chunks", "8",
                                  "--kv-thresholds", str(kv_project.path))
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["tiny (n_ctx 64, *", "  q4_0/f16 *", "  q8_0 *"])


SPEED_TEST = """
import pytest

@pytest.mark.parametrize("phase", ["pp", "tg"])
def test_kv_speed(kv_speed, kv_cache, phase):
    assert kv_speed(kv_cache, phase, rounds=3).tokens_per_s > 0
"""


def test_speed_is_benchmarked_per_cache_config_and_shown_next_to_quality(
    kv_project: pytest.Pytester, fake_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)  # pytest-benchmark turns itself off under xdist
    kv_project.makepyfile(test_speed=SPEED_TEST)
    result = kv_project.runpytest("--kv-model", str(fake_model), "--kv-cache", "q8_0,q4_0", *ARGS,
                                  "--kv-thresholds", str(kv_project.path), "--benchmark-json", "bench.json",
                                  "--kv-json", "out.json", "-p", "no:randomly")
    result.assert_outcomes(passed=6)  # four speed tests and two measurements
    result.stdout.fnmatch_lines(["*cache*same top*KV B/token*pp tok/s*tg tok/s*gates", "  q4_0 *"])
    bench = json.loads((kv_project.path / "bench.json").read_text())["benchmarks"]
    assert {(b["extra_info"]["cache"], b["extra_info"]["phase"]) for b in bench} == {
        ("q8_0", "pp"), ("q8_0", "tg"), ("q4_0", "pp"), ("q4_0", "tg")}
    speed = json.loads((kv_project.path / "out.json").read_text())["speed"]
    assert len(speed) == 4 and all(s["tokens_per_s"] > 0 for s in speed)
