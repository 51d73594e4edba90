"""Certificate lifecycle without a broker: what the agent reads and keeps, what the hub signs,
refuses and renews — on real files, real keys (the agent's helper process) and a real hub
database; only the MQTT link between the two is a fake that hands messages across."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import logging
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from edge_agent.identity.certinfo import CertificateUnreadable, read_certificate
from edge_agent.identity.keygen import make_request
from edge_agent.identity.renewal import RENEW_AT, Renewal
from edge_agent.identity.tls import Credential, IdentityFiles
from edgefleet.errors import ConfigError, ConnectRefused, IdentityError, KeyGenerationFailed
from edgefleet.mqtt.session import TlsIdentity
from edgefleet.runtime.files import write_atomic
from edgefleet.runtime.settings import to_struct
from edgefleet.wire.keys import public_key_id
from edgefleet.wire.protocol import CertIssued, CertRefused, CertRequest, parse_topic, unpack
from hub.config import HubConfig, HubPaths
from hub.db.store import HubStore
from hub.metrics import render
from hub.pki.authority import Authority, CsrRefused, cert_pem, common_name, host_names, key_pem, utcnow
from hub.pki.renewal import CertificateDesk, OwnCertificate, lifecycle_status, own_certificates, renew_if_due
from hub.region.replicas import prepare_replica

DAY = dt.timedelta(days=1)
DEVICE = "dev-1"
QUIET = 0.5  # how long "nothing happens" is watched
FLOW_TIMEOUT = 30.0  # a renewal in process: one helper process (Python + cryptography) and a few file writes


# --- fixtures: a hub directory and a device bundle, as files -----------------------------------


@dataclass
class Hub:
    paths: HubPaths
    config: HubConfig
    store: HubStore
    ca: Authority
    desk: CertificateDesk

    async def events(self, kind: str) -> list[Any]:
        return await self.store.query("SELECT body FROM events WHERE device = ? AND kind = ? ORDER BY seq",
                                      (self.config.identity, kind))


async def certificates(hub: Hub) -> int:
    return int((await hub.store.query("SELECT COUNT(*) FROM certificates"))[0][0])


def hub_config(**pki: Any) -> HubConfig:
    return to_struct({"region": "test", "pki": pki}, HubConfig, "test")


@pytest.fixture
async def hub(tmp_path: Path) -> AsyncIterator[Hub]:
    paths = HubPaths(tmp_path / "hub")
    paths.pki.mkdir(parents=True)
    paths.broker.mkdir()
    ca = Authority.create("test")
    write_atomic(paths.ca_key, key_pem(ca.key), 0o600)
    write_atomic(paths.ca_cert, cert_pem(ca.cert))
    config = hub_config()
    store = await HubStore.open(paths.db)
    await store.register(DEVICE, "sim", {})
    try:
        yield Hub(paths, config, store, ca, CertificateDesk(paths, config, store))
    finally:
        await store.close()


def bundle_of(hub: Hub, folder: Path, lifetime: dt.timedelta = DAY, cn: str = DEVICE) -> TlsIdentity:
    """A provisioned device's files: ca.crt, device.crt, device.key."""
    key, cert = hub.ca.issue_client(cn, lifetime)
    assert key is not None
    write_atomic(folder / "ca.crt", hub.paths.ca_cert.read_bytes())
    write_atomic(folder / "device.crt", cert_pem(cert))
    write_atomic(folder / "device.key", key_pem(key), 0o600)
    return TlsIdentity(folder / "ca.crt", folder / "device.crt", folder / "device.key")


def csr_for(cn: str, key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | None = None) -> tuple[str, str]:
    """(PEM request, key id) for a new P-256 key, or `key`."""
    key = key or ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    csr = x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, hashes.SHA256())
    return csr.public_bytes(Encoding.PEM).decode(), public_key_id(key.public_key())


# --- certinfo: a certificate read without `cryptography` -------------------------------------


def test_certinfo_reads_what_cryptography_reads(hub: Hub) -> None:
    key, cert = hub.ca.issue_client("dev-7", 30 * DAY)
    assert key is not None
    for pem in (cert_pem(cert), key_pem(key) + cert_pem(cert), cert_pem(cert) + key_pem(key)):
        info = read_certificate(pem)
        assert info.serial == cert.serial_number
        assert info.common_name == "dev-7"
        assert info.not_before == cert.not_valid_before_utc
        assert info.not_after == cert.not_valid_after_utc


def test_certinfo_reads_generalized_times_rsa_keys_and_subjects_without_cn() -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "acme")])
    start = dt.datetime(2049, 6, 1, tzinfo=dt.UTC)
    end = dt.datetime(2061, 1, 2, 3, 4, 5, tzinfo=dt.UTC)  # after 2049: GeneralizedTime (RFC 5280)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(7).not_valid_before(start).not_valid_after(end).sign(key, hashes.SHA256()))
    info = read_certificate(cert_pem(cert))
    assert (info.serial, info.common_name, info.not_before, info.not_after) == (7, "", start, end)
    assert info.point(0.5) == start + (end - start) / 2


@pytest.mark.parametrize("text", [b"", b"-----BEGIN CERTIFICATE-----\n!!!\n-----END CERTIFICATE-----\n",
                                  b"-----BEGIN CERTIFICATE-----\nMAMCAQE=\n-----END CERTIFICATE-----\n"],
                         ids=["no-pem", "not-base64", "not-x509"])
def test_certinfo_refuses_what_is_not_a_certificate(text: bytes) -> None:
    with pytest.raises(CertificateUnreadable):
        read_certificate(text)


def test_a_truncated_certificate_is_refused(hub: Hub) -> None:
    der = hub.ca.cert.public_bytes(Encoding.DER)
    pem = b"-----BEGIN CERTIFICATE-----\n" + base64.encodebytes(der[:-40]) + b"-----END CERTIFICATE-----\n"
    with pytest.raises(CertificateUnreadable, match="truncated"):
        read_certificate(pem)


def test_the_agent_daemon_never_imports_cryptography() -> None:
    """P3: `cryptography` is 8-15 MB of RSS; the daemon (renewal included) must not load it."""
    code = ("import sys, edge_agent.agent, edge_agent.identity.renewal, edge_agent.identity.tls, "
            "edge_agent.identity.keygen, edge_agent.cli; sys.exit('cryptography' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0


# --- the identity files ------------------------------------------------------------------------


def renewed_pair(hub: Hub, path: Path, lifetime: dt.timedelta) -> x509.Certificate:
    key, cert = hub.ca.issue_client(DEVICE, lifetime)
    assert key is not None
    write_atomic(path, cert_pem(cert) + key_pem(key), 0o600)
    return cert


def test_the_newest_usable_pair_is_current(hub: Hub, tmp_path: Path) -> None:
    files = IdentityFiles(bundle_of(hub, tmp_path / "bundle"), tmp_path / "state")
    current = files.current()
    assert current is not None
    assert current.source == "bundle"
    newer = renewed_pair(hub, files.renewed_path, 2 * DAY)
    current = files.current()
    assert current is not None
    assert current.source == "renewed"
    assert current.cert.serial == newer.serial_number
    # A bundle re-provisioned by hand (the renewed certificate expired offline) wins again.
    bundle_of(hub, tmp_path / "bundle", 3 * DAY)
    current = files.current()
    assert current is not None
    assert current.source == "bundle"


def test_a_renewed_file_whose_key_is_not_its_own_is_not_used(hub: Hub, tmp_path: Path) -> None:
    files = IdentityFiles(bundle_of(hub, tmp_path / "bundle"), tmp_path / "state")
    _, cert = hub.ca.issue_client(DEVICE, 2 * DAY)
    other, _ = hub.ca.issue_client(DEVICE, 2 * DAY)
    assert other is not None
    write_atomic(files.renewed_path, cert_pem(cert) + key_pem(other), 0o600)
    current = files.current()
    assert current is not None
    assert current.source == "bundle"
    with pytest.raises(IdentityError, match=r"KEY_VALUES_MISMATCH|key values mismatch"):
        files.load("renewed")


async def test_a_certificate_for_another_key_is_never_stored_as_pending(hub: Hub, tmp_path: Path) -> None:
    files = IdentityFiles(bundle_of(hub, tmp_path / "bundle"), tmp_path / "state")
    request = await make_request(files.next_path, DEVICE)
    key_only = files.next_path.read_bytes()
    _, stranger = hub.ca.issue_client(DEVICE, DAY)
    with pytest.raises(IdentityError, match="does not belong to the key"):
        files.store_pending(cert_pem(stranger))
    assert files.next_path.read_bytes() == key_only
    assert files.pending() is None
    issued = await hub.desk.answer(DEVICE, CertRequest(csr=request.csr))
    assert isinstance(issued, CertIssued)
    assert issued.key_id == request.key_id
    pending = files.store_pending(issued.cert.encode())
    assert pending.source == "pending"
    assert files.pending() is not None
    assert not [p for p in files.next_path.parent.iterdir() if p.name.startswith(".")]  # no scratch file left


async def test_each_step_of_a_renewal_leaves_a_working_pair_on_disk(hub: Hub, tmp_path: Path) -> None:
    """What a kill -9 after each step leaves, as the next start sees it: every write is atomic,
    so these are the only states there are."""
    files = IdentityFiles(bundle_of(hub, tmp_path / "bundle"), tmp_path / "state")
    first = files.current()
    assert first is not None

    def working() -> tuple[str, int]:
        current = files.current()
        assert current is not None
        current.tls.context()  # ssl agrees: the key belongs to the certificate
        return current.source, current.cert.serial

    request = await make_request(files.next_path, DEVICE)  # 1. key made (and 2. request sent)
    assert working() == ("bundle", first.cert.serial)
    assert files.has_next_key()
    assert files.pending() is None
    again = await make_request(files.next_path, DEVICE)  # a restart asks for the same key
    assert again.reused
    assert again.key_id == request.key_id
    issued = await hub.desk.answer(DEVICE, CertRequest(csr=again.csr))
    assert isinstance(issued, CertIssued)
    files.store_pending(issued.cert.encode())  # 3. stored as pending (4. connected with it: no write)
    assert working() == ("bundle", first.cert.serial)
    pending = files.pending()
    assert pending is not None
    pending.tls.context()
    files.promote()  # 5. promoted: one rename
    assert working() == ("renewed", pending.cert.serial)
    assert not files.has_next_key()


async def test_the_key_helper_writes_a_private_key_and_says_what_is_wrong(tmp_path: Path) -> None:
    request = await make_request(tmp_path / "next.pem", DEVICE)
    assert os.stat(tmp_path / "next.pem").st_mode & 0o777 == 0o600
    csr = x509.load_pem_x509_csr(request.csr.encode())
    assert csr.is_signature_valid
    assert csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == DEVICE
    key = csr.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    assert public_key_id(key) == request.key_id  # the hub names the key alike
    (tmp_path / "bad.pem").write_text("not a key")
    with pytest.raises(KeyGenerationFailed, match="the key helper failed"):
        await make_request(tmp_path / "bad.pem", DEVICE)


# --- the hub's desk: sign, refuse, audit, repeat ---------------------------------------------


async def test_a_registered_device_gets_its_certificate_and_a_repeat_gets_the_same(hub: Hub) -> None:
    pem, key = csr_for(DEVICE)
    first = await hub.desk.answer(DEVICE, CertRequest(csr=pem))
    again = await hub.desk.answer(DEVICE, CertRequest(csr=pem))
    assert isinstance(first, CertIssued)
    assert first == again
    assert first.key_id == key
    cert = x509.load_pem_x509_certificate(first.cert.encode())
    cert.verify_directly_issued_by(hub.ca.cert)
    assert common_name(cert) == DEVICE
    issued = await hub.events("cert_issued")
    assert len(issued) == 1
    assert f'"serial": "{cert.serial_number:x}"' in issued[0][0]
    rows = await hub.store.query("SELECT purpose, key_id FROM certificates WHERE serial = ?",
                                 (format(cert.serial_number, "x"),))
    assert [tuple(r) for r in rows] == [("device", key)]


@pytest.mark.parametrize(("device", "cn", "reason"), [
    (DEVICE, "dev-2", "wrong_subject"),  # a device asking for another's name
    ("ghost", "ghost", "unknown_device"),
    ("dev-r", "dev-r", "revoked"),
])
async def test_refusals_are_audited_and_issue_nothing(hub: Hub, device: str, cn: str, reason: str,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    await hub.store.register("dev-r", "sim", {})
    await hub.store.revoke_device("dev-r")
    before = await certificates(hub)
    pem, key = csr_for(cn)
    with caplog.at_level(logging.WARNING, logger="hub.renewal"):
        reply = await hub.desk.answer(device, CertRequest(csr=pem))
    assert isinstance(reply, CertRefused)
    assert reply.reason == reason
    assert reply.key_id == key
    assert await certificates(hub) == before
    refused = await hub.events("cert_refused")
    assert len(refused) == 1
    assert f'"device": "{device}"' in refused[0][0]
    assert f'"reason": "{reason}"' in refused[0][0]
    assert f"certificate request from {device} refused ({reason})" in caplog.text


async def test_an_unreadable_request_is_refused_and_audited(hub: Hub) -> None:
    reply = await hub.desk.answer(DEVICE, CertRequest(csr="-----BEGIN CERTIFICATE REQUEST-----\nxx\n"))
    assert isinstance(reply, CertRefused)
    assert reply.reason == "bad_request"
    assert reply.key_id == ""
    assert len(await hub.events("cert_refused")) == 1


def test_csr_refusals_carry_the_reason_devices_are_told(hub: Hub) -> None:
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    pem, _ = csr_for(DEVICE, weak)
    with pytest.raises(CsrRefused) as refused:
        hub.ca.sign_request(x509.load_pem_x509_csr(pem.encode()), DEVICE, DAY)
    assert refused.value.reason == "bad_request"


def test_a_short_lifetime_is_backdated_by_a_share_of_it_only(hub: Hub) -> None:
    _, cert = hub.ca.issue_client(DEVICE, dt.timedelta(seconds=30))
    start = read_certificate(cert_pem(cert))
    assert start.lifetime <= dt.timedelta(seconds=34)  # 30 s and at most 3 s before now (+ the clock's second)
    assert start.point(RENEW_AT) > utcnow()  # not due the moment it is issued


# --- the agent's renewal, joined to the desk by a fake link -----------------------------------


@dataclass
class FakeLink:
    """The link as the renewal sees it; its "broker" accepts what `broker` says and hands
    requests to the hub's real desk. Every connection attempt is immediate."""

    desk: CertificateDesk
    broker: Callable[[Any], ConnectRefused | None] = lambda _credential: None
    connected: asyncio.Event = field(default_factory=asyncio.Event)
    renewal: Renewal | None = None
    restarts: list[str] = field(default_factory=list)
    requests: int = 0
    again_at_once: bool = False  # what the latest refusal told the link

    @property
    def session(self) -> FakeLink:
        return self

    async def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        assert self.renewal is not None
        self.requests += 1
        reply = await self.desk.answer(parse_topic(topic).device, unpack(payload, CertRequest))
        asyncio.get_running_loop().call_soon(self.renewal.on_reply, reply)  # arrives after the PUBACK

    def attempt(self) -> bool:
        assert self.renewal is not None
        try:
            refusal = self.broker(self.renewal.credential())
        except ConnectRefused as exc:
            refusal = exc
        if refusal is not None:
            self.connected.clear()
            self.again_at_once = self.renewal.on_refused(refusal)
            return False
        self.connected.set()
        self.renewal.on_connected()
        return True

    def restart(self, why: str) -> None:
        self.restarts.append(why)
        self.connected.clear()
        self.attempt()


@dataclass
class Device:
    files: IdentityFiles
    link: FakeLink
    renewal: Renewal
    audit: list[tuple[str, dict[str, Any]]]


def device(hub: Hub, tmp_path: Path, *, lifetime: dt.timedelta = DAY, age: float = 0.8) -> Device:
    """A device whose bundle certificate is `age` of the way through `lifetime` (issued that long
    ago by a hub whose clock agrees with the device's)."""
    issued_at = utcnow() - lifetime * age
    with mock.patch("hub.pki.authority.utcnow", return_value=issued_at):
        bundle = bundle_of(hub, tmp_path / "bundle", lifetime)
    files = IdentityFiles(bundle, tmp_path / "state")
    link = FakeLink(hub.desk)
    audit: list[tuple[str, dict[str, Any]]] = []
    renewal = Renewal(DEVICE, files, link, lambda kind, body: audit.append((kind, body)))  # type: ignore[arg-type]
    link.renewal = renewal
    return Device(files, link, renewal, audit)


async def pending_pair(hub: Hub, d: Device) -> Credential:
    """A renewal that got as far as a pending pair (key made, request answered, certificate stored)."""
    request = await make_request(d.files.next_path, DEVICE)
    issued = await hub.desk.answer(DEVICE, CertRequest(csr=request.csr))
    assert isinstance(issued, CertIssued)
    return d.files.store_pending(issued.cert.encode())


async def until(condition: Callable[[], bool], what: str, timeout: float = FLOW_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        await asyncio.sleep(0.02)


@pytest.fixture
async def running() -> AsyncIterator[Callable[[Renewal], None]]:
    tasks: list[asyncio.Task[None]] = []
    yield lambda renewal: tasks.append(asyncio.create_task(renewal.run()))
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def test_two_thirds_into_its_life_the_agent_renews_and_switches(
        hub: Hub, tmp_path: Path, running: Callable[[Renewal], None]) -> None:
    d = device(hub, tmp_path, age=0.7)
    assert d.link.attempt()
    first = d.renewal.credential()
    assert first.source == "bundle"
    running(d.renewal)
    await until(lambda: d.renewal.renewed == 1, "one renewal")
    current = d.files.current()
    assert current is not None
    assert current.source == "renewed"
    assert current.cert.serial != first.cert.serial
    assert d.link.restarts == ["switching to the renewed certificate"]
    assert not d.files.has_next_key()
    assert [kind for kind, _ in d.audit] == ["cert_renewed"]
    assert d.audit[0][1]["serial"] == f"{current.cert.serial:x}"
    assert len(await hub.events("cert_issued")) == 1


async def test_a_young_certificate_is_left_alone(hub: Hub, tmp_path: Path, running: Callable[[Renewal], None]) -> None:
    d = device(hub, tmp_path, age=0.5)
    assert d.link.attempt()
    running(d.renewal)
    await asyncio.sleep(QUIET)  # proving a negative, after the loop has had time to act
    assert d.link.requests == 0
    assert not d.files.has_next_key()


async def test_a_refused_request_keeps_the_current_pair_and_is_asked_again(
        hub: Hub, tmp_path: Path, running: Callable[[Renewal], None], caplog: pytest.LogCaptureFixture) -> None:
    await hub.store.revoke_device(DEVICE)
    d = device(hub, tmp_path, lifetime=dt.timedelta(seconds=60), age=0.9)  # retried within a tenth of 6 s
    assert d.link.attempt()
    with caplog.at_level(logging.WARNING):
        running(d.renewal)
        await until(lambda: d.link.requests >= 2, "the request asked again after the refusal")
    assert "the hub refused the certificate request (revoked)" in caplog.text
    current = d.files.current()
    assert current is not None
    assert current.source == "bundle"
    assert d.files.pending() is None
    assert len(await hub.events("cert_refused")) >= 2


async def test_a_pending_pair_the_broker_refuses_falls_back_to_the_previous_one(
        hub: Hub, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    d = device(hub, tmp_path)
    pending = await pending_pair(hub, d)
    d.link.broker = lambda c: ConnectRefused("TLS: the broker rejected this certificate", auth=True) \
        if c.source == "pending" else None
    with caplog.at_level(logging.WARNING):
        assert not d.link.attempt()
    assert d.link.again_at_once  # no 60 s wait for a refused identity: the previous one is tried now
    assert f"the broker refused the renewed certificate (serial {pending.cert.serial:x}" in caplog.text
    assert "falling back to the previous certificate" in caplog.text
    assert not d.files.has_next_key()
    assert d.link.attempt()
    assert d.renewal.credential().source == "bundle"
    assert d.audit == [("cert_fallback", {"serial": f"{pending.cert.serial:x}", "reason": "refused by the broker"})]


async def test_a_pending_pair_that_never_connects_while_the_previous_one_does_is_dropped(
        hub: Hub, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    d = device(hub, tmp_path)
    await pending_pair(hub, d)
    d.link.broker = lambda c: ConnectRefused("no CONNACK within the connect timeout", auth=False) \
        if c.source == "pending" else None
    with caplog.at_level(logging.WARNING):
        assert [d.link.attempt() for _ in range(4)] == [False, False, False, True]
    assert not d.link.again_at_once  # not the identity's fault as far as anyone knows: the usual backoff
    assert "trying the previous one" in caplog.text
    assert "it is dropped" in caplog.text
    assert not d.files.has_next_key()


async def test_when_both_pairs_fail_the_renewed_one_is_kept(hub: Hub, tmp_path: Path) -> None:
    """A network outage refuses both: the renewed certificate must survive it (the old one may expire)."""
    d = device(hub, tmp_path)
    await pending_pair(hub, d)
    d.link.broker = lambda c: ConnectRefused("cannot reach 127.0.0.1:8883", auth=False)
    assert not any(d.link.attempt() for _ in range(10))
    assert d.files.pending() is not None
    d.link.broker = lambda c: None
    assert d.link.attempt()
    assert d.renewal.renewed == 1
    assert d.files.pending() is None


async def test_an_expired_certificate_is_not_renewed_in_band(
        hub: Hub, tmp_path: Path, running: Callable[[Renewal], None], caplog: pytest.LogCaptureFixture) -> None:
    d = device(hub, tmp_path, age=1.5)
    with caplog.at_level(logging.ERROR):
        running(d.renewal)
        await until(lambda: "cannot be renewed in band" in caplog.text, "the expiry said")
    assert "edge-hub provision --csr" in caplog.text
    assert not d.files.has_next_key()
    assert d.link.requests == 0


async def test_no_usable_identity_is_a_refusal_of_our_identity(hub: Hub, tmp_path: Path) -> None:
    d = device(hub, tmp_path)
    (tmp_path / "bundle" / "device.key").unlink()
    with pytest.raises(ConnectRefused) as refused:
        d.renewal.credential()
    assert refused.value.auth
    assert "device.key" in str(refused.value)


# --- the hub's own certificates, and what status and metrics show --------------------------------


def own_files(hub: Hub, lifetime: dt.timedelta) -> None:
    key, server = hub.ca.issue_server(["hub.example.net", "127.0.0.1", "localhost"], lifetime)
    write_atomic(hub.paths.server_key, key_pem(key), 0o600)
    write_atomic(hub.paths.server_cert, cert_pem(server))
    hub_key, hub_cert = hub.ca.issue_client(hub.config.identity, lifetime)
    assert hub_key is not None
    write_atomic(hub.paths.hub_key, key_pem(hub_key), 0o600)
    write_atomic(hub.paths.hub_cert, cert_pem(hub_cert))


@pytest.mark.parametrize("which", ["server", "hub"])
async def test_the_hub_renews_its_own_certificates_with_the_same_key_and_names(hub: Hub, which: str) -> None:
    config = hub_config(server_cert_days=30)
    own_files(hub, 30 * DAY)
    own: OwnCertificate = next(o for o in own_certificates(hub.paths, config) if o.purpose == which)
    before, key = own.cert.read_bytes(), own.key.read_bytes()
    # Due once a third of its 30 days is left: in 20 days.
    assert 19 * 86400 < await renew_if_due(own, hub.paths, config, hub.store) <= 20 * 86400
    assert own.cert.read_bytes() == before
    later = utcnow() + 21 * DAY
    due = await renew_if_due(own, hub.paths, config, hub.store, now=later)
    assert own.key.read_bytes() == key
    assert own.cert.read_bytes() != before
    old, new = (x509.load_pem_x509_certificate(b) for b in (before, own.cert.read_bytes()))
    assert new.public_key() == old.public_key()
    assert host_names(new) == host_names(old)
    assert new.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value == \
        old.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert new.serial_number != old.serial_number
    assert new.not_valid_after_utc >= old.not_valid_after_utc
    assert 19 * 86400 < due <= 20 * 86400  # issued now, for 30 days again
    rows = await hub.store.query("SELECT purpose FROM certificates WHERE serial = ?", (format(new.serial_number, "x"),))
    assert [r[0] for r in rows] == [which]


async def test_status_names_expired_devices_and_refusals_not_renewed_since(hub: Hub, tmp_path: Path) -> None:
    own_files(hub, 30 * DAY)
    now = time.time()
    await hub.store.record_certificate(1, DEVICE, "device", dt.datetime.fromtimestamp(now - 60, dt.UTC))
    await hub.store.register("dev-2", "sim", {})
    await hub.store.record_certificate(2, "dev-2", "device", dt.datetime.fromtimestamp(now + 86400, dt.UTC))
    await hub.desk.answer("dev-2", CertRequest(csr=csr_for("dev-9")[0]))  # refused: wrong_subject
    status = await lifecycle_status(hub.paths, hub.config, hub.store, now)
    assert [e["device"] for e in status["cert_expired"]] == [DEVICE]
    assert "edge-hub provision --csr" in status["cert_expired"][0]["fix"]
    assert [(r["device"], r["reason"]) for r in status["renewal_refused"]] == [("dev-2", "wrong_subject")]
    assert {c["certificate"] for c in status["hub_certificates"]} == {"broker certificate", "hub certificate hub.test"}
    assert await hub.desk.answer("dev-2", CertRequest(csr=csr_for("dev-2")[0]))  # renewed since: not listed
    assert (await lifecycle_status(hub.paths, hub.config, hub.store, now))["renewal_refused"] == []


async def test_metrics_expose_the_hub_certificates_the_crl_and_renewals(hub: Hub) -> None:
    own_files(hub, 30 * DAY)
    server = x509.load_pem_x509_certificate(hub.paths.server_cert.read_bytes())
    await hub.store.record_certificate(server.serial_number, "hub.example.net", "server", server.not_valid_after_utc)
    write_atomic(hub.paths.crl, hub.ca.issue_crl([], 10 * DAY).public_bytes(Encoding.PEM))
    await hub.desk.answer(DEVICE, CertRequest(csr=csr_for(DEVICE)[0]))
    await hub.desk.answer(DEVICE, CertRequest(csr=csr_for("dev-9")[0]))
    now = time.time()
    text = render(hub.paths.db, "test", now=now).decode()
    lines = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines() if not line.startswith("#")}
    expiry = lines['edgefleet_server_certificate_expiry_seconds{region="test"}']
    assert abs(expiry - (server.not_valid_after_utc.timestamp() - now)) < 1
    assert 10 * 86400 - 60 < lines['edgefleet_crl_next_update_seconds{region="test"}'] <= 10 * 86400
    assert lines['edgefleet_certificate_renewals_total{outcome="issued",region="test"}'] == 1
    assert lines['edgefleet_certificate_renewals_total{outcome="refused",region="test"}'] == 1


# --- configuration ------------------------------------------------------------------------------


def test_lifetimes_keep_their_defaults_and_take_fractions_of_a_day() -> None:
    pki = hub_config().pki
    assert (pki.device_cert_lifetime, pki.server_cert_lifetime, pki.crl_lifetime) == (90 * DAY, 397 * DAY, 30 * DAY)
    assert hub_config(device_cert_days=0.0005).pki.device_cert_lifetime == dt.timedelta(seconds=43.2)


@pytest.mark.parametrize("key", ["device_cert_days", "server_cert_days", "crl_days"])
def test_a_lifetime_of_seconds_below_the_floor_is_refused_in_words(key: str) -> None:
    with pytest.raises(ConfigError, match=rf"{key} = 5e-05 is 4.32 s: give at least 10 s"):
        hub_config(**{key: 0.00005})


async def test_a_replica_gets_its_certificate_by_the_lifetime_and_rule_of_the_hubs_own(hub: Hub) -> None:
    """At its start a replica keeps a certificate the leader's upkeep would not renew yet, and is
    otherwise issued one for pki.server_cert_days: one rule for the hub's own certificates."""
    config = to_struct({"region": "test", "pki": {"server_cert_days": 30}, "hub": {"replicas": ["b"]}},
                       HubConfig, "test")
    cert_path = hub.paths.replica_cert("b")
    await prepare_replica(hub.paths, config, "b")
    first = x509.load_pem_x509_certificate(cert_path.read_bytes())
    assert common_name(first) == "hub.test.b"
    assert 29 * 86400 < (first.not_valid_after_utc - utcnow()).total_seconds() <= 30 * 86400
    await prepare_replica(hub.paths, config, "b")
    assert x509.load_pem_x509_certificate(cert_path.read_bytes()) == first  # 30 days left: kept

    # Under a third of its 30 days left: the upkeep would renew it, so the start issues a new one.
    _, short = hub.ca.issue_client("hub.test.b", 9 * DAY, hub.ca.key.public_key())
    write_atomic(cert_path, cert_pem(short))
    await prepare_replica(hub.paths, config, "b")
    renewed = x509.load_pem_x509_certificate(cert_path.read_bytes())
    assert renewed.serial_number not in (first.serial_number, short.serial_number)
    assert 29 * 86400 < (renewed.not_valid_after_utc - utcnow()).total_seconds() <= 30 * 86400


# --- issue 15 item 6: renewal has limits -------------------------------------------------------


async def test_the_hub_issues_at_most_the_limit_per_window_and_audits_the_first_refusal(hub: Hub) -> None:
    """A device asking in a loop, each time with a new key: pki.renewal_limit certificates, then refusals."""
    limit = hub.config.pki.renewal_limit
    replies = [await hub.desk.answer(DEVICE, CertRequest(csr=csr_for(DEVICE)[0])) for _ in range(limit + 20)]
    issued = [r for r in replies if isinstance(r, CertIssued)]
    refused = [r for r in replies if isinstance(r, CertRefused)]
    assert len(issued) == limit
    assert {r.reason for r in refused} == {"rate_limited"}
    assert "check the device's clock" in refused[0].detail
    assert len(await hub.events("cert_issued")) == limit
    assert len(await hub.events("cert_refused")) == 1  # a flood does not fill the database
    status = await lifecycle_status(hub.paths, hub.config, hub.store)
    assert [(r["device"], r["reason"]) for r in status["renewal_refused"]] == [(DEVICE, "rate_limited")]
    # A reply that was lost is still answered with the certificate already issued for that key.
    request = await make_request(hub.paths.root / "again.pem", DEVICE)

    async def window_passes(db: Any) -> None:
        await db.execute("UPDATE certificates SET issued_at = issued_at - 2 * 86400")

    await hub.store.atomically(window_passes)
    first = await hub.desk.answer(DEVICE, CertRequest(csr=request.csr))
    assert isinstance(first, CertIssued)
    for _ in range(limit):
        await hub.desk.answer(DEVICE, CertRequest(csr=csr_for(DEVICE)[0]))
    repeat = await hub.desk.answer(DEVICE, CertRequest(csr=request.csr))
    assert repeat == first


async def test_a_device_clock_weeks_ahead_renews_once_not_in_a_loop(
        hub: Hub, tmp_path: Path, running: Callable[[Renewal], None], caplog: pytest.LogCaptureFixture) -> None:
    """Every certificate the hub issues looks two thirds old to a clock 70 days ahead (90-day certificates)."""
    lifetime = dt.timedelta(days=90)
    d = device(hub, tmp_path, lifetime=lifetime, age=0.0)
    ahead = dt.timedelta(days=70).total_seconds()
    d.renewal = Renewal(DEVICE, d.files, d.link, lambda kind, body: d.audit.append((kind, body)),
                        clock=lambda: time.time() + ahead)
    d.link.renewal = d.renewal
    assert d.link.attempt()
    with caplog.at_level(logging.WARNING):
        running(d.renewal)
        await until(lambda: d.renewal.renewed == 1, "the renewal its clock asks for")
        await asyncio.sleep(2 * QUIET)  # proving a negative: time for the loop to ask again, if it would
    assert d.link.requests == 1
    assert len(await hub.events("cert_issued")) == 1
    assert "the system clock runs ahead of the hub's" in caplog.text
    skew = [body for kind, body in d.audit if kind == "cert_clock_skew"]
    assert len(skew) == 1
    assert skew[0]["clock_minus_start_s"] > ahead - 3600


def test_a_certificate_ages_by_the_monotonic_clock_whatever_the_wall_clock_says() -> None:
    from edge_agent.identity.certinfo import CertificateInfo
    from edge_agent.identity.renewal import CertificateAge

    wall, mono = [0.0], [1000.0]  # a board booted in 1970
    audit: list[tuple[str, dict[str, Any]]] = []
    age = CertificateAge(lambda: wall[0], lambda kind, body: audit.append((kind, body)), lambda: mono[0])
    start = dt.datetime(2026, 12, 1, tzinfo=dt.UTC)
    cert = CertificateInfo(7, DEVICE, start, start + 3 * DAY)
    assert age.age(cert) == dt.timedelta(0)  # not "not yet valid" for ever: it starts ageing now
    assert [kind for kind, _ in audit] == ["cert_clock_skew"]
    mono[0] += 2 * DAY.total_seconds()
    wall[0] = (start + 400 * DAY).timestamp()  # then NTP steps the wall clock far ahead
    assert age.age(cert) == 2 * DAY
    assert age.left(cert) == DAY
    assert len(audit) == 1  # once per certificate
