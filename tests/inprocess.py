"""Complete agents inside the test process, for fleets too large to run as processes here.

Each one is the real `edge_agent.agent.Agent` that `edge-agent run` runs (see `run_agent`):
its own settings from its bundle, its own outbox, certificate and mutual-TLS connection to
the real broker, its own rule engine and coordinator. Only the process is shared: fifty
agent processes would take the two cores of a CI machine away from the hub under test.

    async with InProcessFleet([bundles / d for d in devices], overrides) as fleet:
        await fleet.wait_online(timeout=30)
        ...
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from types import TracebackType

from edge_agent.agent import Agent
from edge_agent.config import load_settings

# At DEBUG (pytest's log_level here) fifty agents log every SQL statement of their outboxes
# (aiosqlite) into the captured log: megabytes a second, and the event loop spends its time there.
QUIET_LOGGERS = {"aiosqlite": logging.WARNING, "edge_agent": logging.INFO}
STOP_TIMEOUT = 10.0


class InProcessFleet:
    def __init__(self, bundles: Sequence[Path], overrides: Sequence[str] = ()) -> None:
        self.bundles, self.overrides = list(bundles), list(overrides)
        self.agents: dict[str, Agent] = {}
        self._runs: dict[str, asyncio.Task[None]] = {}
        self._levels: dict[str, int] = {}

    async def __aenter__(self) -> InProcessFleet:
        for name, level in QUIET_LOGGERS.items():
            logger = logging.getLogger(name)
            self._levels[name] = logger.level
            logger.setLevel(level)
        try:
            for bundle in self.bundles:
                settings = load_settings(bundle / "agent.toml", self.overrides)
                agent = await Agent.open(settings, settings.load_policy())
                self.agents[agent.device] = agent
                self._runs[agent.device] = asyncio.create_task(agent.run(), name=f"agent {agent.device}")
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    def check(self) -> None:
        """Fail at once if an agent's run ended (a crash), instead of timing out later."""
        for device, run in self._runs.items():
            if run.done():
                problem = run.exception() if not run.cancelled() else None
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
        await self.wait_until("every in-process agent connected", lambda: [
            d for d, a in self.agents.items() if not a.link.connected.is_set()], timeout=timeout)

    async def wait_policy(self, version: int, *, timeout: float) -> None:
        await self.wait_until(f"every in-process agent applied policy version {version}", lambda: [
            d for d, a in self.agents.items() if a.intake.version != version], timeout=timeout)

    async def close(self) -> None:
        """Stop like `run_agent` does on SIGTERM: leave cleanly (Last Will), cancel, close the outbox."""
        try:
            for device, agent in self.agents.items():
                run = self._runs.get(device)
                with contextlib.suppress(Exception):
                    await agent.stop()
                if run is not None:
                    run.cancel()
                    await asyncio.gather(run, return_exceptions=True)
            # Decisions and actions the rule engines spawned outside the run (none should be left).
            leftovers = [t for t in asyncio.all_tasks() if not t.done() and _of_the_agent(t)]
            for task in leftovers:
                task.cancel()
            await asyncio.gather(*leftovers, return_exceptions=True)
            for agent in self.agents.values():
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(STOP_TIMEOUT):
                        await agent.close()
        finally:
            for name, level in self._levels.items():
                logging.getLogger(name).setLevel(level)
            self._levels.clear()


def _of_the_agent(task: asyncio.Task[object]) -> bool:
    code = getattr(task.get_coro(), "cr_code", None)
    return code is not None and "/edge_agent/" in code.co_filename
