"""What a finished run leaves behind: the ``--kv-json`` and ``--kv-markdown`` files, the GitHub
step summary, saved and compared baselines; and the exit status a regression turns into 1."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from .baseline import BaselineError, BaselineStorage, Comparison, compare
from .options import KVOptions
from .report import Report


@dataclass
class RunOutputs:
    """Files written and the comparison made at the end of a run (shown in the terminal summary)."""

    comparison: Comparison | None = None
    written: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def finish(report: Report, options: KVOptions, session: pytest.Session) -> RunOutputs:
    """Compare (before saving, so 'latest' is the previous run), save, write the summaries; a
    regression under --kv-compare-fail makes a passing run exit with status 1."""
    out = RunOutputs()
    storage = BaselineStorage(options.storage or Path(".kvquality"))
    if options.compare is not None:
        try:
            path = storage.find(options.compare)
            out.comparison = compare(path.stem, storage.load(path), report, options.compare_fail)
        except BaselineError as e:
            out.errors.append(str(e))
            if options.compare_fail:  # a gate that cannot compare must not pass
                session.exitstatus = _failed(session.exitstatus)
        if out.comparison is not None and out.comparison.regressions:
            session.exitstatus = _failed(session.exitstatus)
    if options.save and report.records:
        try:
            out.written.append(f"baseline saved: {storage.save(options.save, report)}")
        except (BaselineError, OSError) as e:
            out.errors.append(f"baseline not saved: {e}")
    if options.json_path and (report.records or report.speeds):
        report.write_json(options.json_path)
        out.written.append(f"results written to {options.json_path}")
    if report.records or report.speeds:
        text = report.markdown(out.comparison.lines() if out.comparison else None)
        if options.markdown_path:
            options.markdown_path.parent.mkdir(parents=True, exist_ok=True)
            options.markdown_path.write_text(text, encoding="utf-8")
            out.written.append(f"Markdown summary written to {options.markdown_path}")
        step_summary = os.environ.get("GITHUB_STEP_SUMMARY")
        if step_summary:
            with open(step_summary, "a", encoding="utf-8") as f:
                f.write(text + "\n")
            out.written.append("Markdown summary appended to $GITHUB_STEP_SUMMARY")
    return out


def _failed(status: int | pytest.ExitCode) -> int | pytest.ExitCode:
    """A regression fails a run that passed; other statuses (errors, no tests) are kept."""
    return pytest.ExitCode.TESTS_FAILED if status == pytest.ExitCode.OK else status


def write_terminal_summary(tr: Any, report: Report, options: KVOptions, out: RunOutputs | None) -> None:
    """The KV-cache section of pytest's terminal summary: table, notes, comparison, files written."""
    if not (report.records or report.speeds or report.notes or (out and (out.comparison or out.errors))):
        return
    tr.write_sep("=", "KV-cache quality")
    env = report.environment
    if env:
        tr.write_line(
            f"llama-cpp-python {env.get('llama_cpp_python', '?')}, "
            f"{'GPU' if env.get('gpu_offload') else 'CPU'}, reference {options.ref_cache.label}, "
            f"corpus {env.get('corpus', '?')}; mean KLD per category"
        )
    for line in report.table():
        tr.write(line.text)
        if line.verdict:
            tr.write(line.verdict, **({line.colour: True, "bold": True} if line.colour else {}))
        tr.line("")
    for note in report.notes:
        tr.write_line(f"note: {note}", yellow=True)
    if out is None:
        return
    if out.comparison is not None:
        for text in out.comparison.lines():
            tr.write_line(text, red="REGRESSION" in text, yellow=text.startswith("warning:"))
        if out.comparison.regressions:
            tr.write_line(f"{len(out.comparison.regressions)} regression(s) beyond --kv-compare-fail: exit status 1",
                          red=True, bold=True)
    for text in out.errors:
        tr.write_line(f"error: {text}", red=True)
    for text in out.written:
        tr.write_line(text)
