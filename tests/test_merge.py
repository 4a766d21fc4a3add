"""python -m pytest_kvquality merge: a CI matrix's --kv-json documents as one table, one gate summary
and one exit status, which any failed shard fails."""

from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
from helpers import ARGS, GATES, SCALED_CONFTEST

from pytest_kvquality.cli import main


def shard(kv_project: pytest.Pytester, fake_model: Path, caches: str, name: str, *extra: str) -> Path:
    """One CI job: the fake model gated on ``caches``, its results in ``name``."""
    kv_project.makefile(".yaml", gates=GATES)
    kv_project.runpytest("--kv-model", str(fake_model), "--kv-cache", caches, *ARGS,
                         "--kv-thresholds", str(kv_project.path / "gates.yaml"), "--kv-json", name, *extra)
    return kv_project.path / name


def edited(path: Path, name: str, edit: Any) -> Path:
    doc = json.loads(path.read_text())
    edit(doc)
    out = path.with_name(name)
    out.write_text(json.dumps(doc))
    return out


def test_shards_that_all_pass_merge_into_one_passing_table(kv_project: pytest.Pytester, fake_model: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    a = shard(kv_project, fake_model, "q8_0", "a.json")
    b = shard(kv_project, fake_model, "q8_0/q4_0", "b.json")
    md, junit, out = (kv_project.path / n for n in ("merged.md", "merged.xml", "merged.json"))
    assert main(["merge", str(a), str(b), "--markdown", str(md), "--junitxml", str(junit), "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "merged 2 document(s): 2 gate(s), 0 failed, 0 inconclusive, 0 problem(s): PASSED" in printed
    assert "All 2 gates passed." in md.read_text()
    doc = json.loads(out.read_text())
    assert {r["cache"] for r in doc["results"]} == {"q8_0", "q8_0/q4_0"}
    assert doc["run"]["exit_status"] == 0 and doc["run"]["tests_failed"] == 0
    suite = ET.parse(junit).getroot().find("testsuite")
    assert suite is not None and suite.get("tests") == "2" and suite.get("failures") == "0"


def test_a_failed_gate_in_any_shard_fails_the_merged_verdict(kv_project: pytest.Pytester, fake_model: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    good = shard(kv_project, fake_model, "q8_0", "good.json")
    bad = shard(kv_project, fake_model, "q4_0", "bad.json")
    md, junit = kv_project.path / "merged.md", kv_project.path / "merged.xml"
    for order in ([good, bad], [bad, good]):
        assert main(["merge", *map(str, order), "--markdown", str(md), "--junitxml", str(junit)]) == 1
    printed = capsys.readouterr().out
    assert "1 failed" in printed and "FAILED" in printed and "FAIL 1/2" in printed
    assert "### Gates not passed" in md.read_text()
    failures = [c for c in ET.parse(junit).getroot().iter("testcase") if c.find("failure") is not None]
    assert any("q4_0" in str(c.get("name")) for c in failures)


def test_an_inconclusive_gate_fails_the_merge_even_where_its_run_let_it_pass(
    kv_project: pytest.Pytester, fake_model: Path, straddling: Path
) -> None:
    kv_project.runpytest("--kv-model", str(fake_model), "--kv-thresholds", str(straddling), *ARGS,
                         "--kv-inconclusive", "pass", "--kv-json", "unsure.json")
    doc = json.loads((kv_project.path / "unsure.json").read_text())
    assert doc["run"]["exit_status"] == 0  # the run itself passed
    assert main(["merge", str(kv_project.path / "unsure.json")]) == 1


def test_a_shard_whose_run_failed_fails_the_merge_though_its_gates_passed(
    kv_project: pytest.Pytester, fake_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    kv_project.makepyfile(test_broken="def test_broken():\n    assert False\n")
    broken = shard(kv_project, fake_model, "q8_0", "broken.json")
    assert json.loads(broken.read_text())["run"]["exit_status"] == 1
    assert main(["merge", str(broken)]) == 1
    assert "broken.json: its pytest run exited with status 1 (1 test(s) failed)" in capsys.readouterr().out


def test_documents_that_disagree_on_a_row_fail_and_a_repeated_document_is_kept_once(
    kv_project: pytest.Pytester, fake_model: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str]
) -> None:
    kv_project.makeconftest(SCALED_CONFTEST)
    a = shard(kv_project, fake_model, "q8_0", "a.json")
    assert main(["merge", str(a), str(a)]) == 0
    assert "with the same numbers: kept once" in capsys.readouterr().out
    monkeypatch.setenv("FAKE_NOISE_SCALE", "1.3")
    noisier = shard(kv_project, fake_model, "q8_0", "noisier.json")
    assert main(["merge", str(a), str(noisier)]) == 1
    assert "with different results" in capsys.readouterr().out


def test_skipped_models_and_missing_gates_fail_unless_allowed(kv_project: pytest.Pytester, fake_model: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    a = shard(kv_project, fake_model, "q8_0", "a.json")
    skipped = edited(a, "skipped.json", lambda d: d["skipped"].append(
        {"model": "qwen3.6-35b-a3b", "reason": "not on this machine"}))
    assert main(["merge", str(skipped)]) == 1
    assert "model qwen3.6-35b-a3b was skipped (not on this machine)" in capsys.readouterr().out
    assert main(["merge", str(skipped), "--allow-skipped"]) == 0
    no_gates = edited(a, "none.json", lambda d: d.update(thresholds=[]))
    assert main(["merge", str(no_gates)]) == 1
    assert "no gate ran in any document" in capsys.readouterr().out
    older = edited(a, "older.json", lambda d: d.pop("run"))
    assert main(["merge", str(older)]) == 0
    assert "does not say how its run ended" in capsys.readouterr().out


def test_the_merge_runs_without_llama_cpp(kv_project: pytest.Pytester, fake_model: Path) -> None:
    """The merge job of docs/ci.md installs no llama-cpp-python (a 5-minute build)."""
    a = shard(kv_project, fake_model, "q8_0", "a.json")
    blocker = ("import sys\nclass Block:\n    def find_spec(self, name, *a):\n"
               "        if name.split('.')[0] in ('llama_cpp', 'huggingface_hub', 'gguf', 'jinja2'):\n"
               "            raise ImportError(name + ' is blocked')\n"
               "sys.meta_path.insert(0, Block())\n"
               "from pytest_kvquality.cli import main\nsys.exit(main(sys.argv[1:]))\n")
    done = subprocess.run([sys.executable, "-c", blocker, "merge", str(a)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "PASSED" in done.stdout


def test_documents_that_cannot_be_read_stop_the_merge(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["merge", str(tmp_path / "missing.json")]) == 2
    assert "missing.json: cannot be read" in capsys.readouterr().err
    (tmp_path / "cut.json").write_text('{"schema_version": 3, "results": [')
    assert main(["merge", str(tmp_path / "cut.json")]) == 2
    assert "cut.json: not a --kv-json document" in capsys.readouterr().err


def test_another_environment_is_a_warning_as_for_baselines(kv_project: pytest.Pytester, fake_model: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    a = shard(kv_project, fake_model, "q8_0", "a.json")
    b = edited(shard(kv_project, fake_model, "q8_0/q4_0", "b.json"), "b2.json",
               lambda d: d["environment"].update(llama_cpp_python="0.3.99"))
    assert main(["merge", str(a), str(b)]) == 0
    assert f"b2.json: the llama-cpp-python version differs from {a}'s (fake -> 0.3.99)" in capsys.readouterr().out


def test_a_merged_baseline_is_compared_against(kv_project: pytest.Pytester, fake_model: Path) -> None:
    a = shard(kv_project, fake_model, "q8_0", "a.json")
    b = shard(kv_project, fake_model, "q8_0/q4_0", "b.json")
    assert main(["merge", str(a), str(b), "--save", "main", "--storage", str(kv_project.path / ".kvquality")]) == 0
    result = kv_project.runpytest("--kv-model", str(fake_model), "--kv-cache", "q8_0,q8_0/q4_0", *ARGS,
                                  "--kv-thresholds", str(kv_project.path / "gates.yaml"), "--kv-compare", "main",
                                  "--kv-compare-fail", "kl_mean:1%")
    assert result.ret == pytest.ExitCode.OK
    result.stdout.fnmatch_lines(["compared with baseline 0001_main", "  tiny [[]q8_0/q4_0[]] n_ctx 64 overall: *"])


def test_the_summary_goes_to_the_step_summary_and_a_file_that_cannot_take_it_is_a_warning(
    kv_project: pytest.Pytester, fake_model: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    a = shard(kv_project, fake_model, "q8_0", "a.json")
    step = kv_project.path / "step.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(step))
    assert main(["merge", str(a)]) == 0
    assert "## KV-cache quality" in step.read_text() and "### Merge" in step.read_text()
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", "/dev/full")
    assert main(["merge", str(a)]) == 0  # the runner's file, not an output asked for
    assert "warning: could not append to $GITHUB_STEP_SUMMARY (/dev/full)" in capsys.readouterr().err
