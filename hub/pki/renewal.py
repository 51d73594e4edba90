"""Certificate lifecycle at the hub: devices' in-band renewals, and the broker's and the hub's
own certificates renewed before they expire, in one upkeep loop with the CRL's
(`keep_pki_fresh`; the CRL itself is hub/pki/revocation.py's).

Devices: an agent sends a certificate request (made on the device, for a key that never
leaves it) on its own up/cert; the broker's ACL lets it publish only there, so the topic
names the device. `CertificateDesk` signs it if the device is registered and not revoked and
the request names the device, and answers on down/cert. Every refusal is audited (a hub event
`cert_refused`, and a log line); every certificate issued is recorded with the key it is for
(`cert_issued`), so a repeated request (a reply lost, a device killed mid-renewal) gets the
same certificate, not another one. docs/security.md, "Certificate lifecycle".

The broker's server certificate and the hub's client certificates keep their keys when they
are renewed: replacing one file is atomic, a pair of files is not, and Mosquitto reads both
when it reloads. The new certificate is written, then the broker reloaded (SIGHUP); connected
devices stay connected (a reload keeps live sessions), new connections see the new one.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from edgefleet.errors import PublishRefused
from edgefleet.mqtt.session import MqttSession
from edgefleet.runtime.files import write_atomic
from edgefleet.wire.events import EventKind
from edgefleet.wire.keys import public_key_id
from edgefleet.wire.protocol import CERT, CertIssued, CertRefused, CertReply, CertRequest, down_topic, pack_cert
from hub.broker import reload_broker
from hub.config import HubConfig, HubPaths
from hub.db.dialect import JSON_FIELD
from hub.db.interface import HubState, Tx
from hub.db.rows import iso
from hub.pki.authority import (
    Authority,
    CsrRefused,
    cert_pem,
    common_name,
    host_names,
    renewal_due_in,
    utcnow,
)
from hub.pki.revocation import renew_crl_if_due

CHECK_INTERVAL: Final = 3600.0  # the hub's certificates live for months: hourly looks leave ample margin
MIN_CHECK_WAIT: Final = 1.0  # between looks, however short the configured lifetimes (tests, drills)

NO_CA: Final = "no_ca"  # refusal reason: the process that got the request cannot sign (ask again)
log = logging.getLogger("hub.renewal")


class CertificateDesk:
    """Answers devices' certificate requests (up/cert). `handle` in the ingest cycle, `serve` per session."""

    def __init__(self, paths: HubPaths, config: HubConfig, store: HubState) -> None:
        self._paths, self._config, self._store = paths, config, store
        self._ca: Authority | None = None
        self._outgoing: asyncio.Queue[tuple[str, CertReply]] = asyncio.Queue()

    @property
    def ca(self) -> Authority:
        if self._ca is None:
            self._ca = Authority.load(self._paths.ca_key, self._paths.ca_cert)
        return self._ca

    async def handle(self, requests: list[tuple[str, CertRequest]]) -> None:
        """Answer each request (committed and audited before the answer is queued)."""
        for device, request in requests:
            self._outgoing.put_nowait((device, await self.answer(device, request)))

    async def serve(self, session: MqttSession) -> None:
        """Publish the answers, in order. One lost with the connection is asked for again by the
        device (it repeats its request until answered)."""
        while True:
            device, reply = await self._outgoing.get()
            try:
                await session.publish(down_topic(device, CERT), pack_cert(reply), qos=1)
            except PublishRefused as exc:
                log.warning("the answer to %s's certificate request was refused by the broker: %s", device, exc)

    async def answer(self, device: str, request: CertRequest) -> CertReply:
        """The certificate for `device`'s request, or why not; recorded and audited in one transaction."""
        try:
            csr = x509.load_pem_x509_csr(request.csr.encode())
            key = public_key_id(_public_key(csr))
        except (ValueError, UnsupportedAlgorithm) as exc:  # a key type cryptography does not know: the latter
            return await self._refuse_alone(device, CertRefused(
                key_id="", reason="bad_request", detail=f"not a usable PEM certificate request: {exc}"[:500]))
        if not self._paths.ca_key.exists():  # a replica's own folder: the CA key stays with the primary
            return CertRefused(key_id=key, reason=NO_CA, detail="this hub process holds no CA key; ask again, "
                               "another one of the region's hub processes signs")
        now = time.time()

        async def work(db: Tx) -> tuple[CertReply, bool]:
            # Read, sign and record in one IMMEDIATE transaction: an `edge-hub revoke` running at the
            # same time either comes first (and is seen here) or revokes this certificate too.
            row = await db.fetch_one("SELECT revoked_at FROM devices WHERE device = ?", (device,))
            if row is None or row[0] is not None:
                reason = "unknown_device" if row is None else "revoked"
                detail = f"{device} is not registered with this hub" if row is None else f"{device} is revoked"
                return await self._refusal(db, device, CertRefused(key_id=key, reason=reason, detail=detail)), False
            repeat = await db.fetch_one(
                    "SELECT pem FROM certificates WHERE device = ? AND key_id = ? AND purpose = 'device' "
                    "AND revoked_at IS NULL AND not_after > ? AND pem IS NOT NULL ORDER BY not_after DESC LIMIT 1",
                (device, key, now))
            if repeat is not None:
                return CertIssued(key_id=key, cert=repeat[0]), True
            if (limited := await self._over_limit(db, device, key, now)) is not None:
                return limited
            try:
                cert = self.ca.sign_request(csr, device, self._config.pki.device_cert_lifetime)
            except CsrRefused as exc:
                return await self._refusal(db, device, CertRefused(key_id=key, reason=exc.reason,
                                                                   detail=str(exc)[:500])), False
            pem = cert_pem(cert).decode()
            await db.execute(
                "INSERT INTO certificates(serial, device, purpose, issued_at, not_after, key_id, pem) "
                "VALUES (?, ?, 'device', ?, ?, ?, ?)",
                (format(cert.serial_number, "x"), device, now, cert.not_valid_after_utc.timestamp(), key, pem))
            await self._store.hub_event(db, self._config.identity, EventKind.CERT_ISSUED, {
                "device": device, "serial": format(cert.serial_number, "x"), "key_id": key,
                "not_after": cert.not_valid_after_utc.timestamp()})
            return CertIssued(key_id=key, cert=pem), False

        # `again`: the same certificate as before, or a refusal already audited in this window.
        reply, again = await self._store.atomically(work)
        if isinstance(reply, CertRefused) and again:
            log.debug("certificate request from %s refused again (%s)", device, reply.reason)
        elif isinstance(reply, CertRefused):
            _log_refusal(device, reply)
        elif again:
            log.info("certificate request from %s answered again with the certificate issued for key %s", device, key)
        else:
            log.info("certificate issued to %s in band for key %s, valid %s", device, key,
                     self._config.pki.device_cert_lifetime)
        return reply

    async def _over_limit(self, db: Tx, device: str, key: str,
                          now: float) -> tuple[CertRefused, bool] | None:
        """The refusal when `device` already had pki.renewal_limit certificates in band within the
        window (a clock running ahead, or a device asking in a loop), and whether one was audited
        before in this window; None when it may have one. Only the first refusal of a window
        becomes a hub event: a flood must not fill the database."""
        pki = self._config.pki
        window = pki.renewal_window.total_seconds()
        row = await db.fetch_one(
                "SELECT COUNT(*), MIN(issued_at) FROM certificates WHERE device = ? AND purpose = 'device' "
                "AND key_id IS NOT NULL AND issued_at > ?", (device, now - window))
        if row[0] < pki.renewal_limit:
            return None
        retry = row[1] + window - now
        refused = CertRefused(key_id=key, reason="rate_limited", detail=(
            f"{device} got {row[0]} certificates in the last {window:.0f} s (pki.renewal_limit = {pki.renewal_limit}): "
            f"ask again in {retry:.0f} s, and check the device's clock"))
        field = JSON_FIELD[db.dialect]
        audited = await db.fetch_one(
            "SELECT 1 FROM events WHERE device = ? AND kind = ? AND ts > ? "  # noqa: S608  # ours
            f"AND {field.format('body', 'device')} = ? AND {field.format('body', 'reason')} = 'rate_limited'",
            (self._config.identity, EventKind.CERT_REFUSED, now - window, device))
        if audited is None:
            return await self._refusal(db, device, refused), False
        return refused, True

    async def _refusal(self, db: Tx, device: str, refused: CertRefused) -> CertRefused:
        await self._store.hub_event(db, self._config.identity, EventKind.CERT_REFUSED, {
            "device": device, "reason": refused.reason, "detail": refused.detail, "key_id": refused.key_id})
        return refused

    async def _refuse_alone(self, device: str, refused: CertRefused) -> CertRefused:
        result = await self._store.atomically(lambda db: self._refusal(db, device, refused))
        _log_refusal(device, result)
        return result


def _public_key(csr: x509.CertificateSigningRequest) -> ec.EllipticCurvePublicKey | rsa.RSAPublicKey:
    key = csr.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
        raise ValueError("only ECDSA (P-256, P-384) and RSA keys are accepted")
    return key


def _log_refusal(device: str, refused: CertRefused) -> None:
    log.warning("certificate request from %s refused (%s): %s", device, refused.reason, refused.detail)


# --- the broker's and the hub's own certificates ------------------------------------------------


@dataclass(frozen=True)
class OwnCertificate:
    """A certificate of the hub itself, renewed with the key it has."""

    what: str  # for the log
    purpose: str  # certificates.purpose
    cert: Path
    key: Path
    server: bool  # the broker's: serverAuth with the same names, and the broker reloads it


def own_certificates(paths: HubPaths, config: HubConfig) -> list[OwnCertificate]:
    found = [OwnCertificate("broker certificate", "server", paths.server_cert, paths.server_key, True),
             OwnCertificate(f"hub certificate {config.identity}", "hub", paths.hub_cert, paths.hub_key, False)]
    found += [OwnCertificate(f"hub certificate {config.replica_identity(r)}", "hub", paths.replica_cert(r),
                             paths.replica_key(r), False)
              for r in config.hub.replicas if paths.replica_cert(r).exists()]
    return found


async def keep_pki_fresh(paths: HubPaths, config: HubConfig, store: HubState) -> None:
    """The leader's upkeep: re-issue the CRL long before its nextUpdate (an expired CRL locks out
    the whole fleet), and renew each of the hub's own certificates once less than
    pki.server_cert_renew_fraction of its life is left; look again when the next is due (at least
    hourly)."""
    while True:
        waits = [await renew_crl_if_due(paths, config, store),
                 *[await renew_if_due(own, paths, config, store) for own in own_certificates(paths, config)]]
        await asyncio.sleep(max(MIN_CHECK_WAIT, min([CHECK_INTERVAL, *waits])))


async def renew_if_due(own: OwnCertificate, paths: HubPaths, config: HubConfig, store: HubState,
                       now: dt.datetime | None = None) -> float:
    """Renew `own` if it is due (at `now`, default the clock's); return the seconds until it is due next."""
    pki = config.pki
    try:
        cert = x509.load_pem_x509_certificate(own.cert.read_bytes())
        key = load_pem_private_key(own.key.read_bytes(), password=None)
    except (OSError, ValueError) as exc:
        log.error("cannot renew the %s: %s", own.what, exc)
        return CHECK_INTERVAL
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        log.error("cannot renew the %s: %s is not an ECDSA key", own.what, own.key)
        return CHECK_INTERVAL
    due = renewal_due_in(cert.not_valid_after_utc, pki.server_cert_lifetime, pki.server_cert_renew_fraction,
                         now or utcnow())
    if due > 0:
        return due
    ca = Authority.load(paths.ca_key, paths.ca_cert)
    if own.server:
        new = ca.issue_server(host_names(cert), pki.server_cert_lifetime, key)[1]
    else:
        new = ca.issue_client(common_name(cert), pki.server_cert_lifetime, key.public_key())[1]
    write_atomic(own.cert, cert_pem(new), 0o644)
    await store.record_certificate(new.serial_number, common_name(new), own.purpose, new.not_valid_after_utc)
    reloaded = own.server and reload_broker(paths, config)
    log.info("%s renewed: serial %x, valid until %s%s", own.what, new.serial_number,
             new.not_valid_after_utc.isoformat(timespec="seconds"), "; broker reloaded" if reloaded else "")
    due = renewal_due_in(new.not_valid_after_utc, pki.server_cert_lifetime, pki.server_cert_renew_fraction, utcnow())
    if due <= 0:  # the CA itself ends before a full lifetime: no point in renewing every second
        log.error("the %s cannot outlive the fleet CA (it ends %s): rotate the CA (docs/operations.md)", own.what,
                  new.not_valid_after_utc.isoformat(timespec="seconds"))
        return CHECK_INTERVAL
    return due


# --- for `edge-hub status` ---------------------------------------------------------------------


async def lifecycle_status(paths: HubPaths, config: HubConfig, store: HubState,
                           now: float | None = None) -> dict[str, Any]:
    """What an operator must act on: devices whose certificates all expired (they cannot renew in
    band), the latest in-band refusal of each device not renewed since, devices whose clock
    disagrees with their certificate's start, and the hub's own certificates' expiry."""
    now = time.time() if now is None else now
    expired = await store.query(
        "SELECT d.device, MAX(c.not_after), d.last_seen FROM devices d JOIN certificates c USING (device) "
        "WHERE d.revoked_at IS NULL AND c.purpose = 'device' AND c.revoked_at IS NULL "
        "GROUP BY d.device HAVING MAX(c.not_after) <= ? ORDER BY d.device", (now,))
    field = JSON_FIELD[store.dialect]
    refusals = await store.query(  # the latest refusal of each device
        f"SELECT {field.format('body', 'device')}, seq, ts, {field.format('body', 'reason')}, "  # noqa: S608  # ours
        f"{field.format('body', 'detail')} FROM events WHERE device = ? AND seq IN (SELECT MAX(seq) FROM events "
        f"WHERE device = ? AND kind = ? GROUP BY {field.format('body', 'device')}) ORDER BY 1",
        (config.identity, config.identity, EventKind.CERT_REFUSED))
    issued = {row[0]: row[1] for row in await store.query(
        f"SELECT {field.format('body', 'device')}, MAX(seq) FROM events WHERE device = ? "  # noqa: S608  # ours
        f"AND kind = ? GROUP BY {field.format('body', 'device')}", (config.identity, EventKind.CERT_ISSUED))}
    # The certificate in use was judged by a clock that disagrees with its start (the agent's
    # cert_clock_skew), and no certificate has been taken into use since without one.
    skewed = await store.query(
        f"SELECT e.device, e.ts, {field.format('e.body', 'clock_minus_start_s')} FROM events e "  # noqa: S608  # ours
        "WHERE e.kind = ? AND e.seq = (SELECT MAX(seq) FROM events WHERE device = e.device "
        "AND kind = ?) AND NOT EXISTS (SELECT 1 FROM events r WHERE r.device = e.device "
        f"AND r.kind = ? AND r.seq > e.seq AND {field.format('r.body', 'serial')} != "
        f"{field.format('e.body', 'serial')}) ORDER BY e.device",
        (EventKind.CERT_CLOCK_SKEW, EventKind.CERT_CLOCK_SKEW, EventKind.CERT_RENEWED))
    own = []
    for certificate in own_certificates(paths, config):
        try:
            cert = x509.load_pem_x509_certificate(certificate.cert.read_bytes())
        except (OSError, ValueError) as exc:
            own.append({"certificate": certificate.what, "expires": None, "error": f"{certificate.cert}: {exc}"})
        else:
            own.append({"certificate": certificate.what, "expires": cert.not_valid_after_utc.isoformat(
                timespec="seconds"), "error": None})
    return {
        "cert_expired": [{"device": d, "cert_expires": iso(t), "last_seen": iso(seen),
                          "fix": f"edge-hub provision --csr FILE --dir DIR --out OUT {d}"} for d, t, seen in expired],
        "renewal_refused": [{"device": d, "reason": reason, "detail": detail, "ts": ts}
                            for d, seq, ts, reason, detail in refusals if issued.get(d, 0) < seq],
        "hub_certificates": own,
        "clock_skew": [{"device": d, "ts": ts, "clock_minus_start_s": None if skew is None else float(skew)}
                       for d, ts, skew in skewed],
    }
