"""Facts parsed from llama.cpp's log: what it decided when it created a context (rotation, KV
cache size, flash attention), where its scheduler put the KV-cache ops, and allocation failures.

Pure text functions, so they are tested on saved log lines without loading llama.cpp.
"""

from __future__ import annotations

import re
from typing import Any

#: what llama.cpp logs when an allocation fails (host or device)
OUT_OF_MEMORY = re.compile(
    r"failed to allocate|out of memory|cudaMalloc failed|std::bad_alloc",
    re.IGNORECASE)
#: a graph node in GGML_SCHED_DEBUG=2 output: op, name, size, backend, then its sources
_SCHED_NODE = re.compile(r"^node #\s*\d+ \(\s*([A-Z0-9_]+)\s*\):\s+\S+\s+\([^)]*\)\s+\[\s*(\S+)")


def kv_placement(sched_debug: str) -> dict[str, Any]:
    """Devices of the nodes whose sources include the KV cache, and the ops left on the CPU."""
    devices: set[str] = set()
    cpu_ops: set[str] = set()
    for line in sched_debug.splitlines():
        m = _SCHED_NODE.match(line)
        if m is None or ("cache_k_l" not in line and "cache_v_l" not in line):
            continue
        # ggml prints 5 characters of the backend's name: an RPC server's ``RPC0[10.0.0.5:50052]`` reads
        # ``RPC0[``; the device name before the bracket is what is kept
        op, device = m.group(1), m.group(2).split("[")[0]
        devices.add(device)
        if device == "CPU":
            cpu_ops.add(op)
    if not devices:
        return {}
    return {"kv_devices": sorted(devices), "kv_cpu_ops": sorted(cpu_ops)}


_MODEL_BUFFER = re.compile(r"load_tensors:\s+(\S+) model buffer size =\s+([\d.]+) MiB")
_KV_LAYER_DEVICE = re.compile(r"llama_kv_cache: layer\s+(\d+): dev = (\S+)")


def model_buffers(log: str) -> tuple[str, ...]:
    """Where a model's weights went, from its load log: ``CPU_Mapped 120.30 MiB``, ``RPC0[127.0.0.1:50052]
    118.10 MiB``, … (one per buffer llama.cpp printed)."""
    return tuple(f"{name} {float(mib):.2f} MiB" for name, mib in _MODEL_BUFFER.findall(log))


def kv_layer_devices(log: str) -> tuple[str, ...]:
    """Which device holds each layer's KV cache, as ranges: ``CPU: layers 0-8``, ``RPC0: layers 9-17``."""
    by_device: dict[str, list[int]] = {}
    for layer, device in _KV_LAYER_DEVICE.findall(log):
        by_device.setdefault(device, []).append(int(layer))
    return tuple(f"{device}: layers {_ranges(sorted(set(layers)))}" for device, layers in by_device.items())


def _ranges(layers: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``0-2,5``."""
    runs: list[list[int]] = []
    for layer in layers:
        if runs and layer == runs[-1][-1] + 1:
            runs[-1].append(layer)
        else:
            runs.append([layer])
    return ",".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs)


def context_log_facts(log: str) -> dict[str, Any]:
    """What llama.cpp decided when it created the context: rotation of K and V, KV cache size."""
    facts: dict[str, Any] = {}
    for half in ("k", "v"):
        m = re.search(rf"attn_rot_{half} = (\d)", log)
        if m:
            facts[f"rotation_{half}"] = m.group(1) == "1"
    # one line per cache (two for sliding-window models: full and SWA layers); with several KV streams
    # (chunks decoded at once, one sequence each) the size is all of them: one sequence's is reported
    sizes = re.findall(r"llama_kv_cache: size = \s*([\d.]+) MiB \(\s*(\d+) cells,\s*(\d+) layers"
                       r"(?:,\s*\d+/(\d+) seqs)?", log)
    if sizes:
        facts["kv_cache_mib"] = round(sum(float(mib) / int(streams or 1) for mib, _, _, streams in sizes), 2)
        facts["kv_cells"] = max(int(cells) for _, cells, _, _ in sizes)
        facts["kv_layers"] = sum(int(layers) for _, _, layers, _ in sizes)
    if devices := kv_layer_devices(log):
        facts["kv_layer_devices"] = list(devices)
    m = re.search(r"flash_attn\s*=\s*(\w+)", log)
    if m:
        facts["flash_attn"] = m.group(1)
    return facts
