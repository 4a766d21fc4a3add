"""CI runs the README's two commands for a fresh machine, verbatim, and treats "no tests ran" as red."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    """The commands after ``bash scripts/setup.sh &&`` in the README's first code block."""
    block = re.search(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert block is not None, "README.md lost its first bash block"
    return re.findall(r"^bash scripts/setup\.sh && (.+)$", block.group(1), re.M)


def test_ci_runs_exactly_the_readmes_two_commands() -> None:
    commands = readme_commands()
    assert len(commands) == 2, commands
    ci = (ROOT / ".ci" / "run").read_text()
    ran = re.findall(r"^run_pytest (.+)$", ci, re.M)
    assert ran == commands
    assert '"$rc" -eq 5' in ci  # pytest's "no tests ran" fails CI
