"""The hub's side of device clocks: clock_corrected and clock_unknown events, applied to what a
device stored, once, whatever order its batches arrive in. Real Ingest and HubStore on a
SQLite file; the batches are what an agent's uplink encodes."""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from edge_agent.buffer.outbox import Record
from edge_agent.sync.uplink import encode_batch
from edgefleet.mqtt.session import Message
from edgefleet.wire.protocol import TELEMETRY, up_topic
from hub.db.store import MIGRATIONS, HubStore, TelemetryRow
from hub.ingest.batches import Ingest

DEVICE = "dev-1"
T1970 = 1_000.0
SHIFT = 1_789_000_000.0


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[HubStore]:
    s = await HubStore.open(tmp_path / "hub.db")
    await s.register(DEVICE, "sim", {})
    try:
        yield s
    finally:
        await s.close()


def reading(seq: int, ts: float) -> Record:
    return Record(seq, ts, "m", float(seq), None, None)


def event(seq: int, ts: float, kind: str, body: dict[str, object] | str) -> Record:
    return Record(seq, ts, None, None, kind, body if isinstance(body, str) else json.dumps(body))


def batch(base: int, *records: Record, settled: bool = False) -> Message:
    _, payload = encode_batch(base, list(records), settled)
    return Message(up_topic(DEVICE, TELEMETRY), payload, 1, False, 0)


async def readings(store: HubStore) -> dict[int, TelemetryRow]:
    async with contextlib.aclosing(store.telemetry(device=DEVICE)) as rows:
        return {row.seq: row async for row in rows}


async def test_a_correction_moves_what_was_sent_with_old_stamps_once_in_any_order(store: HubStore) -> None:
    ingest = Ingest(store)
    sent_old = batch(0, *(reading(s, T1970 + s) for s in (1, 2, 3)), settled=True)
    # 4 and 5 were corrected on the device before it sent them; 6 says so.
    correction = event(6, SHIFT + T1970 + 6, "clock_corrected",
                       {"first": 1, "last": 5, "shift_s": SHIFT, "sent_through": 3, "clock_good": True})
    rest = batch(3, reading(4, SHIFT + T1970 + 4), reading(5, SHIFT + T1970 + 5), correction)
    assert (await ingest.process([rest])).acks == {DEVICE: 0}  # beyond a gap: nothing applied yet
    assert (await ingest.process([sent_old])).acks == {DEVICE: 6}
    for _ in range(2):  # resends after a lost acknowledgment change nothing
        await ingest.process([rest, sent_old])
    rows = await readings(store)
    assert {s: r.ts for s, r in rows.items()} == {s: SHIFT + T1970 + s for s in range(1, 6)}
    assert not any(r.clock_unknown for r in rows.values())


async def test_a_second_step_moves_earlier_corrections_too(store: HubStore) -> None:
    """fake-hwclock, then NTP: two steps in one frame; every record ends on the last clock."""
    ingest = Ingest(store)
    first = event(3, 100.0 + 3, "clock_corrected",
                  {"first": 1, "last": 2, "shift_s": 100.0, "sent_through": 2, "clock_good": False})
    second = event(5, 1_100.0 + 5, "clock_corrected",
                   {"first": 1, "last": 4, "shift_s": 1_000.0, "sent_through": 4, "clock_good": True})
    await ingest.process([batch(0, reading(1, 1.0), reading(2, 2.0), first, settled=True)])
    await ingest.process([batch(3, reading(4, 100.0 + 4), second)])
    assert {s: r.ts for s, r in (await readings(store)).items()} == {s: 1_100.0 + s for s in (1, 2, 4)}
    async with contextlib.aclosing(store.events(device=DEVICE)) as rows:
        assert {e.seq: e.ts async for e in rows} == {3: 1_103.0, 5: 1_105.0}


async def test_readings_of_a_boot_whose_clock_was_never_set_are_flagged(store: HubStore) -> None:
    ingest = Ingest(store)
    unknown = event(4, SHIFT + 10, "clock_unknown", {"first": 1, "last": 2, "boot": "00ab"})
    await ingest.process([batch(0, reading(1, 1.0), reading(2, 2.0), reading(3, SHIFT + 3), unknown, settled=True)])
    rows = await readings(store)
    assert {s: r.clock_unknown for s, r in rows.items()} == {1: True, 2: True, 3: False}
    assert {s: r.ts for s, r in rows.items()} == {1: 1.0, 2: 2.0, 3: SHIFT + 3}


@pytest.mark.parametrize("body", [
    "{not json",
    "[[1, 2]]",
    json.dumps({"first": 1, "last": 2, "shift_s": 1e300, "sent_through": 2}),
    json.dumps({"first": 1, "last": 9, "shift_s": 10.0, "sent_through": 9}),  # past itself
    json.dumps({"first": 0, "last": 2, "shift_s": 10.0, "sent_through": 2}),
    json.dumps({"first": 1, "last": 2, "shift_s": "10", "sent_through": 2}),
    json.dumps({"first": 1, "last": 2, "shift_s": 10.0, "sent_through": 2, "x": [[[[[[[[[[[]]]]]]]]]]] * 50}),
])
async def test_a_bad_clock_report_is_counted_and_changes_nothing(store: HubStore, body: str) -> None:
    ingest = Ingest(store)
    bad = event(3, 3.0, "clock_corrected", body)
    acks = await ingest.process([batch(0, reading(1, 1.0), reading(2, 2.0), bad, settled=True)])
    assert acks.acks == {DEVICE: 3}  # stored and acknowledged like any event: the device moves on
    moved = 10.0 if '"x"' in body else 0.0  # a valid report with a deep unknown field still applies
    assert {s: r.ts for s, r in (await readings(store)).items()} == {1: 1.0 + moved, 2: 2.0 + moved}
    assert (await store.reject_counts()).get("bad_clock_event") == (None if moved else 1)
    await ingest.process([batch(3, reading(4, 4.0))])  # the hub goes on
    assert set(await readings(store)) == {1, 2, 4}


async def test_a_hub_database_from_before_the_flag_keeps_its_readings_unflagged(tmp_path: Path) -> None:
    """An older hub.db, with readings in it, migrated by the new hub."""
    path = tmp_path / "hub.db"
    step = next(i for i, sql in enumerate(MIGRATIONS) if "clock_unknown" in sql)
    with contextlib.closing(sqlite3.connect(path)) as db:
        for sql in MIGRATIONS[:step]:
            db.executescript(sql)
        db.execute(f"PRAGMA user_version = {step}")
        db.execute("INSERT INTO telemetry(device, seq, ts, metric, value) VALUES (?, 1, 5.0, 'm', 1.5)", (DEVICE,))
        db.commit()
    store = await HubStore.open(path)
    try:
        assert await readings(store) == {1: TelemetryRow(DEVICE, 1, 5.0, "m", 1.5, clock_unknown=False)}
    finally:
        await store.close()
