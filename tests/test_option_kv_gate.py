"""--kv-gate: the bound (default) or the bare mean"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import ARGS


def test_mean_gate_compares_the_bare_mean(kv_project: pytest.Pytester, fake_model: Path, straddling: Path) -> None:
    result = kv_project.runpytest("--kv-model", str(fake_model), "--kv-thresholds", str(straddling), *ARGS,
                                  "--kv-gate", "mean", "--kv-json", "out.json")
    result.assert_outcomes(passed=3)
    verdicts = json.loads((kv_project.path / "out.json").read_text())["thresholds"]
    assert {v["gate"] for v in verdicts} == {"mean"} and {v["outcome"] for v in verdicts} == {"pass"}
