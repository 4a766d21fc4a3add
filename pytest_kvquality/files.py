"""The one way this package writes a file: ``atomic_write`` (bytes we hold) and ``atomic_produce``
(a file another tool writes: the C compiler, llama.cpp's quantizer, the bundled model's assembler).

A reader never sees half a file (a temporary file in the same folder, fsynced, then renamed), and
writing never destroys what the path points at: a symlink is written through to its target (the
link stays), and a path that is not a regular file (``/dev/stdout``, a FIFO, a device) is written
in place, as a shell redirection would. New files get the usual ``0666 & ~umask`` permissions, so a
cache folder can be shared between users; a replaced file keeps its mode.
"""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path


class WriteError(OSError):
    """A file that could not be written; the message names it and says why."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: Path, data: bytes | str | Iterable[bytes], *, fsync_dir: bool = False) -> Path:
    """Write ``data`` to ``path`` (see the module docstring); returns the file actually written."""
    chunks: Iterable[bytes]
    if isinstance(data, str):
        chunks = [data.encode("utf-8")]
    elif isinstance(data, bytes):
        chunks = [data]
    else:
        chunks = data
    target = Path(os.path.realpath(path))
    try:
        st: os.stat_result | None = target.stat()
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise WriteError(e.errno, f"cannot write {path}: {e.strerror}") from e
    try:
        if st is not None and not stat.S_ISREG(st.st_mode):
            with open(target, "wb") as f:  # a device or FIFO: write in place, never replace it
                for c in chunks:
                    f.write(c)
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        mode = stat.S_IMODE(st.st_mode) if st is not None else 0o666 & ~_umask()
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                for c in chunks:
                    f.write(c)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, mode)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        if fsync_dir:
            dir_fd = os.open(target.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
    except WriteError:
        raise
    except OSError as e:
        raise WriteError(e.errno, f"cannot write {path}: {e.strerror or e}") from e
    return target


def atomic_produce(path: Path, produce: Callable[[Path], object], *, suffix: str = "") -> Path:
    """Have ``produce(tmp)`` write a temporary file beside ``path`` (a tool that takes an output
    path), then rename it into place: readers and parallel producers only ever see a whole file.
    A symlink is produced through to its target; a path that is not a regular file is refused (a
    tool's output cannot be renamed over a device). The temporary file never outlives a failure."""
    target = Path(os.path.realpath(path))
    if target.exists() and not target.is_file():
        raise WriteError(0, f"cannot write {path}: it is not a regular file")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix or ".tmp", dir=target.parent)
        os.close(fd)
    except OSError as e:
        raise WriteError(e.errno, f"cannot write {path}: {e.strerror or e}") from e
    tmp = Path(name)
    try:
        produce(tmp)
        with open(tmp, "rb+") as out:  # the tool closed it; make it durable before it is visible
            os.fsync(out.fileno())
        mode = stat.S_IMODE(target.stat().st_mode) if target.exists() else 0o666 & ~_umask()
        if tmp.stat().st_mode & 0o111:  # a tool that made an executable (the compiler) keeps it one
            mode |= 0o111 & ~_umask()
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target
