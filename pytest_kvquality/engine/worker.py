"""The model worker process: ``python -m pytest_kvquality.engine.worker READ_FD WRITE_FD [--testing]``.

``llama_cpp`` is imported first, before numpy (a numpy import ahead of it
segfaulted the CUDA build's model load). Requests and replies travel as
ipc messages; an exception becomes an ``error`` reply, a native crash ends
the process and the client reports it with the log tail.
"""

from __future__ import annotations

import os
import sys


def _limit_memory() -> None:
    """``KVQ_WORKER_MEMORY_LIMIT`` (bytes, or with a K/M/G suffix) caps the worker's address space,
    so an oversized config fails with llama.cpp's allocation error instead of the kernel's OOM
    killer taking the host. For CPU builds: CUDA reserves more address space than it uses."""
    import resource

    text = os.environ.get("KVQ_WORKER_MEMORY_LIMIT", "").strip().upper()
    if not text:
        return
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1], 1)
    limit = int(float(text.rstrip("KMG")) * scale)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def _die_with_parent() -> None:
    """End this process when pytest ends, however it ends: a CI timeout's SIGKILL or SIGTERM gives
    the client no chance to stop us, and a worker left running keeps the GPU busy. Linux: the
    kernel's parent-death signal; elsewhere, and as a second line, a thread that watches the parent."""
    import threading
    import time

    parent = os.getppid()
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):  # pragma: no cover - no prctl: the thread below remains
            pass

    def watch() -> None:
        while True:
            if os.getppid() != parent:
                os._exit(70)
            time.sleep(0.5)

    threading.Thread(target=watch, name="kvq-parent-watch", daemon=True).start()
    if os.getppid() != parent:  # pragma: no cover - the parent died before the signal was set
        os._exit(70)


def _serve(read_fd: int, write_fd: int, testing: bool) -> None:
    _die_with_parent()
    _limit_memory()
    from . import llama  # imports llama_cpp, then numpy

    llama.init_backend()
    from . import ipc
    from .local import LocalEngine
    from .server import WorkerServer

    engine = LocalEngine(llama.LlamaBackend())
    inp = os.fdopen(read_fd, "rb")
    out = os.fdopen(write_fd, "wb")
    engine.on_progress = lambda p: ipc.send(out, {"progress": p})
    if testing:
        from .testing import TestingWorkerServer

        TestingWorkerServer(engine).serve(inp, out)
    else:
        WorkerServer(engine).serve(inp, out)
    engine.close()


def main(argv: list[str]) -> int:
    _serve(int(argv[1]), int(argv[2]), testing="--testing" in argv[3:])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
