"""What the outbox and the hub database share: transactions that cancellation cannot split."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

T = TypeVar("T")


async def to_completion(work: Coroutine[Any, Any, T]) -> T:
    """Run a database transaction to its end (committed or rolled back) even if our caller
    is cancelled meanwhile; then let the cancellation through.

    Statements run on another thread (aiosqlite's for the hub, edge_agent.buffer.sqlite_pool's for the
    outbox): cancelling the awaiting task does not stop a BEGIN or COMMIT already handed over,
    so cancelling mid-transaction would leave the connection inside a transaction, or believe a
    committed one failed.
    """
    task = asyncio.ensure_future(work)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        await asyncio.wait([task])
        if not task.cancelled():
            task.exception()  # a failed transaction is the cancelled caller's no more: not "never retrieved"
        raise


@contextlib.contextmanager
def immediate(db: sqlite3.Connection) -> Iterator[None]:
    """One write transaction on a connection in autocommit mode (isolation_level None), on its
    thread: committed if the block ends, rolled back if anything (COMMIT included) raises."""
    try:
        db.execute("BEGIN IMMEDIATE")
        yield
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
