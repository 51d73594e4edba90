"""Zero-touch enrollment at the hub: bootstrap credentials (`edge-hub enroll create|list|revoke|
readmit`) and the answer to a device's enrollment request (`EnrollmentDesk`, served over HTTPS
by hub/pki/enroll_server.py). docs/enrollment.md says why and how.

A request is decided in one IMMEDIATE transaction: the credential (known, not revoked, not
expired, not used up), the device id (one the ACL can hold), the request (its CN, no CA, an
accepted key), the id not already enrolled from another key, the operator's approval when the
enrollment asks for one; then the certificate is signed, recorded (with its key and PEM, so a
repeated request gets the same certificate, and `edge-hub revoke` reaches it) and the device
registered with the enrollment's profile and tags before the answer leaves. Every enrollment,
hold and refusal is a hub event; repeats of one refusal within REFUSAL_AUDIT_WINDOW are only
counted, so a flood cannot fill the database.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm

from edgefleet.errors import ConfigError
from edgefleet.policy.profiles import find_profile, load_profile
from edgefleet.runtime.files import write_atomic
from edgefleet.runtime.settings import toml_value
from edgefleet.wire.enrollment import ENROLL_PATH, TOKEN_PREFIX, EnrollReply, EnrollRequest, parse_token
from edgefleet.wire.events import EventKind
from edgefleet.wire.keys import public_key_id
from edgefleet.wire.protocol import ProtocolError, validate_name
from hub.config import HubConfig, HubPaths
from hub.db import enrollments as db_enrollments
from hub.db.enrollments import EnrollmentRow
from hub.db.interface import HubState, Tx
from hub.db.store import register_device
from hub.errors import UsageError
from hub.pki.authority import Authority, CsrRefused, cert_pem, check_request

REFUSAL_AUDIT_WINDOW: Final = 60.0  # the same refusal (credential, device, reason) is audited once per minute
REFUSAL_EVENTS_PER_WINDOW: Final = 100  # audited refusals per window over all keys; the rest are counted only
AUDITED_KEYS_KEPT: Final = 10_000  # remembered refusals; past this the memory is cleared (a flood of ids)
APPROVAL_WAIT: Final = 7 * 86400.0  # a held request waits a week for a person, then is held anew when asked
APPROVAL_RULE: Final = "enrollment "  # approvals.rule of an enrollment's request: this + the enrollment id

log = logging.getLogger("hub.enroll")


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


# --- the operator's side -------------------------------------------------------------------------


@dataclass(frozen=True)

class ImageSpec:
    profile: str
    tags: dict[str, str]
    max_devices: int | None
    expires_at: float | None
    approve: bool


def render_image_toml(spec: ImageSpec, config: HubConfig, enrollment_id: str) -> str:
    tags = "\n".join(f"{toml_value(k)} = {toml_value(v)}" for k, v in sorted(spec.tags.items()))
    return f"""\
# edgefleet agent configuration for an image, written by `edge-hub enroll create` (enrollment
# {enrollment_id}). The same folder goes unchanged onto every board (/etc/edge-agent/): it holds no
# device identity. On first start the agent takes its id from [enroll] device_id_source, makes
# its key, and enrolls with the hub (docs/enrollment.md).
profile = {toml_value(spec.profile)}
region = {toml_value(config.region)}
policy_key = "policy.pub"   # the hub's policy-signing key: only policies it signed are applied

[tags]
{tags}

[enroll]
url = {toml_value(f"https://{_url_host(config.broker.host)}:{config.enroll.port}{ENROLL_PATH}")}
token = "enroll.token"       # the bootstrap credential: it can only enroll, never reach the broker
device_id_source = "machine-id"   # or "serial", "hostname", "file" (with device_id_file)

[broker]
host = {toml_value(config.broker.host)}
port = {config.broker.port}
keepalive = 30

[tls]
ca = "ca.crt"

[state]
dir = "state"   # the outbox and the enrolled identity; systemd/edge-agent.service points it at /var/lib/edge-agent
"""


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def check_profile(profile: str) -> None:
    try:
        find_profile(profile)
        load_profile(profile)
    except ConfigError as exc:
        raise UsageError(str(exc)) from None


async def create_enrollment(paths: HubPaths, config: HubConfig, store: HubState, out: Path, spec: ImageSpec,
                            by: str) -> EnrollmentRow:
    """Record a new enrollment and write its image folder to `out`: agent.toml, ca.crt,
    policy.pub and enroll.token (0600). The hub's record comes first: a folder on disk always
    holds a credential `enroll revoke` can end."""
    if config.enroll.port == 0:
        raise UsageError(f"{paths.config}: [enroll] port is 0 (enrollment is off): set it (e.g. 8884), restart "
                         "edge-hub run, then create the enrollment")
    check_profile(spec.profile)
    if out.exists() and any(out.iterdir()):
        raise UsageError(f"{out} is not empty: give a new folder for the image files")
    enrollment_id, secret = secrets.token_hex(6), secrets.token_urlsafe(32)
    row = EnrollmentRow(enrollment_id, spec.profile, spec.tags, spec.max_devices, spec.expires_at, spec.approve,
                        time.time(), by, None, 0, 0)

    async def work(db: Tx) -> None:
        await db_enrollments.insert_enrollment(db, row, _digest(secret))
        await store.hub_event(db, config.identity, EventKind.ENROLLMENT_CREATED, {
            "enrollment": enrollment_id, "profile": spec.profile, "tags": spec.tags, "max_devices": spec.max_devices,
            "expires_at": spec.expires_at, "approve": spec.approve, "by": by})

    await store.atomically(work)
    out.mkdir(mode=0o755, parents=True, exist_ok=True)
    write_atomic(out / "enroll.token", f"{TOKEN_PREFIX}.{enrollment_id}.{secret}\n".encode(), 0o600)
    write_atomic(out / "ca.crt", paths.ca_cert.read_bytes(), 0o644)
    write_atomic(out / "policy.pub", paths.policy_pub.read_bytes(), 0o644)
    write_atomic(out / "agent.toml", render_image_toml(spec, config, enrollment_id).encode(), 0o644)
    return row


async def revoke_enrollment(config: HubConfig, store: HubState, enrollment_id: str, by: str) -> str:
    """End new enrollments with this credential; the devices it enrolled stay as they are."""
    now = time.time()

    async def work(db: Tx) -> str:
        found = await db_enrollments.enrollment(db, enrollment_id)
        if found is None:
            raise UsageError(f"no enrollment {enrollment_id!r} (edge-hub enroll list shows them)")
        if not await db_enrollments.revoke_enrollment(db, enrollment_id, now):
            return f"enrollment {enrollment_id} was already revoked"
        await store.hub_event(db, config.identity, EventKind.ENROLLMENT_REVOKED,
                              {"enrollment": enrollment_id, "by": by}, ts=now)
        await db.execute("UPDATE approvals SET state = 'denied', decided_by = ?, decided_at = ?, "
                         "reason = 'the enrollment was revoked' WHERE state = 'pending' AND rule = ?",
                         (by, now, APPROVAL_RULE + enrollment_id))
        return (f"enrollment {enrollment_id} revoked: its credential enrolls no more devices; the "
                f"{found[0].enrolled} it enrolled keep running (edge-hub revoke DEVICE locks one out)")

    return await store.atomically(work)


async def readmit_device(config: HubConfig, store: HubState, device: str, by: str) -> str:
    """Let `device` enroll once more with a new key (a board replaced or re-flashed); its old
    certificates are revoked when it does."""
    now = time.time()

    async def work(db: Tx) -> str:
        if await db.fetch_one("SELECT 1 FROM devices WHERE device = ?", (device,)) is None:
            raise UsageError(f"no device {device!r} is registered with this hub: it can enroll as it is")
        await db_enrollments.readmit(db, device, by, now)
        await store.hub_event(db, config.identity, EventKind.ENROLL_READMITTED, {"device": device, "by": by}, ts=now)
        return (f"{device} may enroll once more with a new key; its current certificates are revoked when it "
                "does")

    return await store.atomically(work)


# --- the device's request ---------------------------------------------------------------------------


class Refused(Exception):
    """A request that is not answered with a certificate: why, in a short name and one sentence."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.detail = reason, detail


@dataclass
class _Decision:
    reply: EnrollReply
    again: bool = False  # the same answer as before (a repeat): nothing new was recorded
    readmitted: bool = False


@dataclass
class EnrollmentDesk:
    """Decides enrollment requests for the running hub. `counts` are flushed to the database by the server."""

    paths: HubPaths
    config: HubConfig
    store: HubState
    counts: Counter[str] = field(default_factory=Counter)
    _ca: Authority | None = field(default=None, init=False)
    _audited: dict[tuple[str, str, str], float] = field(default_factory=dict, init=False)  # -> when audited
    _window: tuple[float, int] = field(default=(0.0, 0), init=False)  # (start, refusals audited in it)

    @property
    def ca(self) -> Authority:
        if self._ca is None:
            self._ca = Authority.load(self.paths.ca_key, self.paths.ca_cert)
        return self._ca

    async def answer(self, token: str, request: EnrollRequest, peer: str) -> EnrollReply:
        """The certificate, a hold, or a refusal; recorded and audited before it is returned."""
        parsed = parse_token(token)
        enrollment_id = parsed[0] if parsed else "?"
        try:
            if parsed is None:
                raise Refused("forged", "the bootstrap credential is not one this hub issues: use the enroll.token "
                                        "of an image folder made by edge-hub enroll create")
            try:
                validate_name(request.device)
            except ProtocolError as exc:
                raise Refused("bad_device_id", exc.detail) from None
            try:
                csr = x509.load_pem_x509_csr(request.csr.encode())
                public_key = check_request(csr, request.device)
            except (ValueError, UnsupportedAlgorithm) as exc:
                raise Refused("bad_request", f"not a usable PEM certificate request: {exc}"[:300]) from None
            except CsrRefused as exc:
                raise Refused(exc.reason, str(exc)) from None
            key = public_key_id(public_key)
            secret = parsed[1]
            decision = await self.store.atomically(
                lambda db: self._decide(db, enrollment_id, secret, request.device, csr, key))
        except Refused as exc:
            await self.refuse(enrollment_id, request.device, exc, peer)
            return EnrollReply(outcome="refused", reason=exc.reason, detail=exc.detail)
        reply = decision.reply
        self.counts[reply.outcome] += 1
        if reply.outcome == "issued" and not decision.again:
            await self._after_issue(request.device, decision.readmitted)
            log.info("%s enrolled with enrollment %s from %s (key %s)", request.device, enrollment_id, peer, key)
        elif reply.outcome == "issued":
            log.info("%s asked again with key %s: answered with the certificate issued for it before", request.device,
                     key)
        elif reply.outcome == "pending" and not decision.again:
            log.info("%s asks to enroll with enrollment %s from %s: held for approval (%s)", request.device,
                     enrollment_id, peer, reply.detail)
        return reply

    async def _decide(self, db: Tx, enrollment_id: str, secret: str, device: str,
                      csr: x509.CertificateSigningRequest, key: str) -> _Decision:
        now = time.time()
        found = await db_enrollments.enrollment(db, enrollment_id)
        if found is None or not hmac.compare_digest(found[1], _digest(secret)):
            raise Refused("forged", "the bootstrap credential is not one this hub issued: use the enroll.token of an "
                                    "image folder made by edge-hub enroll create")
        row = found[0]
        if row.revoked_at is not None:
            raise Refused("revoked", f"enrollment {enrollment_id} was revoked: build the image with a new one")
        if row.expires_at is not None and now >= row.expires_at:
            raise Refused("expired", f"enrollment {enrollment_id} expired: build the image with a new one")
        readmitted = False
        registered = await db.fetch_one("SELECT revoked_at FROM devices WHERE device = ?", (device,))
        if registered is not None:
            repeat = await db.fetch_one(
                "SELECT pem FROM certificates WHERE device = ? AND key_id = ? AND purpose = 'device' "
                "AND revoked_at IS NULL AND not_after > ? AND pem IS NOT NULL ORDER BY not_after DESC LIMIT 1",
                (device, key, now))
            if repeat is not None:  # a reply lost, a device killed before it stored it: the same certificate
                return _Decision(EnrollReply(outcome="issued", cert=repeat[0]), again=True)
            if await db_enrollments.take_readmit(db, device) is None:
                state = "revoked" if registered[0] is not None else "already enrolled"
                raise Refused("already_enrolled", f"{device} is {state} with another key: if this board replaces "
                                                  f"it, run edge-hub enroll readmit {device}")
            readmitted = True
        again_device = await db.fetch_one("SELECT 1 FROM enrolled WHERE device = ? AND enrollment = ?",
                                       (device, enrollment_id))
        if (row.max_devices is not None and again_device is None
                and await db_enrollments.enrolled_count(db, enrollment_id) >= row.max_devices):
            raise Refused("exhausted", f"enrollment {enrollment_id} has enrolled its {row.max_devices} device(s) "
                                       "(--max-devices): make another enrollment for more")
        if row.approve and (held := await self._held(db, enrollment_id, device, key, now)) is not None:
            return held
        cert = self.ca.sign_request(csr, device, self.config.pki.device_cert_lifetime)
        serial = format(cert.serial_number, "x")
        pem = cert_pem(cert).decode()
        await db.execute(
            "INSERT INTO certificates(serial, device, purpose, issued_at, not_after, key_id, pem) "
            "VALUES (?, ?, 'device', ?, ?, ?, ?)",
            (serial, device, now, cert.not_valid_after_utc.timestamp(), key, pem))
        if readmitted:  # the board it replaces is locked out (the CRL is published after the commit)
            await db.execute("UPDATE certificates SET revoked_at = ? WHERE device = ? AND purpose = 'device' "
                             "AND revoked_at IS NULL AND serial != ?", (now, device, serial))
        await register_device(db, device, row.profile, row.tags, readmit=readmitted)
        await db_enrollments.record_enrolled(db, device, enrollment_id, key, serial, now)
        await self.store.hub_event(db, self.config.identity, EventKind.ENROLLED, {
            "device": device, "enrollment": enrollment_id, "serial": serial, "key_id": key,
            "profile": row.profile, "tags": row.tags, "readmitted": readmitted}, ts=now)
        return _Decision(EnrollReply(outcome="issued", cert=pem), readmitted=readmitted)

    async def _held(self, db: Tx, enrollment_id: str, device: str, key: str,
                    now: float) -> _Decision | None:
        """None when an operator approved this request; else the hold (new or repeated) or a refusal."""
        request = f"enroll-{key}"
        state = await db.fetch_one("SELECT id, state, decided_by, reason FROM approvals WHERE device = ? "
                                    "AND request = ?", (device, request))
        retry = self.config.enroll.retry_s
        if state is not None and state[1] == "approved":
            return None
        if state is not None and state[1] == "pending":
            return _Decision(EnrollReply(outcome="pending", reason="approval", retry_after=retry, detail=(
                f"waiting for an operator: edge-hub approvals approve {state[0]}")), again=True)
        if state is not None and state[1] == "denied":
            raise Refused("denied", f"an operator ({state[2]}) denied this device's enrollment"
                                    + (f": {state[3]}" if state[3] else ""))
        pending = await db.fetch_one("SELECT COUNT(*) FROM approvals WHERE state = 'pending' AND rule = ?",
                                  (APPROVAL_RULE + enrollment_id,))
        if pending[0] >= self.config.enroll.max_pending:
            raise Refused("too_many_pending", f"enrollment {enrollment_id} already holds {pending[0]} requests for "
                                              "approval (enroll.max_pending): decide those first")
        if state is not None:  # expired: nobody decided in time; hold it anew
            await db.execute("DELETE FROM approvals WHERE id = ?", (state[0],))
        [approval] = await db.fetch_one(
            "INSERT INTO approvals(device, request, rule, action, args, policy_version, requested_at, expires_at, "
            "state, sent) VALUES (?, ?, ?, 'enroll', ?, NULL, ?, ?, 'pending', 1) RETURNING id",
            (device, request, APPROVAL_RULE + enrollment_id, json.dumps({"enrollment": enrollment_id, "key_id": key}),
             now, now + APPROVAL_WAIT))
        await self.store.hub_event(db, self.config.identity, EventKind.ENROLL_PENDING, {
            "device": device, "enrollment": enrollment_id, "key_id": key, "approval": approval}, ts=now)
        return _Decision(EnrollReply(outcome="pending", reason="approval", retry_after=retry, detail=(
            f"waiting for an operator: edge-hub approvals approve {approval}")))

    async def _after_issue(self, device: str, readmitted: bool) -> None:
        """What provisioning does next too: the policy its peers run; and, for a readmitted id, the CRL."""
        from hub.rollout import rollouts

        for admission in await rollouts.admit(self.store, self.config.region, [device], time.time()):
            if admission.refused:
                log.warning("%s enrolled: %s; it keeps its local policy until a push that fits it", device,
                            admission.refused)
        if readmitted:
            from hub.pki.revocation import publish_crl

            await publish_crl(self.paths, self.config, self.store, self.ca)

    async def refuse(self, enrollment_id: str, device: str, refused: Refused, peer: str) -> None:
        """Count it; audit and log it WARNING the first time in a window, DEBUG after."""
        self.counts[f"refused_{refused.reason}"] += 1
        now = time.monotonic()
        key = (enrollment_id, device[:64], refused.reason)
        start, audited = self._window
        if now - start > REFUSAL_AUDIT_WINDOW:
            self._window = (start, audited) = (now, 0)
        if len(self._audited) > AUDITED_KEYS_KEPT:
            self._audited.clear()
        last = self._audited.get(key)
        if (last is not None and now - last < REFUSAL_AUDIT_WINDOW) or audited >= REFUSAL_EVENTS_PER_WINDOW:
            log.debug("enrollment of %r refused again (%s) from %s", device[:64], refused.reason, peer)
            return
        self._audited[key] = now
        self._window = (start, audited + 1)
        log.warning("enrollment of %r with enrollment %s from %s refused (%s): %s", device[:64], enrollment_id,
                    peer, refused.reason, refused.detail)
        body = {"device": device[:64], "enrollment": enrollment_id, "reason": refused.reason,
                "detail": refused.detail, "peer": peer}

        async def work(db: Tx) -> None:
            await self.store.hub_event(db, self.config.identity, EventKind.ENROLL_REFUSED, body)

        await self.store.atomically(work)

    async def flush_counts(self) -> None:
        """Add the counts since the last flush to the database (the metrics endpoint reads them there)."""
        if not self.counts:
            return
        counts, self.counts = dict(self.counts), Counter()

        async def work(db: Tx) -> None:
            await db_enrollments.add_counts(db, counts)

        await self.store.atomically(work)
