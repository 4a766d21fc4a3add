"""Use in CI, end to end on the fake engine: confidence-bound gates and inconclusive verdicts,
baselines (--kv-save / --kv-compare / --kv-compare-fail), Markdown and the GitHub
step summary, JUnit properties, the report header, colours, exit codes, speed next to quality."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from helpers import PLUGIN_ARGS

ARGS = ["--kv-chunks", "8"]

#: the fake model's cache noise is scaled by FAKE_NOISE_SCALE: a "regression" for baseline tests
SCALED_CONFTEST = """
import os
from pytest_kvquality.testing import FakeEngine

def pytest_kvquality_make_engine(config):
    return FakeEngine(noise_scale=float(os.environ.get("FAKE_NOISE_SCALE", "1")))
"""


def measured(kv_project: pytest.Pytester, fake_model: Path, caches: str) -> dict[str, tuple[float, float]]:
    """The fake model's overall mean KLD and its σ between chunks (what gates use) per cache config,
    from a first run's JSON."""
    kv_project.runpytest("--kv-model", str(fake_model), "--kv-cache", caches, *ARGS,
                         "--kv-thresholds", str(kv_project.path), "--kv-json", "measured.json")
    doc = json.loads((kv_project.path / "measured.json").read_text())
    return {r["cache"]: (r["kl_mean"], r["stats"]["bounds"]["kl_mean"]["se"]) for r in doc["results"]
            if r["category"] == "overall"}


@pytest.fixture
def straddling(kv_project: pytest.Pytester, fake_model: Path) -> Path:
    """Gates from measured values: q4_0 passes clearly (8σ of room), q4_0/f16 sits at +0.5σ,
    inside the one-sided 95 % band, so neither pass nor fail can be claimed."""
    m = measured(kv_project, fake_model, "q4_0,q4_0/f16")
    (q4, q4_unc), (k4, k4_unc) = m["q4_0"], m["q4_0/f16"]
    kv_project.makefile(".yaml", gates=f"""
version: 1
models:
  tiny:
    q4_0:
      overall: {{kl_mean: "< {q4 + 8 * q4_unc:.6f}"}}
      coding: {{kl_mean: "< 9"}}
    q4_0/f16:
      overall: {{kl_mean: "< {k4 + 0.5 * k4_unc:.6f}"}}
""")
    return kv_project.path / "gates.yaml"


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


def test_mean_gate_compares_the_bare_mean(kv_project: pytest.Pytester, fake_model: Path, straddling: Path) -> None:
    result = kv_project.runpytest("--kv-model", str(fake_model), "--kv-thresholds", str(straddling), *ARGS,
                                  "--kv-gate", "mean", "--kv-json", "out.json")
    result.assert_outcomes(passed=3)
    verdicts = json.loads((kv_project.path / "out.json").read_text())["thresholds"]
    assert {v["gate"] for v in verdicts} == {"mean"} and {v["outcome"] for v in verdicts} == {"pass"}


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


def run_with_scale(kv_project: pytest.Pytester, fake_model: Path, monkeypatch: pytest.MonkeyPatch,
                   scale: float, *extra: str) -> pytest.RunResult:
    monkeypatch.setenv("FAKE_NOISE_SCALE", str(scale))
    return kv_project.runpytest("--kv-model", str(fake_model), "--kv-cache", "q8_0,q4_0", *ARGS,
                                "--kv-thresholds", str(kv_project.path), *extra)


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


@pytest.mark.parametrize(("args", "message"), [
    (["--kv-compare-fail", "kl_mean:10%"], "*--kv-compare-fail needs --kv-compare*"),
    (["--kv-compare", "--kv-compare-fail", "speed:10%"], "*expected METRIC:X% or METRIC:X*"),
])
def test_bad_ci_options_are_usage_errors(kv_project: pytest.Pytester, args: list[str], message: str) -> None:
    result = kv_project.runpytest(*args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message])


def test_markdown_summary_and_github_step_summary(kv_project: pytest.Pytester, fake_model: Path,
                                                   straddling: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    step_summary = kv_project.path / "step_summary.md"
    step_summary.write_text("# earlier step\n")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(step_summary))
    kv_project.runpytest("--kv-model", str(fake_model), "--kv-thresholds", str(straddling), *ARGS,
                         "--kv-markdown", "kv.md")
    md = (kv_project.path / "kv.md").read_text()
    assert md.startswith("## KV-cache quality\n")
    assert "| cache | coding | long_documents | science | tool_calling | overall KLD ± σ |" in md
    assert "| `q4_0` |" in md and "✅ pass 2 |" in md and "⚠️ inconclusive 1/1 |" in md
    assert "### Gates not passed" in md and "`tiny::q4_0/f16::overall::kl_mean`" in md
    assert step_summary.read_text() == "# earlier step\n" + md + "\n"  # appended, never overwritten


def test_junit_xml_carries_the_metrics_as_properties(kv_project: pytest.Pytester, fake_model: Path,
                                                      straddling: Path) -> None:
    kv_project.runpytest("--kv-model", str(fake_model), "--kv-thresholds", str(straddling), *ARGS,
                         "--junitxml", "junit.xml")
    cases = [{p.get("name"): p.get("value") for p in c.iter("property")}
             for c in ET.parse(kv_project.path / "junit.xml").iter("testcase")]
    props = next(c for c in cases if c.get("kv_cache") == "q4_0/f16")
    assert props["kv_verdict"] == "inconclusive" and props["kv_gate"] == "bound"
    assert float(props["kv_lower_bound"]) < float(props["kv_value"]) < float(props["kv_upper_bound"])
    assert props["kv_threshold"].startswith("kl_mean < ") and props["kv_cache"] == "q4_0/f16"


def test_report_header_names_versions_backend_and_references(kv_project: pytest.Pytester, fake_model: Path) -> None:
    result = kv_project.runpytest(*PLUGIN_ARGS, f"--kv-model={fake_model}", "--co")
    result.stdout.fnmatch_lines([
        "kvquality *: llama-cpp-python * (ggml *), * build; references in *",
        "kvquality: models *tiny.gguf; n_ctx *; reference f16; gates on the 95 % bound, inconclusive -> fail",
    ])


def test_verdicts_are_coloured_when_the_terminal_has_colour(kv_project: pytest.Pytester, fake_model: Path,
                                                             straddling: Path) -> None:
    result = kv_project.runpytest("--kv-model", str(fake_model), "--kv-thresholds", str(straddling), *ARGS,
                                  "--color=yes")
    text = result.stdout.str()
    assert "\x1b[32m\x1b[1mpass 2" in text and "\x1b[33m\x1b[1minconclusive 1/1" in text


@pytest.mark.parametrize(("gates", "code"), [('"< 9"', pytest.ExitCode.OK),
                                             ('"< 0.0001"', pytest.ExitCode.TESTS_FAILED)])
def test_exit_status_is_0_when_all_gates_pass_and_1_when_one_fails(
    kv_project: pytest.Pytester, fake_model: Path, gates: str, code: pytest.ExitCode
) -> None:
    kv_project.makefile(".yaml", gates=f"version: 1\nmodels:\n  tiny:\n    q8_0:\n"
                                       f"      overall: {{kl_mean: {gates}}}\n")
    result = kv_project.runpytest("--kv-model", str(fake_model), "--kv-thresholds", "gates.yaml", *ARGS)
    assert result.ret == code


SPEED_TEST = """
import pytest

@pytest.mark.parametrize("phase", ["pp", "tg"])
def test_kv_speed(kv_speed, kv_cache, phase):
    assert kv_speed(kv_cache, phase, rounds=3).tokens_per_s > 0
"""


def test_speed_is_benchmarked_per_cache_config_and_shown_next_to_quality(
    kv_project: pytest.Pytester, fake_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)  # pytest-benchmark turns itself off under xdist
    kv_project.makepyfile(test_speed=SPEED_TEST)
    result = kv_project.runpytest("--kv-model", str(fake_model), "--kv-cache", "q8_0,q4_0", *ARGS,
                                  "--kv-thresholds", str(kv_project.path), "--benchmark-json", "bench.json",
                                  "--kv-json", "out.json", "-p", "no:randomly")
    result.assert_outcomes(passed=6)  # four speed tests and two measurements
    result.stdout.fnmatch_lines(["*cache*same top*KV B/token*pp tok/s*tg tok/s*gates", "  q4_0 *"])
    bench = json.loads((kv_project.path / "bench.json").read_text())["benchmarks"]
    assert {(b["extra_info"]["cache"], b["extra_info"]["phase"]) for b in bench} == {
        ("q8_0", "pp"), ("q8_0", "tg"), ("q4_0", "pp"), ("q4_0", "tg")}
    speed = json.loads((kv_project.path / "out.json").read_text())["speed"]
    assert len(speed) == 4 and all(s["tokens_per_s"] > 0 for s in speed)


def test_gpu_tests_skip_without_a_gpu_build_and_fail_under_require(kv_project: pytest.Pytester) -> None:
    from pytest_kvquality.environment import host_backend

    if host_backend().gpu:
        pytest.skip("this host has a GPU build: the skip cannot be shown here")
    kv_project.makepyfile("""
        import pytest

        @pytest.mark.kv_gpu
        def test_on_the_gpu():
            pass
    """)
    skipped = kv_project.runpytest("-rs")
    skipped.assert_outcomes(skipped=1)
    skipped.stdout.fnmatch_lines(["*needs a GPU build of llama-cpp-python*here is a CPU build*"])
    required = kv_project.runpytest("--kv-require")
    required.assert_outcomes(errors=1)  # in setup: the run fails
    assert required.ret == pytest.ExitCode.TESTS_FAILED


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
