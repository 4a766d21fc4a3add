"""The fake backend: just another ``LogitsBackend``, in numpy.

``FakeEngine`` runs the real reduction, reference and report code on a tiny
synthetic language model in numpy: logits depend on the previous token and
the position, and a quantized cache adds deterministic noise that grows as
the cache type gets coarser. It loads "models" from small GGUF files written
by ``write_fake_gguf`` (real GGUF headers, via the ``gguf`` package), so the
registry and file checks run unchanged.

In a conftest::

    from pytest_kvquality.testing import FakeEngine

    def pytest_kvquality_make_engine(config):
        return FakeEngine()
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..cache_config import BITS_PER_ELEMENT, CacheConfig
from ..normalizer import normalize_rows
from .local import LocalEngine
from .protocol import BackendInfo, ModelFacts, ModelLoad, ScoredView, TokenPieces, group_length

FAKE_VOCAB = 384
FAKE_BOS = 1
#: the fake's KV cache: layers, KV heads, K and V head sizes
FAKE_KV = (2, 1, 64, 64)

#: Noise added to the logits by each cache type (per K and per V half).
NOISE = {t: 0.0 if b >= 16 else 0.25 * 2.0 ** (-(b - 4.5)) for t, b in BITS_PER_ELEMENT.items()}


#: weight noise of the fake model's "requantized" variants, by weight type
FAKE_WEIGHT_NOISE = {"Q8_0": 0.02, "Q6_K": 0.04, "Q5_K_M": 0.08, "Q4_K_M": 0.0, "Q4_0": 0.15,
                     "Q3_K_M": 0.3, "Q2_K": 0.6}


#: the fake's chat template: Gemma 3's turn markers, no tool support (templates that have none
#: get llama.cpp's polyfill, chat.py)
FAKE_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'assistant' %}{% set r = 'model' %}"
    "{% else %}{% set r = m['role'] %}{% endif %}<start_of_turn>{{ r }}\n{{ m['content'] | trim }}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")


def write_fake_gguf(path: Path, seed: int = 0, arch: str = "kvqfake", weight_noise: float = 0.0,
                    chat_template: str | None = FAKE_CHAT_TEMPLATE) -> Path:
    """A small valid GGUF file (one tensor) whose metadata seeds the fake model."""
    import gguf

    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_uint32("kvqfake.seed", seed)
    w.add_float32("kvqfake.weight_noise", weight_noise)
    if chat_template is not None:
        w.add_string("tokenizer.chat_template", chat_template)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _fake_params(path: str) -> tuple[int, float, str]:
    """Seed, weight noise and chat template ("" when none) of a fake model file."""
    import gguf

    reader = gguf.GGUFReader(path)
    field = reader.fields.get("kvqfake.seed")
    if field is None:
        raise ValueError(f"{path} is not a fake model (no kvqfake.seed)")
    noise = reader.fields.get("kvqfake.weight_noise")
    template = reader.fields.get("tokenizer.chat_template")
    return (int(field.parts[field.data[0]][0]), float(noise.parts[noise.data[0]][0]) if noise else 0.0,
            bytes(template.parts[template.data[0]]).decode() if template is not None else "")


class FakeModel:
    def __init__(self, path: str, noise_scale: float = 1.0, chunk_effect: float = 0.0,
                 split_facts: dict[str, Any] | None = None) -> None:
        #: how the model was spread (RPC servers, split mode), reported as llama.cpp's backend does
        self.split_facts = split_facts or {}
        self.noise_scale = noise_scale
        self.chunk_effect = chunk_effect
        seed, weight_noise, self.chat_template = _fake_params(path)
        rng = np.random.default_rng(seed)
        self.path = path
        self.w_prev = (rng.standard_normal((FAKE_VOCAB, FAKE_VOCAB)) * 2.5).astype(np.float32)
        self.w_pos = (rng.standard_normal((64, FAKE_VOCAB)) * 0.5).astype(np.float32)
        if weight_noise:  # a "requantized" variant: the same model with perturbed weights
            noise = np.random.default_rng(seed + 1).standard_normal(self.w_prev.shape).astype(np.float32)
            self.w_prev += noise * weight_noise

    def describe(self) -> ModelFacts:
        return ModelFacts(desc="fake", n_vocab=FAKE_VOCAB, n_layer=FAKE_KV[0], n_ctx_train=1 << 20, gpu_layers=0,
                          chat_template=self.chat_template, bos_token="<bos>", eos_token="<eos>")

    def tokenize(self, text: str) -> np.ndarray:
        data = np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)
        return np.concatenate([[FAKE_BOS], data % (FAKE_VOCAB - 2) + 2]).astype(np.int32)

    def tokenize_pieces(self, text: str) -> TokenPieces:
        """One token per byte (``<bos>`` written in the text is the BOS token), like llama.cpp's
        special-token parsing: the offsets are exact by construction."""
        data = text.encode("utf-8")
        tokens, starts, i = [FAKE_BOS], [0], 0
        if data.startswith(b"<bos>"):
            i = 5
        while i < len(data):
            tokens.append(data[i] % (FAKE_VOCAB - 2) + 2)
            starts.append(i)
            i += 1
        return TokenPieces(np.array(tokens, np.int32), np.array(starts, np.int64))

    def is_eog(self, token: int) -> bool:
        return False

    def context(self, cache: CacheConfig, n_ctx: int, n_seq: int = 1, n_ubatch: int | None = None) -> FakeContext:
        return FakeContext(self, cache, n_ctx, n_seq)

    def close(self) -> None:
        pass


class FakeContext:
    def __init__(self, model: FakeModel, cache: CacheConfig, n_ctx: int, n_seq: int = 1) -> None:
        self.model, self.cache, self.n_ctx, self.n_seq = model, cache, n_ctx, n_seq
        self.sigma = (NOISE[cache.type_k] + NOISE[cache.type_v]) * model.noise_scale
        if not cache.rotation and cache.quantized:
            self.sigma *= 1.3
        per_token = cache.kv_bytes_per_token(*FAKE_KV)  # what the fake "allocates"
        self.info = {"rotation_k": cache.rotation and cache.type_k not in ("f32", "f16", "bf16"),
                     "rotation_v": cache.rotation and cache.type_v not in ("f32", "f16", "bf16"),
                     "gpu_layers": 0, "kv_bytes_per_token": per_token,
                     "kv_mib_per_32k": per_token * 32768 / 2**20, "kv_mib_per_128k": per_token * 131072 / 2**20,
                     **model.split_facts}
        self._out: np.ndarray | None = None
        self._prefix = np.zeros(0, np.int32)

    def _logits(self, tokens: np.ndarray, pos: np.ndarray, noise_key: bytes) -> np.ndarray:
        """The logits at positions ``pos``: the previous token's row, the position's, and the
        cache's noise, seeded by the tokens so far (the same prefix gives the same logits)."""
        logits = self.model.w_prev[tokens[pos]] + self.model.w_pos[pos % 64]
        if self.sigma:
            digest = hashlib.sha256(noise_key + self.cache.label.encode()).digest()
            rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
            sigma = self.sigma
            if self.model.chunk_effect:  # a chunk-wide noise level: tokens of one chunk move together
                g = float(np.random.default_rng(int.from_bytes(digest[8:16], "little")).standard_normal())
                sigma *= math.exp(self.model.chunk_effect * g - self.model.chunk_effect**2 / 2)
            logits = logits + rng.standard_normal(logits.shape).astype(np.float32) * sigma
        out: np.ndarray = logits
        return out

    def scored_logits(self, group: list[tuple[np.ndarray, np.ndarray]]) -> Iterator[ScoredView]:
        group_length(group, self.n_seq, self.n_ctx)
        rows = []
        for tokens, want in group:
            tokens = tokens.copy()
            tokens[0] = FAKE_BOS
            pos = np.flatnonzero(want)
            key = tokens.tobytes() if tokens.size == self.n_ctx else tokens.tobytes() + want.tobytes()
            rows.append(self._logits(tokens, pos, key))
        # through one buffer per context that each decode overwrites, like llama.cpp's: a consumer that
        # keeps a view past this context's next decode reads NaNs or the next block. Several sequences:
        # one decode, each sequence's rows in two parts, interleaved as llama.cpp's micro-batches of
        # several sequences come back; one: two decodes, like a long chunk's micro-batches
        if len(group) > 1:
            halves = [(r[: r.shape[0] // 2], r[r.shape[0] // 2 :]) for r in rows]
            blocks = [[(s, h[part]) for part in (0, 1) for s, h in enumerate(halves)]]
        else:
            half = rows[0].shape[0] // 2 or 1
            blocks = [[(0, rows[0][:half])], [(0, rows[0][half:])]]
        need = max(sum(r.shape[0] for _, r in block) for block in blocks)
        if self._out is None or self._out.shape[0] < need + 1:
            self._out = np.empty((need + 1, FAKE_VOCAB), np.float32)
        for b, block in enumerate(blocks):
            self._out[:] = np.nan
            first = 0
            views = []
            for s, r in block:
                view = self._out[first : first + r.shape[0]]
                view[:] = r
                views.append((s, view))
                first += r.shape[0]
            for s, view in views:
                if view.shape[0]:
                    yield ScoredView(s, view, b == len(blocks) - 1)

    def reduces_on_device(self) -> bool:
        return True

    def reduced_rows(self, group: list[tuple[np.ndarray, np.ndarray]], ids: list[np.ndarray]) -> Iterator[ScoredView]:
        """The host's pass standing in for a device's, block by block as ``scored_logits`` returns
        them (the engine's bookkeeping of rows and ids is what the fake tests)."""
        done = [0] * len(group)
        for view in self.scored_logits(group):
            n = view.logits.shape[0]
            rows = normalize_rows(view.logits, ids[view.member][done[view.member] : done[view.member] + n])
            done[view.member] += n
            yield ScoredView(view.member, np.column_stack([rows.imax.astype(np.float32), rows.norm, rows.gathered]),
                             True)

    def next_logits(self, tokens: np.ndarray, start: int) -> np.ndarray:
        if start == 0:
            self._prefix = np.zeros(0, np.int32)
        if start != self._prefix.size:
            raise RuntimeError(f"decode at position {start} after {self._prefix.size} tokens")
        self._prefix = np.concatenate([self._prefix, tokens.astype(np.int32)])
        if self._prefix.size > self.n_ctx:
            raise RuntimeError(f"generation reached position {self._prefix.size}, past the context of {self.n_ctx}")
        last = np.array([self._prefix.size - 1])
        row = self._logits(self._prefix, last, b"gen" + self._prefix.tobytes())[0]
        if self._out is None:
            self._out = np.empty((1, FAKE_VOCAB), np.float32)
        self._out[0] = row
        view: np.ndarray = self._out[0]
        return view

    def decode_timed(self, tokens: np.ndarray, one_by_one: bool) -> None:
        # cost grows with the cache noise, so a benchmark can tell configs apart
        steps = tokens.size if one_by_one else 1
        for _ in range(steps):
            self.model.w_prev[tokens[: max(1, tokens.size // steps)] % FAKE_VOCAB].sum()

    def close(self) -> None:
        if self._out is not None:  # llama.cpp frees the buffer: a view read after this is garbage
            self._out[:] = np.nan


class FakeBackend:
    def __init__(self, noise_scale: float = 1.0, chunk_effect: float = 0.0) -> None:
        self.noise_scale = noise_scale
        self.chunk_effect = chunk_effect

    def info(self) -> BackendInfo:
        return BackendInfo(llama_cpp_python="fake", llama_cpp="fake", gpu_offload=False, system_info="fake")

    def load(self, model: ModelLoad) -> FakeModel:
        return FakeModel(model.path, self.noise_scale, self.chunk_effect, model.spread_facts())

    def quantize(self, src: str, dst: str, weight_type: str) -> None:
        seed = _fake_params(src)[0]
        write_fake_gguf(Path(dst), seed=seed, weight_noise=FAKE_WEIGHT_NOISE[weight_type])


class FakeEngine(LocalEngine):
    """The real engine logic over the fake model, in-process. ``noise_scale`` scales every cache
    type's noise (a way to stage a quality regression in tests); ``chunk_effect`` gives each chunk a
    noise level of its own (log-normal, this σ), so its tokens are correlated as real ones are."""

    def __init__(self, top_k: int = 32, tail_samples: int = 16, threads: int | None = None,
                 noise_scale: float = 1.0, chunk_effect: float = 0.0) -> None:
        super().__init__(FakeBackend(noise_scale, chunk_effect), top_k=top_k, tail_samples=tail_samples,
                         threads=threads)


CONFTEST = '''
from pytest_kvquality.testing import FakeEngine

def pytest_kvquality_make_engine(config):
    return FakeEngine()
'''
