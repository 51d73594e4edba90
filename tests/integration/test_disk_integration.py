"""A full disk and a corrupt outbox under a real agent streaming to a real hub (and Mosquitto).

The agent's state directory is a small tmpfs of its own (the tests mount one, as root; where
they cannot, they are skipped: tests/unit/test_unit_outbox_disk.py injects the same faults at the
SQLite layer). Every test ends with the exactly-once check read from the real databases.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
from pathlib import Path

import pytest

from tests.integration.test_store_forward_faults import (
    RECONNECT_TIMEOUT,
    finish,
    run_agent,
    stop_cleanly,
    wait_backlog,
    wait_streaming,
    wait_until,
)
from tests.support.exactly_once import hub_seqs, outbox_state, wait_drained
from tests.support.faultproxy import FaultProxy
from tests.support.harness import HubDir, Proc
from tests.support.tmpfs import fill, remount, tmpfs

pytestmark = pytest.mark.integration

FULL_FOR = 4.0  # seconds the disk stays full, at 2,000 readings/s: 40 commits that make their own room


def hub_dropped(hub_dir: HubDir, device: str) -> int:
    """What the device last reported as dropped, as the hub stored it."""
    db = sqlite3.connect(f"file:{hub_dir.dir / 'hub.db'}?mode=ro", uri=True, timeout=10)
    try:
        row = db.execute("SELECT dropped FROM devices WHERE device = ?", (device,)).fetchone()
    finally:
        db.close()
    return int(row[0] or 0) if row else 0


def hub_events(hub_dir: HubDir, device: str, kind: str) -> list[dict[str, object]]:
    db = sqlite3.connect(f"file:{hub_dir.dir / 'hub.db'}?mode=ro", uri=True, timeout=10)
    try:
        rows = db.execute("SELECT body FROM events WHERE device = ? AND kind = ?", (device, kind)).fetchall()
    finally:
        db.close()
    return [json.loads(body) for (body,) in rows]


def still_running(agent: Proc) -> None:
    assert agent.proc is not None
    tail = "\n".join(agent.lines[-30:])
    assert agent.proc.returncode is None, f"the agent exited ({agent.proc.returncode}):\n{tail}"


async def test_a_full_disk_never_stops_the_agent_drops_are_counted_and_everything_kept_arrives_once(
        hub_dir: HubDir, hub: Proc, bundles: Path) -> None:
    """2,000 readings/s into an outbox on a 16 MB tmpfs, the hub cut off so a backlog builds;
    then a file fills the disk to the last byte. The agent keeps sampling, sheds the oldest unsent
    readings to make room, counts every drop, reports them to the hub once the link is back (the
    disk still full), and when the file is deleted it goes on by itself; the hub ends up with
    every number exactly once, except exactly those the agent counted as dropped."""
    await hub_dir.provision(bundles, "dev-full")
    bundle = bundles / "dev-full"
    with tmpfs(bundle / "state", "16m") as state:
        async with FaultProxy("127.0.0.1", hub_dir.port) as proxy:
            agent = await run_agent(bundle, f"broker.port={proxy.port}")
            try:
                await agent.wait_for(r"dev-full online")
                await wait_streaming(hub_dir, bundle)
                proxy.partition()
                await wait_backlog(bundle, 20_000, timeout=30)
                mark = agent.mark()
                filler = fill(state)
                try:
                    await agent.wait_for(r"outbox: cannot commit to .*: the disk is full", after=mark, timeout=15)
                    # It gives up the space it holds back for this, then makes its own room.
                    await agent.wait_for(r"outbox: the disk is full: gave up the 4 MB", after=mark, timeout=15)
                    await agent.wait_for(r"outbox: the disk is full: dropped the \d+ oldest unsent readings",
                                         after=mark, timeout=15)
                    full = outbox_state(bundle)
                    await asyncio.sleep(FULL_FOR)  # nothing to await: the agent must simply go on
                    still_running(agent)
                    later = outbox_state(bundle)
                    assert later.last_seq > full.last_seq, "sampling stopped on the full disk"
                    assert later.dropped > full.dropped, "drops were not counted"
                    assert later.rows <= full.rows + 2_000, "the outbox kept growing on a full disk"
                    proxy.heal()
                    await agent.wait_for(r"dev-full online", after=mark, timeout=RECONNECT_TIMEOUT)
                    # The drop counts reach the hub in the device's status, the disk still full.
                    await wait_until(lambda: hub_dropped(hub_dir, "dev-full") > 0, "the hub hears of the drops")
                    assert os.statvfs(state).f_bavail < 4 * 1024 * 1024 // os.statvfs(state).f_frsize
                    mark = agent.mark()
                finally:
                    filler.unlink()
                await agent.wait_for(r"outbox: .* takes writes again", after=mark, timeout=15)
                resumed = outbox_state(bundle).last_seq
                await wait_streaming(hub_dir, bundle, above=resumed, timeout=30)
                still_running(agent)
                final = await finish(hub_dir, bundle, agent)
            finally:
                await agent.stop()
        warnings = [line for line in agent.lines if "cannot commit to" in line and "level=warning" in line]
        assert len(warnings) == 1, "the full disk was not logged once (then at DEBUG)"
        assert final.dropped > 0
        assert hub_dropped(hub_dir, "dev-full") >= full.dropped


def scribble(path: Path) -> None:
    """Three pages in the middle of the file overwritten: what a failing SD card does."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2 // 4096 * 4096
    data[middle:middle + 3 * 4096] = bytes((i * 151 + 17) % 256 for i in range(3 * 4096))
    path.write_bytes(bytes(data))


async def test_a_corrupt_outbox_is_moved_aside_and_what_it_still_holds_reaches_the_hub(
        hub_dir: HubDir, hub: Proc, bundles: Path) -> None:
    """An agent that never reached the hub stops with ~20,000 readings in its outbox, whose file is
    then damaged. On the next start it is moved aside, every record still readable reaches the
    hub with its own number and value, the rest is counted, and the `outbox_corrupt` event (with
    those figures) arrives at the hub."""
    await hub_dir.provision(bundles, "dev-c")
    bundle = bundles / "dev-c"
    async with FaultProxy("127.0.0.1", hub_dir.port) as proxy:
        proxy.partition()
        agent = await run_agent(bundle, f"broker.port={proxy.port}")
        try:
            await wait_until(lambda: (bundle / "state" / "outbox.db-wal").exists(), "the outbox made")
            await wait_backlog(bundle, 20_000, timeout=30)
            await stop_cleanly(agent)
        finally:
            await agent.stop()
    path = bundle / "state" / "outbox.db"
    before = outbox_state(bundle)
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        original = dict(db.execute("SELECT seq, value FROM records WHERE value IS NOT NULL").fetchall())
    finally:
        db.close()
    assert before.acked == 0
    scribble(path)

    agent = await run_agent(bundle)
    try:
        await agent.wait_for(r"dev-c online")
        await wait_until(lambda: bool(hub_events(hub_dir, "dev-c", "outbox_corrupt")), "outbox_corrupt at the hub")
        await wait_until(lambda: any(s > before.last_seq for s in hub_seqs(hub_dir.dir, "dev-c")), "new readings")
        [report] = hub_events(hub_dir, "dev-c", "outbox_corrupt")
        # Not the exactly-once check: the numbers a replaced outbox skips (its reservation) are no drop.
        await wait_drained(hub_dir.dir, bundle)
        await stop_cleanly(agent)
    finally:
        await agent.stop()
    assert isinstance(report["recovered"], int)
    assert isinstance(report["lost"], int)
    old = [s for s in hub_seqs(hub_dir.dir, "dev-c") if s <= before.last_seq]
    assert len(old) == report["recovered"] > before.last_seq - 1_000, "the readable unsent records did not arrive"
    assert report["recovered"] + report["lost"] == before.last_seq
    db = sqlite3.connect(f"file:{hub_dir.dir / 'hub.db'}?mode=ro", uri=True)
    try:
        arrived = dict(db.execute("SELECT seq, value FROM telemetry WHERE device = 'dev-c' AND seq <= ?",
                                  (before.last_seq,)).fetchall())
    finally:
        db.close()
    assert all(original[s] == v for s, v in arrived.items()), "a record read back from the damaged file changed"
    assert list(bundle.joinpath("state").glob("outbox.db.corrupt-*")), "the damaged file was not kept"


def corrupt_files(bundle: Path) -> list[Path]:
    return list((bundle / "state").glob("outbox.db.corrupt-*"))


async def test_a_locked_read_only_or_full_outbox_at_start_is_waited_for_never_declared_corrupt(
        hub_dir: HubDir, hub: Proc, bundles: Path) -> None:
    """A backlog waits in the outbox, on a tmpfs of its own. The agent is started three times:
    with an operator's `sqlite3` holding the file exclusively, with the file system remounted
    read-only, and with the disk full to the last byte. Each time it says what is wrong and waits
    (or, on the full disk, gives up its ballast and runs); nothing is moved aside, the numbers go
    on, and in the end the hub holds every one exactly once."""
    await hub_dir.provision(bundles, "dev-s")
    bundle = bundles / "dev-s"
    with tmpfs(bundle / "state", "16m") as state:
        async with FaultProxy("127.0.0.1", hub_dir.port) as proxy:
            proxy.partition()
            agent = await run_agent(bundle, f"broker.port={proxy.port}")
            try:
                await wait_until(lambda: (state / "outbox.db-wal").exists(), "the outbox made")
                await wait_backlog(bundle, 5_000, timeout=30)
                await stop_cleanly(agent)
            finally:
                await agent.stop()
        backlog = outbox_state(bundle)

        holder = sqlite3.connect(state / "outbox.db", isolation_level=None)
        try:
            holder.execute("PRAGMA locking_mode = EXCLUSIVE")
            holder.execute("BEGIN EXCLUSIVE")
            holder.execute("UPDATE meta SET value = value WHERE key = 'last_seq'")
            agent = await run_agent(bundle)
            await agent.wait_for(r"outbox: cannot open .*: another process holds a lock on it")
            await asyncio.sleep(2.0)  # a few more attempts: nothing to await, it must simply wait
            still_running(agent)
            assert corrupt_files(bundle) == []
        finally:
            holder.close()  # the lock goes
        try:
            await agent.wait_for(r"outbox: opened .*, after \d+ failed attempts")
            await agent.wait_for(r"dev-s online")
            await wait_streaming(hub_dir, bundle, above=backlog.last_seq)
            await stop_cleanly(agent)
        finally:
            await agent.stop()
        assert corrupt_files(bundle) == []
        assert outbox_state(bundle).last_seq > backlog.last_seq

        remount(state, "ro")
        try:
            agent = await run_agent(bundle)
            await agent.wait_for(r"outbox: cannot open .*: the file system is read-only")
            await asyncio.sleep(2.0)
            still_running(agent)
        finally:
            remount(state, "rw")
        try:
            await agent.wait_for(r"outbox: opened .*, after \d+ failed attempts")
            await agent.wait_for(r"dev-s online")
            await stop_cleanly(agent)
        finally:
            await agent.stop()
        assert corrupt_files(bundle) == []

        filler = fill(state)
        try:
            agent = await run_agent(bundle)
            await agent.wait_for(r"outbox: the disk is full: gave up the space held back for this")
            await agent.wait_for(r"dev-s online")
            await wait_streaming(hub_dir, bundle, above=outbox_state(bundle).last_seq)
        finally:
            filler.unlink()
        try:
            await finish(hub_dir, bundle, agent)
        finally:
            await agent.stop()
        assert corrupt_files(bundle) == []
