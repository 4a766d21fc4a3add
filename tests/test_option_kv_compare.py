"""--kv-save, --kv-compare, --kv-compare-fail: baselines saved, compared, and regressions failed"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import ARGS, SCALED_CONFTEST, run_with_scale


def test_baselines_are_saved_compared_and_fail_on_regression(
    kv_project: pytest.Pytester, fake_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kv_project.makeconftest(SCALED_CONFTEST)
    saved = run_with_scale(kv_project, fake_model, monkeypatch, 1.0, "--kv-save", "main")
    assert saved.ret == pytest.ExitCode.OK
    saved.stdout.fnmatch_lines(["baseline saved: *0001_main.json"])
    stored = json.loads((kv_project.path / ".kvquality" / "0001_main.json").read_text())
    assert stored["schema_version"] == 3 and stored["environment"]["models"]["tiny"]

    # the same numbers: no regression, and deltas are shown
    same = run_with_scale(kv_project, fake_model, monkeypatch, 1.0, "--kv-compare", "--kv-compare-fail", "kl_mean:1%")
    assert same.ret == pytest.ExitCode.OK
    same.stdout.fnmatch_lines(["compared with baseline 0001_main",
                               "  tiny [[]q4_0[]] n_ctx 64 overall: kl_mean * -> * (+0.0 %)"])

    # 20 % more cache noise: kl_mean rises by more than 10 %, the run fails although no gate did
    worse = run_with_scale(kv_project, fake_model, monkeypatch, 1.2, "--kv-compare", "main",
                           "--kv-compare-fail", "kl_mean:10%", "--kv-compare-fail", "top1:0.5")
    assert worse.ret == pytest.ExitCode.TESTS_FAILED
    worse.assert_outcomes(passed=2)
    worse.stdout.fnmatch_lines(["*tiny [[]q4_0[]] n_ctx 64 overall: kl_mean * -> * (+*%)  REGRESSION (kl_mean:10%)",
                                "*regression(s) beyond --kv-compare-fail*: exit status 1"])
    # an absolute criterion wide enough lets the same change through
    wide = run_with_scale(kv_project, fake_model, monkeypatch, 1.2, "--kv-compare", "1",
                          "--kv-compare-fail", "kl_mean:1")
    assert wide.ret == pytest.ExitCode.OK


def test_a_baseline_from_another_environment_warns(kv_project: pytest.Pytester, fake_model: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    kv_project.makeconftest(SCALED_CONFTEST)
    run_with_scale(kv_project, fake_model, monkeypatch, 1.0, "--kv-save", "old")
    path = kv_project.path / ".kvquality" / "0001_old.json"
    doc = json.loads(path.read_text())
    doc["environment"]["corpus_sha256"] = "0" * 64
    path.write_text(json.dumps(doc))
    result = run_with_scale(kv_project, fake_model, monkeypatch, 1.0, "--kv-compare", "old",
                            "--kv-compare-fail", "kl_mean:5%")
    assert result.ret == pytest.ExitCode.OK  # a warning, not a failure
    result.stdout.fnmatch_lines(["warning: the corpus differs from the baseline's (0000* -> *)"])


def test_compare_fail_without_a_baseline_fails_the_run(kv_project: pytest.Pytester, fake_model: Path) -> None:
    result = kv_project.runpytest("--kv-model", str(fake_model), "--kv-cache", "q8_0", *ARGS,
                                  "--kv-thresholds", str(kv_project.path), "--kv-compare", "nope",
                                  "--kv-compare-fail", "kl_mean:10%")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["error: no saved baselines in *.kvquality (save one with --kv-save NAME)"])
