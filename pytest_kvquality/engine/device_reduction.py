"""The evaluation's pass over the vocabulary on the device that computed the logits
(``device_reduction.c``, a llama.cpp backend sampler): per scored row the argmax, the
log-normalizer and the logits at the row's ids come back, (ids + 2) floats instead of a whole row.

Why: on a GPU the bound of an evaluation is llama.cpp copying each scored row's logits to the host
(1 MiB per row at a 262,144-token vocabulary) and reducing them there; at n_ctx 32,768 that is 30 %
of the time. The numbers are the host pass's to float32 rounding, not to the bit (the device sums in
its own order; ``tests/test_real_model.py`` holds them to it). When it is used: ``pipeline.reduce_on_device``.
The library is built on first use against the
installed llama-cpp-python's headers and libraries; where it cannot be, the host pass does the work.

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
    dll.kvq_reduction_attach.argtypes = [_c, _i32, _i32, _i32, _i32]
    dll.kvq_reduction_detach.restype = None
    dll.kvq_reduction_detach.argtypes = [_c, _c]
    dll.kvq_reduction_set_ids.restype = _i32
    dll.kvq_reduction_set_ids.argtypes = [_c, _c, _i32]
    dll.kvq_reduction_read.restype = _i32
    dll.kvq_reduction_read.argtypes = [_c, _c, _c, _i32, _c]
    return dll


class DeviceReduction:
    """The reduction attached to every sequence of one llama.cpp context; one micro-batch per decode."""

    def __init__(self, dll: ctypes.CDLL, ctx: Any, n_vocab: int, width: int, max_rows: int, n_seq: int) -> None:
        self._dll, self._ctx = dll, ctx
        self.width, self.max_rows = width, max_rows
        handle = dll.kvq_reduction_attach(ctx, n_vocab, width, max_rows, n_seq)
        if not handle:
            raise RuntimeError("llama.cpp refused the reduction on the device (its backend-sampler interface)")
        self._handle: int | None = handle

    def set_ids(self, ids: np.ndarray) -> None:
        """The ids of the next decode's output rows, in output order ([rows, width] int32)."""
        ids = np.ascontiguousarray(ids, dtype=np.int32)
        assert self._handle is not None and ids.ndim == 2 and ids.shape[1] == self.width
        if self._dll.kvq_reduction_set_ids(self._handle, ids.ctypes.data, ids.shape[0]) != 0:
            raise RuntimeError(f"{ids.shape[0]} output rows in one decode; the reduction holds {self.max_rows}")

    def read(self, batch_index: np.ndarray) -> np.ndarray:
        """After the decode: [rows, width + 2] float32, each row argmax, log-normalizer, logits at ids;
        ``batch_index``: the batch position of each output row."""
        index = np.ascontiguousarray(batch_index, dtype=np.int32)
        out = np.empty((index.size, self.width + 2), np.float32)
        assert self._handle is not None
        if index.size and self._dll.kvq_reduction_read(self._handle, self._ctx, index.ctypes.data, index.size,
                                                       out.ctypes.data) != 0:
            raise RuntimeError("llama.cpp returned no reduced rows for a decode (backend sampling)")
        return out

    def detach(self, ctx_alive: bool) -> None:
        """Back to raw logits (``ctx_alive``), or free the samplers after the context is freed."""
        if self._handle is not None:
            self._dll.kvq_reduction_detach(self._handle, self._ctx if ctx_alive else None)
            self._handle = None
