"""--kv-regen and --kv-ref-dir: references cached, reused, regenerated and repaired"""

from __future__ import annotations

import json
from pathlib import Path

import pytest


def test_reference_is_cached_reused_regenerated_and_repaired(kv_project: pytest.Pytester,
                                                              fake_model: Path) -> None:
    args = ["--kv-model", str(fake_model), "--kv-cache", "q8_0", "--kv-chunks", "1",
            "--kv-thresholds", str(kv_project.path), "--kv-ref-dir", "refs"]
    kv_project.runpytest(*args).assert_outcomes(passed=1)
    refs = sorted((kv_project.path / "refs").glob("*.kvqref"))
    assert len(refs) == 4  # one per category
    stamp = [r.stat().st_mtime_ns for r in refs]
    first = kv_project.runpytest(*args, "--kv-json", "a.json")
    assert [r.stat().st_mtime_ns for r in refs] == stamp  # reused
    kv_project.runpytest(*args, "--kv-regen").assert_outcomes(passed=1)
    assert all(r.stat().st_mtime_ns != s for r, s in zip(refs, stamp, strict=True))  # rebuilt
    data = bytearray(refs[0].read_bytes())
    data[-5] ^= 0xFF
    refs[0].write_bytes(bytes(data))
    result = kv_project.runpytest(*args, "--kv-json", "b.json")
    result.stdout.fnmatch_lines(["*note: reference cache entry damaged, rebuilt: *checksum mismatch*"])
    a = json.loads((kv_project.path / "a.json").read_text())["results"]
    b = json.loads((kv_project.path / "b.json").read_text())["results"]
    assert [r["kl_mean"] for r in a] == [r["kl_mean"] for r in b]  # same numbers after repair
    assert first.ret == 0
