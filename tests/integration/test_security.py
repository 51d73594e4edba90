"""Only the fleet gets in, and a device reaches only its own topics — against a real Mosquitto.

Every certificate is made at test time inside the test's temp directory; no key is committed.

How "nothing arrives" is proved: a bounded wait (QUIET) made after a positive control has
shown that the same path delivers. Where one publisher sends a forbidden message and then an
allowed one, QoS 1 and in that order, the allowed one arriving first also shows the forbidden
one was not delivered: the broker routes a publish to every subscriber before it PUBACKs it,
and keeps one publisher's messages in order towards one subscriber.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ssl
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edgefleet.errors import ConnectRefused, PublishRefused
from edgefleet.mqtt.session import Message, MqttSession, TlsIdentity
from edgefleet.runtime.files import write_atomic
from edgefleet.wire.protocol import down_filter, down_topic, presence_topic, up_topic
from hub.pki.authority import Authority, cert_pem, key_pem, new_ec_key, utcnow
from tests.support.harness import HUB, HubDir, Proc, connect, device_identity, hub_tap, run_cli

pytestmark = pytest.mark.integration

QUIET = 1.0  # how long "nothing arrives" is watched, always after a positive control
ARRIVAL = 5.0  # bound on anything that must happen: a message, a PUBACK
CLI_TIMEOUT = 20.0  # bound on one mosquitto_pub / mosquitto_sub run
NOT_AUTHORIZED = 135  # MQTT v5 reason code of a PUBACK the ACL refused

# The client's highest TLS version; the broker accepts 1.2 and 1.3. The broker's verdict
# on a client certificate reaches the client during the handshake with TLS 1.2, and only on
# the first read after it with TLS 1.3: MqttSession has to explain both.
TLS_VERSIONS = [
    pytest.param(ssl.TLSVersion.TLSv1_3, id="tls13"),
    pytest.param(ssl.TLSVersion.TLSv1_2, id="tls12"),
]


# --- helpers -------------------------------------------------------------------------


async def next_within(session: MqttSession, seconds: float = ARRIVAL) -> Message:
    async with asyncio.timeout(seconds):
        return await session.next_message()


async def nothing_within(session: MqttSession, seconds: float = QUIET) -> None:
    """Assert that no message arrives on `session` for `seconds`."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            message = await session.next_message()
            pytest.fail(f"{session.client_id} received {message.topic} {message.payload!r}")


async def publish_within(session: MqttSession, topic: str, payload: bytes) -> None:
    async with asyncio.timeout(ARRIVAL):
        await session.publish(topic, payload, qos=1)


def tls_context(identity: TlsIdentity | None, ca: Path, maximum: ssl.TLSVersion) -> ssl.SSLContext:
    """Like TlsIdentity.context(), with a TLS version cap; no client certificate if None."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.maximum_version = maximum
    if identity is not None:
        ctx.load_cert_chain(str(identity.cert), str(identity.key))
    return ctx


async def open_session(ctx: ssl.SSLContext, port: int, client_id: str) -> MqttSession:
    session = MqttSession(client_id=client_id, host="127.0.0.1", port=port, tls=ctx,
                          keepalive=10, connect_timeout=5.0)
    await session.connect()
    return session


async def assert_connects(ctx: ssl.SSLContext, port: int, client_id: str) -> None:
    session = await open_session(ctx, port, client_id)
    assert session.is_connected
    await session.close()


async def assert_refused(ctx: ssl.SSLContext, port: int, client_id: str, why: str) -> ConnectRefused:
    """Connecting must fail with ConnectRefused whose message says `why`."""
    try:
        session = await open_session(ctx, port, client_id)
    except ConnectRefused as exc:
        refused = exc
    else:
        await session.close()
        pytest.fail(f"{client_id} was let in")
    print(f"refused as expected: {refused} (auth={refused.auth})")
    assert why in str(refused).lower(), f"{refused!r} does not say {why!r}"
    return refused


def write_identity(folder: Path, ca_cert: Path, key: ec.EllipticCurvePrivateKey | None,
                   cert: x509.Certificate) -> TlsIdentity:
    assert key is not None
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_atomic(folder / "client.key", key_pem(key), 0o600)
    write_atomic(folder / "client.crt", cert_pem(cert), 0o600)
    return TlsIdentity(ca_cert, folder / "client.crt", folder / "client.key")


def expired_client_cert(ca: Authority, cn: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A client certificate signed by `ca` that expired yesterday; otherwise like a real one."""
    key = new_ec_key()
    now = utcnow()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=30))
        .not_valid_after(now - dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False)
        .sign(ca.key, hashes.SHA256())
    )
    return key, cert


def cli_tls(identity: TlsIdentity, port: int) -> list[str]:
    return ["-V", "mqttv5", "-h", "127.0.0.1", "-p", str(port),
            "--cafile", str(identity.ca), "--cert", str(identity.cert), "--key", str(identity.key)]


async def mosquitto_pub(identity: TlsIdentity, port: int, topic: str, payload: str) -> tuple[int, str]:
    code, out, err = await run_cli("mosquitto_pub", *cli_tls(identity, port), "-d", "-q", "1",
                                   "-t", topic, "-m", payload, timeout=CLI_TIMEOUT)
    printed = (out + err).strip()
    print(f"mosquitto_pub -t {topic} -> exit {code}:\n{printed}")
    return code, printed


async def mosquitto_sub_as(
    identity: TlsIdentity, port: int, wait: int, publish: list[tuple[MqttSession, str, bytes]]
) -> tuple[int, list[str]]:
    """Run `mosquitto_sub -C 1 -W wait` subscribed to B's commands and to '#'; once it has its
    SUBACK, make the given publishes (QoS 1, in order); return its exit code and output lines."""
    # stdbuf: mosquitto_sub block-buffers stdout into a pipe, and its SUBACK line is the event.
    sub = await Proc("mosquitto_sub", [
        "stdbuf", "-oL", "mosquitto_sub", *cli_tls(identity, port), "-d", "-v", "-q", "1",
        "-C", "1", "-W", str(wait), "-t", down_filter("dev-b"), "-t", "#",
    ]).start()
    try:
        await sub.wait_for(r"received SUBACK", timeout=ARRIVAL)
        for session, topic, payload in publish:
            await publish_within(session, topic, payload)
        assert sub.proc is not None
        async with asyncio.timeout(wait + ARRIVAL):
            code = await sub.proc.wait()
    finally:
        await sub.stop()  # also collects the last lines
    print(f"mosquitto_sub -W {wait} -> exit {code}:\n" + "\n".join(sub.lines))
    return code, sub.lines


# --- 1. only a valid, unrevoked fleet certificate gets in -----------------------------


@pytest.mark.parametrize("tls_max", TLS_VERSIONS)
async def test_refuses_client_without_certificate(
    hub_dir: HubDir, hub: Proc, bundles: Path, tls_max: ssl.TLSVersion
) -> None:
    await hub_dir.provision(bundles, "dev-a")
    device = device_identity(bundles / "dev-a")
    await assert_connects(tls_context(device, device.ca, tls_max), hub_dir.port, "dev-a")  # the path works
    if tls_max is ssl.TLSVersion.TLSv1_3:
        refused = await assert_refused(tls_context(None, device.ca, tls_max), hub_dir.port, "dev-a",
                                       "certificate required")
        assert refused.auth
    else:
        # TLS 1.2 has no "certificate required" alert: OpenSSL answers a missing client
        # certificate with a bare handshake_failure, which says nothing more.
        await assert_refused(tls_context(None, device.ca, tls_max), hub_dir.port, "dev-a", "handshake failure")


@pytest.mark.parametrize("tls_max", TLS_VERSIONS)
async def test_refuses_certificate_from_another_ca(
    hub_dir: HubDir, hub: Proc, bundles: Path, workdir: Path, tls_max: ssl.TLSVersion
) -> None:
    """A CA of the same name and region, a fleet device's CN: only the fleet CA's key counts."""
    await hub_dir.provision(bundles, "dev-a")
    fleet_ca = hub_dir.pki / "ca.crt"
    await assert_connects(tls_context(device_identity(bundles / "dev-a"), fleet_ca, tls_max), hub_dir.port, "dev-a")
    rogue = Authority.create(hub_dir.region)
    key, cert = rogue.issue_client("dev-a", dt.timedelta(days=1))
    identity = write_identity(workdir / "rogue", fleet_ca, key, cert)
    refused = await assert_refused(tls_context(identity, fleet_ca, tls_max), hub_dir.port, "dev-a", "unknown ca")
    assert refused.auth


@pytest.mark.parametrize("tls_max", TLS_VERSIONS)
async def test_refuses_expired_certificate_from_fleet_ca(
    hub_dir: HubDir, hub: Proc, workdir: Path, tls_max: ssl.TLSVersion
) -> None:
    fleet_ca = hub_dir.pki / "ca.crt"
    ca = Authority.load(hub_dir.pki / "ca.key", fleet_ca)
    key, cert = ca.issue_client("dev-a", dt.timedelta(days=1))
    fresh = write_identity(workdir / "fresh", fleet_ca, key, cert)
    await assert_connects(tls_context(fresh, fleet_ca, tls_max), hub_dir.port, "dev-a")  # same CA, same CN
    key, cert = expired_client_cert(ca, "dev-a")
    expired = write_identity(workdir / "expired", fleet_ca, key, cert)
    refused = await assert_refused(tls_context(expired, fleet_ca, tls_max), hub_dir.port, "dev-a", "expired")
    assert refused.auth


@pytest.mark.parametrize("tls_max", TLS_VERSIONS)
async def test_refuses_revoked_certificate(
    hub_dir: HubDir, hub: Proc, bundles: Path, tls_max: ssl.TLSVersion
) -> None:
    await hub_dir.provision(bundles, "dev-a", "dev-b")
    victim, bystander = device_identity(bundles / "dev-a"), device_identity(bundles / "dev-b")
    await assert_connects(tls_context(victim, victim.ca, tls_max), hub_dir.port, "dev-a")
    code, out, err = await run_cli(HUB, "revoke", "--dir", str(hub_dir.dir), "dev-a")
    print(out, err)
    assert code == 0, err
    refused = await assert_refused(tls_context(victim, victim.ca, tls_max), hub_dir.port, "dev-a", "revoked")
    assert refused.auth is True
    # The CRL locks out only the revoked device.
    await assert_connects(tls_context(bystander, bystander.ca, tls_max), hub_dir.port, "dev-b")


# --- 2. a device writes only its own topics --------------------------------------------


async def test_device_cannot_publish_into_another_devices_topics(
    hub_dir: HubDir, hub: Proc, bundles: Path
) -> None:
    await hub_dir.provision(bundles, "dev-a", "dev-b")
    a_identity = device_identity(bundles / "dev-a")
    forged = [up_topic("dev-b", "telemetry"), presence_topic("dev-b"), down_topic("dev-b", "cmd")]
    async with hub_tap(hub_dir, hub, ["edgefleet/v1/#"]) as tap:
        a = await connect(a_identity, hub_dir.port, "dev-a")
        try:
            for topic in forged:
                with pytest.raises(PublishRefused) as refused:
                    await publish_within(a, topic, b"forged by dev-a")
                assert refused.value.code == NOT_AUTHORIZED, refused.value
                assert refused.value.topic == topic
            # Positive control, on the same connection: A's own topic reaches the hub, and
            # it is the first thing the hub sees, so none of the forged messages got through.
            await publish_within(a, up_topic("dev-a", "telemetry"), b"genuine from python")
            message = await next_within(tap)
            assert (message.topic, message.payload) == (up_topic("dev-a", "telemetry"), b"genuine from python")
            await nothing_within(tap)
        finally:
            await a.close()  # the CLI below uses A's certificate, hence A's client id

        # The same with the real mosquitto client: nothing forged is delivered, whatever it exits with.
        for topic in forged:
            _, printed = await mosquitto_pub(a_identity, hub_dir.port, topic, "forged by mosquitto_pub")
            assert "RC:135" in printed, printed  # -d shows the broker's PUBACK reason code
        code, printed = await mosquitto_pub(a_identity, hub_dir.port, up_topic("dev-a", "telemetry"),
                                            "genuine from mosquitto_pub")
        assert code == 0, printed
        message = await next_within(tap)
        assert (message.topic, message.payload) == (up_topic("dev-a", "telemetry"), b"genuine from mosquitto_pub")
        await nothing_within(tap)


# --- 3. a device reads only its own topics ---------------------------------------------


async def test_device_never_receives_another_devices_messages(
    hub_dir: HubDir, hub: Proc, bundles: Path
) -> None:
    await hub_dir.provision(bundles, "dev-a", "dev-b")
    a_identity = device_identity(bundles / "dev-a")
    async with hub_tap(hub_dir, hub) as hub_session:
        a = await connect(a_identity, hub_dir.port, "dev-a")
        b = await connect(device_identity(bundles / "dev-b"), hub_dir.port, "dev-b")
        try:
            # SUBACK grants anything (acl_file does not check SUBSCRIBE): only delivery tells.
            await a.subscribe([(down_filter("dev-b"), 1), ("#", 1)])
            await b.subscribe([(down_filter("dev-b"), 1)])
            await publish_within(hub_session, down_topic("dev-b", "cmd"), b"for dev-b")
            await publish_within(hub_session, down_topic("dev-a", "cmd"), b"for dev-a")
            got_b = await next_within(b)
            assert (got_b.topic, got_b.payload) == (down_topic("dev-b", "cmd"), b"for dev-b")
            got_a = await next_within(a)  # A's subscriptions deliver: its own command, and first
            assert (got_a.topic, got_a.payload) == (down_topic("dev-a", "cmd"), b"for dev-a")
            await nothing_within(a)
            await nothing_within(b, 0)
        finally:
            await a.close()  # mosquitto_sub below uses A's certificate, hence A's client id
            await b.close()

        # The real mosquitto_sub as A. First it must receive A's own command, published after
        # B's, as its first and only message; then, with only B's command sent, nothing at all.
        code, lines = await mosquitto_sub_as(a_identity, hub_dir.port, wait=int(CLI_TIMEOUT), publish=[
            (hub_session, down_topic("dev-b", "cmd"), b"for dev-b via cli"),
            (hub_session, down_topic("dev-a", "cmd"), b"for dev-a via cli"),
        ])
        assert code == 0, lines
        assert f"{down_topic('dev-a', 'cmd')} for dev-a via cli" in lines
        assert not [line for line in lines if "for dev-b" in line or down_topic("dev-b", "cmd") in line]

        code, lines = await mosquitto_sub_as(a_identity, hub_dir.port, wait=int(QUIET) + 1, publish=[
            (hub_session, down_topic("dev-b", "cmd"), b"for dev-b via cli, again"),
        ])
        assert code != 0, lines  # -W ran out
        assert not [line for line in lines if "received PUBLISH" in line or "for dev-b" in line]


# --- 4. the identity is the certificate, never a claimed client id ----------------------


async def test_claimed_client_id_cannot_take_over_a_session(
    hub_dir: HubDir, hub: Proc, bundles: Path
) -> None:
    await hub_dir.provision(bundles, "dev-a", "dev-b")
    mark = hub.mark()
    async with hub_tap(hub_dir, hub, ["edgefleet/v1/#"]) as tap:
        a = await connect(device_identity(bundles / "dev-a"), hub_dir.port, "dev-a")
        try:
            impostor = await connect(device_identity(bundles / "dev-b"), hub_dir.port, client_id="dev-a")
            try:
                # A keeps its session: not closed, and it still publishes.
                try:
                    async with asyncio.timeout(QUIET):
                        why = await a.wait_closed()
                except TimeoutError:
                    pass
                else:
                    pytest.fail(f"dev-a was disconnected when dev-b claimed its client id: {why}")
                assert a.is_connected
                await publish_within(a, up_topic("dev-a", "telemetry"), b"still dev-a")
                message = await next_within(tap)
                assert (message.topic, message.payload) == (up_topic("dev-a", "telemetry"), b"still dev-a")

                # The impostor is B in every respect but its claim.
                with pytest.raises(PublishRefused) as refused:
                    await publish_within(impostor, up_topic("dev-a", "telemetry"), b"forged")
                assert refused.value.code == NOT_AUTHORIZED
                await publish_within(impostor, up_topic("dev-b", "telemetry"), b"from dev-b")
                message = await next_within(tap)
                assert (message.topic, message.payload) == (up_topic("dev-b", "telemetry"), b"from dev-b")
                await nothing_within(tap)
                assert impostor.is_connected
                assert a.is_connected
            finally:
                await impostor.close()
        finally:
            await a.close()
    # The broker's own account: B's certificate connected as dev-b, and nobody was replaced.
    await hub.wait_for(r"New client connected from \S+ as dev-b \(", after=mark)
    assert not [line for line in hub.lines[mark:] if "dev-a already connected" in line]
