"""thresholds.py: the YAML schema, with file:line:key errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_kvquality.registry import Registry
from pytest_kvquality.thresholds import ThresholdError, load_thresholds

CATS = ["coding", "science", "tool_calling", "long_documents"]


def known(name: str) -> str | None:
    return Registry().canonical(name) if Registry().lookup(name) else None


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "t.yaml"
    p.write_text(text)
    return p


def test_threshold_file_from_the_readme_loads(tmp_path: Path) -> None:
    p = write(tmp_path, """
version: 1
models:
  gemma3-270m:
    q4_0:
      overall: {kl_mean: "< 0.25", top1: "> 0.75"}
      long_documents: {kl_mean: "<= 0.40"}
    q8_0/q4_0:norot:
      coding: {kl_p99: "< 1.5"}
""")
    ts = load_thresholds(p, known, CATS)
    assert [t.test_id for t in ts] == [
        "gemma3-270m::q4_0::overall::kl_mean", "gemma3-270m::q4_0::overall::top1",
        "gemma3-270m::q4_0::long_documents::kl_mean", "gemma3-270m::q8_0/q4_0:norot::coding::kl_p99",
    ]
    assert ts[1].passes(0.8) and not ts[1].passes(0.75)
    assert ts[2].passes(0.40) and not ts[2].passes(0.41)
    assert ts[0].line == 6


@pytest.mark.parametrize(("body", "line", "message"), [
    ("version: 1\nmodels:\n  gemma3-270m:\n    q4_0:\n      overall: {kl_mean: < 0.1\n",
     None, "YAML syntax error"),
    ("version: 2\nmodels: {}\n", 1, "unsupported version 2"),
    ("models: {}\n", 1, "version: missing"),
    ("version: 1\nmodels:\n  nobody:\n    q4_0: {overall: {kl_mean: '< 1'}}\n", 3,
     "models.nobody: unknown model"),
    ("version: 1\nmodels:\n  gemma3-270m:\n    q4_0: {overall: {kl_mean2: '< 1'}}\n", 4,
     "models.gemma3-270m.q4_0.overall.kl_mean2: unknown metric"),
    ("version: 1\nmodels:\n  gemma3-270m:\n    q4_0: {poetry: {kl_mean: '< 1'}}\n", 4,
     "models.gemma3-270m.q4_0.poetry: unknown category"),
    ("version: 1\nmodels:\n  gemma3-270m:\n    q4_0: {overall: {kl_mean: '~ 1'}}\n", 4,
     "expected '<', '<=', '>' or '>=' and a number"),
    ("version: 1\nmodels:\n  gemma3-270m:\n    q4_0: {overall: {kl_mean: '< abc'}}\n", 4,
     "threshold 'abc' is not a number"),
    ("version: 1\nmodels:\n  gemma3-270m:\n    q4_0: {overall: {kl_mean: 0.1}}\n", 4,
     "expected a quoted rule"),
    ("version: 1\nmodels:\n  gemma3-270m:\n    q4_0: {}\n    q4_0: {}\n", 5,
     "models.gemma3-270m.q4_0: duplicate key (first defined on line 4)"),
    ("version: 1\nmodels:\n  gemma3-270m:\n    q9_9: {}\n", 4, "unknown KV cache type 'q9_9'"),
])
def test_bad_threshold_files_name_file_line_key_and_reason(
    tmp_path: Path, body: str, line: int | None, message: str
) -> None:
    p = write(tmp_path, body)
    with pytest.raises(ThresholdError) as e:
        load_thresholds(p, known, CATS)
    assert str(p) in str(e.value)
    assert message in str(e.value)
    if line is not None:
        assert e.value.line == line


def test_threshold_files_never_construct_python_objects(tmp_path: Path) -> None:
    p = write(tmp_path, "version: !!python/object/apply:os.system ['echo hi']\nmodels: {}\n")
    with pytest.raises(Exception) as e:
        load_thresholds(p, known, CATS)
    assert "python/object" in str(e.value)


def test_shipped_threshold_files_are_valid() -> None:
    shipped = Path(__file__).parent.parent / "thresholds"
    files = sorted(shipped.glob("*.yaml"))
    assert files
    for f in files:
        assert load_thresholds(f, known, CATS)
