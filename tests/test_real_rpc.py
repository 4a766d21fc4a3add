"""--kv-rpc on loopback: a ggml-rpc-server of this build (CPU device) on 127.0.0.1 holds half of the
bundled model's layers and their KV cache; the numbers equal a local run's bit for bit, the results
say where each layer went, and a server that dies or hangs mid-evaluation fails with the reason in
bounded time."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from rpc_servers import Proxy, fake_server, free_port, hello_reply, rpc_server

from pytest_kvquality.cache_config import CacheConfig
from pytest_kvquality.corpus import builtin_corpus, chunk_tokens
from pytest_kvquality.engine.client import WorkerEngine
from pytest_kvquality.engine.protocol import EngineError, ModelLoad, WorkerCrash
from pytest_kvquality.engine.rpc import RPC_PROTO_MAJOR
from pytest_kvquality.environment import cpu_threads

pytestmark = pytest.mark.real_model

N_CTX = 512
#: of Gemma 3 270M's 18 layers (llama.cpp offloads the last ones, with the output layer: 9 + 1)
RPC_LAYERS = 10


@pytest.fixture(scope="module")
def model_path(gemma: ModelLoad) -> str:
    return gemma.path


@pytest.fixture(scope="module")
def server() -> Iterator[int]:
    with rpc_server(threads=cpu_threads()) as (port, _):
        yield port


#: the model worker sees no GPU of its own, so on a GPU host too the local run and the server's layers
#: use the same CPU kernels
NO_GPU = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerEngine]:
    e = WorkerEngine(tmp_path_factory.mktemp("rpc-logs"), env=NO_GPU)
    yield e
    e.close()


@pytest.fixture(scope="module")
def chunks(engine: WorkerEngine, model_path: str):  # type: ignore[no-untyped-def]
    tokens = engine.tokenize(ModelLoad(model_path, 0), builtin_corpus().texts["science"])
    return chunk_tokens(tokens, N_CTX, 1, "science")


def test_layers_on_an_rpc_server_give_the_numbers_of_a_local_run(engine: WorkerEngine, model_path: str,
                                                                 server: int, chunks) -> None:  # type: ignore[no-untyped-def]
    """A q8_0 evaluation with 10 of 19 layers (and their quantized KV cache) on the server: every
    per-token value equals the local run's, bit for bit."""
    local = ModelLoad(model_path, 0)
    remote = ModelLoad(model_path, RPC_LAYERS, rpc=f"127.0.0.1:{server}")
    ref = engine.reference(local, CacheConfig.parse("f16"), chunks, seed=0).rows
    q8 = CacheConfig.parse("q8_0")
    t = time.perf_counter()
    cand_local = engine.evaluate(local, q8, chunks, ref)
    t_local = time.perf_counter() - t
    t = time.perf_counter()
    cand_remote = engine.evaluate(remote, q8, chunks, ref)
    t_remote = time.perf_counter() - t
    for name in ("kld", "p_diff", "nll", "nll_base", "same_top"):
        assert np.array_equal(getattr(cand_local.stats, name), getattr(cand_remote.stats, name)), name
    facts = cand_remote.context
    endpoint = f"127.0.0.1:{server}"
    assert facts.rpc_servers == (endpoint,)
    assert any(w.startswith(f"RPC0[{endpoint}]") for w in facts.weight_devices or ()), facts.weight_devices
    assert facts.kv_layer_devices == ("CPU: layers 0-8", "RPC0: layers 9-17"), facts.kv_layer_devices
    assert cand_local.context.kv_layer_devices == ("CPU: layers 0-17",)
    print(f"q8_0 evaluation of 1 x {N_CTX}: local {t_local:.2f} s, half the layers over RPC {t_remote:.2f} s")


def test_an_unreachable_or_mismatched_server_fails_at_once_and_the_worker_survives(
    engine: WorkerEngine, model_path: str, chunks  # type: ignore[no-untyped-def]
) -> None:
    nobody = ModelLoad(model_path, RPC_LAYERS, rpc=f"127.0.0.1:{free_port()}")
    t = time.monotonic()
    with pytest.raises(EngineError, match="refused the connection: is ggml-rpc-server running there"):
        engine.reference(nobody, CacheConfig.parse("f16"), chunks, seed=0)
    assert time.monotonic() - t < 30
    with fake_server(hello_reply(RPC_PROTO_MAJOR + 1)) as port, pytest.raises(
            EngineError, match=f"speaks RPC protocol {RPC_PROTO_MAJOR + 1}.0.0; this llama-cpp-python's llama.cpp"):
        engine.reference(ModelLoad(model_path, RPC_LAYERS, rpc=f"127.0.0.1:{port}"), CacheConfig.parse("f16"),
                         chunks, seed=0)
    assert engine.tokenize(ModelLoad(model_path, 0), "still here").size > 0


@pytest.mark.parametrize("mode", ["cut", "stall"])
def test_a_server_that_dies_or_hangs_mid_evaluation_fails_the_evaluation(
    tmp_path: Path, model_path: str, chunks, mode: str  # type: ignore[no-untyped-def]
) -> None:
    with rpc_server(threads=cpu_threads()) as (port, _):
        proxy = Proxy(port, mode, after=1)  # the chunk's first decode, right after the load
        # a dead server is seen at once (the socket closes); a silent one only by the reply timeout,
        # which must outlast the load and the context (~4 s on the 2-core machine; over 10 s once,
        # with other llama.cpp runs beside the suite's two workers)
        engine = WorkerEngine(tmp_path, env=NO_GPU, reply_timeout=20.0 if mode == "stall" else None)
        try:
            t = time.monotonic()
            remote = ModelLoad(model_path, RPC_LAYERS, rpc=f"127.0.0.1:{proxy.port}")
            with pytest.raises(EngineError) as failed:
                engine.reference(remote, CacheConfig.parse("f16"), chunks, seed=0)
            assert proxy.tripped.is_set(), f"the evaluation ended before the proxy cut in: {failed.value}"
            assert time.monotonic() - t < 120
            if mode == "cut":  # llama.cpp aborts the worker: a crash, with its last words
                assert isinstance(failed.value, WorkerCrash)
                assert "llama.cpp aborted: ggml-rpc.cpp:" in str(failed.value), str(failed.value)
                assert "Remote RPC server crashed" in str(failed.value)
            else:
                assert "no word from the model worker for 20 s" in str(failed.value)
        finally:
            engine.close()
            proxy.close()
