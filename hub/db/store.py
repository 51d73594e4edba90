"""The hub's SQLite database: device registry, certificates, presence.

One aiosqlite connection per process is the single writer; other processes (the operator
CLI beside a running hub) wait on SQLite's lock for up to BUSY_TIMEOUT_MS.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import os
import sqlite3
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, Final, TypeVar

import aiosqlite

from edgefleet.runtime.files import database_access_denied
from edgefleet.runtime.sqlite import to_completion
from edgefleet.wire.events import EventKind
from edgefleet.wire.protocol import Presence
from hub.db import enrollments, export, retention
from hub.db.cycle import HUB_EVENT_SQL, INGEST_MINUTES_KEPT, commit_cycle, event_args
from hub.db.dialect import Dialect
from hub.db.interface import StoreError, StoreUnavailable, Tx
from hub.db.rows import (
    SEQ_CONFLICT,
    DeviceRow,
    EventRow,
    IngestWork,
    Listings,
    TelemetryRow,
    device_row,
    event_row,
    iso,
    listing_sql,
    telemetry_row,
)

BUSY_TIMEOUT_MS: Final = 10_000  # the CLI and the running hub share the file

log = logging.getLogger(__name__)
T = TypeVar("T")

# Each entry migrates from version i to i+1; all of one open run in one transaction.
# Statements are split on ";", so a comment inside one must not contain a semicolon.
MIGRATIONS: Final[Sequence[str]] = (
    """
    CREATE TABLE devices (
        device TEXT PRIMARY KEY,
        profile TEXT NOT NULL,
        tags TEXT NOT NULL DEFAULT '{}',
        registered_at REAL NOT NULL,
        revoked_at REAL,
        online INTEGER NOT NULL DEFAULT 0,
        session TEXT,
        last_seen REAL,
        agent_version TEXT,
        policy_version INTEGER,
        backlog INTEGER,
        dropped INTEGER
    );
    CREATE TABLE certificates (
        serial TEXT PRIMARY KEY,          -- hex
        device TEXT NOT NULL,             -- the certificate's CN
        purpose TEXT NOT NULL,            -- device | kick | probe
        issued_at REAL NOT NULL,
        not_after REAL NOT NULL,
        revoked_at REAL
    );
    CREATE INDEX certificates_device ON certificates(device);
    """,
    """
    CREATE TABLE telemetry (
        device TEXT NOT NULL, seq INTEGER NOT NULL, ts REAL NOT NULL,
        metric TEXT NOT NULL, value REAL NOT NULL,
        PRIMARY KEY (device, seq)
    ) WITHOUT ROWID;
    CREATE TABLE events (
        device TEXT NOT NULL, seq INTEGER NOT NULL, ts REAL NOT NULL,
        kind TEXT NOT NULL, body TEXT NOT NULL,
        PRIMARY KEY (device, seq)
    ) WITHOUT ROWID;
    CREATE TABLE ingest (
        device TEXT PRIMARY KEY,
        acked_through INTEGER NOT NULL      -- every record <= this is committed here
    );
    CREATE TABLE drops (
        device TEXT NOT NULL, metric TEXT NOT NULL, count INTEGER NOT NULL,
        PRIMARY KEY (device, metric)
    ) WITHOUT ROWID;
    CREATE TABLE rejects (reason TEXT PRIMARY KEY, count INTEGER NOT NULL);
    """,
    """
    ALTER TABLE devices ADD COLUMN sensor_failures TEXT;   -- JSON object, as last reported
    ALTER TABLE devices ADD COLUMN corrupt_outboxes INTEGER;
    """,
    """
    ALTER TABLE devices ADD COLUMN policy_refused TEXT;   -- JSON PolicyRefusal, as last reported
    ALTER TABLE devices ADD COLUMN connected_at REAL;     -- when its current connection came online
    CREATE INDEX events_kind ON events(kind);
    CREATE TABLE policies (
        version INTEGER PRIMARY KEY,      -- only grows, and a rollback is a new version too
        text TEXT,                        -- NULL: withdraw hub policies (devices go back to local files)
        sha256 TEXT NOT NULL,
        created_at REAL NOT NULL,
        origin TEXT NOT NULL              -- the pushed file, or which rollout a rollback undid
    );
    CREATE TABLE rollouts (
        id INTEGER PRIMARY KEY,
        version INTEGER NOT NULL REFERENCES policies(version),
        selector TEXT NOT NULL,           -- JSON: the push's --target filters
        waves TEXT NOT NULL,              -- JSON: cumulative percentages, canary first, 100 last
        bake_s REAL NOT NULL,
        wave INTEGER NOT NULL,            -- index of the wave reached so far
        wave_started_at REAL NOT NULL,
        state TEXT NOT NULL,              -- baking | complete | rolled_back | aborted
        reason TEXT,                      -- why it was rolled back or aborted
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE TABLE rollout_members (
        rollout INTEGER NOT NULL REFERENCES rollouts(id),
        device TEXT NOT NULL,
        rank INTEGER NOT NULL,            -- place in the cohort order (a hash of the device id)
        wave INTEGER,                     -- the wave that reached it (NULL: not reached)
        previous INTEGER,                 -- its intended version before the rollout (NULL: none)
        online_when_reached INTEGER,      -- for the "devices going offline" gate
        reached_at REAL,                  -- when its wave reached it
        PRIMARY KEY (rollout, device)
    ) WITHOUT ROWID;
    CREATE TABLE assignments (
        device TEXT PRIMARY KEY,
        version INTEGER NOT NULL REFERENCES policies(version),   -- the intended version
        assigned_at REAL NOT NULL
    );
    """,
    """
    CREATE TABLE leases (
        name TEXT PRIMARY KEY,
        last_token INTEGER NOT NULL       -- the fencing token of the latest grant, only grows
    );
    CREATE TABLE lease_holders (
        device TEXT NOT NULL, request TEXT NOT NULL, name TEXT NOT NULL,
        token INTEGER NOT NULL, lim INTEGER NOT NULL, rule TEXT, policy_version INTEGER,
        granted_at REAL NOT NULL, expires_at REAL NOT NULL,
        PRIMARY KEY (device, request)
    );
    CREATE INDEX lease_holders_name ON lease_holders(name);
    CREATE TABLE lease_queue (
        qid INTEGER PRIMARY KEY,          -- first come, first served
        name TEXT NOT NULL, device TEXT NOT NULL, request TEXT NOT NULL,
        lim INTEGER NOT NULL, ttl_s REAL NOT NULL, rule TEXT, policy_version INTEGER,
        requested_at REAL NOT NULL,
        UNIQUE (device, request)
    );
    CREATE INDEX lease_queue_name ON lease_queue(name, qid);
    CREATE TABLE approvals (
        id INTEGER PRIMARY KEY,
        device TEXT NOT NULL, request TEXT NOT NULL,
        rule TEXT NOT NULL, action TEXT NOT NULL, args TEXT NOT NULL, policy_version INTEGER,
        requested_at REAL NOT NULL, expires_at REAL NOT NULL,
        state TEXT NOT NULL,              -- pending | approved | denied | expired
        decided_by TEXT, decided_at REAL, reason TEXT,
        sent INTEGER NOT NULL DEFAULT 0,  -- the decision was published to the device
        UNIQUE (device, request)
    );
    CREATE TABLE tasks (
        id INTEGER PRIMARY KEY,
        kind TEXT NOT NULL, args TEXT NOT NULL, target TEXT NOT NULL,
        deadline REAL, timeout_s REAL NOT NULL,
        state TEXT NOT NULL,              -- new | bidding | awarded | done | failed
        offered TEXT,                     -- JSON list of the devices it was offered to
        bid_by REAL, attempt INTEGER NOT NULL, awarded_to TEXT, award_expires REAL,
        result TEXT, reason TEXT,
        created_at REAL NOT NULL, updated_at REAL NOT NULL
    );
    CREATE TABLE bids (
        task INTEGER NOT NULL, device TEXT NOT NULL,
        able INTEGER NOT NULL, score REAL NOT NULL, detail TEXT, at REAL NOT NULL,
        outcome TEXT,                     -- awarded | succeeded | failed | refused | timeout
        result TEXT,
        PRIMARY KEY (task, device)
    ) WITHOUT ROWID;
    """,
    """
    CREATE TABLE ingest_ranges (           -- batches stored beyond a gap in a device's coverage
        device TEXT NOT NULL, base INTEGER NOT NULL, last INTEGER NOT NULL,
        PRIMARY KEY (device, base, last)
    ) WITHOUT ROWID;
    CREATE TABLE ingest_minutes (          -- what each hub process committed, per minute of the hub clock
        minute INTEGER NOT NULL,           -- epoch seconds // 60
        hub TEXT NOT NULL,                 -- the process: hub.REGION, or a replica's hub.REGION.NAME
        records INTEGER NOT NULL, messages INTEGER NOT NULL,
        PRIMARY KEY (minute, hub)
    ) WITHOUT ROWID;
    CREATE TABLE leadership (              -- which replica runs the region-wide loops (hub/leadership.py)
        role TEXT PRIMARY KEY,
        holder TEXT NOT NULL, since REAL NOT NULL, expires_at REAL NOT NULL
    ) WITHOUT ROWID;
    """,
    """
    ALTER TABLE certificates ADD COLUMN key_id TEXT;   -- in-band renewals: protocol.key_id of the public key
    ALTER TABLE certificates ADD COLUMN pem TEXT;      -- ... and the certificate sent, to answer a repeat alike
    CREATE INDEX certificates_key ON certificates(device, key_id);
    """,
    """
    ALTER TABLE telemetry ADD COLUMN clock_unknown INTEGER NOT NULL DEFAULT 0;  -- 1: a device clock never set
    """,
    """
    CREATE TABLE ingest_instances (        -- each outbox that numbered a device's records (hub/identities.py)
        device TEXT NOT NULL,
        instance INTEGER NOT NULL,         -- the outbox's random id (protocol.Batch.instance)
        stream TEXT NOT NULL,              -- its key in ingest and ingest_ranges: the device id, or DEVICE/INSTANCE
        floor INTEGER NOT NULL,            -- its own records are numbered above this
        keep INTEGER NOT NULL,             -- records <= this keep the numbers an earlier instance gave them
        top INTEGER NOT NULL,              -- the highest seq it sent
        conflicts INTEGER NOT NULL,        -- times it was found numbering records another machine numbers
        conflict_at REAL,                  -- the latest of them
        machine INTEGER NOT NULL,          -- the number of the board it runs on (protocol.Batch.machine, 0 unknown)
        first_seen REAL NOT NULL, last_seen REAL NOT NULL,
        PRIMARY KEY (device, instance)
    ) WITHOUT ROWID;
    """,
    """
    CREATE INDEX telemetry_ts ON telemetry(ts);   -- range reads, exports and retention (hub/db/retention.py)
    CREATE INDEX events_ts ON events(ts);
    CREATE TABLE retention (               -- rows retention removed so far, per table (a metric)
        tbl TEXT PRIMARY KEY, removed INTEGER NOT NULL
    ) WITHOUT ROWID;
    """,
    enrollments.SCHEMA,  # zero-touch enrollment (hub/db/enrollments.py)
)
SCHEMA_VERSION: Final = len(MIGRATIONS)


__all__ = ["INGEST_MINUTES_KEPT", "SEQ_CONFLICT", "DeviceRow", "EventRow", "HubStore", "IngestWork", "StoreError",
           "TelemetryRow", "event_row", "fetch_all", "fetch_one", "iso", "telemetry_row"]


class SqliteTx:
    """A `hub.db.interface.Tx` over the store's connection, inside one of its transactions."""

    dialect: Dialect = "sqlite"

    def __init__(self, db: aiosqlite.Connection) -> None:
        self.db = db

    async def fetch(self, sql: str, args: Sequence[Any] = ()) -> list[Any]:
        return await fetch_all(self.db, sql, args)

    async def fetch_one(self, sql: str, args: Sequence[Any] = ()) -> Any:
        return await fetch_one(self.db, sql, args)

    async def execute(self, sql: str, args: Sequence[Any] = ()) -> int:
        async with self.db.execute(sql, args) as cur:
            return cur.rowcount

    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        await self.db.executemany(sql, rows)

    async def lock(self, key: str) -> None:
        del key  # BEGIN IMMEDIATE: one writer at a time already


class HubStore(Listings):
    """The SQLite store. Start with `await HubStore.open(path)`, stop with `await store.close()`."""

    dialect: Dialect = "sqlite"

    def __init__(self, db: aiosqlite.Connection) -> None:
        self._db = db
        # One connection, several tasks (ingest, rollouts): a write from one must never land
        # inside another's open transaction, or commit it halfway.
        self._write_lock = asyncio.Lock()

    @classmethod
    async def open(cls, path: Path) -> HubStore:
        existed = path.exists()
        if existed:  # a file this account may not write: a PermissionError naming it, before aiosqlite's
            os.close(os.open(path, os.O_RDWR))  # thread starts (it outlives a failed connect)
        db = await aiosqlite.connect(path, timeout=BUSY_TIMEOUT_MS / 1000)
        try:
            if not existed:
                path.chmod(0o600)
            db.row_factory = aiosqlite.Row
            await db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            # Read-only checks first: a file we refuse must leave here unchanged.
            await cls._check_integrity(db, path)
            version = await cls._schema_version(db, path)
            await db.execute("PRAGMA journal_mode = WAL")
            await db.execute("PRAGMA synchronous = NORMAL")
            await db.execute("PRAGMA foreign_keys = ON")
            await cls._migrate(db, path, version)
        except BaseException:
            await db.close()
            raise
        return cls(db)

    @staticmethod
    async def _check_integrity(db: aiosqlite.Connection, path: Path) -> None:
        advice = "restore it from a backup (see docs/operations.md); the file was left as it is"
        try:
            async with db.execute("PRAGMA quick_check") as cur:
                row = await cur.fetchone()
        except sqlite3.DatabaseError as exc:
            if isinstance(exc, sqlite3.OperationalError) and database_access_denied(exc):
                raise  # a file this account may not use, not a broken one: the CLI says whose it is
            raise StoreError(f"{path} is not a readable hub database ({exc}): {advice}") from None
        if row is None or row[0] != "ok":
            raise StoreError(f"{path} failed its integrity check ({row[0] if row else 'no answer'}): {advice}")

    @staticmethod
    async def _schema_version(db: aiosqlite.Connection, path: Path) -> int:
        async with db.execute("PRAGMA user_version") as cur:
            row = await cur.fetchone()
        version = int(row[0]) if row else 0
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{path} has schema {version}, newer than this edge-hub ({SCHEMA_VERSION}): upgrade edge-hub"
            )
        return version

    @staticmethod
    async def _migrate(db: aiosqlite.Connection, path: Path, version: int) -> None:
        if version == SCHEMA_VERSION:
            return
        await db.execute("BEGIN IMMEDIATE")
        try:
            for step in MIGRATIONS[version:]:
                for statement in filter(str.strip, step.split(";")):
                    await db.execute(statement)
            await db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            await db.commit()
        except BaseException:
            await db.rollback()
            raise
        log.info("hub database %s migrated from schema %d to %d", path, version, SCHEMA_VERSION)

    async def close(self) -> None:
        await self._db.close()

    async def atomically(self, work: Callable[[Tx], Awaitable[T]]) -> T:
        """Run `work` in one IMMEDIATE transaction that cancellation cannot split; commit if it returns."""
        async with self._write_lock:
            return await to_completion(self._transaction(work))

    async def _transaction(self, work: Callable[[Tx], Awaitable[T]]) -> T:
        db = self._db
        try:
            await db.execute("BEGIN IMMEDIATE")
            result = await work(SqliteTx(db))
            await db.commit()
        except BaseException:
            if db.in_transaction:
                await db.rollback()
            raise
        return result

    async def query(self, sql: str, args: Sequence[Any] = ()) -> list[Any]:
        async with self._db.execute(sql, args) as cur:
            return list(await cur.fetchall())

    # --- registry -------------------------------------------------------------------

    async def register(self, device: str, profile: str, tags: dict[str, str], *, readmit: bool = False) -> None:
        await register_device(SqliteTx(self._db), device, profile, tags, readmit=readmit)
        await self._db.commit()

    async def record_certificate(self, serial: int, device: str, purpose: str, not_after: dt.datetime) -> None:
        await self._db.execute(
            "INSERT OR IGNORE INTO certificates(serial, device, purpose, issued_at, not_after) "
            "VALUES (?, ?, ?, ?, ?)",
            (format(serial, "x"), device, purpose, time.time(), not_after.timestamp()),
        )
        await self._db.commit()

    async def certificate_revoked(self, serial: int) -> bool:
        async with self._db.execute(
            "SELECT revoked_at FROM certificates WHERE serial = ?", (format(serial, "x"),)
        ) as cur:
            row = await cur.fetchone()
        return row is not None and row[0] is not None

    async def vouches_for(self, serial: int, device: str) -> bool | None:
        """Whether the hub recorded `serial` as an unrevoked certificate of `device`: None when it
        never recorded it at all (a certificate it cannot lock out)."""
        async with self._db.execute(
            "SELECT device, purpose, revoked_at FROM certificates WHERE serial = ?", (format(serial, "x"),)
        ) as cur:
            row = await cur.fetchone()
        if row is None:
            return None
        return row[0] == device and row[1] == "device" and row[2] is None

    async def is_revoked(self, device: str) -> bool:
        async with self._db.execute("SELECT revoked_at FROM devices WHERE device = ?", (device,)) as cur:
            row = await cur.fetchone()
        return row is not None and row[0] is not None

    async def exists(self, device: str) -> bool:
        async with self._db.execute("SELECT 1 FROM devices WHERE device = ?", (device,)) as cur:
            return await cur.fetchone() is not None

    async def revoke_device(self, device: str) -> int:
        """Mark the device and all its certificates revoked; return how many certificates."""
        now = time.time()
        await self._db.execute("BEGIN IMMEDIATE")
        try:
            await self._db.execute(
                "UPDATE devices SET revoked_at = COALESCE(revoked_at, ?) WHERE device = ?", (now, device)
            )
            cur = await self._db.execute(
                "UPDATE certificates SET revoked_at = ? WHERE device = ? AND revoked_at IS NULL "
                "AND purpose = 'device'",
                (now, device),
            )
            await self._db.commit()
        except BaseException:
            await self._db.rollback()
            raise
        return cur.rowcount

    async def revoke_serial(self, serial: int) -> None:
        await self._db.execute(
            "UPDATE certificates SET revoked_at = COALESCE(revoked_at, ?) WHERE serial = ?",
            (time.time(), format(serial, "x")),
        )
        await self._db.commit()

    async def revoked_serials(self) -> list[tuple[int, dt.datetime]]:
        """Revoked certificates that have not expired yet (an expired one is refused anyway)."""
        async with self._db.execute(
            "SELECT serial, revoked_at FROM certificates WHERE revoked_at IS NOT NULL "
            "AND not_after > ? ORDER BY revoked_at",
            (time.time(),),
        ) as cur:
            rows = await cur.fetchall()
        return [(int(r[0], 16), dt.datetime.fromtimestamp(r[1], dt.UTC)) for r in rows]

    # --- presence -------------------------------------------------------------------

    async def apply_presence(self, device: str, presence: Presence, now: float) -> bool:
        """Record a presence message; return False if it was stale or for an unknown device."""
        return bool(await self.apply_presences([(device, presence)], now))

    async def apply_presences(self, messages: Sequence[tuple[str, Presence]], now: float) -> list[int]:
        """Record presence messages in order, in one transaction; return the indexes of those that changed
        something (not stale, not for an unknown device)."""
        async def work(db: Tx) -> list[int]:
            return [i for i, (device, presence) in enumerate(messages)
                    if await self._presence(db, device, presence, now)]
        return await self.atomically(work)

    @staticmethod
    async def _presence(db: Tx, device: str, presence: Presence, now: float) -> bool:
        row = await db.fetch_one("SELECT session, online FROM devices WHERE device = ?", (device,))
        if row is None:
            return False
        if presence.state == "online":
            await db.execute(
                "UPDATE devices SET online = 1, session = ?, last_seen = ?, connected_at = ?, agent_version = ? "
                "WHERE device = ?",
                (presence.session, now, now, presence.agent_version, device),
            )
        elif row["session"] in (None, presence.session):
            await db.execute("UPDATE devices SET online = 0, last_seen = ? WHERE device = ?", (now, device))
        else:
            return False  # the Last Will of a connection that a newer one replaced
        return True

    # --- ingest ---------------------------------------------------------------------

    async def watermarks(self) -> dict[str, int]:
        return {d: int(w) async for d, w in self._rows("SELECT device, acked_through FROM ingest")}

    async def registered(self) -> set[str]:
        return {d async for (d,) in self._rows("SELECT device FROM devices WHERE revoked_at IS NULL")}

    async def commit_ingest(self, work: IngestWork) -> dict[str, int]:
        """Everything one ingest cycle learned, in one transaction that cancellation cannot split.

        Returns the watermark of every device that sent a batch: what to acknowledge to it.
        """
        async with self._write_lock:
            return await to_completion(self._commit_ingest(work))

    async def _commit_ingest(self, work: IngestWork) -> dict[str, int]:
        db = self._db
        try:
            await db.execute("BEGIN IMMEDIATE")  # one writer at a time: replicas' commits never interleave
            tx = SqliteTx(db)
            marks = await commit_cycle(tx, work, lambda kind, body: self.hub_event(
                tx, work.hub or "hub", kind, body), self._write_rows)
            await db.commit()
        except BaseException:
            if db.in_transaction:
                await db.rollback()
            raise
        return marks

    @staticmethod
    async def _write_rows(tx: Tx, work: IngestWork) -> None:
        if work.telemetry:
            await tx.executemany(
                "INSERT OR IGNORE INTO telemetry(device, seq, ts, metric, value) VALUES (?, ?, ?, ?, ?)",
                work.telemetry)
        if work.events:
            await tx.executemany(
                "INSERT OR IGNORE INTO events(device, seq, ts, kind, body) VALUES (?, ?, ?, ?, ?)", work.events)

    async def _listing(self, columns: str, table: str, filters: tuple[tuple[str, object], ...],
                       limit: int | None, make: Callable[..., T]) -> AsyncGenerator[T, None]:
        """Rows of a per-device table, filtered, by device and seq, streamed in chunks, each as
        `make(*columns)`. One generator: closing it (contextlib.aclosing) closes the cursor."""
        query, args = listing_sql(columns, table, filters, limit)
        async with self._db.execute(query, args) as cur:
            while rows := await cur.fetchmany(10_000):
                for row in rows:
                    yield make(*row)

    async def read_telemetry(self, since: float, until: float, device: str | None = None,
                             metric: str | None = None) -> AsyncGenerator[TelemetryRow, None]:
        """Readings with since <= ts < until in time order, streamed (hub/db/export.py)."""
        async with contextlib.aclosing(export.read_telemetry(self._db, since, until, device, metric)) as rows:
            async for row in rows:
                yield telemetry_row(*row)

    async def prune_telemetry(self, before: float, batch: int) -> int:
        """Remove at most `batch` readings stamped before `before` (hub/db/retention.py); how many went."""
        return await self.atomically(lambda db: retention.prune(db, "telemetry", before, batch))

    async def prune_events(self, before: float, batch: int) -> int:
        """Remove at most `batch` events stamped before `before` (hub/db/retention.py); how many went."""
        return await self.atomically(lambda db: retention.prune(db, "events", before, batch))

    async def known_device(self, device: str) -> bool:
        """Registered, or with readings or events stored under its name (the hub's own events)."""
        rows = await self.query(
            "SELECT EXISTS (SELECT 1 FROM devices WHERE device = ?) OR EXISTS (SELECT 1 FROM events WHERE "
            "device = ?) OR EXISTS (SELECT 1 FROM telemetry WHERE device = ?)", (device, device, device))
        return bool(rows[0][0])

    async def reject_counts(self) -> dict[str, int]:
        return {r: int(c) async for r, c in self._rows("SELECT reason, count FROM rejects")}

    async def _rows(self, query: str, args: tuple[Any, ...] = ()) -> AsyncIterator[Any]:
        async with self._db.execute(query, args) as cur:
            for row in await cur.fetchall():
                yield tuple(row)

    async def devices(self, device: str | None = None, *, drift_grace_s: float = 120.0,
                      now: float | None = None) -> list[DeviceRow]:
        now = time.time() if now is None else now
        query = (
            "SELECT d.*, (SELECT MAX(not_after) FROM certificates c WHERE c.device = d.device "
            "AND c.purpose = 'device' AND c.revoked_at IS NULL) AS cert_expires, "
            "a.version AS intended, a.assigned_at FROM devices d LEFT JOIN assignments a USING (device)"
        )
        args: tuple[Any, ...] = ()
        if device is not None:
            query += " WHERE d.device = ?"
            args = (device,)
        async with self._db.execute(query + " ORDER BY d.device", args) as cur:
            rows = await cur.fetchall()
        return [device_row(r, now, drift_grace_s) for r in rows]

    # --- leadership among replicas (hub/region/leadership.py) ---------------------------

    async def claim_leadership(self, role: str, holder: str, ttl_s: float, now: float) -> tuple[str, float]:
        """Take or keep the `role` row for `holder` unless another holds it unexpired (the hub's clock:
        replicas of one SQLite file share a machine); the holder and expiry after the attempt."""
        async def work(db: Tx) -> tuple[str, float]:
            await db.execute(
                "INSERT INTO leadership(role, holder, since, expires_at) VALUES (?, ?, ?, ?) ON CONFLICT(role) "
                "DO UPDATE SET holder = excluded.holder, expires_at = excluded.expires_at, "
                "since = CASE WHEN holder = excluded.holder THEN since ELSE excluded.since END "
                "WHERE holder = excluded.holder OR expires_at < excluded.since",
                (role, holder, now, now + ttl_s))
            current, expires_at = await db.fetch_one("SELECT holder, expires_at FROM leadership WHERE role = ?",
                                                     (role,))
            return str(current), float(expires_at)
        try:
            return await self.atomically(work)
        except sqlite3.OperationalError as exc:  # busy past its timeout
            raise StoreUnavailable(str(exc)) from exc

    async def release_leadership(self, role: str, holder: str, now: float) -> None:
        """Expire `holder`'s row now (kept: `edge-hub status` tells who led last and when it stopped)."""
        async def work(db: Tx) -> None:
            await db.execute("UPDATE leadership SET expires_at = ? WHERE role = ? AND holder = ?", (now, role, holder))
        try:
            await self.atomically(work)
        except sqlite3.Error as exc:
            raise StoreUnavailable(str(exc)) from exc

    async def hub_event(self, db: Tx, identity: str, kind: EventKind, body: dict[str, Any],
                        ts: float | None = None) -> None:
        """An event of the hub itself (rollouts), in the events table under the hub's identity;
        call inside `atomically`."""
        await db.execute(HUB_EVENT_SQL, event_args(identity, kind, body, time.time() if ts is None else ts))


async def register_device(db: Tx, device: str, profile: str, tags: dict[str, str], *,
                          readmit: bool = False) -> None:
    """Add `device` to the registry, or give it this profile and these tags (provisioning and
    enrollment alike); `readmit` lifts a revocation. Commits nothing: the caller does."""
    await db.execute(
        "INSERT INTO devices(device, profile, tags, registered_at) VALUES (?, ?, ?, ?) "
        "ON CONFLICT(device) DO UPDATE SET profile = excluded.profile, tags = excluded.tags, "
        "revoked_at = CASE WHEN CAST(? AS BOOLEAN) THEN NULL ELSE devices.revoked_at END",
        (device, profile, json.dumps(tags, sort_keys=True), time.time(), readmit),
    )


async def fetch_one(db: aiosqlite.Connection, sql: str, args: Sequence[Any] = ()) -> Any:
    """One row (or None) inside a transaction of `HubStore.atomically`."""
    async with db.execute(sql, args) as cur:
        return await cur.fetchone()


async def fetch_all(db: aiosqlite.Connection, sql: str, args: Sequence[Any] = ()) -> list[Any]:
    async with db.execute(sql, args) as cur:
        return list(await cur.fetchall())
