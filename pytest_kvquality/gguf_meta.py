"""Read the key-value header of a GGUF file, arrays included, without loading llama.cpp.

llama.cpp's C API hides array-valued keys (per-layer KV head counts, the
sliding-window pattern), and gguf-py's reader parses every tensor entry and
takes ~20 s on a 262k-token vocabulary; this reads the header alone, in a
fraction of a second. The format is GGUF v2/v3 (little-endian).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

#: the first four bytes of every GGUF file
GGUF_MAGIC = b"GGUF"


#: GGUF value types -> numpy dtype of the fixed-size ones (8: string, 9: array)
_SCALAR = {0: "u1", 1: "i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8",
           12: "<f8"}
STRING, ARRAY = 8, 9


class GGUFFormatError(ValueError):
    """Not a GGUF file this reader understands."""


@dataclass(frozen=True)
class Field:
    """One key: its value (a Python scalar, str, list of str, or numpy array), type and element type."""

    value: Any
    vtype: int
    subtype: int | None = None


def _string(f: BinaryIO) -> str:
    (n,) = struct.unpack("<Q", f.read(8))
    return f.read(n).decode("utf-8", errors="replace")


def _value(f: BinaryIO, vtype: int) -> Any:
    if vtype == STRING:
        return _string(f)
    if vtype in _SCALAR:
        dt = np.dtype(_SCALAR[vtype])
        return np.frombuffer(f.read(dt.itemsize), dt)[0].item()
    raise GGUFFormatError(f"unknown GGUF value type {vtype}")


def read_metadata(path: Path) -> dict[str, Field]:
    """Every key of the header, in file order."""
    with open(path, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise GGUFFormatError(f"{path} is not a GGUF file")
        version, _n_tensors, n_kv = struct.unpack("<IQQ", f.read(20))
        if version not in (2, 3):
            raise GGUFFormatError(f"{path}: GGUF version {version} is not supported")
        out: dict[str, Field] = {}
        for _ in range(n_kv):
            key = _string(f)
            (vtype,) = struct.unpack("<I", f.read(4))
            if vtype != ARRAY:
                out[key] = Field(_value(f, vtype), vtype)
                continue
            sub, n = struct.unpack("<IQ", f.read(12))
            if sub == STRING:
                out[key] = Field([_string(f) for _ in range(n)], vtype, sub)
            elif sub in _SCALAR:
                dt = np.dtype(_SCALAR[sub])
                out[key] = Field(np.frombuffer(f.read(dt.itemsize * n), dt).copy(), vtype, sub)
            else:
                raise GGUFFormatError(f"{path}: key {key} is an array of unsupported type {sub}")
        return out


def per_layer(meta: dict[str, Field], key: str, n_layer: int, default: int) -> list[int]:
    """A key llama.cpp reads with get_key_or_arr: one value for all layers, or one per layer."""
    field = meta.get(key)
    if field is None:
        return [default] * n_layer
    if isinstance(field.value, np.ndarray):
        values = [int(v) for v in field.value]
        return (values + [0] * n_layer)[:n_layer]
    return [int(field.value)] * n_layer
