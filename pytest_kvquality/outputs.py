"""What a finished run leaves behind: the ``--kv-json`` and ``--kv-markdown`` files, the GitHub
step summary, saved and compared baselines; and the exit status a regression turns into 1."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from .baseline import BaselineError, BaselineStorage, Comparison, compare
from .files import atomic_write
from .options import KVOptions
from .render import markdown, skip_lines, table
from .report import Report, RunOutcome


@dataclass
class RunOutputs:
    """Files written and the comparison made at the end of a run (shown in the terminal summary)."""

    comparison: Comparison | None = None
    written: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def finish(report: Report, options: KVOptions, session: pytest.Session) -> RunOutputs:
    """Compare (before saving, so 'latest' is the previous run), save, write the summaries. A
    regression under --kv-compare-fail, or an output asked for that could not be written, makes a
    passing run exit with status 1; each failure is reported and the other outputs still written."""
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
        if out.comparison is not None and options.compare_fail and out.comparison.failed:
            session.exitstatus = _failed(session.exitstatus)
    # what the run's exit status is by now (a regression above included), for ``merge``
    report.run = RunOutcome(int(session.exitstatus), session.testscollected, session.testsfailed)
    measured = bool(report.records or report.speeds or report.skipped)
    if options.save and report.records:
        _write(out, session, "baseline", lambda: storage.save(str(options.save), report), "baseline saved: {}")
    if options.json_path and measured:
        json_path = options.json_path
        _write(out, session, "--kv-json", lambda: report.write_json(json_path), f"results written to {json_path}")
    if measured:
        text = markdown(report, [("Against the baseline", out.comparison.lines())] if out.comparison else ())
        if options.markdown_path:
            md = options.markdown_path
            _write(out, session, "--kv-markdown", lambda: atomic_write(md, text),
                   f"Markdown summary written to {md}")
        try:
            if append_step_summary(text):
                out.written.append("Markdown summary appended to $GITHUB_STEP_SUMMARY")
        except StepSummaryError as e:
            out.warnings.append(str(e))
    return out


class StepSummaryError(RuntimeError):
    """$GITHUB_STEP_SUMMARY could not be appended to: the CI runner's file, not an output the run was
    asked for, so a warning, never a failure."""


def append_step_summary(text: str) -> bool:
    """Append ``text`` to the file $GITHUB_STEP_SUMMARY names (a run's summary, or a merge's); False
    when it is not set."""
    step_summary = os.environ.get("GITHUB_STEP_SUMMARY")
    if not step_summary:
        return False
    try:
        with open(step_summary, "a", encoding="utf-8") as f:
            f.write(text + "\n")
    except OSError as e:
        raise StepSummaryError(f"could not append to $GITHUB_STEP_SUMMARY ({step_summary}): {e}") from e
    return True


def _write(out: RunOutputs, session: pytest.Session, what: str, write: Callable[[], object], done: str) -> None:
    """Run one write; a failure becomes an error line and a failed run, never a traceback."""
    try:
        result = write()
    except (OSError, BaselineError) as e:
        out.errors.append(f"{what} not written: {e}")
        session.exitstatus = _failed(session.exitstatus)
        return
    out.written.append(done.format(result))


def _failed(status: int | pytest.ExitCode) -> int | pytest.ExitCode:
    """A regression fails a run that passed; other statuses (errors, no tests) are kept."""
    return pytest.ExitCode.TESTS_FAILED if status == pytest.ExitCode.OK else status


def write_terminal_summary(tr: pytest.TerminalReporter, report: Report, options: KVOptions,
                           out: RunOutputs | None) -> None:
    """The KV-cache section of pytest's terminal summary: table, notes, comparison, files written."""
    if not (report.records or report.speeds or report.notes or report.skipped
            or (out and (out.comparison or out.errors or out.warnings))):
        return
    tr.write_sep("=", "KV-cache quality")
    env = report.environment
    if env:
        tr.write_line(
            f"llama-cpp-python {env.get('llama_cpp_python', '?')}, "
            f"{'GPU' if env.get('gpu_offload') else 'CPU'}, reference {options.ref_cache.label}, "
            f"corpus {env.get('corpus', '?')}; mean KLD per category"
        )
    for line in table(report):
        tr.write(line.text)
        if line.verdict:
            tr.write(line.verdict, **({line.colour: True, "bold": True} if line.colour else {}))
        tr.line("")
    for skipped in skip_lines(report.skipped):
        tr.write_line(skipped, yellow=True, bold=True)
    for note in report.notes:
        tr.write_line(f"note: {note}", yellow=True)
    if out is None:
        return
    if out.comparison is not None:
        for text in out.comparison.lines():
            tr.write_line(text, red="REGRESSION" in text, yellow=text.startswith("warning:"))
        if out.comparison.failed and options.compare_fail:
            tr.write_line(f"{len(out.comparison.regressions)} regression(s) beyond --kv-compare-fail, "
                          f"{len(out.comparison.uncompared)} criterion(s) that compared nothing: exit status 1",
                          red=True, bold=True)
    for text in out.errors:
        tr.write_line(f"error: {text}", red=True)
    for text in out.warnings:
        tr.write_line(f"warning: {text}", yellow=True)
    for text in out.written:
        tr.write_line(text)
