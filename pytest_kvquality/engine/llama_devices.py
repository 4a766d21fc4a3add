"""ggml's device registry, reached as llama.cpp's own tools reach it (``common/arg.cpp``): which
devices this process has, and RPC servers added to them (``--kv-rpc``). Imported only inside the
model worker, with llama.py."""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass

from llama_cpp._ggml import libggml

from .rpc import RpcError, RpcServer, check_server

# enum ggml_backend_dev_type
_DEV_GPU, _DEV_IGPU = 1, 2

_lib = libggml
_lib.ggml_backend_dev_count.restype = ctypes.c_size_t
_lib.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
_lib.ggml_backend_dev_get.restype = ctypes.c_void_p
_lib.ggml_backend_dev_name.argtypes = [ctypes.c_void_p]
_lib.ggml_backend_dev_name.restype = ctypes.c_char_p
_lib.ggml_backend_dev_description.argtypes = [ctypes.c_void_p]
_lib.ggml_backend_dev_description.restype = ctypes.c_char_p
_lib.ggml_backend_dev_type.argtypes = [ctypes.c_void_p]
_lib.ggml_backend_dev_type.restype = ctypes.c_int
_lib.ggml_backend_dev_backend_reg.argtypes = [ctypes.c_void_p]
_lib.ggml_backend_dev_backend_reg.restype = ctypes.c_void_p
_lib.ggml_backend_reg_name.argtypes = [ctypes.c_void_p]
_lib.ggml_backend_reg_name.restype = ctypes.c_char_p
_lib.ggml_backend_reg_by_name.argtypes = [ctypes.c_char_p]
_lib.ggml_backend_reg_by_name.restype = ctypes.c_void_p
_lib.ggml_backend_reg_get_proc_address.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
_lib.ggml_backend_reg_get_proc_address.restype = ctypes.c_void_p
_lib.ggml_backend_register.argtypes = [ctypes.c_void_p]
_lib.ggml_backend_register.restype = None

_ADD_SERVER = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_char_p)
#: endpoints added to ggml's registry in this process (adding is for the process's lifetime)
_added: dict[str, list[str]] = {}


@dataclass(frozen=True)
class Device:
    name: str
    description: str
    registry: str
    accelerator: bool


def devices() -> list[Device]:
    out = []
    for i in range(_lib.ggml_backend_dev_count()):
        dev = _lib.ggml_backend_dev_get(i)
        reg = _lib.ggml_backend_dev_backend_reg(dev)
        accelerator = _lib.ggml_backend_dev_type(dev) in (_DEV_GPU, _DEV_IGPU)
        out.append(Device(_lib.ggml_backend_dev_name(dev).decode(), _lib.ggml_backend_dev_description(dev).decode(),
                          _lib.ggml_backend_reg_name(reg).decode(), accelerator))
    return out


def has_local_gpu() -> bool:
    """A GPU of this machine (an RPC server's device counts as a GPU to llama.cpp, but not here: the
    results' "GPU" and the placement probe are about this machine's)."""
    return any(d.accelerator and d.registry != "RPC" for d in devices())


def rpc_added() -> bool:
    """Whether this process added an RPC server (from then on llama.cpp's default would use it)."""
    return bool(_added)


def device_handles(rpc_names: list[str]) -> list[int]:
    """Handles of the named RPC devices, then of the local GPUs (integrated ones when there are none),
    in llama.cpp's default order."""
    rpc, gpus, igpus = [], [], []
    for i in range(_lib.ggml_backend_dev_count()):
        dev = _lib.ggml_backend_dev_get(i)
        kind = _lib.ggml_backend_dev_type(dev)
        if _lib.ggml_backend_reg_name(_lib.ggml_backend_dev_backend_reg(dev)).decode() == "RPC":
            if _lib.ggml_backend_dev_name(dev).decode() in rpc_names:
                rpc.append(dev)
        elif kind == _DEV_GPU:
            gpus.append(dev)
        elif kind == _DEV_IGPU:
            igpus.append(dev)
    return [*rpc, *(gpus or igpus)]


def add_rpc_servers(servers: tuple[RpcServer, ...]) -> list[str]:
    """Add each server's devices to ggml's registry, after a handshake in Python (``rpc.check_server``)
    so an unreachable or mismatched server is an error here and not an abort inside llama.cpp. Returns
    the device names added (``RPC0`` …), once per process and endpoint."""
    if not servers:
        return []
    reg = _lib.ggml_backend_reg_by_name(b"RPC")
    if not reg:
        raise RpcError("this llama-cpp-python was built without llama.cpp's RPC backend: rebuild it with "
                       "CMAKE_ARGS=-DGGML_RPC=ON (scripts/install-llama.sh does)")
    address = _lib.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_rpc_add_server")
    if not address:
        raise RpcError("llama.cpp's RPC backend has no ggml_backend_rpc_add_server")
    add_server = _ADD_SERVER(address)
    names: list[str] = []
    for server in servers:
        if server.endpoint not in _added:
            check_server(server)
            before = {d.name for d in devices()}
            server_reg = add_server(server.endpoint.encode())
            if not server_reg:
                raise RpcError(f"RPC server {server.endpoint} reported no devices")
            _lib.ggml_backend_register(server_reg)
            _added[server.endpoint] = [d.name for d in devices() if d.name not in before]
            os.write(2, f"kvquality: RPC server {server.endpoint}: devices {', '.join(_added[server.endpoint])}\n"
                     .encode())
        names += _added[server.endpoint]
    return names
