"""CRL upkeep, an external broker, and publishes that must fail rather than hang."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import re
import signal
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from edgefleet.errors import ConnectionLost
from edgefleet.runtime.files import write_atomic
from edgefleet.wire.protocol import up_topic
from hub.broker import broker_executable
from hub.config import HubPaths, load_hub
from hub.pki.authority import Authority
from hub.pki.revocation import crl_due_in
from tests.support.harness import HUB, HubDir, Proc, connect, device_identity, run_cli, start_agent

pytestmark = pytest.mark.integration


def crl_next_update(path: Path) -> dt.datetime:
    crl = x509.load_pem_x509_crl(path.read_bytes())
    assert crl.next_update_utc is not None
    return crl.next_update_utc


def test_crl_due_only_past_its_renewal_point(hub_dir: HubDir) -> None:
    paths, config = load_hub(hub_dir.dir)
    now = dt.datetime.now(dt.UTC)
    assert crl_due_in(paths, config, now) > 0  # fresh from init: 30 days left
    assert crl_due_in(paths, config, now + dt.timedelta(days=16)) <= 0  # under half its life left
    paths.crl.write_bytes(b"garbage")
    assert crl_due_in(paths, config, now) <= 0


async def test_hub_reissues_a_crl_close_to_next_update(hub_dir: HubDir, bundles: Path) -> None:
    """An expired CRL locks out the whole fleet: the hub must replace it well before."""
    paths, config = load_hub(hub_dir.dir)
    ca = Authority.load(paths.ca_key, paths.ca_cert)
    short = ca.issue_crl([], dt.timedelta(hours=1))
    write_atomic(paths.crl, short.public_bytes(Encoding.PEM), 0o644)
    await hub_dir.provision(bundles, "dev-c")
    hub = await Proc("hub", [HUB, "run", "--dir", str(hub_dir.dir)]).start()
    try:
        await hub.wait_for(r"CRL re-issued")
        await hub.wait_for(r"hub ready")
        left = crl_next_update(paths.crl) - dt.datetime.now(dt.UTC)
        assert left > dt.timedelta(days=config.pki.crl_days - 1)
        # Devices still get in with the new CRL.
        session = await connect(device_identity(bundles / "dev-c"), hub_dir.port, "dev-c")
        await session.close()
    finally:
        await hub.stop()


async def test_external_broker(hub_dir: HubDir, bundles: Path) -> None:
    """broker.mode = "external": edge-hub runs no Mosquitto; revoke uses reload_command."""
    paths = HubPaths(hub_dir.dir.resolve())
    await hub_dir.provision(bundles, "dev-e", "dev-f")
    # The operator's own Mosquitto, here started by the test with the files init wrote.
    broker = await Proc("mosquitto", [broker_executable("mosquitto"), "-c", str(paths.broker_conf)]).start()
    hub = agent = None
    try:
        await broker.wait_for(r"mosquitto version .* running")
        text = paths.config.read_text()
        text = re.sub(r'mode = "managed"', 'mode = "external"', text)
        text = re.sub(r"reload_command = \[\]", f'reload_command = ["kill", "-HUP", "{broker.pid}"]', text)
        paths.config.write_text(text)
        hub = await Proc("hub", [HUB, "run", "--dir", str(hub_dir.dir)]).start()
        await hub.wait_for(r"hub ready")
        assert not paths.broker_pid.exists()
        agent = await start_agent(bundles / "dev-e" / "agent.toml")
        await hub.wait_for(r"device dev-e is online")
        code, out, err = await run_cli(HUB, "revoke", "--dir", str(hub_dir.dir), "dev-e")
        assert code == 0, err
        assert "session was closed" in out
        await hub.wait_for(r"device dev-e is offline", timeout=5)
        # The broker reloaded on our command and kept running.
        assert broker.proc is not None
        assert broker.proc.returncode is None
    finally:
        for proc in (agent, hub, broker):
            if proc is not None:
                await proc.stop()


async def test_inflight_publish_fails_when_the_connection_drops(hub_dir: HubDir, hub: Proc, bundles: Path) -> None:
    """A QoS 1 publish waiting for PUBACK raises ConnectionLost when the link dies; it never hangs."""
    await hub_dir.provision(bundles, "dev-p")
    session = await connect(device_identity(bundles / "dev-p"), hub_dir.port, "dev-p")
    pid = int((hub_dir.dir / "run" / "mosquitto.pid").read_text())
    try:
        os.kill(pid, signal.SIGSTOP)  # the broker stops answering: no PUBACK
        publish = asyncio.create_task(session.publish(up_topic("dev-p", "telemetry"), b"{}", qos=1))
        done, _ = await asyncio.wait({publish}, timeout=0.5)
        assert not done  # genuinely in flight
        os.kill(pid, signal.SIGKILL)  # now the connection drops
        async with asyncio.timeout(5):
            with pytest.raises(ConnectionLost):
                await publish
        with pytest.raises(ConnectionLost):  # and a publish after the drop fails at once
            await session.publish(up_topic("dev-p", "telemetry"), b"{}", qos=1)
    finally:
        await session.close()
