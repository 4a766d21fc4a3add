"""What this host offers, found without importing ``llama_cpp`` (the model worker imports it;
importing it in pytest's process could crash it, see worker.py): versions and GPU backends."""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

#: how a boolean environment variable says yes or no (any case, surrounding spaces ignored)
FLAG_ON = ("1", "on", "true", "yes")
FLAG_OFF = ("0", "off", "false", "no")


def env_flag(name: str, default: bool | None, env: Mapping[str, str] | None = None) -> bool | None:
    """A yes/no environment variable: True or False when it says so, ``default`` when it is unset or
    says anything else. The one parser for every ``KVQ_*`` switch (and ``HF_HUB_OFFLINE``)."""
    value = (os.environ if env is None else env).get(name, "").strip().lower()
    return True if value in FLAG_ON else False if value in FLAG_OFF else default


#: ggml backend libraries that offload to an accelerator, and the name shown for each
GPU_BACKENDS = {"cuda": "CUDA", "hip": "ROCm", "metal": "Metal", "vulkan": "Vulkan", "sycl": "SYCL"}


@dataclass(frozen=True)
class HostBackend:
    llama_cpp_python: str
    ggml: str
    gpu: str | None

    @property
    def label(self) -> str:
        return f"{self.gpu} build" if self.gpu else "CPU build"


def _lib_dir() -> Path | None:
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "lib"


@functools.cache
def host_backend() -> HostBackend:
    """llama-cpp-python's version, the vendored ggml's library version, the GPU backend if built."""
    try:
        version = importlib.metadata.version("llama-cpp-python")
    except importlib.metadata.PackageNotFoundError:
        version = "not installed"
    ggml, gpu = "?", None
    lib = _lib_dir()
    if lib is not None and lib.is_dir():
        for p in lib.iterdir():
            m = re.match(r"libggml-base\.so\.(\d+\.\d+\.\d+)$", p.name)
            if m:
                ggml = m.group(1)
            m = re.match(r"libggml-([a-z]+)\.(so|dylib|dll)", p.name)
            if m and m.group(1) in GPU_BACKENDS:
                gpu = GPU_BACKENDS[m.group(1)]
    return HostBackend(version, ggml, gpu)


def cpu_threads(env: Mapping[str, str] | None = None) -> int:
    """This process's share of the host's cores: those it may run on, divided among the xdist workers
    of its run (pytest-xdist sets ``PYTEST_XDIST_WORKER_COUNT`` in each worker; model workers inherit
    it), at least one. Why: llama.cpp's OpenMP threads spin at every barrier, so ``pytest -n 2`` on a
    2-core host with every core per worker ran each forward pass oversubscribed."""
    env = os.environ if env is None else env
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    try:
        workers = max(1, int(env.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    except ValueError:
        workers = 1
    return max(1, cores // workers)


def memory_available_bytes(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """The memory the kernel says can be given to a new process without swapping (``MemAvailable``);
    None where it does not say (not Linux)."""
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def default_cache_dir() -> Path:
    """Where models, references and compiled kernels are kept: ``$KVQ_CACHE_DIR`` or the user cache."""
    env = os.environ.get("KVQ_CACHE_DIR")
    if env:
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_cache_dir("pytest-kvquality"))
