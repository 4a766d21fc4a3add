"""--kv-rpc, --kv-split, --kv-tensor-split, --kv-gpus-per-worker: checked when read, carried to the model
load, recorded in each result; a server outside the private ranges is warned about (nothing is sent
to it by the check). The servers themselves: test_rpc.py and test_real_rpc.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import ARGS


def results(kv_project: pytest.Pytester) -> list[dict[str, object]]:
    return [r for r in json.loads((kv_project.path / "out.json").read_text())["results"] if r["category"] == "overall"]


def test_the_spread_is_recorded_in_each_result(kv_project: pytest.Pytester, fake_model: Path) -> None:
    run = kv_project.runpytest("--kv-model", str(fake_model), "--kv-cache", "q8_0", *ARGS, "--kv-json", "out.json",
                               "--kv-thresholds", str(kv_project.path), "--kv-rpc", "127.0.0.1:50052,10.0.0.7:50052",
                               "--kv-split", "row", "--kv-tensor-split", "3,1")
    assert run.ret == pytest.ExitCode.OK
    (r,) = results(kv_project)
    assert r["rpc_servers"] == ["127.0.0.1:50052", "10.0.0.7:50052"]
    assert (r["split_mode"], r["tensor_split"]) == ("row", "3,1")
    assert "not on loopback" not in run.stdout.str()
    run.stdout.fnmatch_lines(["tiny (n_ctx 64, * RPC servers 127.0.0.1:50052, 10.0.0.7:50052, split row 3,1)"])


def test_a_public_server_is_warned_about(kv_project: pytest.Pytester, fake_model: Path) -> None:
    run = kv_project.runpytest("--kv-model", str(fake_model), "--kv-cache", "q8_0", *ARGS, "--kv-json", "out.json",
                               "--kv-thresholds", str(kv_project.path), "--kv-rpc", "8.8.8.8:50052")
    run.stdout.fnmatch_lines(["*--kv-rpc server 8.8.8.8:50052 is not on loopback or a private network*"])
    notes = json.loads((kv_project.path / "out.json").read_text())["notes"]
    assert any("8.8.8.8:50052" in n for n in notes)


@pytest.mark.parametrize(("args", "message"), [
    (["--kv-rpc", "gpu-box"], "--kv-rpc 'gpu-box': expected HOST:PORT"),
    (["--kv-tensor-split", "3,x"], "--kv-tensor-split '3,x': expected shares such as 3,1"),
    (["--kv-tensor-split", "0,0"], "--kv-tensor-split '0,0'"),
    (["--kv-split", "diagonal"], "argument --kv-split: invalid choice: 'diagonal'"),
    (["--kv-gpus-per-worker", "0"], "--kv-gpus-per-worker must be >= 1, got 0"),
    (["--kv-rpc-timeout", "0"], "--kv-rpc-timeout must be >= 1, got 0"),
])
def test_bad_values_are_usage_errors(kv_project: pytest.Pytester, fake_model: Path, args: list[str],
                                     message: str) -> None:
    run = kv_project.runpytest(f"--kv-model={fake_model}", *args)
    assert run.ret == pytest.ExitCode.USAGE_ERROR
    assert message in run.stderr.str()
