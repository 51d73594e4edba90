"""The outbox: every reading and event, in SQLite, until the hub acknowledges it.

- One writer. Readings are buffered for at most COMMIT_INTERVAL and committed in one
  transaction (never one per row: SD cards wear out). Events are committed before
  `add_event` returns: an audit record must exist before the action it describes.
- Sequence numbers are assigned here, only grow, and survive restarts: the last one is
  committed with the rows, and a reservation file (hi/lo) keeps them growing even when a
  corrupt outbox has to be replaced.
- Rows are deleted only up to the hub's end-to-end acknowledgment.
- Over quota, raw telemetry is shed (events never): see `_shed` and docs/store-and-forward.md.
- A corrupt outbox is moved aside, reported, and a new one started; never deleted. What it
  still holds unsent is read back (`edge_agent.buffer.salvage`) and sent; what it does not is counted.
- A lock, a full or a read-only disk is not corruption: it is waited out. Meanwhile readings
  wait in memory (bounded: the oldest are dropped and counted past MEMORY_ROWS) and events
  too (never dropped); on a full disk the oldest unsent telemetry makes room.
- Records are stamped by a RecordClock (edge_agent/identity/clock.py): those stamped before the wall
  clock was set are moved when it is, here if unsent, at the hub (a `clock_corrected` event)
  if maybe sent; see `_clock_changed`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import math
import secrets
import sqlite3
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Final, NamedTuple

from edge_agent.buffer import salvage
from edge_agent.buffer.disk import Ballast, Trouble, corrupt, trouble
from edge_agent.buffer.machine import fingerprint, machine_number
from edge_agent.buffer.sqlite_pool import PooledConnection, connect
from edge_agent.identity.clock import SYSTEM_CLOCKS, Change, Frame, Probes, RecordClock, Shift
from edge_agent.sense.sensors import Reading
from edgefleet.errors import TransientError
from edgefleet.runtime.files import write_atomic
from edgefleet.runtime.sqlite import immediate, to_completion
from edgefleet.wire.events import EventKind
from edgefleet.wire.protocol import MAX_EVENT_BODY, json_too_deep

COMMIT_INTERVAL: Final = 0.1  # the longest a reading waits in memory before it is durable
COMMIT_ROWS: Final = 50_000  # ...or sooner, once this many wait (a burst is committed early; add() never blocks)
# With nothing to commit the flusher sleeps until there is, waking this often only to show the
# watchdog it is alive: an idle agent (or 2,000 simulated ones in a process) costs no CPU.
IDLE_BEAT: Final = 1.0
# A commit still unfinished after this long is logged once: a failing SD card, or another process
# holding outbox.db open in a write transaction (the commit waits up to the 5 s busy timeout).
SLOW_COMMIT: Final = 1.0
# A commit that failed on such a lock (past the 5 s busy timeout) is tried again this often,
# its records kept in memory, while they number at most COMMIT_ROWS (as many as a burst puts
# there anyway); past that the error is raised and the agent exits.
BUSY_RETRY: Final = 1.0
# While the disk is full or read-only, a commit is tried again this often; readings wait in
# memory meanwhile, at most MEMORY_ROWS of them (about 5 MB): past that the oldest tenth is
# dropped at once (counted per metric; dropping them one by one would copy the buffer per sample).
UNWRITABLE_RETRY: Final = 1.0
MEMORY_ROWS: Final = COMMIT_ROWS
# An outbox that cannot be opened yet (locked, or its disk full or read-only) is tried again this often.
OPEN_RETRY: Final = 1.0
RESERVE_STEP: Final = 1_000_000  # sequence numbers reserved per reservation-file write
QUOTA_TARGET: Final = 0.9  # shedding frees down to this share of the quota, so it does not run every commit
SCHEMA_VERSION: Final = 1
DB_NAME: Final = "outbox.db"
# Disk space held back in outbox.ballast and given up when the disk fills: room for SQLite to
# checkpoint its WAL (which grows to about 4 MB, 1,000 pages, between checkpoints) before the
# oldest readings can be deleted to make room. Taken again once the disk takes writes.
BALLAST_NAME: Final = "outbox.ballast"
BALLAST_BYTES: Final = 4 * 1024 * 1024
# Rows deleted to make room beyond those waiting: a page is free only once all its rows are gone.
ROOM_SLACK: Final = 1_000

log = logging.getLogger(__name__)

_SCHEMA: Final = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE metrics (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE);
CREATE TABLE records (
    seq INTEGER PRIMARY KEY,
    ts REAL NOT NULL,
    metric INTEGER,            -- telemetry: metrics.id; NULL for events
    value REAL,
    kind TEXT,                 -- events: the event kind; NULL for telemetry
    body TEXT
);
CREATE TABLE shed (metric TEXT PRIMARY KEY, count INTEGER NOT NULL);
"""


class Record(NamedTuple):
    """A committed row as the uplink reads it."""

    seq: int
    ts: float
    metric: str | None
    value: float | None
    kind: str | None
    body: str | None


@dataclass
class ShedReport:
    dropped: int
    by_metric: dict[str, int]


class OutboxCorrupt(Exception):
    pass


class OutboxUnwritable(TransientError):
    """The disk is full or read-only: records wait in memory until it takes them again."""

    def __init__(self, path: Path, why: Trouble) -> None:
        super().__init__(f"cannot write {path}: {why.value}")
        self.why = why


class Outbox:
    """Start with `await Outbox.open(dir, quota_bytes)`; run `flusher()` as a task; `close()`."""

    def __init__(self, db: PooledConnection, path: Path, quota_bytes: int, meta: dict[str, int],
                 metrics: dict[str, int], rows: int, synchronous: str, probes: Probes = SYSTEM_CLOCKS) -> None:
        self._db, self.path, self.quota_bytes = db, path, quota_bytes
        self._metric_ids = metrics
        self._metric_names = {v: k for k, v in metrics.items()}
        self._new_metrics: list[tuple[int, str]] = []
        self.last_seq = meta.get("last_seq", 0)  # committed
        self._next_seq = self.last_seq + 1
        self.acked = meta.get("acked", 0)
        self._reserved = meta.get("reserved", 0)
        self._thin_floor = meta.get("thin_floor", 0)
        self.dropped = meta.get("dropped", 0)
        self.corrupt_outboxes = meta.get("corrupt_outboxes", 0)
        # Which outbox numbered the records, on which machine, and through which seq another one did
        # (docs/store-and-forward.md, "Cloned devices"); set by _claim when the outbox opens.
        self.instance = meta.get("instance", 0)
        self._machine = meta.get("machine", 0)
        self.inherited = meta.get("inherited", 0)
        self.rows = rows
        self._buffer: list[tuple[int, float, int, float]] = []
        self._held_events: list[tuple[int, float, str, str]] = []  # numbered, in a commit that failed
        self._beat: Callable[[], None] = lambda: None  # the flusher's, also while a commit is retried
        self._ack_pending: int | None = None
        self.protect_through = 0  # shedding never touches seq <= this (sent, awaiting ack)
        self._watchers: list[asyncio.Event] = []  # set after each commit that added rows
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self._synchronous = synchronous
        # The clock that stamps records, and what its changes still owe the disk and the hub.
        self._probes = probes
        self.clock = RecordClock(_frame(meta), lambda: self.next_seq, self._clock_changed, probes)
        self.before_clock_change: Callable[[], None] = lambda: None  # the agent adds what it holds back
        self._clock_work: list[_ClockChange] = []
        self._frame_meta: dict[str, int] | None = None  # the frame to store at the next commit
        # Every record an earlier run had committed may have reached the hub, as may every record
        # read_after handed out since: the hub corrects those, the outbox only the others.
        self.handed_through = self.last_seq
        self._restamping = False  # a commit that moves timestamps is running
        self._restamps = 0  # such commits finished
        self._ballast = Ballast(path.with_name(BALLAST_NAME), BALLAST_BYTES)
        self.unwritable: Trouble | None = None  # set while the disk refuses commits
        self._trouble_since: float | None = None  # the first failure of this outage
        self._room_checked = 0.0  # when the ballast was last tried again, on a full disk
        self._unwritable_failures = 0
        self._dropped_while_unwritable = 0
        self._memory_shed: collections.Counter[str] = collections.Counter()  # dropped from memory, not yet on disk
        self._memory_shed_through = 0  # the highest seq dropped from memory: numbers below it are used
        self._memory_shed_logged = False

    # --- lifecycle ------------------------------------------------------------------

    @classmethod
    async def open(cls, state_dir: Path, quota_bytes: int, synchronous: str = "full",
                   probes: Probes = SYSTEM_CLOCKS, machine: int | None = None, *,
                   ballast_bytes: int = BALLAST_BYTES) -> Outbox:
        """Open the outbox, or start one; while another process holds it locked, or its disk is
        full or read-only, say so (WARNING once, then DEBUG) and try again every OPEN_RETRY.
        `ballast_bytes` of disk are held back for a full disk (0: none). `machine`: edge_agent.buffer.machine's
        number for this board (None: read from the hardware)."""
        failures = 0
        aside: list[tuple[Path, str]] = []  # moved aside by an attempt that failed after: the next one replaces it
        while True:
            try:
                outbox = await cls._open(state_dir, quota_bytes, synchronous, aside, probes, machine)
                outbox._ballast.size = ballast_bytes
            except (sqlite3.OperationalError, OSError, OutboxUnwritable) as error:
                # OutboxUnwritable: taking over a corrupt outbox's records ran out of room.
                why = error.why if isinstance(error, OutboxUnwritable) else trouble(error, state_dir)
                if why is None:
                    raise
                if why is Trouble.FULL and await asyncio.to_thread(Ballast(state_dir / BALLAST_NAME, 0).release) > 0:
                    log.warning("outbox: the disk is full: gave up the space held back for this (%s), to start",
                                BALLAST_NAME)
                    continue
                failures += 1
                (log.warning if failures == 1 else log.debug)(
                    "outbox: cannot open %s yet: %s (%s); nothing is moved or lost, trying again every %g s",
                    state_dir / DB_NAME, why.value, error, OPEN_RETRY)
                await asyncio.sleep(OPEN_RETRY)
                continue
            if failures:
                log.warning("outbox: opened %s, after %d failed attempts", outbox.path, failures)
            await asyncio.to_thread(outbox._ballast.restore)  # if the disk can spare it
            return outbox

    @classmethod
    async def _open(cls, state_dir: Path, quota_bytes: int, synchronous: str,
                    aside: list[tuple[Path, str]], probes: Probes, machine: int | None) -> Outbox:
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = state_dir / DB_NAME
        try:
            db = await cls._connect(path, synchronous)
        except OutboxCorrupt as exc:
            aside.append((_move_aside(path), str(exc)))
            db = await cls._connect(path, synchronous)
        moved = aside[-1] if aside else None
        try:
            meta = dict(await db.fetchall("SELECT key, value FROM meta"))
            metrics = {name: mid for mid, name in await db.fetchall("SELECT id, name FROM metrics")}
            row = await db.fetchone("SELECT count(*) FROM records")
            outbox = cls(db, path, quota_bytes, meta, metrics, int(row[0]) if row else 0, synchronous, probes)
            reserved = _read_reservation(state_dir)
            if outbox.last_seq < reserved and (moved is not None or outbox.last_seq == 0):
                # A replaced (or removed) outbox: continue above every number that could have
                # been committed; the uplink declares everything up to here settled.
                outbox.last_seq = outbox.acked = reserved
                outbox._next_seq = reserved + 1
            outbox._reserved = max(outbox._reserved, reserved)
            await outbox._claim(machine_number(fingerprint()) if machine is None else machine)
            if moved is not None:
                await outbox._replace(*moved)
                aside.clear()
            outbox.handed_through = outbox.last_seq
            outbox.clock.start()
            if outbox._clock_work:  # the hub must hear of it; a new frame alone goes with the first records
                await outbox.flush()
        except BaseException:
            await db.close()
            raise
        return outbox

    async def _replace(self, moved_to: Path, reason: str) -> None:
        """A new outbox in place of a corrupt one: take over what it still holds unsent, count
        what it does not, and tell the hub (the `outbox_corrupt` event, above every number)."""
        self.corrupt_outboxes += 1
        log.error("outbox %s was corrupt (%s); moved it to %s and started a new one", self.path, reason, moved_to)
        with await asyncio.to_thread(salvage.DamagedOutbox, moved_to, SCHEMA_VERSION) as old:
            chunks = old.unsent()
            while (chunk := await asyncio.to_thread(next, chunks, None)) is not None:
                await self._restore(*chunk)
            found = old.found
        lost = found.lost()
        if found.recovered:
            # Send from below the first record read back; what is missing between is counted lost.
            first, top = await self._db.fetchone("SELECT min(seq), max(seq) FROM records")
            self.acked = int(first) - 1
            # Numbered by the outbox they come from, not by this one (a new instance): the hub stores
            # each once whoever sends it, and judges this instance by its own records above them
            # (docs/store-and-forward.md, "Cloned devices"), so they are not taken for a clone's.
            self.inherited = max(self.inherited, int(top))
            await self._db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('inherited', ?)",
                                   (self.inherited,))
            log.warning("outbox: read back %d unsent records from %s; they are sent as usual",
                        found.recovered, moved_to)
        self.dropped += lost or 0
        if lost:
            log.error("outbox: %d unsent records of %s could not be read back: counted as dropped", lost, moved_to)
        await self.add_event(EventKind.OUTBOX_CORRUPT, {
            "moved_to": str(moved_to), "reason": reason, "resumed_after_seq": self.last_seq,
            "recovered": found.recovered, "lost": lost, "lost_exact": found.claimed is not None,
            "unsent_after_seq": found.acked, "old_last_seq": found.last_seq})

    async def _restore(self, readings: list[salvage.Reading], events: list[salvage.Event]) -> None:
        """Records read back from a corrupt outbox, with their own numbers (all below ours); those
        an earlier, interrupted attempt already took over are skipped."""
        if not (readings or events):
            return
        seqs = [r[0] for r in readings] + [e[0] for e in events]
        top = max(seqs)
        if top >= self._next_seq:  # no reservation file survived: go on above them
            self.last_seq, self._next_seq = top, top + 1
        have = {s for (s,) in await self._db.fetchall("SELECT seq FROM records WHERE seq BETWEEN ? AND ?",
                                                       (min(seqs), top))}
        readings = [r for r in readings if r[0] not in have]
        events = [e for e in events if e[0] not in have]
        ids = self._metric_ids
        self._buffer += [(seq, ts, ids.get(name) or self._intern(name), value) for seq, ts, name, value in readings]
        self._held_events += events
        async with self._lock:
            await self._commit_patiently()

    @staticmethod
    async def _probe(path: Path) -> int:
        """Integrity and schema version, read-only: a file we refuse leaves here unchanged
        (a read-write connection would checkpoint its WAL into it when closed)."""
        if not path.exists():
            return 0
        try:
            db = await connect(f"file:{path}?mode=ro", uri=True)
        except sqlite3.OperationalError:
            return -1  # cannot probe read-only (no -shm yet): the read-write open checks instead
        try:
            return await _checked_version(db, integrity=True)
        except sqlite3.DatabaseError as exc:
            if corrupt(exc):
                raise OutboxCorrupt(str(exc)) from None
            if trouble(exc, path.parent) is Trouble.LOCKED:
                raise
            return -1  # cannot read it read-only (a WAL without its -shm): the read-write open checks instead
        finally:
            await db.close()

    @classmethod
    async def _connect(cls, path: Path, synchronous: str) -> PooledConnection:
        probed = await cls._probe(path)
        db = await connect(path, isolation_level=None)
        try:
            version = await _checked_version(db, integrity=probed < 0)
            await db.execute("PRAGMA journal_mode = WAL")
            # FULL: a commit survives power loss too, not only a crash; the WAL is
            # appended sequentially and commits are at most ten a second.
            await db.execute(f"PRAGMA synchronous = {'FULL' if synchronous == 'full' else 'NORMAL'}")
            if version == 0:
                await db.executescript(f"BEGIN; {_SCHEMA} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;")
            # SQLite opens a file it cannot write (a read-only file system) read-only, for good:
            # better to wait for a writable one here than to find out at every commit. A write
            # that changes nothing, rolled back, tells (BEGIN IMMEDIATE alone does not).
            await db.executescript(f"BEGIN IMMEDIATE; PRAGMA user_version = {version or SCHEMA_VERSION}; ROLLBACK;")
        except sqlite3.DatabaseError as exc:
            await db.close()
            if not corrupt(exc):
                raise  # locked, or the disk: not the file's fault
            raise OutboxCorrupt(str(exc)) from None
        except BaseException:
            await db.close()
            raise
        return db

    async def _claim(self, machine: int) -> None:
        """Give a new outbox its random instance id, and an outbox found on another machine than
        the one it was made on (a cloned SD card) a new one: its records so far were numbered
        there, and the board it came from goes on numbering from the same point."""
        if self.instance and self._machine == machine:
            return
        if self.instance:
            self.inherited = max(self.inherited, self.last_seq)
            log.warning("outbox %s was made on another machine (a cloned image?): it becomes a new instance; "
                        "records through seq %d were numbered there", self.path, self.inherited)
        self.instance, self._machine = secrets.randbits(63) or 1, machine
        await self._db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('instance', ?), ('machine', ?), "
                               "('inherited', ?)", (self.instance, machine, self.inherited))

    @property
    def machine(self) -> int:
        """The number of the machine this outbox instance numbers records on."""
        return self._machine

    async def renumber(self, keep_through: int, resume_after: int) -> int | None:
        """The hub refused our numbers above `keep_through` (another machine uses them with our
        certificate): move every record above it, buffered or committed, to above `resume_after`,
        in order, in one transaction. Returns how many committed records moved; None when an
        earlier identical request already moved them."""
        async with self._lock:
            if self._next_seq > resume_after:
                return None
            shift = resume_after - keep_through
            self._buffer = [(q + shift if q > keep_through else q, t, m, v) for q, t, m, v in self._buffer]
            self._held_events = [(q + shift if q > keep_through else q, t, k, b) for q, t, k, b in self._held_events]
            self._next_seq = max(self._next_seq + shift, resume_after + 1)
            last = self.last_seq + shift if self.last_seq > keep_through else resume_after
            if self._thin_floor > keep_through:
                self._thin_floor += shift
            self.protect_through = min(self.protect_through, keep_through)
            self.inherited = max(self.inherited, keep_through)
            await self._reserve(max(last, self._next_seq))
            meta = {"last_seq": last, "inherited": self.inherited, "thin_floor": self._thin_floor}
            return await to_completion(self._renumbered(keep_through, shift, meta))

    async def _renumbered(self, above: int, shift: int, meta: dict[str, int]) -> int:
        moved: int = await self._db.run(lambda db: _renumber(db, above, shift, meta))
        self.last_seq = meta["last_seq"]
        return moved

    async def close(self) -> None:
        try:
            await self.flush()
        except OutboxUnwritable as exc:
            log.error("outbox: stopping while %s: %d readings and %d events that waited in memory are lost",
                      exc.why.value, len(self._buffer), len(self._held_events))
        finally:
            await self._db.close()

    # --- writing --------------------------------------------------------------------

    def add(self, readings: Iterable[Reading]) -> None:
        """Take readings; they are durable at the next commit (within COMMIT_INTERVAL)."""
        ids = self._metric_ids
        first = seq = self._next_seq
        buffer = self._buffer
        was_empty = not buffer
        for metric, ts, value in readings:
            mid = ids.get(metric)
            if mid is None:
                mid = self._intern(metric)
            buffer.append((seq, ts, mid, value))
            seq += 1
        self._next_seq = seq
        if (was_empty and seq > first) or len(buffer) >= COMMIT_ROWS:
            self._wake.set()  # the first reading starts the COMMIT_INTERVAL clock; a full buffer ends it
        if len(buffer) > MEMORY_ROWS and self.unwritable is not None:
            self._drop_from_memory()

    def _intern(self, metric: str) -> int:
        mid = len(self._metric_ids) + 1
        self._metric_ids[metric] = mid
        self._metric_names[mid] = metric
        self._new_metrics.append((mid, metric))
        return mid

    async def add_event(self, kind: EventKind, body: dict[str, object], *,
                        otherwise: tuple[EventKind, dict[str, object]] | None = None) -> int:
        """Commit an event record now (with everything buffered before it); return its seq."""
        return (await self.add_events([(kind, body)], otherwise=None if otherwise is None else [otherwise]))[-1]

    async def add_events(self, events: list[tuple[EventKind, dict[str, object]]], *,
                         otherwise: list[tuple[EventKind, dict[str, object]]] | None = None) -> list[int]:
        """Commit event records now, in one transaction; return their seqs.

        While the disk is full or read-only they wait in memory instead (never dropped) and are
        committed first when it takes writes again; this returns at once. A caller about to act
        on the records passes `otherwise`, as many records to keep in their place: then they are
        kept instead, and OutboxUnwritable is raised, so that no action runs before its audit
        record is on disk.
        """
        async with self._lock:
            rows = []
            for kind, body in events:
                ts = self.clock.now()  # first: a clock change it reports takes its number before this record
                rows.append((self._next_seq, ts, kind, _body(body)))
                self._next_seq += 1
            self._held_events += rows
            try:
                await self._commit_patiently()
            except OutboxUnwritable:
                if otherwise is None:
                    return [r[0] for r in rows]
                assert len(otherwise) == len(rows), "one record in place of each"
                instead = {seq: (seq, ts, kind, _body(body))
                           for (seq, ts, *_), (kind, body) in zip(rows, otherwise, strict=True)}
                self._held_events = [instead.get(e[0], e) for e in self._held_events]
                raise
        return [r[0] for r in rows]

    def watch(self, event: asyncio.Event) -> None:
        """Set `event` after each commit that adds records (the uplink sleeps on it)."""
        self._watchers.append(event)

    def acknowledge(self, through: int) -> None:
        """The hub has committed everything <= through: delete it at the next commit."""
        if through > self.acked:
            self.acked = through
            self._ack_pending = through
            self._wake.set()

    async def flush(self) -> None:
        async with self._lock:
            if self._to_commit():
                await self._commit_patiently()

    async def _commit_patiently(self) -> None:
        """Commit; while another process holds the database (SQLITE_BUSY), try again every
        BUSY_RETRY with everything kept in memory (events too: their numbers are taken), and
        beat meanwhile: waiting on a lock is not a hang. On a full disk, give up the ballast, then
        delete the oldest readings, trying again after each; a full or read-only disk then
        raises OutboxUnwritable, everything still in memory (bounded: _drop_from_memory).
        Other errors, or more than COMMIT_ROWS readings waiting on a lock, are raised. Callers
        hold self._lock."""
        failures = 0
        # On a full disk, each in turn until a commit goes through: the ballast, then old readings.
        room = [self._give_up_ballast, self._make_room]
        while True:
            try:
                await to_completion(self._commit(report_slow=not failures))  # once is enough
            except (sqlite3.OperationalError, OSError) as error:
                why = trouble(error, self.path.parent)
                if why is Trouble.FULL or why is Trouble.READ_ONLY:
                    self._note_unwritable(why, error)
                    while why is Trouble.FULL and room:
                        if await room.pop(0)():
                            break
                    else:
                        self._drop_from_memory()
                        raise OutboxUnwritable(self.path, why) from None
                    continue
                if why is not Trouble.LOCKED:
                    raise
                if len(self._buffer) > COMMIT_ROWS:
                    log.error("outbox: %d readings wait in memory and %s is still locked: giving up",
                              len(self._buffer), self.path)
                    raise
                failures += 1
                (log.warning if failures == 1 else log.debug)(
                    "outbox: cannot commit (%s); %d readings and %d events wait in memory, trying again "
                    "every %g s", error, len(self._buffer), len(self._held_events), BUSY_RETRY)
                self._beat()
                await asyncio.sleep(BUSY_RETRY)
                continue
            if failures:
                log.warning("outbox: committed again, after %d failed attempts", failures)
            if self.unwritable is not None:
                await self._writable_again()
            return

    async def _writable_again(self) -> None:
        """After a commit went through. A read-only disk is over; a full one only once the ballast
        can be taken again (until then each commit makes its own room: the outbox stops growing)."""
        if self.unwritable is Trouble.FULL:
            now = time.monotonic()
            if now - self._room_checked < UNWRITABLE_RETRY:
                return
            self._room_checked = now
            if not await asyncio.to_thread(self._ballast.restore):
                return
        log.warning("outbox: %s takes writes again: %d commits failed over %.0f s, %d readings were dropped "
                    "(oldest first)", self.path, self._unwritable_failures,
                    time.monotonic() - (self._trouble_since or 0.0), self._dropped_while_unwritable)
        self.unwritable, self._trouble_since, self._unwritable_failures = None, None, 0
        self._memory_shed_logged = False

    def _note_unwritable(self, why: Trouble, error: BaseException) -> None:
        first = self._trouble_since is None
        if first:
            self._trouble_since, self._dropped_while_unwritable = time.monotonic(), 0
        self.unwritable = why
        self._unwritable_failures += 1
        (log.warning if first else log.debug)(
            "outbox: cannot commit to %s: %s (%s); %d readings and %d events wait in memory (past %d readings "
            "the oldest are dropped, events never), trying again every %g s", self.path, why.value, error,
            len(self._buffer), len(self._held_events), MEMORY_ROWS, UNWRITABLE_RETRY)

    async def _give_up_ballast(self) -> bool:
        released = await asyncio.to_thread(self._ballast.release)
        if released:
            log.warning("outbox: the disk is full: gave up the %.0f MB held back for this", released / 2**20)
        return released > 0

    async def _make_room(self) -> bool:
        """On a full disk: delete the oldest unsent telemetry outright (never events, never what
        was sent), as many rows as wait in memory; True if some went. Thinning would rewrite
        rows, which takes space the disk does not have."""
        need = len(self._buffer) + len(self._held_events) + ROOM_SLACK
        try:
            # One call on the database's thread: cancelling us cannot split its transaction.
            protect, dropped = self.protect_through, self.dropped
            shed = await self._db.run(lambda db: _make_room(db, need, protect, dropped))
        except (sqlite3.OperationalError, OSError) as error:
            log.debug("outbox: could not make room either (%s)", error)
            return False
        if not shed:
            return False
        victims = sum(shed.values())
        self.rows -= victims
        self.dropped += victims
        self._made_room(shed)
        return True

    def _made_room(self, shed: dict[str, int]) -> None:
        self._dropped_while_unwritable += sum(shed.values())
        (log.warning if not self._memory_shed_logged else log.debug)(
            "outbox: the disk is full: dropped the %d oldest unsent readings to make room (%s); while it "
            "stays full, each commit drops as many as it adds beyond the room acknowledged ones left",
            sum(shed.values()), _summary(shed))
        self._memory_shed_logged = True

    def _drop_from_memory(self) -> None:
        """Past MEMORY_ROWS readings waiting for the disk, drop the oldest tenth (events are never
        dropped), counted per metric; the counts reach the disk with the next commit."""
        excess = len(self._buffer) - MEMORY_ROWS
        if excess <= 0:
            return
        excess = max(excess, MEMORY_ROWS // 10)
        dropped, self._buffer = self._buffer[:excess], self._buffer[excess:]
        counts = collections.Counter(self._metric_names[mid] for _, _, mid, _ in dropped)
        self._memory_shed.update(counts)
        self._memory_shed_through = max(self._memory_shed_through, max(seq for seq, *_ in dropped))
        self._dropped_while_unwritable += len(dropped)
        (log.warning if not self._memory_shed_logged else log.debug)(
            "outbox: %d readings wait in memory for the disk (%s); dropped the %d oldest (%s)",
            len(self._buffer) + len(dropped), self.unwritable.value if self.unwritable else "?", len(dropped),
            _summary(dict(counts)))
        self._memory_shed_logged = True

    async def flusher(self, beat: Callable[[], None] = lambda: None) -> None:
        """Commit readings within COMMIT_INTERVAL of their arrival (at once once COMMIT_ROWS wait, or
        an acknowledgment does); sleep while nothing waits. `beat` each turn, at least every IDLE_BEAT."""
        loop = asyncio.get_running_loop()
        self._beat = beat
        while True:
            beat()
            self._wake.clear()
            if not self._to_commit():
                if self.unwritable is Trouble.FULL:
                    await self._writable_again()  # has the disk room again, with nothing to commit?
                await self._woken(loop.time() + IDLE_BEAT)
                continue
            # An acknowledgment is committed at once (its rows leave the disk, and the uplink's
            # window moves on); readings wait up to COMMIT_INTERVAL for company.
            deadline = loop.time() + COMMIT_INTERVAL
            while self._ack_pending is None and len(self._buffer) < COMMIT_ROWS and loop.time() < deadline:
                self._wake.clear()
                await self._woken(deadline)
            try:
                await self.flush()
            except OutboxUnwritable:
                # Records stay in memory (bounded); sampling and deciding go on meanwhile.
                await asyncio.sleep(UNWRITABLE_RETRY)

    def _to_commit(self) -> bool:
        return bool(self._buffer or self._held_events or self._ack_pending is not None or self._new_metrics
                    or self._clock_work or self._frame_meta is not None)

    async def _woken(self, deadline: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout_at(deadline):
                await self._wake.wait()

    async def _commit(self, report_slow: bool = True) -> None:
        rows, self._buffer = self._buffer, []
        metrics, self._new_metrics = self._new_metrics, []
        events, self._held_events = self._held_events, []
        changes, self._clock_work = self._clock_work, []
        frame_meta, self._frame_meta = self._frame_meta, None
        clock = self._clock_write(changes, frame_meta)
        ack = self._ack_pending
        memory_shed = dict(self._memory_shed)
        last = max(rows[-1][0] if rows else 0, events[-1][0] if events else 0,
                   max((e[0] for e in clock.events), default=0) if clock else 0, self.last_seq,
                   self._memory_shed_through)
        log.debug("outbox: committing %d readings%s%s", len(rows), f" and {len(events)} events" if events else "",
                  f", deleting through {ack}" if ack is not None else "")
        work = _Write(rows=rows, events=events, metrics=metrics, ack=ack, last=last, acked=self.acked,
                      records=self.rows, dropped=self.dropped, thin_floor=self._thin_floor,
                      protect_through=self.protect_through, quota_bytes=self.quota_bytes,
                      corrupt_outboxes=self.corrupt_outboxes, clock=clock, memory_shed=memory_shed,
                      room=self.unwritable is Trouble.FULL)
        slow = asyncio.get_running_loop().call_later(
            SLOW_COMMIT, log.warning, "outbox: a commit of %d records has taken over %g s so far (a slow disk, "
            "or another process holds a write lock on %s)", len(rows) + len(events), SLOW_COMMIT, self.path,
        ) if report_slow else None
        try:
            await self._reserve(last)
            # The whole transaction in one call on the database's thread: one hand-over, not ten.
            done = await self._db.run(lambda db: _write(db, work))
        except BaseException:
            # Nothing was committed: put everything back so the next commit retries it.
            self._buffer[:0] = rows
            self._new_metrics[:0] = metrics
            self._held_events[:0] = events
            self._clock_work[:0] = changes
            if self._frame_meta is None:
                self._frame_meta = frame_meta
            raise
        finally:
            if slow is not None:
                slow.cancel()
            if clock is not None and clock.restamps:
                self._restamping = False
                self._restamps += 1
        self.rows, self.dropped, self._thin_floor = done.records, done.dropped, done.thin_floor
        self._memory_shed.subtract(memory_shed)
        self._memory_shed = +self._memory_shed  # drops counted on disk now leave the in-memory count
        if ack is not None and self._ack_pending == ack:
            self._ack_pending = None
        self.last_seq = last
        if done.room:
            self._made_room(done.room)
        if done.shed:
            log.warning("outbox over its %.1f MB quota: shed %d telemetry readings (%s)",
                        self.quota_bytes / 1e6, sum(done.shed.values()), _summary(done.shed))
        elif done.stuck:
            log.warning("outbox over quota but holds no telemetry it may shed (events are never shed)")
        if rows or events:
            for watcher in self._watchers:
                watcher.set()

    async def _reserve(self, last: int) -> None:
        if last <= self._reserved:
            return
        self._reserved = last + RESERVE_STEP
        await asyncio.to_thread(_write_reservation, self.path.parent, self._reserved)

    # --- the clock ----------------------------------------------------------------------

    def _clock_changed(self, change: Change | None, frame: Frame | None) -> None:
        """The RecordClock's news, before the stamp that brought it is used: a change covers every
        record numbered so far (and what the agent still holds back), and its event takes the next
        number. The timestamps move, and the frame is stored, at the next commit."""
        if change is not None:
            self.before_clock_change()
            seq = self._next_seq
            self._next_seq += 1
            self._clock_work.append(_ClockChange(change, seq - 1, seq, self._probes.realtime()))
        self._frame_meta = _frame_meta(frame)
        self._wake.set()

    def _clock_write(self, changes: list[_ClockChange], frame_meta: dict[str, int] | None) -> _ClockWrite | None:
        """A commit's share of the clock's changes. Records read_after handed out may be at the hub
        already: those are moved there (the event says which), the others here."""
        if not changes and frame_meta is None:
            return None
        sent = self.handed_through
        restamps: list[tuple[int, int, float]] = []
        events: list[tuple[int, float, str, str]] = []
        body: dict[str, object]
        for change, last, seq, ts in changes:
            if isinstance(change, Shift):
                if last > sent:
                    restamps.append((max(change.first - 1, sent), last, change.seconds))
                kind = EventKind.CLOCK_CORRECTED
                body = {"first": change.first, "last": last, "shift_s": change.seconds, "sent_through": sent,
                        "clock_good": change.closes}
                log.warning("outbox: the system clock was stepped by %+.3f s; records %d to %d are moved with it%s",
                            change.seconds, change.first, last, "" if change.closes else
                            " (the clock is still not known to be right)")
            else:
                kind = EventKind.CLOCK_UNKNOWN
                body = {"first": change.first, "last": last, "boot": f"{change.boot:016x}"}
                log.warning("outbox: records %d to %d were stamped in an earlier boot before its clock was set; "
                            "they cannot be corrected and are flagged at the hub", change.first, last)
            events.append((seq, ts, kind, json.dumps(body, separators=(",", ":"))))
        self._restamping = bool(restamps)
        return _ClockWrite(restamps, events, frame_meta or {})

    # --- quota ----------------------------------------------------------------------

    async def used_bytes(self) -> int:
        return await self._db.run(_used_bytes)

    async def shed_report(self) -> ShedReport:
        """Readings shed so far, per metric: on disk, and dropped from memory since the last commit."""
        counts = collections.Counter(dict(await self._db.fetchall("SELECT metric, count FROM shed")))
        counts.update(self._memory_shed)
        return ShedReport(self.dropped + self._memory_shed.total(), dict(counts))

    # --- reading --------------------------------------------------------------------

    async def read_after(self, after: int, limit: int) -> list[Record]:
        """Committed records with seq > after, oldest first."""
        names = self._metric_names
        while True:
            restamps = self._restamps
            rows = await self._db.fetchall(
                "SELECT seq, ts, metric, value, kind, body FROM records WHERE seq > ? ORDER BY seq LIMIT ?",
                (after, limit),
            )
            if not self._restamping and restamps == self._restamps:
                break
            async with self._lock:  # timestamps moved meanwhile: read them again once that commit is done
                pass
        if rows:
            self.handed_through = max(self.handed_through, int(rows[-1][0]))
        return [Record(s, t, names.get(m) if m is not None else None, v, k, b) for s, t, m, v, k, b in rows]

    @property
    def next_seq(self) -> int:
        """The number the next record will take."""
        return self._next_seq

    @property
    def backlog(self) -> int:
        """Records not yet acknowledged (committed or waiting to be)."""
        return self.rows + len(self._buffer)


async def _checked_version(db: PooledConnection, *, integrity: bool) -> int:
    """The schema version, after `PRAGMA quick_check` when `integrity`; OutboxCorrupt for a
    failed check or a schema newer than this agent's."""
    if integrity:
        row = await db.fetchone("PRAGMA quick_check")
        if row is None or row[0] != "ok":
            raise OutboxCorrupt(f"integrity check: {row[0] if row else 'no answer'}")
    row = await db.fetchone("PRAGMA user_version")
    version = int(row[0]) if row else 0
    if version > SCHEMA_VERSION:
        raise OutboxCorrupt(f"schema {version} is newer than this agent's ({SCHEMA_VERSION})")
    return version


class _ClockChange(NamedTuple):
    change: Change
    last: int  # the last record it covers
    seq: int  # its event's
    ts: float  # its event's


@dataclass(frozen=True)
class _ClockWrite:
    restamps: list[tuple[int, int, float]]  # (after, last, seconds): records after..last move
    events: list[tuple[int, float, str, str]]  # clock_corrected / clock_unknown, for the hub
    meta: dict[str, int]  # the frame now


def _frame(meta: dict[str, int]) -> Frame | None:
    first = meta.get("clock_first", 0)
    return Frame(meta.get("clock_boot", 0), meta.get("clock_offset_us", 0) / 1e6, first) if first > 0 else None


def _frame_meta(frame: Frame | None) -> dict[str, int]:
    if frame is None:
        return {"clock_first": 0}
    return {"clock_boot": frame.boot, "clock_offset_us": round(frame.offset * 1e6), "clock_first": frame.first}


def _write_clock(db: sqlite3.Connection, c: _ClockWrite) -> None:
    """Inside the commit's transaction, after its records are in: they may be among those moved."""
    db.executemany("INSERT INTO records(seq, ts, kind, body) VALUES (?, ?, ?, ?)", c.events)
    for after, last, seconds in c.restamps:
        db.execute("UPDATE records SET ts = ts + ? WHERE seq > ? AND seq <= ?", (seconds, after, last))
    db.executemany("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", c.meta.items())


@dataclass(frozen=True)
class _Write:
    """One commit's work and the state it starts from (the loop's copy; the thread changes none of it)."""

    rows: list[tuple[int, float, int, float]]
    events: list[tuple[int, float, str, str]]
    metrics: list[tuple[int, str]]
    ack: int | None
    last: int
    acked: int
    records: int  # rows in the outbox before this commit
    dropped: int
    thin_floor: int
    protect_through: int
    quota_bytes: int
    corrupt_outboxes: int
    memory_shed: dict[str, int]  # readings dropped from memory while the disk refused them, by metric
    room: bool  # the disk is full: drop as many of the oldest unsent readings as this adds, first
    clock: _ClockWrite | None = None


@dataclass(frozen=True)
class _Written:
    records: int
    dropped: int
    thin_floor: int
    shed: dict[str, int]  # readings shed by this commit, by metric
    room: dict[str, int]  # readings dropped to make room on a full disk, by metric
    stuck: bool  # over quota, and nothing it may shed


def _write(db: sqlite3.Connection, w: _Write) -> _Written:
    """The commit's transaction, on the database's thread: all of it, or (rolled back) none."""
    try:
        db.execute("BEGIN IMMEDIATE")
        # Deletions first: the rows added reuse the pages they free (on a full disk, all there is).
        deleted = db.execute("DELETE FROM records WHERE seq <= ?", (w.ack,)).rowcount if w.ack is not None else 0
        room: dict[str, int] = {}
        if w.room:
            need = len(w.rows) + len(w.events) - _rows_free(db, w.records - deleted)
            room = _drop(db, _drop_oldest(db, need, w.protect_through)) if need > 0 else {}
        if w.metrics:
            db.executemany("INSERT OR IGNORE INTO metrics(id, name) VALUES (?, ?)", w.metrics)
        if w.rows:
            db.executemany("INSERT INTO records(seq, ts, metric, value) VALUES (?, ?, ?, ?)", w.rows)
        if w.events:
            db.executemany("INSERT INTO records(seq, ts, kind, body) VALUES (?, ?, ?, ?)", w.events)
        clocked = 0
        if w.clock is not None:
            _write_clock(db, w.clock)
            clocked = len(w.clock.events)
        records = w.records + len(w.rows) + len(w.events) + clocked - deleted - sum(room.values())
        shed, thin_floor, stuck = _shed_if_over_quota(db, w, records)
        victims = sum(shed.values())
        _count_shed(db, w.memory_shed)
        victims_in_memory = sum(w.memory_shed.values()) + sum(room.values())
        meta = {"last_seq": w.last, "acked": w.acked, "thin_floor": thin_floor,
                "dropped": w.dropped + victims + victims_in_memory, "corrupt_outboxes": w.corrupt_outboxes}
        db.executemany("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", meta.items())
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
    return _Written(records - victims, w.dropped + victims + victims_in_memory, thin_floor, shed, room, stuck)


def _rows_free(db: sqlite3.Connection, records: int) -> int:
    """About how many more rows fit in the pages the file already has (acknowledged rows freed them)."""
    free = db.execute("SELECT f.freelist_count * s.page_size FROM pragma_freelist_count() f, "
                      "pragma_page_size() s").fetchone()[0]
    per_row = _used_bytes(db) / records if records > 0 else 4096
    return int(free // max(per_row, 1))


def _renumber(db: sqlite3.Connection, above: int, shift: int, meta: dict[str, int]) -> int:
    """Add `shift` to every seq above `above`, through negatives: no step collides with a row not moved yet."""
    with immediate(db):
        db.execute("UPDATE records SET seq = -seq WHERE seq > ?", (above,))
        moved = db.execute("UPDATE records SET seq = ? - seq WHERE seq < 0", (shift,)).rowcount
        db.executemany("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", meta.items())
    return int(moved)


def _used_bytes(db: sqlite3.Connection) -> int:
    row = db.execute("SELECT (p.page_count - f.freelist_count) * s.page_size "
                     "FROM pragma_page_count() p, pragma_freelist_count() f, pragma_page_size() s").fetchone()
    return int(row[0])


def _shed_if_over_quota(db: sqlite3.Connection, w: _Write, records: int) -> tuple[dict[str, int], int, bool]:
    """Thin old telemetry before dropping it; never events. Runs inside the commit.
    Returns (shed counts by metric, the new thin floor, over quota with nothing to shed)."""
    used = _used_bytes(db)
    if used <= w.quota_bytes or records <= 0:
        return {}, w.thin_floor, False
    per_row = used / records
    need = max(1, math.ceil((used - w.quota_bytes * QUOTA_TARGET) / per_row))
    # Thin what the older half still allows; what thinning cannot free comes from dropping
    # the oldest outright (new data keeps arriving, so "thin everything first" never ends).
    victims, thin_floor = _thin(db, need, records, max(w.thin_floor, w.protect_through), w.thin_floor)
    if len(victims) < need:
        dropped = _drop_oldest(db, need - len(victims), w.protect_through)
        db.executemany("DELETE FROM records WHERE seq = ?", [(s,) for s, _ in dropped])
        victims += dropped
    if not victims:
        return {}, thin_floor, True
    return _count_shed(db, _by_metric(db, victims)), thin_floor, False


def _by_metric(db: sqlite3.Connection, victims: list[tuple[int, int]]) -> dict[str, int]:
    names = dict(db.execute("SELECT id, name FROM metrics").fetchall())
    return dict(collections.Counter(names.get(m, "?") for _, m in victims))


def _count_shed(db: sqlite3.Connection, counts: dict[str, int]) -> dict[str, int]:
    """Add shed readings to the per-metric counts the device reports."""
    db.executemany("INSERT INTO shed(metric, count) VALUES (?, ?) "
                   "ON CONFLICT(metric) DO UPDATE SET count = count + excluded.count", counts.items())
    return counts


def _drop(db: sqlite3.Connection, victims: list[tuple[int, int]]) -> dict[str, int]:
    """Delete these (seq, metric) telemetry rows, counted as shed; return the counts by metric."""
    db.executemany("DELETE FROM records WHERE seq = ?", [(s,) for s, _ in victims])
    return _count_shed(db, _by_metric(db, victims))


def _make_room(db: sqlite3.Connection, need: int, protect_through: int, dropped: int) -> dict[str, int]:
    """The disk is full: delete the `need` oldest unsent telemetry rows in a transaction of
    their own, then checkpoint so that the next commit reuses the freed pages; return what went."""
    # First move what the WAL holds into the database: once all of it is there, the next
    # transaction writes the WAL from its start again, into space the file already has.
    db.execute("PRAGMA wal_checkpoint(PASSIVE)")
    try:
        db.execute("BEGIN IMMEDIATE")
        counts = _drop(db, _drop_oldest(db, need, protect_through))
        if not counts:
            db.execute("ROLLBACK")
            return {}
        db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('dropped', ?)", (dropped + sum(counts.values()),))
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
    db.execute("PRAGMA wal_checkpoint(PASSIVE)")
    return counts


def _thin(db: sqlite3.Connection, need: int, records: int, floor: int,
          thin_floor: int) -> tuple[list[tuple[int, int]], int]:
    """Halve the oldest never-thinned telemetry (above `floor`), per metric, within the older
    half of the outbox; return the removed (seq, metric) and the new thin floor. None removed
    when that half is all thinned.

    Deleting every other row would free no page (each page keeps half its rows), so the
    range is deleted whole (its pages go to the free list) and the kept half is written
    back with the same sequence numbers, densely, into those pages.
    """
    row = db.execute("SELECT seq FROM records ORDER BY seq LIMIT 1 OFFSET ?", (records // 2,)).fetchone()
    old_end = int(row[0]) if row else 0
    region = [(int(s), float(t), int(m), float(v)) for s, t, m, v in db.execute(
        "SELECT seq, ts, metric, value FROM records WHERE seq > ? AND seq <= ? AND metric IS NOT NULL "
        "ORDER BY seq LIMIT ?",
        (floor, old_end, 2 * need + 1),
    )]
    if len(region) < 2:
        return [], thin_floor
    by_metric: dict[int, list[tuple[int, float, int, float]]] = collections.defaultdict(list)
    for record in region:
        by_metric[record[2]].append(record)
    kept = sorted(r for group in by_metric.values() for r in group[0::2])
    removed = [(r[0], r[2]) for group in by_metric.values() for r in group[1::2]]
    if not removed:
        return [], thin_floor
    first, last = region[0][0], region[-1][0]
    # Events inside the range are untouched: only telemetry rows are deleted.
    db.execute("DELETE FROM records WHERE seq BETWEEN ? AND ? AND metric IS NOT NULL", (first, last))
    db.executemany("INSERT INTO records(seq, ts, metric, value) VALUES (?, ?, ?, ?)", kept)
    return removed, last


def _drop_oldest(db: sqlite3.Connection, need: int, protect_through: int) -> list[tuple[int, int]]:
    """The older half is all thinned once: drop the oldest telemetry outright."""
    return [(int(s), int(m)) for s, m in db.execute(
        "SELECT seq, metric FROM records WHERE seq > ? AND metric IS NOT NULL ORDER BY seq LIMIT ?",
        (protect_through, need),
    )]


def _body(body: dict[str, object]) -> str:
    """An event body as stored: JSON, at most MAX_EVENT_BODY characters."""
    text = json.dumps(body, separators=(",", ":"), default=str)
    if len(text) > MAX_EVENT_BODY or json_too_deep(text):
        # The hub refuses longer or deeper bodies; a truncated record still says what happened.
        text = json.dumps({"truncated": True, "head": text[: MAX_EVENT_BODY // 2]})
    return text


def _summary(counts: dict[str, int]) -> str:
    top = sorted(counts.items(), key=lambda kv: -kv[1])[:5]
    return ", ".join(f"{m}: {c}" for m, c in top) + (" …" if len(counts) > 5 else "")


def _reservation_path(state_dir: Path) -> Path:
    return state_dir / "outbox.seq-reserve"


def _read_reservation(state_dir: Path) -> int:
    try:
        return int(_reservation_path(state_dir).read_text().strip() or 0)
    except (OSError, ValueError):
        return 0


def _write_reservation(state_dir: Path, value: int) -> None:
    write_atomic(_reservation_path(state_dir), f"{value}\n".encode(), 0o600)


def _move_aside(path: Path) -> Path:
    """Keep a corrupt outbox for inspection; never delete it."""
    stamp = time.strftime("%Y%m%dT%H%M%S")
    target = path.with_name(f"{path.name}.corrupt-{stamp}")
    n = 0
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.corrupt-{stamp}-{n}")
    path.rename(target)
    for suffix in ("-wal", "-shm"):
        side = path.with_name(path.name + suffix)
        if side.exists():
            side.rename(target.with_name(target.name + suffix))
    return target
