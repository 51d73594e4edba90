"""Presence, Last Will, revocation of a live session, broker supervision — real processes."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path

import psutil
import pytest

from edgefleet.errors import ConnectRefused
from tests.support.harness import HUB, HubDir, Proc, connect, device_identity, run_cli, start_agent

pytestmark = pytest.mark.integration


async def devices(hub_dir: HubDir) -> dict[str, dict[str, object]]:
    code, out, err = await run_cli(HUB, "devices", "--dir", str(hub_dir.dir), "--json")
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    return {row["device"]: row for row in rows}


async def test_agents_come_online_with_presence_fields(hub_dir: HubDir, hub: Proc, bundles: Path) -> None:
    await hub_dir.provision(bundles, "dev-a", "dev-b", extra=("--tag", "site=lab"))
    agents = [await start_agent(bundles / d / "agent.toml", name=d) for d in ("dev-a", "dev-b")]
    try:
        for d in ("dev-a", "dev-b"):
            await hub.wait_for(rf"device {d} is online")
        rows = await devices(hub_dir)
        for d in ("dev-a", "dev-b"):
            row = rows[d]
            assert row["online"] is True
            assert row["profile"] == "sim"
            assert row["tags"] == {"site": "lab"}
            assert row["last_seen"] is not None
            assert row["cert_expires"] is not None
            for key in ("policy_version", "backlog", "dropped"):
                assert key in row
    finally:
        for agent in agents:
            await agent.stop()
    # A clean stop publishes the Last Will on purpose: the hub sees the device leave.
    for d in ("dev-a", "dev-b"):
        await hub.wait_for(rf"device {d} is offline")


async def test_kill_9_shows_offline_within_keepalive(hub_dir: HubDir, hub: Proc, bundles: Path) -> None:
    keepalive = 4
    await hub_dir.provision(bundles, "dev-k")
    agent = await start_agent(bundles / "dev-k" / "agent.toml", f"broker.keepalive={keepalive}")
    try:
        await hub.wait_for(r"device dev-k is online")
        mark = hub.mark()
        killed = time.monotonic()
        agent.signal(signal.SIGKILL)
        await hub.wait_for(r"device dev-k is offline", timeout=1.5 * keepalive, after=mark)
        assert time.monotonic() - killed <= 1.5 * keepalive
        assert (await devices(hub_dir))["dev-k"]["online"] is False
    finally:
        await agent.stop()


async def test_hung_agent_shows_offline_by_keepalive(hub_dir: HubDir, hub: Proc, bundles: Path) -> None:
    """SIGSTOP keeps the TCP connection open: only the broker's keepalive can notice."""
    keepalive = 2
    await hub_dir.provision(bundles, "dev-h")
    agent = await start_agent(bundles / "dev-h" / "agent.toml", f"broker.keepalive={keepalive}")
    try:
        await hub.wait_for(r"device dev-h is online")
        mark = hub.mark()
        stopped = time.monotonic()
        agent.signal(signal.SIGSTOP)
        # Mosquitto 2.0.11 sweeps keepalives coarsely: a silent client is dropped later than
        # 1.5 x keepalive (measured 4.8-5.0 s at k=2, 11 s at k=4 and k=6; docs/security.md).
        bound = 3 * keepalive + 2.5
        await hub.wait_for(r"device dev-h is offline", timeout=bound, after=mark)
        print(f"hung agent seen offline after {time.monotonic() - stopped:.2f} s (keepalive {keepalive} s)")
    finally:
        agent.signal(signal.SIGCONT)
        await agent.stop()


async def test_revoke_closes_live_session_and_locks_out(hub_dir: HubDir, hub: Proc, bundles: Path) -> None:
    await hub_dir.provision(bundles, "dev-r", "dev-ok")
    victim = await start_agent(bundles / "dev-r" / "agent.toml", name="dev-r")
    bystander = await start_agent(bundles / "dev-ok" / "agent.toml", name="dev-ok")
    try:
        await hub.wait_for(r"device dev-r is online")
        await hub.wait_for(r"device dev-ok is online")
        mark, started = hub.mark(), time.monotonic()
        code, out, err = await run_cli(HUB, "revoke", "--dir", str(hub_dir.dir), "dev-r")
        assert code == 0, err
        assert "session was closed" in out
        await hub.wait_for(r"device dev-r is offline", timeout=5.0, after=mark)
        assert time.monotonic() - started <= 5.0
        # The agent is told why, and waits the longest before trying again.
        await victim.wait_for(r"certificate is revoked.*retrying in 60\.0 s", timeout=10)
        with pytest.raises(ConnectRefused) as refused:
            await connect(device_identity(bundles / "dev-r"), hub_dir.port, "dev-r")
        assert refused.value.auth
        rows = await devices(hub_dir)
        assert rows["dev-r"]["online"] is False
        assert rows["dev-ok"]["online"] is True  # nobody else was disturbed
        assert not [line for line in hub.lines[mark:] if "dev-ok is offline" in line]
    finally:
        await victim.stop()
        await bystander.stop()


async def test_revoke_without_running_broker_updates_crl(hub_dir: HubDir, bundles: Path) -> None:
    await hub_dir.provision(bundles, "dev-x")
    code, out, _ = await run_cli(HUB, "revoke", "--dir", str(hub_dir.dir), "dev-x")
    assert code == 0
    assert "applies when it" in out
    code, _, err = await run_cli(HUB, "revoke", "--dir", str(hub_dir.dir), "no-such-device")
    assert code == 2
    assert "no device 'no-such-device'" in err


async def test_broker_killed_is_restarted_and_everyone_reconnects(hub_dir: HubDir, hub: Proc, bundles: Path) -> None:
    await hub_dir.provision(bundles, "dev-s")
    agent = await start_agent(bundles / "dev-s" / "agent.toml")
    try:
        await hub.wait_for(r"device dev-s is online")
        pid = int((hub_dir.dir / "run" / "mosquitto.pid").read_text())
        mark = hub.mark()
        psutil.Process(pid).kill()
        await hub.wait_for(r"mosquitto exited", after=mark)
        # The hub subscribes again on its new connection and the agent announces itself.
        await hub.wait_for(r"hub ready", after=mark, timeout=30)
        await hub.wait_for(r"device dev-s is online", after=mark, timeout=30)
        new_pid = int((hub_dir.dir / "run" / "mosquitto.pid").read_text())
        assert new_pid != pid
    finally:
        await agent.stop()


async def test_hub_stop_stops_its_broker(hub_dir: HubDir) -> None:
    proc = await Proc("hub", [HUB, "run", "--dir", str(hub_dir.dir)]).start()
    await proc.wait_for(r"hub ready")
    broker = psutil.Process(int((hub_dir.dir / "run" / "mosquitto.pid").read_text()))
    assert broker.is_running()
    assert await proc.stop() == 0
    await asyncio.to_thread(broker.wait, 5)  # raises TimeoutExpired if the broker outlives the hub
    assert not (hub_dir.dir / "run" / "mosquitto.pid").exists()
