"""What the field-sensor tests share: a sink that collects readings, bounded waits."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from edge_agent.sense.sensors import Reading

WAIT_S = 20.0  # every wait is bounded; a loaded 2-core machine is slow, not stuck


class Collected:
    """A sensor's sink: keeps every reading and wakes whoever waits for more."""

    def __init__(self) -> None:
        self.readings: list[Reading] = []
        self.changed = asyncio.Event()

    def __call__(self, batch: list[Reading]) -> None:
        self.readings.extend(batch)
        self.changed.set()

    async def until(self, count: int, timeout: float = WAIT_S) -> list[Reading]:
        async with asyncio.timeout(timeout):
            while len(self.readings) < count:
                self.changed.clear()
                await self.changed.wait()
        return self.readings


async def wait_until(predicate: Callable[[], bool], what: str, timeout: float = WAIT_S) -> None:
    """Poll `predicate()` (a counter, a process's state: nothing announces them) until true, bounded."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        await asyncio.sleep(0.05)
