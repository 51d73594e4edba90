"""Revocation: the CRL, the broker reload, and closing a revoked device's live session.

Mosquitto re-reads its CRL on SIGHUP but keeps already-connected clients
(docs/mosquitto.md). So after the reload we (1) confirm that the broker really refuses
revoked certificates now, with a throw-away probe certificate revoked together with the
device, and (2) take over the device's session with a throw-away certificate that carries
the device's CN: the broker forces the client id to the CN, so the new connection
disconnects the device's. The device cannot come back: its certificate is refused.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import secrets
import ssl
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from edgefleet.errors import ConnectRefused
from edgefleet.mqtt.session import MqttSession, TlsIdentity
from edgefleet.runtime.files import write_atomic
from hub.broker import reload_broker
from hub.config import HubConfig, HubPaths
from hub.db.interface import HubState
from hub.errors import UsageError
from hub.pki.authority import Authority, cert_pem, key_pem, renewal_due_in, utcnow

THROWAWAY_LIFETIME: Final = dt.timedelta(minutes=10)  # probe and takeover certs; keys never touch disk for long
CONFIRM_TIMEOUT: Final = 4.0  # the whole revoke must close the session within 5 s
CONFIRM_INTERVAL: Final = 0.1
PROBE_CONNECT_TIMEOUT: Final = 1.0

log = logging.getLogger(__name__)


async def publish_crl(
    paths: HubPaths, config: HubConfig, store: HubState, ca: Authority
) -> x509.CertificateRevocationList:
    """Write a fresh CRL from the database and make the broker load it."""
    crl = ca.issue_crl(await store.revoked_serials(), config.pki.crl_lifetime)
    write_atomic(paths.crl, crl.public_bytes(Encoding.PEM), 0o644)
    reload_broker(paths, config)
    return crl


async def renew_crl_if_due(paths: HubPaths, config: HubConfig, store: HubState) -> float:
    """Re-issue the CRL when it is missing, unreadable or past its renewal point; return the
    seconds until it is due next."""
    if crl_due_in(paths, config) <= 0:
        crl = await publish_crl(paths, config, store, Authority.load(paths.ca_key, paths.ca_cert))
        log.info("CRL re-issued; next update %s", crl.next_update_utc)
    return crl_due_in(paths, config)


def crl_due_in(paths: HubPaths, config: HubConfig, now: dt.datetime | None = None) -> float:
    """Seconds until the CRL on disk reaches its renewal point; 0 when it is missing or unreadable."""
    try:
        crl = x509.load_pem_x509_crl(paths.crl.read_bytes())
    except (OSError, ValueError):
        return 0.0
    next_update = crl.next_update_utc
    if next_update is None:
        return 0.0
    return max(0.0, renewal_due_in(next_update, config.pki.crl_lifetime, config.pki.crl_renew_fraction,
                                   now or utcnow()))


@dataclass
class RevokeReport:
    device: str
    certificates: int
    broker_reloaded: bool
    refusing_confirmed: bool
    session_closed: bool
    elapsed: float


class _Throwaway:
    """A short-lived certificate with its key in a private temp dir, removed on exit."""

    def __init__(self, paths: HubPaths, ca: Authority, cn: str) -> None:
        key, self.cert = ca.issue_client(cn, THROWAWAY_LIFETIME)
        assert key is not None
        self._dir = tempfile.TemporaryDirectory(prefix="edgefleet-")
        base = Path(self._dir.name)
        write_atomic(base / "c.key", key_pem(key), 0o600)
        write_atomic(base / "c.crt", cert_pem(self.cert), 0o600)
        self.cn = cn
        self.context = TlsIdentity(paths.ca_cert, base / "c.crt", base / "c.key").context()

    def close(self) -> None:
        self._dir.cleanup()


async def _connect(config: HubConfig, tls: ssl.SSLContext, client_id: str) -> MqttSession:
    session = MqttSession(
        client_id=client_id, host=config.broker.host, port=config.broker.port, tls=tls,
        keepalive=10, connect_timeout=PROBE_CONNECT_TIMEOUT,
    )
    await session.connect()
    return session


async def revoke(paths: HubPaths, config: HubConfig, store: HubState, device: str) -> RevokeReport:
    started = time.monotonic()
    if not await store.exists(device):
        raise UsageError(f"no device {device!r} is registered with this hub (see edge-hub devices)")
    ca = Authority.load(paths.ca_key, paths.ca_cert)
    count = await store.revoke_device(device)
    probe = _Throwaway(paths, ca, f"revocation-probe-{secrets.token_hex(4)}.{config.region}")
    try:
        await store.record_certificate(probe.cert.serial_number, probe.cn, "probe", probe.cert.not_valid_after_utc)
        await store.revoke_serial(probe.cert.serial_number)
        await publish_crl(paths, config, store, ca)
        reloaded = config.broker.mode == "managed" or bool(config.broker.reload_command)
        confirmed = await _confirm_refusing(config, probe)
    finally:
        probe.close()
    closed = False
    if confirmed:
        closed = await _take_over(paths, config, store, ca, device)
    return RevokeReport(device, count, reloaded, confirmed, closed, time.monotonic() - started)


async def _confirm_refusing(config: HubConfig, probe: _Throwaway) -> bool:
    """Connect with the revoked probe until the broker refuses it: then the CRL is live."""
    deadline = time.monotonic() + CONFIRM_TIMEOUT
    while time.monotonic() < deadline:
        try:
            session = await _connect(config, probe.context, probe.cn)
        except ConnectRefused as exc:
            if exc.auth:
                return True
            if "cannot reach" in str(exc):
                log.info("broker not reachable (%s): the CRL applies when it starts", exc)
                return False
        else:
            await session.close()
        await asyncio.sleep(CONFIRM_INTERVAL)
    log.warning("the broker still accepts revoked certificates after %.0f s: did it reload its CRL?",
                CONFIRM_TIMEOUT)
    return False


async def _take_over(paths: HubPaths, config: HubConfig, store: HubState, ca: Authority, device: str) -> bool:
    taker = _Throwaway(paths, ca, device)
    try:
        await store.record_certificate(taker.cert.serial_number, device, "kick", taker.cert.not_valid_after_utc)
        try:
            session = await _connect(config, taker.context, device)
        except ConnectRefused as exc:
            log.warning("could not close %s's session: %s", device, exc)
            return False
        await session.close()
        return True
    finally:
        taker.close()
        await store.revoke_serial(taker.cert.serial_number)
        await publish_crl(paths, config, store, ca)
