"""files.py: ``atomic_produce``, the way a file another tool writes (compiler, quantizer, model
assembler) gets into place. ``atomic_write`` is tested with the outputs it protects
(tests/test_verdict_integrity.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pytest_kvquality.files import WriteError, atomic_produce


def test_a_produced_file_appears_whole_and_no_temporary_file_is_left(tmp_path: Path) -> None:
    seen: list[bool] = []

    def produce(tmp: Path) -> None:
        seen.append((tmp_path / "out.bin").exists())  # not yet visible under its name
        tmp.write_bytes(b"x" * 1000)

    atomic_produce(tmp_path / "out.bin", produce, suffix=".bin")
    assert seen == [False]
    assert (tmp_path / "out.bin").read_bytes() == b"x" * 1000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


def test_a_failing_tool_leaves_the_old_file_and_no_temporary_file(tmp_path: Path) -> None:
    out = tmp_path / "lib.so"
    out.write_bytes(b"old")

    def half_then_fail(tmp: Path) -> None:
        tmp.write_bytes(b"half")
        raise RuntimeError("compiler crashed")

    with pytest.raises(RuntimeError, match="compiler crashed"):
        atomic_produce(out, half_then_fail)
    assert out.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lib.so"]


def test_a_symlink_is_produced_through_and_a_device_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "real.gguf"
    real.write_bytes(b"old")
    link = tmp_path / "link.gguf"
    link.symlink_to(real)
    atomic_produce(link, lambda tmp: tmp.write_bytes(b"new"))
    assert link.is_symlink() and real.read_bytes() == b"new"
    with pytest.raises(WriteError, match="not a regular file"):
        atomic_produce(Path(os.devnull), lambda tmp: tmp.write_bytes(b"x"))
    assert Path(os.devnull).exists() and not Path(os.devnull).is_file()


def test_an_executable_stays_executable(tmp_path: Path) -> None:
    def compile_to(tmp: Path) -> None:
        tmp.write_bytes(b"\x7fELF")
        tmp.chmod(0o755)

    out = atomic_produce(tmp_path / "k.so", compile_to)
    assert out.stat().st_mode & 0o100
