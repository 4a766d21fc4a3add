"""Test-only worker operations, kept out of the production worker: a request that takes long (for
the tests that interrupt or kill the worker during one) and a real SIGSEGV (crash isolation)."""

from __future__ import annotations

import ctypes
import time
from typing import Any, ClassVar

from .client import WorkerEngine
from .ops import OPS, TEST_OPS, Op
from .server import WorkerServer


class TestingWorkerServer(WorkerServer):
    __test__ = False  # not a pytest test class
    ops: ClassVar[dict[str, Op]] = {**OPS, **TEST_OPS}

    def run(self, op: Op, args: Any) -> Any:
        if op.name == "sleep":
            time.sleep(args.seconds)
            return None
        if op.name == "segfault":
            ctypes.string_at(0)
        return super().run(op, args)


class TestingWorkerEngine(WorkerEngine):
    """A ``WorkerEngine`` whose worker also answers ``TEST_OPS``."""

    __test__ = False  # not a pytest test class

    server_args = ("--testing",)

    def sleep_for_test(self, seconds: float) -> None:
        """Keep the worker busy for ``seconds``."""
        self._request(TEST_OPS["sleep"], seconds=seconds)

    def crash_for_test(self) -> None:
        """Make the worker segfault on purpose."""
        self._request(TEST_OPS["segfault"])
