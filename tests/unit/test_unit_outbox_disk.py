"""The outbox when its disk says no: full (ENOSPC), read-only, or locked by another process.

None of these is corruption: the outbox waits (at open) or keeps what it cannot write in a
bounded memory buffer (at run time), drops only the oldest readings (never events), counts each
one, and goes on by itself when the disk takes writes again. A full disk is made two ways:
SQLite's own limit (`PRAGMA max_page_count`, the SQLITE_FULL a full disk gives, on any machine)
and a real small tmpfs filled with a file (where the test may mount one).
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from edge_agent.buffer import outbox as outbox_module
from edge_agent.buffer import sqlite_pool
from edge_agent.buffer.disk import Trouble
from edge_agent.buffer.outbox import BALLAST_BYTES, BALLAST_NAME, DB_NAME, Outbox, OutboxUnwritable
from edge_agent.sense.sensors import Reading
from tests.support.tmpfs import fill, remount, tmpfs

BIG_QUOTA = 10**9
METRICS = ("a", "b", "c")
T0 = 1_700_000_000.0
WAIT_S = 10.0  # bound on every wait; a loaded 2-core machine is slow, not stuck
MEMORY = 3_000  # MEMORY_ROWS for these tests
NO_ROOM = 2**50  # a ballast no disk can hold: SQLite's page limit stands for a full disk


@pytest.fixture(autouse=True)
def quick(monkeypatch: pytest.MonkeyPatch) -> None:
    """Retries every 0.05 s, a lock given up on after 0.2 s, a small memory bound."""
    monkeypatch.setattr(outbox_module, "UNWRITABLE_RETRY", 0.05)
    monkeypatch.setattr(outbox_module, "OPEN_RETRY", 0.05)
    monkeypatch.setattr(outbox_module, "BUSY_RETRY", 0.05)
    monkeypatch.setattr(outbox_module, "MEMORY_ROWS", MEMORY)
    monkeypatch.setattr(sqlite_pool, "BUSY_TIMEOUT", 0.2)


def ticks(n: int, start: int = 0) -> list[Reading]:
    return [Reading(m, T0 + t, float(t)) for t in range(start, start + n) for m in METRICS]


def on_disk(state: Path) -> dict[int, tuple[str | None, float | None, str | None, str | None]]:
    """seq -> (metric, value, kind, body), read as another process would."""
    db = sqlite3.connect(f"file:{state / DB_NAME}?mode=ro", uri=True, timeout=10)
    try:
        rows = db.execute("SELECT r.seq, m.name, r.value, r.kind, r.body FROM records r "
                          "LEFT JOIN metrics m ON m.id = r.metric").fetchall()
    finally:
        db.close()
    return {s: (m, v, k, b) for s, m, v, k, b in rows}


def pairs(state: Path, table: str) -> dict[str, int]:
    """meta (key -> value) or shed (metric -> count), as committed."""
    db = sqlite3.connect(f"file:{state / DB_NAME}?mode=ro", uri=True, timeout=10)
    try:
        return dict(db.execute(f"SELECT * FROM {table}").fetchall())
    finally:
        db.close()


def meta(state: Path) -> dict[str, int]:
    return pairs(state, "meta")


def shed_on_disk(state: Path) -> dict[str, int]:
    return pairs(state, "shed")


def messages(caplog: pytest.LogCaptureFixture, text: str, level: int | None = None) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage() and level in (None, r.levelno)]


async def wait_until(predicate: Callable[[], bool], what: str, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        await asyncio.sleep(0.01)


async def cap_pages(outbox: Outbox, pages: int | None) -> None:
    """SQLite answers SQLITE_FULL ('database or disk is full') past `pages`, as a full disk does;
    the ballast cannot be taken again either (None: space is back, for both)."""
    await outbox._db.execute(f"PRAGMA max_page_count = {pages or 1_073_741_823}")  # the fault goes in at SQLite
    outbox._ballast.size = NO_ROOM if pages else 4096


async def page_count(outbox: Outbox) -> int:
    row = await outbox._db.fetchone("PRAGMA page_count")  # see cap_pages
    return int(row[0])


# --- a full disk while running -------------------------------------------------------------


async def test_a_full_disk_sheds_the_oldest_unsent_readings_keeps_events_and_resumes_by_itself(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """SQLITE_FULL at every commit: the flusher never stops; it makes room by dropping the oldest
    unsent readings (never events, never what was sent), and while the disk stays full each commit
    drops as many as it adds, so the outbox stops growing; every drop is counted per metric. Events
    are committed meanwhile. When space returns (the ballast can be taken again) it says so, once."""
    caplog.set_level(logging.DEBUG, logger="edge_agent.buffer.outbox")
    outbox = await Outbox.open(tmp_path, BIG_QUOTA)
    beats: list[float] = []
    flusher = asyncio.create_task(outbox.flusher(lambda: beats.append(time.monotonic())))
    try:
        outbox.add(ticks(1000))
        boot = await outbox.add_event("boot", {})
        outbox.protect_through = 300  # sent, not yet acknowledged: never shed
        pages = await page_count(outbox)
        await cap_pages(outbox, pages)
        for start in range(1000, 8000, 100):
            outbox.add(ticks(100, start))
            await asyncio.sleep(0.005)
        await wait_until(lambda: outbox.unwritable is Trouble.FULL, "the full disk noticed")
        alert = await asyncio.wait_for(outbox.add_event("alert", {"message": "committed"}), WAIT_S)
        full_since = time.monotonic()
        await wait_until(lambda: beats[-1] > full_since + 0.1, "beats while the disk is full")
        assert not flusher.done()
        assert await page_count(outbox) <= pages
        report = await outbox.shed_report()
        assert report.dropped > 0
        assert sum(report.by_metric.values()) == report.dropped
        await cap_pages(outbox, None)  # space is back
        outbox.add(ticks(1, 8000))
        await wait_until(lambda: outbox.unwritable is None and not outbox._buffer, "everything committed")
        last = outbox._next_seq - 1  # every number handed out
    finally:
        flusher.cancel()
        await asyncio.wait([flusher])
        await outbox.close()
    rows = on_disk(tmp_path)
    dropped = meta(tmp_path)["dropped"]
    assert meta(tmp_path)["last_seq"] == last
    assert len(rows) + dropped == last, "a number neither on disk nor counted as dropped"
    assert sum(shed_on_disk(tmp_path).values()) == dropped >= report.dropped
    assert all(s in rows for s in range(1, 301)), "a reading already sent was shed"
    kinds = {s: k for s, (_, _, k, _) in rows.items() if k is not None}
    assert kinds == {boot: "boot", alert: "alert"}
    assert all(s in rows for s in range(last - 1000, last + 1)), "the newest readings were dropped, not the oldest"
    assert len(messages(caplog, "cannot commit to", logging.WARNING)) == 1  # then DEBUG while it lasts
    assert len(messages(caplog, "takes writes again", logging.WARNING)) == 1
    assert len(messages(caplog, "dropped the", logging.WARNING)) == 1
    assert messages(caplog, "dropped the", logging.DEBUG)


async def test_with_nothing_it_may_shed_on_disk_the_oldest_readings_in_memory_go_first(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Everything on disk was sent (protected): only memory can give. Readings wait there, at most
    MEMORY_ROWS: the oldest are dropped and counted (reported before they reach the disk), the
    newest kept. An event waits in memory too; one an action would follow is refused instead
    (OutboxUnwritable), the refusal kept in its place. When space returns all of it is committed."""
    caplog.set_level(logging.DEBUG, logger="edge_agent.buffer.outbox")
    outbox = await Outbox.open(tmp_path, BIG_QUOTA)
    beats: list[float] = []
    flusher = asyncio.create_task(outbox.flusher(lambda: beats.append(time.monotonic())))
    try:
        outbox.add(ticks(200))
        await outbox.flush()
        outbox.protect_through = outbox.last_seq
        await cap_pages(outbox, await page_count(outbox))
        outbox.add(ticks(2000, 200))
        await wait_until(lambda: outbox.unwritable is Trouble.FULL, "the full disk noticed")
        held = await asyncio.wait_for(outbox.add_event("alert", {"message": "kept"}), WAIT_S)  # does not wait
        with pytest.raises(OutboxUnwritable):
            await outbox.add_events([("action_started", {"rule": "r"})],
                                    otherwise=[("action_refused", {"rule": "r", "detail": "disk full"})])
        for start in range(2200, 4200, 200):
            outbox.add(ticks(200, start))
            await asyncio.sleep(0.01)
        await wait_until(lambda: outbox._memory_shed.total() > 0, "readings dropped from memory")
        full_since = time.monotonic()
        await wait_until(lambda: beats[-1] > full_since + 0.1, "beats while the disk is full")
        kept = list(outbox._buffer)  # the newest, as promised
        assert len(kept) <= MEMORY
        assert kept[-1][0] == outbox._next_seq - 1
        report = await outbox.shed_report()
        assert report.dropped == outbox._memory_shed.total()  # reported before it is on disk
        await cap_pages(outbox, None)
        await wait_until(lambda: outbox.unwritable is None and not outbox._buffer, "committed again")
    finally:
        flusher.cancel()
        await asyncio.wait([flusher])
        await outbox.close()
    rows = on_disk(tmp_path)
    assert all(s in rows for s in range(1, 601)), "a reading already sent was shed"
    assert len(rows) + meta(tmp_path)["dropped"] == meta(tmp_path)["last_seq"]
    assert meta(tmp_path)["dropped"] >= report.dropped > 0
    kinds = {s: k for s, (_, _, k, _) in rows.items() if k is not None}
    assert kinds[held] == "alert"
    assert sorted(kinds.values()) == ["action_refused", "alert"], "an event was lost, or the unwritten one kept"
    refused = next(b for (_, _, k, b) in rows.values() if k == "action_refused")
    assert json.loads(refused or "{}")["detail"] == "disk full"
    assert len(messages(caplog, "cannot commit to", logging.WARNING)) == 1


async def test_a_stop_on_a_full_disk_says_what_it_could_not_write_and_does_not_raise(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    outbox = await Outbox.open(tmp_path, BIG_QUOTA)
    outbox.add(ticks(10))
    await outbox.flush()
    outbox.protect_through = outbox.last_seq
    await cap_pages(outbox, await page_count(outbox))
    outbox.add(ticks(2000, 10))
    with caplog.at_level(logging.ERROR, logger="edge_agent.buffer.outbox"):
        await asyncio.wait_for(outbox.close(), WAIT_S)
    lost = f"the disk is full: {MEMORY} readings and 0 events that waited in memory are lost"
    assert messages(caplog, lost, logging.ERROR)


# --- at start-up: locked, read-only, full ---------------------------------------------------


def moved_aside(state: Path) -> list[Path]:
    return sorted(p for p in state.glob(f"{DB_NAME}.corrupt-*") if not p.name.endswith(("-wal", "-shm")))


async def make_outbox(state: Path) -> int:
    outbox = await Outbox.open(state, BIG_QUOTA)
    outbox.add(ticks(500))
    await outbox.flush()
    await outbox.close()
    return outbox.last_seq


async def test_an_outbox_locked_by_another_process_at_start_is_waited_for_never_moved_aside(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """An operator's `sqlite3` shell holds outbox.db exclusively (its own locking mode, in BEGIN
    EXCLUSIVE) as the agent starts: the outbox waits for it, says so once, and opens the same
    file with the same records when it is let go. Before, the lock read as corruption."""
    last = await make_outbox(tmp_path)
    holder = sqlite3.connect(tmp_path / DB_NAME, isolation_level=None)
    try:
        holder.execute("PRAGMA locking_mode = EXCLUSIVE")
        holder.execute("BEGIN EXCLUSIVE")
        holder.execute("UPDATE meta SET value = value WHERE key = 'last_seq'")
        with caplog.at_level(logging.DEBUG, logger="edge_agent.buffer.outbox"):
            opening = asyncio.create_task(Outbox.open(tmp_path, BIG_QUOTA))
            await wait_until(lambda: len(messages(caplog, "cannot open")) >= 3, "three attempts on the lock")
            assert not opening.done()
            assert moved_aside(tmp_path) == []
            holder.execute("ROLLBACK")
            holder.close()
            outbox = await asyncio.wait_for(opening, WAIT_S)
    finally:
        holder.close()
    try:
        assert outbox.corrupt_outboxes == 0
        assert outbox.last_seq == last
        assert len(await outbox.read_after(0, 10_000)) == last
    finally:
        await outbox.close()
    assert moved_aside(tmp_path) == []
    warnings = messages(caplog, "cannot open", logging.WARNING)
    assert len(warnings) == 1
    assert Trouble.LOCKED.value in warnings[0]
    assert messages(caplog, "opened", logging.WARNING)


async def test_a_read_only_state_directory_at_start_is_reported_and_retried_never_moved_aside(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with tmpfs(tmp_path / "state", "8m") as state:
        last = await make_outbox(state)
        remount(state, "ro")
        with caplog.at_level(logging.DEBUG, logger="edge_agent.buffer.outbox"):
            opening = asyncio.create_task(Outbox.open(state, BIG_QUOTA))
            try:
                await wait_until(lambda: len(messages(caplog, "cannot open")) >= 3, "three attempts, read-only")
                assert not opening.done()
            finally:
                remount(state, "rw")
            outbox = await asyncio.wait_for(opening, WAIT_S)
        try:
            assert outbox.corrupt_outboxes == 0
            assert outbox.last_seq == last
            outbox.add(ticks(1))
            await outbox.flush()
        finally:
            await outbox.close()
        assert moved_aside(state) == []
        assert sorted(on_disk(state)) == list(range(1, last + len(METRICS) + 1))
    warnings = messages(caplog, "cannot open", logging.WARNING)
    assert len(warnings) == 1
    assert Trouble.READ_ONLY.value in warnings[0]


async def test_a_full_disk_at_start_is_reported_and_retried_never_moved_aside(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Full to the last byte: the outbox gives up its ballast and starts on the same file; with no
    ballast left it cannot even make its WAL, so it waits, and starts (same numbers, nothing moved)
    once space is freed. Before, a full disk at start read as corruption."""
    with tmpfs(tmp_path / "state", "16m") as state:
        last = await make_outbox(state)
        assert (state / BALLAST_NAME).stat().st_size == BALLAST_BYTES
        filler = fill(state)
        with caplog.at_level(logging.DEBUG, logger="edge_agent.buffer.outbox"):
            outbox = await asyncio.wait_for(Outbox.open(state, BIG_QUOTA), WAIT_S)  # the ballast goes
            await outbox.close()
            fill(state)  # what the ballast held, too
            opening = asyncio.create_task(Outbox.open(state, BIG_QUOTA))
            try:
                await wait_until(lambda: len(messages(caplog, "cannot open")) >= 3, "three attempts on a full disk")
                assert not opening.done()
            finally:
                filler.unlink()
            outbox = await asyncio.wait_for(opening, WAIT_S)
        try:
            assert outbox.corrupt_outboxes == 0
            assert outbox.last_seq == last
        finally:
            await outbox.close()
        assert moved_aside(state) == []
        assert (state / BALLAST_NAME).stat().st_size == BALLAST_BYTES, "the ballast was not taken again"
    assert messages(caplog, "gave up the space held back for this", logging.WARNING)
    assert Trouble.FULL.value in messages(caplog, "cannot open", logging.WARNING)[0]


async def test_a_real_full_file_system_while_running_loses_nothing_it_did_not_count(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """ENOSPC from the kernel, not SQLite's limit: a 4 MB tmpfs filled up mid-stream, then freed."""
    caplog.set_level(logging.WARNING, logger="edge_agent.buffer.outbox")
    with tmpfs(tmp_path / "state", "16m") as state:
        outbox = await Outbox.open(state, BIG_QUOTA)
        flusher = asyncio.create_task(outbox.flusher())
        try:
            outbox.add(ticks(2000))
            await outbox.flush()
            filler = fill(state)
            for start in range(2000, 12000, 250):
                outbox.add(ticks(250, start))
                await asyncio.sleep(0.01)
            await wait_until(lambda: bool(messages(caplog, "cannot commit to")), "ENOSPC noticed")
            event = await asyncio.wait_for(outbox.add_event("alert", {"message": "disk full"}), WAIT_S)
            assert not flusher.done()
            filler.unlink()
            await wait_until(lambda: outbox.unwritable is None and not outbox._buffer, "resumed")
            await outbox.flush()
            last = outbox._next_seq - 1
        finally:
            flusher.cancel()
            await asyncio.wait([flusher])
            await outbox.close()
        rows = on_disk(state)
        assert rows[event][2] == "alert"
        assert len(rows) + meta(state)["dropped"] == last == meta(state)["last_seq"]
        assert sum(shed_on_disk(state).values()) == meta(state)["dropped"]
    assert len(messages(caplog, "cannot commit to", logging.WARNING)) == 1


async def test_the_ballast_is_taken_at_open_and_none_is_kept_when_turned_off(tmp_path: Path) -> None:
    """`outbox.ballast_mb` (4 MB by default; `edge-agent simulate` runs 0 for its thousands of outboxes)."""
    outbox = await Outbox.open(tmp_path, BIG_QUOTA)
    await outbox.close()
    ballast = tmp_path / BALLAST_NAME
    assert ballast.stat().st_size == BALLAST_BYTES
    assert ballast.stat().st_blocks * 512 >= BALLAST_BYTES, "a sparse ballast holds no space back"
    outbox = await Outbox.open(tmp_path, BIG_QUOTA, ballast_bytes=0)
    await outbox.close()
    assert not ballast.exists()


async def test_a_corrupt_outbox_on_a_full_disk_is_still_taken_over_once_space_returns(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Damaged and the disk full (no ballast): SQLite cannot even check it, so the open waits (it
    says so); once space is freed it is moved aside, the records it still holds are taken over and
    the `outbox_corrupt` event written, as without the full disk, and it is moved aside only once."""
    with tmpfs(tmp_path / "state", "16m") as state:
        outbox = await Outbox.open(state, BIG_QUOTA, ballast_bytes=0)
        outbox.add(ticks(5000))
        await outbox.close()
        old_last = outbox.last_seq
        data = bytearray((state / DB_NAME).read_bytes())
        middle = len(data) // 2 // 4096 * 4096
        data[middle:middle + 4096] = bytes((i * 151 + 17) % 256 for i in range(4096))
        (state / DB_NAME).write_bytes(bytes(data))
        filler = fill(state)
        with caplog.at_level(logging.DEBUG, logger="edge_agent.buffer.outbox"):
            opening = asyncio.create_task(Outbox.open(state, BIG_QUOTA, ballast_bytes=0))
            try:
                await wait_until(lambda: len(messages(caplog, "cannot open")) >= 3, "three attempts on a full disk")
                assert not opening.done()
            finally:
                filler.unlink()
            outbox = await asyncio.wait_for(opening, WAIT_S)
        try:
            records = await outbox.read_after(0, 100_000)
        finally:
            await outbox.close()
        assert len(moved_aside(state)) == 1
    [event] = [r for r in records if r.kind == "outbox_corrupt"]
    body = json.loads(event.body or "{}")
    taken_over = [r for r in records if r.seq <= old_last]
    assert body["recovered"] == len(taken_over) > old_last - 1_000
    assert body["recovered"] + body["lost"] == old_last
    assert len({r.seq for r in taken_over}) == len(taken_over)


async def test_on_a_full_disk_the_room_acknowledged_readings_leave_is_used_before_anything_is_dropped(
        tmp_path: Path) -> None:
    """The hub acknowledges while the disk is still full: the pages those rows leave take new
    readings first; only what does not fit drops the oldest unsent ones."""
    outbox = await Outbox.open(tmp_path, BIG_QUOTA)
    try:
        outbox.add(ticks(3000))
        await outbox.flush()
        await cap_pages(outbox, await page_count(outbox))
        outbox.add(ticks(100, 3000))
        await outbox.flush()  # fails, makes room, goes through: full from here on
        assert outbox.unwritable is Trouble.FULL
        dropped = outbox.dropped
        assert dropped > 0
        outbox.acknowledge(4500)  # about 3,000 rows go (the oldest were dropped)
        outbox.add(ticks(500, 3100))  # 1,500 readings: half as many
        await outbox.flush()
        assert outbox.dropped == dropped, "readings were dropped though acknowledged ones had left room"
        outbox.add(ticks(2000, 3600))  # 6,000: more than is left
        await outbox.flush()
        assert outbox.dropped > dropped
    finally:
        await outbox.close()
    rows = on_disk(tmp_path)
    # Every number is on disk, counted as dropped, or acknowledged (those dropped before were the oldest).
    assert len(rows) + meta(tmp_path)["dropped"] + (4500 - dropped) == meta(tmp_path)["last_seq"]
