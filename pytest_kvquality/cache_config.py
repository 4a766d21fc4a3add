"""KV-cache configurations: K type, V type, Hadamard rotation, flash attention.

Spelled as on the command line and in threshold files:
``q4_0`` (K = V), ``q8_0/q4_0`` (K / V), ``q4_0:norot`` (rotation off),
``f16:nofa`` (flash attention off). Suffixes combine: ``q8_0/q4_0:norot``.
"""

from __future__ import annotations

from dataclasses import dataclass

#: KV types llama.cpp accepts for the cache, with their ggml type ids.
GGML_TYPE_IDS: dict[str, int] = {
    "f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7,
    "q8_0": 8, "iq4_nl": 20, "bf16": 30,
}

#: Bits per element of each type (block scales included), for KV bytes per token.
BITS_PER_ELEMENT: dict[str, float] = {
    "f32": 32.0, "f16": 16.0, "bf16": 16.0, "q8_0": 8.5, "q5_1": 6.0,
    "q5_0": 5.5, "q4_1": 5.0, "q4_0": 4.5, "iq4_nl": 4.5,
}

UNQUANTIZED = frozenset({"f32", "f16", "bf16"})
SUFFIXES = ("norot", "nofa")


class CacheConfigError(ValueError):
    """A cache configuration that cannot be parsed or cannot run."""


@dataclass(frozen=True, order=True)
class CacheConfig:
    type_k: str
    type_v: str
    rotation: bool = True
    flash_attn: bool = True

    def __post_init__(self) -> None:
        for t in (self.type_k, self.type_v):
            if t not in GGML_TYPE_IDS:
                known = ", ".join(GGML_TYPE_IDS)
                raise CacheConfigError(f"unknown KV cache type {t!r}; known types: {known}")
        if self.type_v not in UNQUANTIZED and not self.flash_attn:
            raise CacheConfigError(
                f"cache config {self.label}: a quantized V cache ({self.type_v}) needs flash "
                "attention in llama.cpp; drop ':nofa' or use an unquantized V type"
            )

    @classmethod
    def parse(cls, text: str) -> CacheConfig:
        """Parse ``K[/V][:norot][:nofa]``."""
        raw = text.strip()
        if not raw:
            raise CacheConfigError("empty cache config")
        types, *flags = raw.split(":")
        for f in flags:
            if f not in SUFFIXES:
                raise CacheConfigError(
                    f"cache config {raw!r}: unknown suffix ':{f}' (known: :norot, :nofa)"
                )
        parts = types.split("/")
        if len(parts) > 2 or not all(parts):
            raise CacheConfigError(f"cache config {raw!r}: expected 'K' or 'K/V', e.g. 'q8_0/q4_0'")
        k = parts[0].lower()
        v = parts[1].lower() if len(parts) == 2 else k
        return cls(k, v, rotation="norot" not in flags, flash_attn="nofa" not in flags)

    @classmethod
    def parse_list(cls, text: str) -> list[CacheConfig]:
        """Parse a comma-separated list, keeping order and dropping repeats."""
        out: list[CacheConfig] = []
        for item in text.split(","):
            if item.strip():
                c = cls.parse(item)
                if c not in out:
                    out.append(c)
        return out

    @property
    def label(self) -> str:
        """Canonical spelling, used in test ids, reports and JSON."""
        s = self.type_k if self.type_k == self.type_v else f"{self.type_k}/{self.type_v}"
        if not self.rotation:
            s += ":norot"
        if not self.flash_attn:
            s += ":nofa"
        return s

    @property
    def quantized(self) -> bool:
        return not {self.type_k, self.type_v} <= UNQUANTIZED

    def kv_bytes_per_token(self, n_layer: int, n_head_kv: int, head_k: int, head_v: int) -> float:
        """KV-cache bytes per token of a model whose every layer keeps n_head_kv K rows of head_k
        elements and V rows of head_v elements (the fake; real models: kv_memory.py)."""
        bits = n_head_kv * (head_k * BITS_PER_ELEMENT[self.type_k] + head_v * BITS_PER_ELEMENT[self.type_v])
        return n_layer * bits / 8.0

    def __str__(self) -> str:
        return self.label


#: The reference: the same model with an f16 cache.
DEFAULT_REFERENCE = CacheConfig("f16", "f16")
