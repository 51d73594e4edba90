"""The exactly-once check every store-and-forward test ends with, read from the real files."""

from __future__ import annotations

import asyncio
import concurrent.futures
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hub.config import load_hub

# `--set`s for the settling run that ends a store-and-forward test: the sim sensor reads once
# at start (one signal, so one reading), and its next read is a day later. Lowering
# sim.rate_hz instead is not enough: at 0.001 Hz a new tick falls on every 1,000 s boundary
# of the wall clock, and one that falls between "drained" and the stop stays in the outbox.
QUIET = ('sensors=[{kind = "sim", interval_s = 86400.0}]', "sim.signals=1")

@dataclass(frozen=True)
class OutboxState:
    last_seq: int
    acked: int
    dropped: int
    rows: int


def outbox_state(bundle: Path) -> OutboxState:
    """The agent's outbox as committed on disk (read-only; fine while the agent runs)."""
    db = sqlite3.connect(f"file:{bundle / 'state' / 'outbox.db'}?mode=ro", uri=True, timeout=10)
    try:
        meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
        rows = db.execute("SELECT count(*) FROM records").fetchone()[0]
    finally:
        db.close()
    return OutboxState(meta.get("last_seq", 0), meta.get("acked", 0), meta.get("dropped", 0), rows)


def hub_rows(hub_dir: Path, sql: str, args: tuple[object, ...] = ()) -> list[tuple[Any, ...]]:
    """Rows of one read of the hub's database, wherever hub.toml keeps it: hub.db, or PostgreSQL
    (`?` placeholders either way; read in a thread of its own, callable from inside an event loop)."""
    url = load_hub(hub_dir)[1].database.url
    if not url:
        db = sqlite3.connect(f"file:{hub_dir / 'hub.db'}?mode=ro", uri=True, timeout=10)
        try:
            return [tuple(r) for r in db.execute(sql, args).fetchall()]
        finally:
            db.close()

    async def read() -> list[tuple[Any, ...]]:
        import asyncpg  # only for hubs on PostgreSQL

        from hub.db.postgres import PostgresTx
        conn = await asyncpg.connect(url, timeout=10)
        try:
            return [tuple(r) for r in await conn.fetch(PostgresTx.sql(sql), *args)]
        finally:
            await conn.close()

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, read()).result(timeout=30)


def hub_seqs(hub_dir: Path, device: str) -> list[int]:
    """Every sequence number the hub committed for the device, readings and events, sorted."""
    rows = hub_rows(hub_dir, "SELECT seq FROM telemetry WHERE device = ? UNION ALL "
                             "SELECT seq FROM events WHERE device = ?", (device, device))
    return sorted(int(r[0]) for r in rows)


def hub_watermark(hub_dir: Path, device: str) -> int:
    rows = hub_rows(hub_dir, "SELECT acked_through FROM ingest WHERE device = ?", (device,))
    return int(rows[0][0]) if rows else 0


async def wait_drained(hub_dir: Path, bundle: Path, timeout: float = 60.0) -> OutboxState:
    """Wait until the agent's outbox is fully acknowledged (its agent must be running).

    Polls the two databases (no process announces "drained"), bounded by `timeout`.
    """
    deadline = time.monotonic() + timeout
    while True:
        state = outbox_state(bundle)
        if state.last_seq and state.acked >= state.last_seq and hub_watermark(hub_dir, bundle.name) >= state.last_seq:
            return state
        if time.monotonic() > deadline:
            raise AssertionError(f"not drained within {timeout} s: outbox {state}, hub watermark "
                                 f"{hub_watermark(hub_dir, bundle.name)}")
        await asyncio.sleep(0.2)


def assert_exactly_once(hub_dir: Path, device: str, last_seq: int, dropped: int) -> None:
    """The hub holds every seq 1..last_seq exactly once, except exactly `dropped` of them."""
    seqs = hub_seqs(hub_dir, device)
    duplicates = len(seqs) - len(set(seqs))
    assert duplicates == 0, f"{duplicates} duplicated sequence numbers at the hub"
    assert not seqs or seqs[-1] <= last_seq, f"hub has seq {seqs[-1]} beyond the agent's last {last_seq}"
    missing = last_seq - len(seqs)
    assert missing == dropped, (
        f"hub holds {len(seqs)} of 1..{last_seq}: {missing} missing but the agent counted {dropped} shed"
    )


@dataclass(frozen=True)
class Accounting:
    taken: int  # sequence numbers the device assigned
    at_hub: int
    waiting: int  # still in the outbox, not yet at the hub (not lost: they will be sent)
    shed: int
    lost: int
    duplicated: int


def account(hub_dir: Path, bundle: Path) -> Accounting:
    """Where every reading of a device is, for a device whose outbox may not be drained."""
    state = outbox_state(bundle)
    db = sqlite3.connect(f"file:{bundle / 'state' / 'outbox.db'}?mode=ro", uri=True, timeout=10)
    try:
        pending = {r[0] for r in db.execute("SELECT seq FROM records")}
    finally:
        db.close()
    seqs = hub_seqs(hub_dir, bundle.name)
    at_hub = set(seqs)
    waiting = len(pending - at_hub)
    lost = state.last_seq - len(at_hub) - waiting - state.dropped
    return Accounting(state.last_seq, len(at_hub), waiting, state.dropped, lost, len(seqs) - len(at_hub))
