"""chat.py: transcripts are checked record by record, rendered with the model's template (polyfilled
where it cannot render tools), and exactly the tokens the assistant wrote are scored."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pytest_kvquality.chat import ChatTemplate, label_positions, render_transcript, template_source, transcript
from pytest_kvquality.corpus import CorpusError, load_corpus
from pytest_kvquality.engine.fake import FAKE_VOCAB, FakeModel, write_fake_gguf
from pytest_kvquality.plan import chat_plans
from pytest_kvquality.sequences import ASSISTANT, PROMPT, TOOL_CALL

#: a hand-written transcript: a question, a tool call, its result, an answer
WEATHER = {
    "category": "weather",
    "messages": [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "name": "get_weather", "content": "-3 C, snow"},
        {"role": "assistant", "content": "Cold: -3 C and snow."},
    ],
}


def _fake_ids(text: str) -> list[int]:
    """The fake tokenizer: one token per byte."""
    return [b % (FAKE_VOCAB - 2) + 2 for b in text.encode()]


def test_exactly_the_assistants_tokens_are_scored(tmp_path: Path) -> None:
    """Marks the scored token ids of a hand-written transcript: the tool call (polyfilled as JSON:
    Gemma 3's template has no tool support) and the answer, each with its end-of-turn marker, and
    nothing the user or the tool wrote."""
    model = FakeModel(str(write_fake_gguf(tmp_path / "m.gguf")))
    t = transcript(WEATHER, "w.jsonl:1", "default")
    template = ChatTemplate(template_source("gemma3"), "<bos>", "<eos>", "tiny")
    rendered = render_transcript(t, template)
    call = '{\n  "tool_calls": [\n    {\n      "name": "get_weather",\n      "arguments": {\n        "city": "Oslo"\n' \
           '      }\n    }\n  ]\n}'
    assert rendered.text == (
        "<bos><start_of_turn>user\nWeather in Oslo?<end_of_turn>\n"
        f"<start_of_turn>model\n{call}<end_of_turn>\n"
        '<start_of_turn>user\n{\n  "tool_response": {\n    "tool": "get_weather",\n    "content": "-3 C, snow"\n'
        "  }\n}<end_of_turn>\n"
        "<start_of_turn>model\nCold: -3 C and snow.<end_of_turn>\n")
    pieces = model.tokenize_pieces(rendered.text)
    spans = label_positions(rendered, pieces.tokens, pieces.starts, "assistant")
    scored = np.flatnonzero(spans)
    assert pieces.tokens[scored + 1].tolist() == _fake_ids(call + "<end_of_turn>") + \
        _fake_ids("Cold: -3 C and snow.<end_of_turn>")
    assert set(spans[scored].tolist()) == {ASSISTANT, TOOL_CALL}
    assert (spans[scored] == TOOL_CALL).sum() == len(call + "<end_of_turn>")
    only_calls = label_positions(rendered, pieces.tokens, pieces.starts, "tool_calls")
    assert pieces.tokens[np.flatnonzero(only_calls) + 1].tolist() == _fake_ids(call + "<end_of_turn>")
    everything = label_positions(rendered, pieces.tokens, pieces.starts, "all")
    assert np.count_nonzero(everything) == pieces.tokens.size - 1  # every token after BOS
    assert (everything == PROMPT).sum() == pieces.tokens.size - 1 - scored.size


def test_a_template_with_tool_support_renders_calls_natively() -> None:
    native = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% for c in m.tool_calls or [] %}"
              "[call {{ c.function.name }} {{ c.function.arguments }}]{% endfor %}</{{ m.role }}>{% endfor %}"
              "{% if add_generation_prompt %}<assistant>{% endif %}")
    template = ChatTemplate(native, "", "", "toolful")
    assert template.caps.tool_calls and template.caps.tool_responses
    rendered = render_transcript(transcript(WEATHER, "w.jsonl:1", "d"), template)
    assert '[call get_weather {"city": "Oslo"}]</assistant>' in rendered.text
    call_span = [rendered.text.encode()[a:b].decode() for a, b, label in rendered.segments if label == TOOL_CALL]
    assert call_span == ['[call get_weather {"city": "Oslo"}]</assistant>']


@pytest.mark.parametrize(("record", "reason"), [
    ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant message"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [
        {"function": {"name": "f", "arguments": "{not json"}}]}]}, "tool call 'f' are not valid JSON"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "'role' must be one of"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], "score": "tool_calls"},
     "no assistant message makes a tool call"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], "score": "most"},
     "'score' must be one of"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant"}]}, "needs 'content' or 'tool_calls'"),
])
def test_a_bad_record_is_an_error_naming_file_and_line(tmp_path: Path, record: dict[str, object], reason: str) -> None:
    good = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps(good) + "\n\n" + json.dumps(record) + "\n")
    with pytest.raises(CorpusError, match=rf"chat\.jsonl:3: .*{reason}"):
        load_corpus(path)


def test_text_and_chat_records_do_not_mix(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("some text " * 50)
    (tmp_path / "b.jsonl").write_text(json.dumps(WEATHER) + "\n")
    with pytest.raises(CorpusError, match=r"mixes text .* and chat transcripts"):
        load_corpus(tmp_path)


def test_a_transcript_the_template_refuses_names_its_line(tmp_path: Path) -> None:
    """Gemma's template refuses two user turns in a row; the error names the record."""
    model = FakeModel(str(write_fake_gguf(tmp_path / "m.gguf")))
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                                             {"role": "assistant", "content": "c"}]}) + "\n")
    facts = model.describe()
    with pytest.raises(CorpusError, match=r"chat\.jsonl:1: the chat template of tiny cannot render.*alternate"):
        chat_plans(load_corpus(path), facts, "tiny", model.tokenize_pieces, None, "gemma3")


def test_a_model_without_a_template_is_an_error_naming_it(tmp_path: Path) -> None:
    model = FakeModel(str(write_fake_gguf(tmp_path / "m.gguf", chat_template=None)))
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps(WEATHER) + "\n")
    with pytest.raises(CorpusError, match=r"model tiny has no chat template.*--kv-chat-template"):
        chat_plans(load_corpus(path), model.describe(), "tiny", model.tokenize_pieces, None)
    assert "start_of_turn" in template_source("gemma3")


def test_generation_prompts_end_where_each_assistant_turn_begins(tmp_path: Path) -> None:
    model = FakeModel(str(write_fake_gguf(tmp_path / "m.gguf")))
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps(WEATHER) + "\n")
    plan = chat_plans(load_corpus(path), model.describe(), "tiny", model.tokenize_pieces, None)["weather"]
    assert len(plan.prompts) == 2
    text = bytes(((t - 2) % 256) for t in plan.prompts.sequence(1)[1:]).decode(errors="replace")
    assert text.endswith("<end_of_turn>\n<start_of_turn>model\n")
    seq = plan.sequences.sequence(0)
    assert np.array_equal(seq[: plan.prompts.lengths[1]], plan.prompts.sequence(1))


def test_a_chat_corpus_costs_no_more_forward_passes_than_its_tokens(tmp_path: Path) -> None:
    """Each transcript is decoded once, at its own length: no padding to the longest, no re-decode;
    logits come back for the scored positions only."""
    from pytest_kvquality.cache_config import CacheConfig
    from pytest_kvquality.engine.fake import FakeContext
    from pytest_kvquality.engine.protocol import ModelLoad
    from pytest_kvquality.testing import FakeEngine

    path = tmp_path / "chat.jsonl"
    hello = {"category": "weather", "messages": [{"role": "user", "content": "Hi " * 40},
                                                 {"role": "assistant", "content": "Hello."}]}
    records = [WEATHER, hello]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    gguf = write_fake_gguf(tmp_path / "m.gguf")
    engine = FakeEngine()
    spec = ModelLoad(str(gguf))
    plan = next(iter(chat_plans(load_corpus(path), engine.describe(spec), "tiny",
                                lambda t: engine.tokenize_pieces(spec, t), None).values()))
    decoded, returned = [], []
    original = FakeContext.scored_logits

    def counting(self: FakeContext, group: list[tuple[np.ndarray, np.ndarray]]):  # type: ignore[no-untyped-def]
        decoded.extend(tokens.size for tokens, _ in group)
        for view in original(self, group):
            returned.append(view.logits.shape[0])
            yield view

    FakeContext.scored_logits = counting  # type: ignore[method-assign]
    try:
        ref = engine.reference(spec, CacheConfig.parse("f16"), plan.sequences, 0).rows
    finally:
        FakeContext.scored_logits = original  # type: ignore[method-assign]
    assert sorted(decoded) == sorted(plan.sequences.lengths.tolist()) and len(set(decoded)) == 2
    assert sum(returned) == plan.sequences.n_rows == len(ref)
