"""``engine.context_cache``: contexts kept between evaluations give the same bits as new ones, are
never kept after a failed evaluation, give way when memory runs out, and go before their model."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pytest_kvquality.cache_config import CacheConfig
from pytest_kvquality.corpus import builtin_corpus, chunk_tokens
from pytest_kvquality.engine.protocol import ModelLoad
from pytest_kvquality.metrics import ReferenceRows
from pytest_kvquality.testing import FakeContext, FakeEngine, FakeModel

F16, Q4, Q8 = (CacheConfig.parse(c) for c in ("f16", "q4_0", "q8_0"))


@pytest.fixture
def live(monkeypatch: pytest.MonkeyPatch) -> list[FakeContext]:
    """The fake contexts created and not closed yet."""
    contexts: list[FakeContext] = []
    create, close = FakeModel.context, FakeContext.close

    def context(self: FakeModel, *args: Any, **kwargs: Any) -> FakeContext:
        ctx = create(self, *args, **kwargs)
        contexts.append(ctx)
        return ctx

    def closed(self: FakeContext) -> None:
        contexts.remove(self)
        close(self)

    monkeypatch.setattr(FakeModel, "context", context)
    monkeypatch.setattr(FakeContext, "close", closed)
    return contexts


def science_reference(engine: FakeEngine, model: ModelLoad, n_chunks: int) -> tuple[np.ndarray, ReferenceRows]:
    """``n_chunks`` science chunks of 128 and their f16 reference."""
    chunks = chunk_tokens(engine.tokenize(model, builtin_corpus().texts["science"]), 128, n_chunks, "science")
    return chunks, engine.reference(model, F16, chunks, seed=0).rows


def gate_like(engine: FakeEngine, model: ModelLoad) -> list[dict[str, np.ndarray]]:
    """What a gate does: per category the f16 reference, then q4_0 against it; then q8_0 on each."""
    out = []
    refs = {}
    for cat in ("science", "coding"):
        chunks = chunk_tokens(engine.tokenize(model, builtin_corpus().texts[cat]), 128, 5, cat)
        refs[cat] = (chunks, engine.reference(model, F16, chunks, seed=0).rows)
        out += [refs[cat][1].arrays(), engine.evaluate(model, Q4, chunks, refs[cat][1]).stats.arrays()]
    for chunks, ref in refs.values():
        out.append(engine.evaluate(model, Q8, chunks, ref).stats.arrays())
    return out


def assert_same_bits(got: list[dict[str, np.ndarray]], fresh: list[dict[str, np.ndarray]]) -> None:
    assert len(got) == len(fresh)
    for a, b in zip(got, fresh, strict=True):
        for name in a:
            assert np.array_equal(a[name], b[name]), name


class NewContextsEachTime(FakeEngine):
    """The engine as it was: every evaluation on contexts of its own, closed after it."""

    def reference(self, *args: Any, **kwargs: Any) -> Any:
        self.kept.clear()
        return super().reference(*args, **kwargs)

    def evaluate(self, *args: Any, **kwargs: Any) -> Any:
        self.kept.clear()
        return super().evaluate(*args, **kwargs)


@pytest.mark.parametrize("overlap", ["0", "1"])
def test_kept_contexts_give_the_same_bits_as_new_ones(
    fake_model: Path, monkeypatch: pytest.MonkeyPatch, live: list[FakeContext], overlap: str
) -> None:
    monkeypatch.setenv("KVQ_OVERLAP", overlap)
    model = ModelLoad(str(fake_model), 0, n_batch=256)  # two chunks per decode: three groups per category
    kept = FakeEngine(threads=2)
    got = gate_like(kept, model)
    assert (kept.kept.created, kept.kept.reused) == (3, 3)  # f16, q4_0, q8_0; q4_0 and f16 again, q8_0 again
    assert len(live) == 2 * (2 if overlap == "1" else 1)  # the two most recent sets, idle
    kept.close()
    assert live == []

    assert_same_bits(got, gate_like(NewContextsEachTime(threads=2), model))


def test_an_evaluation_that_fails_closes_its_contexts_instead_of_keeping_them(
    fake_model: Path, monkeypatch: pytest.MonkeyPatch, live: list[FakeContext]
) -> None:
    model = ModelLoad(str(fake_model), 0)
    engine = FakeEngine(threads=2)
    chunks, ref = science_reference(engine, model, 3)
    decode = FakeContext.scored_logits

    def failing(self: FakeContext, group: Any) -> Any:
        if self.cache == Q4:
            raise RuntimeError("llama_decode failed with code -3 at position 0")
        return decode(self, group)

    monkeypatch.setattr(FakeContext, "scored_logits", failing)
    with pytest.raises(RuntimeError, match="code -3"):
        engine.evaluate(model, Q4, chunks, ref)
    assert [c.cache for c in live] == [F16]  # the reference's set, still kept; the failed one closed
    monkeypatch.setattr(FakeContext, "scored_logits", decode)
    engine.evaluate(model, Q4, chunks, ref)
    assert (engine.kept.created, engine.kept.reused) == (3, 0)  # the q4_0 contexts were made anew
    engine.close()


def one_set_at_a_time(monkeypatch: pytest.MonkeyPatch, live: list[FakeContext]) -> None:
    """Memory for one set of contexts: creating a context while any lives is out of memory."""
    create = FakeModel.context

    def one_at_a_time(self: FakeModel, *args: Any, **kwargs: Any) -> FakeContext:
        if live:
            raise RuntimeError("out of memory: llama.cpp could not allocate a context")
        return create(self, *args, **kwargs)

    monkeypatch.setattr(FakeModel, "context", one_at_a_time)


#: what each fake context decoded: (cache, context, sequence lengths, rows asked for)
Decoded = list[tuple[str, int, list[int], int]]


@pytest.fixture
def decoded(monkeypatch: pytest.MonkeyPatch) -> Decoded:
    """Every group a fake context decodes, in order, from any thread."""
    seen: Decoded = []
    decode = FakeContext.scored_logits

    def counting(self: FakeContext, group: Any) -> Any:
        seen.append((self.cache.label, id(self), [t.size for t, _ in group], sum(int(m.sum()) for _, m in group)))
        return decode(self, group)

    monkeypatch.setattr(FakeContext, "scored_logits", counting)
    return seen


def test_out_of_memory_with_contexts_kept_closes_them_and_tries_again(
    fake_model: Path, monkeypatch: pytest.MonkeyPatch, live: list[FakeContext]
) -> None:
    model = ModelLoad(str(fake_model), 0)
    engine = FakeEngine(threads=2)
    chunks, ref = science_reference(engine, model, 2)
    engine.evaluate(model, Q8, chunks, ref)
    assert len(live) == 2
    one_set_at_a_time(monkeypatch, live)
    run = engine.evaluate(model, Q4, chunks, ref)  # fits once the kept f16 and q8_0 contexts are gone
    assert np.isfinite(run.stats.kld).all()
    assert engine.kept.created == 3
    engine.close()


def test_out_of_memory_with_a_set_prepared_closes_it_and_tries_again(
    fake_model: Path, monkeypatch: pytest.MonkeyPatch, live: list[FakeContext]
) -> None:
    """Long chunks keep no set, so only the one made ahead can hold the memory an evaluation needs:
    it gives way, and the evaluation runs."""
    monkeypatch.setenv("KVQ_PREPARE", "1")
    model = ModelLoad(str(fake_model), 0, n_batch=48, n_ubatch=48)
    engine = FakeEngine(threads=2)
    chunks, ref = science_reference(engine, model, 2)
    engine.prepare(model, Q4, chunks)
    engine.evaluate(model, Q8, chunks, ref)  # q4_0's set is made meanwhile and held
    deadline = time.monotonic() + 30
    while not live and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(live) == 1
    one_set_at_a_time(monkeypatch, live)
    run = engine.evaluate(model, F16, chunks, ref)  # the hint was not followed: q4_0's set gives way
    assert np.isfinite(run.stats.kld).all()
    assert (engine.kept.created, engine.kept.prepared) == (3, 0)
    engine.close()
    assert live == []


def test_a_set_named_and_then_taken_at_once_is_made_on_the_caller_s_thread(
    fake_model: Path, monkeypatch: pytest.MonkeyPatch, live: list[FakeContext]
) -> None:
    monkeypatch.setenv("KVQ_PREPARE", "1")
    model = ModelLoad(str(fake_model), 0, n_batch=256)
    engine = FakeEngine(threads=2)
    chunks, ref = science_reference(engine, model, 2)
    engine.prepare(model, Q4, chunks)
    engine.evaluate(model, Q4, chunks, ref)
    assert engine.kept._background is None
    assert (engine.kept.created, engine.kept.prepared) == (2, 0)
    engine.close()


def test_kept_contexts_go_before_their_model(
    fake_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, live: list[FakeContext]
) -> None:
    """llama.cpp frees a model's contexts before the model: closing it first leaves them dangling."""
    from pytest_kvquality.testing import write_fake_gguf

    closed = FakeModel.close

    def close(self: FakeModel) -> None:
        assert not [c for c in live if c.model is self], "a model closed while contexts of it were kept"
        closed(self)

    monkeypatch.setattr(FakeModel, "close", close)
    engine = FakeEngine(threads=2)
    models = [ModelLoad(str(fake_model), 0)]
    for i in (1, 2):
        path = tmp_path / f"other-{i}.gguf"
        write_fake_gguf(path, seed=i)
        models.append(ModelLoad(str(path), 0))
    for m in models:  # the engine keeps two models: loading the third closes the first
        chunks = chunk_tokens(engine.tokenize(m, builtin_corpus().texts["science"]), 128, 1, "science")
        engine.reference(m, F16, chunks, seed=0)
    assert {c.model.path for c in live} == {models[1].path, models[2].path}
    engine.close()
    assert live == []


def test_a_long_chunks_contexts_are_not_kept(fake_model: Path, live: list[FakeContext]) -> None:
    """A chunk longer than the micro-batch is many decodes: creating its context weighs little, and
    its buffers are freed as soon as the evaluation ends (the memory target at n_ctx 32,768)."""
    model = ModelLoad(str(fake_model), 0, n_batch=64, n_ubatch=64)
    engine = FakeEngine(threads=2)
    chunks, ref = science_reference(engine, model, 2)
    for _ in range(2):
        engine.evaluate(model, Q4, chunks, ref)
        assert live == []
    assert (engine.kept.created, engine.kept.reused) == (3, 0)
    engine.close()


def gate_with_hints(engine: FakeEngine, model: ModelLoad) -> list[dict[str, np.ndarray]]:
    """What a gate with cached references does: q8_0 then q4_0 on each category, the session saying
    before q8_0's first category that q4_0 comes next (``KVSession._prepare_next``)."""
    cats = {cat: chunk_tokens(engine.tokenize(model, builtin_corpus().texts[cat]), 128, 5, cat)
            for cat in ("science", "coding")}
    refs = {cat: engine.reference(model, F16, chunks, seed=0).rows for cat, chunks in cats.items()}
    engine.kept.clear()  # the references came from the cache: no f16 contexts
    out = []
    for cache, upcoming in ((Q8, Q4), (Q4, None)):
        for i, (cat, chunks) in enumerate(cats.items()):
            if i == 0 and upcoming is not None:
                engine.prepare(model, upcoming, chunks)
            out.append(engine.evaluate(model, cache, chunks, refs[cat]).stats.arrays())
    return out


def test_contexts_prepared_ahead_give_the_same_bits_and_are_used(
    fake_model: Path, monkeypatch: pytest.MonkeyPatch, live: list[FakeContext]
) -> None:
    monkeypatch.setenv("KVQ_OVERLAP", "1")
    monkeypatch.setenv("KVQ_PREPARE", "1")  # the fake runs "on the CPU", where preparing is off by default
    model = ModelLoad(str(fake_model), 0, n_batch=256)
    ahead = FakeEngine(threads=2)
    got = gate_with_hints(ahead, model)
    # made: the references' f16 set and q8_0's; prepared: q4_0's; reused: each set's second category
    assert (ahead.kept.created, ahead.kept.prepared, ahead.kept.reused) == (2, 1, 3)
    ahead.close()
    assert live == []

    monkeypatch.setenv("KVQ_PREPARE", "0")
    fresh_engine = NewContextsEachTime(threads=2)
    assert_same_bits(got, gate_with_hints(fresh_engine, model))
    assert fresh_engine.kept.prepared == 0


def test_preparing_decodes_the_widest_group_once_on_each_context(
    fake_model: Path, monkeypatch: pytest.MonkeyPatch, live: list[FakeContext], decoded: Decoded
) -> None:
    """llama.cpp grows a context's logits buffer to the most rows one decode asks for: the priming
    decode asks for as many as the evaluation's largest group, so no decode of it grows the buffer.
    The named set is made while the evaluation before it runs, after that one's set exists."""
    monkeypatch.setenv("KVQ_OVERLAP", "1")
    monkeypatch.setenv("KVQ_PREPARE", "1")
    model = ModelLoad(str(fake_model), 0, n_batch=256)
    engine = FakeEngine(threads=2)
    chunks, ref = science_reference(engine, model, 3)  # groups of 2 and 1 chunks
    engine.prepare(model, Q4, chunks)
    assert engine.kept._background is None  # named only: nothing competes with q8_0's contexts being made
    engine.evaluate(model, Q8, chunks, ref)
    engine.evaluate(model, Q4, chunks, ref)
    assert engine.kept.prepared == 1
    mine = [d[1:] for d in decoded if d[0] == "q4_0"]
    primed, evaluated = mine[:2], mine[2:]
    assert len({ctx for ctx, _, _ in primed}) == 2  # each context of the set, once
    assert {rows for _, _, rows in primed} == {max(rows for _, _, rows in evaluated)} == {2 * 63}
    engine.close()


def test_long_chunks_are_primed_with_their_busiest_micro_batch(
    fake_model: Path, monkeypatch: pytest.MonkeyPatch, live: list[FakeContext], decoded: Decoded
) -> None:
    """A chunk decoded a micro-batch per call (n_ctx 32,768: 64 calls) is primed with one micro-batch
    asking for as many rows as its busiest one, not with the whole chunk."""
    monkeypatch.setenv("KVQ_PREPARE", "1")
    model = ModelLoad(str(fake_model), 0, n_batch=48, n_ubatch=48)  # chunks of 128: micro-batches of 48
    engine = FakeEngine(threads=2)
    chunks, ref = science_reference(engine, model, 2)
    engine.prepare(model, Q4, chunks)
    engine.evaluate(model, Q8, chunks, ref)
    engine.evaluate(model, Q4, chunks, ref)
    assert engine.kept.prepared == 1
    mine = [(sizes, rows) for cache, _, sizes, rows in decoded if cache == "q4_0"]
    # positions 64..126 scored: the micro-batch at 48..95 asks for 32 rows, the one at 96..127 for 31
    assert mine[0] == ([48], 32)
    assert mine[1:] == [([128], 63), ([128], 63)]
    engine.close()
    assert live == []


def test_a_preparation_that_fails_is_said_and_the_contexts_made_when_needed(
    fake_model: Path, monkeypatch: pytest.MonkeyPatch, live: list[FakeContext], capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("KVQ_OVERLAP", "1")
    monkeypatch.setenv("KVQ_PREPARE", "1")
    model = ModelLoad(str(fake_model), 0)
    engine = FakeEngine(threads=2)
    chunks, ref = science_reference(engine, model, 2)
    create = FakeModel.context
    failures = [RuntimeError("out of memory: llama.cpp could not allocate a context")]

    def failing_once(self: FakeModel, *args: Any, **kwargs: Any) -> FakeContext:
        if failures:
            raise failures.pop()
        return create(self, *args, **kwargs)

    monkeypatch.setattr(FakeModel, "context", failing_once)
    engine.prepare(model, Q4, chunks)
    engine.reference(model, F16, chunks, seed=0)  # the f16 set, kept: q4_0's is made meanwhile, and fails
    run = engine.evaluate(model, Q4, chunks, ref)
    assert np.isfinite(run.stats.kld).all()
    assert (engine.kept.prepared, engine.kept.created) == (0, 2)  # the f16 reference's set and q4_0's, made now
    assert "contexts prepared ahead could not be made (RuntimeError: out of memory" in capsys.readouterr().err
    engine.close()
    assert live == []


def test_prepared_contexts_go_before_their_model_and_with_the_engine(
    fake_model: Path, monkeypatch: pytest.MonkeyPatch, live: list[FakeContext]
) -> None:
    """A set prepared for an evaluation that never came (a hint the run did not follow) is closed
    when its model goes, after its background creation ended."""
    monkeypatch.setenv("KVQ_OVERLAP", "1")
    monkeypatch.setenv("KVQ_PREPARE", "1")
    closed = FakeModel.close

    def close(self: FakeModel) -> None:
        assert not [c for c in live if c.model is self], "a model closed while contexts of it were prepared"
        closed(self)

    monkeypatch.setattr(FakeModel, "close", close)
    model = ModelLoad(str(fake_model), 0)
    engine = FakeEngine(threads=2)
    chunks, _ = science_reference(engine, model, 2)
    engine.prepare(model, Q4, chunks)
    engine.prepare(model, Q8, chunks)  # one at a time: ignored while q4_0's is named
    engine.reference(model, F16, chunks, seed=0)  # the f16 set, kept: q4_0's is made meanwhile
    engine.close()
    assert live == []
    assert engine.kept.prepared == 0


def test_nothing_is_prepared_on_the_cpu_by_default(
    fake_model: Path, monkeypatch: pytest.MonkeyPatch, live: list[FakeContext]
) -> None:
    """On a CPU build the priming decode would take the cores the evaluation decodes on."""
    monkeypatch.setenv("KVQ_OVERLAP", "1")
    monkeypatch.delenv("KVQ_PREPARE", raising=False)
    model = ModelLoad(str(fake_model), 0, n_batch=256)
    engine = FakeEngine(threads=2)
    chunks, ref = science_reference(engine, model, 2)
    engine.prepare(model, Q4, chunks)
    engine.evaluate(model, Q8, chunks, ref)
    assert engine.kept._background is None
    engine.evaluate(model, Q4, chunks, ref)
    assert (engine.kept.prepared, engine.kept.created) == (0, 3)
    engine.close()


#: an engine that logs each hint and, at the end, how many prepared sets its evaluations used
HINTS_CONFTEST = """
import os
from pytest_kvquality.testing import FakeEngine

class Hinted(FakeEngine):
    def _log(self, line):
        with open(os.environ["KVQ_HINT_LOG"], "a") as f:
            f.write(line + "\\n")

    def prepare(self, model, cache, chunks):
        self._log(f"prepare {cache.label}")
        super().prepare(model, cache, chunks)

    def evaluate(self, model, cache, chunks, ref):
        self._log(f"evaluate {cache.label}")
        return super().evaluate(model, cache, chunks, ref)

    def close(self):
        self._log(f"prepared sets used: {self.kept.prepared}")
        super().close()

def pytest_kvquality_make_engine(config):
    return Hinted()
"""


def test_the_session_names_the_next_configuration_before_the_first_category(
    kv_project: pytest.Pytester, fake_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In item order: before q8_0 is evaluated q4_0 is named, before q4_0 is, q8_0/q4_0; the last names
    nothing. The prepared sets are used, and the JSON is the same with preparing off."""
    kv_project.makeconftest(HINTS_CONFTEST)
    monkeypatch.setenv("KVQ_OVERLAP", "1")
    n_cats = len(builtin_corpus().categories)
    expected = []
    for cache, upcoming in (("q8_0", "q4_0"), ("q4_0", "q8_0/q4_0"), ("q8_0/q4_0", None)):
        expected += [f"prepare {upcoming}"] if upcoming else []
        expected += [f"evaluate {cache}"] * n_cats
    results = {}
    for prepare in ("1", "0"):
        log, out = tmp_path / f"hints-{prepare}.log", tmp_path / f"out-{prepare}.json"
        monkeypatch.setenv("KVQ_HINT_LOG", str(log))
        monkeypatch.setenv("KVQ_PREPARE", prepare)
        kv_project.runpytest(f"--kv-model={fake_model}", "--kv-cache", "q8_0,q4_0,q8_0/q4_0", "--kv-chunks", "4",
                             "--kv-json", str(out)).assert_outcomes(passed=3)
        assert log.read_text().splitlines() == [*expected, f"prepared sets used: {2 if prepare == '1' else 0}"]
        results[prepare] = [{k: v for k, v in r.items() if k != "eval_seconds"}
                            for r in json.loads(out.read_text())["results"]]
    assert results["1"] == results["0"]


def test_an_xdist_worker_names_nothing(fake_model: Path) -> None:
    """A worker is handed its items as it goes: the collected order is not its own."""
    import types

    from pytest_kvquality.collect import plan_order
    from pytest_kvquality.state import STATE

    state = types.SimpleNamespace(session=types.SimpleNamespace(planned=None))
    stash = pytest.Stash()
    stash[STATE] = state  # type: ignore[assignment]
    worker = types.SimpleNamespace(stash=stash, workerinput={"workerid": "gw0"})
    plan_order(types.SimpleNamespace(config=worker, items=[]))  # type: ignore[arg-type]
    assert state.session.planned is None
    plan_order(types.SimpleNamespace(config=types.SimpleNamespace(stash=stash), items=[]))  # type: ignore[arg-type]
    assert state.session.planned == []
