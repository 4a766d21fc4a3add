"""The compiled kernels (``kernels.c``): found or built on first use, checked, or None (numpy then).

Two families share one library: the log-normalizer of each scored row with its gathers
(``normalizer.py``: the evaluation's pass over the vocabulary) and the reference compaction's two
passes (``compaction.py``). Each gives the same bits as its numpy path; a self-check at load runs
both on hard rows and refuses a library that differs. The source is compiled once with the C
compiler that built llama-cpp-python (``target_clones``: the widest vectors the CPU has, chosen
at load) and cached next to the references; ctypes releases the GIL during the calls, so the
engine's row threads run in parallel. Why not numba: it adds ~150 MiB of resident LLVM to the
model worker, which the n_ctx 32,768 memory target cannot afford, and it lags numpy releases.
``KVQ_COMPILED=0`` turns the kernels off; without a C compiler numpy does the work.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .environment import env_flag
from .files import WriteError, atomic_produce

SOURCE = Path(__file__).with_name("kernels.c")
#: no fast-math, no FMA contraction: every operation rounds as numpy's does. -fno-trapping-math lets
#: the compiler turn the clamp into a vector select (it changes no value, only when flags would be
#: raised); -fopenmp-simd reads the ``omp simd`` reductions (no OpenMP runtime)
CFLAGS = ["-O3", "-fPIC", "-shared", "-ffp-contract=off", "-fno-fast-math", "-fno-trapping-math", "-fopenmp-simd"]

_i64, _f32, _f64 = ctypes.c_int64, ctypes.c_float, ctypes.c_double
_ptr = ctypes.c_void_p


@dataclass(frozen=True)
class Kernels:
    library: ctypes.CDLL
    path: Path

    def rows(self, block: np.ndarray, shift: int, ids: np.ndarray | None) -> tuple[np.ndarray, ...]:
        """Per row: argmax, the fixed-point sum of exp(x - max) (-1: not finite), x at ``ids``."""
        n, v = block.shape
        imax, total = np.empty(n, np.int32), np.empty(n, np.int64)
        ids = np.zeros((n, 0), np.int32) if ids is None else np.ascontiguousarray(ids, dtype=np.int32)
        gathered = np.empty(ids.shape, np.float32)
        self.library.kvq_rows(_addr(block), n, v, shift, _addr(ids), ids.shape[1], _addr(imax), _addr(total),
                              _addr(gathered))
        return imax, total, gathered

    def select(self, block: np.ndarray, thr: np.ndarray, norm: np.ndarray) -> tuple[np.ndarray, ...]:
        """Every token above thr per row, in (row, token) order: row starts, ids, log p."""
        n, v = block.shape
        starts = np.empty(n + 1, np.int64)
        cap = v + 4096 * n
        ids, lp = np.empty(cap, np.int32), np.empty(cap, np.float32)
        row, used = 0, 0
        while True:
            row = self.library.kvq_select(_addr(block), n, v, _addr(thr), _addr(norm), row, used, cap,
                                          _addr(ids), _addr(lp), _addr(starts))
            if row == n:
                break
            used = int(starts[row])  # a row might not fit: grow, go on from it
            cap = max(2 * cap, used + v)
            ids, lp = _grown(ids, used, cap), _grown(lp, used, cap)
        e = int(starts[n])
        return starts, ids[:e], lp[:e]

    def finish(self, starts: np.ndarray, ids: np.ndarray, lp: np.ndarray, p_fixed: np.ndarray, k: int, m: int,
               u0: np.ndarray, top_bins: int, level_scale: float, mass_unit: float,
               out: tuple[np.ndarray, ...]) -> None:
        """Fill the padded (top_ids, top_logp, tail_ids, tail_logp, tail_mass) arrays in place."""
        rc = self.library.kvq_finish(_addr(starts), starts.shape[0] - 1, _addr(ids), _addr(lp), _addr(p_fixed),
                                     k, m, _addr(u0), top_bins, level_scale, mass_unit, *(_addr(a) for a in out))
        if rc != 0:
            raise MemoryError("reference compaction: out of memory for one row's scratch space")


def _addr(a: np.ndarray) -> int:
    assert a.flags.c_contiguous, "kernels take C-contiguous arrays"
    return int(a.ctypes.data)


def _grown(a: np.ndarray, used: int, cap: int) -> np.ndarray:
    out = np.empty(cap, a.dtype)
    out[:used] = a[:used]
    return out


_KERNELS: Kernels | None = None
_TRIED = False


def enabled_by_env() -> bool:
    return env_flag("KVQ_COMPILED", True) is not False


def compiled_kernels() -> Kernels | None:
    """The compiled kernels, or None (``KVQ_COMPILED=0``, no C compiler, a failed build): numpy then."""
    global _KERNELS, _TRIED
    if not enabled_by_env():
        return None
    if not _TRIED:
        _TRIED = True
        try:
            _KERNELS = _checked(_load_or_build())
        except KernelBuildError as exc:
            print(f"pytest-kvquality: {exc}; numpy does the KL reduction and the reference compaction "
                  "(slower, same results)", file=sys.stderr)
    return _KERNELS


def _checked(kernels: Kernels) -> Kernels:
    """Refuse a library that does not reproduce the numpy paths on small hard cases (ties, a flat
    row, NaN and infinite rows, sample points on mass boundaries): a compiler that ignores the
    flags (fast-math by default, as some do) must not change a number silently. A few
    milliseconds once per process."""
    from .compaction import compact_rows
    from .normalizer import hard_normalizer_rows, normalize_rows

    rng = np.random.default_rng(20261129)
    rows, u0 = hard_rows(rng, 6, 2000, 3.0)
    nxt = rng.integers(0, 2000, 6)
    differ = compact_rows(rows, nxt, 16, 8, u0, kernels=kernels).differences(
        compact_rows(rows, nxt, 16, 8, u0, kernels=None))
    block, ids = hard_normalizer_rows(rng)
    differ += normalize_rows(block, ids, kernels=kernels).differences(normalize_rows(block, ids, kernels=None))
    if differ:
        raise KernelBuildError(f"{kernels.path.name} disagrees with numpy ({', '.join(differ)})")
    return kernels


def hard_rows(rng: np.random.Generator, n: int, vocab: int, spread: float) -> tuple[np.ndarray, np.ndarray]:
    """Logit rows and sampling offsets where a compaction can go wrong: a few clear winners, ties
    across the top-k edge, and a flat row (every token above the cutoff, all tied) whose offset 0
    puts the sample points exactly on cumulative-mass boundaries."""
    rows = (rng.standard_normal((n, vocab)) * spread).astype(np.float32)
    rows[:, : min(5, vocab)] += 8.0
    rows[:, vocab // 3 : vocab // 3 + 12] = rows[:, vocab // 3 : vocab // 3 + 1]
    rows[n // 2] = 0.0
    u0 = rng.random(n)
    u0[n // 2] = 0.0
    return rows, u0


def reset() -> None:
    """Forget the loaded kernels: the next call finds or builds them again (tests; a changed ``$CC``)."""
    global _KERNELS, _TRIED
    _KERNELS, _TRIED = None, False


def kernel_name() -> str:
    """What does the passes over the vocabulary: 'C' or 'numpy' (recorded next to benchmark figures)."""
    return "numpy" if compiled_kernels() is None else "C"


class KernelBuildError(RuntimeError):
    pass


def compiler() -> list[str] | None:
    """``$CC``, else the compiler Python was built with, else ``cc``: the first that exists."""
    for spec in (os.environ.get("CC"), sysconfig.get_config_var("CC"), "cc", "gcc", "clang"):
        words = shlex.split(spec) if spec else []
        if words and shutil.which(words[0]):
            return words
    return None


def library_path(cc: list[str]) -> Path:
    """Where the library built by ``cc`` is cached: one per source, compiler, flags and machine."""
    from .environment import default_cache_dir

    tag = hashlib.sha256(b"\0".join([SOURCE.read_bytes(), " ".join(cc + CFLAGS).encode(),
                                     platform.machine().encode(), platform.system().encode()])).hexdigest()[:16]
    return default_cache_dir() / "kernels" / f"kernels-{tag}.so"


def _load_or_build() -> Kernels:
    """The cached library, built first if missing; a damaged one is rebuilt."""
    cc = compiler()
    if cc is None:
        raise KernelBuildError("no C compiler found ($CC, cc, gcc, clang)")
    out = library_path(cc)
    if out.exists():
        try:
            return _load(out)
        except KernelBuildError as exc:
            print(f"pytest-kvquality: {exc}; rebuilding it", file=sys.stderr)
            out.unlink(missing_ok=True)  # a new file, not this one rewritten: mappings of it stay whole
    _build(cc, out)
    return _load(out)


def _build(cc: list[str], out: Path) -> None:
    build_library(cc, [*CFLAGS, "-o"], SOURCE, out, ["-lm"])


def build_library(cc: list[str], flags: list[str], source: Path, out: Path, after: list[str]) -> None:
    """Compile ``source`` into ``out`` as ``cc flags OUT source after`` (atomically: parallel workers
    building at once all end with a whole file); ``KernelBuildError`` with the compiler's words."""
    def compile_to(tmp: Path) -> None:
        done = subprocess.run([*cc, *flags, str(tmp), str(source), *after], capture_output=True, text=True,
                              timeout=120)
        if done.returncode != 0:
            raise KernelBuildError(f"building {source.name} with {cc[0]} failed: "
                                   f"{(done.stderr or done.stdout).strip()[-500:]}")

    try:
        atomic_produce(out, compile_to, suffix=".so")
    except WriteError as exc:
        what = "kernel" if source == SOURCE else source.name
        raise KernelBuildError(f"cannot write the compiled {what} to {out.parent}: {exc}") from exc
    except (OSError, subprocess.SubprocessError) as exc:
        raise KernelBuildError(f"building {source.name} into {out.parent} failed: {exc}") from exc


def _load(path: Path) -> Kernels:
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as exc:
        raise KernelBuildError(f"loading {path} failed: {exc}") from exc
    try:
        lib.kvq_rows.restype = None
        lib.kvq_rows.argtypes = [_ptr, _i64, _i64, _i64, _ptr, _i64, _ptr, _ptr, _ptr]
        lib.kvq_select.restype = _i64
        lib.kvq_select.argtypes = [_ptr, _i64, _i64, _ptr, _ptr, _i64, _i64, _i64, _ptr, _ptr, _ptr]
        lib.kvq_finish.restype = ctypes.c_int
        lib.kvq_finish.argtypes = [_ptr, _i64, _ptr, _ptr, _ptr, _i64, _i64, _ptr, _i64, _f32, _f64,
                                   _ptr, _ptr, _ptr, _ptr, _ptr]
    except AttributeError as exc:  # a library of another source version under this name
        raise KernelBuildError(f"{path} lacks a kernel: {exc}") from exc
    return Kernels(lib, path)
