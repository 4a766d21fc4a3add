"""The reference compaction: per scored row, the top k tokens exactly and m tail samples
(``compact_rows``), with its two passes over the vocabulary compiled (``kernels.py``) or, without a
compiler, in numpy.

``compact_rows`` pulls each row's tokens above the cutoff out in one compiled pass and
finishes every row (top k, tail sample) in a second one, instead of a compare, a nonzero and a
dozen numpy calls over the gathered entries. The results are the same bits as the numpy path (a
test holds them to it, and the library's self-check at load).
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from .kernels import Kernels, compiled_kernels
from .metrics import F32, LOG_P_CUTOFF, PAD_LOGP, ReferenceRows, base_next_logp
from .normalizer import ROW_BLOCK, log_normalizer

#: Bins of log p over (-16, 0] used to find each row's top-k candidates before sorting them.
TOP_BINS = 1024

#: Tail probabilities are summed as integers in units of 2^-48: exact sums, so a row's tail mass
#: does not depend on the rows it is processed with. Each p enters with float32 precision
#: (relative 6e-8), far below the sampling noise of the tail estimate.
TAIL_MASS_UNIT = float(1 << 48)


def compact_reference(
    base_logits: F32, next_tokens: npt.NDArray[Any], k: int, m: int, rng: np.random.Generator
) -> ReferenceRows:
    """Compress reference logits to ``k`` exact top tokens plus ``m`` tail samples per row."""
    return compact_rows(base_logits, next_tokens, k, m, np.asarray(rng.random(base_logits.shape[0])))


def compact_rows(
    base_logits: F32, next_tokens: npt.NDArray[Any], k: int, m: int, u0: npt.NDArray[np.float64],
    kernels: Kernels | Literal["auto"] | None = "auto",
) -> ReferenceRows:
    """``compact_reference`` with the sampling offsets given: rows can be split across threads
    and give the same result as one pass.

    Only two things touch the whole vocabulary: the log-normalizer and pulling out the tokens
    above the cutoff (on real Gemma rows: median 2,234 of 262,144, p90 12,207, at most ~31,600).
    Everything after works on those tokens only. The top ``k`` of each row are kept exactly (ties
    broken by token id). The rest, the tail, is sampled systematically in token order: one offset
    ``u0`` per row, ``m`` evenly spaced points on the tail's cumulative mass, which is summed in
    fixed point so that each row's sums are exact and independent of the rows processed with it.
    The selection runs in two compiled C kernels (below), or without a C compiler in a
    handful of numpy calls per call with no per-row Python loop. Both give the same bits.
    """
    base_logits = np.ascontiguousarray(base_logits, dtype=np.float32)
    n, n_vocab = base_logits.shape
    k = min(k, n_vocab)
    if kernels == "auto":
        kernels = compiled_kernels()
    if kernels is None:
        bmax, bnorm = log_normalizer(base_logits, kernels=None)
    else:  # the selection right after each block's log-normalizer, while its rows are in cache
        selected: list[tuple[np.ndarray, ...]] = []
        bmax, bnorm = log_normalizer(
            base_logits, lambda block, norm: selected.append(kernels.select(block, norm + LOG_P_CUTOFF, norm)),
            kernels)
        offsets = np.cumsum([0] + [ids.size for _, ids, _ in selected])  # each block's first entry
        starts = np.concatenate([block_starts[:-1] + offset for (block_starts, _, _), offset
                                 in zip(selected, offsets, strict=False)] + [offsets[-1:]])
        ids = np.concatenate([ids for _, ids, _ in selected])
        lp = np.concatenate([lp for _, _, lp in selected])
    top_ids = np.repeat(bmax[:, None], k, axis=1)  # rows with fewer than k tokens above the cutoff
    top_logp = np.full((n, k), PAD_LOGP, np.float32)  # are padded
    tail_ids = np.repeat(bmax[:, None], m, axis=1)
    tail_logp = np.full((n, m), PAD_LOGP, np.float32)
    tail_mass = np.zeros(n, np.float64)
    out = (top_ids, top_logp, tail_ids, tail_logp, tail_mass)
    if kernels is None:
        _compact_numpy(base_logits, bnorm, k, m, u0, *out)
    else:
        kernels.finish(starts, ids, lp, _fixed_point_mass(lp), k, m, np.ascontiguousarray(u0, dtype=np.float64),
                       TOP_BINS, -TOP_BINS / 16.0, TAIL_MASS_UNIT, out)
    next_logp = base_next_logp(base_logits, bmax, bnorm, next_tokens)
    return ReferenceRows(bmax, next_logp, top_ids, top_logp, tail_ids, tail_logp, tail_mass)


def _fixed_point_mass(lp: F32) -> npt.NDArray[np.int64]:
    """p in units of 1 / TAIL_MASS_UNIT: integer sums are exact, so a row's cumulative mass is the
    same whatever rows come before it. numpy's exp on both paths: the compiled one gets the same bits."""
    out: npt.NDArray[np.int64] = np.rint(np.exp(lp) * TAIL_MASS_UNIT).astype(np.int64)
    return out


def _compact_numpy(base_logits: F32, bnorm: F32, k: int, m: int, u0: npt.NDArray[np.float64],
                   top_ids: npt.NDArray[Any], top_logp: F32, tail_ids: npt.NDArray[Any], tail_logp: F32,
                   tail_mass: npt.NDArray[np.float64]) -> None:
    """``compact_rows``'s selection in plain numpy: fills the padded output arrays in place."""
    n, n_vocab = base_logits.shape
    pieces: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    # one mask buffer reused for every block, not a multi-MB temporary per block
    above = np.empty((min(ROW_BLOCK, n), n_vocab), bool)
    for s in range(0, n, ROW_BLOCK):
        block = base_logits[s : s + ROW_BLOCK]
        norm = bnorm[s : s + block.shape[0]]
        mask = above[: block.shape[0]]
        np.greater(block, (norm + LOG_P_CUTOFF)[:, None], out=mask)
        flat = np.flatnonzero(mask)
        block_rows, block_ids = np.divmod(flat, n_vocab)
        pieces.append((block_rows + s, block_ids, block.reshape(-1)[flat] - norm[block_rows]))
    # every token above the cutoff, as (row, token, log p), in (row, token) order
    rows, ids, lp = (np.concatenate(a) for a in zip(*pieces, strict=True))
    # Candidates for each row's top k, without sorting every entry (real rows hold up to ~30,000):
    # a histogram of log p per row finds the bin holding the k-th largest; everything above it is
    # in, everything below out, and only the entries down to that bin are sorted.
    level = np.minimum((lp * np.float32(-TOP_BINS / 16.0)).astype(np.int64), TOP_BINS - 1)  # 0: highest
    hist = np.bincount(rows * TOP_BINS + level, minlength=n * TOP_BINS).reshape(n, TOP_BINS)
    kth_level = (np.cumsum(hist, axis=1) < k).sum(axis=1)  # TOP_BINS where a row has k entries or fewer
    cand = np.flatnonzero(level <= kth_level[rows])  # in (row, token) order
    cand_rows = rows[cand]
    # by row, then log p descending, then token id (a stable sort keeps token order among ties)
    order = cand[np.argsort(cand_rows * 64.0 - lp[cand], kind="stable")]
    rank = np.arange(order.size) - np.searchsorted(cand_rows, rows[order])
    top, rank = order[rank < k], rank[rank < k]
    top_ids[rows[top], rank] = ids[top]
    top_logp[rows[top], rank] = lp[top]
    in_top = np.zeros(lp.size, bool)
    in_top[top] = True
    tail = np.flatnonzero(~in_top)  # in (row, token) order
    if m and tail.size:
        t_rows = rows[tail]
        t_first = np.searchsorted(t_rows, np.arange(n + 1))
        cum = np.cumsum(_fixed_point_mass(lp[tail]))
        before = np.concatenate([[0], cum])[t_first]  # mass of the earlier rows' tails
        mass = before[1:] - before[:-1]
        has = np.flatnonzero(mass > 0)
        step = mass[has].astype(np.float64) / m
        offsets = np.floor((np.arange(m)[None, :] + u0[has, None]) * step[:, None]).astype(np.int64)
        at = np.searchsorted(cum, before[has, None] + offsets, side="right")
        picked = tail[np.minimum(at, t_first[has + 1, None] - 1)]  # rounding at the top end
        tail_mass[has] = mass[has] / TAIL_MASS_UNIT
        tail_ids[has] = ids[picked]
        tail_logp[has] = lp[picked]
