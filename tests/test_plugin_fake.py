"""The plugin surface, end to end on the fake engine: options, YAML gates, outcomes, messages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

GATES = """
version: 1
models:
  tiny:
    q8_0:
      overall: {kl_mean: "< 0.5", top1: "> 0.5"}
    q4_0:
      overall: {kl_mean: "< 0.0001"}
      coding: {top1: "> 0.2"}
"""


def test_thresholds_become_items_that_pass_and_fail(kv_project: pytest.Pytester, fake_model: Path) -> None:
    kv_project.makefile(".yaml", gates=GATES)
    result = kv_project.runpytest("--kv-model", str(fake_model), "--kv-thresholds", "gates.yaml",
                                  "-v", "--kv-chunks", "2")
    result.stdout.fnmatch_lines([
        "*tiny::q8_0::overall::kl_mean PASSED*",
        "*tiny::q8_0::overall::top1 PASSED*",
        "*tiny::q4_0::overall::kl_mean FAILED*",
        "*tiny::q4_0::coding::top1 PASSED*",
    ])
    result.stdout.fnmatch_lines([
        "*tiny [[]q4_0[]] overall: kl_mean = * ± *, threshold < 0.0001 not met (model tiny, "
        "cache q4_0, category overall, * tokens, n_ctx 64*",
    ])
    result.stdout.fnmatch_lines(["*KV-cache quality*", "*model*cache*category*mean KLD*"])
    result.assert_outcomes(passed=3, failed=1)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
