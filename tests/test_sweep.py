"""The model-selection sweep (``python -m pytest_kvquality sweep``) on the fake engine: the grid,
K versus V, rotation, per-position profile, memory and Pareto front, weights × cache compounding,
and a report that degrades to tables without matplotlib."""

from __future__ import annotations

import builtins
import itertools
import json
from pathlib import Path
from typing import Any, ClassVar

import pytest

from pytest_kvquality.cache_config import CacheConfig
from pytest_kvquality.cli import main
from pytest_kvquality.engine.protocol import ContextFacts
from pytest_kvquality.sweep import SweepError, grid, pareto_front, run_sweep
from pytest_kvquality.testing import FakeEngine


@pytest.fixture
def sweep_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("KVQ_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path


def sweep(model: Path, out: Path, *extra: str) -> Any:
    return run_sweep(["--kv-model", str(model), "--kv-ctx", "64", "--kv-chunks", "2", "--out", str(out), *extra],
                     engine_factory=FakeEngine, say=lambda _: None)


def test_grid_covers_k_by_v_and_rotation_only_where_it_applies() -> None:
    configs = grid(["f16", "q4_0"], ["f16", "q4_0"], [True, False])
    labels = [c.label for c in configs]
    assert labels == ["f16", "f16/q4_0", "f16/q4_0:norot", "q4_0/f16", "q4_0/f16:norot", "q4_0", "q4_0:norot"]


def test_pareto_front_keeps_configs_nothing_beats_on_both_axes() -> None:
    # (bytes per token, mean KLD): f16, q8_0, q4_0, a dominated config, a tie in bytes
    points = [(18432, 0.0), (9792, 0.004), (5184, 0.10), (9792, 0.02), (7488, 0.2)]
    assert pareto_front(points) == [2, 1, 0]


def test_sweep_writes_tables_json_and_plots(fake_model: Path, sweep_dir: Path) -> None:
    out = sweep_dir / "report"
    result = sweep(fake_model, out, "--k-types", "f16,q8_0,q4_0", "--v-types", "f16,q8_0,q4_0")
    assert len(result.rows) == 9 + 8  # 3 x 3 with rotation on, and off for the 8 quantized pairs
    assert not result.failures
    by = {r.cache.label: r for r in result.rows}
    assert by["f16"].kl_mean == 0.0
    assert by["q4_0"].kl_mean > by["q8_0"].kl_mean > 0
    assert by["q4_0:norot"].kl_mean > by["q4_0"].kl_mean  # the fake, like llama.cpp, gains from rotation
    report = (out / "report.md").read_text()
    for heading in ("Mean KLD, K type × V type", "Which half carries the loss", "Hadamard rotation on and off",
                    "Per category (mean KLD), memory, top-1 and throughput", "Mean KLD by context position",
                    "Pareto front"):
        assert heading in report, heading
    assert "| q4_0 | " in report and "![pareto](pareto.png)" in report and "![positions](positions.png)" in report
    data = json.loads((out / "sweep.json").read_text())
    row = next(r for r in data["rows"] if r["cache"] == "q4_0")
    spans = [(p["start"], p["end"]) for p in row["positions"]]  # n_ctx 64: positions 32..62 in 8 buckets
    assert len(spans) == 8 and spans[0][0] == 32 and spans[-1][1] == 63
    assert all(a[1] == b[0] for a, b in itertools.pairwise(spans))
    assert sum(p["n_tokens"] for p in row["positions"]) == row_tokens(result, "q4_0")
    assert (out / "pareto.png").stat().st_size > 1000 and (out / "positions.png").stat().st_size > 1000


def row_tokens(result: Any, label: str) -> int:
    r = next(r for r in result.rows if r.cache.label == label)
    return sum(p["n_tokens"] for p in r.positions)


def test_weights_and_cache_losses_compound(fake_model: Path, sweep_dir: Path) -> None:
    result = sweep(fake_model, sweep_dir / "w", "--k-types", "f16,q4_0", "--v-types", "f16,q4_0",
                   "--rotation", "on", "--weights", "Q3_K_M,Q2_K", "--weights-cache", "q8_0,q4_0")
    table = {(c.weights, c.cache): c for c in result.compounding}
    assert set(table) == {("Q3_K_M", "q8_0"), ("Q3_K_M", "q4_0"), ("Q2_K", "q8_0"), ("Q2_K", "q4_0")}
    q3, q2 = table[("Q3_K_M", "q4_0")], table[("Q2_K", "q4_0")]
    assert 0 < q3.kl_weights < q2.kl_weights  # coarser weights, more loss
    assert q3.kl_cache == q2.kl_cache > 0      # the same cache on the original weights
    assert q2.kl_both > max(q2.kl_weights, q2.kl_cache)  # the losses add up ...
    assert abs(q2.excess) < 0.5 * (q2.kl_weights + q2.kl_cache)  # ... roughly like a sum here
    assert "## Weights × cache" in (sweep_dir / "w" / "report.md").read_text()
    assert (sweep_dir / "cache" / "models" / "tiny-requant-Q2_K.gguf").exists()  # made once, kept


def test_without_matplotlib_the_report_is_tables_only(fake_model: Path, sweep_dir: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def no_matplotlib(name: str, *args: Any, **kwargs: Any) -> Any:
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    sweep(fake_model, sweep_dir / "t", "--k-types", "q8_0", "--v-types", "q8_0", "--rotation", "on")
    report = (sweep_dir / "t" / "report.md").read_text()
    assert "matplotlib is not installed (pip install 'pytest-kvquality[plots]'); tables only" in report
    assert not (sweep_dir / "t" / "pareto.png").exists()


def test_a_config_that_cannot_run_is_listed_not_fatal(fake_model: Path, sweep_dir: Path, tmp_path: Path) -> None:
    result = run_sweep(["--kv-model", str(fake_model), "--kv-model", str(tmp_path / "missing.gguf"),
                        "--kv-ctx", "64", "--kv-chunks", "1", "--k-types", "q8_0", "--v-types", "q8_0",
                        "--rotation", "on", "--out", str(tmp_path / "m")], engine_factory=FakeEngine,
                       say=lambda _: None)
    assert len(result.rows) == 1
    assert "missing.gguf" in result.failures[0]
    assert "## Not measured" in (tmp_path / "m" / "report.md").read_text()


def test_cli_usage_and_bad_types(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main([]) == 2
    assert "usage: python -m pytest_kvquality" in capsys.readouterr().err
    assert main(["sweep", "--k-types", "q8_0"]) == 2  # --kv-model is required
    assert "--kv-model" in capsys.readouterr().err
    with pytest.raises(SweepError, match="unknown KV cache type 'q3_k'"):
        run_sweep(["--kv-model", "x", "--k-types", "q3_k"], engine_factory=FakeEngine)
    # from the command line: the message and exit status 2, no traceback
    assert main(["sweep", "--kv-model", "x", "--k-types", "q3_k", "--out", str(tmp_path)]) == 2
    assert "sweep: " in capsys.readouterr().err
    assert CacheConfig.parse("q8_0/q4_0") in grid(["q8_0"], ["q4_0"], [True])


def test_long_contexts_use_the_categories_long_enough(fake_model: Path, sweep_dir: Path) -> None:
    # the fake tokenizes a byte per token: the built-in categories have 42k-123k tokens; at
    # n_ctx 32768 only those with 65,536 tokens or more can be chunked
    result = sweep(fake_model, sweep_dir / "long", "--k-types", "q8_0", "--v-types", "q8_0", "--rotation", "on")
    assert not result.failures
    long = run_sweep(["--kv-model", str(fake_model), "--kv-ctx", "32768", "--kv-chunks", "1", "--k-types", "q8_0",
                      "--v-types", "q8_0", "--rotation", "on", "--out", str(sweep_dir / "long2")],
                     engine_factory=FakeEngine, say=lambda _: None)
    assert len(long.rows) == 1 and len(long.rows[0].categories) < 4
    assert any("left out at n_ctx 32768" in n for n in long.notes)
    assert long.rows[0].positions[-1]["end"] == 32767


class InterruptedEngine(FakeEngine):
    """Ctrl-C arrives while the sweep evaluates its first q4_0 config."""

    evaluated: ClassVar[list[str]] = []
    interrupt: ClassVar[bool] = True

    def evaluate(self, model: Any, cache: CacheConfig, chunks: Any, ref: Any) -> Any:
        InterruptedEngine.evaluated.append(cache.label)
        if cache.label == "q4_0" and InterruptedEngine.interrupt:
            InterruptedEngine.interrupt = False
            raise KeyboardInterrupt
        return super().evaluate(model, cache, chunks, ref)


def test_an_interrupted_sweep_keeps_what_it_measured_and_resume_measures_only_the_rest(
        fake_model: Path, sweep_dir: Path) -> None:
    out = sweep_dir / "resumable"
    args = ["--kv-model", str(fake_model), "--kv-ctx", "64", "--kv-chunks", "1", "--k-types", "q8_0,q4_0",
            "--v-types", "q8_0,q4_0", "--rotation", "on", "--out", str(out)]
    InterruptedEngine.evaluated, InterruptedEngine.interrupt = [], True
    with pytest.raises(KeyboardInterrupt):
        run_sweep(args, engine_factory=InterruptedEngine, say=lambda _: None)
    kept = json.loads((out / "sweep.json").read_text())["rows"]
    assert [r["cache"] for r in kept] == ["q8_0", "q8_0/q4_0", "q4_0/q8_0"]
    InterruptedEngine.evaluated = []
    result = run_sweep([*args, "--resume"], engine_factory=InterruptedEngine, say=lambda _: None)
    assert set(InterruptedEngine.evaluated) == {"q4_0"}  # the three saved configs were not run again
    assert [r.cache.label for r in result.rows] == ["q8_0", "q8_0/q4_0", "q4_0/q8_0", "q4_0"]
    assert result.rows[0].kl_mean == kept[0]["kl_mean"]
    assert len(json.loads((out / "sweep.json").read_text())["environment"]["commands"]) == 2
    # extending a sweep: a new n_ctx and configs outside the grid, in the plugin's syntax
    InterruptedEngine.evaluated = []
    more = run_sweep([*args, "--resume", "--kv-ctx", "64,128", "--kv-cache", "f32,q4_0:norot"],
                     engine_factory=InterruptedEngine, say=lambda _: None)
    assert [(r.n_ctx, r.cache.label) for r in more.rows[4:]] == [
        (64, "f32"), (64, "q4_0:norot"), (128, "q8_0"), (128, "q8_0/q4_0"), (128, "q4_0/q8_0"), (128, "q4_0"),
        (128, "f32"), (128, "q4_0:norot")]
    report = (out / "report.md").read_text()
    assert "## tiny, n_ctx 64" in report and "## tiny, n_ctx 128" in report
    # the report is redrawn from sweep.json alone (e.g. plots on a machine that has matplotlib)
    (out / "report.md").unlink()
    (out / "pareto.png").unlink()
    assert main(["report", str(out)]) == 0
    assert (out / "report.md").read_text() == report and (out / "pareto.png").exists()


def test_resume_refuses_rows_from_another_corpus(fake_model: Path, sweep_dir: Path, tmp_path: Path) -> None:
    out = sweep_dir / "corpus"
    one = ["--k-types", "q8_0", "--v-types", "q8_0", "--rotation", "on"]
    sweep(fake_model, out, *one)
    other = tmp_path / "other-corpus"
    other.mkdir()
    (other / "prose.txt").write_text("A different text. " * 2000)
    with pytest.raises(SweepError, match=r"corpus_sha256: .* there, .* now"):
        sweep(fake_model, out, *one, "--resume", "--kv-cache", "q4_0", "--kv-corpus", str(other))
    assert len(json.loads((out / "sweep.json").read_text())["rows"]) == 1  # nothing mixed in


def test_a_damaged_sweep_json_is_not_resumed_silently(fake_model: Path, sweep_dir: Path) -> None:
    out = sweep_dir / "damaged"
    out.mkdir()
    (out / "sweep.json").write_text('{"rows": [{"model": "tiny"')
    with pytest.raises(SweepError, match=r"cannot read .*sweep\.json"):
        sweep(fake_model, out, "--resume")
    assert (out / "sweep.json").read_text() == '{"rows": [{"model": "tiny"'  # left for the user to look at


def test_speed_puts_prompt_and_generation_rates_next_to_quality(fake_model: Path, sweep_dir: Path) -> None:
    result = sweep(fake_model, sweep_dir / "speed", "--k-types", "q8_0", "--v-types", "q8_0", "--rotation", "on",
                   "--speed")
    (row,) = result.rows
    assert set(row.speed) == {"pp", "tg"} and all(v > 0 for v in row.speed.values())
    assert row.n_tokens > 0 and row.scored_per_s > 0
    report = (sweep_dir / "speed" / "report.md").read_text()
    assert "| pp tok/s | tg tok/s |" in report


def test_kv_mib_per_32k_is_llama_cpps_rule_not_the_per_token_cost_times_32k() -> None:
    """A sliding-window model's KV per token at n_ctx 512 times 32,768 overstates its 32k memory:
    the sweep takes the 32k figure from the context (kv_memory.py), as the plugin's table does."""
    import numpy as np

    from pytest_kvquality.metrics import TokenStats, summarize
    from pytest_kvquality.results import ConfigResult
    from pytest_kvquality.sweep import SweepRow
    from pytest_kvquality.thresholds import OVERALL

    z = np.zeros(4, np.float32)
    summary = summarize(TokenStats(z, z, z, z, np.ones(4, bool)))
    result = ConfigResult("m", "0" * 64, CacheConfig.parse("q4_0"), 512, {OVERALL: summary}, 1.0,
                          context=ContextFacts(kv_bytes_per_token=253440.0, kv_mib_per_32k=1057.5))
    row = SweepRow.of(result)
    assert row.to_json()["kv_mib_per_32k"] == 1057.5  # not 253,440 x 32,768 / 2^20 = 7,920
    assert SweepRow.from_json(row.to_json()).kv_mib_per_32k == 1057.5


def test_a_chat_corpus_sweeps_with_its_categories_as_columns(fake_model: Path, sweep_dir: Path) -> None:
    """The agent metrics in the sweep: a chat corpus's categories are its per-category columns (no
    context-position profile: a transcript has no chunk positions)."""
    record = {"category": "support", "messages": [
        {"role": "user", "content": "Where is my order?"},
        {"role": "assistant", "content": "It shipped on Monday and arrives on Thursday."}]}
    corpus = sweep_dir / "chat.jsonl"
    corpus.write_text("\n".join(json.dumps(record | {"category": c}) for c in ("support", "billing") for _ in range(3)))
    out = sweep_dir / "chat-report"
    result = sweep(fake_model, out, "--kv-corpus", str(corpus), "--k-types", "q8_0,q4_0", "--v-types", "q8_0,q4_0",
                   "--rotation", "on")
    assert not result.failures and len(result.rows) == 4
    report = (out / "report.md").read_text()
    assert "| cache | support | billing | overall ± σ |" in report
    row = json.loads((out / "sweep.json").read_text())["rows"][0]
    assert set(row["categories"]) >= {"support", "billing"} and row["positions"] == []
