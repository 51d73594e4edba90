"""Retention, range reads and exports on a real SQLite hub store (hub/db/retention.py, export.py)."""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
import logging
import math
import os
import signal
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest

from edgefleet.mqtt.session import Message
from edgefleet.wire.protocol import Batch, EventRecord, pack, up_topic
from hub.cli import export as export_command
from hub.config import load_hub
from hub.db import retention
from hub.db.identities import REGION_STRIDE
from hub.db.store import MIGRATIONS, SCHEMA_VERSION, HubStore, IngestWork, TelemetryRow
from hub.errors import UsageError
from hub.ingest.batches import Ingest
from hub.metrics import render
from hub.pki.init import init_hub
from tests.support.net import free_port

T0 = 1_700_000_000.0


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[HubStore]:
    s = await HubStore.open(tmp_path / "hub.db")
    try:
        await s.register("dev-a", "sim", {})
        await s.register("dev-b", "sim", {})
        yield s
    finally:
        await s.close()


async def stream(store: HubStore, device: str, seqs: range, *, ts_of: dict[int, float] | None = None,
                 settled: bool = True, metric: str = "m") -> None:
    """Commit readings seq -> ts T0 + seq (or ts_of[seq]) as one batch covering (seqs[0] - 1, seqs[-1]]."""
    stamps = ts_of or {}
    await store.commit_ingest(IngestWork(
        now=T0, telemetry=[(device, s, stamps.get(s, T0 + s), metric, s / 10) for s in seqs],
        ranges={device: [(seqs[0] - 1, seqs[-1], settled)]}))


async def seqs(store: HubStore, table: str = "telemetry", device: str = "dev-a") -> list[int]:
    return [int(r[0]) for r in await store.query(
        f"SELECT seq FROM {table} WHERE device = ? ORDER BY seq", (device,))]  # our names


# --- retention -----------------------------------------------------------------------


async def test_retention_removes_exactly_the_readings_stamped_before_the_limit(store: HubStore) -> None:
    """The boundary: a reading stamped exactly at `before` stays; one a microsecond older goes."""
    await stream(store, "dev-a", range(1, 11), ts_of={4: T0 + 5 - 1e-6, 5: T0 + 5})
    assert await store.prune_telemetry(T0 + 5, 1000) == 4
    assert await seqs(store) == [5, 6, 7, 8, 9, 10]
    assert await store.prune_telemetry(T0 + 5, 1000) == 0


async def test_retention_works_in_bounded_batches_oldest_first(store: HubStore) -> None:
    await stream(store, "dev-a", range(1, 11), ts_of={1: T0 + 9, 9: T0 + 1})  # out of seq order
    assert await store.prune_telemetry(T0 + 9.5, 3) == 3
    assert await seqs(store) == [1, 4, 5, 6, 7, 8, 10]  # the three oldest stamps: seq 9 (T0+1), 2, 3
    removed = await retention.prune_all(store, "telemetry", T0 + 9.5, batch=3, pause_s=0)
    assert removed == 6  # 3 + 3, and a third call finds none
    assert await seqs(store) == [10]


async def test_retention_keeps_readings_above_the_watermark_until_it_covers_them(store: HubStore) -> None:
    """A batch stored beyond a gap is not yet covered by the watermark: it waits, old or not."""
    await stream(store, "dev-a", range(1, 4))
    await stream(store, "dev-a", range(11, 14), settled=False)  # 4..10 missing: the watermark stays at 3
    assert await store.watermarks() == {"dev-a": 3}
    assert await store.prune_telemetry(T0 + 100, 1000) == 3
    assert await seqs(store) == [11, 12, 13]
    await stream(store, "dev-a", range(4, 11), settled=False)  # the gap closes
    assert await store.watermarks() == {"dev-a": 13}
    assert await store.prune_telemetry(T0 + 100, 1000) == 10
    assert await seqs(store) == []


async def test_the_ingest_gets_the_writer_between_two_batches(store: HubStore) -> None:
    """Each batch is its own short transaction: an ingest commit waiting for the writer goes next."""
    await stream(store, "dev-a", range(1, 1001))
    pruning = asyncio.create_task(retention.prune_all(store, "telemetry", T0 + 2000, batch=100, pause_s=0))
    await asyncio.sleep(0)  # the prune takes the writer first
    await stream(store, "dev-b", range(1, 11), ts_of={s: T0 + 5000 + s for s in range(1, 11)})
    assert not pruning.done()
    assert 0 < len(await seqs(store)) < 1000  # the commit went in while the prune was under way
    assert await pruning == 1000
    assert await seqs(store, device="dev-b") == list(range(1, 11))


async def test_a_resent_batch_whose_readings_were_pruned_is_not_stored_again(store: HubStore) -> None:
    """The dedup floor: after retention removed rows, the watermark alone says they were stored."""
    ingest = Ingest(store, "hub.test")

    def batch(base: int, last: int) -> Message:  # readings base+1..last, but seq 5 is an event
        n = [s for s in range(base + 1, last + 1) if s != 5]
        payload = pack(Batch(base=base, last=last, settled=True, names=["m"], seq=n, ts=[T0 + s for s in n],
                             metric=[0] * len(n), value=[float(s) for s in n],
                             events=[EventRecord(5, T0 + 5, "alert", "{}")] if base < 5 <= last else []))
        return Message(topic=up_topic("dev-a", "telemetry"), payload=payload, qos=1, retain=False, mid=1)

    first = await ingest.process([batch(0, 5)])
    assert first.stored == 5
    assert first.acks == {"dev-a": 5}
    await ingest.process([batch(5, 8)])
    assert await store.prune_telemetry(T0 + 7, 1000) == 5
    assert await store.prune_events(T0 + 7, 1000) == 1
    again = await ingest.process([batch(0, 5), batch(5, 8)])  # an ack lost long ago: the device resends
    assert again.stored == 0
    assert again.acks == {"dev-a": 8}
    assert await seqs(store) == [7, 8]
    assert await seqs(store, "events") == []
    assert await store.reject_counts() == {}  # a duplicate, not a conflict
    newer = await ingest.process([batch(8, 10)])
    assert newer.stored == 2
    assert await seqs(store) == [7, 8, 9, 10]


async def test_each_outbox_instance_is_judged_against_its_own_watermark(store: HubStore) -> None:
    """A device whose outbox moved to a region of its own (hub/db/identities.py) has two streams."""
    moved = REGION_STRIDE
    await store.atomically(lambda db: db.executemany(
        "INSERT INTO ingest_instances(device, instance, stream, floor, keep, top, conflicts, machine, first_seen, "
        "last_seen) VALUES ('dev-a', ?, ?, ?, 0, 0, 0, 0, 0, 0)", [(1, "dev-a", 0), (2, "dev-a/2", moved)]))
    await store.commit_ingest(IngestWork(now=T0, telemetry=[
        ("dev-a", s, T0, "m", 1.0) for s in (10, 60, moved + 3, moved + 9)],
        ranges={"dev-a": [(0, 50, True)], "dev-a/2": [(moved, moved + 5, True)]}))
    assert await store.watermarks() == {"dev-a": 50, "dev-a/2": moved + 5}
    assert await store.prune_telemetry(T0 + 1, 1000) == 2
    assert await seqs(store) == [60, moved + 9]  # each above its own stream's watermark
    floors = await store.atomically(lambda db: retention.dedup_floors(db, ["dev-a"]))
    incoming = [("dev-a", s, T0, "m", 1.0) for s in (10, 50, 51, moved, moved + 5, moved + 6)]
    assert [r[1] for r in retention.above_floor(incoming, floors)] == [51, moved, moved + 6]


async def test_the_hubs_own_events_keep_their_newest_so_the_numbering_goes_on(store: HubStore) -> None:
    async def record(db: object, ts: float) -> None:
        await store.hub_event(db, "hub.test", "rollout_started", {}, ts=ts)  # type: ignore[arg-type]  # the connection

    for ts in (T0, T0 + 1, T0 + 2):
        await store.atomically(lambda db, ts=ts: record(db, ts))  # type: ignore[misc]  # default-bound loop variable
    assert await store.prune_events(T0 + 10, 1000) == 2
    assert await seqs(store, "events", "hub.test") == [3]
    await store.atomically(lambda db: record(db, T0 + 3))
    assert await seqs(store, "events", "hub.test") == [3, 4]


async def test_a_run_logs_once_and_the_metric_counts_what_went(
        workdir: Path, caplog: pytest.LogCaptureFixture) -> None:
    paths = await init_hub(workdir / "hub", "test", port=free_port(), host="127.0.0.1", bind="127.0.0.1",
                           force=False)
    store = await HubStore.open(paths.db)
    try:
        await store.register("dev-a", "sim", {})
        await stream(store, "dev-a", range(1, 5001))
        with caplog.at_level(logging.INFO, logger="hub.retention"):
            removed = await retention.prune_run(store, telemetry_s=100.0, events_s=1.0, now=T0 + 2100)
    finally:
        await store.close()
    assert removed == {"telemetry": 1999, "events": 0}  # ts < T0 + 2000: seq 1..1999, two batches
    logged = [r for r in caplog.records if r.name == "hub.retention"]
    assert [r.levelno for r in logged] == [logging.INFO]  # one line per run, not per batch
    assert "1999 readings stamped before 2023-11-14T22:46:40+00:00" in logged[0].getMessage()
    text = render(paths.db, "test").decode()
    assert 'edgefleet_retention_removed_rows_total{region="test",table="telemetry"} 1999.0' in text
    assert 'edgefleet_retention_removed_rows_total{region="test",table="events"} 0.0' in text


def test_the_run_interval_follows_the_shortest_limit() -> None:
    assert retention.prune_interval(None, None) == retention.PRUNE_EVERY_S
    assert retention.prune_interval(90 * 86400.0, None) == retention.PRUNE_EVERY_S
    assert retention.prune_interval(None, 20.0) == 5.0
    assert retention.prune_interval(1.0, 30 * 86400.0) == retention.MIN_PRUNE_EVERY_S


async def test_hub_toml_retention_is_validated_and_unset_keeps_everything(workdir: Path) -> None:
    paths = await init_hub(workdir / "hub", "test", port=free_port(), host="127.0.0.1", bind="127.0.0.1",
                           force=False)
    _, config = load_hub(paths.root)
    assert config.retention.telemetry_s is None
    assert config.retention.events_s is None
    text = paths.config.read_text()
    paths.config.write_text(text.replace("# telemetry_days = 90", "telemetry_days = 0.5"))
    _, config = load_hub(paths.root)
    assert config.retention.telemetry_s == 43200.0
    assert config.retention.events_s is None
    paths.config.write_text(text.replace("# events_days = 365", "events_days = -1"))
    with pytest.raises(UsageError, match=r"hub.toml.*events_days"):
        load_hub(paths.root)


# --- range reads ---------------------------------------------------------------------


async def test_a_range_read_includes_its_start_and_not_its_end_in_time_order(store: HubStore) -> None:
    await stream(store, "dev-a", range(1, 11))
    await stream(store, "dev-b", range(1, 11), ts_of={s: T0 + s + 0.5 for s in range(1, 11)}, metric="n")
    rows = [r async for r in store.read_telemetry(T0 + 3, T0 + 6)]
    assert [(r.device, r.seq) for r in rows] == [
        ("dev-a", 3), ("dev-b", 3), ("dev-a", 4), ("dev-b", 4), ("dev-a", 5), ("dev-b", 5)]
    assert [r.seq async for r in store.read_telemetry(T0 + 3, T0 + 6, device="dev-b")] == [3, 4, 5]
    assert [r.seq async for r in store.read_telemetry(T0 + 3, T0 + 6, metric="m")] == [3, 4, 5]
    assert [r.seq async for r in store.read_telemetry(T0 + 3, T0 + 3)] == []
    # The listing (edge-hub telemetry --since/--until) takes the same range, in device order.
    listed = [(r.device, r.seq) async for r in store.telemetry(since=T0 + 3, until=T0 + 6)]
    assert listed == [("dev-a", 3), ("dev-a", 4), ("dev-a", 5), ("dev-b", 3), ("dev-b", 4), ("dev-b", 5)]


# --- export --------------------------------------------------------------------------


def export_args(fmt: str, out: Path | None = None, since: float = -math.inf, until: float = math.inf,
                device: str | None = None, metric: str | None = None,
                hub_dir: Path | None = None) -> argparse.Namespace:
    return argparse.Namespace(format=fmt, out=out, since=since, until=until, device=device, metric=metric,
                              dir=hub_dir)


ODD = {1: T0 + 0.123456789, 2: 1e-3, 3: T0 + 1 / 3}  # stamps whose text must read back exactly


async def odd_rows(store: HubStore) -> list[TelemetryRow]:
    await store.commit_ingest(IngestWork(now=T0, telemetry=[
        ("dev-a", 1, ODD[1], 'a,b"c', 1e-300), ("dev-a", 2, ODD[2], "m", -0.0), ("dev-a", 3, ODD[3], "m\nx", 1 / 7),
        ("dev-b", 1, T0, "m", 123456789.123456789)], ranges={"dev-a": [(0, 3, True)], "dev-b": [(0, 1, True)]}))
    await store.atomically(lambda db: db.execute("UPDATE telemetry SET clock_unknown = 1 WHERE seq = 2"))
    return [r async for r in store.read_telemetry(-math.inf, math.inf)]


async def test_csv_export_reads_back_exactly(store: HubStore) -> None:
    expected = await odd_rows(store)
    out = io.StringIO()
    assert await export_command.write_rows(store, export_args("csv"), out) == 4
    reader = csv.DictReader(io.StringIO(out.getvalue(), newline=""))
    assert tuple(reader.fieldnames or ()) == export_command.CSV_COLUMNS
    back = [TelemetryRow(r["device"], int(r["seq"]), float(r["ts"]), r["metric"], float(r["value"]),
                         r["clock_unknown"] == "1") for r in reader]
    assert back == expected
    assert [r.ts for r in back] == [ODD[2], T0, ODD[1], ODD[3]]  # bit for bit, in time order


async def test_jsonl_export_reads_back_exactly(store: HubStore) -> None:
    expected = await odd_rows(store)
    out = io.StringIO()
    assert await export_command.write_rows(store, export_args("jsonl", since=T0, until=T0 + 1), out) == 3
    back = [msgspec.json.decode(line, type=TelemetryRow) for line in out.getvalue().splitlines()]
    assert back == [r for r in expected if T0 <= r.ts < T0 + 1]


async def test_an_interrupted_export_leaves_no_file_and_exits_130(workdir: Path) -> None:
    """Ctrl-C while rows are being written: neither FILE nor its hidden part file remains."""
    paths = await init_hub(workdir / "hub", "test", port=free_port(), host="127.0.0.1", bind="127.0.0.1",
                           force=False)
    store = await HubStore.open(paths.db)
    try:
        await store.register("dev-a", "sim", {})
        await stream(store, "dev-a", range(1, 200_001))  # 20 chunks: the export yields to the loop many times
    finally:
        await store.close()
    out = workdir / "export" / "readings.csv"
    out.parent.mkdir()
    export = asyncio.create_task(export_command.run(export_args("csv", out, hub_dir=paths.root)))
    async with asyncio.timeout(60):
        while not any(out.parent.iterdir()):
            assert not export.done()
            await asyncio.sleep(0)
        os.kill(os.getpid(), signal.SIGINT)  # the export's own handler takes it
        assert await export == 128 + signal.SIGINT
    assert list(out.parent.iterdir()) == []
    assert await export_command.run(export_args("csv", out, hub_dir=paths.root)) == 0
    assert [p.name for p in out.parent.iterdir()] == ["readings.csv"]
    assert out.read_text().count("\n") == 200_001


async def test_a_database_of_the_previous_schema_gains_the_time_indexes_and_keeps_its_rows(tmp_path: Path) -> None:
    path = tmp_path / "hub.db"
    step = MIGRATIONS.index(next(m for m in MIGRATIONS if "telemetry_ts" in m))
    with sqlite3.connect(path) as db:
        for sql in MIGRATIONS[:step]:
            db.executescript(sql)
        db.execute("INSERT INTO telemetry(device, seq, ts, metric, value) VALUES ('dev-a', 1, ?, 'm', 2.5)", (T0,))
        db.execute(f"PRAGMA user_version = {step}")
    store = await HubStore.open(path)
    try:
        assert [r async for r in store.read_telemetry(T0, T0 + 1)] == [TelemetryRow("dev-a", 1, T0, "m", 2.5)]
        plan = await store.query("EXPLAIN QUERY PLAN SELECT * FROM telemetry WHERE ts >= 0 AND ts < 1 ORDER BY ts")
        assert "telemetry_ts" in " ".join(str(tuple(r)) for r in plan)
        assert await store.prune_telemetry(T0 + 1, 10) == 0  # no watermark: nothing is taken for stored
    finally:
        await store.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
