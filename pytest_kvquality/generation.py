"""Generation divergence: does the candidate cache make the model *say* something else?

For each prompt the reference cache greedy-decodes up to N tokens (stopping at an end-of-generation
token); the candidate cache, same weights, decodes the same prompt and is compared token by token.
Its first differing position is the prompt's *first divergence*; a candidate that reproduces the
whole reference generation (N tokens, or up to and including the reference's end token) is
*identical*, its divergence censored at N. At the divergence point both caches have seen the same
prefix, so the KL between their next-token distributions there is well defined (the reference side
is kept compact, as reference logits are: ``ReferenceRows``).

Uncertainty is over prompts: prompts are the independent units, so the gate bounds come from a
bootstrap over them (resampled within each category), never from tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from .metrics import ReferenceRows
from .uncertainty import LEVEL, MIN_CHUNKS, GateBound

#: greedy tokens per prompt by default (REFRACT and the issue's default)
DEFAULT_GEN_TOKENS = 128
#: a prompt "agrees" when its first this-many tokens match (``gen_prefix_agree``)
DEFAULT_AGREE_TOKENS = 32
#: bootstrap resamples behind every generation bound (fixed seed: the same data gives the same bound)
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 20261202

GEN_METRICS = ("gen_first_divergence_median", "gen_identical", "gen_prefix_agree", "gen_kl_at_divergence")


@dataclass
class Generations:
    """The reference's greedy generations: ``tokens`` (n_prompts x N, -1 past each length), their
    ``lengths``, and the compact reference row of every generated step, prompt after prompt."""

    tokens: npt.NDArray[np.int32]
    lengths: npt.NDArray[np.int32]
    rows: ReferenceRows

    @property
    def n_tokens(self) -> int:
        return int(self.tokens.shape[1])

    def offsets(self) -> npt.NDArray[np.int64]:
        """Where each prompt's rows start in ``rows``."""
        return np.concatenate([[0], np.cumsum(self.lengths, dtype=np.int64)[:-1]]) if len(self.lengths) else \
            np.zeros(0, np.int64)

    def arrays(self) -> dict[str, np.ndarray]:
        return {"tokens": self.tokens, "lengths": self.lengths,
                **{f"rows.{k}": v for k, v in self.rows.arrays().items()}}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> Generations:
        rows = ReferenceRows.from_arrays({k[5:]: v for k, v in arrays.items() if k.startswith("rows.")})
        return cls(arrays["tokens"], arrays["lengths"], rows)


@dataclass
class Divergence:
    """The candidate against the reference generations, per prompt: ``first`` differing position
    (N where identical), the KL there (NaN where identical), and tokens decoded."""

    first: npt.NDArray[np.int32]
    kl: npt.NDArray[np.float32]
    n_tokens: int

    @property
    def identical(self) -> npt.NDArray[np.bool_]:
        return self.first >= self.n_tokens

    def arrays(self) -> dict[str, np.ndarray]:
        return {"first": self.first, "kl": self.kl, "n_tokens": np.array(self.n_tokens, np.int64)}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> Divergence:
        return cls(arrays["first"], arrays["kl"], int(arrays["n_tokens"]))

    @classmethod
    def concat(cls, parts: list[Divergence]) -> Divergence:
        n = {p.n_tokens for p in parts}
        if len(n) > 1:
            raise ValueError(f"generations of different lengths cannot be pooled: {sorted(n)}")
        return cls(np.concatenate([p.first for p in parts]).astype(np.int32),
                   np.concatenate([p.kl for p in parts]).astype(np.float32), n.pop() if n else 0)


def _statistics(d: Divergence, agree: int) -> dict[str, float]:
    first = d.first.astype(np.float64)
    diverged = d.kl[~d.identical]
    return {
        "gen_first_divergence_median": float(np.median(first)) if first.size else math.nan,
        "gen_identical": float(d.identical.mean()) if first.size else math.nan,
        "gen_prefix_agree": float((d.first >= agree).mean()) if first.size else math.nan,
        # the mean over prompts that diverged (0 when none did: nothing moved)
        "gen_kl_at_divergence": float(diverged.astype(np.float64).mean()) if diverged.size else 0.0,
    }


@dataclass
class GenerationSummary:
    """Generation statistics of one category (or all of them) with their gate bounds."""

    n_prompts: int
    n_tokens: int
    agree_tokens: int
    values: dict[str, float]
    #: the median divergence is at N: more than half the prompts were identical (a lower bound only)
    median_censored: bool
    decoded_tokens: int = 0
    seconds: float = 0.0
    #: of ``seconds``, the time of the one-token decodes (and the comparisons after each)
    step_seconds: float = 0.0

    @property
    def decode_tokens_per_s(self) -> float | None:
        return self.decoded_tokens / self.step_seconds if self.step_seconds > 0 else None

    def to_dict(self) -> dict[str, object]:
        return {"n_prompts": self.n_prompts, "n_tokens": self.n_tokens, "agree_tokens": self.agree_tokens,
                **self.values, "median_censored": self.median_censored, "decoded_tokens": self.decoded_tokens,
                "seconds": self.seconds, "decode_tokens_per_s": self.decode_tokens_per_s}


def summarize_generation(strata: list[Divergence], agree: int, decoded: int = 0, seconds: float = 0.0,
                         step_seconds: float = 0.0) -> tuple[GenerationSummary, dict[str, GateBound]]:
    """Values over the prompts of ``strata`` (categories) and one-sided 95 % percentile-bootstrap
    bounds, prompts resampled within their category. A bound at the censoring point N is open (a
    median of N says "N or more")."""
    pooled = Divergence.concat(strata) if strata else Divergence(np.zeros(0, np.int32), np.zeros(0, np.float32), 0)
    n = pooled.first.size
    values = _statistics(pooled, agree)
    summary = GenerationSummary(n, pooled.n_tokens, agree, values,
                                bool(n) and values["gen_first_divergence_median"] >= pooled.n_tokens,
                                decoded, seconds, step_seconds)
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    draws: dict[str, list[float]] = {m: [] for m in GEN_METRICS}
    sizes = [s.first.size for s in strata]
    if n:
        for _ in range(BOOTSTRAP_RESAMPLES):
            picked = [Divergence(s.first[idx], s.kl[idx], s.n_tokens)
                      for s, idx in ((s, rng.integers(0, k, k)) for s, k in zip(strata, sizes, strict=True) if k)]
            for m, v in _statistics(Divergence.concat(picked), agree).items():
                draws[m].append(v)
    fewest = min(sizes, default=0)
    undecided = (f"{fewest} prompt{'s' if fewest != 1 else ''} where a generation bound needs at least "
                 f"{MIN_CHUNKS} per category (--kv-gen)") if fewest < MIN_CHUNKS else ""
    bounds = {}
    for m in GEN_METRICS:
        x = np.asarray(draws[m]) if draws[m] else np.zeros(0)
        low = float(np.quantile(x, 1.0 - LEVEL)) if x.size else -math.inf
        high = float(np.quantile(x, LEVEL)) if x.size else math.inf
        if m == "gen_first_divergence_median" and high >= pooled.n_tokens:
            high = math.inf  # censored: the data say "at least N", not how much more
        se = float(x.std(ddof=1)) if x.size > 1 else 0.0
        bounds[m] = GateBound(values[m], se, low, high, n, max(n - 1, 1), f"bootstrap over {n} prompts",
                              undecided, fewest)
    return summary, bounds
