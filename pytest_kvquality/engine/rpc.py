"""llama.cpp's RPC servers (``--kv-rpc host:port,…``): parsing the list, telling a private address from
a public one, and a handshake in Python before llama.cpp connects.

llama.cpp aborts the whole process on a server it cannot reach or whose protocol differs, and a TCP
connect to a host that drops packets waits minutes; ``check_server`` asks first, with a timeout, so
such a server fails the tests that needed it with the reason. It speaks only the protocol's HELLO,
to the servers the user named: nothing is scanned or probed.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from dataclasses import dataclass

#: The RPC protocol of the llama.cpp inside llama-cpp-python 0.3.36 (``ggml/include/ggml-rpc.h``;
#: tests/test_rpc.py checks it against the header of the build tree). A server must have this major
#: version and at most this minor one, as llama.cpp's client requires.
RPC_PROTO_MAJOR = 7
RPC_PROTO_MINOR = 0
#: ``RPC_CMD_HELLO`` and the sizes of its request (connection capabilities) and reply
_CMD_HELLO = 14
_CAPS_SIZE = 24
_HELLO_REPLY = 4 + _CAPS_SIZE

#: seconds to connect and to get the HELLO reply
CONNECT_TIMEOUT_S = 5.0


class RpcError(RuntimeError):
    """A server named in --kv-rpc that cannot serve: unreachable, not an RPC server, another version."""


@dataclass(frozen=True)
class RpcServer:
    host: str
    port: int

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"


def parse_servers(text: str) -> tuple[RpcServer, ...]:
    """``host:port[,host:port…]``; ValueError naming the bad part. IPv4 only: llama.cpp's RPC client
    splits an endpoint at its first colon and connects over IPv4 (``ggml-rpc/transport.cpp``)."""
    servers = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        host, sep, port = part.partition(":")
        if "[" in part or ":" in port:
            raise ValueError(f"--kv-rpc {part!r}: llama.cpp's RPC client speaks IPv4 only; give an IPv4 address "
                             "or a host name")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"--kv-rpc {part!r}: expected HOST:PORT, e.g. 192.168.1.20:50052")
        servers.append(RpcServer(host, int(port)))
    if len(set(servers)) != len(servers):
        raise ValueError(f"--kv-rpc {text!r}: a server is named twice")
    return tuple(servers)


def is_private(host: str) -> bool:
    """Loopback or a private range (the name resolved once, as connecting would): the RPC protocol
    has no authentication, so a server elsewhere is exposed to whoever can reach it."""
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError:
        return False
    addresses = {ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos}
    return bool(addresses) and all(a.is_loopback or a.is_private or a.is_link_local for a in addresses)


def check_server(server: RpcServer, timeout: float = CONNECT_TIMEOUT_S) -> tuple[int, int, int]:
    """The server's protocol version from a HELLO exchange; RpcError saying what is wrong."""
    where = f"RPC server {server.endpoint}"
    try:  # over IPv4, as llama.cpp will connect
        ip = str(socket.getaddrinfo(server.host, server.port, socket.AF_INET, socket.SOCK_STREAM)[0][4][0])
    except OSError as e:
        raise RpcError(f"{where}: the host has no IPv4 address ({e}); llama.cpp's RPC client speaks IPv4 "
                       "only") from None
    try:
        with socket.create_connection((ip, server.port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            sock.sendall(struct.pack("<BQ", _CMD_HELLO, _CAPS_SIZE) + bytes(_CAPS_SIZE))
            reply = _recv_exact(sock, 8 + _HELLO_REPLY, where)
    except ConnectionRefusedError:
        raise RpcError(f"{where} refused the connection: is ggml-rpc-server running there, on that port?") from None
    except (ConnectionResetError, BrokenPipeError):
        raise RpcError(f"{where} closed the connection during the handshake: not a ggml-rpc-server, or one of "
                       "another version") from None
    except TimeoutError:
        raise RpcError(f"{where} did not answer within {timeout:g} s (unreachable, or busy serving another "
                       "client: a server takes one client at a time)") from None
    except OSError as e:
        raise RpcError(f"{where} cannot be reached: {e.strerror or e}") from None
    (size,) = struct.unpack_from("<Q", reply)
    if size != _HELLO_REPLY:
        raise RpcError(f"{where} answered the handshake with {size} bytes, not {_HELLO_REPLY}: not a "
                       "ggml-rpc-server of this llama.cpp")
    major, minor, patch = reply[8], reply[9], reply[10]
    if major != RPC_PROTO_MAJOR or minor > RPC_PROTO_MINOR:
        raise RpcError(f"{where} speaks RPC protocol {major}.{minor}.{patch}; this llama-cpp-python's llama.cpp "
                       f"speaks {RPC_PROTO_MAJOR}.{RPC_PROTO_MINOR}: build ggml-rpc-server from the same tree "
                       "(scripts/install-llama.sh does)")
    return major, minor, patch


def _recv_exact(sock: socket.socket, n: int, where: str) -> bytes:
    buf = b""
    while len(buf) < n:
        part = sock.recv(n - len(buf))
        if not part:
            raise RpcError(f"{where} closed the connection during the handshake: "
                           "not a ggml-rpc-server, or one of another version")
        buf += part
    return buf
