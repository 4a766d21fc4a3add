"""--kv-inconclusive: a gate inside the 95 % band fails by default, or warns, or passes"""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import ARGS


def test_a_gate_inside_the_95_percent_band_is_inconclusive_and_fails_by_default(
    kv_project: pytest.Pytester, fake_model: Path, straddling: Path
) -> None:
    result = kv_project.runpytest("--kv-model", str(fake_model), "--kv-thresholds", str(straddling), *ARGS)
    result.assert_outcomes(passed=2, failed=1)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines([
        "*tiny [[]q4_0/f16[]] overall: kl_mean = * (95 % upper bound *): inconclusive against < * "
        "(the 95 % bounds straddle it); about * chunks per category would decide it*--kv-inconclusive=fail",
        "  q4_0/f16 *inconclusive 1/1",
    ])


@pytest.mark.parametrize(("policy", "outcome"), [("warn", {"passed": 3, "warnings": 1}), ("pass", {"passed": 3})])
def test_inconclusive_can_warn_or_pass(kv_project: pytest.Pytester, fake_model: Path, straddling: Path,
                                       policy: str, outcome: dict[str, int]) -> None:
    result = kv_project.runpytest("--kv-model", str(fake_model), "--kv-thresholds", str(straddling), *ARGS,
                                  "--kv-inconclusive", policy)
    result.assert_outcomes(**outcome)
    assert result.ret == pytest.ExitCode.OK
    if policy == "warn":
        result.stdout.fnmatch_lines(["*InconclusiveGate: tiny [[]q4_0/f16[]]*inconclusive*"])
