"""Certificate lifecycle end to end: real hub, real Mosquitto, real agents (docs/security.md,
"Certificate lifecycle").

Lifetimes are seconds here (hub.toml takes fractions of a day), so an agent renews every
ten seconds or so while it streams 2,000 readings a second; every test that streams ends
with the exactly-once check read from the real databases (tests/support/exactly_once.py).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import re
import signal
import sqlite3
import ssl
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, load_pem_private_key

from edge_agent.identity.certinfo import read_certificate, read_certificate_file
from edge_agent.identity.tls import NEXT, RENEWED, IdentityFiles
from edgefleet.errors import PublishRefused
from edgefleet.mqtt.session import MqttSession, TlsIdentity
from edgefleet.runtime.files import write_atomic
from edgefleet.wire.protocol import CERT, CertRefused, CertRequest, down_filter, pack, unpack_cert_reply, up_topic
from hub.config import HubPaths
from hub.db.store import HubStore
from hub.pki.authority import Authority, cert_pem, host_names, key_pem
from tests.integration.test_check import check_after_expiry, needs_faketime
from tests.integration.test_store_forward_faults import STREAM, agent_argv, finish, kill_9
from tests.support.harness import HubDir, Proc, connect, device_identity, start_hub
from tests.unit.test_unit_renewal import csr_for

pytestmark = pytest.mark.integration

DAY_S = 86400.0
DEVICE_LIFETIME_S = 18.0  # renewed every ~12 s: several renewals in a short test, with room for a loaded machine
RENEWALS = 3
RENEWAL_TIMEOUT = 2 * DEVICE_LIFETIME_S  # from one renewal to the next: two thirds of a lifetime, and then some
HUB_LIFETIME_S = 12.0  # the broker's certificate and the CRL in the reload test
ARRIVAL = 5.0  # a message or a PUBACK that must come
NOT_AUTHORIZED = 135

IN_USE = r"renewal: certificate serial (\w+), .* is in use"
STEPS = {
    "key_made": r"renewal: (a new|reusing the) key \w+ made on the device",
    "request_sent": r"renewal: certificate request sent",
    "stored_as_pending": r"renewal: certificate serial \w+, .* stored as pending",
    "connected_with_new": r"renewal: connected with the renewed certificate",
    "promoted": IN_USE,
}


# --- helpers ----------------------------------------------------------------------------


def set_pki(hub_dir: HubDir, **seconds: float) -> None:
    """Lifetimes in hub.toml's [pki], given in seconds (written as fractions of a day)."""
    config = hub_dir.dir / "hub.toml"
    text = config.read_text()
    for key, value in seconds.items():
        text, count = re.subn(rf"(?m)^{key} = \S+", f"{key} = {value / DAY_S!r}", text)
        assert count == 1, key
    config.write_text(text)


async def wait_lines(proc: Proc, pattern: str, count: int, *, after: int = 0, timeout: float) -> list[str]:
    """The first `count` lines matching `pattern` from line `after` on, each within `timeout` of the last."""
    found: list[str] = []
    for _ in range(count):
        line = await proc.wait_for(pattern, timeout=timeout, after=after)
        after = proc.lines.index(line, after) + 1
        found.append(line)
    return found


def matching(proc: Proc, pattern: str, after: int = 0) -> list[str]:
    return [line for line in proc.lines[after:] if re.search(pattern, line)]


def hub_rows(hub_dir: HubDir, sql: str, args: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    db = sqlite3.connect(f"file:{hub_dir.dir / 'hub.db'}?mode=ro", uri=True, timeout=10)
    try:
        return list(db.execute(sql, args).fetchall())
    finally:
        db.close()


def hub_events(hub_dir: HubDir, kind: str) -> list[str]:
    return [str(r[0]) for r in hub_rows(hub_dir, "SELECT body FROM events WHERE device = ? AND kind = ? ORDER BY seq",
                                        (f"hub.{hub_dir.region}", kind))]


def newest_issued(hub_dir: HubDir, device: str) -> int:
    (serial,) = hub_rows(hub_dir, "SELECT serial FROM certificates WHERE device = ? AND purpose = 'device' "
                                  "ORDER BY issued_at DESC LIMIT 1", (device,))[0]
    return int(str(serial), 16)


def maps_cryptography(pid: int) -> bool:
    """Whether the process has `cryptography`'s native module loaded (P3: the daemon must not)."""
    return "cryptography" in Path(f"/proc/{pid}/maps").read_text()


async def connects(identity: TlsIdentity, port: int, client_id: str) -> bool:
    try:
        session = await connect(identity, port, client_id)
    except Exception:  # what the broker says is the result here
        return False
    await session.close()
    return True


def in_use_serial(bundle: Path) -> int:
    current = IdentityFiles(device_identity(bundle), bundle / "state").current()
    assert current is not None
    return current.cert.serial


# --- renewal while streaming -------------------------------------------------------------


async def test_an_agent_renews_several_times_while_streaming_and_every_reading_arrives_once(
        hub_dir: HubDir, bundles: Path) -> None:
    set_pki(hub_dir, device_cert_days=DEVICE_LIFETIME_S)
    await hub_dir.provision(bundles, "dev-r")
    bundle = bundles / "dev-r"
    first = read_certificate_file(bundle / "device.crt")
    hub = await start_hub(hub_dir)
    agent = await Proc("dev-r", agent_argv(bundle, *STREAM)).start()
    try:
        await agent.wait_for(r"dev-r online")
        hub_mark = hub.mark()
        in_use = await wait_lines(agent, IN_USE, RENEWALS, timeout=RENEWAL_TIMEOUT)
        assert not maps_cryptography(agent.pid)  # keys and requests were made in a helper process
        # Each renewal: the new certificate stored beside the old pair, which stayed in use until
        # the new one had connected; a planned reconnect, no refusal, no fallback.
        for line in in_use:
            done = agent.lines.index(line)
            pending = max(i for i, text in enumerate(agent.lines[:done]) if "stored as pending" in text)
            between = agent.lines[pending:done]
            assert any("switching to the renewed certificate; connecting again now" in t for t in between)
            assert any("connected with the renewed certificate" in t for t in between)
        assert not matching(agent, r"renewal: .*(refused|falling back|dropped|cannot)")
        assert not matching(hub, r"device dev-r is offline", after=hub_mark)  # a clean switch, never a Last Will
        serials = [int(m.group(1), 16) for line in in_use if (m := re.search(IN_USE, line))]
        assert len(set(serials)) == RENEWALS
        assert first.serial not in serials
        assert len(matching(hub, r"certificate issued to dev-r in band")) >= RENEWALS
        assert len(hub_events(hub_dir, "cert_issued")) >= RENEWALS
        assert in_use_serial(bundle) == newest_issued(hub_dir, "dev-r")
        durations = [float(m.group(1)) for line in in_use if (m := re.search(r"is in use ([0-9.]+) s after", line))]
        print(f"renewals took {', '.join(f'{d:.2f} s' for d in durations)} (key, request, switch)")
        await finish(hub_dir, bundle, agent)  # drained, stopped, settled: exactly once
    finally:
        await agent.stop()
        await hub.stop()
    renewed = hub_rows(hub_dir, "SELECT body FROM events WHERE device = 'dev-r' AND kind = 'cert_renewed'")
    assert len(renewed) >= RENEWALS  # the agent's own audit reached the hub with its readings


# --- kill -9 at each step ------------------------------------------------------------------


@pytest.mark.parametrize("step", list(STEPS))
async def test_kill_9_at_each_renewal_step_leaves_a_working_pair(hub_dir: HubDir, bundles: Path, step: str) -> None:
    set_pki(hub_dir, device_cert_days=DEVICE_LIFETIME_S)
    await hub_dir.provision(bundles, "dev-k")
    bundle = bundles / "dev-k"
    files = IdentityFiles(device_identity(bundle), bundle / "state")
    hub = await start_hub(hub_dir)
    agent = await Proc("dev-k", agent_argv(bundle, *STREAM)).start()
    hub_stopped = step in ("key_made", "request_sent")  # then no answer can come before the kill
    try:
        await agent.wait_for(r"dev-k online")
        if hub_stopped:
            hub.signal(signal.SIGSTOP)
        line = await agent.wait_for(STEPS[step], timeout=RENEWAL_TIMEOUT)
        await kill_9(agent)
        key = re.search(r"key (\w+)", line)
        if hub_stopped:
            assert files.has_next_key()
            assert files.pending() is None  # a key, and no certificate for it
            hub.signal(signal.SIGCONT)
        elif (pending := files.pending()) is not None:
            # Killed before the switch was done: the old pair still gets in, and so does the new one.
            current = files.current()
            assert current is not None
            assert current.source == "bundle"
            assert await connects(current.tls, hub_dir.port, "dev-k")
            assert await connects(pending.tls, hub_dir.port, "dev-k")
        else:
            # The kill lands a moment after the line: the switch (a reconnect, then one rename) may
            # have finished by then; a promotion is never half done.
            assert step != "key_made"
            assert (bundle / "state" / RENEWED).exists()
        state = "pending" if files.pending() else "key only" if files.has_next_key() else "promoted"
        print(f"killed at {step}: on disk {state}")
        restarted = await Proc("dev-k-restarted", agent_argv(bundle, *STREAM)).start()
        try:
            await restarted.wait_for(r"dev-k online")
            if step != "promoted":
                await restarted.wait_for(IN_USE, timeout=RENEWAL_TIMEOUT)
            if hub_stopped and key is not None:
                # The same key again: the hub answers the repeat with the certificate it issued for it.
                await restarted.wait_for(rf"reusing the key {key.group(1)}")
                assert len(hub_rows(hub_dir, "SELECT 1 FROM certificates WHERE key_id = ?", (key.group(1),))) == 1
            assert in_use_serial(bundle) == newest_issued(hub_dir, "dev-k")
            await finish(hub_dir, bundle, restarted)
        finally:
            await restarted.stop()
    finally:
        hub.signal(signal.SIGCONT)
        await agent.stop()
        await hub.stop()


# --- fallback to the previous certificate ----------------------------------------------------


async def test_a_renewed_certificate_the_broker_refuses_falls_back_to_the_previous_one(
        hub_dir: HubDir, bundles: Path) -> None:
    """A pending certificate the hub never recorded (here: from another CA) is refused by the
    broker; the agent says so, connects with its previous pair and drops the pending one."""
    await hub_dir.provision(bundles, "dev-f")
    bundle = bundles / "dev-f"
    stranger = Authority.create("elsewhere")
    key, cert = stranger.issue_client("dev-f", dt.timedelta(days=365))
    assert key is not None
    write_atomic(bundle / "state" / NEXT, cert_pem(cert) + key_pem(key), 0o600)
    hub = await start_hub(hub_dir)
    agent = await Proc("dev-f", agent_argv(bundle, *STREAM)).start()
    try:
        await agent.wait_for(rf"the broker refused the renewed certificate \(serial {cert.serial_number:x}.*"
                             r"falling back to the previous certificate")
        await agent.wait_for(r"dev-f online")
        await hub.wait_for(r"device dev-f is online")
        assert not (bundle / "state" / NEXT).exists()
        assert not (bundle / "state" / RENEWED).exists()
        assert in_use_serial(bundle) == read_certificate_file(bundle / "device.crt").serial
        await finish(hub_dir, bundle, agent)
    finally:
        await agent.stop()
        await hub.stop()
    fallback = hub_rows(hub_dir, "SELECT body FROM events WHERE device = 'dev-f' AND kind = 'cert_fallback'")
    assert len(fallback) == 1
    assert "refused by the broker" in str(fallback[0][0])


# --- refusals -------------------------------------------------------------------------------


async def test_a_revoked_devices_request_is_refused_and_audited(hub_dir: HubDir, bundles: Path) -> None:
    """Revoked in the registry, its session not closed yet (the first step of `edge-hub revoke`,
    before the CRL reload and the takeover): its renewal must be refused."""
    set_pki(hub_dir, device_cert_days=DEVICE_LIFETIME_S)
    await hub_dir.provision(bundles, "dev-v")
    bundle = bundles / "dev-v"
    store = await HubStore.open(hub_dir.dir / "hub.db")
    try:
        assert await store.revoke_device("dev-v") == 1
    finally:
        await store.close()
    hub = await start_hub(hub_dir)
    agent = await Proc("dev-v", agent_argv(bundle, *STREAM)).start()
    try:
        await agent.wait_for(r"dev-v online")  # the CRL does not name it yet
        await agent.wait_for(r"the hub refused the certificate request \(revoked\)", timeout=RENEWAL_TIMEOUT)
        await hub.wait_for(r"certificate request from dev-v refused \(revoked\)")
        assert IdentityFiles(device_identity(bundle), bundle / "state").pending() is None
    finally:
        await agent.stop()
        await hub.stop()
    refused = hub_events(hub_dir, "cert_refused")
    assert refused
    assert all('"device": "dev-v"' in body and '"reason": "revoked"' in body for body in refused)
    assert len(hub_rows(hub_dir, "SELECT 1 FROM certificates WHERE device = 'dev-v'")) == 1  # the provisioned one
    assert not (bundle / "state" / RENEWED).exists()


async def test_requests_for_another_name_or_from_an_unknown_device_are_refused_and_audited(
        hub_dir: HubDir, bundles: Path) -> None:
    await hub_dir.provision(bundles, "dev-a", "dev-b")
    paths = HubPaths(hub_dir.dir)
    ca = Authority.load(paths.ca_key, paths.ca_cert)
    ghost_key, ghost_cert = ca.issue_client("ghost", dt.timedelta(hours=1))  # from the fleet CA, never registered
    assert ghost_key is not None
    ghost_dir = bundles / "ghost"
    write_atomic(ghost_dir / "device.key", key_pem(ghost_key), 0o600)
    write_atomic(ghost_dir / "device.crt", cert_pem(ghost_cert))
    ghost = TlsIdentity(paths.ca_cert, ghost_dir / "device.crt", ghost_dir / "device.key")
    hub = await start_hub(hub_dir)
    sessions: list[MqttSession] = []
    try:
        for name, identity, cn, reason in (("dev-a", device_identity(bundles / "dev-a"), "dev-b", "wrong_subject"),
                                           ("ghost", ghost, "ghost", "unknown_device")):
            session = await connect(identity, hub_dir.port, name)
            sessions.append(session)
            await session.subscribe([(down_filter(name), 1)])
            async with asyncio.timeout(ARRIVAL):
                await session.publish(up_topic(name, CERT), pack(CertRequest(csr=csr_for(cn)[0])), qos=1)
                reply = unpack_cert_reply((await session.next_message()).payload)
            assert isinstance(reply, CertRefused)
            assert reply.reason == reason
            await hub.wait_for(rf"certificate request from {name} refused \({reason}\)")
        # The broker does not even let dev-a ask on dev-b's topic (ACL: its own topics only).
        with pytest.raises(PublishRefused) as refused:
            async with asyncio.timeout(ARRIVAL):
                await sessions[0].publish(up_topic("dev-b", CERT), pack(CertRequest(csr=csr_for("dev-b")[0])), qos=1)
        assert refused.value.code == NOT_AUTHORIZED
    finally:
        for session in sessions:
            await session.close()
        await hub.stop()
    bodies = hub_events(hub_dir, "cert_refused")
    assert len(bodies) == 2
    assert '"device": "dev-a"' in bodies[0]
    assert '"reason": "wrong_subject"' in bodies[0]
    assert '"device": "ghost"' in bodies[1]
    assert '"reason": "unknown_device"' in bodies[1]
    assert hub_rows(hub_dir, "SELECT COUNT(*) FROM certificates WHERE device IN ('dev-b', 'ghost')") == [(1,)]


# --- the broker's certificate and the CRL ----------------------------------------------------


def short_hub_files(hub_dir: HubDir, seconds: float) -> None:
    """Replace the broker's and the hub's certificates and the CRL with ones of `seconds` (same keys)."""
    paths = HubPaths(hub_dir.dir)
    ca = Authority.load(paths.ca_key, paths.ca_cert)
    lifetime = dt.timedelta(seconds=seconds)
    server = x509.load_pem_x509_certificate(paths.server_cert.read_bytes())
    server_key = load_pem_private_key(paths.server_key.read_bytes(), password=None)
    hub_key = load_pem_private_key(paths.hub_key.read_bytes(), password=None)
    assert isinstance(server_key, ec.EllipticCurvePrivateKey)
    assert isinstance(hub_key, ec.EllipticCurvePrivateKey)
    write_atomic(paths.server_cert, cert_pem(ca.issue_server(host_names(server), lifetime, server_key)[1]))
    write_atomic(paths.hub_cert, cert_pem(ca.issue_client(f"hub.{hub_dir.region}", lifetime, hub_key.public_key())[1]))
    write_atomic(paths.crl, ca.issue_crl([], lifetime).public_bytes(Encoding.PEM))


def online_sessions(hub_dir: HubDir) -> dict[str, str]:
    """Each online device's presence session id: a new one per connection."""
    rows = hub_rows(hub_dir, "SELECT device, session FROM devices WHERE online = 1")
    return {str(device): str(session) for device, session in rows}


async def served_certificate(hub_dir: HubDir, bundle: Path) -> bytes:
    """The DER certificate the broker presents to a new TLS connection now."""
    context = device_identity(bundle).context()
    _, writer = await asyncio.open_connection("127.0.0.1", hub_dir.port, ssl=context)
    try:
        ssl_object = writer.get_extra_info("ssl_object")
        assert isinstance(ssl_object, ssl.SSLObject)
        der = ssl_object.getpeercert(binary_form=True)
        assert der is not None
        return der
    finally:
        writer.close()
        await writer.wait_closed()


async def test_the_broker_certificate_and_the_crl_renew_while_devices_stay_connected(
        hub_dir: HubDir, bundles: Path) -> None:
    set_pki(hub_dir, server_cert_days=HUB_LIFETIME_S, crl_days=HUB_LIFETIME_S)
    await hub_dir.provision(bundles, "dev-s1", "dev-s2", "dev-s3")
    short_hub_files(hub_dir, HUB_LIFETIME_S)
    hub = await start_hub(hub_dir)
    agents = [await Proc(d, agent_argv(bundles / d, *STREAM)).start() for d in ("dev-s1", "dev-s2")]
    try:
        for agent in agents:
            await hub.wait_for(rf"device {agent.name} is online")
        sessions = online_sessions(hub_dir)
        assert set(sessions) == {"dev-s1", "dev-s2"}
        mark, since = hub.mark(), time.time()
        await wait_lines(hub, r"broker certificate renewed: .*; broker reloaded", 2, after=mark,
                         timeout=2 * HUB_LIFETIME_S)
        await wait_lines(hub, r"CRL re-issued", 2, after=mark, timeout=2 * HUB_LIFETIME_S)
        await wait_lines(hub, r"hub certificate hub\.test renewed", 1, after=mark, timeout=2 * HUB_LIFETIME_S)
        # New connections get a renewed certificate (the broker reloaded it) under the new CRL...
        renewed = {int(str(serial), 16) for (serial,) in hub_rows(
            hub_dir, "SELECT serial FROM certificates WHERE purpose = 'server' AND issued_at > ?", (since,))}
        served = x509.load_der_x509_certificate(await served_certificate(hub_dir, bundles / "dev-s3"))
        assert served.serial_number in renewed
        assert await connects(device_identity(bundles / "dev-s3"), hub_dir.port, "dev-s3")
        # ... and nobody connected was dropped: same sessions, one connection each, no Last Will.
        assert online_sessions(hub_dir) == sessions
        for agent in agents:
            assert len(matching(agent, rf"agent {agent.name}: connected")) == 1
        assert not matching(hub, r"is offline", after=mark)
        assert len(matching(hub, r"hub ready")) == 1  # the hub's own session survived its certificate's renewal
        for agent in agents:
            await finish(hub_dir, bundles / agent.name, agent)
    finally:
        for agent in agents:
            await agent.stop()
        await hub.stop()


# --- expired while offline -------------------------------------------------------------------


@needs_faketime
async def test_check_says_a_certificate_renewed_and_then_expired_offline_needs_a_new_bundle(
        hub_dir: HubDir, bundles: Path) -> None:
    set_pki(hub_dir, device_cert_days=DEVICE_LIFETIME_S)
    await hub_dir.provision(bundles, "dev-x")
    bundle = bundles / "dev-x"
    hub = await start_hub(hub_dir)
    agent = await Proc("dev-x", agent_argv(bundle, *STREAM)).start()
    try:
        await agent.wait_for(IN_USE, timeout=RENEWAL_TIMEOUT)
    finally:
        await agent.stop()
        await hub.stop()
    renewed = read_certificate((bundle / "state" / RENEWED).read_bytes())
    report, _ = await check_after_expiry(bundle, renewed.not_after)  # the renewed one, not the bundle's
    renewal = report.findings["renewal"][1]
    assert "renewed in band" in renewal
    assert f"serial {renewed.serial:x}" in renewal
