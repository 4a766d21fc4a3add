"""Session state: models, corpus, references and results of one pytest run.

Longer than our ~350-line limit: it orchestrates every kind of evaluation (scored logits, greedy
generations, speed) over the caches they share (models, plans, references).

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
from typing import Any, TypeVar

import numpy as np

from .breakdown import confidence_profile, span_profile
from .cache_config import CacheConfig
from .corpus import Corpus, CorpusError, builtin_corpus, load_corpus
from .engine.protocol import BackendInfo, ContextFacts, Engine, EngineError, ModelFacts, ModelLoad
from .environment import host_backend
from .generation import Divergence, Generations, GenerationSummary, summarize_generation
from .metrics import ReferenceRows, TokenStats
from .options import KVOptions
from .plan import DEFAULT_GEN_PROMPTS, CategoryPlan, chat_plans, text_plan
from .reference import ReferenceKey, ReferenceStore, Stored, decode_label, tokens_digest
from .registry import ModelNotFound, Registry
from .report import Report, SkipRecord
from .resolve import ResolvedModel, resolve
from .results import ConfigResult, SpeedResult, Verdict, position_profile, summarize_with_bounds
from .sequences import Sequences
from .thresholds import OVERALL
from .uncertainty import GateBound

REFERENCE_SEED = 0
S = TypeVar("S", bound=Stored)
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
    #: set at collection when a threshold gates a generation metric (gen_*)
    wants_generation: bool = False
    _plans: dict[str, dict[str, CategoryPlan]] = field(default_factory=dict)
    _described: dict[str, ModelFacts] = field(default_factory=dict)
    _same_tokenizer: set[tuple[str, str]] = field(default_factory=set)
    _errors: dict[tuple[str, CacheConfig], Exception] = field(default_factory=dict)
    _regenerated: set[str] = field(default_factory=set)
    _info: BackendInfo | None = None
    _doing: str = ""
    #: (model alias, cache config) in the order this process's items evaluate them; None where the
    #: order is not known (an xdist worker is handed its items as it goes)
    planned: list[tuple[str, CacheConfig]] | None = None

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
        o = self.options
        return ModelLoad(str(model.path), o.gpu_layers, o.swa_full, o.rpc, o.split_mode, o.tensor_split,
                         o.n_batch, o.n_ubatch)

    def plans(self, model: ResolvedModel) -> dict[str, CategoryPlan]:
        """What each category decodes and scores with this model's tokenizer (once per model)."""
        key = model.sha256
        if key not in self._plans:
            spec = self.load_spec(model)
            if self.corpus.is_chat:
                entry = self.registry.lookup(model.alias)
                template = self.options.chat_template or (entry.chat_template if entry is not None else None)
                self._plans[key] = chat_plans(self.corpus, self.describe(model), model.alias,
                                              lambda text: self.engine.tokenize_pieces(spec, text), self.options.chunks,
                                              template)
                return self._plans[key]
            out = {}
            for cat, text in self.corpus.texts.items():
                tokens = self.engine.tokenize(spec, text)
                try:
                    out[cat] = text_plan(tokens, self.options.n_ctx, self.options.chunks, cat)
                except CorpusError as e:
                    if not self.options.skip_short_categories:
                        raise
                    self._note(f"category {cat} left out at n_ctx {self.options.n_ctx}: {e}")
            if not out:
                raise CorpusError(f"no corpus category has 2 x {self.options.n_ctx} tokens")
            self._plans[key] = out
        return self._plans[key]

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
            self._note(f"{model.alias} {cache.label}: evaluated with one context, each decode's logits reduced "
                       f"before the next, since a second context (to overlap the KL math with the decoding) could "
                       f"not be created: {context.second_context_error}. Same numbers, slower")

    def _note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def _reference_key(self, model: ResolvedModel, seqs: Sequences, gen_tokens: int = 0) -> ReferenceKey:
        """Text chunks keep the key they always had (the chunk array's digest); chat sequences and
        generation prompts are named by everything they hold, scored positions included."""
        info = self.backend_info()
        digest = tokens_digest(seqs.tokens) if seqs.is_halves() and not gen_tokens else seqs.digest()
        return ReferenceKey(
            model_sha256=model.sha256, tokens_sha256=digest, n_ctx=seqs.width,
            ref_cache=self.options.ref_cache.label, llama_cpp=info.llama_cpp_python,
            top_k=self.engine.top_k, tail_samples=self.engine.tail_samples,
            seed=REFERENCE_SEED, swa_full=self.options.swa_full, gen_tokens=gen_tokens,
            decode=decode_label(self.options.n_batch, self.options.n_ubatch, seqs.width) if not gen_tokens else "",
        )

    def _stored(self, key: ReferenceKey, build: Callable[[], tuple[S, dict[str, Any]]], what: str,
                decode: Callable[[dict[str, np.ndarray]], S]) -> S:
        """What a reference file holds: read when sound, else built and written once across parallel
        workers; ``--kv-regen`` rebuilds each key once per run."""
        rebuild = self.options.regen and key.digest() not in self._regenerated
        out = ReferenceStore(self.options.ref_dir).load_or_build(key, build, rebuild=rebuild, on_damaged=self._note,
                                                                 what=what, decode=decode)
        if rebuild:
            self._regenerated.add(key.digest())
        return out

    def reference(self, model: ResolvedModel, category: str, chunks: Sequences) -> ReferenceRows:
        """Load the cached reference, or build and store it (once across parallel workers)."""
        key = self._reference_key(model, chunks)
        label = f"{self.options.ref_cache.label} reference {model.alias} / {category}"

        def build() -> tuple[ReferenceRows, dict[str, Any]]:
            self._doing = label
            self._say(f"building {label} ({len(chunks)} x {chunks.width} tokens)" if chunks.is_halves() else
                      f"building {label} ({len(chunks)} transcripts, {chunks.n_rows} scored tokens)")
            run = self.engine.reference(self.load_spec(model), self.options.ref_cache, chunks, REFERENCE_SEED)
            return run.rows, {"model": model.alias, "category": category, "seconds": run.seconds,
                              "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}

        return self._stored(key, build, f"the {self.options.ref_cache.label} reference for {model.alias} / {category}",
                            ReferenceRows.from_arrays)

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
        probe = (next(iter(self.corpus.texts.values())) if self.corpus.texts else
                 next(iter(self.corpus.chats.values()))[0].digest_text())[:4000]
        if not np.array_equal(self.engine.tokenize(self.load_spec(model), probe),
                              self.engine.tokenize(self.load_spec(ref), probe)):
            raise EngineError(f"{model.alias} and the reference {ref.alias} tokenize the corpus differently")
        self._same_tokenizer.add((model.sha256, ref.sha256))
        return ref

    def _evaluate(self, model: ResolvedModel, cache: CacheConfig) -> ConfigResult:
        spec = self.load_spec(model)
        ref_model = self.reference_model(model)
        plans = self.plans(ref_model)
        per_cat: dict[str, TokenStats] = {}
        ref_top: list[np.ndarray] = []
        context = ContextFacts()
        seconds = 0.0
        for cat, plan in plans.items():
            chunks = plan.sequences
            ref = None if self.options.exact else self.reference(ref_model, cat, chunks)
            self._doing = f"{model.alias} {cache.label} / {cat}"
            self._say(f"evaluating {self._doing}")
            if ref is None:
                run = self.engine.evaluate_exact(spec, cache, self.load_spec(ref_model), self.options.ref_cache,
                                                 chunks)
            else:
                if not per_cat:  # the engine makes the next one's contexts once this one's exist
                    self._prepare_next(model, cache, chunks)
                run = self.engine.evaluate(spec, cache, chunks, ref)
                ref_top.append(np.exp(ref.top_logp.max(axis=1, initial=-np.inf)))
            per_cat[cat] = run.stats
            context = run.context
            seconds += run.seconds
        summaries = summarize_with_bounds(per_cat, {cat: plan.rows_per_block for cat, plan in plans.items()})
        n_ctx = max(plan.sequences.width for plan in plans.values())
        self._note_context_facts(model, cache, context)
        if context.kv_cpu_fallback:
            self._note(f"{model.alias} {cache.label}: llama.cpp ran {', '.join(context.kv_cpu_ops or ())} "
                       f"over the KV cache on the CPU although the model is on the GPU: this build has no GPU "
                       f"kernel for K={cache.type_k}, V={cache.type_v}. Quality is measured as run; "
                       f"speed suffers.")
        all_stats = TokenStats.concat(list(per_cat.values()))
        generation = self._generation(model, ref_model, cache, plans) if self._generating() else None
        if generation is not None:
            for cat, (summary, bounds) in generation.items():
                summaries[cat].generation = summary.values
                summaries[cat].bounds.update(bounds)
        return ConfigResult(
            model.alias, model.sha256, cache, n_ctx, summaries, seconds, self.options.exact, context,
            [] if self.corpus.is_chat else position_profile(per_cat, self.options.n_ctx),
            ref_model.alias if ref_model is not model else None,
            confidence=confidence_profile(all_stats, np.concatenate(ref_top)) if ref_top else [],
            spans=span_profile(all_stats, np.concatenate([p.sequences.row_spans() for p in plans.values()])),
            generation={cat: g[0] for cat, g in generation.items()} if generation else {})

    def _prepare_next(self, model: ResolvedModel, cache: CacheConfig, chunks: Sequences) -> None:
        """Tell the engine, before this configuration's first evaluation, which configuration of this
        model the run evaluates next (on the same chunks first), so it can create that one's contexts
        while this one decodes, even when the corpus is one category. Not when generating: the
        generation contexts take the kept ones' memory."""
        if self.planned is None or self._generating():
            return
        mine = [c for alias, c in self.planned if alias == model.alias]
        later = mine[mine.index(cache) + 1:] if cache in mine else []
        done = {c for alias, c in [*self.results, *self._errors] if alias == model.alias}
        upcoming = next((c for c in later if c not in done), None)
        if upcoming is not None:
            self.engine.prepare(self.load_spec(model), upcoming, chunks)

    def _generating(self) -> bool:
        return self.options.gen_prompts > 0 or self.wants_generation

    def _generation(self, model: ResolvedModel, ref_model: ResolvedModel, cache: CacheConfig,
                    plans: dict[str, CategoryPlan]) -> dict[str, tuple[GenerationSummary, dict[str, GateBound]]]:
        """Greedy generations with the reference cache (cached like reference logits) and this cache,
        per category; summaries per category and pooled, with bootstrap bounds over prompts."""
        n_prompts = self.options.gen_prompts or DEFAULT_GEN_PROMPTS
        n_tokens, agree = self.options.gen_tokens, self.options.gen_agree
        spec, ref_spec = self.load_spec(model), self.load_spec(ref_model)
        per_cat: dict[str, Divergence] = {}
        decoded, seconds, stepping = 0, 0.0, 0.0
        for cat, plan in plans.items():
            prompts = plan.pick_prompts(n_prompts)
            key = self._reference_key(ref_model, prompts, gen_tokens=n_tokens)
            label = f"{self.options.ref_cache.label} reference generations {ref_model.alias} / {cat}"

            def build(prompts: Sequences = prompts, label: str = label,
                      cat: str = cat) -> tuple[Generations, dict[str, Any]]:
                self._doing = label
                self._say(f"generating {label} ({len(prompts)} prompts x {n_tokens} tokens)")
                run = self.engine.generate_reference(ref_spec, self.options.ref_cache, prompts, n_tokens,
                                                     REFERENCE_SEED)
                return run.generations, {"model": ref_model.alias, "category": cat, "seconds": run.seconds,
                                         "decoded": run.decoded, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}

            gens = self._stored(key, build, f"the reference generations for {ref_model.alias} / {cat}",
                                Generations.from_arrays)
            self._doing = f"{model.alias} {cache.label} generations / {cat}"
            run = self.engine.generate(spec, cache, prompts, gens)
            per_cat[cat] = run.divergence
            decoded += run.decoded
            seconds += run.seconds
            stepping += run.seconds - run.prefill_seconds
        out = {cat: summarize_generation([d], agree) for cat, d in per_cat.items()}
        out[OVERALL] = summarize_generation(list(per_cat.values()), agree, decoded, seconds, stepping)
        rate = f" ({decoded / stepping:,.0f} tok/s one by one, prompts aside)" if stepping > 0 else ""
        self._note(f"{model.alias} {cache.label}: generation divergence over {out[OVERALL][0].n_prompts} prompts, "
                   f"{decoded} tokens decoded one by one in {seconds:.1f} s{rate}")
        return out

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
        tokens = next(iter(self.plans(model).values())).sequences.sequence(0)[: self._speed_tokens(phase)]

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
