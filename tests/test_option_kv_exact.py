"""--kv-exact: the reference evaluated alongside, no cache"""

from __future__ import annotations

from pathlib import Path

import pytest


def test_exact_mode_needs_no_reference_cache(kv_project: pytest.Pytester, fake_model: Path) -> None:
    result = kv_project.runpytest("--kv-model", str(fake_model), "--kv-cache", "q4_0", "--kv-exact",
                                  "--kv-chunks", "1", "--kv-thresholds", str(kv_project.path),
                                  "--kv-ref-dir", "refs")
    result.assert_outcomes(passed=1)
    assert not list((kv_project.path / "refs").glob("*.kvqref"))
    result.stdout.fnmatch_lines(["*reference f16 (exact, no cache)*"])
