"""Report by exception: send a reading only when it tells the hub something new.

Configured by a profile's `[report]` table (profiles.ReportSpec). Per metric, readings in
the order they arrive:

1. Aggregation, when `aggregate_s` > 0, comes first. Windows are aligned to multiples of
   `aggregate_s` in reading time (`ts`, not the wall clock); each window becomes one reading,
   the mean of its values, timestamped at the window's end. A window is emitted when the
   first reading of a later window arrives, or by `flush()`.
2. Then the deadband (`deadband[metric]`, else `default_deadband`). A reading passes when
   - it is the first of its metric, or
   - |value - last sent value| > deadband (a NaN value, or a NaN last value, always passes), or
   - `heartbeat_s` > 0 and at least `heartbeat_s` of reading time has passed since the last
     sent reading of that metric (or reading time went backwards: a clock step re-bases).
   A deadband of 0 switches the filter off for that metric: every reading passes.

So the hub's latest value of a metric is always within its deadband of the latest sample
(of the latest window mean, with aggregation), and is never older than `heartbeat_s` while
the sensor is reporting. With every deadband 0 and no aggregation, `filter()` returns its
input list unchanged.
"""

from __future__ import annotations

import math

from edge_agent.sense.sensors import Reading
from edgefleet.policy.profiles import ReportSpec


class ReportFilter:
    """Stateful per metric; feed it every reading, in time order, and send what it returns."""

    def __init__(self, spec: ReportSpec) -> None:
        self._default = spec.default_deadband
        self._deadbands = dict(spec.deadband)
        self._heartbeat = spec.heartbeat_s or math.inf
        self._window = spec.aggregate_s
        self.passthrough = not self._window and not self._default and not any(self._deadbands.values())
        self._sent: dict[str, list[float]] = {}  # metric -> [deadband, last sent value, its ts]
        self._open: dict[str, list[float]] = {}  # metric -> [window index, sum, count]
        self.received = 0  # readings given to filter()
        self.passed = 0  # readings returned by filter() and flush()

    def filter(self, readings: list[Reading]) -> list[Reading]:
        self.received += len(readings)
        if self.passthrough:
            self.passed += len(readings)
            return readings
        if self._window:
            readings = self._aggregate(readings)
        out = self._deadband(readings)
        self.passed += len(out)
        return out

    def flush(self, now: float | None = None) -> list[Reading]:
        """Close the aggregation windows that ended by `now` (all of them when None) and filter them."""
        closed: list[Reading] = []
        for metric, (index, total, count) in list(self._open.items()):
            end = (index + 1) * self._window
            if now is None or end <= now:
                closed.append(Reading(metric, end, total / count))
                del self._open[metric]
        closed.sort(key=lambda r: r.ts)
        out = self._deadband(closed)
        self.passed += len(out)
        return out

    def _aggregate(self, readings: list[Reading]) -> list[Reading]:
        out: list[Reading] = []
        width = self._window
        windows = self._open
        for metric, ts, value in readings:
            index = ts // width
            window = windows.get(metric)
            if window is None:
                windows[metric] = [index, value, 1.0]
            elif window[0] == index:
                window[1] += value
                window[2] += 1.0
            else:
                out.append(Reading(metric, (window[0] + 1) * width, window[1] / window[2]))
                window[0], window[1], window[2] = index, value, 1.0
        return out

    def _deadband(self, readings: list[Reading]) -> list[Reading]:
        # The hot loop: plain lists and locals, no attribute lookups per reading.
        out: list[Reading] = []
        append = out.append
        sent = self._sent
        heartbeat = self._heartbeat
        for reading in readings:
            metric, ts, value = reading
            last = sent.get(metric)
            if last is None:
                sent[metric] = [self._deadbands.get(metric, self._default), value, ts]
                append(reading)
                continue
            band = last[0]
            change = value - last[1]
            elapsed = ts - last[2]
            if (
                not band or change > band or change < -band or change != change
                or elapsed >= heartbeat or elapsed < 0
            ):
                last[1] = value
                last[2] = ts
                append(reading)
        return out
