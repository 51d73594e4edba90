"""`edge-agent check`: config, files, permissions, clock, connectivity — each in plain words."""

from __future__ import annotations

import asyncio
import datetime as dt
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from cryptography.x509.oid import NameOID

from edge_agent.config import AgentSettings
from edge_agent.identity.clock import CLOCK_FLOOR
from edge_agent.identity.enroll import read_status as read_enroll_status
from edge_agent.identity.renewal import RENEW_AT
from edge_agent.identity.tls import Credential, IdentityFiles, key_permissions, wrong_device
from edge_agent.sense.sensors import SensorError, ThermalSensor, thermal_root
from edgefleet.errors import ConnectRefused
from edgefleet.mqtt.session import MqttSession, TlsIdentity
from edgefleet.runtime.runlock import AGENT_LOCK, RunLock
from edgefleet.wire.envelope import ed25519_public_from_pem, key_id
from edgefleet.wire.protocol import ProtocolError

EXPIRY_WARNING: Final = dt.timedelta(days=14)
TCP_TIMEOUT: Final = 5.0
# One probe read of a field sensor; longer than any sane device answer, short for a person waiting.
FIELD_PROBE_TIMEOUT: Final = 10.0


@dataclass(frozen=True)
class Finding:
    name: str
    ok: bool
    message: str


def _when(moment: dt.datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M UTC")


def clock_problem(cert: x509.Certificate, now: dt.datetime) -> str | None:
    """A sentence about the clock or the certificate's dates, or None if all is well."""
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    if now < CLOCK_FLOOR or now < start - dt.timedelta(days=1):
        return (
            f"The system clock reads {_when(now)}, before this device's certificate became valid "
            f"({_when(start)}): the board has no real-time clock or has not synced its time yet. "
            "Enable time sync (timedatectl set-ntp true) or set the date; the agent keeps sampling "
            "and connects by itself once the clock is right."
        )
    if now < start:
        return (
            f"The system clock ({_when(now)}) is behind: the certificate is valid from {_when(start)}. "
            "Sync the clock (timedatectl set-ntp true)."
        )
    if now >= end:
        return (
            f"The device certificate expired on {_when(end)} and cannot renew in band (that needs a connection). "
            "Re-provision the device: make a key and CSR on it (`openssl req -new -newkey ec -pkeyopt "
            "ec_paramgen_curve:P-256 -nodes -keyout KEY -subj /CN=DEVICE_ID -out DEVICE_ID.csr`, KEY being tls.key "
            "of agent.toml), run `edge-hub provision --csr DEVICE_ID.csr --dir DIR --out OUT DEVICE_ID` on the hub, "
            "put the bundle's device.crt at tls.cert and restart the agent (docs/security.md, Certificate lifecycle)."
        )
    return None


def check_files(settings: AgentSettings, now: dt.datetime) -> list[Finding]:
    """The bundle's files, and the identity the agent would connect with (maybe one it renewed)."""
    bundle = settings.tls
    files = IdentityFiles(bundle, settings.state_dir)
    current, tls = files.current(), files.in_use()
    findings: list[Finding] = []
    # The files of the identity in use: an enrolled device's is STATE/identity.pem, not the bundle's.
    missing = [(n, p) for n, p in (("ca", tls.ca), ("cert", tls.cert), ("key", tls.key)) if not p.is_file()]
    for name, path in missing:
        findings.append(Finding(f"file {name}", False,
                                f"{path} does not exist: copy the device bundle's {path.name} there, "
                                f"or fix tls.{name} in {settings.path}."))
    if missing:
        return findings
    findings.append(_check_key_mode(tls.key))
    try:
        ca = x509.load_pem_x509_certificate(tls.ca.read_bytes())
        cert = x509.load_pem_x509_certificate(tls.cert.read_bytes())
        key = load_pem_private_key(tls.key.read_bytes(), password=None)
    except PermissionError as exc:
        why = f"cannot read {exc.filename}: run the check as the agent's user or root."
        return [*findings, Finding("files", False, why)]
    except ValueError as exc:
        why = f"a certificate or key file is not valid PEM ({exc}): copy the bundle again."
        return [*findings, Finding("files", False, why)]
    findings.append(_check_identity(settings, tls, ca, cert, key))
    findings.append(_renewal(files, current, now))
    problem = clock_problem(cert, now)
    if problem:
        findings.append(Finding("clock", False, problem))
    elif cert.not_valid_after_utc - now < EXPIRY_WARNING:
        findings.append(Finding("clock", True, f"clock looks right; note the certificate expires on "
                                              f"{_when(cert.not_valid_after_utc)}."))
    else:
        findings.append(Finding("clock", True, f"clock reads {_when(now)}; certificate valid until "
                                              f"{_when(cert.not_valid_after_utc)}."))
    return findings


def _check_key_mode(path: Path) -> Finding:
    return Finding("key permissions", *key_permissions(path))


def _renewal(files: IdentityFiles, current: Credential | None, now: dt.datetime) -> Finding:
    """Where the certificate in use comes from, and where its in-band renewal stands (never a failure:
    an expired certificate is the clock finding's)."""
    if current is None:
        return Finding("renewal", True, "no usable certificate yet (see identity).")
    where = (f"renewed in band ({files.renewed_path}; the bundle's certificate is the fallback)"
             if current.source == "renewed" else "the bundle's")
    pending = files.pending()
    if pending is not None:
        state = (f"a renewed certificate ({pending.describe()}) waits in {files.next_path}: the agent switches to "
                 "it on its next connection")
    elif files.has_next_key():
        state = f"a renewal is under way: a key was made on the device ({files.next_path}), waiting for the hub"
    elif current.cert.expired(now):
        state = "it has expired: no in-band renewal (see clock)"
    else:
        state = f"the agent renews it in band from {_when(current.cert.point(RENEW_AT))}"
    return Finding("renewal", True, f"certificate in use: {where}, {current.describe()}; {state}.")


def _check_identity(settings: AgentSettings, tls: TlsIdentity, ca: x509.Certificate, cert: x509.Certificate,
                    key: object) -> Finding:
    device = settings.config.device_id
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    cn = str(names[0].value) if names else ""
    mismatch = wrong_device(cn, device)
    if mismatch:
        return Finding("identity", False, mismatch)
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return Finding("identity", False, f"{tls.cert} was not issued by the CA in "
                                          f"{tls.ca}: copy both from the same bundle.")
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) or (
        key.public_key().public_numbers() != cert.public_key().public_numbers()  # type: ignore[union-attr]
    ):
        return Finding("identity", False, f"{tls.key} does not belong to {tls.cert}: "
                                          "copy the key made with this certificate (or provision again).")
    return Finding("identity", True, f"certificate for {device}, issued by the fleet CA, matches its key.")


def check_policy_key(settings: AgentSettings) -> Finding:
    """The hub's policy-signing key, and the signed policy the agent would start with."""
    from edge_agent.decide.policy_intake import PolicyIntake

    path = settings.policy_key
    try:
        key = ed25519_public_from_pem(path.read_bytes())
    except OSError as exc:
        return Finding("policy key", False, f"cannot read {path} ({exc.strerror}): every policy the hub pushes will "
                                            "be refused; copy policy.pub from the device's bundle (it is the hub's "
                                            "DIR/pki/policy.pub).")
    except ProtocolError as exc:
        return Finding("policy key", False, f"{path}: {exc.detail}; copy policy.pub from the device's bundle again.")
    intake = PolicyIntake(settings, local=None)
    intake.load()
    running = f"signed policy version {intake.version} is stored" if intake.version else "no signed policy yet"
    if intake.refused is not None:
        return Finding("policy key", False, f"the stored policy is not usable ({intake.refused.reason}: "
                                            f"{intake.refused.detail}); the agent runs its local policy until the "
                                            "hub sends a new one.")
    return Finding("policy key", True, f"policies must be signed by key {key_id(key)} ({path}); {running}.")


def check_thermal(settings: AgentSettings) -> list[Finding]:
    """Each thermal sensor of the profile: the zones it would read, or why it would read none."""
    findings = []
    profile = settings.profile
    for spec in profile.sensors:
        if spec.kind != "thermal":
            continue
        root = thermal_root(spec)
        try:
            readings = ThermalSensor(spec.interval_s, root).read(time.time())
        except SensorError as exc:
            findings.append(Finding("thermal", False, f"{exc}: the board's thermal driver is failing, so rules on "
                                                      "thermal_* metrics would not fire; check dmesg."))
            continue
        if not readings:
            findings.append(Finding(
                "thermal", False,
                f"profile {profile.name!r} expects thermal zones but {root} has none, so no thermal_* reading "
                "is taken and rules on them never fire: load the board's thermal driver, or give the device a "
                "profile without a thermal sensor, such as generic-linux."))
            continue
        zones = ", ".join(f"{r.metric} {r.value:g} °C" for r in readings)
        findings.append(Finding("thermal", True, f"{len(readings)} thermal zone(s) under {root}: {zones}."))
    return findings


async def check_field_sensors(settings: AgentSettings) -> list[Finding]:
    """Each field sensor: one read, decoded, or one sentence on what is wrong."""
    specs = settings.profile.field_sensors
    if not specs:
        return []
    running = RunLock.holder(settings.state_dir / AGENT_LOCK)
    if running is not None:
        # A serial line has one owner, and many devices take only one or two TCP connections.
        return [Finding(f"sensor {spec.name}", True, "not probed: the running agent holds its connection; "
                                                     "`edge-agent status` shows its health.") for spec in specs]
    from edge_agent.sense.field.base import FieldContext, build_field_sensors

    findings = []
    for sensor in build_field_sensors(specs, FieldContext()):
        name = f"sensor {sensor.name}"
        try:
            async with asyncio.timeout(FIELD_PROBE_TIMEOUT):
                readings = await sensor.probe()
        except TimeoutError:
            findings.append(Finding(name, False, f"no answer within {FIELD_PROBE_TIMEOUT:.0f} s: check that the "
                                                 "device is powered and its address and unit id are right."))
            continue
        except SensorError as exc:
            findings.append(Finding(name, False, str(exc)))
            continue
        shown = ", ".join(f"{r.metric} = {r.value:g}" for r in readings[:8])
        more = f" and {len(readings) - 8} more" if len(readings) > 8 else ""
        findings.append(Finding(name, True, f"read {len(readings)} value(s): {shown}{more}."))
    return findings


async def check_connectivity(settings: AgentSettings) -> list[Finding]:
    """TCP, then an MQTT connection with the identity the agent would use."""
    tls = IdentityFiles(settings.tls, settings.state_dir).in_use()
    b = settings.config.broker
    where = f"{b.host}:{b.port}"
    try:
        async with asyncio.timeout(TCP_TIMEOUT):
            _, writer = await asyncio.open_connection(b.host, b.port)
        writer.close()
        await writer.wait_closed()
    except socket.gaierror:
        return [Finding("network", False, f"cannot resolve {b.host!r}: check broker.host in {settings.path} and DNS.")]
    except TimeoutError:
        return [Finding("network", False, f"no answer from {where} within {TCP_TIMEOUT:.0f} s: a firewall or "
                                          "a wrong address (broker.host, broker.port).")]
    except OSError as exc:
        return [Finding("network", False, f"cannot reach the broker at {where} ({exc.strerror or exc}): "
                                          "is the hub running, and are broker.host and broker.port right?")]
    found = [Finding("network", True, f"{where} accepts TCP connections.")]
    running = RunLock.holder(settings.state_dir / AGENT_LOCK)
    if running is not None:
        # The broker forces the client id to the certificate's CN: a probe with this identity
        # would close the running agent's session (and it would take it back, and so on).
        who = f"edge-agent (pid {running})" if running else "an edge-agent"
        return [*found, Finding("broker", True, f"not tried: {who} is running on {settings.state_dir} with this "
                                                f"identity, and a second connection as {settings.config.device_id} "
                                                "would take its session over; `edge-agent status` shows whether "
                                                "the hub acknowledges it.")]
    session = MqttSession(client_id=settings.config.device_id, host=b.host, port=b.port,
                          tls=tls.context(), keepalive=b.keepalive, connect_timeout=b.connect_timeout)
    try:
        await session.connect()
    except ConnectRefused as exc:
        fix = ("if the device was revoked or re-keyed, provision it again."
               if exc.auth else "see the reason above.")
        return [*found, Finding("broker", False, f"the broker at {where} refused the connection: {exc}; {fix}")]
    await session.close()
    return [*found, Finding("broker", True, f"connected to {where} with mutual TLS as {settings.config.device_id}.")]


def check_enrollment(settings: AgentSettings) -> Finding | None:
    """None for a device with an identity; else where its enrollment stands, in one sentence."""
    if settings.config.enroll is None:
        return None
    files = IdentityFiles(settings.tls, settings.state_dir)
    if files.current() is not None or files.pending() is not None:
        return None
    status = read_enroll_status(settings.state_dir)
    if status is None:
        return Finding("enrollment", False, f"not enrolled yet and no attempt made: start the agent; it enrolls at "
                                            f"{settings.config.enroll.url} with {settings.enroll_token}.")
    return Finding("enrollment", False, f"not enrolled yet ({status.state}): {status.detail}")


async def run_checks(settings: AgentSettings, now: dt.datetime | None = None) -> list[Finding]:
    now = now or dt.datetime.now(dt.UTC)
    findings = [Finding("config", True, f"{settings.path} is valid (profile {settings.profile.name}).")]
    enrolling = check_enrollment(settings)
    if enrolling is not None:  # an image folder's device before its first certificate: nothing else to check yet
        return [*findings, enrolling, check_policy_key(settings), *check_thermal(settings)]
    findings += check_files(settings, now)
    findings.append(check_policy_key(settings))
    findings += check_thermal(settings)
    findings += await check_field_sensors(settings)
    # A wrong clock, a loose key mode, a missing policy key or thermal zone still lets us try
    # the network; missing or mismatched TLS files do not.
    if all(f.ok for f in findings if f.name not in ("clock", "key permissions", "policy key", "thermal")
           and not f.name.startswith("sensor ")):
        findings += await check_connectivity(settings)
    else:
        findings.append(Finding("broker", False, "not tried: fix the files above first."))
    return findings
