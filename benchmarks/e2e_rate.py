"""Scored tokens per second of each cache config of a ``--kv-json`` document (issue 17's end-to-end
measure: a config's scored tokens over all categories, divided by the seconds its evaluations took,
context creation included; the reference is read from the cache, not built).

    python benchmarks/e2e_rate.py run.json [more.json ...]
"""

from __future__ import annotations

import sys
from pathlib import Path

from pytest_kvquality.report import Report
from pytest_kvquality.thresholds import OVERALL


def main(paths: list[str]) -> None:
    for path in paths:
        report = Report.loads(Path(path).read_text())
        overall = [r for r in report.sorted_records() if r.category == OVERALL]
        tokens = sum(r.summary.n_tokens for r in overall)
        seconds = sum(r.eval_seconds for r in overall)
        for r in overall:
            print(f"{path}: {r.model} {r.cache:<12} {r.summary.n_tokens:>7,} scored tokens in {r.eval_seconds:6.2f} s: "
                  f"{r.summary.n_tokens / r.eval_seconds:>8,.0f} tok/s")
        if seconds > 0:
            print(f"{path}: all {len(overall)} configs: {tokens:,} scored tokens in {seconds:.2f} s: "
                  f"{tokens / seconds:,.0f} tok/s")


if __name__ == "__main__":
    main(sys.argv[1:])
