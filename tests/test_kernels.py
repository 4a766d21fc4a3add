"""The compiled kernels (reference compaction, log-normalizer): the same bits as numpy, and every way
they can fail ends in numpy with a message, never in a wrong number or a lost reference."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pytest_kvquality import kernels
from pytest_kvquality.compaction import compact_rows
from pytest_kvquality.metrics import ReferenceRows

HAS_CC = kernels.compiler() is not None


#: each test builds into its own cache, and no test sees another's loaded library (conftest.py)
pytestmark = pytest.mark.usefixtures("fresh_kernels")


def assert_same_bits(got: ReferenceRows, expected: ReferenceRows) -> None:
    assert got.differences(expected) == []


def numpy_result(base: np.ndarray, nxt: np.ndarray, k: int, m: int, u0: np.ndarray) -> ReferenceRows:
    return compact_rows(base, nxt, k, m, u0, kernels=None)


@pytest.mark.skipif(not HAS_CC, reason="no C compiler: numpy does the work")
@pytest.mark.parametrize(
    ("n", "vocab", "spread", "k", "m"),
    [
        (40, 5000, 3.0, 16, 8),  # the usual shape
        (6, 300_000, 0.5, 144, 96),  # rows far wider than the kernel's first buffer
        (10, 50, 1.0, 64, 8),  # k above the vocabulary: every row padded
        (9, 3000, 6.0, 144, 0),  # no tail samples
        (17, 2000, 0.2, 5, 3),  # almost everything in the tail
        (3, 7, 1.0, 7, 4),  # everything in the top k: empty tails
    ],
)
def test_compiled_compaction_gives_the_same_bits_as_numpy(n: int, vocab: int, spread: float, k: int, m: int) -> None:
    rng = np.random.default_rng(n * vocab)
    base, u0 = kernels.hard_rows(rng, n, vocab, spread)
    nxt = rng.integers(0, vocab, n)
    assert_same_bits(compact_rows(base, nxt, k, m, u0), numpy_result(base, nxt, k, m, u0))
    assert kernels.kernel_name() == "C"


def small_case() -> tuple[np.ndarray, np.ndarray, int, int, np.ndarray]:
    rng = np.random.default_rng(7)
    rows, u0 = kernels.hard_rows(rng, 12, 3000, 3.0)
    return rows, rng.integers(0, 3000, 12), 16, 8, u0


def test_without_a_c_compiler_numpy_does_the_work_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no cc, gcc or clang to be found
    monkeypatch.setenv("CC", "no-such-compiler")
    assert kernels.compiled_kernels() is None
    assert "no C compiler found" in capsys.readouterr().err
    assert kernels.kernel_name() == "numpy"
    case = small_case()
    assert_same_bits(compact_rows(*case), numpy_result(*case))


def test_a_failing_compiler_is_reported_and_numpy_takes_over(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = tmp_path / "broken-cc"
    broken.write_text("#!/bin/sh\necho 'kernels.c:1: error: this compiler is broken' >&2\nexit 1\n")
    broken.chmod(0o755)
    monkeypatch.setenv("CC", str(broken))
    assert kernels.compiled_kernels() is None
    err = capsys.readouterr().err
    assert "building kernels.c with" in err and "this compiler is broken" in err and "numpy does" in err
    assert not list((tmp_path / "cache" / "kernels").glob("*.so"))  # no half-written library left behind
    case = small_case()
    assert_same_bits(compact_rows(*case), numpy_result(*case))


@pytest.mark.skipif(not HAS_CC, reason="no C compiler: numpy does the work")
def test_an_unwritable_cache_is_reported_and_numpy_takes_over(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the cache directory should be")
    monkeypatch.setenv("KVQ_CACHE_DIR", str(blocker))
    assert kernels.compiled_kernels() is None
    err = capsys.readouterr().err
    assert f"cannot write the compiled kernel to {blocker}" in err and "numpy does" in err
    case = small_case()
    assert_same_bits(compact_rows(*case), numpy_result(*case))


@pytest.mark.skipif(not HAS_CC, reason="no C compiler: numpy does the work")
def test_a_damaged_cached_library_is_rebuilt(tmp_path: Path) -> None:
    cc = kernels.compiler()
    assert cc is not None
    damaged = kernels.library_path(cc)
    damaged.parent.mkdir(parents=True)
    damaged.write_bytes(b"\x7fELF, truncated by a full disk")
    # a fresh process, as the model worker is (a process that loaded the library keeps its mapping)
    probe = "from pytest_kvquality import kernels; print(kernels.kernel_name())"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "KVQ_CACHE_DIR": str(tmp_path / "cache")})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "C"
    assert "rebuilding it" in done.stderr and str(damaged) in done.stderr
    assert damaged.stat().st_size > 1000


@pytest.mark.skipif(not HAS_CC, reason="no C compiler: numpy does the work")
def test_a_library_that_disagrees_with_numpy_is_refused(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """As a compiler that turns on fast-math by itself might build it: one tail sample off by one."""
    finish = kernels.Kernels.finish

    def off_by_one(self: kernels.Kernels, *args: object, **kw: object) -> None:
        finish(self, *args, **kw)  # type: ignore[arg-type]
        out = args[-1]
        out[2][0, 0] += 1  # type: ignore[index]

    monkeypatch.setattr(kernels.Kernels, "finish", off_by_one)
    assert kernels.compiled_kernels() is None
    assert "disagrees with numpy (tail_ids)" in capsys.readouterr().err


def test_kvq_compiled_0_turns_the_kernels_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVQ_COMPILED", "0")
    assert kernels.compiled_kernels() is None and kernels.kernel_name() == "numpy"
    assert not (Path(os.environ["KVQ_CACHE_DIR"]) / "kernels").exists()  # nothing built
