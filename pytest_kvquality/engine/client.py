"""``WorkerEngine``: a ``LocalEngine`` over llama.cpp in a child process (``worker.py``), so a native
crash fails the tests that needed it, with the tail of the llama.cpp log, instead of killing pytest;
and which GPU each xdist worker's model worker gets."""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, BinaryIO, cast

import numpy as np

from ..cache_config import CacheConfig
from ..generation import Generations
from ..metrics import ReferenceRows
from ..sequences import Sequences, as_sequences
from . import host_pinning, ipc
from .ops import OPS, Op, decode, encode
from .pipeline import huge_pages, keep_freed_memory
from .protocol import (
    DEFAULT_TAIL_SAMPLES,
    DEFAULT_TOP_K,
    BackendInfo,
    CandidateRun,
    DivergenceRun,
    EngineError,
    GenerationRun,
    ModelFacts,
    ModelLoad,
    ReferenceRun,
    SpeedRun,
    TokenPieces,
    WorkerCrash,
)

#: Lines of the llama.cpp log shown when the worker fails.
LOG_TAIL_LINES = 40

#: ggml_abort's first line: ``/path/ggml-rpc.cpp:566: Remote RPC server crashed or returned malformed response``
_GGML_ABORT = re.compile(r"^(\S+\.(?:c|cpp|cu|h)):(\d+): (.+)$", re.MULTILINE)

#: One entry per NVIDIA GPU the driver knows, readable without starting CUDA.
NVIDIA_GPUS_DIR = Path("/proc/driver/nvidia/gpus")


def visible_gpus(environ: Mapping[str, str], gpus_dir: Path = NVIDIA_GPUS_DIR) -> list[str]:
    """CUDA device indices a process started with ``environ`` would see: ``CUDA_VISIBLE_DEVICES``
    when set, else every GPU the NVIDIA driver lists (CUDA's default). Never initialises CUDA."""
    if "CUDA_VISIBLE_DEVICES" in environ:
        return [d.strip() for d in environ["CUDA_VISIBLE_DEVICES"].split(",") if d.strip()]
    try:
        return [str(i) for i in range(sum(1 for _ in gpus_dir.iterdir()))]
    except OSError:
        return []


def worker_gpu_env(environ: Mapping[str, str], xdist_worker: str | None, gpus_dir: Path = NVIDIA_GPUS_DIR,
                   per_worker: int = 1) -> dict[str, str]:
    """``per_worker`` GPUs per pytest-xdist worker: worker ``gw<k>`` sees the k-th group of that many
    visible devices (groups taken in turn, mod their number). Set in the model worker's environment,
    before CUDA initialises; without it llama.cpp spreads every worker's model over all the GPUs.
    With fewer GPUs than one group needs, every worker sees them all; with more workers than groups,
    workers share a group."""
    env = dict(environ)
    if xdist_worker and xdist_worker.startswith("gw") and xdist_worker[2:].isdigit():
        devices = visible_gpus(environ, gpus_dir)
        groups = [devices[i:i + per_worker] for i in range(0, len(devices) - per_worker + 1, per_worker)]
        if groups and groups[0] != devices:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(groups[int(xdist_worker[2:]) % len(groups)])
    return env


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            return f"killed by signal {-code}"
        if name == "SIGKILL":  # nobody else kills our worker this way
            return ("killed by signal SIGKILL (most likely the kernel's out-of-memory killer: the model, "
                    "its KV cache at this n_ctx and one logits batch did not fit in host memory)")
        return f"killed by signal {name}"
    return f"exited with status {code}"


class WorkerEngine:
    """Client of the model worker (``python -m pytest_kvquality.engine.worker``).

    The worker is started on first use and again after a crash. Its stdout and
    stderr (where llama.cpp logs) go to a log file whose tail is quoted in errors.
    """

    #: the worker's LocalEngine runs with the defaults
    top_k = DEFAULT_TOP_K
    tail_samples = DEFAULT_TAIL_SAMPLES
    #: extra arguments of the worker's command line (``testing.TestingWorkerEngine``: its test operations)
    server_args: tuple[str, ...] = ()

    def __init__(self, log_dir: Path | None = None, env: dict[str, str] | None = None,
                 reply_timeout: float | None = None) -> None:
        self.log_dir = Path(log_dir or tempfile.mkdtemp(prefix="kvq-worker-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.env = env
        #: seconds without a message from the worker before it is stopped (None: wait; set with
        #: --kv-rpc, where a server that stops answering would block the worker for ever)
        self.reply_timeout = reply_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._to: BinaryIO | None = None
        self._from: BinaryIO | None = None
        self._log_path: Path | None = None
        self._starts = 0
        self.on_progress: Callable[[dict[str, Any]], None] | None = None

    @property
    def log_path(self) -> Path | None:
        return self._log_path

    def _start(self) -> None:
        self._starts += 1
        self._log_path = self.log_dir / f"worker-{os.getpid()}-{self._starts}.log"
        log = open(self._log_path, "wb")
        c2w_r, c2w_w = os.pipe()
        w2c_r, w2c_w = os.pipe()
        env = dict(os.environ if self.env is None else self.env)
        env = host_pinning.with_malloc_tunables(env, huge_pages(env), keep_freed_memory(env))
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "pytest_kvquality.engine.worker", str(c2w_r), str(w2c_w), *self.server_args],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, pass_fds=(c2w_r, w2c_w),
            env=env, start_new_session=True,
        )
        log.close()
        os.close(c2w_r)
        os.close(w2c_w)
        self._to = os.fdopen(c2w_w, "wb")
        self._from = os.fdopen(w2c_r, "rb", buffering=0)  # unbuffered: select() sees every byte not yet read

    def _log_text(self) -> str | None:
        if self._log_path is None or not self._log_path.exists():
            return None
        return self._log_path.read_bytes().decode("utf-8", errors="replace")

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        text = self._log_text()
        return "(no worker log)" if text is None else "\n".join(text.rstrip().splitlines()[-lines:])

    def abort_reason(self) -> str | None:
        """The message of the last ``GGML_ABORT``/``GGML_ASSERT`` in the log (``file.cpp:566: Remote RPC
        server crashed …``), which the backtrace printed after it pushes out of the tail."""
        found = _GGML_ABORT.findall(self._log_text() or "")
        return f"{Path(found[-1][0]).name}:{found[-1][1]}: {found[-1][2].strip()}" if found else None

    def _call(self, header: ipc.Header, arrays: ipc.Arrays | None = None, what: str = "") -> ipc.Message:
        if self._proc is None or self._proc.poll() is not None:
            self._start()
        assert self._proc is not None and self._to is not None and self._from is not None
        try:
            ipc.send(self._to, header, arrays)
            reply, out = self._receive(what or header["op"])
            while "progress" in reply:  # a long request reports as it goes
                if self.on_progress is not None:
                    self.on_progress(reply["progress"])
                reply, out = self._receive(what or header["op"])
        except (ipc.ChannelClosed, BrokenPipeError) as e:
            code = self._proc.wait()
            self._discard()
            reason = self.abort_reason()
            raise WorkerCrash(
                f"the model worker {_describe_exit(code)} while {what or header['op']}"
                + (f": llama.cpp aborted: {reason}" if reason else "") + ".\n"
                f"Last lines of the llama.cpp log ({self._log_path}):\n{self.log_tail()}"
            ) from e
        except BaseException:  # Ctrl-C mid-request: the worker is still busy with it and the
            self._stop()      # channel is out of step, so it cannot be reused or asked to exit
            raise
        if "error" in reply:
            raise EngineError(
                f"{reply['error']}\nLast lines of the llama.cpp log ({self._log_path}):\n"
                f"{self.log_tail(15)}"
            )
        return reply, out

    def _receive(self, doing: str) -> ipc.Message:
        """The worker's next message; with a reply timeout, a worker silent for that long is stopped."""
        assert self._from is not None
        if self.reply_timeout is not None:
            ready, _, _ = select.select([self._from], [], [], self.reply_timeout)
            if not ready:
                self._stop()
                raise EngineError(
                    f"no word from the model worker for {self.reply_timeout:g} s while {doing}: an RPC server that "
                    "stopped answering (or a load or decode slower than --kv-rpc-timeout allows); the worker was "
                    f"stopped.\nLast lines of the llama.cpp log ({self._log_path}):\n{self.log_tail(15)}")
        return ipc.recv(self._from)

    def _discard(self) -> None:
        for f in (self._to, self._from):
            try:
                if f is not None:
                    f.close()
            except OSError:
                pass
        self._proc = None
        self._to = self._from = None

    def _request(self, op: Op, **kwargs: Any) -> Any:
        args = op.args(**kwargs)
        header, arrays = encode(op.args, args)
        reply, out = self._call({"op": op.name, **header}, arrays, what=op.doing(args))
        return decode(op.reply, reply, out)

    def info(self) -> BackendInfo:
        return cast(BackendInfo, self._request(OPS["info"]))

    def describe(self, model: ModelLoad) -> ModelFacts:
        return cast(ModelFacts, self._request(OPS["describe"], model=model))

    def tokenize(self, model: ModelLoad, text: str) -> np.ndarray:
        return cast(np.ndarray, self._request(OPS["tokenize"], model=model, text=text))

    def tokenize_pieces(self, model: ModelLoad, text: str) -> TokenPieces:
        return cast(TokenPieces, self._request(OPS["tokenize_pieces"], model=model, text=text))

    def reference(self, model: ModelLoad, cache: CacheConfig, chunks: Sequences | np.ndarray,
                  seed: int) -> ReferenceRun:
        return cast(ReferenceRun, self._request(OPS["reference"], model=model, cache=cache,
                                                chunks=as_sequences(chunks), seed=seed))

    def evaluate(self, model: ModelLoad, cache: CacheConfig, chunks: Sequences | np.ndarray,
                 ref: ReferenceRows) -> CandidateRun:
        return cast(CandidateRun, self._request(OPS["evaluate"], model=model, cache=cache,
                                                chunks=as_sequences(chunks), ref=ref))

    def prepare(self, model: ModelLoad, cache: CacheConfig, chunks: Sequences | np.ndarray) -> None:
        self._request(OPS["prepare"], model=model, cache=cache, chunks=as_sequences(chunks))

    def evaluate_exact(self, model: ModelLoad, cache: CacheConfig, ref_model: ModelLoad, ref_cache: CacheConfig,
                       chunks: Sequences | np.ndarray) -> CandidateRun:
        return cast(CandidateRun, self._request(OPS["evaluate_exact"], model=model, cache=cache, ref_model=ref_model,
                                                ref_cache=ref_cache, chunks=as_sequences(chunks)))

    def generate_reference(self, model: ModelLoad, cache: CacheConfig, prompts: Sequences, n_tokens: int,
                           seed: int) -> GenerationRun:
        return cast(GenerationRun, self._request(OPS["generate_reference"], model=model, cache=cache,
                                                 prompts=prompts, n_tokens=n_tokens, seed=seed))

    def generate(self, model: ModelLoad, cache: CacheConfig, prompts: Sequences, ref: Generations) -> DivergenceRun:
        return cast(DivergenceRun, self._request(OPS["generate"], model=model, cache=cache, prompts=prompts, ref=ref))

    def speed(self, model: ModelLoad, cache: CacheConfig, n_ctx: int, phase: str, tokens: np.ndarray) -> SpeedRun:
        return cast(SpeedRun, self._request(OPS["speed"], model=model, cache=cache, n_ctx=n_ctx, phase=phase,
                                            tokens=tokens))

    def peak_rss_bytes(self) -> int | None:
        """The worker's peak resident memory so far (Linux ``VmHWM``; None elsewhere or when not running)."""
        if self._proc is None or self._proc.poll() is not None:
            return None
        try:
            status = Path(f"/proc/{self._proc.pid}/status").read_text()
        except OSError:
            return None
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        return None

    def quantize(self, src: str, dst: str, weight_type: str) -> None:
        self._request(OPS["quantize"], src=src, dst=dst, weight_type=weight_type)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def close(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            try:
                if self._to is not None:
                    ipc.send(self._to, {"op": "exit"})
            except (BrokenPipeError, OSError):
                pass
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._discard()

    def _stop(self) -> None:
        """Kill the worker now (it has no state worth keeping: models reload, references are whole
        files written by the parent) and forget it; the next call starts a fresh one."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._discard()
