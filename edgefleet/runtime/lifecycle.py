"""One way to start and one to stop: an async factory that is also an async context manager,
and the main loop both daemons run until a stop signal."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable, Coroutine, Generator
from types import TracebackType
from typing import Any, Final, Generic, Protocol, TypeVar

from edgefleet.runtime.sdnotify import STOPPING, notify


class Closable(Protocol):
    async def close(self) -> None: ...


T = TypeVar("T", bound=Closable)


class Opening(Generic[T]):
    """What `X.open(...)` returns: `x = await X.open(...)` (the caller closes it), or
    `async with X.open(...) as x:`, which closes it however the block ends."""

    def __init__(self, opening: Coroutine[Any, Any, T]) -> None:
        self._opening = opening
        self._opened: T | None = None

    def __await__(self) -> Generator[Any, None, T]:
        return self._opening.__await__()

    async def __aenter__(self) -> T:
        self._opened = await self._opening
        return self._opened

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self._opened is not None:
            await self._opened.close()


STOP_SIGNALS: Final = (signal.SIGTERM, signal.SIGINT)


async def run_until_signal(work: Coroutine[Any, Any, None], *,
                           leave: Callable[[], Awaitable[None]] | None = None) -> None:
    """Run a daemon's `work` until it ends or SIGTERM/SIGINT arrives; both daemons' main loop.

    systemd hears STOPPING=1 as soon as the daemon begins to stop, for either reason. On a
    signal, `leave()` runs first (the agent leaves the broker cleanly), then `work` is cancelled
    and awaited; the call returns. If `work` raised, its exception is raised here. The handlers
    stay installed until the loop closes: a second signal while the daemon cleans up changes nothing.
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, stop.set)
    task = loop.create_task(work, name="main")
    stopper = loop.create_task(stop.wait(), name="stop signal")
    try:
        await asyncio.wait([task, stopper], return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
        if not task.done() and not stop.is_set():  # we were cancelled ourselves: so is the work
            task.cancel()
            await asyncio.wait([task])
    notify(STOPPING)
    if task.done():
        task.result()  # re-raise what ended it
        return
    try:
        if leave is not None:
            await leave()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
