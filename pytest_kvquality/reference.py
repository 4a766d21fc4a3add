"""The on-disk reference cache: one checksummed file per (model, corpus slice, context, reference config).

File layout (no pickle; arrays framed by ``array_codec``)::

    b"KVQREF\\x00\\x02" | u32 header length | header JSON | array bytes

The header holds the format version, the full key, each array's dtype, shape
and offset, and a sha256 over the header (without that field) and the
payload. A file that is truncated, flipped, of another format or written for
another key is reported as damaged and rebuilt; it is never used. Writes go
to a temporary file in the same directory, are fsynced and renamed into
place, so a killed build leaves no file that a later run would read.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np
from filelock import FileLock

from .array_codec import pack, payload_size, unpack
from .decode_geometry import decode_geometry
from .files import atomic_write
from .metrics import ReferenceRows
from .normalizer import NORMALIZER

MAGIC = b"KVQREF\x00\x02"
FORMAT_VERSION = 2


class Stored(Protocol):
    """What a reference file holds: named arrays (``ReferenceRows``, ``generation.Generations``)."""

    def arrays(self) -> dict[str, np.ndarray]: ...


S = TypeVar("S", bound=Stored)


def decode_label(n_batch: int, n_ubatch: int, n_ctx: int) -> str:
    """The decode geometry in a reference key: sequences per decode and micro-batch, e.g. ``4x512/ub512``."""
    n_seq, ubatch = decode_geometry(n_batch, n_ubatch, n_ctx)
    return f"{n_seq}x{n_ctx}/ub{ubatch}"


class ReferenceDamaged(ValueError):
    """A cache entry exists but cannot be trusted; the message says why."""


@dataclass(frozen=True)
class ReferenceKey:
    """Everything a reference depends on. Its digest names the file."""

    model_sha256: str
    tokens_sha256: str  # the chunked tokens: corpus text, tokenizer, n_ctx and chunk count
    n_ctx: int
    ref_cache: str
    llama_cpp: str
    top_k: int
    tail_samples: int
    seed: int
    #: sliding-window layers at full size: the logits differ in the last bits (different cell order)
    swa_full: bool = False
    #: greedy generations of this many tokens per prompt instead of scored logits (0: logits)
    gen_tokens: int = 0
    #: how rows were normalized (``normalizer.NORMALIZER``): rows normalized with another
    #: exponential differ in the last bits and are not reused
    normalizer: str = NORMALIZER
    #: the decode geometry (``decode_label``): batches of other shapes round the logits differently
    decode: str = ""

    def as_dict(self) -> dict[str, Any]:
        d = {**self.__dict__, "format": FORMAT_VERSION}
        if not self.decode:
            d.pop("decode")
        if not self.gen_tokens:  # logits references keep the digests they had before generations
            d.pop("gen_tokens")
        return d

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.as_dict(), sort_keys=True).encode()).hexdigest()


def tokens_digest(chunks: np.ndarray) -> str:
    h = hashlib.sha256(np.ascontiguousarray(chunks, np.int32).tobytes())
    h.update(str(chunks.shape).encode())
    return h.hexdigest()


def _checksum(header: dict[str, Any], payload: Sequence[bytes | memoryview]) -> str:
    h = hashlib.sha256(json.dumps(header, sort_keys=True).encode())
    for p in payload:
        h.update(p)
    return h.hexdigest()


def write_reference(path: Path, key: ReferenceKey, rows: Stored, meta: dict[str, Any]) -> None:
    layout, payload = pack(rows.arrays())
    header: dict[str, Any] = {"format": FORMAT_VERSION, "key": key.as_dict(), "arrays": layout,
                              "meta": meta}
    header["checksum"] = _checksum(header, payload)
    raw_header = json.dumps(header, sort_keys=True).encode()
    atomic_write(path, [MAGIC, struct.pack("<I", len(raw_header)), raw_header, *payload], fsync_dir=True)


def read_arrays(path: Path, key: ReferenceKey) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Load and verify a cache entry; raise ``ReferenceDamaged`` if anything is off."""
    data = path.read_bytes()
    if len(data) < len(MAGIC) + 4 or data[: len(MAGIC) - 1] != MAGIC[:-1]:
        raise ReferenceDamaged(f"{path}: not a pytest-kvquality reference file")
    if data[len(MAGIC) - 1] != MAGIC[-1]:
        raise ReferenceDamaged(
            f"{path}: reference format {data[len(MAGIC) - 1]}, this version reads {MAGIC[-1]}"
        )
    (n,) = struct.unpack("<I", data[len(MAGIC) : len(MAGIC) + 4])
    start = len(MAGIC) + 4
    try:
        header = json.loads(data[start : start + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ReferenceDamaged(f"{path}: header is not readable JSON ({e})") from e
    if not isinstance(header, dict):
        raise ReferenceDamaged(f"{path}: header is a JSON {type(header).__name__}, not an object")
    if header.get("format") != FORMAT_VERSION:
        raise ReferenceDamaged(f"{path}: wrong format version {header.get('format')!r}")
    payload_start = start + n
    payload = memoryview(data)[payload_start:]
    try:
        layout = header["arrays"]
        chunks = [payload[a["offset"] : a["offset"] + a["nbytes"]] for a in layout]  # views: no copy
        expected = header.pop("checksum")
    except (KeyError, TypeError) as e:
        raise ReferenceDamaged(f"{path}: header is missing {e}") from e
    total = payload_size(layout)
    if len(data) != payload_start + total:
        raise ReferenceDamaged(
            f"{path}: size {len(data)} bytes, expected {payload_start + total} (truncated or padded)"
        )
    if _checksum(header, chunks) != expected:
        raise ReferenceDamaged(f"{path}: checksum mismatch (the file was modified or damaged)")
    if header["key"] != key.as_dict():
        diff = sorted(k for k in key.as_dict() if header["key"].get(k) != key.as_dict()[k])
        raise ReferenceDamaged(f"{path}: written for another key (differs in {', '.join(diff)})")
    return unpack(layout, payload), header.get("meta", {})


def read_stored(path: Path, key: ReferenceKey,
                decode: Callable[[dict[str, np.ndarray]], S]) -> tuple[S, dict[str, Any]]:
    """A verified file (``read_arrays``) as what it holds; an array ``decode`` misses is damage."""
    arrays, meta = read_arrays(path, key)
    try:
        return decode(arrays), meta
    except KeyError as e:
        raise ReferenceDamaged(f"{path}: array {e} is missing") from e


def read_reference(path: Path, key: ReferenceKey) -> tuple[ReferenceRows, dict[str, Any]]:
    """A logits reference file, verified."""
    return read_stored(path, key, ReferenceRows.from_arrays)


class ReferenceStore:
    """A directory of reference files named by key digest."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path_for(self, key: ReferenceKey) -> Path:
        return self.root / f"{key.digest()[:32]}.kvqref"

    def lock_path(self, key: ReferenceKey) -> Path:
        return self.root / f"{key.digest()[:32]}.lock"

    def load_or_build(self, key: ReferenceKey, build: Callable[[], tuple[S, dict[str, Any]]], *,
                      rebuild: bool = False, on_damaged: Callable[[str], None] = lambda _: None,
                      what: str = "the reference",
                      decode: Callable[[dict[str, np.ndarray]], S] = ReferenceRows.from_arrays,  # type: ignore[assignment]
                      ) -> S:
        """The reference for ``key``: read when a sound file is there (and not ``rebuild``), else built
        once across processes (a file lock; whoever waited reads what the builder wrote) and written.
        A damaged file is reported to ``on_damaged`` and rebuilt, never used."""
        path = self.path_for(key)
        # files are only ever renamed into place, so a complete one is read without the lock (which
        # a read-only reference directory could not give)
        if not rebuild and path.exists():
            rows = self._read(path, key, on_damaged, decode)
            if rows is not None:
                return rows
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            lock = FileLock(str(self.lock_path(key)))
            lock.acquire()
        except OSError as e:
            raise OSError(f"{what} is not in {self.root} and cannot be built there: {e}") from e
        try:
            if path.exists() and not rebuild:  # built by another process while we waited
                rows = self._read(path, key, on_damaged, decode)
                if rows is not None:
                    return rows
            rows, meta = build()
            write_reference(path, key, rows, meta)
            return rows
        finally:
            lock.release()

    @staticmethod
    def _read(path: Path, key: ReferenceKey, on_damaged: Callable[[str], None],
              decode: Callable[[dict[str, np.ndarray]], S]) -> S | None:
        try:
            return read_stored(path, key, decode)[0]
        except ReferenceDamaged as e:
            on_damaged(f"reference cache entry damaged, rebuilt: {e}")
            return None
