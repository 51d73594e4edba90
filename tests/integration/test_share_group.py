"""A fleet certificate cannot take a share of the hub's messages (issue 15, item 2).

Mosquitto grants every SUBSCRIBE; only delivery is checked against the ACL. A device that joins
the hub's shared subscription group is dealt its turn of every device's messages, which the
broker then drops while the publishers get PUBACK Success. The hub's group name is a secret of
its directory, so an intruder can only make groups of its own; the hub tells who tried.
"""

from __future__ import annotations

import asyncio
import json
import re
import urllib.request
from pathlib import Path

import pytest

from edgefleet.wire.protocol import TOPIC_ROOT, UP_FILTER
from tests.integration.test_store_forward_faults import settle, stop_cleanly, wait_until
from tests.support.exactly_once import hub_watermark
from tests.support.harness import HUB, HubDir, Proc, connect, device_identity, run_cli, start_agent

pytestmark = pytest.mark.integration

HONEST = ("hon-1", "hon-2")
INTRUDER = "intruder"
# Every way a device could reach for the hub's messages: the group name the docs used to give,
# a group of its own over everything, the bare filters. The old name comes first: the hub logs
# subscriptions in order, so seeing the last one logged means all were.
STEALING = [
    f"$share/hub-test/{UP_FILTER}",
    f"$share/hub-test/{TOPIC_ROOT}/dev/+/presence",
    f"$share/mine/{TOPIC_ROOT}/#",
    UP_FILTER,
    "#",
]
# A batch a thief swallowed would be resent after 8 s: stream well past that (an honest ack takes
# milliseconds, so a resend means a lost batch, also on a loaded machine).
AGENT = ("sim.rate_hz=10", "report.default_deadband=0", "uplink.ack_timeout=8", "uplink.status_interval=1")
STREAM_S = 9.0  # of readings while the intruder is subscribed, then again after it left
READINGS_PER_S = 40  # sim.rate_hz x its 4 signals
STREAM_TIMEOUT = 40.0


async def stream_for(hub_dir: HubDir, seconds: float) -> None:
    """Wait until the hub has acknowledged `seconds` more of every honest device's readings."""
    for device in HONEST:
        target = hub_watermark(hub_dir.dir, device) + int(seconds * READINGS_PER_S)
        await wait_until(lambda d=device, t=target: hub_watermark(hub_dir.dir, d) >= t,
                         f"{device} acknowledged through {target}", STREAM_TIMEOUT)


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return response.read().decode()


async def test_a_device_cannot_take_a_share_of_the_hubs_messages(hub_dir: HubDir, hub: Proc, bundles: Path) -> None:
    await hub_dir.provision(bundles, *HONEST, INTRUDER)
    # A persistent session: whatever share it joined outlives its connection.
    thief = await connect(device_identity(bundles / INTRUDER), hub_dir.port, INTRUDER,
                          clean_start=False, session_expiry=3600)
    agents: list[Proc] = []
    try:
        try:
            await thief.subscribe([(f, 1) for f in STEALING])
            await hub.wait_for(rf"device {INTRUDER} subscribed to {re.escape(STEALING[-1])}")
            for device in HONEST:
                agents.append(await start_agent(bundles / device / "agent.toml", *AGENT, name=device))
            for device in HONEST:
                await hub.wait_for(rf"device {device} is online")
            await stream_for(hub_dir, STREAM_S)
            assert thief.messages.empty(), thief.messages.get_nowait()
        finally:
            await thief.close()
        await stream_for(hub_dir, STREAM_S)  # its session lingers at the broker
        for agent in agents:
            resends = [line for line in agent.lines if "no acknowledgment" in line]
            assert not resends, f"{agent.name} had to resend: {resends}"
            await stop_cleanly(agent)
        agents = []
    finally:
        for agent in agents:
            await agent.stop()
    for device in HONEST:
        await settle(hub_dir, bundles / device)  # every reading at the hub exactly once

    # The operator is told who tried, and with what.
    warned = [line for line in hub.lines if "outside its own" in line]
    assert all(INTRUDER in line for line in warned), warned  # the honest devices' own subscriptions are fine
    code, out, err = await run_cli(HUB, "events", "--dir", str(hub_dir.dir), "--device", "hub.test",
                                   "--kind", "foreign_subscription", "--json")
    assert code == 0, err
    noticed = {(e["body"]["device"], e["body"]["filter"]) for e in map(json.loads, out.splitlines())}
    assert noticed == {(INTRUDER, f) for f in STEALING}, noticed
    metrics = await asyncio.to_thread(scrape, hub_dir.metrics_port)
    assert (f'edgefleet_foreign_subscriptions_total{{device="{INTRUDER}",region="test"}} {len(STEALING)}.0'
            in metrics), [line for line in metrics.splitlines() if "foreign" in line]
