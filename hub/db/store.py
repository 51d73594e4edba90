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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TypeVar

import aiosqlite
import msgspec

from edgefleet.runtime.files import database_access_denied
from edgefleet.runtime.sqlite import to_completion
from edgefleet.wire.events import EventKind
from edgefleet.wire.protocol import Batch, Presence, Renumber, Status, json_body
from hub.db import enrollments, export, retention
from hub.db.device_clocks import apply_clock_events
from hub.db.identities import resolve_claims
from hub.db.watermarks import Coverage
from hub.errors import HubError

BUSY_TIMEOUT_MS: Final = 10_000  # the CLI and the running hub share the file
INGEST_MINUTES_KEPT: Final = 24 * 60  # the per-minute ingest counts behind the status's ingest rate

log = logging.getLogger(__name__)
SEQ_CONFLICT: Final = "seq_conflict"  # reject reason: a record reusing a seq its device already used for the other kind
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


class StoreError(HubError):
    pass


class DeviceRow(msgspec.Struct, frozen=True):
    """One line of `edge-hub devices --json`; the field names are a documented contract."""

    device: str
    profile: str
    tags: dict[str, str]
    online: bool
    last_seen: str | None
    policy_version: int | None
    policy_intended: int | None
    policy_drifted: bool  # online, off the intended version for longer than the grace period
    policy_refused: dict[str, Any] | None  # the latest refusal, as the device reported it
    backlog: int | None
    dropped: int | None
    cert_expires: str | None
    revoked: bool
    agent_version: str | None
    sensor_failures: dict[str, int] | None
    corrupt_outboxes: int | None


class TelemetryRow(msgspec.Struct, frozen=True):
    """One line of `edge-hub telemetry --json` (a documented contract); ts in epoch seconds."""

    device: str
    seq: int
    ts: float
    metric: str
    value: float
    clock_unknown: bool = False  # stamped by a device clock that was never set (docs/store-and-forward.md)


def telemetry_row(device: str, seq: int, ts: float, metric: str, value: float, clock_unknown: int) -> TelemetryRow:
    return TelemetryRow(device, seq, ts, metric, value, bool(clock_unknown))


class EventRow(msgspec.Struct, frozen=True):
    """One line of `edge-hub events --json` (a documented contract); ts in epoch seconds.

    `policy_version` and `rule` are lifted out of the event's JSON body (null when absent);
    `body` holds the rest of it.
    """

    device: str
    seq: int
    ts: float
    kind: str
    policy_version: int | None
    rule: str | None
    body: dict[str, Any]


def event_row(device: str, seq: int, ts: float, kind: str, text: str) -> EventRow:
    """An events-table row as an EventRow, whatever its body holds (protocol.json_body)."""
    body = json_body(text)
    version = body.pop("policy_version", None)
    rule = body.pop("rule", None)
    return EventRow(
        device, seq, ts, kind,
        policy_version=version if isinstance(version, int) and not isinstance(version, bool) else None,
        rule=rule if isinstance(rule, str) else None,
        body=body,
    )


@dataclass
class IngestWork:
    """Rows and state from one ingest cycle, committed together."""

    now: float
    telemetry: list[tuple[str, int, float, str, float]] = field(default_factory=list)
    events: list[tuple[str, int, float, str, str]] = field(default_factory=list)
    ranges: dict[str, list[tuple[int, int, bool]]] = field(default_factory=dict)  # (base, last, settled)
    statuses: dict[str, Status] = field(default_factory=dict)
    rejects: dict[str, int] = field(default_factory=dict)
    messages: int = 0  # the MQTT messages they came in
    hub: str = ""  # the hub process that took them in (replicas share the ingest)
    # Filled by the commit: (device, seq, kind) of records not stored because the device's seq is
    # already a record of the other kind (a reading vs an event); counted as SEQ_CONFLICT rejects.
    conflicts: list[tuple[str, int, str]] = field(default_factory=list)
    claims: list[tuple[str, Batch]] = field(default_factory=list)  # batches with an outbox instance id
    # Set by the commit (hub/db/identities.py): each instance's ack, and the batches refused for numbers
    # another machine with the same certificate uses.
    instance_acks: dict[tuple[str, int], int] = field(default_factory=dict)
    renumber: dict[tuple[str, int], Renumber] = field(default_factory=dict)

    def add_rows(self, device: str, batch: Batch) -> None:
        """A batch's readings and events, to be stored."""
        names = batch.names
        self.telemetry.extend((device, s, t, names[m], v) for s, t, m, v in zip(
            batch.seq, batch.ts, batch.metric, batch.value, strict=True))
        self.events.extend((device, e.seq, e.ts, e.kind, e.body) for e in batch.events)


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="seconds")


class HubStore:
    """Start with `await HubStore.open(path)`, stop with `await store.close()`."""

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

    async def atomically(self, work: Callable[[aiosqlite.Connection], Awaitable[T]]) -> T:
        """Run `work` in one IMMEDIATE transaction that cancellation cannot split; commit if it returns."""
        async with self._write_lock:
            return await to_completion(self._transaction(work))

    async def _transaction(self, work: Callable[[aiosqlite.Connection], Awaitable[T]]) -> T:
        db = self._db
        try:
            await db.execute("BEGIN IMMEDIATE")
            result = await work(db)
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
        await register_device(self._db, device, profile, tags, readmit=readmit)
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
        async def work(db: aiosqlite.Connection) -> list[int]:
            return [i for i, (device, presence) in enumerate(messages)
                    if await self._presence(db, device, presence, now)]
        return await self.atomically(work)

    @staticmethod
    async def _presence(db: aiosqlite.Connection, device: str, presence: Presence, now: float) -> bool:
        row = await fetch_one(db, "SELECT session, online FROM devices WHERE device = ?", (device,))
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
            await db.execute("BEGIN IMMEDIATE")
            legacy = set(work.ranges)  # devices whose agents send no outbox instance id
            placed = await resolve_claims(db, work, lambda db, kind, body: self.hub_event(
                db, work.hub or "hub", kind, body)) if work.claims else {}
            await self._drop_seq_conflicts(db, work)
            # Resent records the watermark covers are not stored again, also where retention removed them.
            floors = await retention.dedup_floors(db, (stream.split("/", 1)[0] for stream in work.ranges))
            work.telemetry = retention.above_floor(work.telemetry, floors)
            work.events = retention.above_floor(work.events, floors)
            if work.telemetry:
                await db.executemany(
                    "INSERT OR IGNORE INTO telemetry(device, seq, ts, metric, value) VALUES (?, ?, ?, ?, ?)",
                    work.telemetry,
                )
            if work.events:
                await db.executemany(
                    "INSERT OR IGNORE INTO events(device, seq, ts, kind, body) VALUES (?, ?, ?, ?, ?)", work.events
                )
            marks = await self._advance_watermarks(db, work.ranges) if work.ranges else {}
            work.instance_acks = {key: min(marks[stream], ceiling) for key, (stream, ceiling) in placed.items()}
            marks = {stream: mark for stream, mark in marks.items() if stream in legacy}
            if work.messages:
                minute = int(work.now // 60)
                await db.execute(
                    "INSERT INTO ingest_minutes(minute, hub, records, messages) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT(minute, hub) DO UPDATE "
                    "SET records = records + excluded.records, messages = messages + excluded.messages",
                    (minute, work.hub, len(work.telemetry) + len(work.events), work.messages))
                await db.execute("DELETE FROM ingest_minutes WHERE minute < ?", (minute - INGEST_MINUTES_KEPT,))
            for device, status in work.statuses.items():
                await db.execute(
                    "UPDATE devices SET backlog = ?, dropped = ?, last_seen = ?, sensor_failures = ?, "
                    "corrupt_outboxes = ?, policy_version = ?, policy_refused = ? WHERE device = ?",
                    (status.backlog, status.dropped, work.now, json.dumps(status.sensor_failures),
                     status.corrupt_outboxes, status.policy_version or None,
                     msgspec.json.encode(status.policy_refused).decode() if status.policy_refused else None,
                     device),
                )
                await db.executemany(
                    "INSERT INTO drops(device, metric, count) VALUES (?, ?, ?) ON CONFLICT(device, metric) "
                    "DO UPDATE SET count = excluded.count",
                    [(device, m, c) for m, c in status.dropped_by_metric.items()],
                )
            if work.rejects:
                await db.executemany(
                    "INSERT INTO rejects(reason, count) VALUES (?, ?) ON CONFLICT(reason) "
                    "DO UPDATE SET count = count + excluded.count",
                    work.rejects.items(),
                )
            await db.commit()
        except BaseException:
            if db.in_transaction:
                await db.rollback()
            raise
        return marks

    @staticmethod
    async def _drop_seq_conflicts(db: aiosqlite.Connection, work: IngestWork) -> None:
        """Keep (device, seq) one record across both tables: a reading whose seq is an event, stored or
        in this cycle, or an event whose seq is a stored reading, is dropped and counted.

        The first record of a seq stays, as with a repeated seq of the same kind; the batch still
        covers the seq for the watermark (a record of it is committed here)."""
        readings: dict[str, set[int]] = {}
        for device, seq, *_ in work.telemetry:
            readings.setdefault(device, set()).add(seq)
        events = {(device, seq) for device, seq, *_ in work.events}
        spans = json.dumps([[d, min(seqs), max(seqs)] for d, seqs in readings.items()])
        taken = {(d, s, "reading") for d, s in await fetch_all(  # events are sparse: all in the readings' span
            db, "SELECT e.device, e.seq FROM json_each(?) j JOIN events e ON e.device = json_extract(j.value, '$[0]') "
                "AND e.seq BETWEEN json_extract(j.value, '$[1]') AND json_extract(j.value, '$[2]')", (spans,))
            if s in readings[d]}
        taken |= {(d, s, "event") for d, s in await fetch_all(
            db, "SELECT t.device, t.seq FROM json_each(?) j JOIN telemetry t "
                "ON t.device = json_extract(j.value, '$[0]') AND t.seq = json_extract(j.value, '$[1]')",
            (json.dumps(sorted(events)),))}
        kept = {(d, s) for d, seqs in readings.items() for s in seqs} - {(d, s) for d, s, _ in taken}
        taken |= {(d, s, "event") for d, s in events & kept}  # in one cycle the reading comes first
        if not taken:
            return
        work.telemetry = [r for r in work.telemetry if (r[0], r[1], "reading") not in taken]
        work.events = [e for e in work.events if (e[0], e[1], "event") not in taken]
        work.conflicts = sorted(taken)
        work.rejects = {**work.rejects, SEQ_CONFLICT: work.rejects.get(SEQ_CONFLICT, 0) + len(taken)}

    @staticmethod
    async def _advance_watermarks(db: aiosqlite.Connection,
                                  ranges: dict[str, list[tuple[int, int, bool]]]) -> dict[str, int]:
        """Move each device's watermark across what this cycle and earlier ones (of any replica) stored."""
        devices = json.dumps(sorted(ranges))
        coverage = {d: Coverage(0) for d in ranges}
        for device, mark in await fetch_all(
                db, "SELECT device, acked_through FROM ingest WHERE device IN (SELECT value FROM json_each(?))",
                (devices,)):
            coverage[device].watermark = int(mark)
        before = {d: c.watermark for d, c in coverage.items()}
        for device, base, last in await fetch_all(
                db, "SELECT device, base, last FROM ingest_ranges WHERE device IN (SELECT value FROM json_each(?))",
                (devices,)):
            coverage[device].pending.append((int(base), int(last)))
        for device, batches in ranges.items():
            for base, last, settled in batches:
                coverage[device].add(base, last, settled)
        await db.executemany(
            "INSERT INTO ingest(device, acked_through) VALUES (?, ?) ON CONFLICT(device) "
            "DO UPDATE SET acked_through = max(acked_through, excluded.acked_through)",
            [(d, c.watermark) for d, c in coverage.items()])
        await db.execute("DELETE FROM ingest_ranges WHERE device IN (SELECT value FROM json_each(?))", (devices,))
        await db.executemany("INSERT INTO ingest_ranges(device, base, last) VALUES (?, ?, ?)",
                             [(d, base, last) for d, c in coverage.items() for base, last in c.pending])
        # A stream is a device id, or DEVICE/INSTANCE for an outbox moved to a region of its own
        # (hub/db/identities.py); its records, clock events included, are stored under the device.
        await apply_clock_events(db, [(d.split("/", 1)[0], before[d], c.watermark) for d, c in coverage.items()])
        return {d: c.watermark for d, c in coverage.items()}

    def telemetry(self, *, device: str | None = None, since: float | None = None, until: float | None = None,
                  metric: str | None = None, limit: int | None = None) -> AsyncGenerator[TelemetryRow, None]:
        """Stored readings ordered by device, then seq; `since` included, `until` not."""
        filters = (("device = ?", device), ("ts >= ?", since), ("ts < ?", until), ("metric = ?", metric))
        return self._listing("device, seq, ts, metric, value, clock_unknown", "telemetry", filters, limit,
                             telemetry_row)

    def events(self, *, device: str | None = None, since: float | None = None,
               kind: str | None = None, limit: int | None = None) -> AsyncGenerator[EventRow, None]:
        """Stored events ordered by device, then seq (the device's own order)."""
        filters = (("device = ?", device), ("ts >= ?", since), ("kind = ?", kind))
        return self._listing("device, seq, ts, kind, body", "events", filters, limit, event_row)

    async def _listing(self, columns: str, table: str, filters: tuple[tuple[str, object], ...],
                       limit: int | None, make: Callable[..., T]) -> AsyncGenerator[T, None]:
        """Rows of a per-device table, filtered, by device and seq, streamed in chunks, each as
        `make(*columns)`. One generator: closing it (contextlib.aclosing) closes the cursor."""
        active = [(clause, arg) for clause, arg in filters if arg is not None]
        query = f"SELECT {columns} FROM {table}"  # noqa: S608  # names are ours; values are bound
        if active:
            query += " WHERE " + " AND ".join(clause for clause, _ in active)
        query += " ORDER BY device, seq"
        if limit is not None:
            query += f" LIMIT {int(limit)}"
        async with self._db.execute(query, [arg for _, arg in active]) as cur:
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

    async def latest_escalations(self) -> list[EventRow]:
        """The newest `escalation` event of each (device, rule), ordered by device and rule.

        A scan of the events table (there is no index on kind); fine for an operator's command.
        """
        query = (
            "SELECT e.device, e.seq, e.ts, e.kind, e.body FROM events e JOIN ("
            "  SELECT device, MAX(seq) AS seq FROM events WHERE kind = ?"
            "  GROUP BY device, json_extract(CASE WHEN json_valid(body) THEN body END, '$.rule')"
            ") latest USING (device, seq) ORDER BY e.device, e.seq"
        )
        rows = [event_row(*r) async for r in self._rows(query, (EventKind.ESCALATION,))]
        return sorted(rows, key=lambda r: (r.device, r.rule or ""))

    async def latest_alerts(self, since: float, severities: tuple[str, ...]) -> list[tuple[EventRow, int]]:
        """The newest `alert` event of each device and message with one of `severities`, taken at or
        after `since` (device clock), with how many there were since then; newest first."""
        query = (
            "SELECT e.device, e.seq, e.ts, e.kind, e.body, latest.n FROM events e JOIN ("
            "  SELECT device, MAX(seq) AS seq, COUNT(*) AS n FROM events WHERE kind = ? AND ts >= ?"
            "  AND json_valid(body) AND json_extract(body, '$.severity') IN (SELECT value FROM json_each(?))"
            "  GROUP BY device, json_extract(body, '$.message')"
            ") latest USING (device, seq) ORDER BY e.ts DESC, e.device"
        )
        return [(event_row(*r[:5]), int(r[5]))
                async for r in self._rows(query, (EventKind.ALERT, since, json.dumps(severities)))]

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
        return [self._device_row(r, now, drift_grace_s) for r in rows]

    @staticmethod
    def _device_row(r: Any, now: float, drift_grace_s: float) -> DeviceRow:
        online = bool(r["online"]) and r["revoked_at"] is None
        off_since = max(r["assigned_at"] or 0.0, r["connected_at"] or 0.0)
        drifted = (online and r["intended"] is not None and r["policy_version"] != r["intended"]
                   and now - off_since > drift_grace_s)
        return DeviceRow(
            device=r["device"], profile=r["profile"], tags=json.loads(r["tags"]),
            online=online, last_seen=iso(r["last_seen"]),
            policy_version=r["policy_version"], policy_intended=r["intended"], policy_drifted=drifted,
            policy_refused=json.loads(r["policy_refused"]) if r["policy_refused"] else None,
            backlog=r["backlog"], dropped=r["dropped"],
            cert_expires=iso(r["cert_expires"]), revoked=r["revoked_at"] is not None,
            agent_version=r["agent_version"],
            sensor_failures=json.loads(r["sensor_failures"]) if r["sensor_failures"] else None,
            corrupt_outboxes=r["corrupt_outboxes"],
        )

    async def hub_event(self, db: aiosqlite.Connection, identity: str, kind: EventKind, body: dict[str, Any],
                        ts: float | None = None) -> None:
        """An event of the hub itself (rollouts), in the events table under the hub's identity;
        call inside `atomically`."""
        await db.execute(
            "INSERT INTO events(device, seq, ts, kind, body) VALUES (?, "
            "(SELECT COALESCE(MAX(seq), 0) + 1 FROM events WHERE device = ?), ?, ?, ?)",
            (identity, identity, time.time() if ts is None else ts, kind, json.dumps(body, sort_keys=True)),
        )


async def register_device(db: aiosqlite.Connection, device: str, profile: str, tags: dict[str, str], *,
                          readmit: bool = False) -> None:
    """Add `device` to the registry, or give it this profile and these tags (provisioning and
    enrollment alike); `readmit` lifts a revocation. Commits nothing: the caller does."""
    await db.execute(
        "INSERT INTO devices(device, profile, tags, registered_at) VALUES (?, ?, ?, ?) "
        "ON CONFLICT(device) DO UPDATE SET profile = excluded.profile, tags = excluded.tags, "
        "revoked_at = CASE WHEN ? THEN NULL ELSE revoked_at END",
        (device, profile, json.dumps(tags, sort_keys=True), time.time(), readmit),
    )


async def fetch_one(db: aiosqlite.Connection, sql: str, args: Sequence[Any] = ()) -> Any:
    """One row (or None) inside a transaction of `HubStore.atomically`."""
    async with db.execute(sql, args) as cur:
        return await cur.fetchone()


async def fetch_all(db: aiosqlite.Connection, sql: str, args: Sequence[Any] = ()) -> list[Any]:
    async with db.execute(sql, args) as cur:
        return list(await cur.fetchall())
