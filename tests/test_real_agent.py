"""The bundled Gemma 3 270M on chat transcripts: Gemma's tokenizer and template score exactly the
assistant's tokens; the built-in agent corpus runs end to end on a slice; a generation-divergence
gate fails q4_0 and passes q8_0."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import PLUGIN_ARGS

from pytest_kvquality.chat import ChatTemplate, label_positions, render_transcript, template_source, transcript
from pytest_kvquality.corpus import AGENT_FILE, load_corpus
from pytest_kvquality.engine.client import WorkerEngine
from pytest_kvquality.engine.protocol import ModelLoad

pytestmark = pytest.mark.real_model

HAND_WRITTEN = {"messages": [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is the capital of Norway?"},
    {"role": "assistant", "content": "Oslo."},
    {"role": "user", "content": "Convert 10 EUR to NOK."},
    {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {
        "name": "convert", "arguments": '{"amount": 10, "to": "NOK"}'}}]},
    {"role": "tool", "tool_call_id": "c1", "name": "convert", "content": "117.2"},
    {"role": "assistant", "content": "10 EUR is 117.2 NOK."},
]}


def test_gemma_scores_exactly_the_assistants_tokens(engine: WorkerEngine, gemma: ModelLoad) -> None:
    """Every scored token, decoded, is the assistant's text: its answers and its tool-call JSON, each
    closed by ``<end_of_turn>``, in order; the user's, the system's and the tool's words never."""
    facts = engine.describe(gemma)
    template = ChatTemplate(template_source("gemma3"), facts.bos_token, facts.eos_token, "gemma3-270m")
    rendered = render_transcript(transcript(HAND_WRITTEN, "hand.jsonl:1", "d"), template)
    pieces = engine.tokenize_pieces(gemma, rendered.text)
    assert pieces.tokens[0] == 2 and pieces.tokens[1] != 2  # one BOS: the template's, parsed as special
    spans = label_positions(rendered, pieces.tokens, pieces.starts, "assistant")
    scored_ids = pieces.tokens[np.flatnonzero(spans) + 1]
    data = rendered.text.encode()
    ends = [*pieces.starts[1:].tolist(), len(data)]
    scored_text = b"".join(data[pieces.starts[i]:ends[i]] for i in np.flatnonzero(spans) + 1).decode()
    call = json.dumps({"tool_calls": [{"name": "convert", "arguments": {"amount": 10, "to": "NOK"}}]}, indent=2)
    assert scored_text == f"Oslo.<end_of_turn>{call}<end_of_turn>10 EUR is 117.2 NOK.<end_of_turn>"
    # the same ids as the assistant's texts tokenized alone (no BOS): nothing merged across a turn
    alone = [engine.tokenize_pieces(gemma, t + "<end_of_turn>").tokens[1:] for t in
             ("Oslo.", call, "10 EUR is 117.2 NOK.")]
    assert scored_ids.tolist() == np.concatenate(alone).tolist()
    assert "<end_of_turn>" in facts.eos_token or facts.eos_token  # Gemma ends a turn with it or <eos>


def _runpytest(pytester: pytest.Pytester, *args: str, caches: str = "q8_0,q4_0") -> pytest.RunResult:
    return pytester.runpytest_subprocess(*PLUGIN_ARGS, "-p", "no:cacheprovider", "--kv-model=gemma3-270m",
                                         f"--kv-cache={caches}", *args, timeout=900)


def test_the_agent_corpus_runs_on_a_slice(pytester: pytest.Pytester, tmp_path: Path, engine: WorkerEngine,
                                         gemma: ModelLoad) -> None:
    """README: ``pytest --kv-model gemma3-270m --kv-corpus builtin:agent --kv-cache q8_0,q4_0``, on one
    config (q8_0 against q4_0 on chat text: the generation gate below) and the first chat and tool-use
    transcripts. The long sessions' decode (1,700 tokens and more each, 80 % of this slice's time on
    the CPU) is left to the GPU run of the whole corpus; every transcript of the corpus, long sessions
    included, renders with Gemma's template and has assistant tokens to score."""
    facts = engine.describe(gemma)
    template = ChatTemplate(template_source("gemma3"), facts.bos_token, facts.eos_token, "gemma3-270m")
    corpus = load_corpus("builtin:agent")
    for t in (t for ts in corpus.chats.values() for t in ts):
        rendered = render_transcript(t, template)
        pieces = engine.tokenize_pieces(gemma, rendered.text)
        assert label_positions(rendered, pieces.tokens, pieces.starts, "assistant").any(), t.source
    lines = AGENT_FILE.read_text().splitlines()
    first = [next(line for line in lines if f'"category": "{cat}"' in line) for cat in ("chat", "tool_use")]
    (tmp_path / "agent.jsonl").write_text("\n".join(first) + "\n")
    (tmp_path / "no-gates").mkdir()  # the shipped agent gates need 8 transcripts per category: measure only
    result = _runpytest(pytester, f"--kv-corpus={tmp_path / 'agent.jsonl'}", f"--kv-json={tmp_path / 'a.json'}",
                        f"--kv-ref-dir={tmp_path / 'refs'}", f"--kv-thresholds={tmp_path / 'no-gates'}",
                        caches="q4_0")
    result.assert_outcomes(passed=1)
    records = json.loads((tmp_path / "a.json").read_text())["results"]
    assert {r["category"] for r in records} == {"chat", "tool_use", "overall"}
    (overall,) = [r for r in records if r["category"] == "overall"]
    spans = {s["label"]: s for s in overall["spans"]}
    assert set(spans) == {"assistant", "tool_call"}
    assert spans["assistant"]["n_tokens"] + spans["tool_call"]["n_tokens"] == overall["n_tokens"]
    assert 0 < overall["kl_mean"] < 1


def test_a_generation_gate_fails_q4_0_and_passes_q8_0(pytester: pytest.Pytester, tmp_path: Path) -> None:
    """Greedy generations of 32 tokens from the 8 assistant turns of 4 chat transcripts. On the H200
    (2026-12-02) q8_0 reproduced all 8 reference generations and q4_0 2 of them (bound 0..0.5)."""
    chat = [line for line in AGENT_FILE.read_text().splitlines() if '"category": "chat"' in line][:4]
    (tmp_path / "chat.jsonl").write_text("\n".join(chat) + "\n")
    (tmp_path / "gates.yaml").write_text("version: 1\nmodels:\n  gemma3-270m:\n"
                                         "    q8_0: {overall: {gen_identical: '> 0.5'}}\n"
                                         "    q4_0: {overall: {gen_identical: '> 0.5'}}\n")
    result = _runpytest(pytester, f"--kv-corpus={tmp_path / 'chat.jsonl'}",
                        f"--kv-thresholds={tmp_path / 'gates.yaml'}", "--kv-gen=8", "--kv-gen-tokens=32",
                        f"--kv-ref-dir={tmp_path / 'refs'}", "-v")
    result.stdout.fnmatch_lines(["*gemma3-270m::q8_0::overall::gen_identical PASSED*",
                                 "*gemma3-270m::q4_0::overall::gen_identical FAILED*",
                                 "*gen_identical = * threshold > 0.5 not met*"])
    result.stdout.fnmatch_lines(["*generation divergence over 8 prompts, * tokens decoded one by one in * s*"])
