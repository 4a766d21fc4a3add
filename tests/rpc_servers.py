"""RPC servers for the tests, all on 127.0.0.1: llama.cpp's ``ggml-rpc-server`` of this build, a proxy in
front of it that cuts or silences the connection at a chosen command (a server dying or hanging
mid-evaluation, on cue), and fake servers that answer the handshake wrongly or not at all."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
#: RPC_CMD_GRAPH_COMPUTE and RPC_CMD_GRAPH_RECOMPUTE of ggml-rpc.cpp
GRAPH_COMMANDS = (10, 16)


def rpc_server_binary() -> Path:
    """The ggml-rpc-server built by scripts/install-llama.sh (or $KVQ_RPC_SERVER); skips without one."""
    env = os.environ.get("KVQ_RPC_SERVER")
    path = Path(env) if env else ROOT / ".build" / "ggml-rpc-server"
    if not path.exists():
        pytest.skip("ggml-rpc-server is not built: run scripts/install-llama.sh (it builds it from the same "
                    "llama-cpp-python sdist), or set KVQ_RPC_SERVER")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def rpc_server(threads: int = 1) -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    """A ggml-rpc-server with the CPU device (also on a GPU host) on a free loopback port, stopped afterwards."""
    port = free_port()
    proc = subprocess.Popen([str(rpc_server_binary()), "-H", "127.0.0.1", "-p", str(port), "-t", str(threads),
                             "-d", "CPU"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
                    pytest.fail(f"ggml-rpc-server did not start on port {port}: {err[-2000:]}")
                time.sleep(0.1)
        yield port, proc
    finally:
        proc.kill()
        proc.wait()


class Proxy:
    """Forwards 127.0.0.1:``port`` to a server; at the ``after``-th graph computation the client sends,
    ``cut`` closes both sides (a server that died) or ``stall`` stops forwarding and keeps the
    connection open (a server that hangs)."""

    def __init__(self, upstream: int, mode: str, after: int) -> None:
        self.upstream, self.mode, self.after = upstream, mode, after
        self.graphs = 0
        self.tripped = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._sockets: list[socket.socket] = [self._listener]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.upstream))
            self._sockets += [client, server]
            threading.Thread(target=self._copy, args=(server, client), daemon=True).start()
            threading.Thread(target=self._commands, args=(client, server), daemon=True).start()

    def _copy(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(1 << 16):
                if not self.tripped.is_set():
                    dst.sendall(data)
        except OSError:
            pass
        _shut(dst)

    def _commands(self, client: socket.socket, server: socket.socket) -> None:
        """The client's stream is frames of command byte, uint64 size, payload."""
        read = _reader(client)
        try:
            while True:
                head = read(9)
                cmd, size = head[0], struct.unpack("<Q", head[1:])[0]
                body = read(size)
                if cmd in GRAPH_COMMANDS:
                    self.graphs += 1
                    if self.graphs >= self.after and not self.tripped.is_set():
                        self.tripped.set()
                        if self.mode == "cut":
                            client.close()
                            server.close()
                            return
                if not self.tripped.is_set():
                    server.sendall(head + body)
        except (OSError, EOFError):
            pass
        if not self.tripped.is_set():  # the client left: so does the server's side (it serves one at a time)
            _shut(server)

    def close(self) -> None:
        for s in self._sockets:
            try:
                s.close()
            except OSError:
                pass


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _reader(sock: socket.socket) -> Callable[[int], bytes]:
    def read(n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            part = sock.recv(min(n - len(buf), 1 << 20))
            if not part:
                raise EOFError
            buf += part
        return bytes(buf)
    return read


@contextmanager
def fake_server(answer: Callable[[socket.socket], None]) -> Iterator[int]:
    """A loopback server that runs ``answer`` on each connection (a wrong or missing handshake)."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = int(listener.getsockname()[1])
    open_sockets: list[socket.socket] = []

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            open_sockets.append(conn)
            try:
                answer(conn)
            except OSError:
                pass

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield port
    finally:
        listener.close()
        for c in open_sockets:
            c.close()


def hello_reply(major: int, minor: int = 0, patch: int = 0) -> Callable[[socket.socket], None]:
    """Answer the HELLO with this protocol version, then nothing more (the connection stays open)."""
    def answer(conn: socket.socket) -> None:
        conn.recv(64)
        conn.sendall(struct.pack("<Q", 28) + bytes([major, minor, patch, 0]) + bytes(24))
    return answer


def silent(conn: socket.socket) -> None:
    """Accept, read, never answer."""
    conn.recv(64)
