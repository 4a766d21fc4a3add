"""engine/rpc.py and the options around it: --kv-rpc parsed, a server checked by its handshake with a
bounded wait, public addresses warned about, a silent model worker stopped, GPUs grouped per worker."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from rpc_servers import fake_server, free_port, hello_reply, silent

from pytest_kvquality.engine.client import worker_gpu_env
from pytest_kvquality.engine.protocol import EngineError
from pytest_kvquality.engine.rpc import (
    RPC_PROTO_MAJOR,
    RPC_PROTO_MINOR,
    RpcError,
    RpcServer,
    check_server,
    is_private,
    parse_servers,
)
from pytest_kvquality.state import rpc_warnings
from pytest_kvquality.testing import TestingWorkerEngine

ROOT = Path(__file__).resolve().parent.parent


def test_servers_are_parsed_and_a_bad_one_is_named() -> None:
    assert parse_servers("10.0.0.2:50052, gpu-box:50053") == (RpcServer("10.0.0.2", 50052),
                                                               RpcServer("gpu-box", 50053))
    assert RpcServer("gpu-box", 7).endpoint == "gpu-box:7"
    for bad in ("10.0.0.2", "host:port", ":50052", "h:0", "h:70000"):
        with pytest.raises(ValueError, match="expected HOST:PORT"):
            parse_servers(bad)
    for ipv6 in ("[::1]:50052", "fe80::1:50052"):  # llama.cpp's client would split these at the first colon
        with pytest.raises(ValueError, match="IPv4 only"):
            parse_servers(ipv6)
    with pytest.raises(ValueError, match="named twice"):
        parse_servers("h:1,h:1")


def test_private_and_public_addresses() -> None:
    for host in ("127.0.0.1", "localhost", "10.1.2.3", "192.168.0.9", "172.16.4.4", "::1", "fe80::1"):
        assert is_private(host), host
    for host in ("8.8.8.8", "2606:4700::1111"):
        assert not is_private(host), host
    assert rpc_warnings("127.0.0.1:50052,192.168.1.2:50052") == []
    (warning,) = rpc_warnings("127.0.0.1:1,8.8.8.8:50052")
    assert "8.8.8.8:50052 is not on loopback or a private network" in warning


def test_the_protocol_version_is_that_of_the_build_tree() -> None:
    headers = list((ROOT / ".build" / "src").glob("*/vendor/llama.cpp/ggml/include/ggml-rpc.h"))
    if not headers:
        pytest.skip("no llama.cpp source tree in .build (scripts/install-llama.sh unpacks it)")
    text = headers[0].read_text()
    assert re.search(rf"#define RPC_PROTO_MAJOR_VERSION\s+{RPC_PROTO_MAJOR}\b", text)
    assert re.search(rf"#define RPC_PROTO_MINOR_VERSION\s+{RPC_PROTO_MINOR}\b", text)


def test_a_server_of_this_protocol_passes_the_handshake() -> None:
    with fake_server(hello_reply(RPC_PROTO_MAJOR, RPC_PROTO_MINOR, 3)) as port:
        assert check_server(RpcServer("127.0.0.1", port)) == (RPC_PROTO_MAJOR, RPC_PROTO_MINOR, 3)


def test_servers_that_cannot_serve_fail_with_the_reason_within_the_timeout() -> None:
    with pytest.raises(RpcError, match="refused the connection"):
        check_server(RpcServer("127.0.0.1", free_port()))
    with fake_server(hello_reply(RPC_PROTO_MAJOR - 1)) as port, pytest.raises(
            RpcError, match=f"speaks RPC protocol {RPC_PROTO_MAJOR - 1}.0.0; .* speaks {RPC_PROTO_MAJOR}.0"):
        check_server(RpcServer("127.0.0.1", port))
    with fake_server(hello_reply(RPC_PROTO_MAJOR, RPC_PROTO_MINOR + 1)) as port, pytest.raises(
            RpcError, match="speaks RPC protocol"):
        check_server(RpcServer("127.0.0.1", port))
    with fake_server(lambda conn: conn.close()) as port, pytest.raises(RpcError, match="closed the connection"):
        check_server(RpcServer("127.0.0.1", port))
    with fake_server(silent) as port:
        t = time.monotonic()
        with pytest.raises(RpcError, match=r"did not answer within 0\.5 s"):
            check_server(RpcServer("127.0.0.1", port), timeout=0.5)
        assert time.monotonic() - t < 5


def test_a_silent_model_worker_is_stopped_after_the_reply_timeout(tmp_path: Path) -> None:
    engine = TestingWorkerEngine(tmp_path)
    try:
        engine.sleep_for_test(0.1)  # started without the timeout: on a GPU host CUDA's start-up alone takes ~1 s
        engine.reply_timeout = 1.0
        engine.sleep_for_test(0.1)  # a quick reply is fine
        t = time.monotonic()
        with pytest.raises(EngineError, match="no word from the model worker for 1 s while"):
            engine.sleep_for_test(30)
        assert time.monotonic() - t < 10
        engine.reply_timeout = None
        engine.sleep_for_test(0.1)  # a fresh worker serves the next call
    finally:
        engine.close()


@pytest.mark.parametrize(("per_worker", "expected"), [
    (1, {"gw0": "0", "gw1": "1", "gw2": "2", "gw4": "0"}),
    (2, {"gw0": "0,1", "gw1": "2,3", "gw2": "0,1"}),
    (3, {"gw0": "0,1,2", "gw1": "0,1,2"}),  # one group of three, shared
    (4, {"gw0": None}),
    (8, {"gw0": None}),                  # more than there are: all of them
])
def test_gpus_are_handed_out_in_groups_per_xdist_worker(tmp_path: Path, per_worker: int,
                                                          expected: dict[str, str | None]) -> None:
    gpus = tmp_path / "gpus"
    for i in range(4):
        (gpus / f"0000:0{i}:00.0").mkdir(parents=True)
    for worker, devices in expected.items():
        env = worker_gpu_env({}, worker, gpus, per_worker=per_worker)
        assert env.get("CUDA_VISIBLE_DEVICES") == devices, (per_worker, worker)
