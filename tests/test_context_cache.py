"""``engine.context_cache``: contexts kept between evaluations give the same bits as new ones, are
never kept after a failed evaluation, give way when memory runs out, and go before their model."""

from __future__ import annotations

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

    fresh = gate_like(NewContextsEachTime(threads=2), model)
    assert len(got) == len(fresh)
    for a, b in zip(got, fresh, strict=True):
        for name in a:
            assert np.array_equal(a[name], b[name]), name


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


def test_out_of_memory_with_contexts_kept_closes_them_and_tries_again(
    fake_model: Path, monkeypatch: pytest.MonkeyPatch, live: list[FakeContext]
) -> None:
    model = ModelLoad(str(fake_model), 0)
    engine = FakeEngine(threads=2)
    chunks, ref = science_reference(engine, model, 2)
    engine.evaluate(model, Q8, chunks, ref)
    assert len(live) == 2
    create = FakeModel.context

    def one_at_a_time(self: FakeModel, *args: Any, **kwargs: Any) -> FakeContext:
        if live:
            raise RuntimeError("out of memory: llama.cpp could not allocate a context")
        return create(self, *args, **kwargs)

    monkeypatch.setattr(FakeModel, "context", one_at_a_time)
    run = engine.evaluate(model, Q4, chunks, ref)  # fits once the kept f16 and q8_0 contexts are gone
    assert np.isfinite(run.stats.kld).all()
    assert engine.kept.created == 3
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
