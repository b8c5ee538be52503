"""``time_interleaved``: every runner in every round, rotating order, settle calls untimed; no real time."""

from __future__ import annotations

import itertools

from evit_patch.bench.speed import time_interleaved


def test_rounds_rotate_and_only_timed_calls_count():
    calls: list[str] = []
    ticks = itertools.count()
    cost = {"a": 1, "b": 3, "c": 10}
    now = [0]

    def clock():
        next(ticks)
        return now[0]

    def runner(name):
        def run():
            calls.append(name)
            now[0] += cost[name]

        return run

    medians = time_interleaved({n: runner(n) for n in cost}, rounds=3, warmup=1, settle=1, clock=clock)
    assert medians == {"a": 1, "b": 3, "c": 10}
    warm, timed = calls[:3], calls[3:]
    assert warm == ["a", "b", "c"]
    # each round starts one runner later; each runner runs twice in a row (settle, then timed)
    assert timed == ["a", "a", "b", "b", "c", "c", "b", "b", "c", "c", "a", "a", "c", "c", "a", "a", "b", "b"]
    assert next(ticks) == 2 * 3 * 3  # two clock reads per timed call only
