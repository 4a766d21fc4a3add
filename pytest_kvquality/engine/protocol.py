"""What the plugin asks of a model runtime (``Engine``), what a runtime asks of llama.cpp or a fake
(``LogitsBackend``), and the typed results that travel between them."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from ..cache_config import CacheConfig
from ..generation import Divergence, Generations
from ..metrics import ReferenceRows, TokenStats
from ..sequences import Sequences

#: Reference compression: exact top-k tokens and m tail samples per scored position.
DEFAULT_TOP_K = 144
DEFAULT_TAIL_SAMPLES = 96

#: speed phases: prompt processing (a batch) and token generation (one token per decode)
SPEED_PHASES = ("pp", "tg")


class EngineError(RuntimeError):
    """An evaluation failed; the message says which model, cache and why."""


class WorkerCrash(EngineError):
    """The model worker process died (native crash, OOM kill)."""


@dataclass(frozen=True)
class ModelLoad:
    """How to load a model: the file, how many layers go to the GPU (-1: all), whether its contexts
    keep sliding-window layers at full size (llama.cpp's swa_full; llama-server's default is off, and
    so is ours), and over which devices it is spread."""

    path: str
    gpu_layers: int = -1
    swa_full: bool = False
    #: ``--kv-rpc``: llama.cpp RPC servers (``host:port,…``) that take layers, "" for none
    rpc: str = ""
    #: ``--kv-split`` and ``--kv-tensor-split``: how layers (or rows) are spread over the devices
    split_mode: str = "layer"
    tensor_split: str = ""
    #: ``--kv-batch`` and ``--kv-ubatch``: the decode geometry of evaluations and references
    #: (llama-perplexity's defaults; see ``decode_geometry``)
    n_batch: int = 2048
    n_ubatch: int = 512

    def spread_facts(self) -> dict[str, Any]:
        """The context facts saying how the model was spread, where it is not one local device."""
        facts: dict[str, Any] = {}
        if self.rpc:
            facts["rpc_servers"] = self.rpc.split(",")
        if self.split_mode != "layer" or self.tensor_split:
            facts.update(split_mode=self.split_mode, tensor_split=self.tensor_split or None)
        return facts


@dataclass(frozen=True)
class ContextFacts:
    """What llama.cpp decided when it created an evaluation context, read from its log and from the
    GGUF (``llama_log``, ``kv_memory``); every field is None when the backend did not say."""

    gpu_layers: int | None = None
    rotation_k: bool | None = None
    rotation_v: bool | None = None
    flash_attn: str | None = None
    #: KV cache as allocated (MiB, cells, layers holding one) and as the GGUF geometry predicts it
    kv_cache_mib: float | None = None
    kv_cells: int | None = None
    kv_layers: int | None = None
    kv_cache_mib_expected: float | None = None
    kv_bytes_per_token: float | None = None
    kv_mib_per_32k: float | None = None
    kv_mib_per_128k: float | None = None
    kv_swa_cells: int | None = None
    kv_swa_full: bool | None = None
    recurrent_state_mib: float | None = None
    kv_mismatch: str | None = None
    #: where the weights went (``CPU_Mapped 120.30 MiB``, ``RPC0[127.0.0.1:50052] 118.10 MiB``), which device
    #: holds each layer's KV cache (``RPC0: layers 9-17``), and the RPC servers and split asked for
    weight_devices: tuple[str, ...] | None = None
    kv_layer_devices: tuple[str, ...] | None = None
    rpc_servers: tuple[str, ...] | None = None
    split_mode: str | None = None
    tensor_split: str | None = None
    #: where the scheduler ran the nodes touching the KV cache (the placement probe)
    kv_devices: tuple[str, ...] | None = None
    kv_cpu_ops: tuple[str, ...] | None = None
    kv_cpu_fallback: bool | None = None
    #: the decode geometry: sequences decoded at once and the micro-batch (``decode_geometry``)
    decode_sequences: int | None = None
    n_ubatch: int | None = None
    #: contexts that took chunks in turn, and why a second one could not be created
    logits_contexts: int | None = None
    second_context_error: str | None = None
    #: each scored row reduced on the device that computed it (``device_reduction``), not on the host
    device_reduction: bool | None = None
    #: seconds spent creating the contexts and inside llama.cpp's decode calls (summed over contexts)
    context_seconds: float | None = None
    decode_seconds: float | None = None

    @classmethod
    def from_info(cls, info: Mapping[str, Any]) -> ContextFacts:
        """From a backend context's ``info``; a key this class does not know is an error (a fact
        that would otherwise be dropped on the way to the report)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(info) - known)
        if unknown:
            raise TypeError(f"context facts not declared in ContextFacts: {', '.join(unknown)}")
        values: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in info.items()}
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """The facts that were said (for JSON and the worker pipe)."""
        return {k: list(v) if isinstance(v, tuple) else v
                for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclass(frozen=True)
class BackendInfo:
    """The model runtime: versions, whether it can offload to a GPU, and which compaction kernel
    builds references (``compiled C`` or ``numpy``; set by ``LocalEngine``)."""

    llama_cpp_python: str
    llama_cpp: str
    gpu_offload: bool
    system_info: str = ""
    cuda_visible_devices: str | None = None
    compaction: str = ""


@dataclass(frozen=True)
class ModelFacts:
    """What a loaded model says of itself (the tokenizer check compares ``n_vocab``)."""

    desc: str
    n_vocab: int
    n_layer: int
    n_ctx_train: int
    gpu_layers: int
    #: the GGUF's ``tokenizer.chat_template`` ("" where it has none) and the texts of BOS and EOS
    chat_template: str = ""
    bos_token: str = ""
    eos_token: str = ""


@dataclass
class Timed:
    seconds: float


@dataclass
class ReferenceRun(Timed):
    rows: ReferenceRows


@dataclass
class CandidateRun(Timed):
    stats: TokenStats
    context: ContextFacts = field(default_factory=ContextFacts)


@dataclass
class TokenPieces:
    """A text tokenized with its special tokens parsed, and the byte offset where each token starts
    (chat transcripts: which tokens the assistant wrote)."""

    tokens: np.ndarray
    starts: np.ndarray


@dataclass
class GenerationRun(Timed):
    """The reference's greedy generations and the tokens decoded one by one to make them."""

    generations: Generations
    decoded: int
    #: of ``seconds``, the time spent decoding the prompts (the rest is one token per decode)
    prefill_seconds: float = 0.0


@dataclass
class DivergenceRun(Timed):
    """The candidate's generations against the reference's, and the tokens decoded to see it."""

    divergence: Divergence
    decoded: int
    context: ContextFacts = field(default_factory=ContextFacts)
    prefill_seconds: float = 0.0


@dataclass
class SpeedRun(Timed):
    """One timed decode: ``seconds`` spent in llama.cpp, measured where it ran."""

    n_tokens: int
    context: ContextFacts = field(default_factory=ContextFacts)


class Engine(Protocol):
    """What the plugin needs from a model runtime."""

    #: reference compression settings (part of the reference cache key)
    top_k: int
    tail_samples: int

    def info(self) -> BackendInfo: ...

    def describe(self, model: ModelLoad) -> ModelFacts: ...

    def tokenize(self, model: ModelLoad, text: str) -> np.ndarray: ...

    def tokenize_pieces(self, model: ModelLoad, text: str) -> TokenPieces: ...

    def reference(self, model: ModelLoad, cache: CacheConfig, chunks: Sequences, seed: int) -> ReferenceRun: ...

    def evaluate(self, model: ModelLoad, cache: CacheConfig, chunks: Sequences,
                 ref: ReferenceRows) -> CandidateRun: ...

    def prepare(self, model: ModelLoad, cache: CacheConfig, chunks: Sequences) -> None:
        """A hint: ``evaluate`` of ``cache`` on ``chunks`` comes after the next evaluation. An engine
        may get ready for it in the background while that one runs (``LocalEngine.prepare``); it must
        never change a result."""
        ...

    def evaluate_exact(self, model: ModelLoad, cache: CacheConfig, ref_model: ModelLoad, ref_cache: CacheConfig,
                       chunks: Sequences) -> CandidateRun: ...

    def generate_reference(self, model: ModelLoad, cache: CacheConfig, prompts: Sequences, n_tokens: int,
                           seed: int) -> GenerationRun: ...

    def generate(self, model: ModelLoad, cache: CacheConfig, prompts: Sequences, ref: Generations) -> DivergenceRun: ...

    def speed(self, model: ModelLoad, cache: CacheConfig, n_ctx: int, phase: str, tokens: np.ndarray) -> SpeedRun: ...

    def quantize(self, src: str, dst: str, weight_type: str) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class ScoredView:
    """The logits of some scored positions of one sequence of a decoded group, in position order."""

    #: which sequence of the group
    member: int
    logits: np.ndarray
    #: valid until this context decodes again (the group's last decode); else only until the next
    #: step of the iterator
    lasting: bool


def group_length(group: list[tuple[np.ndarray, np.ndarray]], n_seq: int, n_ctx: int) -> int:
    """The common length of a group ``LogitsContext.scored_logits`` can decode; an error otherwise."""
    lengths = [tokens.size for tokens, _ in group]
    if not 1 <= len(group) <= n_seq or len(set(lengths)) != 1:
        raise RuntimeError(f"a group of {len(group)} sequences of lengths {lengths}: "
                           f"this context decodes 1 to {n_seq} of equal length")
    if lengths[0] > n_ctx:
        raise RuntimeError(f"a sequence of {lengths[0]} tokens does not fit a context of {n_ctx}")
    return lengths[0]


class LogitsContext(Protocol):
    #: what llama.cpp decided (``ContextFacts`` fields), filled in as the context is created and used
    info: dict[str, Any]
    #: sequences decoded at once (llama-perplexity's n_seq; 1 for generation and speed contexts)
    n_seq: int

    def scored_logits(self, group: list[tuple[np.ndarray, np.ndarray]]) -> Iterator[ScoredView]:
        """Decode up to ``n_seq`` sequences of equal length (tokens, which positions are scored) from
        an empty cache, each in its own sequence; yield the scored positions' logits."""
        ...

    def reduces_on_device(self) -> bool:
        """Whether ``reduced_rows`` can run here (llama.cpp: the backend-sampler library loads)."""
        ...

    def reduced_rows(self, group: list[tuple[np.ndarray, np.ndarray]], ids: list[np.ndarray]) -> Iterator[ScoredView]:
        """``scored_logits`` with each scored row reduced where the logits are: its view holds, per
        row, the argmax (as float), the log-normalizer and the logits at that row's ids (``ids[m]``:
        member m's scored rows in position order, [rows, width] int32)."""
        ...

    def next_logits(self, tokens: np.ndarray, start: int) -> np.ndarray: ...

    def decode_timed(self, tokens: np.ndarray, one_by_one: bool) -> None: ...

    def close(self) -> None: ...


class LogitsModel(Protocol):
    def tokenize(self, text: str) -> np.ndarray: ...

    def tokenize_pieces(self, text: str) -> TokenPieces: ...

    def is_eog(self, token: int) -> bool: ...

    def describe(self) -> ModelFacts: ...

    def context(self, cache: CacheConfig, n_ctx: int, n_seq: int = 1, n_ubatch: int | None = None) -> LogitsContext:
        """A context for ``n_seq`` sequences of up to ``n_ctx`` tokens; ``n_ubatch`` None: the
        micro-batch of generation and speed contexts (``engine.llama``)."""
        ...

    def close(self) -> None: ...


class LogitsBackend(Protocol):
    """One file per backend: ``llama.py`` (llama.cpp, in the worker) and ``fake.py`` (numpy)."""

    def info(self) -> BackendInfo: ...

    def load(self, model: ModelLoad) -> LogitsModel: ...

    def quantize(self, src: str, dst: str, weight_type: str) -> None: ...
