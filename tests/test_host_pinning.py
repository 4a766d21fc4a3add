"""The switch that unpins only llama.cpp's output buffers (``engine/host_pinning``): ggml-cuda sees
``GGML_CUDA_NO_PINNED`` exactly while some thread is inside ``outputs_unpinned``, the environment's
array never changes after ``install``, and a variable the user set is left alone. Each case runs in
a subprocess: installing changes the process's C environment for good."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

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


def test_malloc_tunables_are_added_to_glibc_s_unless_the_user_chose() -> None:
    from pytest_kvquality.engine.host_pinning import with_malloc_tunables

    keep = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=1099511627776"
    assert with_malloc_tunables({"A": "1"}, True, False) == {"A": "1", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    assert with_malloc_tunables({"A": "1"}, False, True) == {"A": "1", "GLIBC_TUNABLES": keep}
    assert with_malloc_tunables({"A": "1"}, False, False) == {"A": "1"}
    assert with_malloc_tunables({"GLIBC_TUNABLES": "glibc.malloc.tcache_count=0"}, True, True)["GLIBC_TUNABLES"] == (
        f"glibc.malloc.tcache_count=0:glibc.malloc.hugetlb=1:{keep}")
    chosen = "glibc.malloc.hugetlb=0:glibc.malloc.mmap_max=4"
    assert with_malloc_tunables({"GLIBC_TUNABLES": chosen}, True, True)["GLIBC_TUNABLES"] == (
        f"{chosen}:glibc.malloc.trim_threshold=1099511627776")


#: a 64 MiB block written, freed, allocated again and written again: the second write's page faults
FAULTS = r'''
import ctypes, resource
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
n = 64 << 20
p = libc.malloc(n); ctypes.memset(p, 1, n); libc.free(p)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
p = libc.malloc(n); ctypes.memset(p, 1, n)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
'''


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's tunables")
def test_with_freed_memory_kept_a_second_buffer_reuses_the_first_one_s_pages() -> None:
    """What the worker's tunables buy: a block allocated after a freed one of its size is written
    without faulting its pages in again (with glibc's defaults, 16,384 faults of 4 KiB for 64 MiB)."""
    from pytest_kvquality.engine.host_pinning import with_malloc_tunables

    def faults(env: dict[str, str]) -> int:
        done = subprocess.run([sys.executable, "-c", FAULTS], env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return int(done.stdout)

    base = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    assert faults(base) > 8_000
    assert faults(with_malloc_tunables(base, False, True)) < 1_000


#: 256 MiB written in 64 blocks and freed with freed memory kept; the resident set before and after
#: ``release_freed_memory`` (argv[1] = "1") or without it
RELEASED = r'''
import ctypes, sys
from pytest_kvquality.engine.host_pinning import release_freed_memory
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
blocks = [libc.malloc(4 << 20) for _ in range(64)]
for p in blocks:
    ctypes.memset(p, 1, 4 << 20)
guard = libc.malloc(4096)  # keeps the heap's top in use: only the middle can be given back
for p in blocks:
    libc.free(p)
kept = rss()
if sys.argv[1] == "1":
    release_freed_memory()
print(kept, rss())
'''


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's tunables")
@pytest.mark.parametrize("release", [False, True])
def test_freed_memory_kept_by_the_tunables_is_given_back_after_a_reference_build(release: bool) -> None:
    """The worker keeps freed memory (above), so a reference build's freed buffers would stay resident
    beside the evaluation's own; ``release_freed_memory`` gives them back (H200, n_ctx 32,768: the
    worker's peak 3.64 GiB without it, 3.43 with it). Without it, they stay."""
    from pytest_kvquality.engine.host_pinning import with_malloc_tunables

    env = with_malloc_tunables({k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}, False, True)
    done = subprocess.run([sys.executable, "-c", RELEASED, "1" if release else "0"], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    kept, after = map(int, done.stdout.split())
    assert kept - after > 200 << 20 if release else kept - after < 8 << 20


def test_the_engine_gives_freed_memory_back_after_each_reference_build(
    fake_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pytest_kvquality.cache_config import CacheConfig
    from pytest_kvquality.corpus import builtin_corpus, chunk_tokens
    from pytest_kvquality.engine import host_pinning
    from pytest_kvquality.engine.protocol import ModelLoad
    from pytest_kvquality.testing import FakeEngine

    calls: list[int] = []
    monkeypatch.setattr(host_pinning, "release_freed_memory", lambda: calls.append(1))
    engine = FakeEngine(threads=1)
    model = ModelLoad(str(fake_model), 0)
    chunks = chunk_tokens(engine.tokenize(model, builtin_corpus().texts["science"]), 128, 2, "science")
    ref = engine.reference(model, CacheConfig.parse("f16"), chunks, seed=0)
    assert calls == [1]
    engine.evaluate(model, CacheConfig.parse("q4_0"), chunks, ref.rows)
    engine.close()
    assert calls == [1]  # not after an evaluation: the next configuration reuses its pages


KEEP = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=1099511627776"


@pytest.mark.parametrize(("gpu", "env", "tunables"), [
    (None, {}, None),  # a CPU build: never on the device unless asked
    ("CUDA", {}, f"glibc.malloc.hugetlb=1:{KEEP}"),  # a GPU build: rows may be reduced on the device
    ("CUDA", {"KVQ_DEVICE_REDUCTION": "0"}, None),
    (None, {"KVQ_DEVICE_REDUCTION": "1"}, f"glibc.malloc.hugetlb=1:{KEEP}"),
    (None, {"KVQ_DEVICE_REDUCTION": "1", "KVQ_HUGE_PAGES": "0"}, KEEP),
    (None, {"KVQ_DEVICE_REDUCTION": "1", "KVQ_KEEP_FREED_MEMORY": "0"}, "glibc.malloc.hugetlb=1"),
    (None, {"KVQ_DEVICE_REDUCTION": "1", "KVQ_UNPINNED_OUTPUTS": "0"}, None),
    (None, {"KVQ_HUGE_PAGES": "1"}, "glibc.malloc.hugetlb=1"),
])
def test_the_worker_starts_with_malloc_tunables_exactly_when_its_output_buffers_are_unpinned(
    tmp_path: Path, gpu: str | None, env: dict[str, str], tunables: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The environment the worker is started with (glibc reads the tunables once, at exec; it rewrites
    the variable as it parses it, so the worker's ``/proc/PID/environ`` shows only the first)."""
    from pytest_kvquality.engine import pipeline
    from pytest_kvquality.environment import HostBackend
    from pytest_kvquality.testing import TestingWorkerEngine

    monkeypatch.setattr(pipeline, "host_backend", lambda: HostBackend("0.3.36", "0.0.0", gpu))

    started: list[dict[str, str]] = []
    popen = subprocess.Popen

    def recording(*args: Any, **kwargs: Any) -> Any:
        started.append(kwargs["env"])
        return popen(*args, **kwargs)

    monkeypatch.setattr(subprocess, "Popen", recording)
    base = {k: v for k, v in os.environ.items() if not k.startswith(("KVQ_", "GLIBC_TUNABLES"))}
    worker = TestingWorkerEngine(tmp_path / "logs", env={**base, **env})
    try:
        worker.info()  # it started with them
    finally:
        worker.close()
    assert [e.get("GLIBC_TUNABLES") for e in started] == [tunables]
