"""The hub with its state in PostgreSQL: a private cluster (tests/support/postgres.py), real hub processes,
real Mosquitto and agents. Two replicas run from two folders that share nothing on disk."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from hub.broker import broker_process
from hub.config import HubPaths
from tests.integration.test_coordination import (
    action_spans,
    events,
    grants,
    most_at_once,
    of_rule,
    push_policy,
    rule,
)
from tests.integration.test_store_forward_faults import agent_argv, settle
from tests.support.exactly_once import QUIET, hub_rows, outbox_state
from tests.support.harness import HUB, HubDir, Proc, run_cli, start_agent, start_hub
from tests.support.inprocess import InProcessFleet
from tests.support.net import free_port
from tests.support.postgres import PostgresCluster

DEVICES = tuple(f"pg-{i}" for i in range(4))
# Fast readings, prompt resends: what a killed process held in flight comes again in 2 s.
FAST = ("sim.rate_hz=20", "report.default_deadband=0", "uplink.ack_timeout=2", "uplink.status_interval=1")
SHARE_TIMEOUT = 60.0  # both replicas have committed readings (2 busy cores, 6 engineers)
TAKEOVER_TIMEOUT = 30.0  # LEADER_TTL_S (10 s) + a renewal, on a loaded machine
OUTAGE_S = 3.0  # how long PostgreSQL stays down: several ingest retries and leadership renewals


@pytest.fixture
async def pg_hub_dir(workdir: Path, postgres_url: str) -> HubDir:
    hub = HubDir(workdir / "hub", free_port())
    code, _, err = await run_cli(HUB, "init", "--dir", str(hub.dir), "--region", hub.region, "--port",
                                 str(hub.port), "--host", "127.0.0.1", "--database", postgres_url)
    assert code == 0, err
    hub.set_metrics_port(free_port())
    return hub


async def replica_folder(pg_hub_dir: HubDir, workdir: Path) -> Path:
    """Replica b listed in hub.toml, and its folder "on another machine" (edge-hub replica create)."""
    config = pg_hub_dir.dir / "hub.toml"
    config.write_text(re.sub(r"(?m)^replicas = \[\]", 'replicas = ["b"]', config.read_text()))
    folder = workdir / "machine-b" / "hub"
    code, _, err = await run_cli(HUB, "replica", "create", "--dir", str(pg_hub_dir.dir), "--name", "b",
                                 "--out", str(folder))
    assert code == 0, err
    assert not (folder / "pki" / "ca.key").exists()  # the CA key stays with the primary
    assert (folder / "pki" / "hub-b.key").stat().st_mode & 0o777 == 0o600
    return folder


def ingest_by_hub(hub_dir: Path) -> dict[str, int]:
    return {str(h): int(n) for h, n in hub_rows(hub_dir, "SELECT hub, SUM(records) FROM ingest_minutes GROUP BY hub")}


def leaders(hub_dir: Path) -> list[tuple[str, float]]:
    return [(str(h), float(e)) for h, e in hub_rows(
        hub_dir, "SELECT holder, expires_at FROM leadership WHERE role = 'region'")]


async def wait(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        await asyncio.sleep(0.2)  # the databases announce nothing: poll, bounded


async def test_a_hub_on_postgresql_stores_and_serves_the_operator(pg_hub_dir: HubDir, bundles: Path) -> None:
    await pg_hub_dir.provision(bundles, "pg-a")
    assert not (pg_hub_dir.dir / "hub.db").exists()  # nothing of the hub's state on this disk
    hub = await start_hub(pg_hub_dir)
    agent = None
    try:
        agent = await start_agent(bundles / "pg-a" / "agent.toml", *FAST, name="pg-a")
        await hub.wait_for(r"device pg-a is online")
        await wait(lambda: len(hub_rows(pg_hub_dir.dir, "SELECT seq FROM telemetry WHERE device = 'pg-a'")) > 50,
                   SHARE_TIMEOUT, "readings of pg-a in PostgreSQL")
        code, out, err = await run_cli(HUB, "telemetry", "--dir", str(pg_hub_dir.dir), "--device", "pg-a",
                                       "--limit", "5", "--json")
        assert code == 0, err
        assert len(out.splitlines()) == 5
        code, out, err = await run_cli(HUB, "status", "--dir", str(pg_hub_dir.dir))
        assert code == 0, err
        assert re.search(r"^database: postgresql postgresql://postgres@127\.0\.0\.1:\d+/t_", out, re.M), out
        code, out, err = await run_cli(HUB, "devices", "--dir", str(pg_hub_dir.dir))
        assert code == 0, err
        assert "pg-a" in out
        code, out, err = await run_cli(HUB, "status", "--dir", str(pg_hub_dir.dir), "--json")
        assert code == 0, err
        assert json.loads(out)["figures"]["ingest"]["records_per_s"] > 0, out  # the figures, from PostgreSQL
        scrape = await asyncio.to_thread(lambda: urllib.request.urlopen(  # our loopback endpoint
            f"http://127.0.0.1:{pg_hub_dir.metrics_port}/metrics", timeout=30).read().decode())
        assert 'edgefleet_devices_online{region="test"} 1.0' in scrape
        assert re.search(r'edgefleet_ingest_acked_records_total\{device="pg-a",region="test"\} [1-9]', scrape), scrape
        await agent.stop()
        agent = None
        await settle(pg_hub_dir, bundles / "pg-a", agent_argv(bundles / "pg-a", *FAST, *QUIET))
    finally:
        if agent is not None:
            await agent.stop()
        await hub.stop()
    assert not (pg_hub_dir.dir / "hub.db").exists()


async def test_two_replicas_on_two_machines_survive_kills_of_each_and_of_postgresql(
        pg_hub_dir: HubDir, bundles: Path, workdir: Path, postgres_cluster: PostgresCluster) -> None:
    """The primary's directory and replica b's folder share nothing on disk; devices stream throughout.
    kill -9 of b (restarted), of PostgreSQL (restarted), of the primary (restarted): every reading at the
    hub exactly once, at most one leader row at any time, and both processes ingesting at the end."""
    folder = await replica_folder(pg_hub_dir, workdir)
    await pg_hub_dir.provision(bundles, *DEVICES)
    replica_argv = [HUB, "-v", "run", "--dir", str(folder)]
    primary = await start_hub(pg_hub_dir)
    replica: Proc | None = None
    agents: list[Proc] = []
    try:
        await primary.wait_for(r"this hub process \(hub\.test\) leads the region")
        replica = await Proc("replica", replica_argv).start()
        await replica.wait_for(r"hub ready: hub\.test\.b subscribed")
        agents = [await start_agent(bundles / d / "agent.toml", *FAST, name=d) for d in DEVICES]
        await wait(lambda: len(ingest_by_hub(pg_hub_dir.dir)) == 2 and min(ingest_by_hub(pg_hub_dir.dir).values())
                   > 100, SHARE_TIMEOUT, f"both replicas ingesting: {ingest_by_hub(pg_hub_dir.dir)}")

        # kill -9 of the replica, and its restart from its own folder.
        replica.signal(signal.SIGKILL)
        await replica.stop()
        replica = await Proc("replica", replica_argv).start()
        await replica.wait_for(r"hub ready: hub\.test\.b subscribed")

        # kill -9 of PostgreSQL: both hubs stop acknowledging, say so, and resume once it is back.
        before = sum(ingest_by_hub(pg_hub_dir.dir).values())
        mark = primary.mark()
        postgres_cluster.kill()
        await primary.wait_for(r"hub database .* unreachable|hub database unavailable", timeout=SHARE_TIMEOUT,
                               after=mark)
        await asyncio.sleep(OUTAGE_S)  # an outage of some length: the devices buffer meanwhile
        postgres_cluster.start_again()
        await wait(lambda: sum(ingest_by_hub(pg_hub_dir.dir).values()) > before + 500, SHARE_TIMEOUT,
                   "the ingest resuming after PostgreSQL came back")

        # kill -9 of the primary (the leader): b takes the lead; the primary, restarted, ingests again.
        primary.signal(signal.SIGKILL)
        await primary.stop()
        await replica.wait_for(r"this hub process \(hub\.test\.b\) leads the region", timeout=TAKEOVER_TIMEOUT)
        assert [h for h, _ in leaders(pg_hub_dir.dir)] == ["hub.test.b"]
        primary = await start_hub(pg_hub_dir)
        shares = ingest_by_hub(pg_hub_dir.dir)
        await wait(lambda: ingest_by_hub(pg_hub_dir.dir)["hub.test"] > shares["hub.test"] + 100, SHARE_TIMEOUT,
                   "the restarted primary ingesting again")

        for device, agent in zip(DEVICES, agents, strict=True):
            await agent.stop()
            assert outbox_state(bundles / device).last_seq > 0
        agents = []
        await asyncio.gather(*(settle(pg_hub_dir, bundles / d, agent_argv(bundles / d, *FAST, *QUIET))
                               for d in DEVICES))
        assert len(leaders(pg_hub_dir.dir)) == 1
    finally:
        for proc in [*agents, *([replica] if replica else []), primary]:
            await proc.stop()
        orphan = broker_process(HubPaths(pg_hub_dir.dir.resolve()))
        if orphan is not None:  # the killed primary's broker
            orphan.kill()
    code, out, err = await run_cli(HUB, "status", "--dir", str(folder))  # the operator's view from b's folder
    assert code == 0, err
    assert "database: postgresql" in out



LEASE_FLEET = 12
LEASE_SETS = ("uplink.status_interval=5", "uplink.ack_timeout=5", "outbox.synchronous=normal")


@pytest.mark.timeout(240)
async def test_a_lease_shared_by_two_replicas_is_never_held_past_its_limit(
        pg_hub_dir: HubDir, bundles: Path, workdir: Path) -> None:
    """Twelve complete agents fire one rule at once behind a lease of limit 2, their requests shared out
    between the primary and replica b (separate folders, one PostgreSQL): the audit never shows more than
    two actions at a time, and the fencing tokens are 1..12, one per action."""
    folder = await replica_folder(pg_hub_dir, workdir)
    devices = [f"dev-{i:02d}" for i in range(LEASE_FLEET)]
    await pg_hub_dir.provision(bundles, *devices)
    primary = await start_hub(pg_hub_dir)
    replica = await Proc("replica", [HUB, "-v", "run", "--dir", str(folder)]).start()
    try:
        await replica.wait_for(r"hub ready: hub\.test\.b subscribed")
        async with InProcessFleet([bundles / d for d in devices], LEASE_SETS) as fleet:
            await fleet.wait_online(timeout=60)
            version = await push_policy(pg_hub_dir, primary, rule(
                "contend", args="{ sleep_s = 0.3 }", lease='{ name = "pump", limit = 2, wait_s = 300 }'),
                timeout=60)
            await fleet.wait_policy(version, timeout=30)

            def not_done() -> list[str]:
                done = {str(d) for (d,) in hub_rows(
                    pg_hub_dir.dir, "SELECT device FROM events WHERE kind = 'action_succeeded'")}
                return [d for d in devices if d not in done]

            await fleet.wait_until("every device acted and its audit reached the hub", not_done, timeout=120,
                                   every=0.5)
        granted_by = {p.name: len(grants(p)) for p in (primary, replica)}
    finally:
        await replica.stop()
        await primary.stop()
    evts = await events(pg_hub_dir)
    spans = action_spans(evts, "contend")
    assert sorted(d for _, _, d, _ in spans) == devices, "one action per device"
    assert most_at_once(spans) <= 2, "more than `limit` devices acted at once"
    tokens = sorted(e["body"]["lease_token"] for e in of_rule(evts, "contend", "action_started"))
    assert tokens == list(range(1, LEASE_FLEET + 1)), "tokens: distinct, one per action, none lost"
    print(f"grants by process: {granted_by}")


async def test_replica_create_and_init_refuse_in_one_sentence(pg_hub_dir: HubDir, workdir: Path) -> None:
    local = workdir / "sqlite-hub"  # a hub whose state is in hub.db
    code, _, err = await run_cli(HUB, "init", "--dir", str(local), "--region", "r", "--host", "127.0.0.1",
                                 "--port", str(free_port()))
    assert code == 0, err
    code, _, err = await run_cli(HUB, "replica", "create", "--dir", str(local), "--name", "b",
                                 "--out", str(workdir / "b1"))
    assert code == 2
    assert "keeps the hub's state in hub.db" in err
    assert "edge-hub init --database" in err
    code, _, err = await run_cli(HUB, "replica", "create", "--dir", str(pg_hub_dir.dir), "--name", "nope",
                                 "--out", str(workdir / "b2"))
    assert code == 2
    assert "does not list the replica 'nope' in [hub] replicas" in err
    assert not (workdir / "b1").exists()
    assert not (workdir / "b2").exists()

    down = free_port()  # nothing listens there
    target = workdir / "never"
    code, _, err = await run_cli(HUB, "init", "--dir", str(target), "--region", "r", "--host", "127.0.0.1",
                                 "--database", f"postgresql://postgres@127.0.0.1:{down}/hub")
    assert code == 1
    assert f"cannot reach the hub database postgresql://postgres@127.0.0.1:{down}/hub" in err
    assert not target.exists()  # nothing written before the database answered

    config = local / "hub.toml"
    config.write_text(config.read_text().replace('url = ""', 'url = "mysql://x@y/z"'))
    code, _, err = await run_cli(HUB, "devices", "--dir", str(local))
    assert code == 2
    assert "[database] url must be empty" in err
    assert "'mysql'" in err


async def test_devices_enroll_from_one_image_into_postgresql_and_export_reads_them(
        pg_hub_dir: HubDir, workdir: Path) -> None:
    """Enrollment, `enroll list` and `export` on a hub whose state is in PostgreSQL: two boards of one
    image enroll with keys of their own, stream, and their readings come back out of `export`."""
    from tests.integration.test_enrollment import (
        ENROLL_TIMEOUT,
        board,
        configure_enrollment,
        create_image,
        start_board,
    )

    configure_enrollment(pg_hub_dir)
    image = workdir / "image"
    enrollment = await create_image(pg_hub_dir, image, "--tag", "site=north", "--max-devices", "2")
    names = ["pg-e1", "pg-e2"]
    hub = await start_hub(pg_hub_dir)
    agents: list[Proc] = []
    try:
        await hub.wait_for(r"enrollment at https://")
        agents = list(await asyncio.gather(*(start_board(board(image, workdir / "boards", n), n) for n in names)))
        for agent in agents:
            await agent.wait_for(r"enrolled: serial", timeout=ENROLL_TIMEOUT)
            await agent.wait_for(r"online \(profile sim", timeout=ENROLL_TIMEOUT)
        await wait(lambda: all(hub_rows(pg_hub_dir.dir, "SELECT COUNT(*) FROM telemetry WHERE device = ?", (n,))[0][0]
                               for n in names), SHARE_TIMEOUT, "readings of both enrolled boards in PostgreSQL")
        assert sorted(r[0] for r in hub_rows(pg_hub_dir.dir, "SELECT device FROM enrolled WHERE enrollment = ?",
                                             (enrollment,))) == names
        assert not (pg_hub_dir.dir / "hub.db").exists()
        code, out, err = await run_cli(HUB, "enroll", "list", "--dir", str(pg_hub_dir.dir), "--json")
        assert code == 0, err
        [listed] = [e for e in map(json.loads, out.splitlines()) if e["id"] == enrollment]
        assert (listed["enrolled"], listed["max_devices"], listed["tags"]) == (2, 2, {"site": "north"})
        code, out, err = await run_cli(HUB, "export", "--dir", str(pg_hub_dir.dir), "--since", "1h",
                                       "--device", names[0], "--format", "jsonl")
        assert code == 0, err
        exported = [json.loads(line) for line in out.splitlines()]
        assert exported, "no reading exported"
        assert {row["device"] for row in exported} == {names[0]}
    finally:
        for agent in agents:
            await agent.stop()
        await hub.stop()
