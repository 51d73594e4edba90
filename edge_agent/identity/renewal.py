"""In-band certificate renewal: a key made on the device, a request on up/cert, the hub's
certificate on down/cert, and the switch to it without losing a reading.

Steps, each one durable before the next (edge_agent/identity/tls.py keeps the files):

1. two thirds into the certificate's life, a helper process makes a new key (identity.next.pem)
   and a certificate request; the daemon itself never loads `cryptography`;
2. the request goes to the hub on up/cert while connected, again after REPLY_TIMEOUT;
3. the hub's certificate is stored beside the key ("pending"), the current pair untouched;
4. the link reconnects at once with the pending pair (`Link.restart`: a clean disconnect,
   then the outbox resends from the hub's last acknowledgment, so nothing is lost or doubled);
5. once that connection works, the pending pair is promoted to identity.pem.

If the broker refuses the pending pair, the previous one is used again while it is valid and
the renewal starts over later with a new key; the log says so. A kill -9 between any two
steps leaves a working pair: the current one, or the new one already promoted.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections.abc import Callable
from typing import Any, Final

from edge_agent.identity.certinfo import CertificateInfo
from edge_agent.identity.keygen import KeyRequest, make_request
from edge_agent.identity.tls import Credential, IdentityFiles
from edgefleet.errors import ConnectRefused, IdentityError, KeyGenerationFailed
from edgefleet.mqtt.link import SESSION_ENDED, Link
from edgefleet.wire.events import EventKind
from edgefleet.wire.protocol import CERT, CertIssued, CertRefused, CertReply, CertRequest, pack, up_topic

RENEW_AT: Final = 2 / 3  # share of its life after which a certificate is renewed: a third is left to retry
RECHECK_INTERVAL: Final = 3600.0  # the files and the clock are looked at again at least hourly (NTP steps)
MIN_WAIT: Final = 1.0  # the shortest pause between attempts, however short the certificate's life
# Never wait longer than this share of the time the current certificate has left, so a
# certificate of minutes (tests, drills) renews as surely as one of months.
SHARE_OF_REMAINING: Final = 0.1
REPLY_TIMEOUT: Final = 30.0  # the longest wait for the hub's answer before asking again (the same key)
REFUSED_RETRY: Final = 3600.0  # the longest wait after a refusal before asking again
TRIAL_FAILURES: Final = 3  # failed connections with a renewed pair before the previous one is tried instead

# A certificate the hub has just issued starts at most this long before the agent stores it (the
# hub backdates by 5 minutes; the rest is transit and a loaded hub). Older by the agent's clock
# means that clock runs ahead of the hub's.
FRESH_SLACK: Final = dt.timedelta(minutes=15)

log = logging.getLogger("edge_agent.renewal")

Clock = Callable[[], float]
Audit = Callable[[EventKind, dict[str, Any]], None]  # an event for the outbox, written apart from the caller


class CertificateAge:
    """How far into its life a certificate is, judged from what the agent can trust.

    The wall clock is read once per certificate, when the agent first sees it; from then on
    the certificate ages with the monotonic clock, which no clock step moves. A certificate
    the hub has just issued is young whatever the wall clock says (at most FRESH_SLACK), and
    a wall clock before a certificate's own start proves that clock wrong, not the
    certificate new: both are warned about and audited (`cert_clock_skew`), once per
    certificate. So a device whose clock runs weeks ahead renews once, not in a loop.
    """

    def __init__(self, clock: Clock, audit: Audit, monotonic: Clock = time.monotonic) -> None:
        self._clock, self._audit, self._monotonic = clock, audit, monotonic
        self._seen: dict[int, tuple[float, dt.timedelta]] = {}  # serial -> (monotonic then, age then)

    def issued_now(self, cert: CertificateInfo) -> None:
        """`cert` has just come from the hub: it is as old as its backdating, no older."""
        age = self._wall_age(cert)
        if age > FRESH_SLACK:
            self._skewed(cert, age, "ahead of the hub's: the certificate it has just issued starts")
        self._seen[cert.serial] = (self._monotonic(), max(dt.timedelta(0), min(age, FRESH_SLACK)))

    def age(self, cert: CertificateInfo) -> dt.timedelta:
        if cert.serial not in self._seen:
            age = self._wall_age(cert)
            if age < dt.timedelta(0):
                self._skewed(cert, age, "behind: the certificate in use starts")
            self._seen[cert.serial] = (self._monotonic(), max(dt.timedelta(0), age))
        then, age_then = self._seen[cert.serial]
        return age_then + dt.timedelta(seconds=self._monotonic() - then)

    def left(self, cert: CertificateInfo) -> dt.timedelta:
        return cert.lifetime - self.age(cert)

    def _wall_age(self, cert: CertificateInfo) -> dt.timedelta:
        return dt.datetime.fromtimestamp(self._clock(), dt.UTC) - cert.not_before

    def _skewed(self, cert: CertificateInfo, age: dt.timedelta, how: str) -> None:
        when = f"{_span(age)} ago" if age > dt.timedelta(0) else f"{_span(-age)} from now"
        log.warning("renewal: the system clock runs %s %s by that clock (certificate serial %x); its age is judged "
                    "from its own start and the time since: set the clock (NTP)", how, when, cert.serial)
        self._audit(EventKind.CERT_CLOCK_SKEW,
                    {"serial": f"{cert.serial:x}", "clock_minus_start_s": age.total_seconds()})


def _span(delta: dt.timedelta) -> str:
    seconds = delta.total_seconds()
    return f"{seconds / 86400:.1f} days" if seconds >= 86400 else f"{seconds:.0f} s"


class Renewal:
    """Chooses the identity of each connection and renews it. `run()` is the agent's task."""

    def __init__(self, device: str, files: IdentityFiles, link: Link, audit: Audit,
                 clock: Clock = time.time) -> None:
        self.device, self.files, self.link = device, files, link
        self._audit, self._clock = audit, clock
        self.age = CertificateAge(clock, audit)
        self._attempt: Credential | None = None  # the identity of the link's latest attempt
        self._failures = 0  # failed attempts with the pending pair in a row
        self._fallback = False  # the next attempt uses the current pair although one is pending
        self._asked: tuple[str, asyncio.Future[CertReply]] | None = None  # (key_id, answer)
        self._settled = asyncio.Event()  # the pending pair was promoted or dropped
        self._warned_expired = False
        self._started: float | None = None  # when the renewal in progress began (monotonic)
        self.renewed = 0  # certificates taken into use since start

    def _now(self) -> dt.datetime:
        return dt.datetime.fromtimestamp(self._clock(), dt.UTC)

    # --- the link's side ----------------------------------------------------------------

    def credential(self) -> Credential:
        """The identity for the next connection attempt; ConnectRefused when there is none."""
        self._attempt = None
        pending, current = self.files.pending(), self.files.current()
        usable_current = current is not None and not current.cert.expired(self._now())
        if pending is not None and not (self._fallback and usable_current):
            self._attempt = pending
        elif current is not None:
            self._attempt = current
        else:
            problem = self._bundle_problem()
            raise ConnectRefused(f"no usable certificate and key: {problem}; run `edge-agent check`", auth=True)
        return self._attempt

    def _bundle_problem(self) -> str:
        try:
            self.files.load("bundle")
        except IdentityError as exc:
            return str(exc)
        return "unknown"

    def on_connected(self) -> None:
        """The broker accepted the identity `credential()` gave; promote it if it was pending."""
        used = self._attempt
        if used is None:
            return
        if used.source == "pending":
            log.info("renewal: connected with the renewed certificate (%s)", used.describe())
            try:
                promoted = self.files.promote()
            except (OSError, IdentityError) as exc:  # it is still pending: tried again next time
                log.error("renewal: cannot take the renewed certificate into use: %s", exc)
                return
            self._attempt = promoted
            self.renewed += 1
            took = f" {time.monotonic() - self._started:.2f} s after the renewal began" if self._started else ""
            self._reset()
            log.info("renewal: certificate %s is in use%s; the previous one is retired", promoted.describe(), took)
            self._audit(EventKind.CERT_RENEWED, {"serial": f"{promoted.cert.serial:x}",
                                          "not_after": promoted.cert.not_after.timestamp()})
        elif self._fallback and (pending := self.files.pending()) is not None:
            log.warning("renewal: the renewed certificate (%s) failed %d times while the previous one (%s) "
                        "connects: it is dropped, and a new one will be requested", pending.describe(),
                        self._failures, used.describe())
            self._drop("did not connect", pending)

    def on_refused(self, exc: ConnectRefused) -> bool:
        """A connection attempt failed: if it used the pending pair, maybe fall back. True when the
        broker refused the pending pair, which is dropped: the previous one is to be tried at once."""
        used = self._attempt
        if used is None or used.source != "pending":
            self._fallback = False  # the previous pair failed too: the network, not the certificate
            return False
        current = self.files.current()
        valid = current is not None and not current.cert.expired(self._now())
        if exc.auth:
            if current is None:
                previous = "there is no previous one to fall back to"
            else:
                previous = (f"falling back to the previous certificate ({current.describe()})" if valid else
                            f"the previous certificate ({current.describe()}) has expired: re-provision the device")
            log.warning("renewal: the broker refused the renewed certificate (%s): %s; %s", used.describe(), exc,
                        previous)
            self._drop("refused by the broker", used)
            return valid
        self._failures += 1
        if self._failures >= TRIAL_FAILURES and valid and current is not None and not self._fallback:
            self._fallback = True
            log.warning("renewal: %d attempts with the renewed certificate failed (%s); trying the previous one "
                        "(%s)", self._failures, exc, current.describe())
        return False

    def on_reply(self, reply: CertReply) -> None:
        """The hub's answer on down/cert."""
        asked = self._asked
        matches = asked is not None and (reply.key_id == asked[0] or (isinstance(reply, CertRefused)
                                                                      and not reply.key_id))
        if asked is None or not matches:
            log.debug("renewal: ignored an answer for key %r: not the request waiting", reply.key_id)
            return
        if not asked[1].done():
            asked[1].set_result(reply)

    def _drop(self, why: str, pending: Credential) -> None:
        self.files.discard_next()
        self._reset()
        self._audit(EventKind.CERT_FALLBACK, {"serial": f"{pending.cert.serial:x}", "reason": why})

    def _reset(self) -> None:
        self._failures, self._fallback, self._started = 0, False, None
        self._settled.set()

    # --- the task -----------------------------------------------------------------------

    async def run(self) -> None:
        while True:
            if self.files.pending() is not None:
                await self._switch()
                continue
            current = self.files.current()
            if current is None:  # the link says why it cannot connect; a fixed bundle is seen here
                await asyncio.sleep(RECHECK_INTERVAL)
                continue
            due = current.cert.lifetime * RENEW_AT - self.age.age(current.cert)
            if due > dt.timedelta(0):
                await asyncio.sleep(min(due.total_seconds(), RECHECK_INTERVAL))
                continue
            if self.age.left(current.cert) <= dt.timedelta(0):
                if not self._warned_expired:
                    log.error("renewal: the certificate (%s) has expired, so it cannot be renewed in band: "
                              "re-provision the device from a request made on it (`edge-hub provision --csr`, "
                              "see `edge-agent check`)", current.describe())
                    self._warned_expired = True
                await asyncio.sleep(RECHECK_INTERVAL)
                continue
            self._warned_expired = False
            await self._renew(current)

    def _patience(self, current: Credential, longest: float) -> float:
        left = self.age.left(current.cert).total_seconds()
        return min(longest, max(MIN_WAIT, left * SHARE_OF_REMAINING))

    async def _renew(self, current: Credential) -> None:
        self._started = self._started or time.monotonic()
        try:
            request = await make_request(self.files.next_path, self.device)
        except KeyGenerationFailed as exc:
            log.warning("renewal: %s", exc)
            await asyncio.sleep(self._patience(current, REFUSED_RETRY))
            return
        log.info("renewal: %s key %s made on the device for certificate %s",
                 "reusing the" if request.reused else "a new", request.key_id, current.describe())
        reply = await self._ask(request, current)
        if reply is None:
            return  # no connection before the certificate expired: the loop says what now
        if isinstance(reply, CertRefused):
            wait = self._patience(current, REFUSED_RETRY)
            log.warning("renewal: the hub refused the certificate request (%s): %s; asking again in %.0f s",
                        reply.reason, reply.detail, wait)
            await asyncio.sleep(wait)
            return
        try:
            pending = self.files.store_pending(reply.cert.encode())
        except IdentityError as exc:
            log.warning("renewal: %s; starting over with a new key", exc)
            self.files.discard_next()
            return
        if pending.cert.common_name != self.device or pending.cert.expired(self._now()):
            log.warning("renewal: the hub's certificate (%s, for %r) is not a valid one for this device; starting "
                        "over with a new key", pending.describe(), pending.cert.common_name)
            self.files.discard_next()
            return
        self.age.issued_now(pending.cert)
        log.info("renewal: certificate %s stored as pending; the current one (%s) stays in use until the new one "
                 "has connected", pending.describe(), current.describe())
        await self._switch()

    async def _ask(self, request: KeyRequest, current: Credential) -> CertIssued | CertRefused | None:
        """Send the request while connected, again after each timeout, until the hub answers;
        None if no connection comes before the certificate expires."""
        payload = pack(CertRequest(csr=request.csr))
        warned = False  # the first silence is a WARNING, repeats DEBUG (an older hub may never answer)
        while True:
            left = self.age.left(current.cert).total_seconds()
            try:
                async with asyncio.timeout(max(MIN_WAIT, left)):
                    await self.link.connected.wait()
            except TimeoutError:
                return None
            session = self.link.session
            if session is None:
                await asyncio.sleep(MIN_WAIT)
                continue
            answer: asyncio.Future[CertReply] = asyncio.get_running_loop().create_future()
            self._asked = (request.key_id, answer)
            timeout = self._patience(current, REPLY_TIMEOUT)
            try:
                await session.publish(up_topic(self.device, CERT), payload, qos=1)
                log.info("renewal: certificate request sent (key %s)", request.key_id)
                async with asyncio.timeout(timeout):
                    return await answer
            except TimeoutError:
                log.log(logging.DEBUG if warned else logging.WARNING,
                        "renewal: no answer from the hub within %.0f s; asking again", timeout)
                warned = True
            except SESSION_ENDED as exc:
                log.debug("renewal: the request did not get through (%s); asking again once connected", exc)
                await asyncio.sleep(MIN_WAIT)
            finally:
                self._asked = None

    async def _switch(self) -> None:
        """Have the link try the pending pair, and wait until it is promoted or dropped."""
        self._settled.clear()
        if self.files.pending() is None:  # promoted (or dropped) already, by the link's first attempt
            return
        attempt = self._attempt
        if self.link.connected.is_set() and not self._fallback and (attempt is None or attempt.source != "pending"):
            self.link.restart("switching to the renewed certificate")
        current = self.files.current()
        wait = RECHECK_INTERVAL if current is None else self._patience(current, RECHECK_INTERVAL)
        try:
            async with asyncio.timeout(wait):
                await self._settled.wait()
        except TimeoutError:
            pass  # looked at again: still pending (no connection yet), the link keeps trying it
