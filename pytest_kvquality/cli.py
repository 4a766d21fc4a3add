"""``python -m pytest_kvquality``: ``sweep`` (a model-selection grid), ``report`` (redraw a sweep's
report from its sweep.json), ``merge`` (a CI matrix's ``--kv-json`` documents as one verdict) and
``options-table`` (the README's options table, from the plugin's one table)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from .files import atomic_write
from .options import options_table
from .sweep.cli import add_sweep_arguments
from .sweep.data import Sweep, SweepError
from .sweep.report import write_report


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pytest_kvquality")
    commands = p.add_subparsers(dest="command", required=True)
    add_sweep_arguments(commands.add_parser(
        "sweep", help="grid of models x K types x V types x rotation: a model-selection report",
        description="Grid of models x K types x V types x rotation: a model-selection report."))
    report = commands.add_parser("report", help="redraw DIR/report.md and its plots from DIR/sweep.json")
    report.add_argument("dir", type=Path)
    merge = commands.add_parser(
        "merge", help="--kv-json documents of several jobs as one table, one gate summary, one exit status",
        description="Merge the --kv-json documents of a CI matrix. Exit status 0 when every gate in every "
                    "document passed and every run passed; 1 when any gate failed or was inconclusive, a run "
                    "failed, a model was skipped, two documents disagree, or no gate ran; 2 when a document "
                    "cannot be read.")
    merge.add_argument("documents", nargs="+", type=Path, help="--kv-json documents, one per job")
    merge.add_argument("--markdown", type=Path, help="write the Markdown summary here (and append it to "
                                                     "$GITHUB_STEP_SUMMARY when that is set)")
    merge.add_argument("--junitxml", type=Path, help="write a JUnit XML file: a test case per gate and per problem")
    merge.add_argument("--json", type=Path, help="write the merged --kv-json document here")
    merge.add_argument("--save", metavar="NAME", help="save the merged document as a baseline "
                                                      "(later runs: --kv-compare NAME)")
    merge.add_argument("--storage", type=Path, default=Path(".kvquality"),
                       help="baseline folder for --save (the plugin's --kv-storage; default .kvquality)")
    merge.add_argument("--allow-skipped", action="store_true",
                       help="a model skipped in a document is a warning, not a failure")
    commands.add_parser("options-table", help="print the README's options table")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # argparse: usage printed
        return int(e.code or 0)
    if args.command == "options-table":
        print(options_table())
        return 0
    if args.command == "merge":
        return _merge(args)
    try:
        if args.command == "report":  # e.g. plots on a machine with matplotlib
            write_report(Sweep.load(args.dir / "sweep.json"), args.dir)
            print(f"report: {args.dir / 'report.md'}")
            return 0
        from .sweep.run import run

        sweep = run(args, " ".join(argv[1:]))
    except SweepError as e:
        print(e, file=sys.stderr)
        return 2
    print(f"{len(sweep.rows)} configs measured, {len(sweep.failures)} not; report: {Path(args.out) / 'report.md'}")
    return 1 if sweep.failures else 0


def _merge(args: argparse.Namespace) -> int:
    """Merge, print, write what was asked; an output that cannot be written fails the merge."""
    from .merge import MergeError, junit_xml, load_shards, merge_shards, merged_markdown, save_baseline, terminal_lines
    from .outputs import StepSummaryError, append_step_summary

    try:
        merged = merge_shards(load_shards(args.documents), allow_skipped=args.allow_skipped)
    except MergeError as e:
        print(f"merge: {e}", file=sys.stderr)
        return 2
    print("\n".join(terminal_lines(merged)))
    errors = []
    text = merged_markdown(merged)
    writes: list[tuple[Path | None, Callable[[Path], object]]] = [
        (args.markdown, lambda p: atomic_write(p, text)),
        (args.junitxml, lambda p: atomic_write(p, junit_xml(merged))),
        (args.json, merged.report.write_json)]
    for path, write in writes:
        if path is not None:
            try:
                write(path)
                print(f"written: {path}")
            except OSError as e:
                errors.append(f"{path} not written: {e}")
    if args.save:
        try:
            print(f"baseline saved: {save_baseline(merged, args.save, args.storage)}")
        except MergeError as e:
            errors.append(str(e))
    try:
        append_step_summary(text)
    except StepSummaryError as e:
        print(f"warning: {e}", file=sys.stderr)
    for error in errors:
        print(f"merge: error: {error}", file=sys.stderr)
    return 0 if merged.passed and not errors else 1
