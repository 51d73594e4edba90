"""SQLite connections for asyncio that share a few threads, however many connections there are.

aiosqlite gives every connection a thread of its own, woken for each statement. One agent
has one outbox and does not care; `edge-agent simulate` runs 2,000 agents in a process, and
2,000 threads each woken several times a second fight the event loop for the GIL until the
loop starves (a 1 ms sensor read took 600 ms at 1,300 agents). Here the statements of every
connection run on one small pool: in order per connection (one at a time, first in first
out), and a pool thread that finds more work goes on without sleeping. Results reach the
event loop in batches, one wake-up for all those that are ready.

As with aiosqlite, a statement handed over runs to its end even if the task awaiting it is
cancelled: `edgefleet.runtime.sqlite.to_completion` keeps transactions whole on top of that.
"""

from __future__ import annotations

import asyncio
import collections
import queue
import sqlite3
import threading
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final, Literal, TypeVar

# Threads for every connection of the process. A connection uses one at a time, so one agent
# needs one; several let the fsyncs of many outboxes (synchronous = full) overlap.
POOL_THREADS: Final = 8
BUSY_TIMEOUT: Final = 5.0  # seconds a statement waits on another process's lock (sqlite3's default)

T = TypeVar("T")
_Outcome = tuple["asyncio.Future[Any]", Any, BaseException | None]


class _Threads:
    """The process's pool: threads that run the calls of the connections handed to them,
    started on demand (a process with one connection gets one thread)."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._lock = threading.Lock()
        self._work: queue.SimpleQueue[PooledConnection] = queue.SimpleQueue()
        self._threads = 0
        self._idle = 0

    def drain(self, connection: PooledConnection) -> None:
        """Have a pool thread run the connection's queued calls (an executor's submit would make
        a Future and a Condition per statement: most of the cost at 2,000 connections)."""
        with self._lock:
            start = self._idle == 0 and self._threads < self._limit
            self._threads += start
            name = f"sqlite-{self._threads}"
        self._work.put(connection)
        if start:
            threading.Thread(target=self._serve, name=name, daemon=True).start()

    def _serve(self) -> None:
        while True:
            with self._lock:
                self._idle += 1
            connection = self._work.get()
            with self._lock:
                self._idle -= 1
            connection.drain()


_threads: Final = _Threads(POOL_THREADS)


class _Delivery:
    """Hands results to one event loop: one call_soon_threadsafe per batch, not per result."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self._ready: list[_Outcome] = []

    def post(self, outcome: _Outcome) -> None:
        with self._lock:
            self._ready.append(outcome)
            if len(self._ready) > 1:
                return  # a delivery is already on its way and will take this one too
        try:
            self._loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:  # the loop is closed: nobody awaits these results any more
            with self._lock:
                self._ready.clear()

    def _deliver(self) -> None:
        with self._lock:
            ready, self._ready = self._ready, []
        for future, result, exc in ready:
            if future.cancelled():
                continue  # its caller was cancelled; the statement ran all the same
            if exc is None:
                future.set_result(result)
            else:
                future.set_exception(exc)


_deliveries: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Delivery] = weakref.WeakKeyDictionary()


def _delivery(loop: asyncio.AbstractEventLoop) -> _Delivery:
    """The loop's one _Delivery (called on the loop's thread only)."""
    found = _deliveries.get(loop)
    if found is None:
        found = _deliveries[loop] = _Delivery(loop)
    return found


class PooledConnection:
    """One sqlite3 connection; open with `await connect(...)`, end with `await close()`."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._conn: sqlite3.Connection | None = None  # set on the pool thread by the first call
        self._loop = loop
        self._delivery = _delivery(loop)
        self._lock = threading.Lock()
        self._queue: collections.deque[tuple[Callable[[], Any], asyncio.Future[Any]]] = collections.deque()
        self._draining = False
        self._closed = False

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise sqlite3.ProgrammingError("Cannot operate on a closed database.")
        return self._conn

    def run(self, work: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        """Run `work(connection)` on a pool thread after every call made before it."""
        if self._closed:
            raise sqlite3.ProgrammingError("Cannot operate on a closed database.")
        return self._submit(lambda: work(self._connection()))

    def _submit(self, call: Callable[[], T]) -> asyncio.Future[T]:
        future: asyncio.Future[T] = self._loop.create_future()
        with self._lock:
            self._queue.append((call, future))
            if self._draining:
                return future
            self._draining = True
        _threads.drain(self)
        return future

    def drain(self) -> None:
        """On a pool thread: this connection's calls, in order, until none is left."""
        while True:
            with self._lock:
                if not self._queue:
                    self._draining = False
                    return
                call, future = self._queue.popleft()
            try:
                outcome: _Outcome = (future, call(), None)
            except BaseException as exc:  # noqa: BLE001 - handed to the awaiting task, as aiosqlite does
                outcome = (future, None, exc)
            self._delivery.post(outcome)

    def _open(self, opener: Callable[[], sqlite3.Connection]) -> None:
        self._conn = opener()

    def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    async def execute(self, sql: str, parameters: Sequence[Any] = ()) -> int:
        """Run one statement; return its rowcount."""
        return await self.run(lambda db: db.execute(sql, parameters).rowcount)

    async def executescript(self, script: str) -> None:
        await self.run(lambda db: db.executescript(script))

    async def fetchall(self, sql: str, parameters: Sequence[Any] = ()) -> list[Any]:
        return await self.run(lambda db: db.execute(sql, parameters).fetchall())

    async def fetchone(self, sql: str, parameters: Sequence[Any] = ()) -> Any:
        return await self.run(lambda db: db.execute(sql, parameters).fetchone())

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self._submit(self._close)


async def connect(database: Path | str, *, uri: bool = False,
                  isolation_level: Literal["DEFERRED", "EXCLUSIVE", "IMMEDIATE"] | None = None) -> PooledConnection:
    """Open a connection; the opening runs on a pool thread too (it touches the file and may block)."""
    connection = PooledConnection(asyncio.get_running_loop())
    opening = connection._submit(lambda: connection._open(lambda: sqlite3.connect(
        database, uri=uri, isolation_level=isolation_level, timeout=BUSY_TIMEOUT, check_same_thread=False)))
    try:
        await asyncio.shield(opening)
    except asyncio.CancelledError:
        connection._closed = True
        connection._submit(connection._close)  # runs after the opening: cancelled, but no file left open
        raise
    except BaseException:
        connection._closed = True
        raise
    return connection
