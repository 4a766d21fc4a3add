"""The worker's request protocol, declared once: each operation is an ``Engine`` method, the
dataclass of its arguments and the type of its reply. The client (``client.py``) encodes calls
and decodes replies with it; the worker (``worker.py``) decodes calls and encodes replies with it.

A value travels by its declared type: arrays (``np.ndarray``, the arrays of ``ReferenceRows`` and
``TokenStats``) as raw arrays of the ipc message, everything else in its JSON header.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..cache_config import CacheConfig
from ..generation import Divergence, Generations
from ..metrics import ReferenceRows, TokenStats
from ..sequences import Sequences
from .ipc import Arrays, Header
from .protocol import (
    BackendInfo,
    CandidateRun,
    ContextFacts,
    DivergenceRun,
    GenerationRun,
    ModelFacts,
    ModelLoad,
    ReferenceRun,
    SpeedRun,
    TokenPieces,
)


@dataclass(frozen=True)
class NoArgs:
    pass


@dataclass(frozen=True)
class ModelArgs:
    model: ModelLoad


@dataclass(frozen=True)
class TokenizeArgs:
    model: ModelLoad
    text: str


@dataclass(frozen=True)
class ReferenceArgs:
    model: ModelLoad
    cache: CacheConfig
    chunks: Sequences
    seed: int


@dataclass(frozen=True)
class EvaluateArgs:
    model: ModelLoad
    cache: CacheConfig
    chunks: Sequences
    ref: ReferenceRows


@dataclass(frozen=True)
class PrepareArgs:
    model: ModelLoad
    cache: CacheConfig
    chunks: Sequences


@dataclass(frozen=True)
class ExactArgs:
    model: ModelLoad
    cache: CacheConfig
    ref_model: ModelLoad
    ref_cache: CacheConfig
    chunks: Sequences


@dataclass(frozen=True)
class GenerateReferenceArgs:
    model: ModelLoad
    cache: CacheConfig
    prompts: Sequences
    n_tokens: int
    seed: int


@dataclass(frozen=True)
class GenerateArgs:
    model: ModelLoad
    cache: CacheConfig
    prompts: Sequences
    ref: Generations


@dataclass(frozen=True)
class SpeedArgs:
    model: ModelLoad
    cache: CacheConfig
    n_ctx: int
    phase: str
    tokens: np.ndarray


@dataclass(frozen=True)
class QuantizeArgs:
    src: str
    dst: str
    weight_type: str


@dataclass(frozen=True)
class SleepArgs:
    seconds: float


@dataclass(frozen=True)
class Op:
    """One request: ``name`` is also the ``Engine`` method the worker calls with the arguments."""

    name: str
    args: type
    reply: Any  # a type: the method's return type
    #: what the worker was doing, for the error when it fails
    doing: Callable[[Any], str]


def _table(*ops: Op) -> dict[str, Op]:
    return {op.name: op for op in ops}


OPS = _table(
    Op("info", NoArgs, BackendInfo, lambda a: "reading backend info"),
    Op("describe", ModelArgs, ModelFacts, lambda a: f"loading {a.model.path}"),
    Op("tokenize", TokenizeArgs, np.ndarray, lambda a: f"tokenizing with {a.model.path}"),
    Op("tokenize_pieces", TokenizeArgs, TokenPieces, lambda a: f"tokenizing a chat transcript with {a.model.path}"),
    Op("generate_reference", GenerateReferenceArgs, GenerationRun,
       lambda a: f"generating with the {a.cache.label} reference cache of {a.model.path}"),
    Op("generate", GenerateArgs, DivergenceRun, lambda a: f"generating with {a.model.path}, cache {a.cache.label}"),
    Op("reference", ReferenceArgs, ReferenceRun,
       lambda a: f"building the {a.cache.label} reference of {a.model.path}"),
    Op("evaluate", EvaluateArgs, CandidateRun, lambda a: f"evaluating {a.model.path} with cache {a.cache.label}"),
    Op("prepare", PrepareArgs, type(None), lambda a: f"preparing contexts of {a.model.path} for cache {a.cache.label}"),
    Op("evaluate_exact", ExactArgs, CandidateRun,
       lambda a: f"evaluating {a.model.path} with cache {a.cache.label} (exact)"),
    Op("speed", SpeedArgs, SpeedRun, lambda a: f"timing {a.phase} of {a.model.path} with cache {a.cache.label}"),
    Op("quantize", QuantizeArgs, type(None), lambda a: f"requantizing {a.src} to {a.weight_type}"),
)

#: operations only ``testing.TestingWorkerServer`` answers: a long request, a real SIGSEGV
TEST_OPS = _table(
    Op("sleep", SleepArgs, type(None), lambda a: "sleeping for a test"),
    Op("segfault", NoArgs, type(None), lambda a: "running a deliberate crash"),
)

_ARRAY_GROUPS: dict[Any, Callable[[dict[str, np.ndarray]], Any]] = {
    ReferenceRows: ReferenceRows.from_arrays,
    TokenStats: lambda arrays: TokenStats(**arrays),
    Sequences: Sequences.from_arrays,
    Generations: Generations.from_arrays,
    Divergence: Divergence.from_arrays,
}


def _put(name: str, tp: Any, value: Any, header: Header, arrays: Arrays) -> None:
    if tp is np.ndarray:
        arrays[name] = value
    elif tp in _ARRAY_GROUPS:
        arrays.update({f"{name}.{k}": v for k, v in value.arrays().items()})
    elif tp is CacheConfig:
        header[name] = value.label
    elif tp is ContextFacts:
        header[name] = value.to_dict()
    elif tp is ModelLoad:
        header[name] = dataclasses.asdict(value)
    elif dataclasses.is_dataclass(tp):
        for f, ftp in typing.get_type_hints(tp).items():
            _put(f, ftp, getattr(value, f), header, arrays)
    elif value is not None:
        header[name] = value


def _get(name: str, tp: Any, header: Header, arrays: Arrays) -> Any:
    if tp is np.ndarray:
        return arrays[name]
    if tp in _ARRAY_GROUPS:
        prefix = name + "."
        return _ARRAY_GROUPS[tp]({k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)})
    if tp is CacheConfig:
        return CacheConfig.parse(header[name])
    if tp is ContextFacts:
        return ContextFacts.from_info(header.get(name, {}))
    if tp is ModelLoad:
        return ModelLoad(**header[name])
    if dataclasses.is_dataclass(tp):
        return tp(**{f: _get(f, ftp, header, arrays) for f, ftp in typing.get_type_hints(tp).items()})  # type: ignore[operator]
    return header.get(name)


def encode(tp: Any, value: Any) -> tuple[Header, Arrays]:
    """A value of type ``tp`` (an argument dataclass or a reply) as an ipc header and arrays."""
    header: Header = {}
    arrays: Arrays = {}
    _put("value", tp, value, header, arrays)
    return header, arrays


def decode(tp: Any, header: Header, arrays: Arrays) -> Any:
    return _get("value", tp, header, arrays)


def call_args(args: Any) -> dict[str, Any]:
    """An argument dataclass as the keyword arguments of the engine method."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(args)}
