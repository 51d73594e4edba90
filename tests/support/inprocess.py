"""Complete agents inside the test process, for fleets too large to run as processes here.

The fleet is `edge_agent.ops.simulate.Fleet`, what `edge-agent simulate` runs: each agent the real
`Agent` of `edge-agent run`, with its own bundle, outbox, certificate and mutual-TLS
connection. Only the process is shared: fifty agent processes would take the two cores of a
CI machine away from the hub under test. This adds the bounded waits tests need.

    async with InProcessFleet([bundles / d for d in devices], overrides) as fleet:
        await fleet.wait_online(timeout=30)
        ...
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from types import TracebackType

from edge_agent.ops.simulate import Fleet

# At DEBUG (pytest's log_level here) fifty agents log every connect, batch and ack into the
# captured log, and the event loop spends its time there.
QUIET_LOGGERS = {"edge_agent": logging.INFO}


class InProcessFleet(Fleet):
    def __init__(self, bundles: Sequence[Path], overrides: Sequence[str] = ()) -> None:
        super().__init__(bundles, overrides)
        self._levels: dict[str, int] = {}

    async def __aenter__(self) -> InProcessFleet:
        for name, level in QUIET_LOGGERS.items():
            logger = logging.getLogger(name)
            self._levels[name] = logger.level
            logger.setLevel(level)
        try:
            await self.start()
        except BaseException:
            self._restore_levels()
            raise
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        try:
            await self.close()
        finally:
            self._restore_levels()

    def _restore_levels(self) -> None:
        for name, level in self._levels.items():
            logging.getLogger(name).setLevel(level)
        self._levels.clear()

    def check(self) -> None:
        """Fail at once if an agent's run ended (a crash), instead of timing out later."""
        for device, problem in self.crashed().items():
            raise AssertionError(f"agent {device} stopped running: {problem!r}")

    async def wait_until(self, what: str, missing_now: Callable[[], Iterable[str]], *, timeout: float,
                         every: float = 0.1) -> None:
        """Poll `missing_now()` (the devices not there yet) until it is empty, bounded."""
        deadline = time.monotonic() + timeout
        while True:
            self.check()
            missing = sorted(missing_now())
            if not missing:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"not within {timeout} s: {what}; still missing: {missing[:10]}"
                                     f"{' ...' if len(missing) > 10 else ''} ({len(missing)} of {len(self.agents)})")
            await asyncio.sleep(every)

    async def wait_online(self, *, timeout: float) -> None:
        await self.wait_until("every in-process agent connected",
                              lambda: set(self.agents) - set(self.connected()), timeout=timeout)

    async def wait_policy(self, version: int, *, timeout: float) -> None:
        await self.wait_until(f"every in-process agent applied policy version {version}", lambda: [
            d for d, a in self.agents.items() if a.intake.version != version], timeout=timeout)
