"""Helpers for testing pytest-kvquality itself and plugins built on it: the fake engine
(``engine/fake.py``) and the worker client with test-only operations (``engine/testing.py``).

In a conftest::

    from pytest_kvquality.testing import FakeEngine

    def pytest_kvquality_make_engine(config):
        return FakeEngine()
"""

from .engine.fake import (
    CONFTEST,
    FAKE_BOS,
    FAKE_KV,
    FAKE_VOCAB,
    FAKE_WEIGHT_NOISE,
    NOISE,
    FakeBackend,
    FakeContext,
    FakeEngine,
    FakeModel,
    write_fake_gguf,
)
from .engine.testing import TestingWorkerEngine

__all__ = ["CONFTEST", "FAKE_BOS", "FAKE_KV", "FAKE_VOCAB", "FAKE_WEIGHT_NOISE", "NOISE", "FakeBackend",
           "FakeContext", "FakeEngine", "FakeModel", "TestingWorkerEngine", "write_fake_gguf"]
