"""--kv-thresholds: threshold files become items; a bad one is a collection error"""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import GATES


def test_thresholds_become_items_that_pass_and_fail(kv_project: pytest.Pytester, fake_model: Path) -> None:
    kv_project.makefile(".yaml", gates=GATES)
    result = kv_project.runpytest("--kv-model", str(fake_model), "--kv-thresholds", "gates.yaml",
                                  "-v", "--kv-chunks", "8")
    result.stdout.fnmatch_lines([
        "*tiny::q8_0::overall::kl_mean PASSED*",
        "*tiny::q8_0::overall::top1 PASSED*",
        "*tiny::q4_0::overall::kl_mean FAILED*",
        "*tiny::q4_0::coding::top1 PASSED*",
    ])
    result.stdout.fnmatch_lines([
        "*tiny [[]q4_0[]] overall: kl_mean = * ± * (95 % upper bound *): threshold < 0.0001 not met (model tiny, "
        "cache q4_0, category overall, * tokens, n_ctx 64*",
    ])
    result.stdout.fnmatch_lines(["*KV-cache quality*", "tiny (n_ctx 64, * scored tokens)",
                                 "  cache*coding*overall KLD ± σ*same top*KV B/token*gates",
                                 "  q4_0 *FAIL 1/2", "  q8_0 *pass 2"])
    result.assert_outcomes(passed=3, failed=1)
    assert result.ret == pytest.ExitCode.TESTS_FAILED


def test_bad_threshold_file_is_a_collection_error_naming_file_key_and_reason(
    kv_project: pytest.Pytester, fake_model: Path
) -> None:
    kv_project.makefile(".yaml", gates="version: 1\nmodels:\n  tiny:\n    q4_0:\n      overall: {kl_mean: '< x'}\n")
    result = kv_project.runpytest("--kv-model", str(fake_model), "--kv-thresholds", "gates.yaml")
    result.stdout.fnmatch_lines([
        "*ERROR collecting gates.yaml*",
        "*invalid threshold file: *gates.yaml:5: models.tiny.q4_0.overall.kl_mean: threshold 'x' is not a number*",
    ])
    assert result.ret == pytest.ExitCode.INTERRUPTED
