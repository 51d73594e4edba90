"""The hub's state in PostgreSQL, for hub replicas on separate machines (docs/scaling.md).

The driver is asyncpg (imported only when a postgresql:// URL is configured). The schema is
versioned like the SQLite one: a `schema_version` row, migrations in one transaction, a database
newer than this hub refused. Telemetry and events are partitioned by day on `ts` (epoch seconds),
so retention drops whole days; since a unique key on a partitioned table must hold the partition
column, (device, seq) is kept unique by the ingest itself: each commit locks its devices' rows of
`ingest` (SELECT ... FOR UPDATE, in device order) and inserts only what no partition holds yet.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import re
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from typing import Any, Final, TypeVar

import asyncpg

from edgefleet.runtime.sqlite import to_completion
from edgefleet.wire.events import EventKind
from edgefleet.wire.protocol import Presence
from hub.db.cycle import HUB_EVENT_SQL, commit_cycle, event_args
from hub.db.dialect import Dialect
from hub.db.interface import StoreError, StoreUnavailable, Tx, redact
from hub.db.rows import (
    TELEMETRY_COLUMNS,
    DeviceRow,
    IngestWork,
    Listings,
    TelemetryRow,
    device_row,
    listing_sql,
    telemetry_row,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

POOL_SIZE: Final = 4  # ingest, presence, coordination and the leader's loops at once; more only queue
CONNECT_TIMEOUT_S: Final = 5.0  # a database that does not answer in this is down for now
COMMAND_TIMEOUT_S: Final = 30.0  # a statement longer than this is a stuck server, not work
COPY_ROWS: Final = 2_000  # from this many new readings a cycle's rows go in by COPY, below it by unnest()
DAY_S: Final = 86_400
PARTITIONS_AHEAD_DAYS: Final = 2  # created ahead so the day's first commit never waits on DDL
PARTITIONS_BACK_DAYS: Final = 400  # older readings (a backlog, a clock never set) go to the default partition
DEADLOCK_RETRIES: Final = 5  # two replicas' commits for overlapping devices: PostgreSQL aborts one, we redo it
MIGRATION_LOCK: Final = 0x6564_6765  # the transaction advisory lock that serialises migrations ("edge")
_RETRY: Final = (asyncpg.DeadlockDetectedError, asyncpg.SerializationError)
_DOWN: Final = (OSError, asyncio.TimeoutError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError,
                asyncpg.CannotConnectNowError, asyncpg.AdminShutdownError, asyncpg.CrashShutdownError)

_TELEMETRY_COLUMNS: Final = ("device", "seq", "ts", "metric", "value")
_UNNEST_TELEMETRY: Final = ("unnest($1::text[], $2::bigint[], $3::float8[], $4::text[], $5::float8[]) "
                            "AS x(device, seq, ts, metric, value)")


def _number(text: str) -> int | float:
    """numeric as Python numbers, as SQLite gives them (SUM of integers is numeric in PostgreSQL)."""
    return int(text) if text.lstrip("-").isdigit() else float(text)


async def _setup(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec("numeric", encoder=str, decoder=_number, schema="pg_catalog", format="text")


def _columns(rows: Sequence[Sequence[Any]]) -> list[list[Any]]:
    """Rows as one list per column, for unnest()."""
    return [list(c) for c in zip(*rows, strict=True)]


# Each entry migrates from version i to i+1; all of one open run in one transaction.
MIGRATIONS: Final[Sequence[str]] = (
    # 1: the registry, certificates, the ingest and what the operator reads.
    """
    CREATE TABLE devices (
        device TEXT PRIMARY KEY, profile TEXT NOT NULL, tags TEXT NOT NULL DEFAULT '{}',
        registered_at DOUBLE PRECISION NOT NULL, revoked_at DOUBLE PRECISION,
        online INTEGER NOT NULL DEFAULT 0, session TEXT, last_seen DOUBLE PRECISION, agent_version TEXT,
        policy_version BIGINT, backlog BIGINT, dropped BIGINT, sensor_failures TEXT, corrupt_outboxes BIGINT,
        policy_refused TEXT, connected_at DOUBLE PRECISION
    );
    CREATE TABLE certificates (
        serial TEXT PRIMARY KEY, device TEXT NOT NULL, purpose TEXT NOT NULL,
        issued_at DOUBLE PRECISION NOT NULL, not_after DOUBLE PRECISION NOT NULL, revoked_at DOUBLE PRECISION,
        key_id TEXT, pem TEXT
    );
    CREATE INDEX certificates_device ON certificates(device);
    CREATE INDEX certificates_key ON certificates(device, key_id);
    CREATE TABLE telemetry (
        device TEXT NOT NULL, seq BIGINT NOT NULL, ts DOUBLE PRECISION NOT NULL,
        metric TEXT NOT NULL, value DOUBLE PRECISION NOT NULL, clock_unknown INTEGER NOT NULL DEFAULT 0
    ) PARTITION BY RANGE (ts);
    CREATE TABLE telemetry_default PARTITION OF telemetry DEFAULT;
    CREATE INDEX telemetry_key ON telemetry(device, seq);
    CREATE TABLE events (
        device TEXT NOT NULL, seq BIGINT NOT NULL, ts DOUBLE PRECISION NOT NULL,
        kind TEXT NOT NULL, body TEXT NOT NULL
    ) PARTITION BY RANGE (ts);
    CREATE TABLE events_default PARTITION OF events DEFAULT;
    CREATE INDEX events_key ON events(device, seq);
    CREATE INDEX events_kind ON events(kind);
    CREATE TABLE ingest (device TEXT PRIMARY KEY, acked_through BIGINT NOT NULL);
    CREATE TABLE ingest_ranges (
        device TEXT NOT NULL, base BIGINT NOT NULL, last BIGINT NOT NULL, PRIMARY KEY (device, base, last));
    CREATE TABLE ingest_instances (
        device TEXT NOT NULL, instance BIGINT NOT NULL, stream TEXT NOT NULL, floor BIGINT NOT NULL,
        keep BIGINT NOT NULL, top BIGINT NOT NULL, conflicts BIGINT NOT NULL, conflict_at DOUBLE PRECISION,
        machine BIGINT NOT NULL, first_seen DOUBLE PRECISION NOT NULL, last_seen DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (device, instance)
    );
    CREATE TABLE ingest_minutes (
        minute BIGINT NOT NULL, hub TEXT NOT NULL, records BIGINT NOT NULL, messages BIGINT NOT NULL,
        PRIMARY KEY (minute, hub));
    CREATE TABLE drops (device TEXT NOT NULL, metric TEXT NOT NULL, count BIGINT NOT NULL,
                        PRIMARY KEY (device, metric));
    CREATE TABLE rejects (reason TEXT PRIMARY KEY, count BIGINT NOT NULL);
    CREATE FUNCTION json_field(body TEXT, key TEXT) RETURNS TEXT LANGUAGE plpgsql IMMUTABLE AS $f$
    BEGIN
        RETURN body::jsonb ->> key;   -- a device's body may be anything: not JSON reads as NULL
    EXCEPTION WHEN others THEN
        RETURN NULL;
    END $f$;
    CREATE FUNCTION json_int(body TEXT, key TEXT) RETURNS BIGINT LANGUAGE plpgsql IMMUTABLE AS $f$
    BEGIN
        RETURN (body::jsonb ->> key)::bigint;
    EXCEPTION WHEN others THEN
        RETURN NULL;
    END $f$;
    """,
    # 2: what replicas share beyond the ingest: leadership, rollouts, coordination.
    """
    CREATE TABLE leadership (
        role TEXT PRIMARY KEY, holder TEXT NOT NULL,
        since DOUBLE PRECISION NOT NULL, expires_at DOUBLE PRECISION NOT NULL   -- the database's clock
    );
    CREATE TABLE policies (
        version BIGINT PRIMARY KEY, text TEXT, sha256 TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL, origin TEXT NOT NULL);
    CREATE TABLE rollouts (
        id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        version BIGINT NOT NULL REFERENCES policies(version), selector TEXT NOT NULL, waves TEXT NOT NULL,
        bake_s DOUBLE PRECISION NOT NULL, wave INTEGER NOT NULL, wave_started_at DOUBLE PRECISION NOT NULL,
        state TEXT NOT NULL, reason TEXT, created_at DOUBLE PRECISION NOT NULL, updated_at DOUBLE PRECISION NOT NULL);
    CREATE TABLE rollout_members (
        rollout BIGINT NOT NULL REFERENCES rollouts(id), device TEXT NOT NULL, rank BIGINT NOT NULL,
        wave INTEGER, previous BIGINT, online_when_reached INTEGER, reached_at DOUBLE PRECISION,
        PRIMARY KEY (rollout, device));
    CREATE TABLE assignments (
        device TEXT PRIMARY KEY, version BIGINT NOT NULL REFERENCES policies(version),
        assigned_at DOUBLE PRECISION NOT NULL);
    CREATE TABLE leases (name TEXT PRIMARY KEY, last_token BIGINT NOT NULL);
    CREATE TABLE lease_holders (
        device TEXT NOT NULL, request TEXT NOT NULL, name TEXT NOT NULL, token BIGINT NOT NULL,
        lim INTEGER NOT NULL, rule TEXT, policy_version BIGINT,
        granted_at DOUBLE PRECISION NOT NULL, expires_at DOUBLE PRECISION NOT NULL, PRIMARY KEY (device, request));
    CREATE INDEX lease_holders_name ON lease_holders(name);
    CREATE TABLE lease_queue (
        qid BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        name TEXT NOT NULL, device TEXT NOT NULL, request TEXT NOT NULL, lim INTEGER NOT NULL,
        ttl_s DOUBLE PRECISION NOT NULL, rule TEXT, policy_version BIGINT, requested_at DOUBLE PRECISION NOT NULL,
        UNIQUE (device, request));
    CREATE INDEX lease_queue_name ON lease_queue(name, qid);
    CREATE TABLE approvals (
        id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        device TEXT NOT NULL, request TEXT NOT NULL, rule TEXT NOT NULL, action TEXT NOT NULL, args TEXT NOT NULL,
        policy_version BIGINT, requested_at DOUBLE PRECISION NOT NULL, expires_at DOUBLE PRECISION NOT NULL,
        state TEXT NOT NULL, decided_by TEXT, decided_at DOUBLE PRECISION, reason TEXT,
        sent INTEGER NOT NULL DEFAULT 0, UNIQUE (device, request));
    CREATE TABLE tasks (
        id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        kind TEXT NOT NULL, args TEXT NOT NULL, target TEXT NOT NULL, deadline DOUBLE PRECISION,
        timeout_s DOUBLE PRECISION NOT NULL, state TEXT NOT NULL, offered TEXT, bid_by DOUBLE PRECISION,
        attempt INTEGER NOT NULL, awarded_to TEXT, award_expires DOUBLE PRECISION, result TEXT, reason TEXT,
        created_at DOUBLE PRECISION NOT NULL, updated_at DOUBLE PRECISION NOT NULL);
    CREATE TABLE bids (
        task BIGINT NOT NULL, device TEXT NOT NULL, able INTEGER NOT NULL, score DOUBLE PRECISION NOT NULL,
        detail TEXT, at DOUBLE PRECISION NOT NULL, outcome TEXT, result TEXT, PRIMARY KEY (task, device));
    """,
    """
    CREATE TABLE retention (tbl TEXT PRIMARY KEY, removed BIGINT NOT NULL);  -- rows retention removed (a metric)
    """,
    """
    CREATE TABLE enrollments (   -- zero-touch enrollment (hub/db/enrollments.py has the SQLite twin)
        id TEXT PRIMARY KEY, secret_sha256 TEXT NOT NULL, profile TEXT NOT NULL, tags TEXT NOT NULL,
        max_devices INTEGER, expires_at DOUBLE PRECISION, approve INTEGER NOT NULL,
        created_at DOUBLE PRECISION NOT NULL, created_by TEXT NOT NULL, revoked_at DOUBLE PRECISION);
    CREATE TABLE enrolled (
        device TEXT PRIMARY KEY, enrollment TEXT NOT NULL, key_id TEXT NOT NULL, serial TEXT NOT NULL,
        enrolled_at DOUBLE PRECISION NOT NULL);
    CREATE INDEX enrolled_enrollment ON enrolled(enrollment);
    CREATE TABLE enroll_readmit (device TEXT PRIMARY KEY, readmitted_by TEXT NOT NULL, at DOUBLE PRECISION NOT NULL);
    CREATE TABLE enroll_counts (outcome TEXT PRIMARY KEY, count BIGINT NOT NULL);
    """,
)
SCHEMA_VERSION: Final = len(MIGRATIONS)
_PARTITIONED: Final = ("telemetry", "events")
_DAY_PARTITION: Final = re.compile(r"^(telemetry|events)_d(\d+)$")  # NAME_dDAYS: [DAYS, DAYS+1) days since 1970


class PostgresTx:
    """A `hub.db.interface.Tx` over one asyncpg connection inside a transaction; `?` becomes `$n`."""

    dialect: Dialect = "postgresql"
    _translated: dict[str, str] = {}  # noqa: RUF012  # a cache shared by all: SQL texts are ours and few

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn

    @classmethod
    def sql(cls, text: str) -> str:
        done = cls._translated.get(text)
        if done is None:
            count = iter(range(1, text.count("?") + 1))
            done = cls._translated[text] = re.sub(r"\?", lambda _: f"${next(count)}", text)
        return done

    async def fetch(self, sql: str, args: Sequence[Any] = ()) -> list[Any]:
        return list(await self.conn.fetch(self.sql(sql), *args))

    async def fetch_one(self, sql: str, args: Sequence[Any] = ()) -> Any:
        return await self.conn.fetchrow(self.sql(sql), *args)

    async def execute(self, sql: str, args: Sequence[Any] = ()) -> int:
        status = await self.conn.execute(self.sql(sql), *args)
        tail = str(status).rsplit(" ", 1)[-1]
        return int(tail) if tail.isdigit() else 0

    async def lock(self, key: str) -> None:
        await self.conn.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", key)

    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        if rows:
            await self.conn.executemany(self.sql(sql), rows)


class PostgresStore(Listings):
    """Start with `await PostgresStore.open(url)`, stop with `await store.close()`."""

    dialect: Dialect = "postgresql"

    def __init__(self, pool: asyncpg.Pool, url: str) -> None:
        self._pool, self.url = pool, url
        self._days: set[int] = set()  # day partitions known to exist
        self._down_logged = False

    @classmethod
    async def open(cls, url: str, *, target: int = SCHEMA_VERSION) -> PostgresStore:
        """Connect, then create or migrate the schema up to `target` (tests stop short of the latest)."""
        # min_size 0: no background reconnecting (and logging) while the database is down; the first
        # connection is made by the migration below.
        pool = asyncpg.create_pool(url, min_size=0, max_size=POOL_SIZE, init=_setup, timeout=CONNECT_TIMEOUT_S,
                                   command_timeout=COMMAND_TIMEOUT_S)
        try:
            await pool
            store = cls(pool, url)
            await store._migrate(target)
            await store._ensure_days(range(int(time.time() // DAY_S) - 1,
                                           int(time.time() // DAY_S) + PARTITIONS_AHEAD_DAYS + 1))
        except BaseException as exc:
            await pool.close()
            if isinstance(exc, StoreUnavailable) and exc.__cause__ is not None:
                exc = exc.__cause__
            if isinstance(exc, _DOWN):
                raise StoreUnavailable(f"cannot reach the hub database {redact(url)} ({exc}): start PostgreSQL "
                                       "or correct [database] url in hub.toml") from exc
            if isinstance(exc, asyncpg.PostgresError):
                raise StoreError(f"the hub database {redact(url)} refused the connection ({exc}): check "
                                 "[database] url in hub.toml and the server's pg_hba.conf") from exc
            raise
        return store

    async def close(self) -> None:
        await self._pool.close()

    # --- schema -----------------------------------------------------------------------

    async def schema_version(self) -> int:
        async with self._pool.acquire() as conn:
            return await self._version(conn)

    @staticmethod
    async def _version(conn: asyncpg.Connection) -> int:
        if await conn.fetchval("SELECT to_regclass('schema_version')") is None:
            return 0
        return int(await conn.fetchval("SELECT COALESCE(MAX(version), 0) FROM schema_version"))

    async def _migrate(self, target: int) -> None:
        async with self._pool.acquire() as conn, conn.transaction():
            # Two replicas starting at once on an empty database: one migrates, the other waits, then sees it done.
            await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
            version = await self._version(conn)
            if version > SCHEMA_VERSION:
                raise StoreError(f"the hub database {redact(self.url)} has schema {version}, newer than this "
                                 f"edge-hub ({SCHEMA_VERSION}): upgrade edge-hub")
            if version >= target:
                return
            if version == 0:
                await conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
                await conn.execute("INSERT INTO schema_version VALUES (0)")
            for step in MIGRATIONS[version:target]:
                await conn.execute(step)
            await conn.execute("UPDATE schema_version SET version = $1", target)
        log.info("hub database %s migrated from schema %d to %d", redact(self.url), version, target)

    async def _ensure_days(self, days: Sequence[int] | range) -> None:
        """Day partitions of telemetry and events for `days` (since 1970), each in its own short transaction."""
        try:
            for day in days:
                if day not in self._days:
                    await self._make_day(day)
        except _DOWN as exc:  # as for any statement: the caller tries again later
            raise self._unreachable(exc) from exc

    async def _make_day(self, day: int) -> None:
        async with self._pool.acquire() as conn:
            for table in _PARTITIONED:
                try:
                    await conn.execute(
                        f"CREATE TABLE IF NOT EXISTS {table}_d{day} PARTITION OF {table} "
                        f"FOR VALUES FROM ({day * DAY_S}) TO ({(day + 1) * DAY_S})")
                except (asyncpg.DuplicateTableError, asyncpg.UniqueViolationError):
                    pass  # another replica made it at the same moment
                except asyncpg.CheckViolationError:
                    # The default partition already holds rows of that day: they stay there (retention
                    # deletes them from it in batches) and so do the day's next ones.
                    log.info("%s of day %d stay in %s_default", table, day, table)
        self._days.add(day)

    # --- transactions -----------------------------------------------------------------

    def _unreachable(self, exc: BaseException) -> StoreUnavailable:
        return StoreUnavailable(f"the hub database {redact(self.url)} is unreachable ({exc})")

    async def _run(self, work: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        """Run `work` in one transaction, redone when PostgreSQL aborts it for a deadlock; a database
        that cannot be reached is StoreUnavailable (nothing committed)."""
        for attempt in range(DEADLOCK_RETRIES + 1):
            try:
                async with self._pool.acquire() as conn, conn.transaction():
                    result = await work(conn)
                if self._down_logged:
                    log.warning("the hub database %s answers again", redact(self.url))
                    self._down_logged = False
                return result
            except _RETRY:
                if attempt == DEADLOCK_RETRIES:
                    raise
            except _DOWN as exc:
                if not self._down_logged:
                    log.warning("the hub database %s is unreachable (%s)", redact(self.url), exc)
                    self._down_logged = True
                raise self._unreachable(exc) from exc
        raise AssertionError("unreachable")

    async def _fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        async def work(conn: asyncpg.Connection) -> list[asyncpg.Record]:
            return list(await conn.fetch(PostgresTx.sql(sql), *args))
        return await self._run(work)

    async def _execute(self, sql: str, *args: Any) -> str:
        async def work(conn: asyncpg.Connection) -> str:
            return str(await conn.execute(PostgresTx.sql(sql), *args))
        return await self._run(work)

    async def query(self, sql: str, args: Sequence[Any] = ()) -> list[Any]:
        """Rows of one statement in its own transaction (operator reads)."""
        return await self._fetch(sql, *args)

    async def atomically(self, work: Callable[[Tx], Awaitable[T]]) -> T:
        """Run `work` in one transaction (redone from the start after a deadlock); cancellation cannot split it."""
        return await to_completion(self._run(lambda conn: work(PostgresTx(conn))))

    async def hub_event(self, db: Tx, identity: str, kind: EventKind, body: dict[str, Any],
                        ts: float | None = None) -> None:
        """An event of the hub itself in the events table under the hub's identity; inside `atomically`.
        Numbered after the latest: two replicas' transactions take turns, or both would take the same seq."""
        await db.lock(f"hub-events:{identity}")
        await db.execute(HUB_EVENT_SQL, event_args(identity, kind, body, time.time() if ts is None else ts))

    # --- registry ---------------------------------------------------------------------

    async def register(self, device: str, profile: str, tags: dict[str, str], *, readmit: bool = False) -> None:
        await self._execute(
            "INSERT INTO devices(device, profile, tags, registered_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT(device) DO UPDATE SET profile = excluded.profile, tags = excluded.tags, "
            "revoked_at = CASE WHEN ?::boolean THEN NULL ELSE devices.revoked_at END",
            device, profile, json.dumps(tags, sort_keys=True), time.time(), readmit)

    async def record_certificate(self, serial: int, device: str, purpose: str, not_after: dt.datetime) -> None:
        await self._execute(
            "INSERT INTO certificates(serial, device, purpose, issued_at, not_after) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT DO NOTHING", format(serial, "x"), device, purpose, time.time(), not_after.timestamp())

    async def certificate_revoked(self, serial: int) -> bool:
        rows = await self._fetch("SELECT revoked_at FROM certificates WHERE serial = ?", format(serial, "x"))
        return bool(rows) and rows[0][0] is not None

    async def vouches_for(self, serial: int, device: str) -> bool | None:
        rows = await self._fetch("SELECT device, purpose, revoked_at FROM certificates WHERE serial = ?",
                                 format(serial, "x"))
        if not rows:
            return None
        return bool(rows[0][0] == device and rows[0][1] == "device" and rows[0][2] is None)

    async def is_revoked(self, device: str) -> bool:
        rows = await self._fetch("SELECT revoked_at FROM devices WHERE device = ?", device)
        return bool(rows) and rows[0][0] is not None

    async def exists(self, device: str) -> bool:
        return bool(await self._fetch("SELECT 1 FROM devices WHERE device = ?", device))

    async def revoke_device(self, device: str) -> int:
        now = time.time()

        async def work(conn: asyncpg.Connection) -> int:
            await conn.execute("UPDATE devices SET revoked_at = COALESCE(revoked_at, $1) WHERE device = $2",
                               now, device)
            status = await conn.execute("UPDATE certificates SET revoked_at = $1 WHERE device = $2 "
                                        "AND revoked_at IS NULL AND purpose = 'device'", now, device)
            return int(status.split()[-1])
        return await self._run(work)

    async def revoke_serial(self, serial: int) -> None:
        await self._execute("UPDATE certificates SET revoked_at = COALESCE(revoked_at, ?) WHERE serial = ?",
                            time.time(), format(serial, "x"))

    async def revoked_serials(self) -> list[tuple[int, dt.datetime]]:
        rows = await self._fetch("SELECT serial, revoked_at FROM certificates WHERE revoked_at IS NOT NULL "
                                 "AND not_after > ? ORDER BY revoked_at", time.time())
        return [(int(r[0], 16), dt.datetime.fromtimestamp(r[1], dt.UTC)) for r in rows]

    # --- presence ---------------------------------------------------------------------

    async def apply_presence(self, device: str, presence: Presence, now: float) -> bool:
        return bool(await self.apply_presences([(device, presence)], now))

    async def apply_presences(self, messages: Sequence[tuple[str, Presence]], now: float) -> list[int]:
        async def work(conn: asyncpg.Connection) -> list[int]:
            changed = []
            for i, (device, presence) in enumerate(messages):
                row = await conn.fetchrow("SELECT session FROM devices WHERE device = $1 FOR UPDATE", device)
                if row is None:
                    continue
                if presence.state == "online":
                    await conn.execute("UPDATE devices SET online = 1, session = $1, last_seen = $2, "
                                       "connected_at = $2, agent_version = $3 WHERE device = $4",
                                       presence.session, now, presence.agent_version, device)
                elif row["session"] in (None, presence.session):
                    await conn.execute("UPDATE devices SET online = 0, last_seen = $1 WHERE device = $2", now, device)
                else:
                    continue  # the Last Will of a connection that a newer one replaced
                changed.append(i)
            return changed
        return await self._run(work)

    # --- ingest -----------------------------------------------------------------------

    async def watermarks(self) -> dict[str, int]:
        return {r[0]: int(r[1]) for r in await self._fetch("SELECT device, acked_through FROM ingest")}

    async def registered(self) -> set[str]:
        return {r[0] for r in await self._fetch("SELECT device FROM devices WHERE revoked_at IS NULL")}

    async def commit_ingest(self, work: IngestWork) -> dict[str, int]:
        """One ingest cycle in one transaction; its devices' `ingest` rows locked (in order) for its length,
        so two replicas' commits for one device follow each other as on SQLite."""
        await self._ensure_days(self._days_of(work))
        devices = sorted({r[0] for r in work.telemetry} | {e[0] for e in work.events}
                         | {d.split("/", 1)[0] for d in work.ranges} | {d for d, _ in work.claims})
        telemetry, events, rejects, conflicts = work.telemetry, work.events, dict(work.rejects), work.conflicts
        ranges = {d: list(b) for d, b in work.ranges.items()}

        async def cycle(conn: asyncpg.Connection) -> dict[str, int]:
            # A retried attempt starts again from what the cycle brought.
            work.telemetry, work.events, work.rejects, work.conflicts = telemetry, events, dict(rejects), conflicts
            work.ranges = {d: list(b) for d, b in ranges.items()}
            await conn.execute("INSERT INTO ingest(device, acked_through) SELECT d, 0 FROM unnest($1::text[]) d "
                               "ORDER BY d ON CONFLICT DO NOTHING", devices)
            await conn.execute("SELECT 1 FROM ingest WHERE device = ANY($1::text[]) ORDER BY device FOR UPDATE",
                               devices)
            tx = PostgresTx(conn)
            return await commit_cycle(tx, work, lambda kind, body: self.hub_event(
                tx, work.hub or "hub", kind, body), self._write_rows)
        return await to_completion(self._run(cycle))

    def _days_of(self, work: IngestWork) -> list[int]:
        if not work.telemetry and not work.events:
            return []
        today = int(time.time() // DAY_S)
        stamps = [r[2] for r in work.telemetry] + [e[2] for e in work.events]
        lo, hi = int(min(stamps) // DAY_S), int(max(stamps) // DAY_S)
        if lo in self._days and hi in self._days and hi - lo <= 1:
            return []
        return sorted({d for t in stamps
                       if today - PARTITIONS_BACK_DAYS <= (d := int(t // DAY_S)) <= today + PARTITIONS_AHEAD_DAYS}
                      - self._days)

    @staticmethod
    async def _write_rows(tx: Tx, work: IngestWork) -> None:
        """The cycle's rows not stored yet. Its devices are locked, so nobody adds theirs meanwhile: a reading
        above its device's highest stored seq is new (COPY when there are many, as in a backlog's drain);
        only the others (a resend) are checked against every partition."""
        assert isinstance(tx, PostgresTx)
        conn = tx.conn
        if work.telemetry:
            tops = {r[0]: r[1] for r in await conn.fetch(
                "SELECT d, (SELECT max(seq) FROM telemetry t WHERE t.device = d) FROM unnest($1::text[]) d",
                sorted({r[0] for r in work.telemetry}))}
            fresh: list[tuple[str, int, float, str, float]] = []
            resent: list[tuple[str, int, float, str, float]] = []
            seen: set[tuple[str, int]] = set()
            for row in work.telemetry:  # the first of a seq repeated within the cycle, as on SQLite
                if (row[0], row[1]) not in seen:
                    seen.add((row[0], row[1]))
                    top = tops.get(row[0])
                    (fresh if top is None or row[1] > top else resent).append(row)
            if len(fresh) >= COPY_ROWS:
                await conn.copy_records_to_table("telemetry", records=fresh, columns=_TELEMETRY_COLUMNS)
            elif fresh:
                await conn.execute(f"INSERT INTO telemetry({', '.join(_TELEMETRY_COLUMNS)}) "  # noqa: S608  # ours
                                   f"SELECT * FROM {_UNNEST_TELEMETRY}", *_columns(fresh))
            if resent:
                await conn.execute(
                    f"INSERT INTO telemetry({', '.join(_TELEMETRY_COLUMNS)}) SELECT x.* "  # noqa: S608  # ours
                    f"FROM {_UNNEST_TELEMETRY} WHERE NOT EXISTS "
                    "(SELECT 1 FROM telemetry t WHERE t.device = x.device AND t.seq = x.seq)", *_columns(resent))
        if work.events:
            await conn.execute(
                "INSERT INTO events(device, seq, ts, kind, body) SELECT DISTINCT ON (x.device, x.seq) x.device, "
                "x.seq, x.ts, x.kind, x.body FROM unnest($1::text[], $2::bigint[], $3::float8[], $4::text[], "
                "$5::text[]) AS x(device, seq, ts, kind, body) "
                "WHERE NOT EXISTS (SELECT 1 FROM events e WHERE e.device = x.device AND e.seq = x.seq)",
                *_columns(work.events))

    # --- what the operator reads ------------------------------------------------------

    def read_telemetry(self, since: float, until: float, device: str | None = None,
                       metric: str | None = None) -> AsyncGenerator[TelemetryRow, None]:
        """Readings with since <= ts < until (only those days' partitions are read) in time order, then by
        device and seq, as the SQLite store gives them (hub/db/export.py)."""
        filters = (("ts >= ?", since), ("ts < ?", until), ("device = ?", device), ("metric = ?", metric))
        return self._listing(TELEMETRY_COLUMNS, "telemetry", filters, None, telemetry_row, order="ts, device, seq")

    async def _listing(self, columns: str, table: str, filters: tuple[tuple[str, object], ...],
                       limit: int | None, make: Callable[..., T], order: str = "device, seq",
                       ) -> AsyncGenerator[T, None]:
        """Rows of a per-device table, filtered, by device and seq (or `order`), streamed through a cursor."""
        query, args = listing_sql(columns, table, filters, limit, order)
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                async for row in conn.cursor(PostgresTx.sql(query), *args, prefetch=10_000):
                    yield make(*row)
        except _DOWN as exc:
            raise self._unreachable(exc) from exc

    async def known_device(self, device: str) -> bool:
        rows = await self._fetch(
            "SELECT EXISTS (SELECT 1 FROM devices WHERE device = ?) OR EXISTS (SELECT 1 FROM events WHERE "
            "device = ?) OR EXISTS (SELECT 1 FROM telemetry WHERE device = ?)", device, device, device)
        return bool(rows[0][0])

    async def reject_counts(self) -> dict[str, int]:
        return {r[0]: int(r[1]) for r in await self._fetch("SELECT reason, count FROM rejects")}

    async def devices(self, device: str | None = None, *, drift_grace_s: float = 120.0,
                      now: float | None = None) -> list[DeviceRow]:
        now = time.time() if now is None else now
        query = ("SELECT d.*, (SELECT MAX(not_after) FROM certificates c WHERE c.device = d.device "
                 "AND c.purpose = 'device' AND c.revoked_at IS NULL) AS cert_expires, "
                 "a.version AS intended, a.assigned_at FROM devices d LEFT JOIN assignments a USING (device)")
        args: tuple[Any, ...] = ()
        if device is not None:
            query += " WHERE d.device = ?"
            args = (device,)
        return [device_row(r, now, drift_grace_s) for r in await self._fetch(query + " ORDER BY d.device", *args)]

    # --- leadership (hub/region/leadership.py): on the database's clock ---------------

    async def claim_leadership(self, role: str, holder: str, ttl_s: float, now: float) -> tuple[str, float]:
        """Take or keep `role` for `holder` unless another holds it unexpired, judged by the database's
        `now()` (replicas' clocks may differ); `now` is not used. The holder and expiry after the attempt."""
        del now
        sql = ("INSERT INTO leadership(role, holder, since, expires_at) "
               "VALUES ($1, $2, extract(epoch FROM now()), extract(epoch FROM now()) + $3) "
               "ON CONFLICT(role) DO UPDATE SET holder = excluded.holder, expires_at = excluded.expires_at, "
               "since = CASE WHEN leadership.holder = excluded.holder THEN leadership.since ELSE excluded.since END "
               "WHERE leadership.holder = excluded.holder OR leadership.expires_at < excluded.since")

        async def work(conn: asyncpg.Connection) -> tuple[str, float]:
            await conn.execute(sql, role, holder, ttl_s)
            row = await conn.fetchrow("SELECT holder, expires_at FROM leadership WHERE role = $1", role)
            return str(row["holder"]), float(row["expires_at"])
        return await self._run(work)

    async def release_leadership(self, role: str, holder: str, now: float) -> None:
        del now
        await self._execute("UPDATE leadership SET expires_at = extract(epoch FROM now()) "
                            "WHERE role = ? AND holder = ?", role, holder)

    # --- retention (hub/db/retention.py decides when) ----------------------------------

    async def prune_telemetry(self, before: float, batch: int) -> int:
        return await self._prune("telemetry", before, batch)

    async def prune_events(self, before: float, batch: int) -> int:
        return await self._prune("events", before, batch)

    async def _prune(self, table: str, before: float, batch: int) -> int:
        """Drop the day partitions wholly before `before`, then delete up to `batch` older rows of the default
        partition; never a row at or after `before`. Rows removed."""
        removed = 0
        for (name,) in await self._fetch(
                "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
                "WHERE i.inhparent = ?::regclass ORDER BY c.relname", table):
            match = _DAY_PARTITION.match(name)
            if match is None or (int(match.group(2)) + 1) * DAY_S > before:
                continue

            async def drop(conn: asyncpg.Connection, name: str = name) -> int:
                count = int(await conn.fetchval(f"SELECT count(*) FROM {name}"))  # noqa: S608  # our names
                await conn.execute(f"DROP TABLE {name}")
                return count
            removed += await self._run(drop)
            self._days.discard(int(match.group(2)))
        status = await self._execute(
            f"DELETE FROM {table}_default WHERE ctid IN (SELECT ctid FROM {table}_default "  # noqa: S608  # ours
            "WHERE ts < ? LIMIT ?)", before, batch)
        return removed + int(status.split()[-1])


class SnapshotRows(list[tuple[Any, ...]]):
    """Rows read, with the two cursor methods the metrics collector uses."""

    def fetchall(self) -> list[tuple[Any, ...]]:
        return list(self)

    def fetchone(self) -> tuple[Any, ...] | None:
        return self[0] if self else None


class SnapshotReader:
    """A synchronous, read-only view of the database in one transaction (REPEATABLE READ: every figure from
    the same moment), for code that runs in a worker thread of its own: the metrics collector. `?` placeholders."""

    def __init__(self, url: str) -> None:
        self._loop, self.url = asyncio.new_event_loop(), url
        try:
            self._conn = self._run(asyncpg.connect(url, timeout=CONNECT_TIMEOUT_S, command_timeout=COMMAND_TIMEOUT_S))
        except BaseException:
            self._loop.close()
            raise
        try:
            self._run(_setup(self._conn))
            self._run(self._conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"))
        except BaseException:
            self.close()
            raise

    def _run(self, work: Awaitable[T]) -> T:
        try:
            return self._loop.run_until_complete(work)
        except (*_DOWN, asyncpg.PostgresError) as exc:
            raise StoreUnavailable(f"cannot read the hub database {redact(self.url)} ({exc})") from exc

    def execute(self, sql: str, args: Sequence[Any] = ()) -> SnapshotRows:
        return SnapshotRows(tuple(r) for r in self._run(self._conn.fetch(PostgresTx.sql(sql), *args)))

    def close(self) -> None:
        try:
            self._run(self._conn.close())
        except StoreUnavailable:
            pass  # closing a connection the server already dropped
        finally:
            self._loop.close()
