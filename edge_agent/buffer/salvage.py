"""What a corrupt outbox, moved aside, still holds: its unsent records, read back to be sent.

The file is opened read-only and left as it was (it is kept for inspection). Rows are read in
sequence order; where a damaged page makes a read fail, the reader searches for the first
sequence number past the damage it can read from, and goes on. A row that comes back
malformed (a value that is not a finite number, an unknown metric, a bad event) is not sent:
the hub would refuse its whole batch. Everything not read back is counted as lost. A file of
another schema version (a newer agent's) is not read at all: its rows may mean something else.
"""

from __future__ import annotations

import contextlib
import math
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from edgefleet.wire.protocol import MAX_EVENT_BODY, MAX_SEQ, METRIC_PATTERN

CHUNK: Final = 5_000  # rows read (and re-committed) at a time: a large outbox never sits in memory whole
_KIND_MAX: Final = 64  # as the hub's EventRecord allows

Reading = tuple[int, float, str, float]  # seq, ts, metric name, value
Event = tuple[int, float, str, str]  # seq, ts, kind, body


@dataclass
class Found:
    """What was read back, so far."""

    acked: int | None = None  # the old outbox's acknowledgment, None when its meta is unreadable
    last_seq: int | None = None
    claimed: int | None = None  # unsent rows it says it holds, None when it cannot count them
    recovered: int = 0

    def lost(self) -> int | None:
        """Unsent records not read back: exact when the old outbox could count them, else an
        upper bound from its unsent range (readings shed earlier are in it too); None if unknown."""
        if self.claimed is not None:
            return max(0, self.claimed - self.recovered)
        if self.acked is not None and self.last_seq is not None:
            return max(0, self.last_seq - self.acked - self.recovered)
        return None


class DamagedOutbox:
    """`with DamagedOutbox(path) as old:` then `old.unsent()`; every call blocks (run it on a thread)."""

    def __init__(self, path: Path, schema: int) -> None:
        self.found = Found()
        self._db: sqlite3.Connection | None = None
        self._names: dict[object, str] = {}
        with contextlib.suppress(sqlite3.Error):
            # Used from whichever worker thread the caller's asyncio.to_thread picks, one call at a time.
            self._db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1.0, check_same_thread=False)
        if self._db is None:
            return
        if self._query("PRAGMA user_version") != [(schema,)]:
            self._db.close()
            self._db = None
            return
        meta = self._query("SELECT key, value FROM meta")
        if meta is not None:
            values = {k: v for k, v in meta if isinstance(k, str) and isinstance(v, int)}
            self.found.acked, self.found.last_seq = values.get("acked", 0), values.get("last_seq")
        names = self._query("SELECT id, name FROM metrics")
        self._names = {i: n for i, n in names or [] if isinstance(n, str) and METRIC_PATTERN.fullmatch(n)}
        if self.found.acked is not None:
            count = self._query("SELECT count(*) FROM records WHERE seq > ?", (self.found.acked,))
            self.found.claimed = count[0][0] if count and isinstance(count[0][0], int) else None

    def __enter__(self) -> DamagedOutbox:
        return self

    def __exit__(self, *_: object) -> None:
        if self._db is not None:
            self._db.close()

    def _query(self, sql: str, parameters: tuple[int, ...] = ()) -> list[tuple[object, ...]] | None:
        assert self._db is not None
        try:
            return self._db.execute(sql, parameters).fetchall()
        except sqlite3.Error:
            return None

    def unsent(self) -> Iterator[tuple[list[Reading], list[Event]]]:
        """The records above the old acknowledgment (all of them when it is unknown), in chunks."""
        if self._db is None:
            return
        cursor: int | None = self.found.acked or 0
        while cursor is not None:
            rows: list[tuple[object, ...]] = []
            damaged = False
            try:
                for row in self._db.execute("SELECT seq, ts, metric, value, kind, body FROM records "
                                            "WHERE seq > ? ORDER BY seq LIMIT ?", (cursor, CHUNK)):
                    rows.append(row)
            except sqlite3.Error:
                damaged = True
            if rows:
                last = rows[-1][0]
                cursor = last if isinstance(last, int) else None
                yield self._usable(rows)
            if damaged and cursor is not None:
                cursor = self._past_damage(cursor)
            elif len(rows) < CHUNK:
                return

    def _usable(self, rows: list[tuple[object, ...]]) -> tuple[list[Reading], list[Event]]:
        """The rows the hub would take, as readings and events; the others are left out (lost)."""
        readings: list[Reading] = []
        events: list[Event] = []
        for seq, ts, metric, value, kind, body in rows:
            if not (isinstance(seq, int) and 0 < seq <= MAX_SEQ and isinstance(ts, float) and math.isfinite(ts)):
                continue
            if metric is not None:
                name = self._names.get(metric) if isinstance(metric, int) else None
                if name is not None and isinstance(value, float) and math.isfinite(value):
                    readings.append((seq, ts, name, value))
            elif (isinstance(kind, str) and 0 < len(kind) <= _KIND_MAX and isinstance(body, str)
                  and len(body) <= MAX_EVENT_BODY):
                events.append((seq, ts, kind, body))
        self.found.recovered += len(readings) + len(events)
        return readings, events

    def _readable_after(self, seq: int) -> bool:
        return self._query("SELECT seq FROM records WHERE seq > ? ORDER BY seq LIMIT 1", (seq,)) is not None

    def _past_damage(self, cursor: int) -> int | None:
        """The smallest seq above `cursor` from which rows can be read again (a seek past the
        damaged pages), or None when none can: growing steps to get past it, then halving back."""
        ceiling = max(self.found.last_seq or 0, cursor) if self.found.last_seq else MAX_SEQ - 1
        bad, step = cursor, 1
        while not self._readable_after(good := min(cursor + step, ceiling)):
            if good >= ceiling:
                return None
            bad, step = good, step * 2
        while good - bad > 1:
            middle = (bad + good) // 2
            bad, good = (bad, middle) if self._readable_after(middle) else (middle, good)
        return good
