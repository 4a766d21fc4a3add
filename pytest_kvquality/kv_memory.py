"""KV-cache memory as llama.cpp allocates it, per architecture.

The figure is llama.cpp's: which layers hold a KV cache, in which cache (the
full-attention one or the sliding-window one) and with how many cells is read
from the log llama.cpp writes when it creates the context. Hybrid models'
recurrent layers hold none (their fixed-size state is reported apart),
sliding-window layers hold window + ubatch cells (padded to 256) unless
``swa_full``, layers past ``n_layer`` (MTP blocks) are filtered out, and each
layer has its own KV heads and K/V head sizes.

The exact byte count comes from the GGUF hyperparameters of exactly those
layers; it must agree with the sizes llama.cpp prints (two decimals of MiB)
or the figure is flagged as a mismatch (``KVMemory.mismatch``): an error in
the tests, a note in a run. Sizes at other context lengths (32k, 128k) apply
llama.cpp's cell rule for each cache to the per-cell bytes measured here, with
llama-server's default micro-batch of 512 (the sliding-window cache holds
window + ubatch cells).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from .cache_config import BITS_PER_ELEMENT, CacheConfig
from .gguf_meta import Field, per_layer, read_metadata

#: llama.cpp rounds n_ctx and the sliding-window cache up to this many cells
CELL_PAD = 256
#: context lengths the report gives KV memory for
REPORT_CONTEXTS = (32768, 131072)
#: llama-server's default micro-batch, which sizes a deployment's sliding-window cache (window + ubatch)
SERVER_UBATCH = 512
#: what llama.cpp prints with two decimals: half the last digit, plus float32's relative precision
#: (it divides in float: 0.008 MiB at 100 GiB)
_MIB_ROUNDING, _FLOAT32_EPS = 0.005 + 1e-6, 1.2e-7

#: a layer that holds its own cache ("filtered", "does not have KV cache" and "sharing with layer" hold none)
_LAYER = re.compile(r"^llama_kv_cache: layer +(\d+): dev = ")
_CACHE = re.compile(r"^llama_kv_cache: size = +([\d.]+) MiB \( *(\d+) cells, +(\d+) layers(?:, +\d+/(\d+) seqs)?.*"
                    r"K \(\S+\): +([\d.]+) MiB, V \(\S+\): +([\d.]+) MiB")
_RECURRENT = re.compile(r"^llama_memory_recurrent: size = +([\d.]+) MiB(?: \( *\d+ cells, +\d+ layers, +(\d+) seqs)?")


@dataclass(frozen=True)
class CacheBlock:
    """One attention cache llama.cpp created: its layers, cells and printed sizes."""

    swa: bool
    cells: int  # per stream
    layers: tuple[int, ...]
    k_mib: float  # all streams
    v_mib: float
    #: KV streams (one per sequence when several chunks are decoded at once, llama.cpp's n_stream)
    streams: int = 1


@dataclass(frozen=True)
class Allocation:
    """Everything llama.cpp logged about the memory of one context."""

    blocks: tuple[CacheBlock, ...]
    recurrent_mib: float | None = None


def parse_allocation(log: str) -> Allocation:
    """The caches in llama.cpp's context-creation log (with its per-layer debug lines)."""
    blocks: list[CacheBlock] = []
    layers: list[int] = []
    swa = False
    recurrent: float | None = None
    for line in log.splitlines():
        if "creating non-SWA KV cache" in line:
            swa = False
        elif "creating     SWA KV cache" in line or "creating SWA KV cache" in line:
            swa = True
        elif m := _LAYER.match(line):
            layers.append(int(m.group(1)))
        elif m := _CACHE.match(line):
            blocks.append(CacheBlock(swa, int(m.group(2)), tuple(layers), float(m.group(5)), float(m.group(6)),
                                     int(m.group(4) or 1)))
            layers, swa = [], False
        elif m := _RECURRENT.match(line):  # per sequence: one state each
            recurrent = float(m.group(1)) / max(1, int(m.group(2) or 1))
    return Allocation(tuple(blocks), recurrent)


@dataclass(frozen=True)
class LayerShape:
    """The K and V row sizes (elements per cell) of one layer."""

    k: int
    v: int


@dataclass(frozen=True)
class Geometry:
    """What sizes each layer's KV rows, from the GGUF header."""

    n_layer_all: int
    n_head_kv: tuple[int, ...]
    head_k: int
    head_v: int
    head_k_swa: int
    head_v_swa: int
    n_swa: int

    @classmethod
    def from_metadata(cls, meta: dict[str, Field]) -> Geometry:
        arch = str(meta["general.architecture"].value)

        def scalar(key: str, default: int) -> int:
            f = meta.get(f"{arch}.{key}")
            return int(f.value) if f is not None and isinstance(f.value, (int, float)) else default

        n_layer = scalar("block_count", 0)
        n_head = per_layer(meta, f"{arch}.attention.head_count", n_layer, 0)
        n_head_kv = per_layer(meta, f"{arch}.attention.head_count_kv", n_layer, n_head[0] if n_head else 0)
        embd = scalar("embedding_length", 0)
        default_head = embd // n_head[0] if n_head and n_head[0] else 0
        head_k = scalar("attention.key_length", default_head)
        head_v = scalar("attention.value_length", default_head)
        return cls(n_layer, tuple(n_head_kv), head_k, head_v, scalar("attention.key_length_swa", head_k),
                   scalar("attention.value_length_swa", head_v), scalar("attention.sliding_window", 0))

    @classmethod
    def from_file(cls, path: Path) -> Geometry:
        return cls.from_metadata(read_metadata(path))

    def shape(self, il: int, swa: bool) -> LayerShape:
        n = self.n_head_kv[il]
        return LayerShape(n * (self.head_k_swa if swa else self.head_k), n * (self.head_v_swa if swa else self.head_v))

    def v_max(self, swa_layers: set[int]) -> int:
        """llama.cpp pads every V row to the widest layer's when V is stored transposed (no flash attention)."""
        return max(self.shape(il, il in swa_layers).v for il in range(self.n_layer_all))


def row_bytes(type_name: str, elements: int) -> float:
    return elements * BITS_PER_ELEMENT[type_name] / 8.0


@dataclass(frozen=True)
class KVMemory:
    """KV memory of one context, and what it would be at other context lengths."""

    n_ctx: int
    kv_bytes: float  # all attention caches at n_ctx
    swa_cells: int | None
    recurrent_mib: float | None
    mismatch: str | None = None
    at: dict[int, float] = field(default_factory=dict)  # n_ctx -> MiB

    @property
    def bytes_per_token(self) -> float:
        return self.kv_bytes / self.n_ctx


def swa_cells(n_ctx: int, n_swa: int, n_ubatch: int, swa_full: bool) -> int:
    """llama.cpp's sliding-window cache size (llama_kv_cache_iswa, one sequence)."""
    n_ctx = -(-n_ctx // CELL_PAD) * CELL_PAD
    if swa_full:
        return n_ctx
    return -(-min(n_ctx, n_swa + n_ubatch) // CELL_PAD) * CELL_PAD


def kv_memory(alloc: Allocation, geometry: Geometry, cache: CacheConfig, n_ctx: int, *, n_ubatch: int,
              swa_full: bool, flash_attn: bool) -> KVMemory:
    """Bytes per cell of each cache llama.cpp created, checked against its printed sizes; with several
    KV streams (chunks decoded at once), the figures are one stream's: what one sequence needs."""
    swa_layers = {il for b in alloc.blocks if b.swa for il in b.layers}
    v_pad = None if flash_attn else geometry.v_max(swa_layers)
    per_cell: list[tuple[bool, float]] = []
    problems: list[str] = []
    total = 0.0
    for b in alloc.blocks:
        k = sum(row_bytes(cache.type_k, geometry.shape(il, b.swa).k) for il in b.layers)
        v = sum(row_bytes(cache.type_v, v_pad or geometry.shape(il, b.swa).v) for il in b.layers)
        for half, exact, printed in (("K", k, b.k_mib), ("V", v, b.v_mib)):
            if abs(exact * b.cells * b.streams / 2**20 - printed) > _MIB_ROUNDING + _FLOAT32_EPS * printed:
                streams = f" x {b.streams} streams" if b.streams > 1 else ""
                problems.append(f"{'SWA' if b.swa else 'non-SWA'} {half}: llama.cpp allocated {printed:.2f} MiB for "
                                f"{len(b.layers)} layers x {b.cells} cells{streams}, the hyperparameters give "
                                f"{exact * b.cells * b.streams / 2**20:.4f} MiB")
        per_cell.append((b.swa, k + v))
        total += (k + v) * b.cells
    n_swa_cells = next((b.cells for b in alloc.blocks if b.swa), None)
    at = {n: sum(bpc * (swa_cells(n, geometry.n_swa, SERVER_UBATCH, swa_full) if swa else n)
                 for swa, bpc in per_cell) / 2**20 for n in REPORT_CONTEXTS}
    return KVMemory(n_ctx, total, n_swa_cells, alloc.recurrent_mib, "; ".join(problems) or None, at)
