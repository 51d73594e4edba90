"""One ingest cycle's commit, the same on both engines: claims, seq conflicts, watermarks, counts.

Each store runs `commit_cycle` inside its own transaction, after taking what keeps two replicas'
commits for one device apart (SQLite: one writer at a time; PostgreSQL: the devices' row locks),
and passes how it stores rows (`RowWriter`): that part differs (INSERT OR IGNORE on SQLite; on
PostgreSQL an anti-join, as a unique key on a time-partitioned table must hold the time).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any, Final

import msgspec

from hub.db import retention
from hub.db.device_clocks import apply_clock_events
from hub.db.dialect import GREATEST, JSON_VALUES, Dialect
from hub.db.identities import EventSink, resolve_claims
from hub.db.interface import Tx
from hub.db.rows import SEQ_CONFLICT, IngestWork
from hub.db.watermarks import Coverage

INGEST_MINUTES_KEPT: Final = 24 * 60  # the per-minute ingest counts behind the status's ingest rate

RowWriter = Callable[[Tx, IngestWork], Awaitable[None]]  # stores work.telemetry and work.events once each

# The cycle's spans and pairs, bound as one JSON array, as rows (device, lo, hi) / (device, seq).
_SPANS: Final[dict[Dialect, str]] = {
    "sqlite": "(SELECT json_extract(value, '$[0]') AS device, json_extract(value, '$[1]') AS lo, "
              "json_extract(value, '$[2]') AS hi FROM json_each(?))",
    "postgresql": "(SELECT x->>0 AS device, (x->>1)::bigint AS lo, (x->>2)::bigint AS hi "
                  "FROM json_array_elements(?::json) x)",
}
_PAIRS: Final[dict[Dialect, str]] = {
    "sqlite": "(SELECT json_extract(value, '$[0]') AS device, json_extract(value, '$[1]') AS seq FROM json_each(?))",
    "postgresql": "(SELECT x->>0 AS device, (x->>1)::bigint AS seq FROM json_array_elements(?::json) x)",
}


async def commit_cycle(db: Tx, work: IngestWork, record_event: EventSink, write_rows: RowWriter) -> dict[str, int]:
    """Everything one ingest cycle learned; returns the watermark of every legacy device (no outbox
    instance id) that sent a batch, and fills `work.instance_acks` for the others."""
    legacy = set(work.ranges)  # devices whose agents send no outbox instance id
    placed = await resolve_claims(db, work, record_event) if work.claims else {}
    await drop_seq_conflicts(db, work)
    # Resent records the watermark covers are not stored again, also where retention removed them.
    floors = await retention.dedup_floors(db, (stream.split("/", 1)[0] for stream in work.ranges))
    work.telemetry = retention.above_floor(work.telemetry, floors)
    work.events = retention.above_floor(work.events, floors)
    await write_rows(db, work)
    marks = await advance_watermarks(db, work.ranges) if work.ranges else {}
    work.instance_acks = {key: min(marks[stream], ceiling) for key, (stream, ceiling) in placed.items()}
    if work.messages:
        minute = int(work.now // 60)
        await db.execute(
            "INSERT INTO ingest_minutes(minute, hub, records, messages) VALUES (?, ?, ?, ?) "
            "ON CONFLICT(minute, hub) DO UPDATE SET records = ingest_minutes.records + excluded.records, "
            "messages = ingest_minutes.messages + excluded.messages",
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
            "DO UPDATE SET count = rejects.count + excluded.count",
            list(work.rejects.items()),
        )
    return {stream: mark for stream, mark in marks.items() if stream in legacy}


async def drop_seq_conflicts(db: Tx, work: IngestWork) -> None:
    """Keep (device, seq) one record across both tables: a reading whose seq is an event, stored or
    in this cycle, or an event whose seq is a stored reading, is dropped and counted.

    The first record of a seq stays, as with a repeated seq of the same kind; the batch still
    covers the seq for the watermark (a record of it is committed here)."""
    readings: dict[str, set[int]] = {}
    for device, seq, *_ in work.telemetry:
        readings.setdefault(device, set()).add(seq)
    events = {(device, seq) for device, seq, *_ in work.events}
    spans = json.dumps([[d, min(seqs), max(seqs)] for d, seqs in readings.items()])
    taken = {(d, s, "reading") for d, s in await db.fetch(  # events are sparse: all in the readings' span
        f"SELECT e.device, e.seq FROM {_SPANS[db.dialect]} j JOIN events e ON e.device = j.device "  # noqa: S608  # ours
        "AND e.seq BETWEEN j.lo AND j.hi", (spans,))
        if s in readings[d]}
    taken |= {(d, s, "event") for d, s in await db.fetch(
        f"SELECT t.device, t.seq FROM {_PAIRS[db.dialect]} j JOIN telemetry t "  # noqa: S608  # ours
        "ON t.device = j.device AND t.seq = j.seq", (json.dumps(sorted(events)),))}
    dropped = {(d, s) for d, s, _ in taken}
    # In one cycle the reading comes first (a walk over the few events, not the many readings).
    taken |= {(d, s, "event") for d, s in events if s in readings.get(d, ()) and (d, s) not in dropped}
    if not taken:
        return
    work.telemetry = [r for r in work.telemetry if (r[0], r[1], "reading") not in taken]
    work.events = [e for e in work.events if (e[0], e[1], "event") not in taken]
    work.conflicts = sorted(taken)
    work.rejects = {**work.rejects, SEQ_CONFLICT: work.rejects.get(SEQ_CONFLICT, 0) + len(taken)}


async def advance_watermarks(db: Tx, ranges: dict[str, list[tuple[int, int, bool]]]) -> dict[str, int]:
    """Move each stream's watermark across what this cycle and earlier ones (of any replica) stored."""
    streams = json.dumps(sorted(ranges))
    within = f"device IN (SELECT value FROM {JSON_VALUES[db.dialect]})"  # noqa: S608  # ours
    coverage = {d: Coverage(0) for d in ranges}
    for device, mark in await db.fetch(f"SELECT device, acked_through FROM ingest WHERE {within}",  # noqa: S608  # ours
                                       (streams,)):
        coverage[device].watermark = int(mark)
    before = {d: c.watermark for d, c in coverage.items()}
    for device, base, last in await db.fetch(f"SELECT device, base, last FROM ingest_ranges WHERE {within}",  # noqa: S608  # ours
                                             (streams,)):
        coverage[device].pending.append((int(base), int(last)))
    for device, batches in ranges.items():
        for base, last, settled in batches:
            coverage[device].add(base, last, settled)
    await db.executemany(
        "INSERT INTO ingest(device, acked_through) VALUES (?, ?) ON CONFLICT(device) "  # noqa: S608  # ours
        f"DO UPDATE SET acked_through = {GREATEST[db.dialect]}(ingest.acked_through, excluded.acked_through)",
        [(d, c.watermark) for d, c in coverage.items()])
    await db.execute(f"DELETE FROM ingest_ranges WHERE {within}", (streams,))  # noqa: S608  # ours
    await db.executemany("INSERT INTO ingest_ranges(device, base, last) VALUES (?, ?, ?)",
                         [(d, base, last) for d, c in coverage.items() for base, last in c.pending])
    # A stream is a device id, or DEVICE/INSTANCE for an outbox moved to a region of its own
    # (hub/db/identities.py); its records, clock events included, are stored under the device.
    await apply_clock_events(db, [(d.split("/", 1)[0], before[d], c.watermark) for d, c in coverage.items()])
    return {d: c.watermark for d, c in coverage.items()}


# An event of the hub itself, numbered after its latest: args (identity, identity, ts, kind, body JSON).
HUB_EVENT_SQL: Final = ("INSERT INTO events(device, seq, ts, kind, body) VALUES (?, "
                        "(SELECT COALESCE(MAX(seq), 0) + 1 FROM events WHERE device = ?), ?, ?, ?)")


def event_args(identity: str, kind: str, body: dict[str, Any], ts: float) -> tuple[Any, ...]:
    return (identity, identity, ts, kind, json.dumps(body, sort_keys=True))
