"""pytest-xdist: workers share references and the controller merges their results"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import GATES


def test_xdist_workers_share_references_and_merge_results(kv_project: pytest.Pytester, fake_model: Path) -> None:
    pytest.importorskip("xdist")
    kv_project.makefile(".yaml", gates=GATES)
    args = ["--kv-model", str(fake_model), "--kv-thresholds", "gates.yaml", "--kv-chunks", "8",
            "--kv-ref-dir", "refs"]
    serial = kv_project.runpytest(*args, "--kv-json", "serial.json")
    serial.assert_outcomes(passed=3, failed=1)
    for ref in (kv_project.path / "refs").glob("*.kvqref"):
        ref.unlink()  # the parallel run builds them again, once
    parallel = kv_project.runpytest_subprocess(*args, "-n", "2", "--dist", "loadgroup",
                                               "--kv-json", "parallel.json")
    parallel.assert_outcomes(passed=3, failed=1)
    parallel.stdout.fnmatch_lines(["*KV-cache quality*", "  q4_0 *FAIL 1/2"])
    a = json.loads((kv_project.path / "serial.json").read_text())
    b = json.loads((kv_project.path / "parallel.json").read_text())
    key = ("cache", "category")
    assert sorted((r[key[0]], r[key[1]], r["kl_mean"]) for r in a["results"]) == sorted(
        (r[key[0]], r[key[1]], r["kl_mean"]) for r in b["results"])  # equal to the last digit
    assert len(b["thresholds"]) == 4
    assert len(list((kv_project.path / "refs").glob("*.kvqref"))) == 4  # one per category, no duplicates


STRESS_CONFTEST = """
    import os
    from pytest_kvquality.testing import FakeEngine

    class CountingEngine(FakeEngine):
        '''Appends one line per reference build to builds.log (O_APPEND: safe across processes).'''
        def reference(self, model, cache, chunks, seed):
            with open(os.path.join(os.environ["KVQ_STRESS_DIR"], "builds.log"), "a") as f:
                f.write(f"{os.getpid()} {chunks.tokens.shape}\\n")
            return super().reference(model, cache, chunks, seed)

    def pytest_kvquality_make_engine(config):
        return CountingEngine()
"""


def test_stress_four_workers_three_configs_shared_references(
    kv_project: pytest.Pytester, fake_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """4 xdist workers, 3 cache configs, one shared reference dir, run twice, and a serial run:
    each reference is built exactly once, no torn file is left, every run gives the same numbers."""
    pytest.importorskip("xdist")
    monkeypatch.setenv("KVQ_STRESS_DIR", str(kv_project.path))
    kv_project.makeconftest(STRESS_CONFTEST)
    kv_project.makefile(".yaml", gates="""
version: 1
models:
  tiny:
    q8_0: {overall: {kl_mean: "< 1"}, coding: {top1: "> 0.1"}, science: {kl_median: "< 9"}}
    q4_0: {overall: {kl_mean: "< 9"}, tool_calling: {top1: "> 0.1"}, long_documents: {kl_p90: "< 99"}}
    q8_0/q4_0:norot: {overall: {kl_mean: "< 9", top1: "> 0.1"}, coding: {dp_rms: "< 1"}}
""")
    args = ["--kv-model", str(fake_model), "--kv-thresholds", "gates.yaml", "--kv-chunks", "8",
            "--kv-ref-dir", "refs"]
    numbers = []
    for run, extra in enumerate([["-n", "4"], ["-n", "4", "--dist", "loadgroup"], []]):
        result = kv_project.runpytest_subprocess(*args, *extra, "--kv-json", f"run{run}.json")
        result.assert_outcomes(passed=9)
        doc = json.loads((kv_project.path / f"run{run}.json").read_text())
        numbers.append(sorted((r["cache"], r["category"], r["kl_mean"], r["top1"]) for r in doc["results"]))
        assert len(doc["thresholds"]) == 9
    assert numbers[0] == numbers[1] == numbers[2]  # to the last digit
    builds = (kv_project.path / "builds.log").read_text().splitlines()
    assert len(builds) == 4  # one per category, in the first run only, whatever the workers
    files = sorted(p.name for p in (kv_project.path / "refs").iterdir())
    assert len([f for f in files if f.endswith(".kvqref")]) == 4
    assert not [f for f in files if f.endswith(".tmp")]  # no torn or temporary files
