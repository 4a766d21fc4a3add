"""Hooks that pytest-kvquality offers to conftest files and other plugins."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from .engine.protocol import Engine


@pytest.hookspec(firstresult=True)
def pytest_kvquality_make_engine(config: pytest.Config) -> Engine | None:  # type: ignore[empty-body]
    """Return the engine that evaluates models; ``None`` keeps the llama.cpp worker.

    A conftest returns ``pytest_kvquality.testing.FakeEngine()`` here to test
    thresholds and reports without a model.
    """

