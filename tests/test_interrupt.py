"""Ctrl-C during a reference build: pytest ends cleanly, the model worker is gone, no cache entry."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import PLUGIN_ARGS

from pytest_kvquality.reference import ReferenceKey, read_reference

pytestmark = pytest.mark.real_model


def worker_pids(parent: int) -> list[int]:
    """Model worker processes whose parent is ``parent`` (read from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if b"pytest_kvquality.engine.worker" in cmdline and ppid == parent:
            found.append(int(entry.name))
    return found


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc")
def test_ctrl_c_during_a_reference_build(tmp_path: Path) -> None:
    refs = tmp_path / "refs"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    model = os.environ.get("KVQ_GEMMA_GGUF", "gemma3-270m")  # the staged file on the GPU host
    proc = subprocess.Popen(  # the whole corpus: the reference build lasts long enough, even on a GPU
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *PLUGIN_ARGS, "--kv-model", model,
         "--kv-cache", "q8_0", "--kv-ref-dir", str(refs),
         "--kv-thresholds", str(tmp_path), "--rootdir", str(tmp_path), str(tmp_path)],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:  # wait until the reference build is under way
        lines.append(line)
        if "[kvquality] building f16 reference" in line:
            break
    time.sleep(2.0)
    workers = worker_pids(proc.pid)
    assert workers, "".join(lines)
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=60)
    output = "".join(lines) + rest
    assert proc.returncode == pytest.ExitCode.INTERRUPTED, output
    assert "KeyboardInterrupt" in output
    for pid in workers:  # the worker was stopped and reaped
        assert not Path(f"/proc/{pid}").exists(), f"worker {pid} outlived pytest"
    # on a slow machine nothing was finished (6 chunks take ~15 s on 2 cores); on a fast one a
    # category may have completed before the signal: whatever is there must be whole and valid
    for entry in refs.glob("*.kvqref"):
        header = json.loads(entry.read_bytes()[12 : 12 + int.from_bytes(entry.read_bytes()[8:12], "little")])
        key = header["key"]
        read_reference(entry, ReferenceKey(**{k: v for k, v in key.items() if k != "format"}))
    assert not list(refs.glob("*.tmp")), "a partial reference was left in the cache"
