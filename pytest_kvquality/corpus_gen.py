"""Generator of the built-in corpus: original text, the same bytes on every machine.

The shipped files in ``corpus_data/`` are this module's output; a test
regenerates them and compares bytes. Regenerate with
``python -m pytest_kvquality.corpus_gen corpus_data_dir``.

Only ``random.Random`` with fixed seeds is used: its ``random()``,
``choice()`` and ``randrange()`` sequences are stable across Python versions
and platforms for integer seeds.

Longer than our ~350-line module limit, with functions over 50 lines, on purpose: most of it
is the text templates of the built-in corpus (data, byte-stable; a test holds the hash).
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path
from typing import Any

TARGET_BYTES = {"coding": 42_000, "science": 42_000, "tool_calling": 42_000}
LONG_DOC_BYTES = 40_000
LONG_DOC_COUNT = 3

# ---------------------------------------------------------------- coding

NOUNS = ["order", "invoice", "sensor", "packet", "account", "ticket", "reading", "session",
         "shipment", "record", "sample", "segment", "request", "job", "device", "channel"]
VERBS = ["parse", "validate", "merge", "normalize", "score", "group", "filter", "encode",
         "resample", "reconcile", "summarize", "rank", "split", "dedupe"]
FIELDS = ["id", "name", "created_at", "amount", "status", "owner", "weight", "priority",
          "region", "latency_ms", "count", "label", "version", "checksum"]
TYPES = {"id": "int", "name": "str", "created_at": "datetime", "amount": "float",
         "status": "str", "owner": "str", "weight": "float", "priority": "int",
         "region": "str", "latency_ms": "float", "count": "int", "label": "str",
         "version": "int", "checksum": "str"}


def _camel(word: str) -> str:
    return "".join(p.capitalize() for p in word.split("_"))


def _python_module(r: random.Random) -> str:
    noun = r.choice(NOUNS)
    cls = _camel(noun)
    fields = r.sample(FIELDS, r.randrange(3, 6))
    if "id" not in fields:
        fields.insert(0, "id")
    lines = [
        f'"""Utilities for {noun} records: loading, checking and aggregation."""',
        "",
        "from __future__ import annotations",
        "",
        "from collections import defaultdict",
        "from dataclasses import dataclass",
        "from datetime import datetime",
        "from typing import Iterable, Iterator",
        "",
        "",
        "@dataclass(frozen=True)",
        f"class {cls}:",
    ]
    for f in fields:
        lines.append(f"    {f}: {TYPES[f]}")
    lines += ["", "", f"class {cls}Error(ValueError):",
              f'    """Raised when a {noun} record cannot be used."""', ""]
    for _ in range(r.randrange(3, 6)):
        verb = r.choice(VERBS)
        f = r.choice([x for x in fields if x != "id"])
        limit = r.randrange(2, 500)
        kind = r.randrange(4)
        lines += ["", f"def {verb}_{noun}s(items: Iterable[{cls}], limit: int = {limit}) -> list[{cls}]:"]
        if kind == 0:
            lines += [
                f'    """Return at most ``limit`` {noun}s, sorted by {f}."""',
                f"    ordered = sorted(items, key=lambda item: item.{f})",
                "    if limit < 0:",
                f'        raise {cls}Error(f"limit must be positive, got {{limit}}")',
                "    return ordered[:limit]",
            ]
        elif kind == 1:
            lines += [
                f'    """Keep the first {noun} seen for each {f}."""',
                "    seen: set[object] = set()",
                f"    kept: list[{cls}] = []",
                "    for item in items:",
                f"        key = item.{f}",
                "        if key in seen:",
                "            continue",
                "        seen.add(key)",
                "        kept.append(item)",
                "        if len(kept) >= limit:",
                "            break",
                "    return kept",
            ]
        elif kind == 2:
            lines += [
                f'    """Group {noun}s by {f} and keep groups with more than one member."""',
                f"    groups: dict[object, list[{cls}]] = defaultdict(list)",
                "    for item in items:",
                f"        groups[item.{f}].append(item)",
                "    result = [g[0] for g in groups.values() if len(g) > 1]",
                "    return result[:limit]",
            ]
        else:
            lines += [
                f'    """Drop {noun}s whose {f} is missing, then cap the result."""',
                f"    valid = [item for item in items if item.{f} is not None]",
                "    if not valid:",
                f'        raise {cls}Error("no usable {noun} records")',
                "    return valid[: max(1, limit)]",
            ]
    lines += [
        "",
        "",
        f"def iter_batches(items: list[{cls}], size: int) -> Iterator[list[{cls}]]:",
        '    """Yield consecutive batches of ``size`` items; the last one may be shorter."""',
        "    for start in range(0, len(items), size):",
        "        yield items[start : start + size]",
        "",
    ]
    return "\n".join(lines) + "\n"


def _sql_block(r: random.Random) -> str:
    noun = r.choice(NOUNS)
    f1, f2 = r.sample([f for f in FIELDS if f != "id"], 2)
    n = r.randrange(5, 90)
    return (
        f"-- {noun} report: the {n} busiest {f1} values with their average {f2}\n"
        f"SELECT {f1}, COUNT(*) AS n, AVG({f2}) AS mean_{f2}\n"
        f"FROM {noun}s\n"
        f"WHERE created_at >= DATE '2026-0{r.randrange(1, 10)}-1{r.randrange(0, 9)}'\n"
        f"GROUP BY {f1}\n"
        f"HAVING COUNT(*) > {r.randrange(2, 40)}\n"
        f"ORDER BY n DESC\n"
        f"LIMIT {n};\n\n"
    )


def _js_block(r: random.Random) -> str:
    noun = r.choice(NOUNS)
    f = r.choice(FIELDS)
    ms = r.randrange(100, 5000)
    return (
        f"export async function fetch{_camel(noun)}s(client, {{ retries = {r.randrange(1, 6)} }} = {{}}) {{\n"
        f"  for (let attempt = 0; attempt <= retries; attempt += 1) {{\n"
        f"    try {{\n"
        f"      const response = await client.get('/api/{noun}s', {{ timeout: {ms} }});\n"
        f"      return response.data.map((item) => ({{ ...item, {f}: item.{f} ?? null }}));\n"
        f"    }} catch (error) {{\n"
        f"      if (attempt === retries) throw error;\n"
        f"      await new Promise((resolve) => setTimeout(resolve, {ms // 10} * 2 ** attempt));\n"
        f"    }}\n"
        f"  }}\n"
        f"  return [];\n"
        f"}}\n\n"
    )


def coding(r: random.Random) -> str:
    out: list[str] = []
    size = 0
    i = 0
    while size < TARGET_BYTES["coding"]:
        block = [_python_module, _python_module, _sql_block, _js_block][i % 4](r)
        name = ["module.py", "module.py", "query.sql", "client.js"][i % 4]
        block = f"# file: {r.choice(NOUNS)}_{name}\n" + block
        out.append(block)
        size += len(block)
        i += 1
    return "".join(out)


# ---------------------------------------------------------------- science

SCIENCE_TEMPLATES = [
    "A {mass} kg cart moving at {v} m/s carries a kinetic energy of one half times mass times "
    "velocity squared, which is about {ke} joules. If friction removes {pct} percent of that "
    "energy per second, the cart stops after a few seconds rather than rolling on forever.",
    "In an ideal gas at constant temperature, pressure and volume are inversely proportional. "
    "Compressing {vol} litres of gas at {p} kilopascals to half its volume doubles the pressure "
    "to {p2} kilopascals, provided the container exchanges heat fast enough.",
    "The enzyme {enzyme} speeds up its reaction by lowering the activation energy. Measured at "
    "{temp} degrees Celsius, the rate doubled for every ten degrees until the protein began to "
    "unfold near {temp2} degrees, after which activity fell sharply.",
    "Light from a star {ly} light-years away left it {ly} years ago, so astronomers observe "
    "the star as it was, not as it is. Its spectrum shows absorption lines of {element}, shifted "
    "toward the red by {z} percent, which indicates that the star is moving away from us.",
    "A solution of {conc} moles per litre of hydrochloric acid has a pH close to {ph}, because "
    "the acid dissociates almost completely and pH is the negative base-ten logarithm of the "
    "hydrogen ion concentration.",
    "Cells of the species {species} divide every {hours} hours under good conditions. Starting "
    "from a single cell, after {days} days the population would in principle reach two to the "
    "power {gens}, although nutrients run out long before that.",
    "The half-life of {isotope} is {half} years. After three half-lives only one eighth of the "
    "original amount remains, which is why the isotope is useful for dating samples that are "
    "roughly {age} years old.",
    "A copper wire {len} metres long with a cross-section of {area} square millimetres has a "
    "resistance of about {res} ohms at room temperature; doubling the length doubles the "
    "resistance, while doubling the cross-section halves it.",
    "Photosynthesis in {plant} converts carbon dioxide and water into glucose and oxygen using "
    "light energy. Under {lux} lux the leaves fixed {rate} micromoles of carbon per square "
    "metre per second, and the rate saturated above that intensity.",
    "The speed of sound in dry air at {temp} degrees Celsius is roughly {sound} metres per "
    "second. A thunderclap heard {sec} seconds after the flash therefore comes from a strike "
    "about {dist} kilometres away.",
]
ENZYMES = ["catalase", "amylase", "lipase", "trypsin", "lactase", "pepsin", "urease"]
ELEMENTS = ["hydrogen", "helium", "calcium", "sodium", "iron", "magnesium", "carbon"]
SPECIES = ["Escherichia coli", "Bacillus subtilis", "Saccharomyces cerevisiae", "Vibrio fischeri"]
ISOTOPES = [("carbon-14", 5730), ("potassium-40", 1_250_000_000), ("tritium", 12),
            ("cesium-137", 30), ("uranium-235", 704_000_000)]
PLANTS = ["spinach", "maize", "wheat", "sunflower", "rice", "soybean"]
SCIENCE_HEADINGS = ["Mechanics", "Thermodynamics", "Biochemistry", "Astronomy", "Chemistry",
                    "Microbiology", "Nuclear physics", "Electricity", "Plant biology", "Acoustics"]


def _science_paragraph(r: random.Random, idx: int) -> str:
    mass = r.randrange(2, 40)
    v = r.randrange(1, 12)
    p = r.randrange(90, 300)
    temp = r.randrange(5, 40)
    hours = r.choice([1, 2, 3, 4, 6])
    days = r.randrange(1, 4)
    iso, half = r.choice(ISOTOPES)
    length = r.randrange(2, 200)
    area = r.choice([0.5, 1.0, 1.5, 2.5, 4.0])
    sec = r.randrange(2, 15)
    sound = 331 + round(0.6 * temp)
    conc = r.choice([0.1, 0.01, 0.001])
    values = {
        "mass": mass, "v": v, "ke": mass * v * v // 2, "pct": r.randrange(2, 30),
        "vol": r.randrange(1, 20), "p": p, "p2": 2 * p, "enzyme": r.choice(ENZYMES),
        "temp": temp, "temp2": r.randrange(45, 70), "ly": r.randrange(4, 900),
        "element": r.choice(ELEMENTS), "z": r.randrange(1, 9), "conc": conc,
        "ph": {0.1: 1, 0.01: 2, 0.001: 3}[conc], "species": r.choice(SPECIES),
        "hours": hours, "days": days, "gens": days * 24 // hours, "isotope": iso,
        "half": f"{half:,}", "age": f"{half * r.randrange(1, 4):,}", "len": length,
        "area": area, "res": round(0.0172 * length / area, 3), "plant": r.choice(PLANTS),
        "lux": r.randrange(200, 2000) * 10, "rate": r.randrange(5, 40), "sound": sound,
        "sec": sec, "dist": round(sound * sec / 1000, 1),
    }
    return SCIENCE_TEMPLATES[idx % len(SCIENCE_TEMPLATES)].format(**values)


def science(r: random.Random) -> str:
    out: list[str] = []
    size = 0
    i = 0
    while size < TARGET_BYTES["science"]:
        heading = SCIENCE_HEADINGS[i % len(SCIENCE_HEADINGS)]
        paras = [_science_paragraph(r, i + j * 3) for j in range(r.randrange(2, 4))]
        block = f"{heading}, note {i + 1}\n\n" + "\n\n".join(paras) + "\n\n"
        out.append(block)
        size += len(block)
        i += 1
    return "".join(out)


# ---------------------------------------------------------------- tool calling

CITIES = ["Lisbon", "Osaka", "Nairobi", "Toronto", "Tallinn", "Valparaiso", "Hanoi", "Perth",
          "Reykjavik", "Cusco", "Tbilisi", "Accra"]
PEOPLE = ["Ana", "Kenji", "Wanjiru", "Liam", "Mart", "Camila", "Minh", "Olivia", "Sigrun"]
TOOLS = [
    {"name": "get_weather", "description": "Current weather for a city",
     "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                    "required": ["city"]}},
    {"name": "create_event", "description": "Add an event to the calendar",
     "parameters": {"type": "object", "properties": {"title": {"type": "string"},
                    "date": {"type": "string"}, "attendees": {"type": "array",
                    "items": {"type": "string"}}}, "required": ["title", "date"]}},
    {"name": "search_orders", "description": "Find orders by customer and status",
     "parameters": {"type": "object", "properties": {"customer": {"type": "string"},
                    "status": {"type": "string"}, "limit": {"type": "integer"}},
                    "required": ["customer"]}},
    {"name": "convert_currency", "description": "Convert an amount between currencies",
     "parameters": {"type": "object", "properties": {"amount": {"type": "number"},
                    "from": {"type": "string"}, "to": {"type": "string"}},
                    "required": ["amount", "from", "to"]}},
]


def _transcript(r: random.Random, idx: int) -> str:
    kind = idx % 4
    city = r.choice(CITIES)
    person = r.choice(PEOPLE)
    call_id = f"call_{idx:04d}"
    args: dict[str, Any]
    result: dict[str, Any]
    if kind == 0:
        unit = r.choice(["celsius", "fahrenheit"])
        ask = f"What's the weather like in {city} right now? Please use {unit}."
        args = {"city": city, "unit": unit}
        temp = r.randrange(-5, 35)
        result = {"city": city, "temperature": temp, "unit": unit,
                  "condition": r.choice(["clear", "light rain", "overcast", "windy"])}
        answer = f"It is {temp} degrees {unit} in {city}, {result['condition']}."
    elif kind == 1:
        day = f"2026-{r.randrange(1, 13):02d}-{r.randrange(1, 29):02d}"
        who = sorted(r.sample(PEOPLE, 2))
        title = r.choice(["Design review", "Quarterly planning", "Incident retro", "1:1"])
        ask = f"Schedule a {title.lower()} on {day} with {who[0]} and {who[1]}."
        args = {"title": title, "date": day, "attendees": who}
        result = {"event_id": f"evt_{r.randrange(10000, 99999)}", "status": "created"}
        answer = f"Done: '{title}' is on the calendar for {day} ({result['event_id']})."
    elif kind == 2:
        status = r.choice(["shipped", "pending", "refunded"])
        limit = r.randrange(1, 6)
        ask = f"Show me the last {limit} {status} orders for {person}."
        args = {"customer": person, "status": status, "limit": limit}
        totals: list[float] = []
        orders = []
        for _ in range(limit):
            order_id, total = f"A{r.randrange(1000, 9999)}", round(r.random() * 300, 2)
            orders.append({"order_id": order_id, "total": total})
            totals.append(total)
        result = {"orders": orders}
        largest = max(totals)
        answer = f"{person} has {limit} {status} orders; the largest total is {largest:.2f}."
    else:
        amount = r.randrange(5, 5000)
        cur = r.sample(["EUR", "USD", "JPY", "KES", "CAD", "GBP"], 2)
        rate = round(0.5 + r.random() * 2, 4)
        ask = f"How much is {amount} {cur[0]} in {cur[1]}?"
        args = {"amount": amount, "from": cur[0], "to": cur[1]}
        result = {"amount": round(amount * rate, 2), "currency": cur[1], "rate": rate}
        answer = f"{amount} {cur[0]} is about {result['amount']} {cur[1]} at a rate of {rate}."
    tool = TOOLS[kind]
    messages = [
        {"role": "system", "content": "You are an assistant that calls tools when needed.",
         "tools": [tool]},
        {"role": "user", "content": ask},
        {"role": "assistant", "tool_calls": [{"id": call_id, "type": "function",
         "function": {"name": tool["name"], "arguments": json.dumps(args)}}]},
        {"role": "tool", "tool_call_id": call_id, "content": json.dumps(result)},
        {"role": "assistant", "content": answer},
    ]
    return json.dumps({"messages": messages}, indent=1) + "\n"


def tool_calling(r: random.Random) -> str:
    out: list[str] = []
    size = 0
    i = 0
    while size < TARGET_BYTES["tool_calling"]:
        block = _transcript(r, i)
        out.append(block)
        size += len(block)
        i += 1
    return "".join(out)


# ---------------------------------------------------------------- long documents

SUBSYSTEMS = ["ingest gateway", "billing ledger", "scheduler", "storage tier", "audit log",
              "notification relay", "identity service", "metrics pipeline", "search index",
              "replication daemon", "cache layer", "export worker"]
ACTIONS = ["rotates its credentials", "compacts its segments", "flushes pending writes",
           "re-reads its configuration", "rebalances partitions", "expires stale entries",
           "verifies checksums", "reports health to the coordinator"]


def _long_document(r: random.Random, number: int) -> str:
    facts = []
    for name in SUBSYSTEMS:
        facts.append({
            "name": name,
            "owner": r.choice(PEOPLE),
            "port": r.randrange(2000, 9999),
            "interval": r.randrange(5, 120),
            "limit": r.randrange(10, 900),
            "region": r.choice(CITIES),
            "action": r.choice(ACTIONS),
        })
    title = f"Operations manual {number}: the {r.choice(['Aurora', 'Basalt', 'Cobalt'])} platform"
    parts = [title, "", "1. Glossary of subsystems", ""]
    for i, f in enumerate(facts, 1):
        parts.append(
            f"1.{i} The {f['name']} is owned by {f['owner']}, listens on port {f['port']}, runs "
            f"in the {f['region']} region, {f['action']} every {f['interval']} minutes and "
            f"accepts at most {f['limit']} requests per second."
        )
    parts.append("")
    section = 2
    size = sum(len(p) for p in parts)
    while size < LONG_DOC_BYTES:
        f = r.choice(facts)
        g = r.choice(facts)
        glossary = facts.index(f) + 1
        paras = [
            f"{section}. Procedures for the {f['name']}",
            "",
            f"{section}.1 Before any change, page {f['owner']}, who owns the {f['name']} "
            f"(see 1.{glossary}). Confirm that it still listens on port {f['port']} and that "
            f"the {g['name']} in {g['region']} is healthy, because the two exchange data every "
            f"{g['interval']} minutes.",
            f"{section}.2 If load exceeds {f['limit']} requests per second, the {f['name']} "
            f"sheds traffic. Raise the limit by at most {r.randrange(5, 30)} percent at a time, "
            f"and wait one full cycle of {f['interval']} minutes, the time it needs before it "
            f"{f['action']} again, between steps.",
            f"{section}.3 Rollback: restore the previous configuration, restart the "
            f"{f['name']}, and check with {g['owner']} that the {g['name']} has caught up. "
            f"Record the incident in the audit log with the section number {section}.",
            "",
        ]
        text = "\n".join(paras)
        parts.append(text)
        size += len(text)
        section += 1
    parts += [
        "Appendix A. Summary table",
        "",
        "subsystem | owner | port | interval (min) | limit (req/s) | region",
    ]
    for f in facts:
        parts.append(f"{f['name']} | {f['owner']} | {f['port']} | {f['interval']} | "
                     f"{f['limit']} | {f['region']}")
    return "\n".join(parts) + "\n\n"


def long_documents(r: random.Random) -> str:
    return "".join(_long_document(r, i + 1) for i in range(LONG_DOC_COUNT))


GENERATORS = {
    "coding": (coding, 1001),
    "science": (science, 2002),
    "tool_calling": (tool_calling, 3003),
    "long_documents": (long_documents, 4004),
}


def generate() -> dict[str, str]:
    """The built-in corpus, category -> text."""
    return {name: fn(random.Random(seed)) for name, (fn, seed) in GENERATORS.items()}


def write(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in generate().items():
        (directory / f"{name}.txt").write_bytes(text.encode("utf-8"))


if __name__ == "__main__":  # pragma: no cover
    write(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "corpus_data")
