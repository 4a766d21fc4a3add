"""llama_log.py: facts read from llama.cpp's log (KV op placement, cache sizes)."""

from __future__ import annotations

from pytest_kvquality.llama_log import OUT_OF_MEMORY, context_log_facts, kv_layer_devices, kv_placement, model_buffers

SCHED_DEBUG = """
## SPLIT #0: CUDA0 # 0 inputs
node # 36 (FLASH_ATTN):              node_36 (   4K) [CUDA0         ] use=1,c=1:  (reshaped) (view) ( (   4K) \
[CUDA0 ] cache_k_l0 (view) (p (  68K) [CUDA0 ] cache_v_l0 (view) (p (  36K
node # 37 (  MUL_MAT):              node_37 (   4K) [CUDA0         ] use=1,c=1:  attn_out.weight (  1M) [CUDA0 ]
## SPLIT #1: CPU # 3 inputs
node # 88 (FLASH_ATTN):              node_88 (   4K) [  CPU         ] use=1,c=1:  (reshaped) (view) ( (   4K) \
[  CPU ] cache_k_l1 (view) (p (  68K) [  CPU ] cache_v_l1 (view) (p (  36K
"""


def test_kv_placement_finds_kv_ops_left_on_the_cpu() -> None:
    assert kv_placement(SCHED_DEBUG) == {"kv_devices": ["CPU", "CUDA0"], "kv_cpu_ops": ["FLASH_ATTN"]}
    assert kv_placement("nothing here") == {}


def test_context_facts_add_up_both_caches_of_a_sliding_window_model() -> None:
    log = """
llama_kv_cache: size =    0.30 MiB (   256 cells,   3 layers,  1/1 seqs), K (q8_0):    0.20 MiB, V (q4_0):    0.11 MiB
llama_kv_cache: attn_rot_k = 1, n_embd_head_k_all = 256
llama_kv_cache: attn_rot_v = 0, n_embd_head_k_all = 256
llama_kv_cache: size =    1.52 MiB (   256 cells,  15 layers,  1/1 seqs), K (q8_0):    1.00 MiB, V (q4_0):    0.53 MiB
llama_context: flash_attn            = enabled
"""
    facts = context_log_facts(log)
    assert facts == {"rotation_k": True, "rotation_v": False, "kv_cache_mib": 1.82, "kv_cells": 256,
                     "kv_layers": 18, "flash_attn": "enabled"}
    assert OUT_OF_MEMORY.search("ggml_backend_cpu_buffer_type_alloc_buffer: failed to allocate buffer")
    assert not OUT_OF_MEMORY.search("llama_init_from_model: failed to initialize the context: bad type")


def test_devices_of_weights_kv_layers_and_rpc_ops_are_read_from_the_log() -> None:
    load = """
load_tensors: offloaded 10/19 layers to GPU
load_tensors:   CPU_Mapped model buffer size =   202.39 MiB
load_tensors: RPC0[127.0.0.1:37461] model buffer size =   202.77 MiB
"""
    assert model_buffers(load) == ("CPU_Mapped 202.39 MiB", "RPC0[127.0.0.1:37461] 202.77 MiB")
    kv = "\n".join([*(f"llama_kv_cache: layer {i:3d}: dev = CPU" for i in (0, 1, 2, 5)),
                    *(f"llama_kv_cache: layer {i:3d}: dev = RPC0" for i in range(9, 18))])
    assert kv_layer_devices(kv) == ("CPU: layers 0-2,5", "RPC0: layers 9-17")
    sched = """node # 36 (FLASH_ATTN):              node_36 (   4K) [RPC0[         ] use=1,c=1:  (reshaped) (view) \
[RPC0[ ] cache_k_l9 (view) (p (  68K) [RPC0[ ] cache_v_l9 (view) (p (  36K"""
    assert kv_placement(sched) == {"kv_devices": ["RPC0"], "kv_cpu_ops": []}
