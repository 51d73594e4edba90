"""Records stamped before the wall clock was set: the agent's side, with controlled clocks.

The outbox is real (SQLite in tmp_path); only the clocks it reads are the test's: a wall
clock and a boot-time clock that the test steps, the kernel's "synchronised" flag and the
boot id. What is on disk is read through a separate read-only connection.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from dataclasses import dataclass
from pathlib import Path

import pytest

from edge_agent.buffer.outbox import DB_NAME, Outbox
from edge_agent.identity.clock import FLOOR_TS, STEP_TOLERANCE, Frame, Probes, RecordClock, Shift, Unknown
from edge_agent.sense.sensors import Reading

BIG_QUOTA = 10**9
REAL = 1_790_000_000.0  # the right time (2026)
BOOTED_AT = 1_000.0  # seconds of the wall clock since 1970 when the board booted without a clock
BOOT = 0x1234


@dataclass
class Clocks:
    """A board: boot time runs; the wall clock is boot time + offset, until someone steps it."""

    boot: float = 5.0
    offset: float = BOOTED_AT
    synced: bool = False
    boot_id: int = BOOT
    sync_asked: int = 0

    def probes(self) -> Probes:
        return Probes(realtime=lambda: self.boot + self.offset, boottime=lambda: self.boot,
                      synchronised=self._synchronised, boot_id=lambda: self.boot_id)

    def _synchronised(self) -> bool:
        self.sync_asked += 1
        return self.synced

    def wait(self, seconds: float) -> None:
        self.boot += seconds

    def set_right(self) -> None:
        """NTP answers: the wall clock steps to the right time, and the kernel says so."""
        self.offset, self.synced = REAL - BOOTED_AT, True

    @property
    def shift(self) -> float:
        return REAL - BOOTED_AT - BOOTED_AT


def records(state: Path) -> list[tuple[int, float, str | None, str | None]]:
    db = sqlite3.connect(f"file:{state / DB_NAME}?mode=ro", uri=True)
    try:
        return db.execute("SELECT seq, ts, kind, body FROM records ORDER BY seq").fetchall()
    finally:
        db.close()


def meta(state: Path) -> dict[str, int]:
    db = sqlite3.connect(f"file:{state / DB_NAME}?mode=ro", uri=True)
    try:
        return dict(db.execute("SELECT key, value FROM meta").fetchall())
    finally:
        db.close()


def sample(outbox: Outbox, clocks: Clocks, n: int, metric: str = "m") -> list[tuple[int, float]]:
    """n readings one second apart, stamped as the sampler does; (seq, true time) of each."""
    taken = []
    for _ in range(n):
        clocks.wait(1.0)
        ts = outbox.clock.now()  # first: an event for a clock change it notices takes a number
        taken.append((outbox.next_seq, clocks.boot + REAL - BOOTED_AT))
        outbox.add([Reading(metric, ts, 1.0)])
    return taken


def readings_on_disk(state: Path) -> dict[int, float]:
    return {seq: ts for seq, ts, kind, _ in records(state) if kind is None}


def events_on_disk(state: Path, kind: str) -> list[tuple[int, dict[str, object]]]:
    return [(seq, json.loads(body)) for seq, _, k, body in records(state) if k == kind and body]


# --- the clock alone ---------------------------------------------------------------------


def test_a_clock_below_the_floor_opens_a_frame_and_a_step_past_it_closes_it() -> None:
    clocks = Clocks()
    seen: list[tuple[Shift | Unknown | None, Frame | None]] = []
    clock = RecordClock(None, lambda: 7, lambda change, frame: seen.append((change, frame)), clocks.probes())
    clock.start()
    assert clock.frame == Frame(BOOT, BOOTED_AT, 7)
    clocks.wait(1.0)
    assert clock.now() == 6.0 + BOOTED_AT
    assert seen == [(None, clock.frame)]
    clocks.set_right()
    assert clock.now() == REAL - BOOTED_AT + 6.0
    assert seen[-1] == (Shift(7, clocks.shift, closes=True), None)
    assert clock.frame is None


def test_a_plausible_unsynchronised_clock_is_moved_by_a_step_and_closed_only_when_synchronised() -> None:
    """fake-hwclock: the clock starts at the last shutdown (past the floor), not synchronised."""
    clocks = Clocks(offset=REAL - 3_600.0)
    seen: list[tuple[Shift | Unknown | None, Frame | None]] = []
    clock = RecordClock(None, lambda: 1, lambda change, frame: seen.append((change, frame)), clocks.probes())
    clock.start()
    assert clock.frame is not None
    clocks.wait(STEP_TOLERANCE / 2)  # NTP slewing: no step
    clocks.offset += STEP_TOLERANCE / 2
    clock.now()
    assert seen == [(None, clock.frame)]
    clocks.offset += 3_600.0 - STEP_TOLERANCE / 2  # the step; the kernel flag is still not set
    clock.now()
    # Measured from the frame's offset: the slewed half second is part of the step.
    assert seen[-1][0] == Shift(1, pytest.approx(3_600.0), closes=True)
    assert clock.frame is None  # a step past the floor is a set clock


def test_a_synchronised_clock_past_the_floor_needs_no_frame_and_is_asked_rarely() -> None:
    clocks = Clocks(offset=REAL, synced=True)
    clock = RecordClock(None, lambda: 1, lambda change, frame: pytest.fail("no change expected"),
                        clocks.probes())
    clock.start()
    assert clock.frame is None
    for _ in range(1000):
        clock.now()
    assert clocks.sync_asked == 1


# --- the outbox: unsent records corrected here -----------------------------------------------


async def test_readings_taken_in_1970_are_corrected_in_the_outbox_when_the_clock_is_set(tmp_path: Path) -> None:
    clocks = Clocks()
    outbox = await Outbox.open(tmp_path, BIG_QUOTA, probes=clocks.probes())
    try:
        taken = sample(outbox, clocks, 5)
        await outbox.flush()
        assert all(ts < FLOOR_TS for ts in readings_on_disk(tmp_path).values())
        clocks.set_right()
        after = sample(outbox, clocks, 3)  # the first of these notices the step
        await outbox.flush()
    finally:
        await outbox.close()
    on_disk = readings_on_disk(tmp_path)
    assert on_disk == pytest.approx(dict(taken + after), abs=1e-6)
    [(seq, body)] = events_on_disk(tmp_path, "clock_corrected")
    assert body == {"first": 1, "last": 5, "shift_s": pytest.approx(clocks.shift), "sent_through": 0,
                    "clock_good": True}
    assert seq == 6
    assert min(s for s, _ in after) == 7
    assert meta(tmp_path)["clock_first"] == 0  # the frame is closed


async def test_records_already_handed_to_the_uplink_are_left_to_the_hub(tmp_path: Path) -> None:
    clocks = Clocks()
    outbox = await Outbox.open(tmp_path, BIG_QUOTA, probes=clocks.probes())
    try:
        taken = sample(outbox, clocks, 6)
        event = await outbox.add_event("alert", {"message": "stamped in 1970 too"})
        sent = await outbox.read_after(0, 3)  # the uplink sent records 1..3 with their 1970 stamps
        clocks.set_right()
        clocks.wait(1.0)
        outbox.clock.now()
        await outbox.flush()
    finally:
        await outbox.close()
    on_disk = readings_on_disk(tmp_path)
    truth = dict(taken)
    assert [r.seq for r in sent] == [1, 2, 3]
    assert {s: on_disk[s] for s in (1, 2, 3)} == {s: r.ts for s, r in zip((1, 2, 3), sent, strict=True)}
    assert {s: on_disk[s] for s in (4, 5, 6)} == pytest.approx({s: truth[s] for s in (4, 5, 6)}, abs=1e-6)
    [(_, alert)] = [(s, ts) for s, ts, k, _ in records(tmp_path) if k == "alert"]
    assert alert > FLOOR_TS
    assert event == 7
    [(_, body)] = events_on_disk(tmp_path, "clock_corrected")
    assert body["first"] == 1
    assert body["last"] == 7
    assert body["sent_through"] == 3


async def test_a_read_racing_the_correction_is_read_again(tmp_path: Path) -> None:
    """The uplink's read is on its way when the correction commits: what it hands out must
    either be corrected here or be named in the event, never neither."""
    clocks = Clocks()
    outbox = await Outbox.open(tmp_path, BIG_QUOTA, probes=clocks.probes())
    try:
        taken = dict(sample(outbox, clocks, 4))
        await outbox.flush()
        reader = asyncio.create_task(outbox.read_after(0, 100))
        await asyncio.sleep(0)  # its query is queued on the connection, before the correction
        clocks.set_right()
        outbox.clock.now()
        commit = asyncio.create_task(outbox.flush())
        got = await asyncio.wait_for(reader, 5.0)
        await asyncio.wait_for(commit, 5.0)
    finally:
        await outbox.close()
    [(_, body)] = events_on_disk(tmp_path, "clock_corrected")
    sent_through = int(str(body["sent_through"]))
    for record in got:
        if record.seq in taken and record.seq > sent_through:
            assert record.ts == pytest.approx(taken[record.seq], abs=1e-6), "sent with a 1970 stamp, never corrected"


# --- across restarts and reboots --------------------------------------------------------------


async def test_an_agent_restarted_in_the_same_boot_before_the_clock_is_set_still_corrects(tmp_path: Path) -> None:
    clocks = Clocks()
    outbox = await Outbox.open(tmp_path, BIG_QUOTA, probes=clocks.probes())
    first = sample(outbox, clocks, 3)
    await outbox.close()
    clocks.wait(10.0)
    outbox = await Outbox.open(tmp_path, BIG_QUOTA, probes=clocks.probes())
    try:
        assert outbox.clock.frame == Frame(BOOT, BOOTED_AT, 1)  # the same frame goes on
        second = sample(outbox, clocks, 3)
        clocks.set_right()
        outbox.clock.now()
        await outbox.flush()
    finally:
        await outbox.close()
    # The first run's records may have reached the hub before the restart: the event covers
    # them; the second run's were not handed out and are corrected here.
    [(_, body)] = events_on_disk(tmp_path, "clock_corrected")
    assert body["first"] == 1
    assert body["last"] == 6
    assert body["sent_through"] == 3
    on_disk = readings_on_disk(tmp_path)
    assert {s: on_disk[s] for s, _ in second} == pytest.approx(dict(second), abs=1e-6)
    assert all(on_disk[s] < FLOOR_TS for s, _ in first)


async def test_a_step_while_the_agent_was_stopped_is_found_at_the_next_start(tmp_path: Path) -> None:
    clocks = Clocks()
    outbox = await Outbox.open(tmp_path, BIG_QUOTA, probes=clocks.probes())
    sample(outbox, clocks, 3)
    await outbox.close()
    clocks.set_right()
    outbox = await Outbox.open(tmp_path, BIG_QUOTA, probes=clocks.probes())
    try:
        assert outbox.clock.frame is None
    finally:
        await outbox.close()
    [(seq, body)] = events_on_disk(tmp_path, "clock_corrected")
    assert seq == 4
    assert body["first"] == 1
    assert body["last"] == 3
    assert body["sent_through"] == 3
    assert body["shift_s"] == pytest.approx(clocks.shift, abs=1e-5)


async def test_a_previous_boot_that_never_had_a_good_clock_is_flagged_not_corrected(tmp_path: Path) -> None:
    clocks = Clocks()
    outbox = await Outbox.open(tmp_path, BIG_QUOTA, probes=clocks.probes())
    sample(outbox, clocks, 4)
    await outbox.close()
    before = readings_on_disk(tmp_path)
    reboot = Clocks(boot_id=BOOT + 1, offset=REAL, synced=True)  # rebooted; this time NTP answered at once
    outbox = await Outbox.open(tmp_path, BIG_QUOTA, probes=reboot.probes())
    try:
        assert outbox.clock.frame is None
    finally:
        await outbox.close()
    assert readings_on_disk(tmp_path) == before  # nothing can say by how much they are off
    [(seq, body)] = events_on_disk(tmp_path, "clock_unknown")
    assert seq == 5
    assert body == {"first": 1, "last": 4, "boot": f"{BOOT:016x}"}
    assert events_on_disk(tmp_path, "clock_corrected") == []


async def test_without_a_boot_id_an_earlier_frame_is_flagged_rather_than_guessed(tmp_path: Path) -> None:
    """Boot time starts again at a reboot: taking an unknown boot for the same one would "correct"
    the records by the reboot's offset, silently wrong."""
    clocks = Clocks(boot_id=0)
    outbox = await Outbox.open(tmp_path, BIG_QUOTA, probes=clocks.probes())
    sample(outbox, clocks, 2)
    await outbox.close()
    clocks.boot = 1.0  # rebooted, and the board's clock is in 1970 again
    outbox = await Outbox.open(tmp_path, BIG_QUOTA, probes=clocks.probes())
    await outbox.close()
    assert [body["last"] for _, body in events_on_disk(tmp_path, "clock_unknown")] == [2]
    assert events_on_disk(tmp_path, "clock_corrected") == []
