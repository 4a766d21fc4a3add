"""KV memory from llama.cpp's allocation log, checked against the GGUF geometry (pure, no llama.cpp)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_kvquality import synthetic
from pytest_kvquality.cache_config import CacheConfig
from pytest_kvquality.gguf_meta import read_metadata
from pytest_kvquality.kv_memory import Geometry, kv_memory, parse_allocation, swa_cells
from pytest_kvquality.llama_log import context_log_facts

#: what llama.cpp b-0.3.36 logs creating a context for the tiny gemma4 at n_ctx 1024 (swa_full off),
#: with the per-layer debug lines the backend keeps
GEMMA4_LOG = """\
llama_kv_cache_iswa: creating non-SWA KV cache, size = 1024 cells
llama_kv_cache: layer   0: filtered
llama_kv_cache: layer   5: dev = CPU
llama_kv_cache:        CPU KV buffer size =     0.25 MiB
llama_kv_cache: size =    0.25 MiB (  1024 cells,   1 layers,  1/1 seqs), K (f16):    0.12 MiB, V (f16):    0.12 MiB
llama_kv_cache_iswa: creating     SWA KV cache, size = 512 cells
llama_kv_cache: layer   0: dev = CPU
llama_kv_cache: layer   1: dev = CPU
llama_kv_cache: layer   2: dev = CPU
llama_kv_cache: layer   3: dev = CPU
llama_kv_cache: layer   4: dev = CPU
llama_kv_cache: layer   5: filtered
llama_kv_cache: size =    0.62 MiB (   512 cells,   5 layers,  1/1 seqs), K (f16):    0.31 MiB, V (f16):    0.31 MiB
"""
QWEN35_LOG = """\
llama_kv_cache: layer   0: filtered
llama_kv_cache: layer   3: dev = CPU
llama_kv_cache: layer   4: filtered
llama_kv_cache: size =    0.50 MiB (  1024 cells,   1 layers,  1/1 seqs), K (f16):    0.25 MiB, V (f16):    0.25 MiB
llama_memory_recurrent: size =    0.02 MiB (     1 cells,   4 layers,  1 seqs  0 rs_seq), R (f32):    0.00 MiB, \
S (f32):    0.01 MiB
"""


def tiny_geometry(name: str, tmp_path: Path) -> Geometry:
    from pytest_kvquality.environment import default_cache_dir
    from pytest_kvquality.resolve import builtin_model_path

    path = synthetic.write(tmp_path / f"{name}.gguf", synthetic.TINY[name], builtin_model_path(default_cache_dir())[0])
    return Geometry.from_metadata(read_metadata(path))


def test_the_log_names_each_cache_its_layers_and_cells() -> None:
    alloc = parse_allocation(GEMMA4_LOG)
    assert [(b.swa, b.cells, b.layers) for b in alloc.blocks] == [(False, 1024, (5,)), (True, 512, (0, 1, 2, 3, 4))]
    hybrid = parse_allocation(QWEN35_LOG)
    assert [b.layers for b in hybrid.blocks] == [(3,)] and hybrid.recurrent_mib == 0.02


@pytest.mark.real_model  # reads the bundled model's tokenizer
def test_bytes_come_from_the_listed_layers_and_agree_with_the_printed_sizes(tmp_path: Path) -> None:
    g = tiny_geometry("gemma4", tmp_path)
    f16 = CacheConfig.parse("f16")
    mem = kv_memory(parse_allocation(GEMMA4_LOG), g, f16, 1024, n_ubatch=256, swa_full=False, flash_attn=True)
    # global layer: 1 KV head x 64, K and V; five sliding layers: 2 x 32 each
    assert mem.mismatch is None
    assert mem.kv_bytes == (1 * 64 * 2 * 2) * 1024 + 5 * (2 * 32 * 2 * 2) * 512
    assert mem.swa_cells == 512
    # a deployment at 32k: global layer at 32k cells, sliding ones at 64 + 512 -> 768 cells
    assert mem.at[32768] * 2**20 == 256 * 32768 + 5 * 256 * 768


@pytest.mark.real_model
def test_a_size_the_geometry_does_not_explain_is_a_mismatch(tmp_path: Path) -> None:
    g = tiny_geometry("gemma4", tmp_path)
    wrong = GEMMA4_LOG.replace("K (f16):    0.31 MiB", "K (f16):    0.62 MiB")
    mem = kv_memory(parse_allocation(wrong), g, CacheConfig.parse("f16"), 1024, n_ubatch=256, swa_full=False,
                    flash_attn=True)
    assert mem.mismatch is not None and "SWA K: llama.cpp allocated 0.62 MiB" in mem.mismatch


def test_sliding_window_cells_follow_llama_cpp_rule() -> None:
    assert swa_cells(512, 512, 256, False) == 512       # never more than n_ctx
    assert swa_cells(32768, 1024, 512, False) == 1536   # window + ubatch, padded to 256
    assert swa_cells(32768, 1000, 512, False) == 1536
    assert swa_cells(32768, 1024, 512, True) == 32768   # swa_full: every cell


def test_the_real_models_geometry_gives_the_published_allocations() -> None:
    """The per-token cost llama.cpp allocates at f16 with full-size sliding-window caches
    (issue 13: Qwen 3.6 35B-A3B 20,480 B; Gemma 4 31B 901,120 B)."""
    def full_size_per_token(g: synthetic.Geometry) -> float:
        return g.kv_bytes(CacheConfig.parse("f16"), 4096, n_ubatch=512, swa_full=True) / 4096
    assert full_size_per_token(synthetic.REAL["qwen3.6-35b-a3b"]) == 20480
    assert full_size_per_token(synthetic.REAL["gemma4-31b"]) == 901120


def test_several_kv_streams_are_one_sequence_each() -> None:
    """Chunks decoded four at a time (llama-perplexity's n_seq): llama.cpp allocates one KV stream per
    sequence and prints their sum next to one stream's cells; what a sequence needs is one stream."""
    four = (GEMMA4_LOG.replace("1/1 seqs), K (f16):    0.12 MiB, V (f16):    0.12 MiB",
                               "4/4 seqs), K (f16):    0.50 MiB, V (f16):    0.50 MiB")
            .replace("size =    0.25 MiB", "size =    1.00 MiB")
            .replace("0.62 MiB (   512 cells,   5 layers,  1/1 seqs), K (f16):    0.31 MiB, V (f16):    0.31",
                     "2.50 MiB (   512 cells,   5 layers,  4/4 seqs), K (f16):    1.25 MiB, V (f16):    1.25"))
    alloc = parse_allocation(four)
    assert [(b.cells, b.streams) for b in alloc.blocks] == [(1024, 4), (512, 4)]
    # one sequence's 0.875 MiB (llama.cpp prints one stream's 0.87 after rounding 0.625 to 0.62)
    assert context_log_facts(four)["kv_cache_mib"] == pytest.approx(context_log_facts(GEMMA4_LOG)["kv_cache_mib"],
                                                                    abs=0.011)
    recurrent = QWEN35_LOG.replace("size =    0.02 MiB (     1 cells,   4 layers,  1 seqs",
                                   "size =    0.08 MiB (     4 cells,   4 layers,  4 seqs")
    assert parse_allocation(recurrent).recurrent_mib == 0.02


@pytest.mark.real_model  # reads the bundled model's tokenizer
def test_kv_streams_give_the_bytes_of_one_sequence(tmp_path: Path) -> None:
    g = tiny_geometry("gemma4", tmp_path)
    f16 = CacheConfig.parse("f16")
    one = kv_memory(parse_allocation(GEMMA4_LOG), g, f16, 1024, n_ubatch=256, swa_full=False, flash_attn=True)
    four_log = GEMMA4_LOG.replace("1/1 seqs", "4/4 seqs")  # the printed sizes left at one stream's: wrong
    wrong = kv_memory(parse_allocation(four_log), g, f16, 1024, n_ubatch=256, swa_full=False, flash_attn=True)
    assert one.mismatch is None and wrong.mismatch is not None and "x 4 streams" in wrong.mismatch
    assert wrong.bytes_per_token == one.bytes_per_token
