"""Retention of readings and events in the SQLite store: old rows removed in bounded batches.

The contract every store keeps (the PostgreSQL one drops whole partitions instead):

- `prune_*(before, batch)` removes at most `batch` rows whose `ts` is strictly before `before`
  (a row stamped exactly `before` stays) and returns how many it removed; the caller repeats
  until fewer than `batch` come back.
- Only rows at or below their stream's watermark go (its *dedup floor*, see below); a row above
  it (stored beyond a gap, or stamped by a clock not corrected yet) waits until it is covered.
  The hub's own events have no watermark: each of its identities keeps its newest event, so
  its numbering goes on growing.
- The ingest stores no record at or below that floor (`above_floor`). Before retention the
  primary key alone kept a resent record from being stored twice; once a row may be gone, the
  watermark (which never goes back) is what says it was stored. Every record at or below it is
  committed already, so nothing new is refused for it.

A device's sequence space may be shared out among outbox instances (hub/db/identities.py):
a record belongs to the instance with the highest `floor` below its seq, and that instance's
`stream` holds the watermark; a device without instances has one stream, its own id.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import sqlite3
import time
from collections.abc import Callable, Iterable
from typing import Final, Literal, Protocol, TypeVar

import aiosqlite

from hub.db.dialect import JSON_VALUES
from hub.db.interface import Tx

Table = Literal["telemetry", "events"]
TABLES: Final[tuple[Table, ...]] = ("telemetry", "events")
NO_FLOOR: Final = -1  # nothing of a stream without a watermark is taken for stored
PRUNE_BATCH: Final = 2_000  # rows per transaction: milliseconds of the single writer, so an ingest cycle waits little
PRUNE_PAUSE_S: Final = 0.05  # between batches at least (and as long as a batch took): the ingest gets the writer first
PRUNE_EVERY_S: Final = 3600.0  # a run an hour; a limit shorter than 4 h (a drill) runs every quarter of it
MIN_PRUNE_EVERY_S: Final = 1.0  # ... but not more often than this

log = logging.getLogger("hub.retention")
R = TypeVar("R", tuple[str, int, float, str, float], tuple[str, int, float, str, str])  # readings, events

# The watermark of the stream that row `t` belongs to (NULL when it has none).
_ROW_FLOOR: Final = (
    "COALESCE((SELECT COALESCE(i.acked_through, -1) FROM ingest_instances n LEFT JOIN ingest i ON i.device = n.stream "
    "WHERE n.device = t.device AND n.floor < t.seq ORDER BY n.floor DESC LIMIT 1), "
    "(SELECT acked_through FROM ingest WHERE device = t.device)"
)
# Rows without any watermark: the hub's own events keep their newest; a reading never goes.
_FALLBACK: Final[dict[Table, str]] = {
    "telemetry": "-1",
    "events": "(SELECT MAX(seq) - 1 FROM events e WHERE e.device = t.device)",
}


async def prune(db: Tx, table: Table, before: float, batch: int) -> int:
    """Remove up to `batch` of the oldest prunable rows stamped before `before`, inside the
    caller's transaction, and count them in `retention`; how many went."""
    if table not in TABLES or batch < 1:
        raise ValueError(f"cannot prune {table!r} in batches of {batch}")
    removed = max(await db.execute(
        f"DELETE FROM {table} WHERE (device, seq) IN (SELECT t.device, t.seq FROM {table} t "  # noqa: S608  # our names
        f"WHERE t.ts < ? AND t.seq <= {_ROW_FLOOR}, {_FALLBACK[table]}) ORDER BY t.ts LIMIT ?)",
        (before, batch)), 0)
    if removed:
        await db.execute(
            "INSERT INTO retention(tbl, removed) VALUES (?, ?) "
            "ON CONFLICT(tbl) DO UPDATE SET removed = removed + excluded.removed", (table, removed))
    return removed


async def removed_counts(db: aiosqlite.Connection) -> dict[str, int]:
    """Rows retention removed so far, per table."""
    async with db.execute("SELECT tbl, removed FROM retention") as cur:
        return {str(t): int(n) for t, n in await cur.fetchall()}


Floors = dict[str, list[tuple[int, int]]]  # device -> (instance floor, watermark), by floor


async def dedup_floors(db: Tx, devices: Iterable[str]) -> Floors:
    """The watermarks the records of `devices` are judged against (see the module's docstring)."""
    names = json.dumps(sorted(set(devices)))
    values = JSON_VALUES[db.dialect]
    floors: Floors = {}
    for device, floor, mark in await db.fetch(
            "SELECT n.device, n.floor, COALESCE(i.acked_through, -1) FROM ingest_instances n "  # noqa: S608  # ours
            f"LEFT JOIN ingest i ON i.device = n.stream WHERE n.device IN (SELECT value FROM {values}) "
            "UNION ALL SELECT g.device, -1, g.acked_through FROM ingest g "
            f"WHERE g.device IN (SELECT value FROM {values}) "
            "AND NOT EXISTS (SELECT 1 FROM ingest_instances n WHERE n.device = g.device) "
            "ORDER BY 1, 2", (names, names)):
        floors.setdefault(device, []).append((int(floor), int(mark)))
    return floors


def above_floor(rows: list[R], floors: Floors) -> list[R]:
    """The rows (device, seq, ...) above their stream's watermark: the others are stored already."""
    single = {d: regions[0][1] for d, regions in floors.items() if len(regions) == 1}
    if len(single) == len(floors):  # the usual case: one stream per device, one comparison a row
        return [r for r in rows if r[1] > single.get(r[0], NO_FLOOR)]
    return [r for r in rows if r[1] > _floor(floors.get(r[0]), r[1])]


def _floor(regions: list[tuple[int, int]] | None, seq: int) -> int:
    mark = NO_FLOOR
    for floor, watermark in regions or ():
        if floor >= seq:
            break
        mark = watermark
    return mark


class Prunable(Protocol):
    """What retention needs of a store (hub.db.store.HubStore, and the PostgreSQL one)."""

    async def prune_telemetry(self, before: float, batch: int) -> int: ...

    async def prune_events(self, before: float, batch: int) -> int: ...


def prune_interval(*limits_s: float | None) -> float:
    """How often to run: hourly, or at a quarter of the shortest limit, whichever is sooner."""
    shortest = min((s for s in limits_s if s is not None), default=PRUNE_EVERY_S * 4)
    return max(MIN_PRUNE_EVERY_S, min(PRUNE_EVERY_S, shortest / 4))


async def prune_all(store: Prunable, table: Table, before: float, *, batch: int = PRUNE_BATCH,
                    pause_s: float = PRUNE_PAUSE_S) -> int:
    """Remove every prunable row of `table` stamped before `before`, batch after batch; how many."""
    prune = store.prune_telemetry if table == "telemetry" else store.prune_events
    total = 0
    while True:
        started = time.monotonic()
        removed = await prune(before, batch)
        total += removed
        if removed < batch:
            return total
        await asyncio.sleep(max(pause_s, time.monotonic() - started))


async def keep_pruning(store: Prunable, telemetry_s: float | None, events_s: float | None, *,
                       clock: Callable[[], float] = time.time) -> None:
    """Run retention until cancelled (in the region's leader only: hub/region/leadership.py)."""
    every = prune_interval(telemetry_s, events_s)
    failures = 0
    while True:
        try:
            await prune_run(store, telemetry_s, events_s, clock())
            failures = 0
        except sqlite3.OperationalError as exc:  # busy past its timeout: the next run tries again
            log.log(logging.WARNING if failures == 0 else logging.DEBUG,
                    "retention could not run (%s); trying again in %.0f s", exc, every)
            failures += 1
        except Exception:  # a defect here must not take the ingest down with it
            log.exception("retention failed; trying again in %.0f s", every)
        await asyncio.sleep(every)


async def prune_run(store: Prunable, telemetry_s: float | None, events_s: float | None, now: float) -> dict[str, int]:
    """One run over both tables, logged once; rows removed per table."""
    started = time.monotonic()
    limits: tuple[tuple[Table, str, float | None], ...] = (("telemetry", "readings", telemetry_s),
                                                           ("events", "events", events_s))
    removed: dict[str, int] = {}
    done: list[str] = []
    for table, noun, limit_s in limits:
        if limit_s is not None:
            removed[table] = await prune_all(store, table, now - limit_s)
            done.append(f"{removed[table]} {noun} stamped before {_iso(now - limit_s)}")
    level = logging.INFO if any(removed.values()) else logging.DEBUG
    log.log(level, "retention removed %s in %.1f s", ", ".join(done), time.monotonic() - started)
    return removed


def _iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="seconds")
