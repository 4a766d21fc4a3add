"""The KV memory table of docs/results.md: what llama.cpp allocates for the released models' geometry.

    python benchmarks/kv_memory_table.py > docs/kv-memory-table.md

Uses llama.cpp's allocation rule as tests/test_architectures.py verifies it against llama.cpp's own
allocations on tiny models of each architecture: attention layers only, each with its KV heads and
head size; sliding-window layers at window + ubatch cells (llama-server's ubatch 512, swa_full off);
the recurrent state of hybrid layers a fixed size.
"""

from __future__ import annotations

from pytest_kvquality.cache_config import CacheConfig
from pytest_kvquality.kv_memory import SERVER_UBATCH
from pytest_kvquality.markdown import markdown_table
from pytest_kvquality.synthetic import REAL

CONTEXTS = (4096, 32768, 131072)
TYPES = ("f16", "q8_0", "q4_0")


def main() -> None:
    head = ["model", "KV cache", *(f"B/token at {n // 1024}k" for n in CONTEXTS), *(f"MiB at {n // 1024}k"
                                                                                    for n in CONTEXTS),
            "recurrent state"]
    rows = []
    for name, g in REAL.items():
        for t in TYPES:
            b = [g.kv_bytes(CacheConfig.parse(t), n, n_ubatch=SERVER_UBATCH) for n in CONTEXTS]
            rows.append([name, t, *(f"{x / n:,.0f}" for x, n in zip(b, CONTEXTS, strict=True)),
                         *(f"{x / 2**20:,.0f}" for x in b),
                         f"{g.recurrent_state_bytes() / 2**20:,.1f} MiB" if g.full_attention_interval else "-"])
    print(markdown_table(head, rows, align="ll" + "r" * (len(head) - 2)))


if __name__ == "__main__":
    main()
