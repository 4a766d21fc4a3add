"""--kv-corpus: a user corpus's categories drive the thresholds; an unreadable one is an error"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import GATES, LOAD_PLUGIN


def test_user_corpus_categories_drive_thresholds(kv_project: pytest.Pytester, fake_model: Path) -> None:
    kv_project.makefile(".txt", legal="Article 1. The parties agree. " * 40)
    kv_project.makefile(".yaml", gates="version: 1\nmodels:\n  tiny:\n    q8_0:\n      legal: {top1: '> 0.5'}\n")
    result = kv_project.runpytest("--kv-model", str(fake_model), "--kv-corpus", "legal.txt",
                                  "--kv-thresholds", "gates.yaml", "-v")
    result.stdout.fnmatch_lines(["*tiny::q8_0::legal::top1 PASSED*"])
    kv_project.makefile(".txt", legal="short")
    result = kv_project.runpytest("--kv-model", str(fake_model), "--kv-corpus", "legal.txt",
                                  "--kv-thresholds", "gates.yaml")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*category 'legal' tokenizes to 6 tokens*needs at least 128*"])


def test_unreadable_corpus_is_a_collection_error(kv_project: pytest.Pytester, fake_model: Path) -> None:
    kv_project.makefile(".yaml", gates=GATES)
    result = kv_project.runpytest("--kv-model", str(fake_model), "--kv-thresholds", "gates.yaml",
                                  "--kv-corpus", "no-such-dir")
    result.stdout.fnmatch_lines(["*cannot read the corpus: corpus path no-such-dir does not exist*"])
    assert result.ret == pytest.ExitCode.INTERRUPTED


def _chat_record(i: int, score: str = "assistant") -> str:
    return json.dumps({"category": "support", "score": score, "messages": [
        {"role": "system", "content": "You help with orders."},
        {"role": "user", "content": f"Where is order {1000 + i}?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function",
             "function": {"name": "find_order", "arguments": f'{{"id": {1000 + i}}}'}}]},
        {"role": "tool", "tool_call_id": "c1", "name": "find_order", "content": f'{{"status": "shipped", "day": {i}}}'},
        {"role": "assistant", "content": f"Order {1000 + i} shipped on day {i} and arrives in {i % 4 + 2} days."},
    ]})


def test_a_chat_corpus_is_gated_and_reported_by_span(kv_project: pytest.Pytester, fake_model: Path) -> None:
    kv_project.makefile(".jsonl", chat="\n".join(_chat_record(i) for i in range(10)))
    kv_project.makefile(".yaml", gates="version: 1\nmodels:\n  tiny:\n    q8_0:\n      support: {kl_mean: '< 0.5'}\n")
    result = kv_project.runpytest(f"--kv-model={fake_model}", "--kv-corpus=chat.jsonl", "--kv-thresholds=gates.yaml",
                                  "--kv-json=out.json", "-v")
    result.stdout.fnmatch_lines(["*tiny::q8_0::support::kl_mean PASSED*"])
    overall = next(r for r in json.loads((kv_project.path / "out.json").read_text())["results"]
                   if r["category"] == "overall")
    spans = {s["label"]: s["n_tokens"] for s in overall["spans"]}
    assert set(spans) == {"assistant", "tool_call"} and sum(spans.values()) == overall["n_tokens"]
    assert sum(b["n_tokens"] for b in overall["confidence"]) == overall["n_tokens"]
    assert overall["positions"] == []  # no chunk positions in a transcript


def test_a_reference_scored_one_way_is_never_read_for_another(kv_project: pytest.Pytester, fake_model: Path,
                                                             tmp_path: Path) -> None:
    """``score: assistant`` and ``score: all`` score different positions of the same tokens: their
    references must not share a cache file (the key holds the scored positions)."""
    run = [f"--kv-model={fake_model}", "--kv-corpus=chat.jsonl", "--kv-cache=q8_0", "--kv-json=out.json"]
    tokens = {}
    for score in ("assistant", "all"):
        kv_project.makefile(".jsonl", chat="\n".join(_chat_record(i, score) for i in range(10)))
        kv_project.runpytest(*run).assert_outcomes(passed=1)
        doc = json.loads((kv_project.path / "out.json").read_text())
        tokens[score] = next(r["n_tokens"] for r in doc["results"] if r["category"] == "overall")
    assert tokens["all"] > 2 * tokens["assistant"]
    assert len(list((tmp_path / "refs").glob("*.kvqref"))) == 2


def test_gates_measured_on_another_corpus_are_not_applied(kv_project: pytest.Pytester, fake_model: Path) -> None:
    kv_project.makefile(".jsonl", chat="\n".join(_chat_record(i) for i in range(10)))
    kv_project.makefile(".yaml", gates="version: 1\ncorpus: builtin\nmodels:\n  tiny:\n    q8_0:\n"
                                       "      overall: {kl_mean: '< 0.5'}\n")
    result = kv_project.runpytest(f"--kv-model={fake_model}", "--kv-corpus=chat.jsonl", "--kv-thresholds=gates.yaml")
    result.stdout.fnmatch_lines(["*gates.yaml: its gates were measured on corpus builtin, this run scores chat.jsonl "
                                 "(--kv-corpus builtin runs them)*"])
    assert result.ret == pytest.ExitCode.INTERRUPTED


def test_the_same_gate_for_two_corpora_is_not_a_duplicate(kv_project: pytest.Pytester, fake_model: Path) -> None:
    """The shipped text and agent files both gate gemma3-270m q8_0 overall kl_mean: only the file of
    the run's corpus counts, so neither run refuses the other's gate as defined twice."""
    kv_project.makefile(".jsonl", chat="\n".join(_chat_record(i) for i in range(10)))
    gates = kv_project.mkdir("gates")
    (gates / "text.yaml").write_text("version: 1\ncorpus: builtin\nmodels:\n  tiny:\n    q8_0:\n"
                                     "      overall: {kl_mean: '< 0.5'}\n")
    (gates / "chat.yaml").write_text("version: 1\ncorpus: chat.jsonl\nmodels:\n  tiny:\n    q8_0:\n"
                                     "      overall: {kl_mean: '< 0.4'}\n")
    kv_project.makeini(f"""
        [pytest]
        {LOAD_PLUGIN}
        kv_ref_dir = {kv_project.path / "refs"}
        kv_ctx = 64
        kv_thresholds = gates
    """)
    for corpus, applied in ((None, "text"), ("chat.jsonl", "chat")):
        args = [f"--kv-model={fake_model}", "--kv-chunks=8", "-v", "-rA"]
        result = kv_project.runpytest(*args, *([f"--kv-corpus={corpus}"] if corpus else []))
        result.assert_outcomes(passed=1)
        result.stdout.fnmatch_lines([f"gates/{applied}.yaml::tiny::q8_0::overall::kl_mean PASSED*"])
