"""What the host offers: yes/no switches, each process's share of the cores, available memory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pytest_kvquality.engine.pipeline import RowParallel
from pytest_kvquality.environment import cpu_threads, env_flag, memory_available_bytes


@pytest.mark.parametrize(("value", "expected"), [("1", True), (" Yes ", True), ("off", False), ("FALSE", False),
                                                 ("", None), ("maybe", None)])
def test_a_switch_says_yes_no_or_leaves_the_default(value: str, expected: bool | None) -> None:
    assert env_flag("KVQ_X", None, {"KVQ_X": value}) is expected


@pytest.fixture
def four_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)


@pytest.mark.usefixtures("four_cores")
@pytest.mark.parametrize(("workers", "threads"), [(None, 4), ("1", 4), ("2", 2), ("3", 1), ("8", 1), ("x", 4)])
def test_xdist_workers_share_the_cores(workers: str | None, threads: int) -> None:
    """``pytest -n 2`` on 4 cores: 2 threads per worker, not 4 each spinning against the other's."""
    env = {} if workers is None else {"PYTEST_XDIST_WORKER_COUNT": workers}
    assert cpu_threads(env) == threads


@pytest.mark.usefixtures("four_cores")
def test_the_kl_reduction_takes_its_workers_share(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KVQ_THREADS", raising=False)
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "2")
    rows = RowParallel()
    try:
        assert rows.threads == 2
    finally:
        rows.close()


def test_available_memory_is_the_kernel_s_memavailable(tmp_path: Path) -> None:
    """What the GPU default weighs the reduction's host rows against; unknown reads None (then the
    rows are reduced on the host), never a guess."""
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       131072000 kB\nMemFree:  1000 kB\nMemAvailable:   120000000 kB\n")
    assert memory_available_bytes(meminfo) == 120_000_000 * 1024
    meminfo.write_text("MemTotal:       131072000 kB\n")
    assert memory_available_bytes(meminfo) is None
    assert memory_available_bytes(tmp_path / "absent") is None
