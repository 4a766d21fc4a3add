"""Framing for the pipe between pytest and the model worker: a JSON header plus raw arrays.

No pickle: a message is ``u32 header length | JSON header | array bytes...``,
where the header lists each array's name, dtype and shape.
"""

from __future__ import annotations

import json
import struct
from typing import Any, BinaryIO

import numpy as np

Message = tuple[dict[str, Any], dict[str, np.ndarray]]


class ChannelClosed(EOFError):
    """The other end of the pipe went away (for the client: the worker died)."""


def send(stream: BinaryIO, header: dict[str, Any], arrays: dict[str, np.ndarray] | None = None) -> None:
    arrays = arrays or {}
    meta = [
        {"name": k, "dtype": v.dtype.str, "shape": list(v.shape)} for k, v in arrays.items()
    ]
    raw = json.dumps({**header, "_arrays": meta}).encode()
    stream.write(struct.pack("<I", len(raw)))
    stream.write(raw)
    for v in arrays.values():
        stream.write(np.ascontiguousarray(v).data.cast("B"))
    stream.flush()


def _read_exact(stream: BinaryIO, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = stream.read(n - len(buf))
        if not chunk:
            raise ChannelClosed("pipe closed")
        buf += chunk
    return bytes(buf)


def recv(stream: BinaryIO) -> Message:
    (n,) = struct.unpack("<I", _read_exact(stream, 4))
    header = json.loads(_read_exact(stream, n))
    arrays: dict[str, np.ndarray] = {}
    for meta in header.pop("_arrays"):
        dtype = np.dtype(meta["dtype"])
        count = int(np.prod(meta["shape"], dtype=np.int64))
        data = _read_exact(stream, count * dtype.itemsize)
        arrays[meta["name"]] = np.frombuffer(data, dtype).reshape(meta["shape"]).copy()
    return header, arrays
