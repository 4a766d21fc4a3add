"""engine/placement_cache.py: the placement probe's findings reused on the exact key only, and by the
real worker across processes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from pytest_kvquality.cache_config import CacheConfig
from pytest_kvquality.engine.client import WorkerEngine
from pytest_kvquality.engine.placement_cache import PlacementCache
from pytest_kvquality.engine.protocol import ModelLoad

KEY = {"model": ["/m.gguf", 1, 2], "cache": "q4_0", "n_ctx": 512}


def test_facts_come_back_for_the_same_key_only(tmp_path: Path) -> None:
    store = PlacementCache(tmp_path)
    assert store.get(KEY) is None
    store.put(KEY, {"kv_devices": ["CUDA0"]})
    assert store.get(dict(KEY)) == {"kv_devices": ["CUDA0"]}
    assert store.get({**KEY, "n_ctx": 1024}) is None
    assert store.get({**KEY, "cache": "q8_0"}) is None


def test_a_file_holding_another_key_or_damaged_is_not_read(tmp_path: Path) -> None:
    store = PlacementCache(tmp_path)
    store.put(KEY, {"kv_devices": ["CUDA0"]})
    (path,) = tmp_path.iterdir()
    doc = json.loads(path.read_text())
    path.write_text(json.dumps({**doc, "key": doc["key"].replace("q4_0", "q8_0")}))  # a hash collision
    assert store.get(KEY) is None
    path.write_text(path.read_text()[:10])
    assert store.get(KEY) is None


def test_a_cache_that_cannot_be_written_costs_nothing_but_a_probe(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    store = PlacementCache(blocker / "sub")
    store.put(KEY, {"kv_devices": ["CPU"]})
    assert store.get(KEY) is None


@pytest.mark.real_model
def test_the_worker_reuses_a_probe_across_processes_and_probes_again_for_another_geometry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, gemma: ModelLoad
) -> None:
    model = ModelLoad(gemma.path, 0)
    env = {**os.environ, "KVQ_CACHE_DIR": str(tmp_path), "KVQ_PLACEMENT_PROBE": "1", "CUDA_VISIBLE_DEVICES": ""}
    tokens = np.arange(1, 65, dtype=np.int32)

    def facts(n_ctx: int) -> dict[str, object]:
        engine = WorkerEngine(tmp_path / "logs", env=env)
        try:
            return engine.speed(model, CacheConfig.parse("q8_0"), n_ctx, "pp", tokens).context.to_dict()
        finally:
            engine.close()

    first = facts(128)
    assert first["kv_devices"] == ["CPU"]
    (stored,) = (tmp_path / "placement").iterdir()
    doc = json.loads(stored.read_text())
    doc["facts"]["kv_devices"] = ["READ-FROM-CACHE"]
    stored.write_text(json.dumps(doc))
    assert facts(128)["kv_devices"] == ["READ-FROM-CACHE"]  # a new process did not probe again
    assert facts(256)["kv_devices"] == ["CPU"]  # another geometry: probed
