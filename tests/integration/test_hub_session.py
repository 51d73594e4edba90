"""A lone hub's MQTT session outlives the hub process: what devices send while it is away waits
at the broker and reaches the hub when it comes back, without the devices' resend."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from hub.broker import broker_executable
from hub.config import HubPaths
from tests.integration.test_store_forward_faults import finish, stop_cleanly, wait_streaming, wait_until
from tests.support.exactly_once import hub_watermark, outbox_state
from tests.support.harness import HubDir, Proc, start_agent, start_hub

pytestmark = pytest.mark.integration

# The resend comes after a minute: whatever reaches the hub sooner came through its session.
AGENT = ("sim.rate_hz=20", "report.default_deadband=0", "uplink.ack_timeout=60", "uplink.status_interval=1")
DELIVERY_TIMEOUT = 15.0  # from "hub ready" to the backlog at the hub, on a loaded 2-core machine


async def start_external_broker(paths: HubPaths, workdir: Path) -> Proc:
    """The operator's own Mosquitto (broker.mode = "external"), run with the files `init` wrote,
    logging each PUBLISH it receives so the test can see what devices sent and when."""
    conf = workdir / "mosquitto.conf"
    conf.write_text(paths.broker_conf.read_text() + "\nlog_type debug\n")
    conf.chmod(0o644)
    broker = await Proc("mosquitto", [broker_executable("mosquitto"), "-c", str(conf)]).start()
    await broker.wait_for(r"mosquitto version .* running")
    paths.config.write_text(re.sub(r'mode = "managed"', 'mode = "external"', paths.config.read_text()))
    return broker


async def test_a_lone_hub_gets_what_devices_sent_while_it_was_stopped(hub_dir: HubDir, bundles: Path,
                                                                       workdir: Path) -> None:
    paths = HubPaths(hub_dir.dir.resolve())
    await hub_dir.provision(bundles, "dev-s")
    bundle = bundles / "dev-s"
    broker = await start_external_broker(paths, workdir)
    hub = agent = None
    try:
        hub = await start_hub(hub_dir)
        agent = await start_agent(bundle / "agent.toml", *AGENT)
        await hub.wait_for(r"device dev-s is online")
        await wait_streaming(hub_dir, bundle)
        await stop_cleanly(hub)
        away = broker.mark()
        # The device goes on sending: the broker takes a batch for the stopped hub.
        await broker.wait_for(r"Received PUBLISH from dev-s .*up/telemetry", after=away)
        sent = outbox_state(bundle).last_seq  # that batch holds readings up to here at most
        before = hub_watermark(hub_dir.dir, "dev-s")
        assert before < sent
        hub = await start_hub(hub_dir)
        await wait_until(lambda: hub_watermark(hub_dir.dir, "dev-s") >= sent,
                         f"what dev-s sent while the hub was stopped (through seq {sent}) at the hub",
                         DELIVERY_TIMEOUT)
        assert not any("no acknowledgment" in line for line in agent.lines), "the device had to resend"
        await finish(hub_dir, bundle, agent)
        agent = None
    finally:
        for proc in (agent, hub, broker):
            if proc is not None:
                await proc.stop()
