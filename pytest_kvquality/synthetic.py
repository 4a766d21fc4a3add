"""GGUF models with a real architecture and random weights, for tests and benchmarks.

No model hub is reachable from the machines this project is tested on, so the
architectures users gate (Qwen 3.6's hybrid recurrent + MoE ``qwen35moe``,
Gemma 4's sliding-window ``gemma4``, plus ``llama`` and ``qwen3moe``) are
written here with the gguf writer of the vendored llama.cpp, with the bundled
Gemma's tokenizer. Tensor names and shapes follow the ``load_arch_tensors`` of
each model in that llama.cpp (``src/models/<arch>.cpp``).

Scales are chosen so random weights give non-degenerate next-token
distributions: linear weights are N(0, 1/fan_in) (the residual stream keeps
its size), the tied output head gives logits of standard deviation
``LOGIT_STD`` (entropy well below log(n_vocab)), and where attention runs at
scale 1 on normalised q and k (Gemma 4) the q/k norm weights are
head_dim^(-1/4), so q.k has unit scale instead of sqrt(head_dim).

Weights are F16 (tiny models) or Q4_0 blocks written directly (``quant="Q4_0"``,
models of real size: random 4-bit values, the block scale set for the same
variance), streamed tensor by tensor so a 20 GB file never sits in memory.

Longer than our ~350-line limit on purpose: one GGUF writer per architecture, each following
its llama.cpp loader tensor by tensor; they share the helpers at the top.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .cache_config import BITS_PER_ELEMENT, CacheConfig
from .gguf_meta import Field, read_metadata
from .kv_memory import CELL_PAD, swa_cells

#: standard deviation of the logits the tied output head produces on a normalised hidden state
LOGIT_STD = 4.5
#: the element count of one Q4_0 block and its size in bytes (f16 scale + 16 bytes of nibbles)
Q4_0_BLOCK, Q4_0_BYTES = 32, 18
#: standard deviation of a uniform 4-bit value in -8..7
_Q4_STD = float(np.sqrt((16**2 - 1) / 12))


@dataclass(frozen=True)
class Geometry:
    """The hyperparameters of one synthetic model (names as in the HF configs)."""

    arch: str
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int = 0
    n_ctx_train: int = 32768
    # mixture of experts
    n_expert: int = 0
    n_expert_used: int = 0
    n_ff_exp: int = 0
    n_ff_shexp: int = 0
    # sliding window (gemma4): per-layer flags, window, and the global layers' own KV geometry
    swa_pattern: tuple[bool, ...] = ()
    n_swa: int = 0
    n_head_kv_global: int = 0
    head_dim_global: int = 0
    # hybrid recurrent (qwen35moe): Gated DeltaNet sizes, every n-th layer attention, MTP layers
    full_attention_interval: int = 0
    ssm_n_k_heads: int = 0
    ssm_n_v_heads: int = 0
    ssm_head_dim: int = 0
    ssm_conv: int = 4
    n_mtp: int = 0

    @property
    def n_layer_all(self) -> int:
        return self.n_layer + self.n_mtp

    def is_swa(self, il: int) -> bool:
        return bool(self.swa_pattern) and self.swa_pattern[il]

    def is_recurrent(self, il: int) -> bool:
        return self.full_attention_interval > 0 and il < self.n_layer and (il + 1) % self.full_attention_interval != 0

    def recurrent_state_bytes(self) -> int:
        """Gated DeltaNet state of all recurrent layers, f32: the conv window, (d_conv - 1) x conv_dim,
        and a d_state x d_state matrix per V head."""
        conv_dim = (2 * self.ssm_n_k_heads + self.ssm_n_v_heads) * self.ssm_head_dim
        per_layer = 4 * ((self.ssm_conv - 1) * conv_dim + self.ssm_head_dim**2 * self.ssm_n_v_heads)
        return per_layer * sum(self.is_recurrent(il) for il in range(self.n_layer))

    def kv_bytes(self, cache: CacheConfig, n_ctx: int, *, n_ubatch: int, swa_full: bool = False) -> float:
        """KV bytes for this architecture as written, by llama.cpp's rule (independent of its log, so
        tests can hold kv_memory.py to it): attention layers only (not recurrent ones, not the MTP
        block), each with its KV heads and head size; sliding-window layers at window + ubatch
        cells; without flash attention, V rows padded to the widest layer's."""
        cells = -(-n_ctx // CELL_PAD) * CELL_PAD
        v_pad = 0 if cache.flash_attn else max(n * d for n, d in map(self.kv_heads, range(self.n_layer_all)))
        total = 0.0
        for il in range(self.n_layer):
            if self.is_recurrent(il):
                continue
            n_kv, head = self.kv_heads(il)
            per_cell = (n_kv * head * BITS_PER_ELEMENT[cache.type_k] + (v_pad or n_kv * head)
                        * BITS_PER_ELEMENT[cache.type_v]) / 8
            total += per_cell * (swa_cells(n_ctx, self.n_swa, n_ubatch, swa_full) if self.is_swa(il) else cells)
        return total

    def kv_heads(self, il: int) -> tuple[int, int]:
        """(KV heads, head size) of layer il's attention."""
        if self.swa_pattern and not self.is_swa(il):
            return self.n_head_kv_global, self.head_dim_global
        return self.n_head_kv, self.head_dim


def _gemma4_pattern(n_layer: int, period: int = 6) -> tuple[bool, ...]:
    """Gemma 4: five sliding-window layers, then one global layer."""
    return tuple((il + 1) % period != 0 for il in range(n_layer))


#: tiny models of each architecture, small enough for CI
TINY: dict[str, Geometry] = {
    "llama": Geometry("llama", n_layer=2, n_embd=64, n_head=4, n_head_kv=2, head_dim=32, n_ff=128),
    "qwen3moe": Geometry("qwen3moe", n_layer=2, n_embd=64, n_head=4, n_head_kv=2, head_dim=32,
                         n_expert=4, n_expert_used=2, n_ff_exp=32),
    "qwen35moe": Geometry("qwen35moe", n_layer=4, n_embd=64, n_head=4, n_head_kv=2, head_dim=64,
                          n_expert=4, n_expert_used=2, n_ff_exp=32, n_ff_shexp=32, full_attention_interval=4,
                          ssm_n_k_heads=2, ssm_n_v_heads=4, ssm_head_dim=16),
    "qwen35moe-mtp": Geometry("qwen35moe", n_layer=4, n_embd=64, n_head=4, n_head_kv=2, head_dim=64,
                              n_expert=4, n_expert_used=2, n_ff_exp=32, n_ff_shexp=32,
                              full_attention_interval=4, ssm_n_k_heads=2, ssm_n_v_heads=4, ssm_head_dim=16,
                              n_mtp=1),
    "gemma4": Geometry("gemma4", n_layer=6, n_embd=64, n_head=4, n_head_kv=2, head_dim=32, n_ff=128,
                       swa_pattern=_gemma4_pattern(6), n_swa=64, n_head_kv_global=1, head_dim_global=64),
    "gemma4-moe": Geometry("gemma4", n_layer=6, n_embd=64, n_head=4, n_head_kv=2, head_dim=32, n_ff=64,
                           n_expert=4, n_expert_used=2, n_ff_exp=32,
                           swa_pattern=_gemma4_pattern(6), n_swa=64, n_head_kv_global=1, head_dim_global=64),
}

#: the KV-relevant geometry of the released models (HF configs of Qwen3.6-35B-A3B, gemma-4-31B and
#: gemma-4-26B-A4B); vocabulary is the bundled Gemma tokenizer's 262,144 (Qwen's own is 248,320)
REAL: dict[str, Geometry] = {
    "qwen3.6-35b-a3b": Geometry("qwen35moe", n_layer=40, n_embd=2048, n_head=16, n_head_kv=2, head_dim=256,
                                n_ctx_train=262144, n_expert=256, n_expert_used=8, n_ff_exp=512, n_ff_shexp=512,
                                full_attention_interval=4, ssm_n_k_heads=16, ssm_n_v_heads=32, ssm_head_dim=128,
                                n_mtp=1),
    "gemma4-31b": Geometry("gemma4", n_layer=60, n_embd=5376, n_head=32, n_head_kv=16, head_dim=256,
                           n_ff=21504, n_ctx_train=262144, swa_pattern=_gemma4_pattern(60), n_swa=1024,
                           n_head_kv_global=4, head_dim_global=512),
    "gemma4-26b-a4b": Geometry("gemma4", n_layer=30, n_embd=2816, n_head=16, n_head_kv=8, head_dim=256,
                               n_ff=2112, n_ctx_train=262144, n_expert=128, n_expert_used=8, n_ff_exp=704,
                               swa_pattern=_gemma4_pattern(30), n_swa=1024, n_head_kv_global=2,
                               head_dim_global=512),
}


@dataclass(frozen=True)
class TensorSpec:
    """One tensor: GGUF name, shape in ggml order (ne0 first), and how to fill it."""

    name: str
    ne: tuple[int, ...]
    fill: str = "linear"  # linear | ones | value:<x> | embed
    fan_in: int = 0
    f32: bool = False  # kept in F32 whatever the file's type (llama.cpp's ssm_conv needs it)

    @property
    def numpy_shape(self) -> tuple[int, ...]:
        return tuple(reversed(self.ne))


def _linear(name: str, n_in: int, *rest: int) -> TensorSpec:
    return TensorSpec(name, (n_in, *rest), "linear", n_in)


def _ones(name: str, *ne: int, value: float = 1.0) -> TensorSpec:
    return TensorSpec(name, tuple(ne), "ones" if value == 1.0 else f"value:{value}")


def _attention(g: Geometry, il: int, n_head_kv: int, head: int, *, k_eq_v: bool = False,
               qk_norm: float = 1.0, gated_q: bool = False) -> list[TensorSpec]:
    b = f"blk.{il}"
    q_out = head * g.n_head * (2 if gated_q else 1)
    out = [_linear(f"{b}.attn_q.weight", g.n_embd, q_out),
           _linear(f"{b}.attn_k.weight", g.n_embd, head * n_head_kv)]
    if not k_eq_v:
        out.append(_linear(f"{b}.attn_v.weight", g.n_embd, head * n_head_kv))
    out.append(_linear(f"{b}.attn_output.weight", head * g.n_head, g.n_embd))
    if qk_norm:
        out += [_ones(f"{b}.attn_q_norm.weight", head, value=qk_norm),
                _ones(f"{b}.attn_k_norm.weight", head, value=qk_norm)]
    return out


def _experts(g: Geometry, il: int) -> list[TensorSpec]:
    b = f"blk.{il}"
    return [_linear(f"{b}.ffn_gate_inp.weight", g.n_embd, g.n_expert),
            _linear(f"{b}.ffn_gate_exps.weight", g.n_embd, g.n_ff_exp, g.n_expert),
            _linear(f"{b}.ffn_up_exps.weight", g.n_embd, g.n_ff_exp, g.n_expert),
            _linear(f"{b}.ffn_down_exps.weight", g.n_ff_exp, g.n_embd, g.n_expert)]


def _dense_ffn(g: Geometry, il: int) -> list[TensorSpec]:
    b = f"blk.{il}"
    return [_linear(f"{b}.ffn_gate.weight", g.n_embd, g.n_ff), _linear(f"{b}.ffn_up.weight", g.n_embd, g.n_ff),
            _linear(f"{b}.ffn_down.weight", g.n_ff, g.n_embd)]


def tensors(g: Geometry) -> list[TensorSpec]:
    """Every tensor llama.cpp's loader asks for, in file order."""
    out = [TensorSpec("token_embd.weight", (g.n_embd, 0), "embed"), _ones("output_norm.weight", g.n_embd)]
    for il in range(g.n_layer_all):
        b = f"blk.{il}"
        out.append(_ones(f"{b}.attn_norm.weight", g.n_embd))
        if g.arch == "llama":
            out += _attention(g, il, g.n_head_kv, g.head_dim, qk_norm=0.0)
            out += [_ones(f"{b}.ffn_norm.weight", g.n_embd), *_dense_ffn(g, il)]
        elif g.arch == "qwen3moe":
            out += _attention(g, il, g.n_head_kv, g.head_dim)
            out += [_ones(f"{b}.ffn_norm.weight", g.n_embd), *_experts(g, il)]
        elif g.arch == "qwen35moe":
            out += _qwen35moe_block(g, il)
        elif g.arch == "gemma4":
            out += _gemma4_block(g, il)
        else:
            raise ValueError(f"no synthetic writer for architecture {g.arch!r}")
    if g.arch == "gemma4":
        out.append(_ones("rope_freqs.weight", g.head_dim_global // 2))
    return out


def _qwen35moe_block(g: Geometry, il: int) -> list[TensorSpec]:
    b = f"blk.{il}"
    out = [_ones(f"{b}.post_attention_norm.weight", g.n_embd)]
    if il >= g.n_layer or not g.is_recurrent(il):  # full attention (the MTP block is one too)
        out += _attention(g, il, g.n_head_kv, g.head_dim, gated_q=True)
    else:  # Gated DeltaNet
        key_dim, value_dim = g.ssm_head_dim * g.ssm_n_k_heads, g.ssm_head_dim * g.ssm_n_v_heads
        out += [_linear(f"{b}.attn_qkv.weight", g.n_embd, 2 * key_dim + value_dim),
                _linear(f"{b}.attn_gate.weight", g.n_embd, value_dim),
                TensorSpec(f"{b}.ssm_conv1d.weight", (g.ssm_conv, 2 * key_dim + value_dim), "linear", g.ssm_conv,
                           f32=True),
                _ones(f"{b}.ssm_dt.bias", g.ssm_n_v_heads, value=0.5),
                _ones(f"{b}.ssm_a", g.ssm_n_v_heads, value=-1.0),
                _linear(f"{b}.ssm_beta.weight", g.n_embd, g.ssm_n_v_heads),
                _linear(f"{b}.ssm_alpha.weight", g.n_embd, g.ssm_n_v_heads),
                _ones(f"{b}.ssm_norm.weight", g.ssm_head_dim),
                _linear(f"{b}.ssm_out.weight", value_dim, g.n_embd)]
    out += _experts(g, il)
    out += [_linear(f"{b}.ffn_gate_inp_shexp.weight", g.n_embd),
            _linear(f"{b}.ffn_gate_shexp.weight", g.n_embd, g.n_ff_shexp),
            _linear(f"{b}.ffn_up_shexp.weight", g.n_embd, g.n_ff_shexp),
            _linear(f"{b}.ffn_down_shexp.weight", g.n_ff_shexp, g.n_embd)]
    if il >= g.n_layer:  # the MTP (NextN) block: llama.cpp skips it unless asked to load it
        out += [_linear(f"{b}.nextn.eh_proj.weight", 2 * g.n_embd, g.n_embd),
                _ones(f"{b}.nextn.enorm.weight", g.n_embd), _ones(f"{b}.nextn.hnorm.weight", g.n_embd),
                _ones(f"{b}.nextn.shared_head_norm.weight", g.n_embd)]
    return out


def _gemma4_block(g: Geometry, il: int) -> list[TensorSpec]:
    b = f"blk.{il}"
    n_kv, head = g.kv_heads(il)
    qk_norm = float(head) ** -0.25  # attention runs at scale 1: temper q.k to unit scale
    out = _attention(g, il, n_kv, head, k_eq_v=not g.is_swa(il), qk_norm=qk_norm)
    out += [_ones(f"{b}.post_attention_norm.weight", g.n_embd), _ones(f"{b}.ffn_norm.weight", g.n_embd),
            *_dense_ffn(g, il), _ones(f"{b}.post_ffw_norm.weight", g.n_embd)]
    if g.n_expert:
        out += [_linear(f"{b}.ffn_gate_inp.weight", g.n_embd, g.n_expert), _ones(f"{b}.ffn_gate_inp.scale", g.n_embd),
                _ones(f"{b}.pre_ffw_norm_2.weight", g.n_embd), _ones(f"{b}.post_ffw_norm_1.weight", g.n_embd),
                _ones(f"{b}.post_ffw_norm_2.weight", g.n_embd),
                _linear(f"{b}.ffn_gate_exps.weight", g.n_embd, g.n_ff_exp, g.n_expert),
                _linear(f"{b}.ffn_up_exps.weight", g.n_embd, g.n_ff_exp, g.n_expert),
                _linear(f"{b}.ffn_down_exps.weight", g.n_ff_exp, g.n_embd, g.n_expert)]
    return out


def _metadata(w: Any, g: Geometry) -> None:
    a = g.arch
    w.add_string("general.name", f"synthetic {a}")
    w.add_uint32(f"{a}.context_length", g.n_ctx_train)
    w.add_uint32(f"{a}.embedding_length", g.n_embd)
    w.add_uint32(f"{a}.block_count", g.n_layer_all)
    w.add_uint32(f"{a}.attention.head_count", g.n_head)
    w.add_float32(f"{a}.attention.layer_norm_rms_epsilon", 1e-6)
    w.add_float32(f"{a}.rope.freq_base", 10000.0)
    w.add_uint32(f"{a}.attention.key_length", g.head_dim_global or g.head_dim)
    w.add_uint32(f"{a}.attention.value_length", g.head_dim_global or g.head_dim)
    if g.n_ff:
        w.add_uint32(f"{a}.feed_forward_length", g.n_ff)
    if g.n_expert:
        w.add_uint32(f"{a}.expert_count", g.n_expert)
        w.add_uint32(f"{a}.expert_used_count", g.n_expert_used)
        w.add_uint32(f"{a}.expert_feed_forward_length", g.n_ff_exp)
    if g.n_ff_shexp:
        w.add_uint32(f"{a}.expert_shared_feed_forward_length", g.n_ff_shexp)
    if a == "gemma4":
        w.add_array(f"{a}.attention.head_count_kv", [g.kv_heads(il)[0] for il in range(g.n_layer)])
        w.add_array(f"{a}.attention.sliding_window_pattern", list(g.swa_pattern))
        w.add_uint32(f"{a}.attention.sliding_window", g.n_swa)
        w.add_uint32(f"{a}.attention.key_length_swa", g.head_dim)
        w.add_uint32(f"{a}.attention.value_length_swa", g.head_dim)
        w.add_uint32(f"{a}.rope.dimension_count", g.head_dim_global)
        w.add_uint32(f"{a}.rope.dimension_count_swa", g.head_dim)
        w.add_uint32(f"{a}.embedding_length_per_layer_input", 0)
        w.add_float32(f"{a}.rope.freq_base_swa", 10000.0)
    else:
        w.add_uint32(f"{a}.attention.head_count_kv", g.n_head_kv)
    if a == "qwen35moe":
        n_rot = g.head_dim // 4  # partial rotary, as Qwen 3.5/3.6 (0.25)
        w.add_uint32(f"{a}.rope.dimension_count", n_rot)
        half = n_rot // 2
        w.add_array(f"{a}.rope.dimension_sections", [half - 2 * (half // 3), half // 3, half // 3, 0])
        w.add_uint32(f"{a}.full_attention_interval", g.full_attention_interval)
        w.add_uint32(f"{a}.ssm.conv_kernel", g.ssm_conv)
        w.add_uint32(f"{a}.ssm.inner_size", g.ssm_head_dim * g.ssm_n_v_heads)
        w.add_uint32(f"{a}.ssm.state_size", g.ssm_head_dim)
        w.add_uint32(f"{a}.ssm.time_step_rank", g.ssm_n_v_heads)
        w.add_uint32(f"{a}.ssm.group_count", g.ssm_n_k_heads)
        if g.n_mtp:
            w.add_uint32(f"{a}.nextn_predict_layers", g.n_mtp)


def _tokenizer_fields(source: Path) -> list[tuple[str, Field]]:
    """The tokenizer.* keys of a GGUF file."""
    return [(k, f) for k, f in read_metadata(source).items() if k.startswith("tokenizer.")]


def write(path: Path, g: Geometry, tokenizer_from: Path, *, seed: int = 0, quant: str = "F16") -> Path:
    """Write ``g`` as a GGUF file with the tokenizer of ``tokenizer_from``; returns ``path``."""
    import gguf

    fields = list(_tokenizer_fields(tokenizer_from))
    n_vocab = next(len(f.value) for k, f in fields if k == "tokenizer.ggml.tokens")
    specs = [dataclasses.replace(s, ne=(s.ne[0], n_vocab)) if s.fill == "embed" else s for s in tensors(g)]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    w = gguf.GGUFWriter(str(tmp), g.arch)
    _metadata(w, g)
    for key, f in fields:
        value = list(f.value) if isinstance(f.value, np.ndarray) else f.value
        w.add_key_value(key, value, gguf.GGUFValueType(f.vtype),
                        gguf.GGUFValueType(f.subtype) if f.subtype is not None else None)
    w.add_file_type(2 if quant == "Q4_0" else 1)  # LLAMA_FTYPE_MOSTLY_Q4_0 / MOSTLY_F16
    plans = [(s, _storage(s, quant)) for s in specs]
    for s, (dtype, nbytes, raw) in plans:
        w.add_tensor_info(s.name, _byte_shape(s) if raw is not None else s.numpy_shape,
                          np.dtype(dtype), nbytes, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    rng = np.random.default_rng(seed)
    for s, (_, _, raw) in plans:
        w.write_tensor_data(_values(s, g, rng, quantized=raw is not None))
    w.close()
    tmp.replace(path)
    return path


def _storage(s: TensorSpec, quant: str) -> tuple[str, int, Any]:
    """numpy dtype, byte count and raw GGML type (None: plain) of one tensor."""
    import gguf

    n = int(np.prod(s.ne))
    if s.f32:
        return "float32", 4 * n, None
    if s.fill in ("linear", "embed") and len(s.ne) >= 2 and s.ne[0] % Q4_0_BLOCK == 0 and quant == "Q4_0":
        return "uint8", n // Q4_0_BLOCK * Q4_0_BYTES, gguf.GGMLQuantizationType.Q4_0
    if s.fill in ("linear", "embed") and len(s.ne) >= 2 and quant in ("F16", "Q4_0"):
        return "float16", 2 * n, None
    return "float32", 4 * n, None


def _byte_shape(s: TensorSpec) -> tuple[int, ...]:
    shape = s.numpy_shape
    return (*shape[:-1], shape[-1] // Q4_0_BLOCK * Q4_0_BYTES)


def _std(s: TensorSpec, g: Geometry) -> float:
    if s.fill == "embed":  # tied output head: logits of LOGIT_STD on an RMS-normalised hidden state
        return LOGIT_STD / float(np.sqrt(g.n_embd))
    return 1.0 / float(np.sqrt(max(1, s.fan_in)))


def _values(s: TensorSpec, g: Geometry, rng: np.random.Generator, *, quantized: bool) -> np.ndarray:
    if s.fill == "ones":
        return np.ones(s.numpy_shape, np.float32)
    if s.fill.startswith("value:"):
        return np.full(s.numpy_shape, float(s.fill.split(":", 1)[1]), np.float32)
    std = _std(s, g)
    if quantized:  # Q4_0 blocks: f16 scale d, 16 bytes of nibbles; value = d * (q - 8)
        n_blocks = int(np.prod(s.ne)) // Q4_0_BLOCK
        blocks = np.frombuffer(rng.bytes(n_blocks * Q4_0_BYTES), np.uint8).reshape(n_blocks, Q4_0_BYTES).copy()
        blocks[:, :2] = np.frombuffer(np.float16(std / _Q4_STD).tobytes(), np.uint8)
        shape = s.numpy_shape
        return blocks.reshape(*shape[:-1], shape[-1] // Q4_0_BLOCK * Q4_0_BYTES)
    values = rng.standard_normal(s.numpy_shape, dtype=np.float32) * np.float32(std)
    return values.astype(np.float16) if len(s.ne) >= 2 and not s.f32 else values
