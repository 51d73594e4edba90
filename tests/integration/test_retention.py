"""Retention on a live hub while a device streams, and the range commands on what it keeps.

A first hub run takes in a large backlog of readings stamped days ago (through MQTT, with the
device's own certificate) and a few recent ones; the hub is then restarted with [retention]
set, while another device streams at 2,000 readings/s: the hub's first retention run removes
the old backlog batch by batch beside that ingest. Every reading of the streaming device is
stored exactly once, the recent readings of the other device stay, the old ones are gone.
"""

from __future__ import annotations

import asyncio
import csv
import json
import sqlite3
import time
from pathlib import Path

import pytest

from edgefleet.wire.protocol import ACK, TELEMETRY, Ack, Batch, down_topic, pack, unpack, up_topic
from tests.integration.test_store_forward_faults import STREAM, agent_argv, finish, wait_streaming
from tests.support.exactly_once import hub_seqs
from tests.support.harness import HUB, HubDir, Proc, connect, device_identity, run_cli, start_hub

pytestmark = pytest.mark.integration

OLD_READINGS = 200_000  # enough for many batches of the hub's retention (hub/db/retention.py PRUNE_BATCH)
PER_MESSAGE = 5_000  # readings per batch sent (well under the 256 KiB message limit)
DAY_S = 86400.0


async def send_backlog(hub_dir: HubDir, bundle: Path, stamps: list[float], timeout: float = 120.0) -> None:
    """Publish readings seq 1..len(stamps), stamped `stamps`, as the device, and wait for the hub's ack."""
    device = bundle.name
    session = await connect(device_identity(bundle), hub_dir.port, device)
    try:
        await session.subscribe([(down_topic(device, ACK), 1)])
        for base in range(0, len(stamps), PER_MESSAGE):
            seqs = list(range(base + 1, min(base + PER_MESSAGE, len(stamps)) + 1))
            batch = Batch(base=base, last=seqs[-1], settled=True, names=["temp"], seq=seqs,
                          ts=[stamps[s - 1] for s in seqs], metric=[0] * len(seqs), value=[s / 8 for s in seqs])
            await session.publish(up_topic(device, TELEMETRY), pack(batch), qos=1)
        async with asyncio.timeout(timeout):
            while unpack((await session.next_message()).payload, Ack).through < len(stamps):
                pass
    finally:
        await session.close()


def set_retention(hub_dir: HubDir, telemetry_days: float, events_days: float) -> None:
    config = hub_dir.dir / "hub.toml"
    text = config.read_text()
    config.write_text(text.replace("# telemetry_days = 90", f"telemetry_days = {telemetry_days!r}")
                          .replace("# events_days = 365", f"events_days = {events_days!r}"))


def count(hub_dir: HubDir, device: str) -> int:
    with sqlite3.connect(f"file:{hub_dir.dir / 'hub.db'}?mode=ro", uri=True, timeout=10) as db:
        return int(db.execute("SELECT count(*) FROM telemetry WHERE device = ?", (device,)).fetchone()[0])


def iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts % 1 * 1000):03d}Z"


async def test_retention_removes_an_old_backlog_while_a_device_streams_exactly_once(
        hub_dir: HubDir, bundles: Path) -> None:
    await hub_dir.provision(bundles, "dev-live", "dev-old")
    now = time.time()
    recent = [now - 600 + i for i in range(10)]  # ten minutes old: inside the limit
    stamps = [now - 3 * DAY_S + i / 1000 for i in range(OLD_READINGS)] + recent
    hub = await start_hub(hub_dir)
    try:
        await send_backlog(hub_dir, bundles / "dev-old", stamps)
    finally:
        await hub.stop()
    assert count(hub_dir, "dev-old") == OLD_READINGS + 10

    set_retention(hub_dir, telemetry_days=1.0, events_days=1.0)
    hub = await start_hub(hub_dir)
    try:
        agent = await Proc("dev-live", agent_argv(bundles / "dev-live", *STREAM)).start()
        try:
            await wait_streaming(hub_dir, bundles / "dev-live")
            line = await hub.wait_for(r"retention removed \d+ readings", timeout=120)
            assert f"retention removed {OLD_READINGS} readings stamped before" in line
            state = await finish(hub_dir, bundles / "dev-live", agent)  # exactly once, none shed or lost
            assert state.last_seq > 0
            # What stays of dev-old: its ten recent readings, once each, and nothing older.
            assert hub_seqs(hub_dir.dir, "dev-old") == list(range(OLD_READINGS + 1, OLD_READINGS + 11))
            with sqlite3.connect(f"file:{hub_dir.dir / 'hub.db'}?mode=ro", uri=True, timeout=10) as db:
                assert db.execute("SELECT removed FROM retention WHERE tbl = 'telemetry'").fetchone() == (
                    OLD_READINGS,)
        finally:
            await agent.stop()
    finally:
        await hub.stop()


async def test_range_commands_on_a_live_hub(hub_dir: HubDir, hub: Proc, bundles: Path) -> None:
    """`telemetry --since/--until` and `export` read the same range: [since, until)."""
    await hub_dir.provision(bundles, "dev-r")
    now = time.time()
    stamps = [now - 3600 + 60 * i for i in range(30)]  # one a minute, the last 31 minutes ago
    await send_backlog(hub_dir, bundles / "dev-r", stamps)
    since, until = iso(stamps[5]), iso(stamps[12])  # readings 6..12 (the 13th is stamped at `until`)

    code, out, err = await run_cli(HUB, "telemetry", "--dir", str(hub_dir.dir), "--json", "--since", since,
                                   "--until", until)
    assert code == 0, err
    listed = [json.loads(line) for line in out.splitlines()]
    assert [r["seq"] for r in listed] == list(range(6, 13))

    code, out, err = await run_cli(HUB, "export", "--dir", str(hub_dir.dir), "--since", since, "--until", until,
                                   "--format", "jsonl")
    assert code == 0, err
    assert [json.loads(line) for line in out.splitlines()] == listed
    assert "7 reading(s) exported" in err

    target = hub_dir.dir.parent / "range.csv"
    code, _, err = await run_cli(HUB, "export", "--dir", str(hub_dir.dir), "--since", since, "--until", until,
                                 "--device", "dev-r", "--metric", "temp", "--format", "csv", "--out", str(target))
    assert code == 0, err
    with target.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["device"], int(r["seq"]), float(r["ts"]), float(r["value"])) for r in rows] == [
        (r["device"], r["seq"], r["ts"], r["value"]) for r in listed]
    assert sorted(p.name for p in target.parent.iterdir() if p.name.startswith(".range")) == []

    code, out, err = await run_cli(HUB, "telemetry", "--dir", str(hub_dir.dir), "--since", "2h", "--until", until)
    assert code == 0, err
    assert "12 reading(s)" in err
    code, _, err = await run_cli(HUB, "export", "--dir", str(hub_dir.dir), "--since", until, "--until", since,
                                 "--format", "csv")
    assert code == 2
    assert "--since must be before --until" in err


async def test_only_the_leading_replica_prunes(hub_dir: HubDir) -> None:
    """Replicas share the database: retention runs in the leader alone, and moves with the lead."""
    config = hub_dir.dir / "hub.toml"
    config.write_text(config.read_text().replace("replicas = []", 'replicas = ["b"]'))
    set_retention(hub_dir, telemetry_days=20 / DAY_S, events_days=20 / DAY_S)  # a run every 5 s
    primary = await start_hub(hub_dir)
    replica = None
    try:
        await primary.wait_for(r"this hub process \(hub\.test\) leads the region")
        replica = await Proc("replica", [HUB, "-v", "run", "--dir", str(hub_dir.dir), "--replica", "b"]).start()
        await replica.wait_for(r"hub\.test leads the region")
        await primary.wait_for(r"logger=hub\.retention msg=\"retention removed", after=primary.mark())
        await primary.wait_for(r"logger=hub\.retention msg=\"retention removed", after=primary.mark())
        assert not [line for line in replica.lines if "logger=hub.retention" in line]  # two runs of the leader later
        await primary.stop()  # a clean stop hands the lead over at once
        await replica.wait_for(r"this hub process \(hub\.test\.b\) leads the region")
        await replica.wait_for(r"logger=hub\.retention msg=\"retention removed")
    finally:
        if replica is not None:
            await replica.stop()
        await primary.stop()
