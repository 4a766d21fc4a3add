"""--kv-json: verdicts carry their bounds and the chunks that would decide them"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import ARGS


def test_verdicts_in_json_carry_bounds_and_chunks_to_decide(kv_project: pytest.Pytester, fake_model: Path,
                                                            straddling: Path) -> None:
    kv_project.runpytest("--kv-model", str(fake_model), "--kv-thresholds", str(straddling), *ARGS,
                         "--kv-json", "out.json")
    verdicts = {v["cache"]: v for v in json.loads((kv_project.path / "out.json").read_text())["thresholds"]
                if v["category"] == "overall"}
    unsure = verdicts["q4_0/f16"]
    assert unsure["outcome"] == "inconclusive" and unsure["passed"] is False
    assert unsure["low"] < unsure["value"] < unsure["high"]
    assert unsure["chunks_to_decide"] > 8 and unsure["n_chunks"] == 32
    assert unsure["method"].startswith("batch means")
    assert verdicts["q4_0"]["outcome"] == "pass"
