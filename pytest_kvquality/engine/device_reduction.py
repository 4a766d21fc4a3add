"""The evaluation's pass over the vocabulary on the device that computed the logits
(``device_reduction.c``, a llama.cpp backend sampler): per scored row the argmax, the
log-normalizer and the logits at the row's ids, (ids + 2) floats instead of a whole row.

Why: llama.cpp copies each scored row's logits to the host (1 MiB per row at a 262,144-token
vocabulary) and waits for each decode whose rows are read. Here the rows are reduced where they
are, into a buffer of the reduction on that device, and a group's rows come back in one copy after
its last decode: no decode is waited for on its own. The numbers are the host pass's to float32
rounding, not to the bit (the device sums in its own order; ``tests/test_real_device_reduction.py``
holds them to it). When it is used: ``pipeline.reduce_on_device``. The library is built on first
use against the installed llama-cpp-python's headers and libraries; where it cannot be, the host
pass does the work.

Imported inside the model worker only (after ``llama_cpp``).
"""

from __future__ import annotations

import ctypes
import hashlib
import platform
import sys
import threading
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np

from ..environment import default_cache_dir
from ..kernels import KernelBuildError, build_library, compiler

SOURCE = Path(__file__).with_name("device_reduction.c")
CFLAGS = ["-O2", "-fPIC", "-shared"]

_c = ctypes.c_void_p
_i32 = ctypes.c_int32


def _llama_dirs() -> tuple[Path, Path]:
    """llama-cpp-python's shared libraries and the headers its wheel installs."""
    package = Path(llama_cpp.__file__).parent
    return package / "lib", package.parent / "include"


def library_path(cc: list[str]) -> Path:
    """One library per source, compiler, llama.cpp headers and libraries (a rebuilt llama-cpp-python
    gets a new one) and machine."""
    lib, include = _llama_dirs()
    parts = [SOURCE.read_bytes(), " ".join(cc + CFLAGS).encode(), platform.machine().encode(), str(lib).encode()]
    for name in ("llama.h", "ggml.h", "ggml-backend.h", "ggml-alloc.h"):
        parts.append((include / name).read_bytes())
    for so in sorted(lib.glob("lib*.so*")):
        st = so.stat()
        parts.append(f"{so.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    tag = hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]
    return default_cache_dir() / "kernels" / f"device-reduction-{tag}.so"


_LIBRARY: ctypes.CDLL | None = None
_TRIED = False
#: contexts are created on a background thread too (ContextCache.prepare): one build, one message
_LOADING = threading.Lock()


def library() -> ctypes.CDLL | None:
    """The loaded library, built first if needed; None (said once on stderr) if it cannot be."""
    global _LIBRARY, _TRIED
    with _LOADING:
        if not _TRIED:
            _TRIED = True
            try:
                _LIBRARY = _load_or_build()
            except (KernelBuildError, OSError) as exc:
                print(f"pytest-kvquality: the reduction on the device is off ({exc}); the host reduces the "
                      "rows (slower on a GPU, same results to float32 rounding)", file=sys.stderr)
    return _LIBRARY


def _load_or_build() -> ctypes.CDLL:
    cc = compiler()
    if cc is None:
        raise KernelBuildError("no C compiler found ($CC, cc, gcc, clang)")
    lib, include = _llama_dirs()
    if not (include / "llama.h").exists():
        raise KernelBuildError(f"llama-cpp-python installed no headers in {include}")
    out = library_path(cc)
    if not out.exists():
        build_library(cc, [*CFLAGS, f"-I{include}", "-o"], SOURCE, out,
                      [f"-L{lib}", "-lllama", "-lggml", "-lggml-base", f"-Wl,-rpath,{lib}"])
    dll = ctypes.CDLL(str(out))
    dll.kvq_reduction_attach.restype = _c
    dll.kvq_reduction_attach.argtypes = [_c, _i32, _i32, _i32]
    dll.kvq_reduction_detach.restype = None
    dll.kvq_reduction_detach.argtypes = [_c, _c]
    dll.kvq_reduction_begin.restype = _i32
    dll.kvq_reduction_begin.argtypes = [_c, _c, _i32]
    dll.kvq_reduction_next.restype = None
    dll.kvq_reduction_next.argtypes = [_c, _i32, _i32]
    dll.kvq_reduction_collect.restype = _i32
    dll.kvq_reduction_collect.argtypes = [_c, _c, _i32, _c]
    return dll


class DeviceReduction:
    """The reduction attached to every sequence of one llama.cpp context. A group's decodes are not
    waited for one by one: ``begin`` (its ids), ``next`` before each decode, ``collect`` after the last."""

    def __init__(self, dll: ctypes.CDLL, ctx: Any, n_vocab: int, width: int, cap: int, n_seq: int) -> None:
        self._dll, self._ctx = dll, ctx
        self.n_vocab, self.width, self.cap = n_vocab, width, cap
        handle = dll.kvq_reduction_attach(ctx, width, cap, n_seq)
        if not handle:
            raise RuntimeError("llama.cpp refused the reduction on the device (its backend-sampler interface)")
        self._handle: int | None = handle
        self._ids: np.ndarray | None = None

    def begin(self, ids: np.ndarray) -> None:
        """A group starts: the ids of all its output rows, in output order ([rows, width] int32); they
        are read while the group decodes."""
        ids = np.ascontiguousarray(ids, dtype=np.int32)
        assert self._handle is not None and ids.ndim == 2 and ids.shape[1] == self.width
        if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= self.n_vocab):
            # a GPU does not check them: a token outside the vocabulary would read another row's logits
            raise ValueError(f"ids outside the vocabulary [0, {self.n_vocab}): {int(ids.min())} .. {int(ids.max())}")
        if self._dll.kvq_reduction_begin(self._handle, ids.ctypes.data, ids.shape[0]) != 0:
            raise RuntimeError(f"{ids.shape[0]} output rows in one group; the reduction holds {self.cap}")
        self._ids = ids  # alive until collect: the C side reads it inside llama_decode

    def next(self, first: int, rows: int) -> None:
        """The next decode's output rows are the group's rows ``first .. first + rows - 1``."""
        assert self._handle is not None and first >= 0
        self._dll.kvq_reduction_next(self._handle, first, rows)

    def trash(self, rows: int = 1) -> None:
        """The next decode's ``rows`` output rows are not the group's: reduced into the trash row, never
        read."""
        assert self._handle is not None
        self._dll.kvq_reduction_next(self._handle, -1, rows)

    def announce(self, first: int, outputs: np.ndarray) -> int:
        """Before a decode of the group whose output flags are ``outputs`` (its batch's, written in
        place): its rows are the group's from ``first``; the number of them. A decode without rows of
        its own gets one, its last token's, reduced into the trash row: then every graph holds the
        reduction, as the graph llama.cpp reserved its compute buffers for does. A graph without it
        makes ggml reserve them again for that smaller graph, waiting for the device, and then again
        at each micro-batch further along the cache (benchmarks/README §10)."""
        rows = int(outputs.sum())
        if rows:
            self.next(first, rows)
        else:
            outputs[-1] = 1
            self.trash(1)
        return rows

    def collect(self, rows: int) -> np.ndarray:
        """After the group's last decode (waits for the device): [rows, width + 2] float32, each row
        argmax, log-normalizer, logits at its ids."""
        out = np.empty((rows, self.width + 2), np.float32)
        assert self._handle is not None
        failed = self._dll.kvq_reduction_collect(self._handle, self._ctx, rows, out.ctypes.data) != 0
        self._ids = None
        if failed:
            raise RuntimeError("the reduced rows of a group were not the rows its decodes announced "
                               "(llama.cpp backend sampling); nothing was read")
        return out

    def detach(self, ctx_alive: bool) -> None:
        """Back to raw logits (``ctx_alive``), or free the samplers after the context is freed."""
        if self._handle is not None:
            self._dll.kvq_reduction_detach(self._handle, self._ctx if ctx_alive else None)
            self._handle = None
