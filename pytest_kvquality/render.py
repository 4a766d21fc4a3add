"""Showing a ``Report``: the terminal table and the ``--kv-markdown`` summary (one Markdown table
builder, ``markdown.py``)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .engine.protocol import ContextFacts
from .markdown import markdown_table
from .report import Report, SkipRecord
from .thresholds import OVERALL


@dataclass
class TableLine:
    """One line of the terminal table; ``verdict`` is coloured by the plugin."""

    text: str
    verdict: str = ""
    colour: str | None = None



def skip_lines(skipped: list[SkipRecord]) -> list[str]:
    """'N gate(s) skipped: model X not available (reason)', one line per model."""
    out = []
    for model in dict.fromkeys(s.model for s in skipped):
        mine = [s for s in skipped if s.model == model]
        out.append(f"{len(mine)} gate(s) skipped: model {model} not available here ({mine[0].reason})")
    return out



def grid(report: Report, model: str) -> tuple[list[str], list[list[str]], list[tuple[str, str | None]]]:
    """Header, rows and verdicts of one model's table: a row per cache config, mean KLD per
    category, overall KLD ± σ, same top, KV memory, speed when measured, gates."""
    recs = [r for r in report.sorted_records() if r.model == model]
    categories = [c for c in dict.fromkeys(r.category for r in recs) if c != OVERALL]
    show_speed = any(s.model == model for s in report.speeds)
    head = ["cache", *categories, "overall KLD ± σ", "same top", "KV B/token", "KV MiB 32k / 128k"]
    head += ["pp tok/s", "tg tok/s"] if show_speed else []
    head += ["gates"]
    rows, verdicts = [], []
    for cache in report.configs().get(model, []):
        by_cat = {r.category: r for r in recs if r.cache == cache}
        overall = by_cat.get(OVERALL)
        row = [cache, *(f"{by_cat[c].summary.kl_mean:.5f}" if c in by_cat else "-" for c in categories)]
        if overall is not None:
            s = overall.summary
            per_token = overall.context.kv_bytes_per_token
            # σ between chunks, what the gates use (llama.cpp's token-level σ is in the JSON)
            bound = s.bounds.get("kl_mean")
            sigma = bound.se if bound is not None else s.kl_mean_unc
            row += [f"{s.kl_mean:.5f} ± {sigma:.5f}", f"{100 * s.top1:.2f} %",
                    f"{per_token:,.0f}" if per_token else "-", _kv_at(overall.context)]
        else:
            row += ["-", "-", "-", "-"]
        if show_speed:
            for phase in ("pp", "tg"):
                v = report.speed_of(model, cache, phase)
                row.append(f"{v:,.1f}" if v is not None else "-")
        verdict = report.verdict_for(model, cache)
        rows.append(row)
        verdicts.append(verdict)
    return head, rows, verdicts

def model_notes(report: Report, model: str) -> str:
    """What the header line of a model's table adds: a hybrid model's fixed recurrent state, and the
    devices a model spread over RPC servers or several GPUs used."""
    recs = [r for r in report.records if r.model == model and r.category == OVERALL]
    state = next((r.context.recurrent_state_mib for r in recs if r.context.recurrent_state_mib), None)
    out = f", recurrent state {state:,.2f} MiB (fixed)" if state else ""
    spread = next((r.context for r in recs if r.context.rpc_servers or r.context.split_mode), None)
    if spread is not None:  # where the layers went, when not on one local device
        if spread.rpc_servers:
            out += f", RPC servers {', '.join(spread.rpc_servers)}"
        if spread.split_mode:
            out += f", split {spread.split_mode}" + (f" {spread.tensor_split}" if spread.tensor_split else "")
        if spread.kv_layer_devices:
            out += f", KV cache on {'; '.join(spread.kv_layer_devices)}"
    return out

def table(report: Report) -> list[TableLine]:
    """The terminal table, grouped by model."""
    lines: list[TableLine] = []
    for model in report.configs():
        head, rows, verdicts = grid(report, model)
        recs = [r for r in report.records if r.model == model and r.category == OVERALL]
        ctx = f"n_ctx {recs[0].n_ctx}, {recs[0].summary.n_tokens:,} scored tokens" if recs else "speed only"
        ctx += model_notes(report, model)
        lines.append(TableLine(f"{model} ({ctx})"))
        body = [[*r, v[0]] for r, v in zip(rows, verdicts, strict=True)]
        widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
        lines.append(TableLine("  " + _aligned(head[:-1], widths) + "  " + head[-1]))
        for b, (text, colour) in zip(body, verdicts, strict=True):
            lines.append(TableLine("  " + _aligned(b[:-1], widths) + "  ", text, colour))
    return lines



def markdown(report: Report, sections: Sequence[tuple[str, list[str]]] = ()) -> str:
    """A summary for a pull-request comment or $GITHUB_STEP_SUMMARY; ``sections`` (title, lines) are
    added after the tables (a comparison with the baseline, a merge's findings)."""
    out = ["## KV-cache quality", ""]
    env = report.environment
    out.append(f"llama-cpp-python {env.get('llama_cpp_python', '?')} · "
               f"{'GPU' if env.get('gpu_offload') else 'CPU'} · reference "
               f"{env.get('reference_cache', 'f16')} · corpus {env.get('corpus', '?')}")
    out.append("")
    for model in report.configs():
        head, rows, verdicts = grid(report, model)
        out.append(f"### {model}")
        out.append("")
        if notes := model_notes(report, model):
            out += [notes.lstrip(", ").capitalize() + ".", ""]
        marked = [[f"`{row[0]}`", *row[1:], f"{_MARKS.get(text[:1], '')} {text}".strip()]
                  for row, (text, _) in zip(rows, verdicts, strict=True)]
        out += [markdown_table(head, marked, align="l" + "r" * (len(head) - 2) + "l"), ""]
    failed = report.failed_gates()
    if failed:
        rows = [[f"`{v.test_id}`", f"`{v.rule}`", f"{v.value:.6g} ± {v.uncertainty:.2g}",
                 f"{_fmt_bound(v.low)} … {_fmt_bound(v.high)}",
                 v.outcome + (f" (≈{v.chunks_to_decide:,} chunks per category would decide)"
                              if v.chunks_to_decide else "")] for v in failed]
        out += ["### Gates not passed", "",
                markdown_table(["gate", "rule", "value ± σ", "95 % bounds", "verdict"], rows, align="llrrl"), ""]
    elif report.verdicts:
        out += [f"All {len(report.verdicts)} gates passed.", ""]
    out += where_loss_hits(report)
    for title, lines in sections:
        if lines:
            out += [f"### {title}", "", *lines, ""]
    for line in skip_lines(report.skipped):
        out.append(f"> ⚠️ {line}")
    for note in report.notes:
        out.append(f"> {note}")
    return "\n".join(out).rstrip() + "\n"




def where_loss_hits(report: Report) -> list[str]:
    """Markdown: mean KLD by span and by the reference's confidence, and generation divergence, per
    (model, cache) of the overall records that have them."""
    out: list[str] = []
    overall = [r for r in report.records if r.category == OVERALL]
    span_rows = [[f"`{r.model}`", f"`{r.cache}`", x.label, f"{x.n_tokens:,}", f"{x.kl_mean:.5f}", f"{100 * x.top1:.2f}"]
                 for r in overall for x in (r.spans or []) if len(r.spans or []) > 1]
    if span_rows:
        out += ["### Mean KLD by span", "",
                markdown_table(["model", "cache", "span", "tokens", "mean KLD", "same top %"], span_rows,
                               align="lllrrr"), ""]
    conf_rows = [[f"`{r.model}`", f"`{r.cache}`", x.label, f"{x.n_tokens:,}", f"{x.kl_mean:.5f}", f"{100 * x.top1:.2f}"]
                 for r in overall for x in (r.confidence or [])]
    if conf_rows:
        out += ["### Mean KLD by the reference's confidence", "",
                markdown_table(["model", "cache", "reference top-1 p", "tokens", "mean KLD", "same top %"], conf_rows,
                               align="lllrrr"), ""]
    gen_rows = [[f"`{r.model}`", f"`{r.cache}`", r.category, *generation_cells(r.generation)]
                for r in report.records if r.generation]
    if gen_rows:
        out += ["### Generation divergence", "",
                markdown_table(["model", "cache", "category", "prompts", "median first divergence", "identical %",
                                "prefix agree %", "KL at divergence"], gen_rows, align="lllrrrrr"), ""]
    return out


def generation_cells(g: dict[str, Any]) -> list[str]:
    """Prompts, median first divergence (``≥ N`` when censored), identical and agreeing shares, KL."""
    median = g["gen_first_divergence_median"]
    shown = f"≥ {g['n_tokens']}" if g.get("median_censored") else f"{median:g}"
    return [str(g["n_prompts"]), shown, f"{100 * g['gen_identical']:.1f}",
            f"{100 * g['gen_prefix_agree']:.1f} (first {g['agree_tokens']})", f"{g['gen_kl_at_divergence']:.4f}"]


_MARKS = {"p": "✅", "F": "❌", "i": "⚠️"}


def _aligned(cells: list[str], widths: list[int]) -> str:
    """The first cell left-aligned, the numbers right-aligned."""
    return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=False)))


def _fmt_bound(x: float) -> str:
    return "∞" if math.isinf(x) and x > 0 else "−∞" if math.isinf(x) else f"{x:.6g}"



def _kv_at(context: ContextFacts) -> str:
    """KV MiB at 32k and 128k of context, by llama.cpp's cell rule (kv_memory.py)."""
    a, b = context.kv_mib_per_32k, context.kv_mib_per_128k
    return f"{a:,.0f} / {b:,.0f}" if a is not None and b is not None else "-"
