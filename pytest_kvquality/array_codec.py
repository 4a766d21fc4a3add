"""The one way named arrays become bytes (the worker pipe, reference files): a JSON-able layout
listing each array's name, dtype, shape, offset and size, and the raw bytes in that order. No pickle."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

Layout = list[dict[str, Any]]


def pack(arrays: Mapping[str, np.ndarray]) -> tuple[Layout, list[bytes]]:
    """The layout of ``arrays`` and their bytes (C order)."""
    layout: Layout = []
    payload: list[bytes] = []
    offset = 0
    for name, a in arrays.items():
        raw = np.ascontiguousarray(a).tobytes()
        layout.append({"name": name, "dtype": a.dtype.str, "shape": list(a.shape), "offset": offset,
                       "nbytes": len(raw)})
        payload.append(raw)
        offset += len(raw)
    return layout, payload


def payload_size(layout: Layout) -> int:
    return sum(int(a["nbytes"]) for a in layout)


def unpack(layout: Layout, payload: bytes | memoryview) -> dict[str, np.ndarray]:
    """The arrays of ``payload`` (read-only views into it) as ``layout`` describes them."""
    return {a["name"]: np.frombuffer(payload[a["offset"]:a["offset"] + a["nbytes"]], np.dtype(a["dtype"]))
            .reshape(a["shape"]) for a in layout}
