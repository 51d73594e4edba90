"""Keep an MQTT session up: connect, run the connected work, back off, repeat."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any, Final

from edgefleet.errors import ConnectionLost, ConnectRefused, PublishRefused
from edgefleet.mqtt.reconnect import Backoff, LinkState
from edgefleet.mqtt.session import MqttSession

# A wall-clock jump this large means the clock was just set (NTP on a board without a
# real-time clock): TLS failures caused by the wrong clock heal then, so retry at once.
CLOCK_STEP: Final = 60.0

SessionFactory = Callable[[], MqttSession]
ConnectedWork = Callable[[MqttSession], Coroutine[Any, Any, None]]
# Told of every failed attempt (the factory chose its identity); True: it has another one to
# try, so the next attempt comes at once, without the wait a refused identity otherwise costs.
RefusalHook = Callable[[ConnectRefused], bool]
# Told why, each time the link backs off (a failed attempt or a dropped connection).
LostHook = Callable[[str], None]


# What ends one connection but not the link: reconnect and carry on.
SESSION_ENDED: Final = (ConnectionLost, ConnectRefused, PublishRefused)


def _clock_offset() -> float:
    """Wall clock minus monotonic clock: constant unless someone sets the wall clock."""
    return time.time() - time.monotonic()


class Link:
    """Runs `work` on every new connection until it returns or the connection drops.

    Logging policy: the first failure after a good connection is a WARNING, repeats are
    DEBUG, a refused identity is a WARNING every time (an operator must act on it).
    """

    def __init__(self, name: str, factory: SessionFactory, work: ConnectedWork,
                 backoff: Backoff | None = None, logger: logging.Logger | None = None,
                 on_refused: RefusalHook | None = None, on_lost: LostHook | None = None) -> None:
        self.name = name
        self._factory = factory
        self._work = work
        self._on_refused = on_refused
        self._on_lost = on_lost
        self._restart = asyncio.Event()
        self._planned: str | None = None
        self.backoff = backoff or Backoff()
        self._log = logger or logging.getLogger(__name__)
        self.connected = asyncio.Event()
        self.session: MqttSession | None = None
        self.last_error = ""
        self.connections = 0

    @property
    def state(self) -> LinkState:
        return self.backoff.state

    def restart(self, why: str) -> None:
        """End the current connection cleanly (no Last Will) and connect again at once, without
        counting a failure: a planned switch, e.g. to a renewed certificate."""
        if self.session is not None:
            self._planned = why
            self._restart.set()

    async def run(self) -> None:
        """Loop forever (until cancelled)."""
        warned = False
        while True:
            self.backoff.connecting()
            # Taken before the attempt: a clock step that lands while the attempt fails
            # must still count as a step during the pause that follows.
            clock_offset = _clock_offset()
            auth = False
            try:
                session = self._factory()
                await session.connect()
            except ConnectRefused as exc:
                auth, why = exc.auth, str(exc)
                if self._on_refused is not None and self._on_refused(exc):
                    self._log.info("%s: %s; connecting again now with another identity", self.name, why)
                    continue
            else:
                why = await self._serve(session)
                warned = False  # a failure after a good connection is news again
                if self._planned is not None:
                    self._log.info("%s: %s; connecting again now", self.name, self._planned)
                    self._planned = None
                    continue
            self.last_error = why
            if self._on_lost is not None:
                self._on_lost(why)
            delay = self.backoff.lost(time.monotonic(), auth=auth)
            level = logging.WARNING if (auth or not warned) else logging.DEBUG
            self._log.log(level, "%s: %s; retrying in %.1f s", self.name, why, delay)
            warned = True
            await self._pause(delay, clock_offset)

    async def _pause(self, delay: float, clock_offset: float) -> None:
        """Back off for `delay`, but end early when the wall clock is stepped."""
        end = time.monotonic() + delay
        while (left := end - time.monotonic()) > 0:
            await asyncio.sleep(min(left, 1.0))
            if abs(_clock_offset() - clock_offset) > CLOCK_STEP:
                self._log.info("%s: the system clock was stepped; retrying now", self.name)
                return

    async def _serve(self, session: MqttSession) -> str:
        self.session = session
        self.connections += 1
        self.backoff.connected(time.monotonic())
        self.connected.set()
        self._log.info("%s: connected", self.name)
        self._restart.clear()
        try:
            work = asyncio.create_task(self._work(session), name=f"{self.name}-work")
            closed = asyncio.create_task(session.wait_closed(), name=f"{self.name}-closed")
            restart = asyncio.create_task(self._restart.wait(), name=f"{self.name}-restart")
            try:
                done, _ = await asyncio.wait({work, closed, restart}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in (work, closed, restart):
                    task.cancel()
                await asyncio.gather(work, closed, restart, return_exceptions=True)
            if restart in done:
                return "restarted as planned"
            if work in done and not work.cancelled():
                exc = work.exception()
                if isinstance(exc, BaseExceptionGroup):  # the work's own TaskGroup
                    lost, other = exc.split(SESSION_ENDED)
                    if other is not None:
                        raise other
                    exc = _first_leaf(lost) if lost is not None else None
                if isinstance(exc, SESSION_ENDED):
                    return str(exc)
                if exc is not None:
                    raise exc
                return "connected work finished"
            return closed.result() if not closed.cancelled() else "closed"
        finally:
            self.connected.clear()
            self.session = None
            await session.close()



def _first_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException:
    first = group.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first
