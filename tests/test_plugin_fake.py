"""The plugin surface, end to end on the fake engine: options, YAML gates, outcomes, messages."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from helpers import LOAD_PLUGIN

from pytest_kvquality.cache_config import CacheConfig

GATES = """
version: 1
models:
  tiny:
    q8_0:
      overall: {kl_mean: "< 0.5", top1: "> 0.5"}
    q4_0:
      overall: {kl_mean: "< 0.0001"}
      coding: {top1: "> 0.2"}
"""


def test_thresholds_become_items_that_pass_and_fail(kv_project: pytest.Pytester, fake_model: Path) -> None:
    kv_project.makefile(".yaml", gates=GATES)
    result = kv_project.runpytest("--kv-model", str(fake_model), "--kv-thresholds", "gates.yaml",
                                  "-v", "--kv-chunks", "8")
    result.stdout.fnmatch_lines([
        "*tiny::q8_0::overall::kl_mean PASSED*",
        "*tiny::q8_0::overall::top1 PASSED*",
        "*tiny::q4_0::overall::kl_mean FAILED*",
        "*tiny::q4_0::coding::top1 PASSED*",
    ])
    result.stdout.fnmatch_lines([
        "*tiny [[]q4_0[]] overall: kl_mean = * ± * (95 % upper bound *): threshold < 0.0001 not met (model tiny, "
        "cache q4_0, category overall, * tokens, n_ctx 64*",
    ])
    result.stdout.fnmatch_lines(["*KV-cache quality*", "tiny (n_ctx 64, * scored tokens)",
                                 "  cache*coding*overall KLD ± σ*same top*KV B/token*gates",
                                 "  q4_0 *FAIL 1/2", "  q8_0 *pass 2"])
    result.assert_outcomes(passed=3, failed=1)
    assert result.ret == pytest.ExitCode.TESTS_FAILED


def test_kv_eval_fixture_in_a_users_test(kv_project: pytest.Pytester, fake_model: Path) -> None:
    kv_project.makepyfile(test_user="""
        def test_q8_0_is_nearly_lossless(kv_eval):
            result = kv_eval("q8_0")
            assert result.kl_mean < 0.05
            assert result["coding"].top1 > 0.8
            assert set(result.categories) == {"coding", "science", "tool_calling", "long_documents", "overall"}

        def test_q4_0_k_and_v_set_independently(kv_eval):
            both = kv_eval(k="q4_0", v="q4_0")
            k_only = kv_eval(k="q4_0", v="f16")
            assert k_only.kl_mean < both.kl_mean
            assert both.overall.n_tokens == 4 * 8 * 31
    """)
    result = kv_project.runpytest("--kv-model", str(fake_model), "--kv-chunks", "8",
                                  "--kv-thresholds", str(kv_project.path))
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["tiny (n_ctx 64, *", "  q4_0/f16 *", "  q8_0 *"])


def test_without_a_model_fixture_tests_skip_and_kv_require_fails_them(kv_project: pytest.Pytester) -> None:
    kv_project.makepyfile(test_user="def test_x(kv_eval):\n    kv_eval('q8_0')\n")
    result = kv_project.runpytest("-rs")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*no --kv-model given*"])
    result = kv_project.runpytest("--kv-require")
    result.assert_outcomes(errors=1)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["*no --kv-model given and --kv-require is set*"])


def test_bad_threshold_file_is_a_collection_error_naming_file_key_and_reason(
    kv_project: pytest.Pytester, fake_model: Path
) -> None:
    kv_project.makefile(".yaml", gates="version: 1\nmodels:\n  tiny:\n    q4_0:\n      overall: {kl_mean: '< x'}\n")
    result = kv_project.runpytest("--kv-model", str(fake_model), "--kv-thresholds", "gates.yaml")
    result.stdout.fnmatch_lines([
        "*ERROR collecting gates.yaml*",
        "*invalid threshold file: *gates.yaml:5: models.tiny.q4_0.overall.kl_mean: threshold 'x' is not a number*",
    ])
    assert result.ret == pytest.ExitCode.INTERRUPTED


def test_known_model_without_a_file_is_a_usage_error_on_the_command_line(kv_project: pytest.Pytester,
                                                                         tmp_path: Path) -> None:
    shipped = kv_project.path / "published-models.yaml"  # inside the test dir: its ini is the one found
    shipped.write_bytes((Path(__file__).parent.parent / "thresholds" / "published-models.yaml").read_bytes())
    result = kv_project.runpytest("--kv-model", "qwen3.6-35b", "--kv-thresholds", str(shipped))
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    err = result.stderr.str()
    assert ("--kv-model qwen3.6-35b: model qwen3.6-35b-a3b (unsloth/Qwen3.6-35B-A3B-GGUF:Q4_K_M) is not on this "
            "machine. Looked in:") in err
    home = tmp_path / "home"  # where kv_project points every model cache (conftest.isolate_model_caches)
    for place in (f"Hugging Face hub cache: {home}/.cache/huggingface/hub/models--unsloth--Qwen3.6-35B-A3B-GGUF",
                  f"LM Studio models: {home}/.lmstudio/models/unsloth/Qwen3.6-35B-A3B-GGUF/*.gguf",
                  f"Ollama: {home}/.ollama/models/manifests/hf.co/unsloth/Qwen3.6-35B-A3B-GGUF/Q4_K_M",
                  "Fetch it: pytest --kv-model unsloth/Qwen3.6-35B-A3B-GGUF:Q4_K_M --kv-download",
                  "qwen3.6-35b-a3b: {path: /path/to/model.gguf}"):
        assert place in err, place


def test_a_model_from_the_ini_that_is_missing_skips_in_plain_sight(kv_project: pytest.Pytester) -> None:
    shipped = kv_project.path / "published-models.yaml"
    shipped.write_bytes((Path(__file__).parent.parent / "thresholds" / "published-models.yaml").read_bytes())
    kv_project.makeini(f"""
        [pytest]
        {LOAD_PLUGIN}
        kv_models = qwen3.6-35b
        kv_thresholds = published-models.yaml
        kv_markdown = summary.md
    """)
    result = kv_project.runpytest("-rs")
    result.assert_outcomes(skipped=6)
    result.stdout.fnmatch_lines(["6 gate(s) skipped: model qwen3.6-35b-a3b not available here (*",
                                 "SKIPPED [[]6[]] *model qwen3.6-35b-a3b (unsloth/*) is not on this machine*"])
    assert "⚠️ 6 gate(s) skipped: model qwen3.6-35b-a3b not available here" in \
        (kv_project.path / "summary.md").read_text()
    result = kv_project.runpytest("--kv-require", "-q")
    result.assert_outcomes(failed=6)
    result.stdout.fnmatch_lines(["*qwen3.6-35b-a3b::q4_0::long_documents::kl_mean*"])
    said = [line for line in result.stdout.lines  # once per item (pytest's summary lines aside)
            if line.startswith("--kv-require is set and model qwen3.6-35b-a3b is not available")]
    assert len(said) == 6


def test_models_without_thresholds_are_measured_and_reported(
    kv_project: pytest.Pytester, fake_model: Path, tmp_path: Path
) -> None:
    out = tmp_path / "results.json"
    result = kv_project.runpytest("--kv-model", str(fake_model), "--kv-cache", "q8_0,q4_0:norot",
                                  "--kv-chunks", "8", "--kv-thresholds", str(kv_project.path),
                                  "--kv-json", str(out), "-v")
    result.stdout.fnmatch_lines(["*tiny::q8_0::measure PASSED*", "*tiny::q4_0:norot::measure PASSED*"])
    doc = json.loads(out.read_text())
    assert doc["schema_version"] == 3
    rec = next(r for r in doc["results"] if r["cache"] == "q4_0:norot" and r["category"] == "overall")
    for key in ("model", "type_k", "type_v", "rotation", "flash_attn", "n_ctx", "category", "kl_mean",
                "kl_mean_unc", "kl_median", "kl_p99", "kl_max", "top1", "top1_unc", "dp_rms",
                "ppl_ratio", "n_tokens", "eval_seconds"):
        assert key in rec
    assert (rec["type_k"], rec["type_v"], rec["rotation"], rec["n_ctx"]) == ("q4_0", "q4_0", False, 64)
    assert rec["rotation_applied_k"] is False
    assert doc["environment"]["models"]["tiny"] == rec["model_sha256"]
    assert len(doc["results"]) == 2 * 5


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


def test_exact_mode_needs_no_reference_cache(kv_project: pytest.Pytester, fake_model: Path) -> None:
    result = kv_project.runpytest("--kv-model", str(fake_model), "--kv-cache", "q4_0", "--kv-exact",
                                  "--kv-chunks", "1", "--kv-thresholds", str(kv_project.path),
                                  "--kv-ref-dir", "refs")
    result.assert_outcomes(passed=1)
    assert not list((kv_project.path / "refs").glob("*.kvqref"))
    result.stdout.fnmatch_lines(["*reference f16 (exact, no cache)*"])


def test_options_are_listed_in_help(kv_project: pytest.Pytester) -> None:
    result = kv_project.runpytest("--help")
    for opt in ("--kv-model", "--kv-cache", "--kv-ctx", "--kv-chunks", "--kv-corpus", "--kv-thresholds",
                "--kv-ref-dir", "--kv-regen", "--kv-json", "--kv-gpu-layers", "--kv-registry",
                "--kv-exact", "--kv-require", "--kv-gate", "--kv-inconclusive",
                "--kv-storage", "--kv-save", "--kv-compare", "--kv-compare-fail", "--kv-markdown"):
        result.stdout.fnmatch_lines([f"*{opt}*"])
    result.stdout.fnmatch_lines(["*kv_models*", "*kv_ref_dir*"])


def test_user_corpus_categories_drive_thresholds(kv_project: pytest.Pytester, fake_model: Path) -> None:
    kv_project.makefile(".txt", legal="Article 1. The parties agree. " * 40)
    kv_project.makefile(".yaml", gates="version: 1\nmodels:\n  tiny:\n    q8_0:\n      legal: {top1: '> 0.5'}\n")
    result = kv_project.runpytest("--kv-model", str(fake_model), "--kv-corpus", "legal.txt",
                                  "--kv-thresholds", "gates.yaml", "-v")
    result.stdout.fnmatch_lines(["*tiny::q8_0::legal::top1 PASSED*"])
    kv_project.makefile(".txt", legal="short")
    result = kv_project.runpytest("--kv-model", str(fake_model), "--kv-corpus", "legal.txt",
                                  "--kv-thresholds", "gates.yaml")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*category 'legal' tokenizes to 6 tokens*needs at least 128*"])


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


def test_long_runs_report_progress(kv_project: pytest.Pytester, fake_model: Path) -> None:
    kv_project.makeconftest("""
        import pytest_kvquality.engine.local
        from pytest_kvquality.testing import FakeEngine

        pytest_kvquality.engine.local.PROGRESS_EVERY_S = 0.0  # report after every chunk

        def pytest_kvquality_make_engine(config):
            return FakeEngine()
    """)
    result = kv_project.runpytest("--kv-model", str(fake_model), "--kv-cache", "q8_0", "--kv-chunks", "3",
                                  "--kv-thresholds", str(kv_project.path))
    result.stdout.fnmatch_lines([
        "[[]kvquality[]] building f16 reference tiny / coding (3 x 64 tokens)",
        "[[]kvquality[]]   f16 reference tiny / coding: 1/3 chunks, 31 tokens, * tok/s, ETA * s",
        "[[]kvquality[]] evaluating tiny q8_0 / coding",
        "[[]kvquality[]]   tiny q8_0 / coding: 2/3 chunks, 62 tokens, * tok/s, ETA * s",
    ])


@pytest.mark.parametrize(("args", "message"), [
    (["--kv-cache", "q4_0:nofa"], "quantized V cache (q4_0) needs flash attention"),
    (["--kv-cache", "q3_k"], "unknown KV cache type 'q3_k'"),
    (["--kv-registry", "missing.yaml"], "model registry missing.yaml cannot be read"),
    (["--kv-ctx", "7"], "--kv-ctx must be an even number >= 8"),
])
def test_bad_options_are_usage_errors(kv_project: pytest.Pytester, args: list[str], message: str) -> None:
    result = kv_project.runpytest("--kv-model", "gemma3-270m", *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert message in result.stderr.str()


def test_unreadable_corpus_is_a_collection_error(kv_project: pytest.Pytester, fake_model: Path) -> None:
    kv_project.makefile(".yaml", gates=GATES)
    result = kv_project.runpytest("--kv-model", str(fake_model), "--kv-thresholds", "gates.yaml",
                                  "--kv-corpus", "no-such-dir")
    result.stdout.fnmatch_lines(["*cannot read the corpus: corpus path no-such-dir does not exist*"])
    assert result.ret == pytest.ExitCode.INTERRUPTED


STRESS_CONFTEST = """
    import os
    from pytest_kvquality.testing import FakeEngine

    class CountingEngine(FakeEngine):
        '''Appends one line per reference build to builds.log (O_APPEND: safe across processes).'''
        def reference(self, model, cache, chunks, seed):
            with open(os.path.join(os.environ["KVQ_STRESS_DIR"], "builds.log"), "a") as f:
                f.write(f"{os.getpid()} {chunks.shape}\\n")
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

        def context(self, cache: CacheConfig, n_ctx: int) -> testing.FakeContext:
            if OneContextFits.open:
                raise RuntimeError("out of memory: llama.cpp could not allocate a context")
            OneContextFits.open += 1
            return OneContext(self, cache, n_ctx)

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
    result.stdout.fnmatch_lines(["*tiny q8_0: evaluated with one context and a copy of every logits batch*"
                                 "out of memory*Same numbers, slower*"])
    result.assert_outcomes(passed=3, failed=1)  # the q4_0 gate fails as it does with two contexts


def test_a_repository_model_is_fetched_only_when_asked(kv_project: pytest.Pytester, fake_model: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """`--kv-model owner/repo:QUANT`: a usage error naming every place looked, until --kv-download
    fetches it into the hub cache; then the gates run on it."""
    from hub_fixtures import HubFile, fake_hub

    kv_project.makefile(".yaml", gates=GATES.replace("  tiny:", "  acme/tiny-GGUF:Q4_K_M:"))
    args = ["--kv-model", "acme/tiny-GGUF:q4_k_m", "--kv-thresholds", "gates.yaml", "--kv-chunks", "8"]
    with fake_hub() as hub:
        hub.repos["acme/tiny-GGUF"] = {"tiny-Q4_K_M.gguf": HubFile(fake_model.read_bytes())}
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        result = kv_project.runpytest(*args)
        assert result.ret == pytest.ExitCode.USAGE_ERROR
        assert "--kv-model acme/tiny-GGUF:q4_k_m: model acme/tiny-GGUF:Q4_K_M is not on this machine" in \
            result.stderr.str()
        assert "tiny-gguf: {path: /path/to/model.gguf}" in result.stderr.str()
        assert "--kv-download" in result.stderr.str() and hub.gets == []
        result = kv_project.runpytest(*args, "--kv-download")
        assert [name for name, _ in hub.gets] == ["tiny-Q4_K_M.gguf"]
    result.assert_outcomes(passed=3, failed=1)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["note: model acme/tiny-GGUF:Q4_K_M: acme/tiny-GGUF:Q4_K_M is */models--acme--tiny-GGUF"
                                 "/snapshots/*/tiny-Q4_K_M.gguf, found in the Hugging Face hub cache *"])
    # the hub is gone: offline, every xdist worker finds the downloaded copy, and the failing gate still fails
    pytest.importorskip("xdist")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    parallel = kv_project.runpytest_subprocess(*args, "-n", "2", "--dist", "loadgroup")
    parallel.assert_outcomes(passed=3, failed=1)
    assert parallel.ret == pytest.ExitCode.TESTS_FAILED


def test_a_typo_in_the_model_name_is_a_usage_error(kv_project: pytest.Pytester) -> None:
    result = kv_project.runpytest("--kv-model", "gemma3-270n")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    err = result.stderr.str()
    assert "--kv-model gemma3-270n: model 'gemma3-270n' is neither a registered alias" in err
    assert "Looked: the aliases " in err and "(does not exist). Did you mean gemma3-270m or" in err
