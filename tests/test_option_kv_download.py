"""--kv-download: a repository model is fetched only when asked"""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import GATES


def test_a_repository_model_is_fetched_only_when_asked(kv_project: pytest.Pytester, fake_model: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """`--kv-model owner/repo:QUANT`: a usage error naming every place looked, until --kv-download
    fetches it into the hub cache; then the gates run on it."""
    from hub_fixtures import HubFile, fake_hub

    kv_project.makefile(".yaml", gates=GATES.replace("  tiny:", "  acme/tiny-GGUF:Q4_K_M:"))
    args = ["--kv-model", "acme/tiny-GGUF:q4_k_m", "--kv-thresholds", "gates.yaml", "--kv-chunks", "8"]
    with fake_hub() as hub:
        hub.repos["acme/tiny-GGUF"] = {"tiny-Q4_K_M.gguf": HubFile(fake_model.read_bytes())}
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        result = kv_project.runpytest(*args)
        assert result.ret == pytest.ExitCode.USAGE_ERROR
        assert "--kv-model acme/tiny-GGUF:q4_k_m: model acme/tiny-GGUF:Q4_K_M is not on this machine" in \
            result.stderr.str()
        assert "tiny-gguf: {path: /path/to/model.gguf}" in result.stderr.str()
        assert "--kv-download" in result.stderr.str() and hub.gets == []
        result = kv_project.runpytest(*args, "--kv-download")
        assert [name for name, _ in hub.gets] == ["tiny-Q4_K_M.gguf"]
    result.assert_outcomes(passed=3, failed=1)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["note: model acme/tiny-GGUF:Q4_K_M: acme/tiny-GGUF:Q4_K_M is */models--acme--tiny-GGUF"
                                 "/snapshots/*/tiny-Q4_K_M.gguf, found in the Hugging Face hub cache *"])
    # the hub is gone: offline, every xdist worker finds the downloaded copy, and the failing gate still fails
    pytest.importorskip("xdist")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    parallel = kv_project.runpytest_subprocess(*args, "-n", "2", "--dist", "loadgroup")
    parallel.assert_outcomes(passed=3, failed=1)
    assert parallel.ret == pytest.ExitCode.TESTS_FAILED
