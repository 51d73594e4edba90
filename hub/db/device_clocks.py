"""Devices' clock reports, applied to what the hub stored from them (docs/store-and-forward.md).

A device that stamped records before its wall clock was set sends, as ordinary events:
- `clock_corrected` {first, last, shift_s, sent_through, clock_good}: its records first..last
  were stamped `shift_s` seconds off; those up to `sent_through` may have reached the hub with
  the old stamps (the device corrected the others before sending them), so the hub moves them;
- `clock_unknown` {first, last, boot}: records first..last were stamped in an earlier boot
  whose clock was never known good; nothing can correct them, so the hub flags them.

Each is applied when the device's watermark passes it: every record up to the event is stored
by then (a resend of an older one is a duplicate the hub ignores), and the watermark passes a
sequence number once, so the event is applied exactly once, by whichever replica moved it.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from typing import Final

import msgspec

from edgefleet.wire.events import EventKind
from hub.db.dialect import Dialect
from hub.db.interface import Tx

CLOCK_EVENTS: Final = (EventKind.CLOCK_CORRECTED, EventKind.CLOCK_UNKNOWN)
# Further than any real clock is off (a board in 1970 is about 56 years behind): a larger
# shift is a bad report, not a correction.
MAX_SHIFT_S: Final = 200 * 365.25 * 86400
REJECT_REASON: Final = "bad_clock_event"

log = logging.getLogger("hub.ingest")


class ClockCorrected(msgspec.Struct):
    first: int
    last: int
    shift_s: float
    sent_through: int


# The cycle's moves, bound as one JSON array of [device, old watermark, new watermark], as rows.
JSON_ROWS: Final[dict[Dialect, str]] = {
    "sqlite": "(SELECT json_extract(value, '$[0]') AS device, json_extract(value, '$[1]') AS lo, "
              "json_extract(value, '$[2]') AS hi FROM json_each(?))",
    "postgresql": "(SELECT x->>0 AS device, (x->>1)::bigint AS lo, (x->>2)::bigint AS hi "
                  "FROM json_array_elements(?::json) x)",
}


class ClockUnknown(msgspec.Struct):
    first: int
    last: int


async def apply_clock_events(db: Tx, moves: Sequence[tuple[str, int, int]]) -> None:
    """For each (device, old watermark, new watermark), apply its clock events in old < seq <= new,
    in sequence order; inside the ingest transaction. A malformed one is counted and logged."""
    moved = json.dumps([[device, old, new] for device, old, new in moves if new > old])
    if moved == "[]":
        return
    # One statement for the whole cycle (thousands of devices may move at once), each device's
    # range read through the events' primary key.
    events = await db.fetch(  # the fragment is ours; values are bound
        f"SELECT e.device, e.seq, e.kind, e.body FROM {JSON_ROWS[db.dialect]} m JOIN events e "  # noqa: S608  # the fragment is ours; values are bound
        "ON e.device = m.device AND e.seq > m.lo AND e.seq <= m.hi "
        "WHERE e.kind IN (?, ?) ORDER BY e.device, e.seq", (moved, *CLOCK_EVENTS))
    refused = 0
    for device, seq, kind, body in events:
        problem = await _apply(db, device, int(seq), kind, body)
        if problem:
            refused += 1
            log.warning("rejected (%s): %s's %s event %d %s; its records keep their timestamps",
                        REJECT_REASON, device, kind, seq, problem)
    if refused:
        await db.execute("INSERT INTO rejects(reason, count) VALUES (?, ?) ON CONFLICT(reason) "
                         "DO UPDATE SET count = rejects.count + excluded.count", (REJECT_REASON, refused))


async def _apply(db: Tx, device: str, seq: int, kind: str, body: str) -> str | None:
    """Apply one event; what is wrong with it, if something is."""
    try:
        report = msgspec.json.decode(body, type=ClockCorrected if kind == EventKind.CLOCK_CORRECTED else ClockUnknown)
    except (msgspec.DecodeError, RecursionError) as exc:  # a device's body: anything may be in it
        return f"is not a valid report ({str(exc)[:200]})"
    if not 0 < report.first <= report.last < seq:
        return f"names records {report.first}..{report.last}, not a range before itself"
    if isinstance(report, ClockUnknown):
        await db.execute("UPDATE telemetry SET clock_unknown = 1 WHERE device = ? AND seq BETWEEN ? AND ?",
                         (device, report.first, report.last))
        return None
    if not (math.isfinite(report.shift_s) and abs(report.shift_s) <= MAX_SHIFT_S):
        return f"shifts by {report.shift_s} s"
    last = min(report.last, report.sent_through)
    for table in ("telemetry", "events"):
        await db.execute(f"UPDATE {table} SET ts = ts + ? WHERE device = ? AND seq BETWEEN ? AND ?",  # noqa: S608  # our names
                         (report.shift_s, device, report.first, last))
    return None
