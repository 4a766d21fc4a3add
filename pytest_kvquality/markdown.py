"""The one Markdown table builder (reports, the sweep, the calibration table, the README's options)."""

from __future__ import annotations

from collections.abc import Sequence


def markdown_table(head: Sequence[str], rows: Sequence[Sequence[object]], align: str = "") -> str:
    """A pipe table; ``align`` has one letter per column, ``l`` or ``r`` (default: first column left,
    the rest right). Pipes inside cells are escaped."""
    align = align or "l" + "r" * (len(head) - 1)
    rule = "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"
    return "\n".join([_row(head), rule, *(_row(r) for r in rows)])


def _row(cells: Sequence[object]) -> str:
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"
