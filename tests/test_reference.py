"""reference.py: the reference file format, its damage detection and its keys."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from pytest_kvquality.compaction import compact_reference
from pytest_kvquality.reference import (
    ReferenceDamaged,
    ReferenceKey,
    decode_label,
    read_reference,
    write_reference,
)


def make_reference(tmp_path: Path) -> tuple[Path, ReferenceKey, object]:
    rng = np.random.default_rng(0)
    rows = compact_reference(rng.standard_normal((20, 300)).astype(np.float32),
                             rng.integers(0, 300, 20), 16, 8, rng)
    key = ReferenceKey("a" * 64, "b" * 64, 64, "f16", "0.3.36", 16, 8, 0)
    path = tmp_path / "ref.kvqref"
    write_reference(path, key, rows, {"model": "m"})
    return path, key, rows


def test_reference_round_trip(tmp_path: Path) -> None:
    path, key, rows = make_reference(tmp_path)
    loaded, meta = read_reference(path, key)
    for name, arr in rows.arrays().items():  # type: ignore[attr-defined]
        assert np.array_equal(arr, loaded.arrays()[name])
    assert meta == {"model": "m"}
    assert [p.name for p in tmp_path.iterdir()] == ["ref.kvqref"]  # no temporary left behind


@pytest.mark.parametrize(("damage", "message"), [
    (lambda b: b[:-10], "truncated"),
    (lambda b: b[:-100] + bytes([b[-100] ^ 0x40]) + b[-99:], "checksum mismatch"),
    (lambda b: b[:7] + b"\x09" + b[8:], "reference format 9"),
    (lambda b: b"PK\x03\x04" + b[4:], "not a pytest-kvquality reference"),
    (lambda b: b[:8] + (3).to_bytes(4, "little") + b"[1]", "header is a JSON list, not an object"),
])
def test_damaged_references_are_detected(tmp_path: Path, damage, message: str) -> None:  # type: ignore[no-untyped-def]
    path, key, _ = make_reference(tmp_path)
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(ReferenceDamaged, match=message):
        read_reference(path, key)


def test_reference_written_for_another_key_is_refused(tmp_path: Path) -> None:
    path, _key, _ = make_reference(tmp_path)
    other = ReferenceKey("a" * 64, "b" * 64, 64, "f16", "0.3.99", 16, 8, 0)
    with pytest.raises(ReferenceDamaged, match="differs in llama_cpp"):
        read_reference(path, other)


def test_a_reference_write_killed_part_way_leaves_no_entry(tmp_path: Path) -> None:
    """SIGKILL while the file is being written (held in fsync): no cache entry a later run would read."""
    import signal
    import subprocess
    import sys
    import time

    target = tmp_path / "refs" / "entry.kvqref"
    script = f"""
import os, time, numpy as np
from pathlib import Path
from pytest_kvquality.compaction import compact_reference
from pytest_kvquality.reference import ReferenceKey, write_reference
os.fsync = lambda fd: (print("writing", flush=True), time.sleep(60))  # a very slow disk
rng = np.random.default_rng(0)
rows = compact_reference(rng.standard_normal((50, 400)).astype(np.float32), rng.integers(0, 400, 50), 16, 8, rng)
write_reference(Path({str(target)!r}), ReferenceKey("a" * 64, "b" * 64, 64, "f16", "x", 16, 8, 0), rows, {{}})
"""
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "writing"
    time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    assert not target.exists()  # the entry name never appeared
    leftovers = list(target.parent.iterdir())
    assert leftovers and all(p.suffix == ".tmp" for p in leftovers)  # only the temporary, never read


def test_a_reference_built_with_full_size_sliding_window_caches_is_not_reused_without_them() -> None:
    """swa_full changes the logits in their last bits (cell order): a different reference file."""
    off = ReferenceKey("a" * 64, "b" * 64, 64, "f16", "0.3.36", 16, 8, 0)
    assert off.digest() != ReferenceKey("a" * 64, "b" * 64, 64, "f16", "0.3.36", 16, 8, 0, swa_full=True).digest()


def test_a_reference_decoded_in_another_geometry_or_normalized_otherwise_is_not_reused() -> None:
    """Chunks decoded four at a time round the logits differently from one at a time, and rows
    normalized with another exponential differ in the last bits: each is its own reference file."""
    key = ReferenceKey("a" * 64, "b" * 64, 512, "f16", "0.3.36", 16, 8, 0, decode=decode_label(2048, 512, 512))
    assert key.decode == "4x512/ub512" and decode_label(512, 512, 512) == "1x512/ub512"
    assert key.digest() != dataclasses.replace(key, decode=decode_label(512, 512, 512)).digest()
    assert key.digest() != dataclasses.replace(key, decode=decode_label(2048, 256, 512)).digest()
    assert key.digest() != dataclasses.replace(key, normalizer="numpy-exp").digest()
    assert decode_label(2048, 512, 32768) == "1x32768/ub512"  # a long context: one chunk, llama-perplexity's ubatch
