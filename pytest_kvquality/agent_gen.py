"""Generator of the built-in agent corpus (``--kv-corpus builtin:agent``): chat transcripts with tool
schemas, tool calls and tool results, written by this project, the same bytes on every machine.

The shipped ``corpus_data/agent.jsonl`` is this module's output; a test regenerates it and compares
bytes. Regenerate with ``python -m pytest_kvquality.agent_gen``. Categories:

- ``chat``: a few turns of questions and prose answers, no tools;
- ``tool_use``: a request, one or two tool calls, their results and an answer that uses them;
- ``long_session``: a debugging session of many tool rounds whose outputs pile up to several
  thousand tokens of context before the later answers.

Within a category the shorter transcripts come first, so ``--kv-chunks N`` (N transcripts per
category) takes a cheap slice. Only ``random.Random`` with integer seeds is used (stable across
Python versions).
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path
from typing import Any

SERVICES = ["billing", "search", "ingest", "auth", "reports", "mailer", "scheduler", "gateway"]
OWNERS = ["Ada", "Bram", "Chen", "Dana", "Emeka", "Farah", "Goran", "Hana"]
CITIES = ["Lisbon", "Nairobi", "Osaka", "Quito", "Tromsø", "Lyon", "Perth", "Dakar"]
ERRORS = ["timeout after 30 s", "connection refused", "disk quota exceeded", "certificate expired",
          "out of memory", "schema mismatch on column amount"]

TOOLS: dict[str, dict[str, Any]] = {
    "get_service_status": {"description": "Current health of a service.",
                           "properties": {"service": {"type": "string"}}},
    "search_logs": {"description": "Log lines of a service matching a query, newest first.",
                    "properties": {"service": {"type": "string"}, "query": {"type": "string"},
                                   "limit": {"type": "integer"}}},
    "read_file": {"description": "The text of a file in the repository.",
                  "properties": {"path": {"type": "string"}}},
    "run_tests": {"description": "Run the test suite of a package; returns the failures.",
                  "properties": {"package": {"type": "string"}}},
    "get_weather": {"description": "Today's weather in a city.", "properties": {"city": {"type": "string"}}},
    "convert_currency": {"description": "Convert an amount between currencies at today's rate.",
                         "properties": {"amount": {"type": "number"}, "from": {"type": "string"},
                                        "to": {"type": "string"}}},
}


def _schema(name: str) -> dict[str, Any]:
    t = TOOLS[name]
    return {"type": "function", "function": {"name": name, "description": t["description"], "parameters": {
        "type": "object", "properties": t["properties"], "required": sorted(t["properties"])[:1]}}}


class _Session:
    """Builds one transcript's messages; tool call ids are numbered in order."""

    def __init__(self, system: str) -> None:
        self.messages: list[dict[str, Any]] = [{"role": "system", "content": system}]
        self.calls = 0

    def user(self, text: str) -> None:
        self.messages.append({"role": "user", "content": text})

    def say(self, text: str) -> None:
        self.messages.append({"role": "assistant", "content": text})

    def call(self, name: str, args: dict[str, Any], result: Any) -> None:
        self.calls += 1
        cid = f"call_{self.calls}"
        self.messages.append({"role": "assistant", "content": "", "tool_calls": [
            {"id": cid, "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}]})
        self.messages.append({"role": "tool", "tool_call_id": cid, "name": name,
                              "content": json.dumps(result, ensure_ascii=False)})


def _status(r: random.Random, service: str) -> dict[str, Any]:
    return {"service": service, "healthy": r.random() < 0.5, "owner": r.choice(OWNERS),
            "p99_latency_ms": r.randrange(40, 900), "error_rate": round(r.random() * 0.08, 4),
            "version": f"{r.randrange(1, 5)}.{r.randrange(0, 20)}.{r.randrange(0, 9)}"}


def _chat(r: random.Random, i: int) -> dict[str, Any]:
    s = _Session("You are a concise assistant for an operations team.")
    for _ in range(2 + i % 3):
        svc, n = r.choice(SERVICES), r.randrange(2, 9)
        s.user(f"How should we roll out version {n}.{r.randrange(0, 9)} of the {svc} service safely?")
        s.say(f"Roll it out in {n} stages. Start with one instance of {svc}, watch its error rate and p99 latency "
              f"for {r.randrange(10, 60)} minutes, then double the share at each stage. Keep the previous version "
              f"ready to restore, and ask {r.choice(OWNERS)} to confirm the dashboards before the last stage.")
    return {"category": "chat", "messages": s.messages}


def _tool_use(r: random.Random, i: int) -> dict[str, Any]:
    names = ["get_service_status", "get_weather", "convert_currency"]
    s = _Session("You are an assistant that answers with the help of tools. Call a tool when you need data.")
    kind = i % 3
    if kind == 0:
        svc = r.choice(SERVICES)
        st = _status(r, svc)
        s.user(f"Is the {svc} service healthy right now?")
        s.call("get_service_status", {"service": svc}, st)
        s.say(f"The {svc} service is {'healthy' if st['healthy'] else 'not healthy'}: error rate "
              f"{st['error_rate']:.2%}, p99 latency {st['p99_latency_ms']} ms, version {st['version']}. "
              f"{st['owner']} owns it.")
    elif kind == 1:
        city = r.choice(CITIES)
        w: dict[str, Any] = {"city": city, "temperature_c": r.randrange(-5, 35), "wind_kmh": r.randrange(0, 60),
             "sky": r.choice(["clear", "cloudy", "rain", "snow"])}
        s.user(f"What's the weather in {city}, and should I take a jacket?")
        s.call("get_weather", {"city": city}, w)
        jacket = w["temperature_c"] < 15 or w["sky"] in ("rain", "snow")
        s.say(f"In {city} it is {w['temperature_c']} °C with {w['sky']} skies and wind at {w['wind_kmh']} km/h. "
              f"{'Yes, take a jacket.' if jacket else 'You can leave the jacket at home.'}")
    else:
        amount, rate = r.randrange(20, 5000), round(0.5 + r.random(), 4)
        s.user(f"Convert {amount} EUR to USD, then tell me what 15 % of it is.")
        s.call("convert_currency", {"amount": amount, "from": "EUR", "to": "USD"},
               {"amount": round(amount * rate, 2), "currency": "USD", "rate": rate})
        s.say(f"{amount} EUR is {amount * rate:.2f} USD at a rate of {rate}; 15 % of that is "
              f"{amount * rate * 0.15:.2f} USD.")
    return {"category": "tool_use", "tools": [_schema(n) for n in names], "messages": s.messages}


def _log_lines(r: random.Random, svc: str, n: int) -> list[str]:
    return [f"2026-03-{r.randrange(1, 28):02d}T{r.randrange(0, 24):02d}:{r.randrange(0, 60):02d}Z {svc} "
            f"{r.choice(['ERROR', 'WARN', 'INFO'])} request {r.randrange(10**5, 10**6)}: {r.choice(ERRORS)}"
            for _ in range(n)]


def _long_session(r: random.Random, i: int) -> dict[str, Any]:
    names = ["get_service_status", "search_logs", "read_file", "run_tests"]
    s = _Session("You are a senior engineer debugging production incidents with tools. Be precise and cite "
                 "the data you were given.")
    svc = r.choice(SERVICES)
    s.user(f"The {svc} service is failing for some customers since this morning. Find out why.")
    for step in range(3 + i):
        st = _status(r, svc)
        s.call("get_service_status", {"service": svc}, st)
        lines = _log_lines(r, svc, 8 + r.randrange(0, 6))
        s.call("search_logs", {"service": svc, "query": "ERROR", "limit": len(lines)}, {"lines": lines})
        # ties go to the first in ERRORS order (a set's order would change with the hash seed)
        worst = max((e for e in ERRORS if any(e in line for line in lines)),
                    key=lambda e: sum(e in line for line in lines))
        count = sum(worst in line for line in lines)
        s.say(f"Step {step + 1}: {svc} reports error rate {st['error_rate']:.2%} and p99 {st['p99_latency_ms']} ms. "
              f"Of the {len(lines)} log lines, {count} show \"{worst}\", the most frequent error.")
        if step % 2 == 1:
            path = f"{svc}/config/{r.choice(['limits', 'pool', 'tls', 'retry'])}.yaml"
            s.user(f"Check {path} too.")
            body = "\n".join(f"{k}: {r.randrange(1, 500)}" for k in ("max_connections", "timeout_s", "retries",
                                                                      "batch_size", "queue_depth"))
            s.call("read_file", {"path": path}, {"path": path, "text": body})
            s.say(f"{path} sets timeout_s to {body.split('timeout_s: ')[1].split(chr(10))[0]}; I will compare it "
                  f"with the errors above before changing anything.")
        s.user(r.choice(["Go on.", "Continue.", "What next?", "Keep going."]))
    failures = r.randrange(0, 4)
    s.call("run_tests", {"package": svc}, {"failed": failures, "passed": r.randrange(100, 400)})
    s.say(f"The test suite of {svc} has {failures} failing test{'s' if failures != 1 else ''}. The most frequent "
          f"error in the logs points to the cause; I recommend fixing that first, then re-running the tests.")
    return {"category": "long_session", "tools": [_schema(n) for n in names], "messages": s.messages}


CATEGORIES = {"chat": (_chat, 5005, 16), "tool_use": (_tool_use, 6006, 16), "long_session": (_long_session, 7007, 10)}


def generate() -> str:
    """The corpus as JSONL text, shortest transcripts first within each category."""
    lines = []
    for fn, seed, count in CATEGORIES.values():
        r = random.Random(seed)
        records = [fn(r, i) for i in range(count)]
        records.sort(key=lambda rec: len(json.dumps(rec)))
        lines += [json.dumps(rec, ensure_ascii=False, sort_keys=True) for rec in records]
    return "\n".join(lines) + "\n"


def write(path: Path) -> None:
    path.write_bytes(generate().encode("utf-8"))


if __name__ == "__main__":  # pragma: no cover
    write(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "corpus_data" / "agent.jsonl")
