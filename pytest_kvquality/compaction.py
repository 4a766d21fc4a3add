"""The reference compaction: per scored row, the top k tokens exactly and m tail samples
(``compact_rows``), with its two passes over the vocabulary in C (``compaction.c``, built on first
use) or, without a compiler, in numpy.

``compact_rows`` pulls each row's tokens above the cutoff out in one compiled pass and
finishes every row (top k, tail sample) in a second one, instead of a compare, a nonzero and a
dozen numpy calls over the gathered entries. The results are the same bits as the numpy path (a
test holds them to it). The source, ``compaction.c``, is compiled once with the C compiler that
built llama-cpp-python and cached next to the references; ctypes releases the GIL during the
calls, so the engine's row threads run in parallel. Why not numba: it adds ~150 MiB of resident
LLVM to the model worker, which the n_ctx 32,768 memory target cannot afford, and it lags numpy
releases. ``KVQ_COMPILED=0`` turns the kernels off; without a C compiler numpy does the work.
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
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from .environment import env_flag
from .files import WriteError, atomic_produce
from .metrics import F32, LOG_P_CUTOFF, PAD_LOGP, ROW_BLOCK, ReferenceRows, base_next_logp, log_normalizer

#: Bins of log p over (-16, 0] used to find each row's top-k candidates before sorting them.
TOP_BINS = 1024

#: Tail probabilities are summed as integers in units of 2^-48: exact sums, so a row's tail mass
#: does not depend on the rows it is processed with. Each p enters with float32 precision
#: (relative 6e-8), far below the sampling noise of the tail estimate.
TAIL_MASS_UNIT = float(1 << 48)

SOURCE = Path(__file__).with_name("compaction.c")
CFLAGS = ["-O3", "-fPIC", "-shared", "-ffp-contract=off", "-fno-fast-math"]

_i64, _f32, _f64 = ctypes.c_int64, ctypes.c_float, ctypes.c_double
_ptr = ctypes.c_void_p


@dataclass(frozen=True)
class CompactionKernels:
    library: ctypes.CDLL
    path: Path

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


_KERNELS: CompactionKernels | None = None
_TRIED = False


def enabled_by_env() -> bool:
    return env_flag("KVQ_COMPILED", True) is not False


def compaction_kernels() -> CompactionKernels | None:
    """The compiled kernels, or None (``KVQ_COMPILED=0``, no C compiler, a failed build): numpy then."""
    global _KERNELS, _TRIED
    if not enabled_by_env():
        return None
    if not _TRIED:
        _TRIED = True
        try:
            _KERNELS = _checked(_load_or_build())
        except KernelBuildError as exc:
            print(f"pytest-kvquality: {exc}; the reference compaction uses numpy (slower, same results)",
                  file=sys.stderr)
    return _KERNELS


def _checked(kernels: CompactionKernels) -> CompactionKernels:
    """Refuse a library that does not reproduce the numpy path on a small hard case (ties, a flat
    row, sample points on mass boundaries): a compiler that ignores the flags (fast-math by default,
    as some do) must not change a reference silently. Costs a few milliseconds once per process."""
    rng = np.random.default_rng(20261129)
    rows, u0 = hard_rows(rng, 6, 2000, 3.0)
    nxt = rng.integers(0, 2000, 6)
    differ = compact_rows(rows, nxt, 16, 8, u0, kernels=kernels).differences(
        compact_rows(rows, nxt, 16, 8, u0, kernels=None))
    if differ:
        raise KernelBuildError(f"{kernels.path.name} disagrees with the numpy compaction ({', '.join(differ)})")
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
    """What does the compaction: 'C' or 'numpy' (recorded next to benchmark figures)."""
    return "numpy" if compaction_kernels() is None else "C"


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
    return default_cache_dir() / "kernels" / f"compaction-{tag}.so"


def _load_or_build() -> CompactionKernels:
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
    """Compile compaction.c into ``out`` (atomically: parallel workers building at once all end with
    a whole file)."""
    def compile_to(tmp: Path) -> None:
        done = subprocess.run([*cc, *CFLAGS, "-o", str(tmp), str(SOURCE), "-lm"], capture_output=True, text=True,
                              timeout=120)
        if done.returncode != 0:
            raise KernelBuildError(f"building {SOURCE.name} with {cc[0]} failed: "
                                   f"{(done.stderr or done.stdout).strip()[-500:]}")

    try:
        atomic_produce(out, compile_to, suffix=".so")
    except WriteError as exc:
        raise KernelBuildError(f"cannot write the compiled kernel to {out.parent}: {exc}") from exc
    except (OSError, subprocess.SubprocessError) as exc:
        raise KernelBuildError(f"building {SOURCE.name} into {out.parent} failed: {exc}") from exc


def _load(path: Path) -> CompactionKernels:
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as exc:
        raise KernelBuildError(f"loading {path} failed: {exc}") from exc
    lib.kvq_select.restype = _i64
    lib.kvq_select.argtypes = [_ptr, _i64, _i64, _ptr, _ptr, _i64, _i64, _i64, _ptr, _ptr, _ptr]
    lib.kvq_finish.restype = ctypes.c_int
    lib.kvq_finish.argtypes = [_ptr, _i64, _ptr, _ptr, _ptr, _i64, _i64, _ptr, _i64, _f32, _f64,
                               _ptr, _ptr, _ptr, _ptr, _ptr]
    return CompactionKernels(lib, path)


def compact_reference(
    base_logits: F32, next_tokens: npt.NDArray[Any], k: int, m: int, rng: np.random.Generator
) -> ReferenceRows:
    """Compress reference logits to ``k`` exact top tokens plus ``m`` tail samples per row."""
    return compact_rows(base_logits, next_tokens, k, m, np.asarray(rng.random(base_logits.shape[0])))


def compact_rows(
    base_logits: F32, next_tokens: npt.NDArray[Any], k: int, m: int, u0: npt.NDArray[np.float64],
    kernels: CompactionKernels | Literal["auto"] | None = "auto",
) -> ReferenceRows:
    """``compact_reference`` with the sampling offsets given: rows can be split across threads
    and give the same result as one pass.

    Only two things touch the whole vocabulary: the log-normalizer and pulling out the tokens
    above the cutoff (on real Gemma rows: median 2,234 of 262,144, p90 12,207, at most ~31,600).
    Everything after works on those tokens only. The top ``k`` of each row are kept exactly (ties
    broken by token id). The rest, the tail, is sampled systematically in token order: one offset
    ``u0`` per row, ``m`` evenly spaced points on the tail's cumulative mass, which is summed in
    fixed point so that each row's sums are exact and independent of the rows processed with it.
    The selection runs in two compiled C kernels (below), or without a C compiler in a
    handful of numpy calls per call with no per-row Python loop. Both give the same bits.
    """
    base_logits = np.ascontiguousarray(base_logits, dtype=np.float32)
    n, n_vocab = base_logits.shape
    k = min(k, n_vocab)
    if kernels == "auto":
        kernels = compaction_kernels()
    if kernels is None:
        bmax, bnorm = log_normalizer(base_logits)
    else:  # the selection right after each block's log-normalizer, while its rows are in cache
        selected: list[tuple[np.ndarray, ...]] = []
        bmax, bnorm = log_normalizer(
            base_logits, lambda block, norm: selected.append(kernels.select(block, norm + LOG_P_CUTOFF, norm)))
        offsets = np.cumsum([0] + [ids.size for _, ids, _ in selected])  # each block's first entry
        starts = np.concatenate([block_starts[:-1] + offset for (block_starts, _, _), offset
                                 in zip(selected, offsets, strict=False)] + [offsets[-1:]])
        ids = np.concatenate([ids for _, ids, _ in selected])
        lp = np.concatenate([lp for _, _, lp in selected])
    top_ids = np.repeat(bmax[:, None], k, axis=1)  # rows with fewer than k tokens above the cutoff
    top_logp = np.full((n, k), PAD_LOGP, np.float32)  # are padded
    tail_ids = np.repeat(bmax[:, None], m, axis=1)
    tail_logp = np.full((n, m), PAD_LOGP, np.float32)
    tail_mass = np.zeros(n, np.float64)
    out = (top_ids, top_logp, tail_ids, tail_logp, tail_mass)
    if kernels is None:
        _compact_numpy(base_logits, bnorm, k, m, u0, *out)
    else:
        kernels.finish(starts, ids, lp, _fixed_point_mass(lp), k, m, np.ascontiguousarray(u0, dtype=np.float64),
                       TOP_BINS, -TOP_BINS / 16.0, TAIL_MASS_UNIT, out)
    next_logp = base_next_logp(base_logits, bmax, bnorm, next_tokens)
    return ReferenceRows(bmax, next_logp, top_ids, top_logp, tail_ids, tail_logp, tail_mass)


def _fixed_point_mass(lp: F32) -> npt.NDArray[np.int64]:
    """p in units of 1 / TAIL_MASS_UNIT: integer sums are exact, so a row's cumulative mass is the
    same whatever rows come before it. numpy's exp on both paths: the compiled one gets the same bits."""
    out: npt.NDArray[np.int64] = np.rint(np.exp(lp) * TAIL_MASS_UNIT).astype(np.int64)
    return out


def _compact_numpy(base_logits: F32, bnorm: F32, k: int, m: int, u0: npt.NDArray[np.float64],
                   top_ids: npt.NDArray[Any], top_logp: F32, tail_ids: npt.NDArray[Any], tail_logp: F32,
                   tail_mass: npt.NDArray[np.float64]) -> None:
    """``compact_rows``'s selection in plain numpy: fills the padded output arrays in place."""
    n, n_vocab = base_logits.shape
    pieces: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    # one mask buffer reused for every block, not a multi-MB temporary per block
    above = np.empty((min(ROW_BLOCK, n), n_vocab), bool)
    for s in range(0, n, ROW_BLOCK):
        block = base_logits[s : s + ROW_BLOCK]
        norm = bnorm[s : s + block.shape[0]]
        mask = above[: block.shape[0]]
        np.greater(block, (norm + LOG_P_CUTOFF)[:, None], out=mask)
        flat = np.flatnonzero(mask)
        block_rows, block_ids = np.divmod(flat, n_vocab)
        pieces.append((block_rows + s, block_ids, block.reshape(-1)[flat] - norm[block_rows]))
    # every token above the cutoff, as (row, token, log p), in (row, token) order
    rows, ids, lp = (np.concatenate(a) for a in zip(*pieces, strict=True))
    # Candidates for each row's top k, without sorting every entry (real rows hold up to ~30,000):
    # a histogram of log p per row finds the bin holding the k-th largest; everything above it is
    # in, everything below out, and only the entries down to that bin are sorted.
    level = np.minimum((lp * np.float32(-TOP_BINS / 16.0)).astype(np.int64), TOP_BINS - 1)  # 0: highest
    hist = np.bincount(rows * TOP_BINS + level, minlength=n * TOP_BINS).reshape(n, TOP_BINS)
    kth_level = (np.cumsum(hist, axis=1) < k).sum(axis=1)  # TOP_BINS where a row has k entries or fewer
    cand = np.flatnonzero(level <= kth_level[rows])  # in (row, token) order
    cand_rows = rows[cand]
    # by row, then log p descending, then token id (a stable sort keeps token order among ties)
    order = cand[np.argsort(cand_rows * 64.0 - lp[cand], kind="stable")]
    rank = np.arange(order.size) - np.searchsorted(cand_rows, rows[order])
    top, rank = order[rank < k], rank[rank < k]
    top_ids[rows[top], rank] = ids[top]
    top_logp[rows[top], rank] = lp[top]
    in_top = np.zeros(lp.size, bool)
    in_top[top] = True
    tail = np.flatnonzero(~in_top)  # in (row, token) order
    if m and tail.size:
        t_rows = rows[tail]
        t_first = np.searchsorted(t_rows, np.arange(n + 1))
        cum = np.cumsum(_fixed_point_mass(lp[tail]))
        before = np.concatenate([[0], cum])[t_first]  # mass of the earlier rows' tails
        mass = before[1:] - before[:-1]
        has = np.flatnonzero(mass > 0)
        step = mass[has].astype(np.float64) / m
        offsets = np.floor((np.arange(m)[None, :] + u0[has, None]) * step[:, None]).astype(np.int64)
        at = np.searchsorted(cum, before[has, None] + offsets, side="right")
        picked = tail[np.minimum(at, t_first[has + 1, None] - 1)]  # rounding at the top end
        tail_mass[has] = mass[has] / TAIL_MASS_UNIT
        tail_ids[has] = ids[picked]
        tail_logp[has] = lp[picked]
