"""Two hub processes on one database and one broker: a shared ingest, one leader, and a kill -9."""

from __future__ import annotations

import asyncio
import re
import signal
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

from hub.broker import broker_process
from hub.config import HubPaths
from tests.integration.test_store_forward_faults import agent_argv, settle
from tests.support.exactly_once import QUIET, outbox_state
from tests.support.harness import HUB, HubDir, Proc, run_cli, start_agent, start_hub

DEVICES = tuple(f"rep-{i}" for i in range(6))
# Fast readings, prompt resends: what the killed replica held in flight comes again in 2 s.
FAST = ("sim.rate_hz=20", "report.default_deadband=0", "uplink.ack_timeout=2", "uplink.status_interval=1")
SHARE_TIMEOUT = 30.0  # both replicas have committed readings of every device
TAKEOVER_TIMEOUT = 20.0  # LEADER_TTL_S (10 s) + a renewal, on a loaded 2-core machine


def _ingest_by_hub(hub_dir: Path) -> dict[str, int]:
    db = sqlite3.connect(f"file:{hub_dir / 'hub.db'}?mode=ro", uri=True, timeout=10)
    try:
        return dict(db.execute("SELECT hub, SUM(records) FROM ingest_minutes GROUP BY hub").fetchall())
    finally:
        db.close()


def _stored(hub_dir: Path) -> int:
    db = sqlite3.connect(f"file:{hub_dir / 'hub.db'}?mode=ro", uri=True, timeout=10)
    try:
        return int(db.execute("SELECT (SELECT COUNT(*) FROM telemetry) + (SELECT COUNT(*) FROM events)").fetchone()[0])
    finally:
        db.close()


async def _wait(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        await asyncio.sleep(0.2)


async def test_two_replicas_share_the_ingest_and_one_carries_on_after_a_kill(hub_dir: HubDir, bundles: Path) -> None:
    config = hub_dir.dir / "hub.toml"
    config.write_text(re.sub(r"(?m)^replicas = \[\]", 'replicas = ["b"]', config.read_text()))
    await hub_dir.provision(bundles, *DEVICES)
    primary = await start_hub(hub_dir)
    replica = agents = None
    try:
        await primary.wait_for(r"this hub process \(hub\.test\) leads the region")
        replica = await Proc("replica", [HUB, "-v", "run", "--dir", str(hub_dir.dir), "--replica", "b"]).start()
        await replica.wait_for(r"hub ready: hub\.test\.b subscribed")
        await replica.wait_for(r"hub\.test leads the region")
        agents = [await start_agent(bundles / d / "agent.toml", *FAST, name=d) for d in DEVICES]
        for device in DEVICES:
            await primary.wait_for(rf"device {device} is online", timeout=SHARE_TIMEOUT)

        # Shared out: both processes commit readings, and no message is taken in by both.
        await _wait(lambda: len(_ingest_by_hub(hub_dir.dir)) == 2 and min(_ingest_by_hub(hub_dir.dir).values()) > 200,
                    SHARE_TIMEOUT, f"both replicas ingesting: {_ingest_by_hub(hub_dir.dir)}")
        for proc in (primary, replica):
            proc.signal(signal.SIGSTOP)  # a still picture: every commit counted on both sides
        try:
            shares = _ingest_by_hub(hub_dir.dir)
            assert sum(shares.values()) == _stored(hub_dir.dir), shares  # nothing committed twice
        finally:
            for proc in (primary, replica):
                proc.signal(signal.SIGCONT)

        # kill -9 of the leader (the primary; its broker, a child of its own, keeps running).
        killed = time.monotonic()
        primary.signal(signal.SIGKILL)
        await replica.wait_for(r"this hub process \(hub\.test\.b\) leads the region", timeout=TAKEOVER_TIMEOUT)
        print(f"replica b leads {time.monotonic() - killed:.1f} s after the kill -9 of the primary")
        before = _ingest_by_hub(hub_dir.dir)["hub.test.b"]
        await _wait(lambda: _ingest_by_hub(hub_dir.dir)["hub.test.b"] > before + 500, SHARE_TIMEOUT,
                    "the replica carrying the whole load")

        for device, agent in zip(DEVICES, agents, strict=True):
            await agent.stop()
            assert outbox_state(bundles / device).last_seq > 0
        agents = None
        # Started again, quietly (one reading, then none), to deliver what is left through the
        # replica, and stopped: every reading once, and nothing left in any outbox.
        await asyncio.gather(*(settle(hub_dir, bundles / d, agent_argv(bundles / d, *FAST, *QUIET)) for d in DEVICES))
    finally:
        for proc in [*(agents or []), *([replica] if replica else []), primary]:
            await proc.stop()
        orphan = broker_process(HubPaths(hub_dir.dir.resolve()))
        if orphan is not None:  # the killed primary's broker
            orphan.kill()
    code, out, err = await run_cli(HUB, "status", "--dir", str(hub_dir.dir))
    assert code == 0, err
    assert re.search(r"hub\.test \d+%, hub\.test\.b \d+%", out), out  # each process's share of the ingest


async def test_a_replica_hub_toml_does_not_list_is_refused_in_words(hub_dir: HubDir) -> None:
    code, _, err = await run_cli(HUB, "run", "--dir", str(hub_dir.dir), "--replica", "nope")
    assert code == 2
    assert "does not list the replica 'nope'" in err
    assert "add it there" in err
