"""Chat transcripts: OpenAI-style ``messages`` rendered with the model's own chat template, and which
of the resulting tokens the assistant produced.

Rendering is Jinja2 in a sandbox, as llama-cpp-python and transformers do it (``trim_blocks``,
``lstrip_blocks``, ``raise_exception``; ``strftime_now`` answers a fixed date so a render is the
same on every day). A template that cannot render tool calls, tool results or a system message gets
the polyfills of llama.cpp's minja (``chat-template.hpp``): tool calls become the assistant's
content as JSON ``{"tool_calls": [...]}``, tool results a user turn ``{"tool_response": ...}``, tool
schemas and the system message go into the first user turn.

What the assistant produced is found by rendering prefixes: turn i's text is what the render of
``messages[:i+1]`` adds to the render of ``messages[:i]`` with the generation prompt, trailing
whitespace left out (Gemma writes ``<end_of_turn>\\n``; the model writes ``<end_of_turn>``). A
template whose renders are not prefixes of each other cannot say which tokens are whose: an error.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .sequences import ASSISTANT, NOT_SCORED, PROMPT, TOOL_CALL

ROLES = ("system", "user", "assistant", "tool")
SCORE_MODES = ("assistant", "tool_calls", "all")
#: what ``strftime_now`` answers: a fixed day keeps renders (and reference digests) stable
FIXED_DATE = (2026, 1, 1)


TEMPLATES_DIR = Path(__file__).parent / "chat_templates"


def template_source(name_or_path: str) -> str:
    """A shipped template by name (``gemma3``) or a Jinja file's text."""
    shipped = TEMPLATES_DIR / f"{name_or_path}.jinja"
    path = shipped if shipped.is_file() else Path(name_or_path)
    try:
        return path.read_text("utf-8")
    except OSError as e:
        known = ", ".join(sorted(p.stem for p in TEMPLATES_DIR.glob("*.jinja")))
        raise ChatError(f"chat template {name_or_path!r} is neither a shipped one ({known}) nor a readable file: "
                        f"{e.strerror}") from e


class ChatError(ValueError):
    """A transcript that cannot be used; the message names the file, line and reason."""


@dataclass(frozen=True)
class Transcript:
    """One ``.jsonl`` record: where it came from (``file:line``), its category, which span is scored
    (``SCORE_MODES``), the messages and the tool schemas."""

    source: str
    category: str
    score: str
    messages: tuple[dict[str, Any], ...]
    tools: tuple[dict[str, Any], ...] = ()

    def digest_text(self) -> str:
        return json.dumps([self.category, self.score, self.messages, self.tools], sort_keys=True, ensure_ascii=False)


def _tool_call(call: Any, where: str) -> dict[str, Any]:
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise ChatError(f"{where}: each tool call needs a 'function' with a 'name'")
    args = fn.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError as e:
            raise ChatError(f"{where}: the arguments of tool call {fn['name']!r} are not valid JSON ({e.msg})") from e
    if not isinstance(args, dict):
        raise ChatError(f"{where}: the arguments of tool call {fn['name']!r} must be a JSON object")
    out = {"type": "function", "function": {"name": fn["name"], "arguments": args}}
    if isinstance(call.get("id"), str):
        out["id"] = call["id"]
    return out


def transcript(record: Any, where: str, default_category: str) -> Transcript:
    """Check one record (``where`` = ``file:line``); every problem is a ``ChatError`` naming it."""
    if not isinstance(record, dict) or not isinstance(record.get("messages"), list) or not record["messages"]:
        raise ChatError(f"{where}: a chat record needs a non-empty list 'messages'")
    category = record.get("category", default_category)
    if not isinstance(category, str) or not category:
        raise ChatError(f"{where}: 'category' must be a non-empty string")
    score = record.get("score", "assistant")
    if score not in SCORE_MODES:
        raise ChatError(f"{where}: 'score' must be one of {', '.join(SCORE_MODES)}, got {score!r}")
    messages = []
    for n, m in enumerate(record["messages"], 1):
        at = f"{where}: message {n}"
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ChatError(f"{at}: 'role' must be one of {', '.join(ROLES)}")
        content = m.get("content")
        calls = m.get("tool_calls") or []
        if content is not None and not isinstance(content, str):
            raise ChatError(f"{at}: 'content' must be a string")
        if calls and m["role"] != "assistant":
            raise ChatError(f"{at}: only assistant messages hold 'tool_calls'")
        if not isinstance(calls, list):
            raise ChatError(f"{at}: 'tool_calls' must be a list")
        if not content and not calls:
            raise ChatError(f"{at}: a {m['role']} message needs 'content'" +
                            (" or 'tool_calls'" if m["role"] == "assistant" else ""))
        msg: dict[str, Any] = {"role": m["role"], "content": content or ""}
        if calls:
            msg["tool_calls"] = [_tool_call(c, at) for c in calls]
        for key in ("name", "tool_call_id"):
            if isinstance(m.get(key), str):
                msg[key] = m[key]
        messages.append(msg)
    roles = [m["role"] for m in messages]
    if "assistant" not in roles:
        raise ChatError(f"{where}: no assistant message: nothing the model said to score")
    if score == "tool_calls" and not any("tool_calls" in m for m in messages):
        raise ChatError(f"{where}: 'score' is tool_calls but no assistant message makes a tool call")
    tools = record.get("tools") or []
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise ChatError(f"{where}: 'tools' must be a list of tool schemas")
    return Transcript(where, category, score, tuple(messages), tuple(tools))


# ------------------------------------------------------------------ templates


@dataclass(frozen=True)
class Capabilities:
    """What a template renders natively (the rest is polyfilled)."""

    tool_calls: bool
    tool_responses: bool
    system: bool
    tools: bool


class ChatTemplate:
    """A model's chat template, compiled once, with its capabilities probed once."""

    def __init__(self, source: str, bos_token: str, eos_token: str, model: str) -> None:
        if not source.strip():
            raise ChatError(f"model {model} has no chat template (no tokenizer.chat_template in its GGUF): chat "
                            "corpora are rendered with the model's own template; name one with "
                            "--kv-chat-template or a registry entry's chat_template")
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise jinja2.TemplateError(message)

        def strftime_now(fmt: str) -> str:
            import datetime

            return datetime.datetime(*FIXED_DATE).strftime(fmt)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, ensure_ascii=False, indent=indent)
        env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
        self.model = model
        self.bos_token, self.eos_token = bos_token, eos_token
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateError as e:
            raise ChatError(f"model {model}: its chat template does not compile: {e}") from e
        self.caps = self._probe()

    def _raw(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, prompt: bool) -> str:
        return str(self._template.render(messages=messages, tools=tools or None, add_generation_prompt=prompt,
                                         bos_token=self.bos_token, eos_token=self.eos_token))

    def _renders(self, messages: list[dict[str, Any]], marker: str, tools: list[dict[str, Any]] | None = None) -> bool:
        try:
            return marker in self._raw(messages, tools, False)
        except Exception:
            return False

    def _probe(self) -> Capabilities:
        call = {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "id": "call_1", "function": {"name": "kvq_probe_fn", "arguments": {"a": 1}}}]}
        user = {"role": "user", "content": "hi"}
        tool = {"role": "tool", "content": "kvq_probe_result", "tool_call_id": "call_1", "name": "kvq_probe_fn"}
        schema = {"type": "function", "function": {"name": "kvq_probe_tool", "description": "d",
                                                   "parameters": {"type": "object", "properties": {}}}}
        return Capabilities(
            tool_calls=self._renders([user, call], "kvq_probe_fn"),
            tool_responses=self._renders([user, call, tool], "kvq_probe_result"),
            system=self._renders([{"role": "system", "content": "kvq_probe_sys"}, user], "kvq_probe_sys"),
            tools=self._renders([user], "kvq_probe_tool", [schema]),
        )

    def prepare(self, t: Transcript) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
        """The messages as this template can render them (minja's polyfills where it cannot)."""
        out: list[dict[str, Any]] = []
        tools: list[dict[str, Any]] | None = list(t.tools) or None
        for m in t.messages:
            m = dict(m)
            if "tool_calls" in m and not self.caps.tool_calls:
                body: dict[str, Any] = {"tool_calls": [{"name": c["function"]["name"],
                                                        "arguments": c["function"]["arguments"]}
                                                       for c in m.pop("tool_calls")]}
                if m["content"]:
                    body["content"] = m["content"]
                m["content"] = json.dumps(body, indent=2, ensure_ascii=False)
            elif "tool_calls" in m:
                m["tool_calls"] = [{**c, "function": {**c["function"],
                                                      "arguments": json.dumps(c["function"]["arguments"],
                                                                              ensure_ascii=False)}}
                                   for c in m["tool_calls"]]
            if m["role"] == "tool" and not self.caps.tool_responses:
                body = {"tool_response": {"tool": m.get("name", ""), "content": m["content"]}}
                m = {"role": "user", "content": json.dumps(body, indent=2, ensure_ascii=False), "_tool": True}
            out.append(m)
        if tools and not self.caps.tools:
            text = ("You can call any of the following tools to satisfy the user's requests: "
                    + json.dumps(tools, indent=2, ensure_ascii=False))
            out = _into_system(out, text)
            tools = None
        if out and out[0]["role"] == "system" and not self.caps.system:
            first = out.pop(0)
            if out and out[0]["role"] == "user":
                out[0] = {**out[0], "content": first["content"] + "\n\n" + out[0]["content"]}
            else:
                out.insert(0, {"role": "user", "content": first["content"]})
        return _merge_tool_responses(out), tools

    def render(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, prompt: bool,
               where: str) -> str:
        import jinja2

        try:
            return self._raw(messages, tools, prompt)
        except (jinja2.TemplateError, TypeError, ValueError) as e:
            raise ChatError(f"{where}: the chat template of {self.model} cannot render this transcript: {e}") from e


def _into_system(messages: list[dict[str, Any]], text: str) -> list[dict[str, Any]]:
    if messages and messages[0]["role"] == "system":
        return [{**messages[0], "content": messages[0]["content"] + "\n\n" + text}, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


def _merge_tool_responses(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A tool result turned into a user turn is joined to a user turn next to it (templates that
    alternate roles strictly, like Gemma's, refuse two in a row); the user's own turns are left as
    written."""
    out: list[dict[str, Any]] = []
    for m in messages:
        if out and m["role"] == "user" and out[-1]["role"] == "user" and (m.get("_tool") or out[-1].get("_tool")):
            out[-1] = {**out[-1], "content": out[-1]["content"] + "\n\n" + m["content"], "_tool": True}
        else:
            out.append(m)
    return [{k: v for k, v in m.items() if k != "_tool"} for m in out]


@dataclass(frozen=True)
class RenderedTranscript:
    """A transcript's text and the byte ranges the assistant produced, each with its span label."""

    source: str
    text: str
    segments: tuple[tuple[int, int, int], ...]


def render_transcript(t: Transcript, template: ChatTemplate) -> RenderedTranscript:
    messages, tools = template.prepare(t)
    full = template.render(messages, tools, False, t.source)
    segments = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = template.render(messages[:i], tools, True, t.source)
        upto = template.render(messages[: i + 1], tools, False, t.source).rstrip()
        if not upto.startswith(before) or not full.startswith(upto):
            raise ChatError(f"{t.source}: the chat template of {template.model} renders message {i + 1} differently "
                            "depending on what follows it, so the tokens the assistant wrote cannot be located")
        start, end = len(before.encode("utf-8")), len(upto.encode("utf-8"))
        label = TOOL_CALL if "tool_calls" in t.messages[_original_index(t, messages, i)] else ASSISTANT
        if end > start:
            segments.append((start, end, label))
    return RenderedTranscript(t.source, full, tuple(segments))


def _original_index(t: Transcript, prepared: list[dict[str, Any]], i: int) -> int:
    """The index in ``t.messages`` of prepared assistant message ``i`` (polyfills only merge user turns)."""
    k = sum(1 for m in prepared[: i + 1] if m["role"] == "assistant")
    return [j for j, m in enumerate(t.messages) if m["role"] == "assistant"][k - 1]


def label_positions(rendered: RenderedTranscript, tokens: np.ndarray, starts: np.ndarray,
                    score: str) -> np.ndarray:
    """The span label of each position (position p is scored when the token at p+1 is): tokens that
    start inside an assistant segment are the assistant's."""
    labels = np.zeros(tokens.size, np.uint8)
    owner = np.full(tokens.size, PROMPT, np.uint8)
    owner[0] = NOT_SCORED  # BOS is given, never predicted
    for start, end, label in rendered.segments:
        owner[(starts >= start) & (starts < end)] = label
    if score == "assistant":
        keep = (owner == ASSISTANT) | (owner == TOOL_CALL)
    elif score == "tool_calls":
        keep = owner == TOOL_CALL
    else:
        keep = owner != NOT_SCORED
    labels[:-1] = np.where(keep[1:], owner[1:], NOT_SCORED)
    return labels


def generation_prompts(rendered: RenderedTranscript, starts: np.ndarray) -> list[int]:
    """Token counts of the prompts that end just before each assistant turn (its generation prompt)."""
    return [int(np.searchsorted(starts, start, side="left")) for start, _, _ in rendered.segments]
