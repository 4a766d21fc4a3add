"""The model worker process: ``python -m pytest_kvquality.worker READ_FD WRITE_FD``.

``llama_cpp`` is imported first, before numpy (a numpy import ahead of it
segfaulted the CUDA build's model load). Requests and replies travel as
ipc messages; an exception becomes an ``error`` reply, a native crash ends
the process and the client reports it with the log tail.
"""

from __future__ import annotations

import sys


def _limit_memory() -> None:
    """``KVQ_WORKER_MEMORY_LIMIT`` (bytes, or with a K/M/G suffix) caps the worker's address space,
    so an oversized config fails with llama.cpp's allocation error instead of the kernel's OOM
    killer taking the host. For CPU builds: CUDA reserves more address space than it uses."""
    import os
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
    import os
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


def _serve(read_fd: int, write_fd: int) -> None:
    _die_with_parent()
    _limit_memory()
    from . import llama_backend  # imports llama_cpp, then numpy

    llama_backend.init_backend()

    import ctypes
    import os

    import numpy as np

    from . import ipc
    from .cache_config import CacheConfig
    from .engine import LocalEngine, ModelLoad
    from .metrics import ReferenceRows

    class LlamaBackend:
        def info(self) -> dict[str, object]:
            return llama_backend.backend_info()

        def load(self, model: ModelLoad) -> llama_backend.LlamaModel:
            if not os.path.isfile(model.path):
                raise FileNotFoundError(f"model file {model.path} does not exist")
            return llama_backend.LlamaModel(model.path, model.gpu_layers, swa_full=model.swa_full)

        def quantize(self, src: str, dst: str, weight_type: str) -> None:
            llama_backend.quantize(src, dst, weight_type)

    engine = LocalEngine(LlamaBackend())
    inp = os.fdopen(read_fd, "rb")
    out = os.fdopen(write_fd, "wb")
    engine.on_progress = lambda p: ipc.send(out, {"progress": p})

    def model_of(h: dict[str, object], prefix: str = "") -> ModelLoad:
        return ModelLoad(str(h[prefix + "path"]), int(h[prefix + "gpu_layers"]),  # type: ignore[call-overload]
                         bool(h.get(prefix + "swa_full", False)))

    while True:
        try:
            header, arrays = ipc.recv(inp)
        except ipc.ChannelClosed:
            break
        op = header["op"]
        try:
            if op == "exit":
                break
            if op == "info":
                ipc.send(out, {"info": engine.info()})
            elif op == "describe":
                ipc.send(out, {"model": engine.describe(model_of(header))})
            elif op == "tokenize":
                text = arrays["text"].tobytes().decode("utf-8")
                ipc.send(out, {}, {"tokens": engine.tokenize(model_of(header), text)})
            elif op == "reference":
                run = engine.reference(model_of(header), CacheConfig.parse(header["cache"]),
                                       arrays["chunks"], int(header["seed"]))
                ipc.send(out, {"seconds": run.seconds}, run.rows.arrays())
            elif op == "evaluate":
                ref = ReferenceRows.from_arrays(
                    {k[4:]: v for k, v in arrays.items() if k.startswith("ref_")}
                )
                cand = engine.evaluate(model_of(header), CacheConfig.parse(header["cache"]),
                                       arrays["chunks"], ref)
                ipc.send(out, {"seconds": cand.seconds, "context": cand.context}, cand.stats.arrays())
            elif op == "exact":
                cand = engine.evaluate_exact(
                    model_of(header), CacheConfig.parse(header["cache"]),
                    model_of(header, "ref_"), CacheConfig.parse(header["ref_cache"]),
                    arrays["chunks"],
                )
                ipc.send(out, {"seconds": cand.seconds, "context": cand.context}, cand.stats.arrays())
            elif op == "speed":
                sp = engine.speed(model_of(header), CacheConfig.parse(header["cache"]),
                                  int(header["n_ctx"]), str(header["phase"]), arrays["tokens"])
                ipc.send(out, {"seconds": sp.seconds, "n_tokens": sp.n_tokens, "context": sp.context})
            elif op == "quantize":
                engine.quantize(str(header["src"]), str(header["dst"]), str(header["weight_type"]))
                ipc.send(out, {})
            elif op == "sleep":  # a long request, for the tests that kill the worker during one
                import time

                time.sleep(float(header["seconds"]))
                ipc.send(out, {})
            elif op == "segfault":
                ctypes.string_at(0)  # a real SIGSEGV, for the crash-isolation tests
            else:
                ipc.send(out, {"error": f"unknown worker op {op!r}"})
        except Exception as e:  # reported to the client, which raises EngineError
            ipc.send(out, {"error": f"{type(e).__name__}: {e}"})
        del arrays
        _ = np  # numpy stays imported for the engine
    engine.close()


def main(argv: list[str]) -> int:
    _serve(int(argv[1]), int(argv[2]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
