"""Models named owner/repo:QUANT: found where each tool keeps them, fetched only when asked, and
never used when their bytes are not what the hub or the registry says."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import isolate_model_caches
from hub_fixtures import COMMIT, HubFile, fake_hub, flat_layout, hub_layout, ollama_layout, sha256_of

from pytest_kvquality.download import DownloadError, download
from pytest_kvquality.hub import HubRef, Search, find_local, parse_ref
from pytest_kvquality.registry import ModelNotFound, Registry
from pytest_kvquality.resolve import resolve

REPO = "ggml-org/gemma-3-270m-GGUF"
FILE = "gemma-3-270m-Q4_K_M.gguf"


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    home = tmp_path / "home"
    isolate_model_caches(monkeypatch, home)
    return {"HOME": str(home)}


def test_names_in_llama_cpps_hf_syntax() -> None:
    assert parse_ref("unsloth/Qwen3.6-35B-A3B-GGUF:q4_k_m") == HubRef("unsloth/Qwen3.6-35B-A3B-GGUF", quant="Q4_K_M")
    assert parse_ref("unsloth/Qwen3.6-35B-A3B-GGUF") == HubRef("unsloth/Qwen3.6-35B-A3B-GGUF")
    assert parse_ref(f"{REPO}/{FILE}") == HubRef(REPO, file=FILE)
    for local in ("gemma3-270m", "models/tiny.gguf", "./a/b", "/abs/x.gguf", "~/m.gguf"):
        assert parse_ref(local) is None, local


def test_a_quant_picks_the_file_llama_cpp_would_load() -> None:
    files = ["README.md", "mmproj-Q4_K_M.gguf", "Qwen-UD-Q4_K_M.gguf", "Qwen-Q4_K_M.gguf", "Qwen-Q4_K_S.gguf",
             "Qwen-Q8_0-00002-of-00002.gguf", "Qwen-Q8_0-00001-of-00002.gguf", "Qwen-IQ4_K_M.gguf"]
    assert HubRef("o/r", quant="Q4_K_M").pick(files) == "Qwen-Q4_K_M.gguf"  # not UD-, IQ4, mmproj
    assert HubRef("o/r").pick(files) == "Qwen-Q4_K_M.gguf"  # llama.cpp's default tag
    assert HubRef("o/r", quant="Q8_0").pick(files) == "Qwen-Q8_0-00001-of-00002.gguf"  # the first part
    assert HubRef("o/r", quant="Q2_K").pick(files) is None


@pytest.mark.parametrize("tool", ["hf", "llama.cpp", "llama.cpp-former", "lmstudio", "ollama"])
def test_each_tools_cache_is_found(tool: str, env: dict[str, str], fake_model: Path, tmp_path: Path) -> None:
    home = Path(env["HOME"])
    if tool == "hf":
        expected = hub_layout(home / ".cache" / "huggingface" / "hub", REPO, FILE, fake_model)
    elif tool == "llama.cpp":  # today's llama.cpp: the hub layout under LLAMA_CACHE
        env["LLAMA_CACHE"] = str(tmp_path / "llama-cache")
        expected = hub_layout(tmp_path / "llama-cache", REPO, FILE, fake_model)
    elif tool == "llama.cpp-former":
        expected = flat_layout(home / ".cache" / "llama.cpp", f"ggml-org_gemma-3-270m-GGUF_{FILE}", fake_model)
    elif tool == "lmstudio":
        expected = flat_layout(home / ".lmstudio" / "models" / REPO, FILE, fake_model)
    else:
        env["OLLAMA_MODELS"] = str(tmp_path / "ollama")
        expected = ollama_layout(tmp_path / "ollama", REPO, "Q4_K_M", fake_model)
    found = find_local(HubRef(REPO, quant="Q4_K_M"), env, Search())
    assert found is not None and found.path == expected
    if tool in ("hf", "llama.cpp", "ollama"):  # the place states the sha256: not hashed again
        assert found.sha256 == sha256_of(fake_model)
    model = resolve(f"{REPO}:Q4_K_M", Registry(), tmp_path / "cache", env)
    assert model.path == expected and model.sha256 == sha256_of(fake_model)
    assert model.alias == f"{REPO}:Q4_K_M" and f"{REPO}:Q4_K_M is {expected}, found in " in model.found_in


def test_the_hub_cache_comes_first_and_a_pinned_hash_is_checked(env: dict[str, str], fake_model: Path,
                                                               tmp_path: Path) -> None:
    home = Path(env["HOME"])
    lm = flat_layout(home / ".lmstudio" / "models" / REPO, FILE, fake_model)
    hf = hub_layout(home / ".cache" / "huggingface" / "hub", REPO, FILE, fake_model)
    assert resolve(f"{REPO}:Q4_K_M", Registry(), tmp_path / "cache", env).path == hf
    registry = tmp_path / "models.yaml"
    registry.write_text(f"version: 1\nmodels:\n  tiny:\n    hf: {REPO}\n    quant: Q4_K_M\n"
                        f"    sha256: '{'ab' * 32}'\n")
    with pytest.raises(ModelNotFound, match=f"has sha256 {sha256_of(fake_model)}, the registry pins {'ab' * 32}"):
        resolve("tiny", Registry.load([registry]), tmp_path / "cache", env)
    registry.write_text(f"version: 1\nmodels:\n  tiny: {{hf: {REPO}, quant: Q4_K_M, sha256: '{sha256_of(lm)}'}}\n")
    model = resolve("tiny", Registry.load([registry]), tmp_path / "cache", env)
    assert model.alias == "tiny" and model.path == hf
    # the repository name alone finds the registry's alias, so its thresholds apply
    assert Registry.load([registry]).alias_of(f"{REPO}:Q4_K_M") == "tiny"


def test_a_split_model_needs_every_part(env: dict[str, str], fake_model: Path, tmp_path: Path) -> None:
    folder = Path(env["HOME"]) / ".lmstudio" / "models" / REPO
    first = flat_layout(folder, "m-Q4_K_M-00001-of-00002.gguf", fake_model)
    ref = f"{REPO}:Q4_K_M"
    with pytest.raises(ModelNotFound, match="is not on this machine"):
        resolve(ref, Registry(), tmp_path / "cache", env)
    (folder / "m-Q4_K_M-00002-of-00002.gguf").write_bytes(b"second part")
    model = resolve(ref, Registry(), tmp_path / "cache", env)
    assert model.path == first and model.sha256 != sha256_of(fake_model)  # keyed by every part
    (folder / "m-Q4_K_M-00002-of-00002.gguf").write_bytes(b"another second part")
    assert resolve(ref, Registry(), tmp_path / "cache", env).sha256 != model.sha256


def test_download_fetches_into_the_hub_cache_and_offline_finds_it(env: dict[str, str], fake_model: Path,
                                                                  tmp_path: Path, capfd: pytest.CaptureFixture[str],
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TQDM_POSITION", "-1")  # the hub shows its bar on a terminal; here, force it
    with fake_hub() as hub:
        hub.repos[REPO] = {FILE: HubFile(fake_model.read_bytes()), "README.md": HubFile(b"hello")}
        env["HF_ENDPOINT"] = hub.url
        with pytest.raises(ModelNotFound, match="Fetch it: pytest --kv-model"):  # not without being asked
            resolve(f"{REPO}:Q4_K_M", Registry(), tmp_path / "cache", env)
        assert hub.gets == []
        env["HF_TOKEN"] = "hf_test_token_for_a_gated_repository"
        model = resolve(f"{REPO}:Q4_K_M", Registry(), tmp_path / "cache", env, download=True)
        assert hub.gets == [(FILE, None)]
        assert hub.tokens and all(t == "Bearer hf_test_token_for_a_gated_repository" for t in hub.tokens)
    hub_root = Path(env["HOME"]) / ".cache" / "huggingface" / "hub"
    assert model.path == hub_root / f"models--{REPO.replace('/', '--')}" / "snapshots" / COMMIT / FILE
    assert model.sha256 == sha256_of(fake_model) and "downloaded from http://127.0.0.1" in model.found_in
    assert "100%" in capfd.readouterr().err  # the hub's progress bar
    env["HF_HUB_OFFLINE"] = "1"  # the server is gone: the cache is enough
    assert resolve(f"{REPO}:Q4_K_M", Registry(), tmp_path / "cache", env, download=True).path == model.path


def test_a_file_whose_bytes_are_not_the_hubs_hash_is_refused_and_removed(env: dict[str, str], fake_model: Path,
                                                                           tmp_path: Path) -> None:
    honest = sha256_of(fake_model)
    with fake_hub() as hub:
        hub.repos[REPO] = {FILE: HubFile(fake_model.read_bytes()[:-1] + b"!", lfs_sha256=honest)}
        env["HF_ENDPOINT"] = hub.url
        with pytest.raises(DownloadError) as e:
            download(HubRef(REPO, quant="Q4_K_M"), env, tmp_path / "cache")
    assert f"the hub's LFS sha256 is {honest}" in str(e.value) and "is not used" in str(e.value)
    assert find_local(HubRef(REPO, quant="Q4_K_M"), env, Search()) is None  # not left for the next run


def test_an_interrupted_download_resumes(env: dict[str, str], tmp_path: Path) -> None:
    data = bytes(range(256)) * (96 * 1024)  # 24 MiB: the hub client writes 10 MiB blocks as they arrive
    with fake_hub() as hub:
        hub.repos[REPO] = {FILE: HubFile(data)}
        hub.cut_after = 15 * 2**20
        env["HF_ENDPOINT"] = hub.url
        try:
            found = download(HubRef(REPO, quant="Q4_K_M"), env, tmp_path / "cache")
        except DownloadError as e:  # the client gave up: the next run resumes
            assert "run again to resume" in str(e)
            found = download(HubRef(REPO, quant="Q4_K_M"), env, tmp_path / "cache")
    assert found.sha256 == hashlib.sha256(data).hexdigest()
    (_, first), (_, resumed) = hub.gets
    assert first is None and resumed is not None and int(resumed.split("=")[1].rstrip("-")) >= 10 * 2**20


def test_two_processes_download_once(env: dict[str, str], fake_model: Path, tmp_path: Path) -> None:
    code = ("import os, sys; from pathlib import Path; from pytest_kvquality.download import download; "
            "from pytest_kvquality.hub import HubRef; "
            f"print(download(HubRef({REPO!r}, quant='Q4_K_M'), os.environ, Path(sys.argv[1])).path)")
    with fake_hub() as hub:
        hub.repos[REPO] = {FILE: HubFile(fake_model.read_bytes() * 40_000)}  # 12 MB: the two overlap
        full = {**os.environ, **env, "HF_ENDPOINT": hub.url}
        procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / f"cache{i}")], env=full,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
        outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert outs[0][0] == outs[1][0]
    assert [name for name, _ in hub.gets] == [FILE]


def test_a_repository_without_the_quant_says_what_it_has(env: dict[str, str], fake_model: Path,
                                                          tmp_path: Path) -> None:
    with fake_hub() as hub:
        hub.repos[REPO] = {"gemma-3-270m-Q8_0.gguf": HubFile(b"GGUF")}
        env["HF_ENDPOINT"] = hub.url
        with pytest.raises(ModelNotFound, match=r"has no GGUF for .*Q4_K_M; its GGUF files: gemma-3-270m-Q8_0\.gguf"):
            resolve(f"{REPO}:Q4_K_M", Registry(), tmp_path / "cache", env, download=True)
        with pytest.raises(ModelNotFound, match="cannot list the files of nobody/nothing"):
            resolve("nobody/nothing:Q4_K_M", Registry(), tmp_path / "cache", env, download=True)
        env["HF_HUB_OFFLINE"] = "1"
        with pytest.raises(ModelNotFound, match="HF_HUB_OFFLINE is set"):
            resolve(f"{REPO}:Q4_K_M", Registry(), tmp_path / "cache", env, download=True)
