"""Cache configs, threshold files, corpora, the reference file format and the registry."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from pytest_kvquality import corpus_gen
from pytest_kvquality.cache_config import CacheConfig, CacheConfigError
from pytest_kvquality.compaction import compact_reference
from pytest_kvquality.corpus import (
    BUILTIN_DIR,
    CorpusError,
    builtin_corpus,
    chunk_tokens,
    load_corpus,
)
from pytest_kvquality.reference import (
    ReferenceDamaged,
    ReferenceKey,
    read_reference,
    write_reference,
)
from pytest_kvquality.registry import ModelNotFound, Registry, RegistryError
from pytest_kvquality.resolve import resolve
from pytest_kvquality.testing import write_fake_gguf
from pytest_kvquality.thresholds import ThresholdError, load_thresholds

# ---------------------------------------------------------------- cache configs


@pytest.mark.parametrize(("text", "k", "v", "rot", "fa", "label"), [
    ("q4_0", "q4_0", "q4_0", True, True, "q4_0"),
    ("q8_0/q4_0", "q8_0", "q4_0", True, True, "q8_0/q4_0"),
    ("q4_0:norot", "q4_0", "q4_0", False, True, "q4_0:norot"),
    ("f16:nofa", "f16", "f16", True, False, "f16:nofa"),
    ("Q8_0/IQ4_NL:norot", "q8_0", "iq4_nl", False, True, "q8_0/iq4_nl:norot"),
])
def test_cache_config_spellings(text: str, k: str, v: str, rot: bool, fa: bool, label: str) -> None:
    c = CacheConfig.parse(text)
    assert (c.type_k, c.type_v, c.rotation, c.flash_attn, c.label) == (k, v, rot, fa, label)
    assert CacheConfig.parse(c.label) == c


@pytest.mark.parametrize(("text", "message"), [
    ("q3_0", "unknown KV cache type 'q3_0'"),
    ("q4_0:nofa", "quantized V cache (q4_0) needs flash attention"),
    ("q4_0:fast", "unknown suffix ':fast'"),
    ("q8_0/q4_0/f16", "expected 'K' or 'K/V'"),
])
def test_bad_cache_configs_say_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(CacheConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        CacheConfig.parse(text)


def test_quantized_k_with_f16_v_may_run_without_flash_attention() -> None:
    assert CacheConfig.parse("q8_0/f16:nofa").flash_attn is False


# ---------------------------------------------------------------- thresholds

CATS = ["coding", "science", "tool_calling", "long_documents"]


def known(name: str) -> str | None:
    return Registry().canonical(name) if Registry().lookup(name) else None


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "t.yaml"
    p.write_text(text)
    return p


def test_threshold_file_from_the_readme_loads(tmp_path: Path) -> None:
    p = write(tmp_path, """
version: 1
models:
  gemma3-270m:
    q4_0:
      overall: {kl_mean: "< 0.25", top1: "> 0.75"}
      long_documents: {kl_mean: "<= 0.40"}
    q8_0/q4_0:norot:
      coding: {kl_p99: "< 1.5"}
""")
    ts = load_thresholds(p, known, CATS)
    assert [t.test_id for t in ts] == [
        "gemma3-270m::q4_0::overall::kl_mean", "gemma3-270m::q4_0::overall::top1",
        "gemma3-270m::q4_0::long_documents::kl_mean", "gemma3-270m::q8_0/q4_0:norot::coding::kl_p99",
    ]
    assert ts[1].passes(0.8) and not ts[1].passes(0.75)
    assert ts[2].passes(0.40) and not ts[2].passes(0.41)
    assert ts[0].line == 6


@pytest.mark.parametrize(("body", "line", "message"), [
    ("version: 1\nmodels:\n  gemma3-270m:\n    q4_0:\n      overall: {kl_mean: < 0.1\n",
     None, "YAML syntax error"),
    ("version: 2\nmodels: {}\n", 1, "unsupported version 2"),
    ("models: {}\n", 1, "version: missing"),
    ("version: 1\nmodels:\n  nobody:\n    q4_0: {overall: {kl_mean: '< 1'}}\n", 3,
     "models.nobody: unknown model"),
    ("version: 1\nmodels:\n  gemma3-270m:\n    q4_0: {overall: {kl_mean2: '< 1'}}\n", 4,
     "models.gemma3-270m.q4_0.overall.kl_mean2: unknown metric"),
    ("version: 1\nmodels:\n  gemma3-270m:\n    q4_0: {poetry: {kl_mean: '< 1'}}\n", 4,
     "models.gemma3-270m.q4_0.poetry: unknown category"),
    ("version: 1\nmodels:\n  gemma3-270m:\n    q4_0: {overall: {kl_mean: '~ 1'}}\n", 4,
     "expected '<', '<=', '>' or '>=' and a number"),
    ("version: 1\nmodels:\n  gemma3-270m:\n    q4_0: {overall: {kl_mean: '< abc'}}\n", 4,
     "threshold 'abc' is not a number"),
    ("version: 1\nmodels:\n  gemma3-270m:\n    q4_0: {overall: {kl_mean: 0.1}}\n", 4,
     "expected a quoted rule"),
    ("version: 1\nmodels:\n  gemma3-270m:\n    q4_0: {}\n    q4_0: {}\n", 5,
     "models.gemma3-270m.q4_0: duplicate key (first defined on line 4)"),
    ("version: 1\nmodels:\n  gemma3-270m:\n    q9_9: {}\n", 4, "unknown KV cache type 'q9_9'"),
])
def test_bad_threshold_files_name_file_line_key_and_reason(
    tmp_path: Path, body: str, line: int | None, message: str
) -> None:
    p = write(tmp_path, body)
    with pytest.raises(ThresholdError) as e:
        load_thresholds(p, known, CATS)
    assert str(p) in str(e.value)
    assert message in str(e.value)
    if line is not None:
        assert e.value.line == line


def test_threshold_files_never_construct_python_objects(tmp_path: Path) -> None:
    p = write(tmp_path, "version: !!python/object/apply:os.system ['echo hi']\nmodels: {}\n")
    with pytest.raises(Exception) as e:
        load_thresholds(p, known, CATS)
    assert "python/object" in str(e.value)


def test_shipped_threshold_files_are_valid() -> None:
    shipped = Path(__file__).parent.parent / "thresholds"
    files = sorted(shipped.glob("*.yaml"))
    assert files
    for f in files:
        assert load_thresholds(f, known, CATS)


# ---------------------------------------------------------------- corpus


def test_builtin_corpus_is_regenerated_byte_for_byte(tmp_path: Path) -> None:
    corpus_gen.write(tmp_path)
    for name in ("coding", "science", "tool_calling", "long_documents"):
        assert (tmp_path / f"{name}.txt").read_bytes() == (BUILTIN_DIR / f"{name}.txt").read_bytes()


def test_builtin_corpus_has_four_categories_and_long_documents() -> None:
    c = builtin_corpus()
    assert c.categories == ["coding", "science", "tool_calling", "long_documents"]
    docs = c.texts["long_documents"].split("Operations manual ")[1:]
    # at least 8k tokens each: Gemma's tokenizer gives < 4.5 bytes per token on this text
    assert len(docs) >= 2 and all(len(d) > 8_000 * 4.5 for d in docs)
    assert json.loads(c.texts["tool_calling"].split("\n}\n")[0] + "\n}")["messages"]


def test_user_corpus_jsonl_and_text(tmp_path: Path) -> None:
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "legal.txt").write_text("Article 1. " * 10)
    (tmp_path / "c" / "mixed.jsonl").write_text(
        '{"text": "a b c", "category": "chat"}\n\n{"text": "d e f"}\n{"text": "g", "category": "chat"}\n'
    )
    c = load_corpus(tmp_path / "c")
    assert c.texts == {"legal": "Article 1. " * 10, "chat": "a b c\n\ng", "default": "d e f"}


@pytest.mark.parametrize(("name", "content", "message"), [
    ("bad.jsonl", b'{"category": "x"}\n', "needs a string field 'text'"),
    ("bad.jsonl", b"{not json\n", "not valid JSON"),
    ("latin.txt", "caf\u00e9".encode("latin-1"), "is not UTF-8"),
    ("empty.txt", b"  \n", "has no text"),
])
def test_bad_corpora_are_reported(tmp_path: Path, name: str, content: bytes, message: str) -> None:
    p = tmp_path / name
    p.write_bytes(content)
    with pytest.raises(CorpusError, match=message):
        load_corpus(p)


def test_chunking_follows_llama_perplexity() -> None:
    tokens = np.arange(10_000, dtype=np.int32)
    chunks = chunk_tokens(tokens, 512, None, "x")
    assert chunks.shape == (19, 512)  # partial last chunk dropped
    assert chunk_tokens(tokens, 512, 3, "x").shape == (3, 512)
    with pytest.raises(CorpusError, match="needs at least 1024"):
        chunk_tokens(tokens[:1000], 512, None, "x")


# ---------------------------------------------------------------- reference file


def make_reference(tmp_path: Path) -> tuple[Path, ReferenceKey, object]:
    rng = np.random.default_rng(0)
    rows = compact_reference(rng.standard_normal((20, 300)).astype(np.float32),
                             rng.integers(0, 300, 20), 16, 8, rng)
    key = ReferenceKey("a" * 64, "b" * 64, 64, "f16", "0.3.36", 16, 8, 0)
    path = tmp_path / "ref.kvqref"
    write_reference(path, key, rows, {"model": "m"})
    return path, key, rows


def test_reference_round_trip(tmp_path: Path) -> None:
    path, key, rows = make_reference(tmp_path)
    loaded, meta = read_reference(path, key)
    for name, arr in rows.arrays().items():  # type: ignore[attr-defined]
        assert np.array_equal(arr, loaded.arrays()[name])
    assert meta == {"model": "m"}
    assert [p.name for p in tmp_path.iterdir()] == ["ref.kvqref"]  # no temporary left behind


@pytest.mark.parametrize(("damage", "message"), [
    (lambda b: b[:-10], "truncated"),
    (lambda b: b[:-100] + bytes([b[-100] ^ 0x40]) + b[-99:], "checksum mismatch"),
    (lambda b: b[:7] + b"\x09" + b[8:], "reference format 9"),
    (lambda b: b"PK\x03\x04" + b[4:], "not a pytest-kvquality reference"),
])
def test_damaged_references_are_detected(tmp_path: Path, damage, message: str) -> None:  # type: ignore[no-untyped-def]
    path, key, _ = make_reference(tmp_path)
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(ReferenceDamaged, match=message):
        read_reference(path, key)


def test_reference_written_for_another_key_is_refused(tmp_path: Path) -> None:
    path, _key, _ = make_reference(tmp_path)
    other = ReferenceKey("a" * 64, "b" * 64, 64, "f16", "0.3.99", 16, 8, 0)
    with pytest.raises(ReferenceDamaged, match="differs in llama_cpp"):
        read_reference(path, other)


# ---------------------------------------------------------------- registry


def test_registry_aliases_paths_and_checks(tmp_path: Path) -> None:
    model = write_fake_gguf(tmp_path / "m" / "tiny.gguf")
    reg_file = tmp_path / "models.yaml"
    reg_file.write_text("version: 1\nmodels:\n  tiny-1b:\n    path: m/tiny.gguf\n    aliases: [tiny]\n")
    reg = Registry.load([reg_file])
    r = resolve("tiny", reg, tmp_path / "cache")
    assert (r.alias, r.path) == ("tiny-1b", model.resolve())
    assert resolve(str(model), reg, tmp_path / "cache").alias == "tiny-1b"  # path keeps its alias
    reg_file.write_text(f"version: 1\nmodels:\n  tiny-1b:\n    path: m/tiny.gguf\n    sha256: '{'0' * 64}'\n")
    with pytest.raises(ModelNotFound, match="registry expects 0000"):
        resolve("tiny-1b", Registry.load([reg_file]), tmp_path / "cache")


@pytest.mark.parametrize(("setup", "message"), [
    ("missing", "does not exist"),
    ("dir", "is a directory"),
    ("text", "is not a GGUF file"),
    ("alias", "is not registered and is not a path"),
    ("known", "(unsloth/Qwen3.6-35B-A3B-GGUF:Q4_K_M) is not on this machine. Looked in:"),
])
def test_unusable_models_are_explained(tmp_path: Path, setup: str, message: str) -> None:
    name = {"missing": str(tmp_path / "nope.gguf"), "dir": str(tmp_path), "alias": "llama-9000",
            "text": str(tmp_path / "notes.gguf"), "known": "qwen3.6-35b"}[setup]
    (tmp_path / "notes.gguf").write_text("hello")
    with pytest.raises(ModelNotFound, match=re.escape(message)):
        resolve(name, Registry(), tmp_path / "cache")


def test_bad_registry_file(tmp_path: Path) -> None:
    p = tmp_path / "r.yaml"
    p.write_text("version: 1\nmodels:\n  x: {sha256: abc}\n")
    with pytest.raises(RegistryError, match=r"models\.x needs a 'path'"):
        Registry.load([p])


def test_a_reference_write_killed_part_way_leaves_no_entry(tmp_path: Path) -> None:
    """SIGKILL while the file is being written (held in fsync): no cache entry a later run would read."""
    import signal
    import subprocess
    import sys
    import time

    target = tmp_path / "refs" / "entry.kvqref"
    script = f"""
import os, time, numpy as np
from pathlib import Path
from pytest_kvquality.compaction import compact_reference
from pytest_kvquality.reference import ReferenceKey, write_reference
os.fsync = lambda fd: (print("writing", flush=True), time.sleep(60))  # a very slow disk
rng = np.random.default_rng(0)
rows = compact_reference(rng.standard_normal((50, 400)).astype(np.float32), rng.integers(0, 400, 50), 16, 8, rng)
write_reference(Path({str(target)!r}), ReferenceKey("a" * 64, "b" * 64, 64, "f16", "x", 16, 8, 0), rows, {{}})
"""
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "writing"
    time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    assert not target.exists()  # the entry name never appeared
    leftovers = list(target.parent.iterdir())
    assert leftovers and all(p.suffix == ".tmp" for p in leftovers)  # only the temporary, never read


def test_a_reference_built_with_full_size_sliding_window_caches_is_not_reused_without_them() -> None:
    """swa_full changes the logits in their last bits (cell order): a different reference file."""
    off = ReferenceKey("a" * 64, "b" * 64, 64, "f16", "0.3.36", 16, 8, 0)
    assert off.digest() != ReferenceKey("a" * 64, "b" * 64, 64, "f16", "0.3.36", 16, 8, 0, swa_full=True).digest()
