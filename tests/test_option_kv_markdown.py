"""--kv-markdown: the summary file and $GITHUB_STEP_SUMMARY"""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import ARGS


def test_markdown_summary_and_github_step_summary(kv_project: pytest.Pytester, fake_model: Path,
                                                   straddling: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    step_summary = kv_project.path / "step_summary.md"
    step_summary.write_text("# earlier step\n")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(step_summary))
    kv_project.runpytest("--kv-model", str(fake_model), "--kv-thresholds", str(straddling), *ARGS,
                         "--kv-markdown", "kv.md")
    md = (kv_project.path / "kv.md").read_text()
    assert md.startswith("## KV-cache quality\n")
    assert "| cache | coding | long_documents | science | tool_calling | overall KLD ± σ |" in md
    assert "| `q4_0` |" in md and "✅ pass 2 |" in md and "⚠️ inconclusive 1/1 |" in md
    assert "### Gates not passed" in md and "`tiny::q4_0/f16::overall::kl_mean`" in md
    assert step_summary.read_text() == "# earlier step\n" + md + "\n"  # appended, never overwritten
