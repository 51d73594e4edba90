"""Work an owner spawns and must not outlive: strong references, failures logged, cancelled on close."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any, Final, TypeVar

# A cancelled task's own cleanup (an action's process killed, a record committed) gets this
# long by default; an owner's stop must stay well within systemd's TimeoutStopSec (30 s).
CLOSE_TIMEOUT: Final = 5.0

T = TypeVar("T")


class TaskSet:
    """The tasks one owner (the agent, a rule engine, the hub) spawns while it runs.

    The set keeps a strong reference to each task until it ends. A task that fails is logged
    at ERROR with its traceback, once, unless it was spawned `quiet` (its owner awaits it and
    takes its outcome). `close()` refuses new work, then cancels what is left and waits for it,
    the latest started first.
    """

    def __init__(self, owner: str, logger: logging.Logger, *, close_timeout: float = CLOSE_TIMEOUT) -> None:
        self._owner, self._log, self._close_timeout = owner, logger, close_timeout
        self._tasks: dict[asyncio.Task[Any], None] = {}  # a dict keeps the order of start
        self._quiet: set[asyncio.Task[Any]] = set()
        self._closed = False

    def spawn(self, work: Coroutine[Any, Any, T], *, name: str, quiet: bool = False) -> asyncio.Task[T]:
        """Start `work` as a task of this set; RuntimeError once the set is closed."""
        if self._closed:
            work.close()  # never started: no "coroutine was never awaited" warning
            raise RuntimeError(f"{self._owner} is stopping: {name} is not started")
        task = asyncio.get_running_loop().create_task(work, name=f"{self._owner}: {name}")
        self._tasks[task] = None
        if quiet:
            self._quiet.add(task)
        task.add_done_callback(self._ended)
        return task

    def _ended(self, task: asyncio.Task[Any]) -> None:
        self._tasks.pop(task, None)
        if task in self._quiet:
            self._quiet.discard(task)
            return
        if not task.cancelled() and (exc := task.exception()) is not None:
            self._log.error("%s failed", task.get_name(), exc_info=exc)

    def __len__(self) -> int:
        return len(self._tasks)

    async def first_to_end(self) -> asyncio.Task[Any] | None:
        """Wait until one of the running tasks ends and return it (None if none runs)."""
        if not self._tasks:
            return None
        done, _ = await asyncio.wait(list(self._tasks), return_when=asyncio.FIRST_COMPLETED)
        return next(iter(done))

    async def drain(self) -> None:
        """Wait until every task has ended, also those started meanwhile."""
        while self._tasks:
            await asyncio.wait(list(self._tasks))

    async def close(self) -> None:
        """Refuse new work; cancel the tasks left, the latest started first, and wait for each
        (at most `close_timeout` each: one that ignores its cancellation is logged and left)."""
        self._closed = True
        for task in reversed(list(self._tasks)):
            task.cancel()
            await asyncio.wait([task], timeout=self._close_timeout)
            if not task.done():
                self._log.warning("%s did not end within %.0f s of being cancelled", task.get_name(),
                                  self._close_timeout)
