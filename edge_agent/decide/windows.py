"""Recent readings per metric, kept only as long as some rule's window needs them.

This is what rule expressions are evaluated against (the `Env` of edgefleet.policy.expr):
`latest(metric)`, `window(metric, seconds)` and `now()`.
"""

from __future__ import annotations

import bisect
import collections
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Final

from edge_agent.sense.sensors import Reading

# Beyond what the longest window needs, per metric: bounds memory whatever the sample rate
# (1,000 Hz x 300 s would otherwise be 300,000 readings of one metric).
MAX_KEPT_PER_METRIC: Final = 20_000


class ReadingWindows:
    """`keep` maps metric → seconds of history to keep (0: only the latest reading)."""

    def __init__(self, keep: Mapping[str, float], clock: Callable[[], float] = time.time) -> None:
        self._keep = dict(keep)
        self._clock = clock
        self._ts: dict[str, collections.deque[float]] = {m: collections.deque() for m in keep}
        self._values: dict[str, collections.deque[float]] = {m: collections.deque() for m in keep}
        self._latest: dict[str, tuple[float, float]] = {}

    def add(self, readings: Iterable[Reading]) -> set[str]:
        """Take readings; return the metrics that changed (the rules to re-evaluate)."""
        changed: set[str] = set()
        for metric, ts, value in readings:
            keep = self._keep.get(metric)
            if keep is None:
                continue  # no rule reads this metric
            self._latest[metric] = (ts, value)
            changed.add(metric)
            if keep > 0:
                times, values = self._ts[metric], self._values[metric]
                times.append(ts)
                values.append(value)
                horizon = ts - keep
                while times and (times[0] < horizon or len(times) > MAX_KEPT_PER_METRIC):
                    times.popleft()
                    values.popleft()
        return changed

    def latest(self, metric: str) -> tuple[float, float] | None:
        return self._latest.get(metric)

    def window(self, metric: str, seconds: float) -> Sequence[tuple[float, float]]:
        times = self._ts.get(metric)
        if not times:
            return ()
        start = self._clock() - seconds
        # deques index in O(n) from the ends; copy to a list once for the search.
        ts_list = list(times)
        first = bisect.bisect_left(ts_list, start)
        values = self._values[metric]
        return [(ts_list[i], values[i]) for i in range(first, len(ts_list))]

    def now(self) -> float:
        return self._clock()
