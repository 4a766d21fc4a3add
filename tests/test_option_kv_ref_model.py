"""--kv-ref-model: another GGUF as the reference"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import ARGS


def test_a_different_gguf_can_be_the_reference(kv_project: pytest.Pytester, fake_model: Path) -> None:
    from pytest_kvquality.testing import write_fake_gguf

    # the same fake model with perturbed weights, measured against the original's f16 reference
    variant = write_fake_gguf(fake_model.parent / "tiny-q3.gguf", seed=7, weight_noise=0.3)
    result = kv_project.runpytest("--kv-model", str(variant), "--kv-ref-model", str(fake_model),
                                  "--kv-cache", "f16,q4_0", *ARGS, "--kv-thresholds", str(kv_project.path),
                                  "--kv-json", "out.json")
    result.assert_outcomes(passed=2)
    overall = {r["cache"]: r for r in json.loads((kv_project.path / "out.json").read_text())["results"]
               if r["category"] == "overall"}
    assert overall["f16"]["reference_model"] == "tiny"
    assert overall["f16"]["kl_mean"] > 0.01  # the weights alone now cost something
    assert overall["q4_0"]["kl_mean"] > overall["f16"]["kl_mean"]
