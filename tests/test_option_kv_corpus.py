"""--kv-corpus: a user corpus's categories drive the thresholds; an unreadable one is an error"""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import GATES


def test_user_corpus_categories_drive_thresholds(kv_project: pytest.Pytester, fake_model: Path) -> None:
    kv_project.makefile(".txt", legal="Article 1. The parties agree. " * 40)
    kv_project.makefile(".yaml", gates="version: 1\nmodels:\n  tiny:\n    q8_0:\n      legal: {top1: '> 0.5'}\n")
    result = kv_project.runpytest("--kv-model", str(fake_model), "--kv-corpus", "legal.txt",
                                  "--kv-thresholds", "gates.yaml", "-v")
    result.stdout.fnmatch_lines(["*tiny::q8_0::legal::top1 PASSED*"])
    kv_project.makefile(".txt", legal="short")
    result = kv_project.runpytest("--kv-model", str(fake_model), "--kv-corpus", "legal.txt",
                                  "--kv-thresholds", "gates.yaml")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*category 'legal' tokenizes to 6 tokens*needs at least 128*"])


def test_unreadable_corpus_is_a_collection_error(kv_project: pytest.Pytester, fake_model: Path) -> None:
    kv_project.makefile(".yaml", gates=GATES)
    result = kv_project.runpytest("--kv-model", str(fake_model), "--kv-thresholds", "gates.yaml",
                                  "--kv-corpus", "no-such-dir")
    result.stdout.fnmatch_lines(["*cannot read the corpus: corpus path no-such-dir does not exist*"])
    assert result.ret == pytest.ExitCode.INTERRUPTED
