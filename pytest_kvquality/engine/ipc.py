"""Framing for the pipe between pytest and the model worker: ``u32 header length | JSON header |
array bytes``, the header carrying the arrays' layout (``array_codec``). No pickle."""

from __future__ import annotations

import json
import struct
from typing import Any, BinaryIO

import numpy as np

from ..array_codec import pack, payload_size, unpack

Header = dict[str, Any]
Arrays = dict[str, np.ndarray]
Message = tuple[Header, Arrays]


class ChannelClosed(EOFError):
    """The other end of the pipe went away (for the client: the worker died)."""


def send(stream: BinaryIO, header: Header, arrays: Arrays | None = None) -> None:
    layout, payload = pack(arrays or {})
    raw = json.dumps({**header, "_arrays": layout}).encode()
    stream.write(struct.pack("<I", len(raw)))
    stream.write(raw)
    for chunk in payload:
        stream.write(chunk)
    stream.flush()


def _read_exact(stream: BinaryIO, n: int) -> bytearray:
    buf = bytearray()
    while len(buf) < n:
        chunk = stream.read(n - len(buf))
        if not chunk:
            raise ChannelClosed("pipe closed")
        buf += chunk
    return buf


def recv(stream: BinaryIO) -> Message:
    (n,) = struct.unpack("<I", _read_exact(stream, 4))
    header = json.loads(_read_exact(stream, n))
    layout = header.pop("_arrays")
    return header, unpack(layout, memoryview(_read_exact(stream, payload_size(layout))))
