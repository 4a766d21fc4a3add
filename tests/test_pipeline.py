"""``engine.pipeline.decoded_in_turn``: contexts decoding ahead on their own threads may never
decode over views still being reduced, never run two decodes on one context at once, and never
outlive the evaluation that closes their contexts."""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import pytest

from pytest_kvquality.engine.pipeline import decoded_in_turn


class Contexts:
    """Two stand-in contexts: each decode records when it ran and on which thread; each group's
    'reduction' (a future held for its context) finishes 30 ms after the group is handed out."""

    def __init__(self) -> None:
        self.log: list[tuple[int, int, float, float, int]] = []  # source, group, start, end, thread
        self.reduced_at: dict[int, float] = {}
        self.busy = {0: threading.Lock(), 1: threading.Lock()}
        self._reducer = ThreadPoolExecutor(2)
        self._held: dict[int, list[Future[Any]]] = {}

    def decode(self, source: int, group: int) -> list[int]:
        if not self.busy[source].acquire(blocking=False):
            raise AssertionError(f"context {source} decoded by two threads at once")
        start = time.perf_counter()
        time.sleep(0.01)
        self.busy[source].release()
        self.log.append((source, group, start, time.perf_counter(), threading.get_ident()))
        return [group]

    def held(self, source: int) -> list[Future[Any]]:
        return self._held.pop(source, [])

    def hand_out(self, source: int, group: int) -> None:
        def reduce() -> None:
            time.sleep(0.03)
            self.reduced_at[group] = time.perf_counter()
        self._held.setdefault(source, []).append(self._reducer.submit(reduce))


@pytest.mark.parametrize("ahead", [True, False])
def test_a_context_decodes_again_only_after_its_lent_views_are_reduced(ahead: bool) -> None:
    c = Contexts()
    seen = []
    for g, views in enumerate(decoded_in_turn(list(range(8)), c.decode, 2, c.held, ahead)):
        seen += list(views)
        c.hand_out(g % 2, g)
    assert seen == list(range(8))
    by_group = {group: (source, start, thread) for source, group, start, _, thread in c.log}
    for g in range(2, 8):
        source, start, _ = by_group[g]
        assert source == g % 2
        assert start >= c.reduced_at[g - 2], f"group {g} decoded before group {g - 2}'s views were reduced"
    if ahead:  # each context on one thread of its own, and the two at the same time
        assert len({by_group[g][2] for g in range(0, 8, 2)}) == 1
        assert by_group[0][2] != by_group[1][2]
        spans = {group: (start, end) for _, group, start, end, _ in c.log}
        assert spans[1][0] < spans[0][1], "the second context did not decode while the first did"


def test_a_failed_decode_reaches_the_consumer_and_no_decode_outlives_the_generator() -> None:
    finished: list[int] = []

    def decode(source: int, group: int) -> list[int]:
        if group == 3:
            raise RuntimeError("llama_decode failed with code -3")
        time.sleep(0.05)
        finished.append(group)
        return [group]

    gen = decoded_in_turn(list(range(6)), decode, 2, lambda s: [], True)
    with pytest.raises(RuntimeError, match="code -3"):
        for _ in gen:
            pass
    started = len(finished)
    time.sleep(0.1)
    assert len(finished) == started, "a decode ran on after the generator had stopped"


def test_closing_early_waits_for_the_decode_in_flight() -> None:
    finished: list[int] = []
    started: list[int] = []

    def decode(source: int, group: int) -> list[int]:
        started.append(group)
        time.sleep(0.1)
        finished.append(group)
        return [group]

    gen = decoded_in_turn(list(range(6)), decode, 2, lambda s: [], True)
    next(gen)
    gen.close()  # the evaluation's contexts are closed right after this returns
    assert 0 in finished and sorted(finished) == sorted(started)  # group 1 ran to its end or never began
