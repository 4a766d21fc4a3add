"""Prompt-processing and generation speed per cache config, timed with pytest-benchmark.

pytest-benchmark times each round from pytest's side (so ``--benchmark-compare-fail`` works as
for any benchmark); the tokens/s shown next to quality in the summary table use llama.cpp's own
time, measured inside the model worker, so the pipe to the worker does not count.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .cache_config import CacheConfig
from .engine.protocol import SPEED_PHASES

if TYPE_CHECKING:
    from collections.abc import Callable

    from pytest_benchmark.fixture import BenchmarkFixture

    from .results import SpeedResult
    from .state import KVState


def measure_speed(state: KVState, model: str, benchmark: BenchmarkFixture) -> Callable[..., SpeedResult]:
    def measure(cache: str | CacheConfig, phase: str = "pp", rounds: int = 5) -> SpeedResult:
        if phase not in SPEED_PHASES:
            raise ValueError(f"phase must be one of {', '.join(SPEED_PHASES)}, got {phase!r}")
        config = cache if isinstance(cache, CacheConfig) else CacheConfig.parse(cache)
        target = state.speed_target(model, config, phase)
        seconds: list[float] = []
        benchmark.group = f"kv-speed {phase}"
        benchmark.pedantic(lambda: seconds.append(target()), rounds=rounds, warmup_rounds=1,  # type: ignore[no-untyped-call]
                           iterations=1)
        result: SpeedResult = state.session.record_speed(state.model_name(model), config, phase, seconds)
        benchmark.extra_info.update({"model": result.model, "cache": config.label, "phase": phase,
                                     "n_ctx": result.n_ctx, "n_tokens": result.n_tokens,
                                     "tokens_per_s": result.tokens_per_s})
        return result

    return measure
