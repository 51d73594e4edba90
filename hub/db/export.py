"""Range reads of the SQLite store's readings, streamed in time order.

The contract every store keeps: `read_telemetry(since, until, device, metric)` yields the
readings with `since <= ts < until` (the start included, the end not, so consecutive ranges
never share a reading), optionally of one device and one metric, ordered by ts, then device,
then seq, in bounded memory however many there are.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Final

import aiosqlite

CHUNK_ROWS: Final = 10_000  # rows fetched from SQLite's thread at a time: memory stays bounded
TelemetryTuple = tuple[str, int, float, str, float, int]  # device, seq, ts, metric, value, clock_unknown


async def read_telemetry(db: aiosqlite.Connection, since: float, until: float, device: str | None,
                         metric: str | None) -> AsyncGenerator[TelemetryTuple, None]:
    """One statement (one consistent snapshot), walked along the ts index in chunks; closing the
    generator (contextlib.aclosing) closes the cursor."""
    query = "SELECT device, seq, ts, metric, value, clock_unknown FROM telemetry WHERE ts >= ? AND ts < ?"
    args: list[object] = [since, until]
    if device is not None:
        query += " AND device = ?"
        args.append(device)
    if metric is not None:
        query += " AND metric = ?"
        args.append(metric)
    async with db.execute(query + " ORDER BY ts, device, seq", args) as cur:
        while rows := await cur.fetchmany(CHUNK_ROWS):
            for row in rows:
                yield (str(row[0]), int(row[1]), float(row[2]), str(row[3]), float(row[4]), int(row[5]))
