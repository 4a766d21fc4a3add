"""Session state: models, corpus, references and results of one pytest run.

Everything expensive is computed once and memoised: a model is resolved and
tokenized once, each reference is loaded or built once (under a file lock, so
parallel workers share it), and each (model, cache config) is evaluated once
however many thresholds and tests read it. Failures are memoised too, so a
crash fails every test that needed that evaluation with the same message.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .cache_config import CacheConfig
from .corpus import Corpus, CorpusError, builtin_corpus, chunk_tokens, load_corpus
from .engine.protocol import BackendInfo, ContextFacts, Engine, EngineError, ModelFacts, ModelLoad
from .environment import host_backend
from .metrics import ReferenceRows, TokenStats
from .options import KVOptions
from .reference import (
    ReferenceKey,
    ReferenceStore,
    tokens_digest,
)
from .registry import ModelNotFound, Registry
from .report import Report, SkipRecord
from .resolve import ResolvedModel, resolve
from .results import ConfigResult, SpeedResult, Verdict, position_profile, summarize_with_bounds

REFERENCE_SEED = 0
#: tokens generated one by one in a tg speed round (llama-bench's tg128)
TG_TOKENS = 128


class ModelUnavailable(RuntimeError):
    """The model cannot be had here (not registered, file missing): a skip, or a failure under --kv-require."""


@dataclass
class KVSession:
    options: KVOptions
    engine_factory: Callable[[], Engine]
    registry: Registry = field(default_factory=Registry)
    notes: list[str] = field(default_factory=list)
    verdicts: list[Verdict] = field(default_factory=list)
    results: dict[tuple[str, CacheConfig], ConfigResult] = field(default_factory=dict)
    speeds: list[SpeedResult] = field(default_factory=list)
    #: items skipped because their model is not available here (ini-selected models only)
    skipped: list[SkipRecord] = field(default_factory=list)
    progress: Callable[[str], None] | None = None
    _engine: Engine | None = None
    _corpus: Corpus | None = None
    _models: dict[str, ResolvedModel | Exception] = field(default_factory=dict)
    _chunks: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    _described: dict[str, ModelFacts] = field(default_factory=dict)
    _same_tokenizer: set[tuple[str, str]] = field(default_factory=set)
    _errors: dict[tuple[str, CacheConfig], Exception] = field(default_factory=dict)
    _regenerated: set[str] = field(default_factory=set)
    _info: BackendInfo | None = None
    _doing: str = ""

    # ------------------------------------------------------------ pieces

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            self._engine = self.engine_factory()
            if hasattr(self._engine, "on_progress"):
                self._engine.on_progress = self._progress_line
        return self._engine

    def _progress_line(self, p: dict[str, Any]) -> None:
        rate = p["tokens"] / p["seconds"] if p["seconds"] > 0 else 0.0
        eta = p["seconds"] * (p["total"] - p["chunks"]) / max(p["chunks"], 1)
        self._say(f"  {self._doing}: {p['chunks']}/{p['total']} chunks, {p['tokens']} tokens, "
                  f"{rate:.0f} tok/s, ETA {eta:.0f} s")

    @property
    def corpus(self) -> Corpus:
        if self._corpus is None:
            self._corpus = load_corpus(self.options.corpus) if self.options.corpus else builtin_corpus()
        return self._corpus

    def backend_info(self) -> BackendInfo:
        if self._info is None:
            self._info = self.engine.info()
        return self._info

    def _say(self, text: str) -> None:
        if self.progress is not None:
            self.progress(text)

    def model(self, name: str) -> ResolvedModel:
        if name not in self._models:
            try:
                self._models[name] = found = resolve(name, self.registry, self.options.cache_dir,
                                                     download=self.options.download)
                if found.found_in:
                    self._note(f"model {found.alias}: {found.found_in}")
            except ModelNotFound as e:
                self._models[name] = ModelUnavailable(str(e))
        m = self._models[name]
        if isinstance(m, Exception):
            raise m
        return m

    def load_spec(self, model: ResolvedModel) -> ModelLoad:
        return ModelLoad(str(model.path), self.options.gpu_layers, self.options.swa_full)

    def chunks(self, model: ResolvedModel) -> dict[str, np.ndarray]:
        """Tokenized, chunked corpus per category for this model's tokenizer."""
        key = model.sha256
        if key not in self._chunks:
            spec = self.load_spec(model)
            out = {}
            for cat, text in self.corpus.texts.items():
                tokens = self.engine.tokenize(spec, text)
                try:
                    out[cat] = chunk_tokens(tokens, self.options.n_ctx, self.options.chunks, cat)
                except CorpusError as e:
                    if not self.options.skip_short_categories:
                        raise
                    self._note(f"category {cat} left out at n_ctx {self.options.n_ctx}: {e}")
            if not out:
                raise CorpusError(f"no corpus category has 2 x {self.options.n_ctx} tokens")
            self._chunks[key] = out
        return self._chunks[key]

    def describe(self, model: ResolvedModel) -> ModelFacts:
        """The model's hyperparameters as llama.cpp reads them (once per model)."""
        if model.sha256 not in self._described:
            self._described[model.sha256] = self.engine.describe(self.load_spec(model))
        return self._described[model.sha256]

    def _note_context_facts(self, model: ResolvedModel, cache: CacheConfig, context: ContextFacts) -> None:
        """Notes about what the engine read from llama.cpp: KV sizes that disagree with the GGUF
        geometry (kv_memory.py) or are missing (a llama.cpp whose log changed); a second context
        that could not be created."""
        if context.kv_bytes_per_token is None:
            self._note(f"{model.alias} {cache.label}: llama.cpp's log gave no KV cache sizes; KV memory is "
                       "not reported")
        elif context.kv_mismatch:
            self._note(f"{model.alias} {cache.label}: KV memory from llama.cpp's log and from the GGUF "
                       f"hyperparameters disagree: {context.kv_mismatch}")
        if context.second_context_error:
            self._note(f"{model.alias} {cache.label}: evaluated with one context and a copy of every logits "
                       f"batch, since a second context (to overlap the KL math without copies) could not be "
                       f"created: {context.second_context_error}. Same numbers, slower")

    def _note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def reference(self, model: ResolvedModel, category: str, chunks: np.ndarray) -> ReferenceRows:
        """Load the cached reference, or build and store it (once across parallel workers)."""
        info = self.backend_info()
        key = ReferenceKey(
            model_sha256=model.sha256, tokens_sha256=tokens_digest(chunks), n_ctx=chunks.shape[1],
            ref_cache=self.options.ref_cache.label, llama_cpp=info.llama_cpp_python,
            top_k=self.engine.top_k, tail_samples=self.engine.tail_samples,
            seed=REFERENCE_SEED, swa_full=self.options.swa_full,
        )
        rebuild = self.options.regen and key.digest() not in self._regenerated
        label = f"{self.options.ref_cache.label} reference {model.alias} / {category}"

        def build() -> tuple[ReferenceRows, dict[str, Any]]:
            self._doing = label
            self._say(f"building {label} ({chunks.shape[0]} x {chunks.shape[1]} tokens)")
            run = self.engine.reference(self.load_spec(model), self.options.ref_cache, chunks, REFERENCE_SEED)
            return run.rows, {"model": model.alias, "category": category, "seconds": run.seconds,
                              "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}

        rows = ReferenceStore(self.options.ref_dir).load_or_build(
            key, build, rebuild=rebuild, on_damaged=self._note,
            what=f"the {self.options.ref_cache.label} reference for {model.alias} / {category}")
        if rebuild:  # --kv-regen rebuilds each reference once per run, once it is written
            self._regenerated.add(key.digest())
        return rows

    # ------------------------------------------------------------ evaluation

    def evaluate(self, model_name: str, cache: CacheConfig) -> ConfigResult:
        """Evaluate (once) a model with a cache config against its reference, per category."""
        model = self.model(model_name)
        key = (model.alias, cache)
        if key in self._errors:
            raise self._errors[key]
        if key in self.results:
            return self.results[key]
        try:
            result = self._evaluate(model, cache)
        except (EngineError, OSError, ValueError) as e:
            err = EngineError(
                f"evaluating {model.alias} ({model.path}) with cache {cache.label}, "
                f"n_ctx {self.options.n_ctx} failed:\n{e}"
            )
            self._errors[key] = err
            raise err from e
        self.results[key] = result
        return result

    def reference_model(self, model: ResolvedModel) -> ResolvedModel:
        """The model whose f16-cache logits are the reference: ``--kv-ref-model``, else the model itself.

        A different reference GGUF (weights at higher precision) must share the tokenizer."""
        if not self.options.ref_model:
            return model
        ref = self.model(self.options.ref_model)
        if ref.sha256 == model.sha256:
            return model
        if (model.sha256, ref.sha256) in self._same_tokenizer:
            return ref
        mine, theirs = self.describe(model), self.describe(ref)
        if mine.n_vocab != theirs.n_vocab:
            raise EngineError(f"{model.alias} ({mine.n_vocab} tokens) and the reference "
                              f"{ref.alias} ({theirs.n_vocab} tokens) have different vocabularies")
        probe = next(iter(self.corpus.texts.values()))[:4000]
        if not np.array_equal(self.engine.tokenize(self.load_spec(model), probe),
                              self.engine.tokenize(self.load_spec(ref), probe)):
            raise EngineError(f"{model.alias} and the reference {ref.alias} tokenize the corpus differently")
        self._same_tokenizer.add((model.sha256, ref.sha256))
        return ref

    def _evaluate(self, model: ResolvedModel, cache: CacheConfig) -> ConfigResult:
        spec = self.load_spec(model)
        ref_model = self.reference_model(model)
        per_cat: dict[str, TokenStats] = {}
        context = ContextFacts()
        seconds = 0.0
        for cat, chunks in self.chunks(ref_model).items():
            ref = None if self.options.exact else self.reference(ref_model, cat, chunks)
            self._doing = f"{model.alias} {cache.label} / {cat}"
            self._say(f"evaluating {self._doing}")
            if ref is None:
                run = self.engine.evaluate_exact(spec, cache, self.load_spec(ref_model), self.options.ref_cache,
                                                 chunks)
            else:
                run = self.engine.evaluate(spec, cache, chunks, ref)
            per_cat[cat] = run.stats
            context = run.context
            seconds += run.seconds
        summaries = summarize_with_bounds(per_cat, self.options.n_ctx // 2 - 1)
        self._note_context_facts(model, cache, context)
        if context.kv_cpu_fallback:
            self._note(f"{model.alias} {cache.label}: llama.cpp ran {', '.join(context.kv_cpu_ops or ())} "
                       f"over the KV cache on the CPU although the model is on the GPU: this build has no GPU "
                       f"kernel for K={cache.type_k}, V={cache.type_v}. Quality is measured as run; "
                       f"speed suffers.")
        return ConfigResult(model.alias, model.sha256, cache, self.options.n_ctx, summaries,
                            seconds, self.options.exact, context, position_profile(per_cat, self.options.n_ctx),
                            ref_model.alias if ref_model is not model else None)

    def to_report(self) -> Report:
        """This process's results as a mergeable report."""
        environment: dict[str, Any] = {}
        if self._info is not None:
            environment.update(llama_cpp_python=self._info.llama_cpp_python, llama_cpp=self._info.llama_cpp,
                               gpu_offload=self._info.gpu_offload)
            environment["ggml"] = host_backend().ggml
        if self.results:
            environment.update(corpus=self.corpus.name, corpus_sha256=self.corpus.content_hash(),
                               reference_cache=self.options.ref_cache.label,
                               models={r.model: r.model_sha256 for r in self.results.values()})
        return Report.of(self.results.values(), self.verdicts, self.speeds, notes=self.notes, skipped=self.skipped,
                         environment=environment)

    def record_verdict(self, verdict: Verdict) -> None:
        self.verdicts.append(verdict)

    def _speed_tokens(self, phase: str) -> int:
        """Tokens per speed round: a prompt of n_ctx (pp), or TG_TOKENS generated (tg)."""
        return self.options.n_ctx if phase == "pp" else min(TG_TOKENS, self.options.n_ctx)

    def speed_target(self, model_name: str, cache: CacheConfig, phase: str) -> Callable[[], float]:
        """A function that times one pp (a prompt of n_ctx tokens) or tg (128 tokens, one per decode)
        pass in the model worker and returns llama.cpp's seconds; for pytest-benchmark."""
        model = self.model(model_name)
        spec = self.load_spec(model)
        n_ctx = self.options.n_ctx
        tokens = next(iter(self.chunks(model).values()))[0][: self._speed_tokens(phase)]

        def run_once() -> float:
            run = self.engine.speed(spec, cache, n_ctx, phase, tokens)
            return run.seconds

        return run_once

    def record_speed(self, model_name: str, cache: CacheConfig, phase: str, seconds: list[float]) -> SpeedResult:
        """Keep the median speed of the timed rounds for the summary table and JSON."""
        model = self.model(model_name)
        n_tokens = self._speed_tokens(phase)
        result = SpeedResult(model.alias, cache, phase, self.options.n_ctx, n_tokens,
                             n_tokens / float(np.median(seconds)))
        self.speeds.append(result)
        return result

    def close(self) -> None:
        if self._engine is not None:
            self._engine.close()
            self._engine = None
