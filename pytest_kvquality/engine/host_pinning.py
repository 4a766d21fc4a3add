"""llama.cpp's output buffers in plain memory, its other host buffers pinned.

ggml-cuda has no per-buffer switch: it tests ``GGML_CUDA_NO_PINNED``'s presence at each host-buffer
allocation. With rows reduced on the device no row is copied out of the output buffers, so pinning
their 2-4 GiB buys nothing and holds up the CUDA calls of a context decoding beside them; the
scheduler's host buffer (each micro-batch's input embeddings) must stay pinned, or its copy waits
for the GPU (H200, Qwen 3.6 geometry at n_ctx 32,768: a steady chunk 4.33 s with every host buffer
unpinned, 4.06-4.14 s pinned, 4.12-4.14 s with only the output buffers unpinned).

So the variable is made visible only around the decodes that grow a context's output buffers (the
engine makes llama.cpp's new reservation of its scheduler, due after a sampler is attached, in a
one-token decode that grows them by one row only, ``LlamaContext._reserve_pinned``). It
is put in the C environment once (``install``, before any other thread), under a name one letter
off, and that letter is flipped in place: the environment's array never changes while other threads
are inside llama.cpp, and a ``getenv`` reads either name whole.

Those buffers are cleared as soon as they are made, 2-4 GiB of fresh memory whose 4 KiB page faults
cost a context's first scored decode ~1 s; the worker is started with glibc's malloc asking for
transparent huge pages instead, and keeping freed memory in its heap, so that the next context's
buffers reuse the last one's pages (``with_malloc_tunables``).
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

NAME = b"GGML_CUDA_NO_PINNED"
_OFF = b"_"  # the last letter while hidden: GGML_CUDA_NO_PINNE_=1, which nothing reads
_entry: ctypes.Array[ctypes.c_char] | None = None  # "NAME=1", owned by the C environment once put
_lock = threading.Lock()
_users = 0


def install() -> bool:
    """Put the hidden entry in the C environment (once; call before any thread uses llama.cpp).
    False when the user set ``GGML_CUDA_NO_PINNED`` (every host buffer unpinned: left as it is)."""
    global _entry
    if os.environ.get(NAME.decode()) is not None:
        return False
    if _entry is None:
        entry = ctypes.create_string_buffer(NAME[:-1] + _OFF + b"=1")
        if ctypes.CDLL(None).putenv(entry) != 0:
            raise OSError("putenv failed for the output buffers' pinning switch")
        _entry = entry  # kept alive for the process: the environment points into it
    return True


def installed() -> bool:
    return _entry is not None


@contextmanager
def outputs_unpinned() -> Iterator[None]:
    """While inside (on any thread), host buffers llama.cpp allocates are plain memory. Call it only
    around a decode that grows its context's output buffers."""
    global _users
    if _entry is None:
        yield
        return
    last = len(NAME) - 1
    with _lock:
        _users += 1
        _entry[last] = NAME[last:]
    try:
        yield
    finally:
        with _lock:
            _users -= 1
            if _users == 0:
                _entry[last] = _OFF


def visible() -> bool:
    """Whether llama.cpp would see the variable now (the C environment, as ggml-cuda reads it)."""
    getenv = ctypes.CDLL(None).getenv
    getenv.restype = ctypes.c_char_p
    return getenv(NAME) is not None


#: glibc's malloc backs its large blocks with transparent huge pages (glibc >= 2.35, with the kernel's
#: THP mode "madvise" or "always"; other C libraries ignore the variable)
HUGE_PAGES_TUNABLES = {"glibc.malloc.hugetlb": "1"}
#: glibc's malloc takes even large blocks from its heap and never gives freed memory back to the system:
#: a context's output buffers then reuse the pages of the context closed before it instead of faulting
#: in fresh ones (the worker's memory stays at its peak, which it reaches anyway)
KEEP_FREED_TUNABLES = {"glibc.malloc.mmap_max": "0", "glibc.malloc.trim_threshold": str(1 << 40)}


def with_malloc_tunables(env: Mapping[str, str], huge_pages: bool, keep_freed: bool) -> dict[str, str]:
    """``env`` for a process to start, with glibc's malloc tunables (read once, at exec) for huge pages
    and for keeping freed memory; a tunable the user set in ``GLIBC_TUNABLES`` is left as it is."""
    tunables = env.get("GLIBC_TUNABLES", "")
    chosen = {item.split("=", 1)[0] for item in tunables.split(":") if "=" in item}
    wanted = {**(HUGE_PAGES_TUNABLES if huge_pages else {}), **(KEEP_FREED_TUNABLES if keep_freed else {})}
    added = [f"{name}={value}" for name, value in wanted.items() if name not in chosen]
    if not added:
        return dict(env)
    return {**env, "GLIBC_TUNABLES": ":".join([tunables, *added] if tunables else added)}


def release_freed_memory() -> None:
    """Give the heap's free pages back to the system (``malloc_trim``): after a reference build, whose
    freed buffers the kept-freed-memory tunables would otherwise hold beside the evaluation's own
    (H200, bundled Gemma at n_ctx 32,768, rows reduced on the GPU: the worker's peak RSS 3.64 GiB without
    it, 3.43 with it)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except AttributeError:  # not glibc
        pass
