"""The switch that unpins only llama.cpp's output buffers (``engine/host_pinning``): ggml-cuda sees
``GGML_CUDA_NO_PINNED`` exactly while some thread is inside ``outputs_unpinned``, the environment's
array never changes after ``install``, and a variable the user set is left alone. Each case runs in
a subprocess: installing changes the process's C environment for good."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = r'''
import ctypes, os, threading
from pytest_kvquality.engine import host_pinning as hp

environ = ctypes.c_void_p.in_dll(ctypes.CDLL(None), "environ")
seen = [hp.install(), hp.visible()]
array = environ.value
with hp.outputs_unpinned():
    seen.append(hp.visible())
    inside, leave = threading.Event(), threading.Event()
    def other():
        with hp.outputs_unpinned():
            inside.set()
            leave.wait()
    t = threading.Thread(target=other)
    t.start()
    inside.wait()
seen.append(hp.visible())  # the other thread is still inside
leave.set()
t.join()
seen += [hp.visible(), environ.value == array, os.environ.get("GGML_CUDA_NO_PINNED")]
print(seen)
'''


def run(extra: dict[str, str]) -> str:
    env = {k: v for k, v in os.environ.items() if k != "GGML_CUDA_NO_PINNED"}
    return subprocess.run([sys.executable, "-c", SCRIPT], env={**env, **extra}, capture_output=True, text=True,
                          check=True).stdout.strip()


def test_visible_exactly_while_a_thread_is_inside() -> None:
    # installed, hidden; inside: seen; still seen while the other thread is inside; hidden after; the
    # environment's array the same; Python's copy of the environment never had it
    assert run({}) == "[True, False, True, True, False, True, None]"


def test_a_variable_the_user_set_is_left_as_it_is() -> None:
    assert run({"GGML_CUDA_NO_PINNED": "1"}) == "[False, True, True, True, True, True, '1']"


def test_huge_pages_are_added_to_glibc_s_tunables_unless_the_user_chose() -> None:
    from pytest_kvquality.engine.host_pinning import with_huge_pages

    assert with_huge_pages({"A": "1"}) == {"A": "1", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    assert with_huge_pages({"GLIBC_TUNABLES": "glibc.malloc.tcache_count=0"})["GLIBC_TUNABLES"] == (
        "glibc.malloc.tcache_count=0:glibc.malloc.hugetlb=1")
    assert with_huge_pages({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"})["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=0"


@pytest.mark.parametrize(("env", "tunables"), [
    ({}, None),
    ({"KVQ_DEVICE_REDUCTION": "1"}, "glibc.malloc.hugetlb=1"),
    ({"KVQ_DEVICE_REDUCTION": "1", "KVQ_HUGE_PAGES": "0"}, None),
    ({"KVQ_DEVICE_REDUCTION": "1", "KVQ_UNPINNED_OUTPUTS": "0"}, None),
    ({"KVQ_HUGE_PAGES": "1"}, "glibc.malloc.hugetlb=1"),
])
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="reads the worker's environment from /proc")
def test_the_worker_starts_with_huge_pages_exactly_when_its_output_buffers_are_unpinned(
    tmp_path: Path, env: dict[str, str], tunables: str | None
) -> None:
    """The worker's own environment, as glibc read it at exec (``/proc/PID/environ``)."""
    from pytest_kvquality.testing import TestingWorkerEngine

    base = {k: v for k, v in os.environ.items() if not k.startswith(("KVQ_", "GLIBC_TUNABLES"))}
    worker = TestingWorkerEngine(tmp_path / "logs", env={**base, **env})
    try:
        worker.info()
        assert worker._proc is not None
        seen = dict(item.split("=", 1) for item in
                    Path(f"/proc/{worker._proc.pid}/environ").read_text().split("\0") if "=" in item)
    finally:
        worker.close()
    assert seen.get("GLIBC_TUNABLES") == tunables
