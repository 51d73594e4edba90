"""edge_agent.buffer.sqlite_pool: many SQLite connections on a few shared threads (the outboxes of
`edge-agent simulate`; the one outbox of `edge-agent run`)."""

from __future__ import annotations

import asyncio
import gc
import sqlite3
import threading
from pathlib import Path

import pytest

from edge_agent.buffer.sqlite_pool import POOL_THREADS, connect
from edgefleet.runtime.sqlite import to_completion


async def test_each_connection_runs_its_statements_in_order_and_results_come_back(tmp_path: Path) -> None:
    db = await connect(tmp_path / "a.db", isolation_level=None)
    try:
        await db.execute("CREATE TABLE t (n INTEGER)")
        # Handed over all at once, without awaiting in between: they must still run in order.
        inserts = [db.execute("INSERT INTO t VALUES (?)", (n,)) for n in range(200)]
        assert await asyncio.gather(*inserts) == [1] * 200
        assert [r[0] for r in await db.fetchall("SELECT n FROM t ORDER BY rowid")] == list(range(200))
        assert await db.fetchone("SELECT count(*) FROM t") == (200,)
    finally:
        await db.close()


async def test_an_error_reaches_the_caller_and_the_connection_goes_on(tmp_path: Path) -> None:
    db = await connect(tmp_path / "a.db")
    try:
        with pytest.raises(sqlite3.OperationalError, match="no such table"):
            await db.fetchall("SELECT * FROM missing")
        assert await db.fetchone("SELECT 41 + 1") == (42,)
    finally:
        await db.close()
    with pytest.raises(sqlite3.ProgrammingError, match="closed"):
        await db.fetchone("SELECT 1")


async def test_hundreds_of_connections_share_a_few_threads(tmp_path: Path) -> None:
    before = {t.name for t in threading.enumerate() if t.name.startswith("sqlite-")}
    dbs = await asyncio.gather(*(connect(tmp_path / f"{i}.db", isolation_level=None) for i in range(300)))
    try:
        await asyncio.gather(*(db.executescript("CREATE TABLE t (n); INSERT INTO t VALUES (1);") for db in dbs))
        counts = await asyncio.gather(*(db.fetchone("SELECT count(*) FROM t") for db in dbs))
        assert counts == [(1,)] * 300
    finally:
        await asyncio.gather(*(db.close() for db in dbs))
    pool = {t.name for t in threading.enumerate() if t.name.startswith("sqlite-")}
    assert len(pool) <= POOL_THREADS, pool
    assert len(pool - before) <= POOL_THREADS


async def test_a_statement_handed_over_runs_to_its_end_when_its_caller_is_cancelled(tmp_path: Path) -> None:
    """As with aiosqlite: edgefleet.runtime.sqlite.to_completion builds whole transactions on this."""
    db = await connect(tmp_path / "a.db", isolation_level=None)
    try:
        await db.execute("CREATE TABLE t (n INTEGER)")
        started = threading.Event()
        release = threading.Event()

        def slow_insert(conn: sqlite3.Connection) -> None:
            started.set()
            assert release.wait(5)
            conn.execute("INSERT INTO t VALUES (7)")

        caller = asyncio.ensure_future(db.run(slow_insert))
        assert await asyncio.to_thread(started.wait, 5)
        caller.cancel()
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await caller
        assert await db.fetchone("SELECT n FROM t") == (7,)  # queued after it, so it ran first
    finally:
        await db.close()


async def test_a_transaction_that_fails_after_its_caller_was_cancelled_is_not_reported_unretrieved(
        tmp_path: Path) -> None:
    """to_completion lets the cancellation through; the transaction's own failure, which came
    later, must not end up as asyncio's "Task exception was never retrieved" ERROR."""
    loop = asyncio.get_running_loop()
    reported: list[dict[str, object]] = []
    loop.set_exception_handler(lambda _loop, context: reported.append(context))
    db = await connect(tmp_path / "a.db", isolation_level=None)
    gate = threading.Event()
    try:
        def fails(connection: sqlite3.Connection) -> None:
            gate.wait(5)
            connection.execute("INSERT INTO missing VALUES (1)")

        caller = asyncio.create_task(to_completion(db.run(fails)))
        await asyncio.sleep(0)  # the transaction is handed over
        caller.cancel()
        gate.set()
        with pytest.raises(asyncio.CancelledError):
            await caller
    finally:
        await db.close()
    del caller
    gc.collect()
    await asyncio.sleep(0)
    assert [c["message"] for c in reported] == []


def test_results_for_a_closed_loop_do_not_take_a_pool_thread_down(tmp_path: Path) -> None:
    """A connection left open when its event loop ended (a test, a crash): what it still had
    queued finishes on a pool thread with nobody to deliver to. The pool must go on serving."""

    async def leave_one_busy(gate: threading.Event) -> None:
        db = await connect(tmp_path / "left.db")
        db.run(lambda conn: gate.wait(5))  # still running when the loop closes

    async def use_the_pool() -> list[tuple[int]]:
        dbs = await asyncio.gather(*(connect(tmp_path / f"{i}.db") for i in range(2 * POOL_THREADS)))
        try:
            return await asyncio.gather(*(db.fetchone("SELECT 1") for db in dbs))
        finally:
            await asyncio.gather(*(db.close() for db in dbs))

    for _ in range(POOL_THREADS + 1):  # more rounds than threads: a thread lost each time would show
        gate = threading.Event()
        asyncio.run(leave_one_busy(gate))
        gate.set()  # it finishes now; its loop is closed
        assert asyncio.run(asyncio.wait_for(use_the_pool(), 5)) == [(1,)] * (2 * POOL_THREADS)
