"""Each scored row's argmax and log-normalizer ``max + log(sum(exp(x - max)))``, defined once and
computed in one compiled pass per row (``kernels.c``) or, without a compiler, in numpy, with the
same bits.

What makes the two paths agree bit for bit, on any CPU: the exponential is defined here (Cephes'
``expf``: a Cody-Waite reduction by ln 2 and a degree-7 polynomial, ~1 ulp) with the same IEEE
float32 operations in both, instead of a libm or numpy SIMD ``exp`` whose last bit varies by CPU
and library; and the terms are summed as integers in units of 2^-shift, so the sum is exact in
any order and the compiled loop can use the widest vectors there are. Terms below 2^-(shift+1)
round to 0 (shift is 44 for a 262,144-token vocabulary: at most 262,144 x 2^-45 = 7e-9 of a sum
that is at least 1, far below float32's rounding of the result). llama-perplexity sums glibc's
``expf`` in double in token order; the two agree to float32 rounding (oracle tests hold them to it).

The compiled pass also gathers the logits a reduction needs from each row (the reference's top
and tail tokens, the next token) while the row is in cache.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Literal

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from .kernels import Kernels

#: names the definition above in reference keys: a reference normalized otherwise is not reused
NORMALIZER = "cephes-expf-fixed-1"

#: Rows a numpy block holds at once (temporaries stay in cache instead of n_rows x n_vocab).
ROW_BLOCK = 8

F32 = npt.NDArray[np.float32]
I32 = npt.NDArray[np.int32]

_f = np.float32
_LOG2E, _LN2_HI, _LN2_LO = _f(1.44269504088896341), _f(0.693359375), _f(-2.12194440e-4)
_POLY = tuple(_f(c) for c in (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2,
                               1.6666665459e-1, 5.0000001201e-1))
_CLAMP = _f(-64.0)
_ROUNDER = _f(12582912.0)  # 1.5 * 2^23


def shift_for(n_vocab: int) -> int:
    """Fixed-point bits of each term: the row's sum stays below 2^62 and each term below 2^52."""
    return min(51, 62 - max(1, int(n_vocab - 1).bit_length()))


def exp_defined(d: F32) -> F32:
    """exp(d) for float32 d in [-64, 0], operation by operation as ``kvq_exp`` in kernels.c."""
    k = (d * _LOG2E + _ROUNDER) - _ROUNDER  # round half to even, as np.rint, in two additions
    r = d - k * _LN2_HI
    r = r - k * _LN2_LO
    z = r * r
    p = np.full_like(r, _POLY[0])
    for c in _POLY[1:]:
        p = p * r + c
    p = p * z + r
    p = p + _f(1.0)
    scale = ((k.astype(np.int32) + 127) << 23).view(np.float32)
    out: F32 = p * scale
    return out


@dataclass(frozen=True)
class Normalized:
    """Per row: argmax, log-normalizer (NaN where the row's maximum is not finite), gathered logits,
    and the fixed-point sum the normalizer came from (compared bit for bit by the self-check, so a
    difference too small to move a float32 normalizer on the check's rows is still caught)."""

    imax: I32
    norm: F32
    gathered: F32
    fixed_sum: npt.NDArray[np.int64]

    def differences(self, other: Normalized) -> list[str]:
        """Names of the arrays whose dtype, shape or any bit differs from ``other``'s."""
        return [f.name for f in fields(self)
                if getattr(self, f.name).dtype != getattr(other, f.name).dtype
                or not np.array_equal(getattr(self, f.name), getattr(other, f.name), equal_nan=True)]


def _norm(block: F32, imax: I32, total: npt.NDArray[np.int64], shift: int) -> F32:
    """max + log(sum), the sum in units of 2^-shift; NaN where the sum is -1 (a non-finite row)."""
    top = block[np.arange(block.shape[0]), imax]
    with np.errstate(invalid="ignore", divide="ignore"):
        lse = np.log(np.ldexp(total.astype(np.float64), -shift)).astype(np.float32)
    out: F32 = np.where(total >= 0, top + lse, np.float32(np.nan)).astype(np.float32)
    return out


def _rows_numpy(block: F32, shift: int) -> tuple[I32, npt.NDArray[np.int64]]:
    imax = block.argmax(axis=1).astype(np.int32)
    top = block[np.arange(block.shape[0]), imax]
    ok = np.isfinite(top)
    with np.errstate(invalid="ignore", over="ignore"):  # rows with NaN or inf: computed, then discarded
        d = np.maximum(block - np.where(ok, top, _f(0))[:, None], _CLAMP)
        terms = np.rint(np.ldexp(exp_defined(d).astype(np.float64), shift)).astype(np.int64)
    total = np.where(ok, terms.sum(axis=1), -1)
    return imax, total


def normalize_rows(logits: F32, ids: npt.NDArray[np.int32] | None = None,
                   kernels: Kernels | Literal["auto"] | None = "auto") -> Normalized:
    """Argmax and log-normalizer of every row, and ``logits[r, ids[r]]`` for each row r."""
    logits = np.ascontiguousarray(logits, dtype=np.float32)
    n, v = logits.shape
    if kernels == "auto":
        from .kernels import compiled_kernels

        kernels = compiled_kernels()
    shift = shift_for(v)
    ids = np.zeros((n, 0), np.int32) if ids is None else np.ascontiguousarray(ids, dtype=np.int32)
    if kernels is not None:
        imax, total, gathered = kernels.rows(logits, shift, ids)
        return Normalized(imax, _norm(logits, imax, total, shift), gathered, total)
    imax = np.empty(n, np.int32)
    total = np.empty(n, np.int64)
    for s in range(0, n, ROW_BLOCK):
        imax[s : s + ROW_BLOCK], total[s : s + ROW_BLOCK] = _rows_numpy(logits[s : s + ROW_BLOCK], shift)
    gathered = logits[np.arange(n)[:, None], ids].astype(np.float32)
    return Normalized(imax, _norm(logits, imax, total, shift), gathered, total)


def log_normalizer(logits: F32, each_block: Callable[[F32, F32], None] | None = None,
                   kernels: Kernels | Literal["auto"] | None = "auto") -> tuple[I32, F32]:
    """``normalize_rows`` without gathers; ``each_block`` gets every ``ROW_BLOCK`` rows with their
    normalizers right after they are computed, while the rows are still in cache."""
    if each_block is None:
        done = normalize_rows(logits, None, kernels)
        return done.imax, done.norm
    n = logits.shape[0]
    imax, norm = np.empty(n, np.int32), np.empty(n, np.float32)
    for s in range(0, n, ROW_BLOCK):
        block = logits[s : s + ROW_BLOCK]
        done = normalize_rows(block, None, kernels)
        imax[s : s + block.shape[0]], norm[s : s + block.shape[0]] = done.imax, done.norm
        each_block(block, norm[s : s + block.shape[0]])
    return imax, norm


def hard_normalizer_rows(rng: np.random.Generator) -> tuple[F32, I32]:
    """Rows where a normalizer can go wrong, with ids to gather: ties for the maximum, a flat row,
    values far below the maximum (clamped, rounded to 0), -inf, NaN and +inf entries."""
    block = (rng.standard_normal((8, 3000)) * 6).astype(np.float32)
    block[0, [5, 900]] = block[0].max() + 1  # a tie: the first wins
    block[1] = 0.0
    block[2, ::7] = -1e30
    block[3, 11] = -np.inf
    block[4, 17] = np.nan
    block[5, 3] = np.inf
    block[6] = -np.inf
    block[7, :100] = np.float32(40.0)
    ids = rng.integers(0, 3000, (8, 5)).astype(np.int32)
    return block, ids
