"""options.py: every option declared once, and everything made from that one table agrees with it."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from pytest_kvquality.cli import build_parser, main
from pytest_kvquality.options import OPTIONS, KVOptions, options_table
from pytest_kvquality.sweep.cli import SHARED_OPTIONS

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_readme_options_table_is_the_generated_one() -> None:
    """Regenerate with ``python -m pytest_kvquality options-table`` when this fails."""
    text = README.read_text()
    m = re.search(r"<!-- options-table:start -->\n(.*?)\n<!-- options-table:end -->", text, re.S)
    assert m is not None, "README.md lost its options-table markers"
    assert m.group(1) == options_table()


def test_the_options_table_command_prints_it(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["options-table"]) == 0
    assert capsys.readouterr().out.rstrip("\n") == options_table()


def test_every_option_sets_a_field_of_kvoptions_and_every_flag_is_unique() -> None:
    fields = {f.name for f in dataclasses.fields(KVOptions)}
    assert {o.dest for o in OPTIONS} <= fields
    assert len({o.flag for o in OPTIONS}) == len(OPTIONS) == len({o.ini for o in OPTIONS})


def test_the_sweep_declares_the_shared_options_as_the_plugin_does() -> None:
    sweep = next(a for a in build_parser()._subparsers._group_actions[0].choices.values()  # type: ignore[union-attr]
                 if a.prog.endswith("sweep"))
    by_flag = {s: a for a in sweep._actions for s in a.option_strings}
    for o in OPTIONS:
        if o.flag in SHARED_OPTIONS:
            action = by_flag[o.flag]
            assert action.help == o.argparse_kwargs()["help"], o.flag
            assert action.dest == o.ini


def test_kvq_ref_dir_applies_only_where_no_option_or_ini_key_names_the_folder(
    kv_project: pytest.Pytester, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KVQ_REF_DIR", str(tmp_path / "from-env"))
    given = kv_project.runpytest("--co")  # kv_project's ini names a reference folder
    given.stdout.fnmatch_lines([f"*references in {tmp_path / 'refs'}"])
    unset = kv_project.runpytest("--co", "-o", "kv_ref_dir=")
    unset.stdout.fnmatch_lines([f"*references in {tmp_path / 'from-env'}"])
    flag = kv_project.runpytest("--co", "-o", "kv_ref_dir=", f"--kv-ref-dir={tmp_path / 'from-flag'}")
    flag.stdout.fnmatch_lines([f"*references in {tmp_path / 'from-flag'}"])
