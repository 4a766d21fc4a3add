"""The plugin surface as a whole: ini keys and help, usage errors, the header, colours, exit status,
JUnit, progress, notes, a native crash, import cost."""

from __future__ import annotations

import importlib.util
import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from helpers import ARGS, GATES, LOAD_PLUGIN, PLUGIN_ARGS

from pytest_kvquality.cache_config import CacheConfig


def test_ini_keys_mirror_the_options(kv_project: pytest.Pytester, fake_model: Path) -> None:
    kv_project.makeini(f"""
        [pytest]
        {LOAD_PLUGIN}
        kv_models = {fake_model}
        kv_cache = q8_0
        kv_ctx = 32
        kv_chunks = 1
        kv_ref_dir = {kv_project.path / "refs"}
        kv_thresholds = {kv_project.path}
    """)
    result = kv_project.runpytest("-v")
    result.stdout.fnmatch_lines(["*tiny::q8_0::measure PASSED*", "tiny (n_ctx 32, 60 scored tokens)", "  q8_0 *"])


def test_options_are_listed_in_help(kv_project: pytest.Pytester) -> None:
    result = kv_project.runpytest("--help")
    for opt in ("--kv-model", "--kv-cache", "--kv-ctx", "--kv-chunks", "--kv-corpus", "--kv-thresholds",
                "--kv-ref-dir", "--kv-regen", "--kv-json", "--kv-gpu-layers", "--kv-registry",
                "--kv-exact", "--kv-require", "--kv-gate", "--kv-inconclusive",
                "--kv-storage", "--kv-save", "--kv-compare", "--kv-compare-fail", "--kv-markdown"):
        result.stdout.fnmatch_lines([f"*{opt}*"])
    result.stdout.fnmatch_lines(["*kv_models*", "*kv_ref_dir*"])


def test_a_native_crash_fails_only_the_tests_that_needed_it(kv_project: pytest.Pytester,
                                                             fake_model: Path) -> None:
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("needs llama-cpp-python for the worker")
    kv_project.makeconftest("""
        from pytest_kvquality.testing import FakeEngine, TestingWorkerEngine

        class CrashingEngine(FakeEngine):
            '''The fake model, except that q4_0 evaluations segfault a real worker process.'''
            def __init__(self):
                super().__init__()
                self.worker = TestingWorkerEngine()

            def evaluate(self, model, cache, chunks, ref):
                if cache.label == "q4_0":
                    self.worker.crash_for_test()
                return super().evaluate(model, cache, chunks, ref)

            def close(self):
                self.worker.close()
                super().close()

        def pytest_kvquality_make_engine(config):
            return CrashingEngine()
    """)
    kv_project.makefile(".yaml", gates=GATES)
    result = kv_project.runpytest("--kv-model", str(fake_model), "--kv-thresholds", "gates.yaml",
                                  "--kv-chunks", "8")
    result.assert_outcomes(passed=2, failed=2)
    result.stdout.fnmatch_lines([
        "*evaluating tiny * with cache q4_0, n_ctx 64 failed:*",
        "*the model worker killed by signal SIGSEGV while running a deliberate crash*",
        "*Last lines of the llama.cpp log*",
    ])


def test_long_runs_report_progress(kv_project: pytest.Pytester, fake_model: Path) -> None:
    kv_project.makeconftest("""
        import pytest_kvquality.engine.local
        from pytest_kvquality.testing import FakeEngine

        pytest_kvquality.engine.local.PROGRESS_EVERY_S = 0.0  # report after every chunk

        def pytest_kvquality_make_engine(config):
            return FakeEngine()
    """)
    # two chunks per decode: progress counts the group's chunks once all of them are decoded
    result = kv_project.runpytest("--kv-model", str(fake_model), "--kv-cache", "q8_0", "--kv-chunks", "3",
                                  "--kv-batch", "128", "--kv-thresholds", str(kv_project.path))
    result.stdout.fnmatch_lines([
        "[[]kvquality[]] building f16 reference tiny / coding (3 x 64 tokens)",
        "[[]kvquality[]]   f16 reference tiny / coding: 2/3 chunks, 62 tokens, * tok/s, ETA * s",
        "[[]kvquality[]] evaluating tiny q8_0 / coding",
        "[[]kvquality[]]   tiny q8_0 / coding: 2/3 chunks, 62 tokens, * tok/s, ETA * s",
    ])
    assert "1/3 chunks" not in result.stdout.str()


@pytest.mark.parametrize(("args", "message"), [
    (["--kv-cache", "q4_0:nofa"], "quantized V cache (q4_0) needs flash attention"),
    (["--kv-cache", "q3_k"], "unknown KV cache type 'q3_k'"),
    (["--kv-registry", "missing.yaml"], "model registry missing.yaml cannot be read"),
    (["--kv-ctx", "7"], "--kv-ctx must be an even number >= 8"),
    (["--kv-batch", "0"], "--kv-batch"),
    (["--kv-ubatch", "2"], "--kv-ubatch 2 is smaller than the 32 chunks each decode holds (--kv-batch 2048"),
])
def test_bad_options_are_usage_errors(kv_project: pytest.Pytester, args: list[str], message: str) -> None:
    result = kv_project.runpytest("--kv-model", "gemma3-270m", *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert message in result.stderr.str()


def test_importing_the_plugin_imports_no_numpy() -> None:
    """pytest imports every installed plugin in every run: ours must cost nothing until used."""
    import subprocess
    import sys

    code = "import sys, pytest_kvquality.plugin; assert 'numpy' not in sys.modules, sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_kv_memory_missing_from_the_engine_is_said_not_guessed(kv_project: pytest.Pytester, fake_model: Path) -> None:
    """An engine that reports no KV sizes (a llama.cpp whose log lines changed) gets a note and '-',
    not an every-layer formula that is 2-4x wrong for hybrid and sliding-window models."""
    kv_project.makeconftest("""
        import pytest_kvquality.engine.fake as fake
        import pytest_kvquality.testing as testing

        class NoKVSizes(fake.FakeContext):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                for key in ("kv_bytes_per_token", "kv_mib_per_32k", "kv_mib_per_128k"):
                    del self.info[key]

        fake.FakeContext = NoKVSizes

        def pytest_kvquality_make_engine(config):
            return testing.FakeEngine()
    """)
    kv_project.makefile(".yaml", gates=GATES)
    out = kv_project.path / "r.json"
    result = kv_project.runpytest("--kv-model", str(fake_model), "--kv-thresholds", "gates.yaml", "--kv-chunks", "8",
                                  f"--kv-json={out}")
    result.stdout.fnmatch_lines(["*tiny q8_0: llama.cpp's log gave no KV cache sizes; KV memory is not reported*"])
    records = json.loads(out.read_text())["results"]
    assert records and all(r["kv_bytes_per_token"] is None for r in records)


def test_a_second_context_that_cannot_be_created_is_said(kv_project: pytest.Pytester, fake_model: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Overlapping on a GPU takes two contexts; when memory allows only one, the run is slower (every
    logits batch copied) and says so, with the same verdicts."""
    import pytest_kvquality.engine.fake as testing

    class OneContextFits(testing.FakeModel):
        open = 0

        def context(self, cache: CacheConfig, n_ctx: int, n_seq: int = 1,
                    n_ubatch: int | None = None) -> testing.FakeContext:
            if OneContextFits.open:
                raise RuntimeError("out of memory: llama.cpp could not allocate a context")
            OneContextFits.open += 1
            return OneContext(self, cache, n_ctx, n_seq)

    class OneContext(testing.FakeContext):
        def close(self) -> None:
            OneContextFits.open -= 1
            super().close()

    monkeypatch.setattr(testing, "FakeModel", OneContextFits)
    monkeypatch.setenv("KVQ_OVERLAP", "1")
    kv_project.makeconftest("""
        import pytest_kvquality.testing as testing

        def pytest_kvquality_make_engine(config):
            return testing.FakeEngine()
    """)
    kv_project.makefile(".yaml", gates=GATES)
    result = kv_project.runpytest("--kv-model", str(fake_model), "--kv-thresholds", "gates.yaml", "--kv-chunks", "8")
    result.stdout.fnmatch_lines(["*tiny q8_0: evaluated with one context, each decode's logits reduced before the next*"
                                 "out of memory*Same numbers, slower*"])
    result.assert_outcomes(passed=3, failed=1)  # the q4_0 gate fails as it does with two contexts


@pytest.mark.parametrize(("args", "message"), [
    (["--kv-compare-fail", "kl_mean:10%"], "*--kv-compare-fail needs --kv-compare*"),
    (["--kv-compare", "--kv-compare-fail", "speed:10%"], "*expected METRIC:X% or METRIC:X*"),
])
def test_bad_ci_options_are_usage_errors(kv_project: pytest.Pytester, args: list[str], message: str) -> None:
    result = kv_project.runpytest(*args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message])


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
