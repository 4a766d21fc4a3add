"""``python -m pytest_kvquality merge A.json B.json …``: the ``--kv-json`` documents of a CI matrix
(one job per model, cache config or GPU runner) as one table, one gate summary and one exit status.

The merged verdict fails on anything that would have failed one run, and on what only a merge can
see: a shard whose run failed although its gates passed, a gate or row measured twice with different
results, a model skipped in some shard, or no gate at all. Environments that differ are warned about,
as baselines are (``baseline.environment_differences``).
"""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .baseline import BaselineError, BaselineStorage, environment_differences
from .render import markdown, skip_lines, table
from .report import Report, ResultRecord, RunOutcome, VerdictRecord


class MergeError(ValueError):
    """A shard that cannot be read: the merge stops (exit status 2)."""


@dataclass(frozen=True)
class Shard:
    """One ``--kv-json`` document and where it came from."""

    path: Path
    report: Report

    @property
    def name(self) -> str:
        return str(self.path)


@dataclass
class MergedRun:
    """The merged report, what fails it (``problems``) and what only needs saying (``warnings``)."""

    report: Report
    shards: list[Shard]
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def failed_gates(self) -> list[VerdictRecord]:
        return self.report.failed_gates()

    @property
    def passed(self) -> bool:
        return not (self.problems or self.failed_gates)

    def summary(self) -> str:
        gates = self.report.verdicts
        failed = sum(v.outcome == "fail" for v in gates)
        unsure = sum(v.outcome == "inconclusive" for v in gates)
        verdict = "PASSED" if self.passed else "FAILED"
        return (f"merged {len(self.shards)} document(s): {len(gates)} gate(s), {failed} failed, {unsure} inconclusive, "
                f"{len(self.problems)} problem(s): {verdict}")


def load_shards(paths: Sequence[Path]) -> list[Shard]:
    """Read every document; any that is missing or unreadable stops the merge (a shard that did not
    report cannot be counted as passed)."""
    if not paths:
        raise MergeError("no documents to merge")
    shards = []
    for path in paths:
        try:
            shards.append(Shard(path, Report.from_document(json.loads(path.read_text("utf-8")))))
        except OSError as e:
            raise MergeError(f"{path}: cannot be read ({e.strerror or e})") from e
        except (ValueError, KeyError, TypeError) as e:
            raise MergeError(f"{path}: not a --kv-json document this plugin reads ({e})") from e
    return shards


def merge_shards(shards: Sequence[Shard], *, allow_skipped: bool = False) -> MergedRun:
    """One report from many; every reason the merged verdict cannot pass is a problem."""
    merged = MergedRun(Report(), list(shards))
    rows: dict[tuple[str, str, int, str], tuple[Shard, ResultRecord]] = {}
    gates: dict[str, tuple[Shard, VerdictRecord]] = {}
    first = shards[0]
    for shard in shards:
        rep = shard.report
        problem = rep.run.problem() if rep.run is not None else None
        if problem:
            merged.problems.append(f"{shard.name}: {problem}")
        elif rep.run is None:
            merged.warnings.append(f"{shard.name} does not say how its run ended (written before the plugin "
                                   "recorded it): only its gates count")
        if shard is not first:
            merged.warnings += [f"{shard.name}: {w}" for w in
                                environment_differences(first.report.environment, rep.environment, first.name)]
        for r in rep.records:
            _merge_row(merged, rows, shard, r)
        for v in rep.verdicts:
            _merge_gate(merged, gates, shard, v)
        _merge_rest(merged.report, rep)
        merged.report.skipped += rep.skipped
        for s in rep.skipped:
            text = f"{shard.name}: model {s.model} was skipped ({s.reason})"
            (merged.warnings if allow_skipped else merged.problems).append(text)
    if not merged.report.verdicts:
        merged.problems.append("no gate ran in any document: nothing was checked")
    statuses = [s.report.run for s in shards]
    merged.report.run = RunOutcome(0 if merged.passed else 1, sum(r.tests_collected for r in statuses if r),
                                   sum(r.tests_failed for r in statuses if r))
    return merged


def _same_row(a: ResultRecord, b: ResultRecord) -> bool:
    """The same measurement (its timing aside): a document given twice, or a deterministic rerun."""
    x, y = a.to_json(), b.to_json()
    x.pop("eval_seconds")
    y.pop("eval_seconds")
    return bool(x == y)


def _merge_row(merged: MergedRun, rows: dict[tuple[str, str, int, str], tuple[Shard, ResultRecord]], shard: Shard,
               r: ResultRecord) -> None:
    if r.key not in rows:
        rows[r.key] = (shard, r)
        merged.report.records.append(r)
        return
    other, kept = rows[r.key]
    model, cache, n_ctx, category = r.key
    if _same_row(kept, r):
        merged.warnings.append(f"{model} [{cache}] n_ctx {n_ctx} {category} is in {other.name} and {shard.name} "
                               "with the same numbers: kept once")
    else:
        merged.problems.append(f"{model} [{cache}] n_ctx {n_ctx} {category} was measured in {other.name} "
                               f"(kl_mean {kept.summary.kl_mean:.6g}) and in {shard.name} "
                               f"(kl_mean {r.summary.kl_mean:.6g}) with different results: which one gates is "
                               "not for a merge to choose")


def _merge_gate(merged: MergedRun, gates: dict[str, tuple[Shard, VerdictRecord]], shard: Shard,
                v: VerdictRecord) -> None:
    if v.test_id not in gates:
        gates[v.test_id] = (shard, v)
        merged.report.verdicts.append(v)
        return
    other, kept = gates[v.test_id]
    if (kept.outcome, kept.value) == (v.outcome, v.value) or (math.isnan(kept.value) and math.isnan(v.value)):
        return  # the same gate with the same result
    merged.report.verdicts.append(v)  # both stay, so a failure in either is counted
    merged.problems.append(f"gate {v.test_id} ran in {other.name} ({kept.outcome}, {kept.value:.6g}) and in "
                           f"{shard.name} ({v.outcome}, {v.value:.6g}) with different results")


def _merge_rest(into: Report, rep: Report) -> None:
    """Speeds, notes and environment: as xdist workers' reports merge."""
    part = Report(speeds=rep.speeds, environment=rep.environment, notes=rep.notes)
    into.merge(part)


# ---------------------------------------------------------------- outputs

def merge_lines(merged: MergedRun) -> list[str]:
    """The merge's own findings: problems (each fails it), then warnings."""
    return ([f"FAILED: {p}" for p in merged.problems] + [f"warning: {w}" for w in merged.warnings]
            + [merged.summary()])


def junit_xml(merged: MergedRun) -> str:
    """One test case per gate (failed or inconclusive ones with a failure element) and one per
    problem, with the plugin's ``kv_*`` properties, for CI viewers that read JUnit."""
    verdicts, problems = merged.report.verdicts, merged.problems
    suite = ET.Element("testsuite", name="kvquality-merge", tests=str(len(verdicts) + len(problems)),
                       failures=str(len(merged.failed_gates) + len(problems)), errors="0")
    for v in verdicts:
        case = ET.SubElement(suite, "testcase", classname="kvquality", name=v.test_id)
        props = ET.SubElement(case, "properties")
        for key, value in v.junit_properties():
            ET.SubElement(props, "property", name=key, value=str(value))
        if v.outcome != "pass":
            ET.SubElement(case, "failure", message=f"{v.outcome}: {v.metric} {v.value:.6g} against {v.rule}").text = (
                v.reason or v.method)
    for i, problem in enumerate(problems):
        case = ET.SubElement(suite, "testcase", classname="kvquality.merge", name=f"merge-check-{i + 1}")
        ET.SubElement(case, "failure", message=problem)
    root = ET.Element("testsuites")
    root.append(suite)
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"


def merged_markdown(merged: MergedRun) -> str:
    return markdown(merged.report, [("Merge", merge_lines(merged))])


def terminal_lines(merged: MergedRun) -> list[str]:
    out = [line.text + line.verdict for line in table(merged.report)]
    out += skip_lines(merged.report.skipped)
    out += [f"note: {n}" for n in merged.report.notes]
    return out + merge_lines(merged)


def save_baseline(merged: MergedRun, name: str, storage: Path) -> Path:
    """The merged document as a baseline (``--kv-compare NAME`` in later runs)."""
    try:
        return BaselineStorage(storage).save(name, merged.report)
    except (OSError, BaselineError) as e:
        raise MergeError(f"baseline {name!r} not saved in {storage}: {e}") from e
