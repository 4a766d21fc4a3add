"""ggml's device registry, reached as llama.cpp's own tools reach it (``common/arg.cpp``): which
devices this process has, and RPC servers added to them (``--kv-rpc``). Imported only inside the
model worker, with llama.py."""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from typing import Any

from llama_cpp._ggml import libggml

from .rpc import RpcError, RpcServer, check_server

# enum ggml_backend_dev_type
_DEV_GPU, _DEV_IGPU = 1, 2

_lib = libggml
_c, _p, _z = ctypes.c_char_p, ctypes.c_void_p, ctypes.c_size_t
#: the ggml calls used here: argument types and result type
_SIGNATURES: dict[str, tuple[list[Any], Any]] = {
    "ggml_backend_dev_count": ([], _z),
    "ggml_backend_dev_get": ([_z], _p),
    "ggml_backend_dev_name": ([_p], _c),
    "ggml_backend_dev_description": ([_p], _c),
    "ggml_backend_dev_type": ([_p], ctypes.c_int),
    "ggml_backend_dev_backend_reg": ([_p], _p),
    "ggml_backend_reg_name": ([_p], _c),
    "ggml_backend_reg_by_name": ([_c], _p),
    "ggml_backend_reg_get_proc_address": ([_p, _c], _p),
    "ggml_backend_register": ([_p], None),
}
for _name, (_args, _result) in _SIGNATURES.items():
    getattr(_lib, _name).argtypes = _args
    getattr(_lib, _name).restype = _result

_ADD_SERVER = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_char_p)
#: endpoints added to ggml's registry in this process (adding is for the process's lifetime)
_added: dict[str, list[str]] = {}


@dataclass(frozen=True)
class Device:
    """One device of ggml's registry: its handle, names, registry (``RPC`` for a server's) and type."""

    handle: int
    name: str
    description: str
    registry: str
    kind: int

    @property
    def rpc(self) -> bool:
        return self.registry == "RPC"


def devices() -> list[Device]:
    out = []
    for i in range(_lib.ggml_backend_dev_count()):
        dev = _lib.ggml_backend_dev_get(i)
        registry = _lib.ggml_backend_reg_name(_lib.ggml_backend_dev_backend_reg(dev)).decode()
        out.append(Device(dev, _lib.ggml_backend_dev_name(dev).decode(),
                          _lib.ggml_backend_dev_description(dev).decode(), registry, _lib.ggml_backend_dev_type(dev)))
    return out


def has_local_gpu() -> bool:
    """A GPU of this machine (an RPC server's device counts as a GPU to llama.cpp, but not here: the
    results' "GPU" and the placement probe are about this machine's)."""
    return any(d.kind in (_DEV_GPU, _DEV_IGPU) and not d.rpc for d in devices())


def rpc_added() -> bool:
    """Whether this process added an RPC server (from then on llama.cpp's default would use it)."""
    return bool(_added)


def device_handles(rpc_names: list[str]) -> list[int]:
    """Handles of the named RPC devices, then of the local GPUs (integrated ones when there are none),
    in llama.cpp's default order."""
    devs = devices()
    rpc = [d.handle for d in devs if d.rpc and d.name in rpc_names]
    gpus = [d.handle for d in devs if d.kind == _DEV_GPU and not d.rpc]
    igpus = [d.handle for d in devs if d.kind == _DEV_IGPU and not d.rpc]
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
