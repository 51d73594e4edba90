"""The reading windows rules are evaluated against."""

from __future__ import annotations

from edge_agent.decide.windows import MAX_KEPT_PER_METRIC, ReadingWindows
from edge_agent.sense.sensors import Reading


class Clock:
    def __init__(self, now: float) -> None:
        self.t = now

    def __call__(self) -> float:
        return self.t


def test_latest_window_and_expiry() -> None:
    clock = Clock(100.0)
    w = ReadingWindows({"temp": 30.0, "load": 0.0}, clock)
    changed = w.add([Reading("temp", 60.0, 1.0), Reading("temp", 80.0, 2.0), Reading("temp", 100.0, 3.0),
                     Reading("load", 100.0, 0.5), Reading("ignored", 100.0, 9.0)])
    assert changed == {"temp", "load"}
    assert w.latest("temp") == (100.0, 3.0)
    assert w.latest("load") == (100.0, 0.5)
    assert w.latest("ignored") is None  # no rule reads it: not kept at all
    assert [v for _, v in w.window("temp", 30.0)] == [2.0, 3.0]  # 60.0 fell out of the 30 s kept
    assert [v for _, v in w.window("temp", 10.0)] == [3.0]
    clock.t = 200.0
    assert w.window("temp", 30.0) == []  # nothing in the last 30 s by the clock
    assert w.window("load", 30.0) == ()  # only the latest is kept for load
    assert w.now() == 200.0


def test_memory_is_bounded_per_metric() -> None:
    w = ReadingWindows({"fast": 1e9}, Clock(0.0))
    w.add(Reading("fast", float(i), float(i)) for i in range(MAX_KEPT_PER_METRIC + 500))
    kept = w.window("fast", 2e9)
    assert len(kept) == MAX_KEPT_PER_METRIC
    assert kept[-1][1] == MAX_KEPT_PER_METRIC + 499  # the newest are the ones kept
