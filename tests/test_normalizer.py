"""Each row's argmax and log-normalizer: one definition, the compiled pass and numpy give the same
bits on every kind of row, and the defined exponential is as accurate as a libm one."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pytest_kvquality import kernels
from pytest_kvquality.compaction import compact_rows
from pytest_kvquality.metrics import TokenStats, kl_compact
from pytest_kvquality.normalizer import exp_defined, hard_normalizer_rows, normalize_rows, shift_for

HAS_CC = kernels.compiler() is not None
needs_cc = pytest.mark.skipif(not HAS_CC, reason="no C compiler: numpy does the work")


#: each test builds into its own cache, and no test sees another's loaded library (conftest.py)
pytestmark = pytest.mark.usefixtures("fresh_kernels")


def compiled() -> kernels.Kernels:
    k = kernels.compiled_kernels()
    assert k is not None
    return k


@needs_cc
@pytest.mark.parametrize(("n", "vocab", "spread"), [
    (37, 262_144, 3.0),  # Gemma's vocabulary: the fixed-point shift at its smallest (44)
    (5, 151_936, 12.0),  # Qwen's, wide logits: most terms clamp and round to 0
    (9, 50, 0.01),  # nearly flat, tiny vocabulary: the largest shift
    (1, 1, 1.0),  # one token: log-normalizer = the logit
])
def test_compiled_rows_give_the_same_bits_as_numpy(n: int, vocab: int, spread: float) -> None:
    rng = np.random.default_rng(n + vocab)
    x = (rng.standard_normal((n, vocab)) * spread).astype(np.float32)
    ids = rng.integers(0, vocab, (n, 7)).astype(np.int32)
    got, expected = normalize_rows(x, ids, kernels=compiled()), normalize_rows(x, ids, kernels=None)
    assert got.differences(expected) == []
    assert np.array_equal(got.gathered, x[np.arange(n)[:, None], ids])


@needs_cc
def test_ties_nan_and_infinite_rows_agree_with_numpy_argmax() -> None:
    block, ids = hard_normalizer_rows(np.random.default_rng(5))
    got, expected = normalize_rows(block, ids, kernels=compiled()), normalize_rows(block, ids, kernels=None)
    assert got.differences(expected) == []
    assert got.imax.tolist() == block.argmax(axis=1).tolist()  # first maximum, first NaN
    finite = np.isfinite(block[np.arange(8), got.imax])
    assert finite.tolist() == [True, True, True, True, False, False, False, True]
    assert np.isnan(got.norm[~finite]).all() and np.isfinite(got.norm[finite]).all()


def test_the_defined_exponential_is_within_one_float32_ulp() -> None:
    d = np.linspace(-64, 0, 1_000_001).astype(np.float32)
    exact = np.exp(d.astype(np.float64))
    assert np.max(np.abs(exp_defined(d) - exact) / exact) < 1.2e-7  # float32 ulp: 6e-8 to 1.2e-7
    assert exp_defined(np.zeros(1, np.float32))[0] == 1.0


@pytest.mark.parametrize("compiled_too", [False, True])
def test_log_normalizer_matches_float64_log_sum_exp(compiled_too: bool) -> None:
    if compiled_too and not HAS_CC:
        pytest.skip("no C compiler")
    rng = np.random.default_rng(9)
    x = (rng.standard_normal((16, 262_144)) * 4).astype(np.float32)
    x[3, :1000] = -np.inf  # masked tokens count as probability 0
    done = normalize_rows(x, kernels=compiled() if compiled_too else None)
    x64 = x.astype(np.float64)
    top = x64.max(axis=1)
    exact = top + np.log(np.exp(x64 - top[:, None]).sum(axis=1))
    ulp = np.spacing(np.abs(exact).astype(np.float32)).astype(np.float64)
    assert np.all(np.abs(done.norm - exact) <= ulp)  # within one float32 rounding of the result


def test_the_fixed_point_sum_has_headroom_for_any_vocabulary() -> None:
    for vocab in (1, 2, 50, 262_144, 2**20 + 1, 2**24):
        shift = shift_for(vocab)
        assert vocab * 2.0**shift < 2.0**63 and 2.0**shift < 2.0**52
    assert shift_for(262_144) == 44


@needs_cc
def test_kl_against_a_compact_reference_is_bit_identical_compiled_or_not(monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole evaluation of a row block, not just the normalizer: every per-token value equal."""
    rng = np.random.default_rng(11)
    base = (rng.standard_normal((24, 20_000)) * 3).astype(np.float32)
    cand = base + (rng.standard_normal(base.shape) * 0.3).astype(np.float32)
    nxt = rng.integers(0, 20_000, 24)
    ref = compact_rows(base, nxt, 144, 96, rng.random(24))
    got = kl_compact(cand, ref, nxt)
    monkeypatch.setenv("KVQ_COMPILED", "0")
    expected = kl_compact(cand, ref, nxt)
    for name, mine in got.arrays().items():
        assert np.array_equal(mine, getattr(expected, name)), name
    assert isinstance(got, TokenStats) and not math.isnan(float(got.kld.mean()))


@needs_cc
def test_a_library_whose_normalizer_disagrees_is_refused(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """As a compiler that contracts a multiply-add into an FMA might build it: one sum off by one unit."""
    rows = kernels.Kernels.rows

    def off_by_one(self: kernels.Kernels, *args: object, **kw: object) -> tuple[np.ndarray, ...]:
        imax, total, gathered = rows(self, *args, **kw)  # type: ignore[arg-type]
        total[0] += 1
        return imax, total, gathered

    monkeypatch.setattr(kernels.Kernels, "rows", off_by_one)
    assert kernels.compiled_kernels() is None
    assert "disagrees with numpy (fixed_sum)" in capsys.readouterr().err
