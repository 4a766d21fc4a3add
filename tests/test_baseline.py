"""baseline.py: --kv-compare-fail criteria and what a comparison warns about."""

from __future__ import annotations

import math

import pytest

from pytest_kvquality.baseline import BaselineError, Criterion, environment_differences


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
