"""--kv-gen, --kv-gen-tokens, --kv-gen-agree: generation divergence as gates like any other metric,
reference generations cached with the reference logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

GEN_GATES = """
version: 1
models:
  tiny:
    q8_0:
      overall: {gen_first_divergence_median: "> 12"}
    q4_0:
      overall: {gen_first_divergence_median: "> 12"}
"""

#: an engine that logs each reference generation it builds
COUNTING = """
import os
from pytest_kvquality.testing import FakeEngine

class Counting(FakeEngine):
    def generate_reference(self, model, cache, prompts, n_tokens, seed):
        with open(os.path.join(os.environ["KVQ_GEN_LOG"]), "a") as f:
            f.write(f"{len(prompts)} {n_tokens}\\n")
        return super().generate_reference(model, cache, prompts, n_tokens, seed)

def pytest_kvquality_make_engine(config):
    return Counting()
"""

ARGS = ["--kv-chunks", "8", "--kv-gen-tokens", "24"]


def test_a_generation_gate_fails_the_noisier_cache_and_passes_the_finer(
        kv_project: pytest.Pytester, fake_model: Path) -> None:
    """No --kv-gen: the gates alone make the run generate (8 prompts per category, the default 16
    capped by the chunks there are)."""
    kv_project.makefile(".yaml", gates=GEN_GATES)
    result = kv_project.runpytest("--kv-model", str(fake_model), "--kv-thresholds", "gates.yaml", *ARGS,
                                  "--kv-json", "out.json", "-v")
    result.stdout.fnmatch_lines(["*tiny::q8_0::overall::gen_first_divergence_median PASSED*",
                                 "*tiny::q4_0::overall::gen_first_divergence_median FAILED*",
                                 "*gen_first_divergence_median = * (95 % lower bound *; bootstrap over 32 prompts*"])
    doc = json.loads((kv_project.path / "out.json").read_text())
    overall = {r["cache"]: r for r in doc["results"] if r["category"] == "overall"}
    assert overall["q4_0"]["generation"]["n_prompts"] == 32
    assert overall["q4_0"]["generation"]["gen_first_divergence_median"] < 12 < \
        overall["q8_0"]["generation"]["gen_first_divergence_median"]
    assert overall["q8_0"]["stats"]["generation"]["gen_identical"] == overall["q8_0"]["generation"]["gen_identical"]


def test_reference_generations_are_cached_and_keyed_by_their_length(
        kv_project: pytest.Pytester, fake_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A second run reads the reference generations; another --kv-gen-tokens never reuses them."""
    kv_project.makeconftest(COUNTING)
    log = tmp_path / "gen.log"
    monkeypatch.setenv("KVQ_GEN_LOG", str(log))
    run = [f"--kv-model={fake_model}", "--kv-cache", "q8_0", "--kv-chunks", "8", "--kv-gen", "4"]
    kv_project.runpytest(*run, "--kv-gen-tokens", "16").assert_outcomes(passed=1)
    assert log.read_text().splitlines() == ["4 16"] * 4  # one per category
    kv_project.runpytest(*run, "--kv-gen-tokens", "16").assert_outcomes(passed=1)
    assert len(log.read_text().splitlines()) == 4
    kv_project.runpytest(*run, "--kv-gen-tokens", "20").assert_outcomes(passed=1)
    assert log.read_text().splitlines()[4:] == ["4 20"] * 4


def test_a_median_gate_that_n_tokens_can_never_meet_is_a_collection_error(
        kv_project: pytest.Pytester, fake_model: Path) -> None:
    kv_project.makefile(".yaml", gates=GEN_GATES.replace("> 12", "> 64", 1))
    result = kv_project.runpytest("--kv-model", str(fake_model), "--kv-thresholds", "gates.yaml", *ARGS)
    result.stdout.fnmatch_lines(["*gates.yaml:5: gen_first_divergence_median > 64 can never be met: generations "
                                 "stop at --kv-gen-tokens 24*"])
    assert result.ret == pytest.ExitCode.INTERRUPTED


@pytest.mark.parametrize("parallel", [[], ["-n", "2", "--dist", "loadgroup"]], ids=["serial", "xdist"])
def test_a_failing_generation_gate_fails_the_run(kv_project: pytest.Pytester, fake_model: Path,
                                                 parallel: list[str]) -> None:
    """The gate alone turns generation on, in each xdist worker too, and its failure is the exit code."""
    kv_project.makefile(".yaml", gates=GEN_GATES)
    result = kv_project.runpytest(f"--kv-model={fake_model}", "--kv-thresholds=gates.yaml", *ARGS, *parallel)
    result.assert_outcomes(passed=1, failed=1)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
