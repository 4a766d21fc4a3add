"""The model worker process: native crashes and load failures become clear errors, never a dead session."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_kvquality.engine.protocol import EngineError, ModelLoad, WorkerCrash
from pytest_kvquality.testing import TestingWorkerEngine, write_fake_gguf

# find_spec, not import: llama_cpp is only ever imported inside the worker (import-order crash on CUDA)
pytestmark = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                reason="the worker tests need llama-cpp-python installed")


@pytest.fixture
def worker(tmp_path: Path) -> Iterator[TestingWorkerEngine]:
    w = TestingWorkerEngine(tmp_path / "logs")
    yield w
    w.close()


def test_a_segfault_in_the_worker_is_reported_and_the_worker_restarts(worker: TestingWorkerEngine) -> None:
    info = worker.info()
    assert info.llama_cpp_python == "0.3.36"
    with pytest.raises(WorkerCrash) as e:
        worker.crash_for_test()
    message = str(e.value)
    assert "killed by signal SIGSEGV while running a deliberate crash" in message
    assert "Last lines of the llama.cpp log" in message
    assert worker.info() == info  # a fresh worker answers the next call


def test_a_gguf_of_an_unknown_architecture_fails_with_llama_cpp_reason(
    worker: TestingWorkerEngine, tmp_path: Path
) -> None:
    model = write_fake_gguf(tmp_path / "alien.gguf", arch="notanarch")
    with pytest.raises(EngineError) as e:
        worker.describe(ModelLoad(str(model), 0))
    assert f"llama.cpp could not load {model}" in str(e.value)
    assert "unknown model architecture: 'notanarch'" in str(e.value)
    assert worker.info().llama_cpp_python  # the worker survived


def test_a_truncated_gguf_fails_cleanly(worker: TestingWorkerEngine, tmp_path: Path) -> None:
    whole = write_fake_gguf(tmp_path / "whole.gguf", arch="llama").read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(EngineError, match="could not load"):
        worker.describe(ModelLoad(str(cut), 0))


def test_a_missing_model_file_is_named(worker: TestingWorkerEngine, tmp_path: Path) -> None:
    with pytest.raises(EngineError, match=r"model file .*nope\.gguf does not exist"):
        worker.describe(ModelLoad(str(tmp_path / "nope.gguf"), 0))


def test_a_worker_killed_by_the_oom_killer_is_explained(worker: TestingWorkerEngine) -> None:
    import os
    import signal
    import threading

    worker.info()
    pid = worker.pid
    assert pid is not None
    # what the kernel's OOM killer sends, in the middle of a request
    threading.Timer(0.5, os.kill, (pid, signal.SIGKILL)).start()
    with pytest.raises(WorkerCrash, match=r"SIGKILL \(most likely the kernel.s out-of-memory killer"):
        worker.sleep_for_test(30)
    assert worker.info().llama_cpp_python  # and a fresh worker serves the next request
    assert worker.pid != pid


def test_ctrl_c_in_the_middle_of_a_request_stops_the_busy_worker_at_once(worker: TestingWorkerEngine) -> None:
    import os
    import signal
    import time

    worker.info()
    pid = worker.pid
    assert pid is not None

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.5)
        start = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            worker.sleep_for_test(30)
        worker.close()  # no 10 s wait for a worker that cannot answer
        assert time.monotonic() - start < 5
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert not os.path.exists(f"/proc/{pid}") or "zombie" in open(f"/proc/{pid}/status").read().lower()
    assert worker.info().llama_cpp_python  # the channel is not out of step: a fresh worker answers
    assert worker.pid != pid
