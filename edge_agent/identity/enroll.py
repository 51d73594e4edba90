"""First-boot enrollment: a device started from an image folder (no certificate of its own)
makes its key, asks the hub for its certificate over HTTPS with the bootstrap credential, and
keeps it as its identity (STATE/identity.pem, as a renewal would). docs/enrollment.md.

The key is made by the keygen helper renewal uses (`cryptography` stays out of the daemon) at
STATE/enroll.key, kept until the certificate is stored: a device killed in the middle asks
again with the same key, and the hub answers a repeated request with the certificate it
already issued for it, so a device is enrolled once. The request runs in a thread with the
standard library's http.client and ssl (nothing more in the agent's memory). Until enrolled,
the agent samples into its outbox; what the latest attempt came to is in STATE/enroll.json for
`edge-agent status` and `check`.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Final, Literal

import msgspec

from edge_agent.identity.keygen import KeyRequest, make_request, request_for
from edge_agent.identity.tls import IdentityFiles
from edgefleet.errors import ConfigError, IdentityError, KeyGenerationFailed
from edgefleet.mqtt.reconnect import Backoff
from edgefleet.runtime.files import write_atomic
from edgefleet.wire.enrollment import EnrollReply, EnrollRequest

ENROLL_KEY: Final = "enroll.key"  # in the state folder, until the certificate for it is stored
ENROLL_STATE: Final = "enroll.json"
REQUEST_TIMEOUT: Final = 30.0  # connect, TLS and the hub's answer (it signs in milliseconds; a Pi Zero is slow)
MAX_REPLY_BYTES: Final = 64 * 1024  # a certificate in PEM is under 2 KB
FIRST_RETRY: Final = 2.0  # an unreachable hub: the first retry comes soon (the hub may be starting)
MAX_RETRY: Final = 300.0  # ... and the longest: thousands of boards must not hammer a hub that is down
REFUSED_RETRY: Final = 300.0  # a refusal is only lifted by an operator: ask rarely
MIN_RETRY: Final = 1.0  # whatever the hub says
MACHINE_ID: Final = Path("/etc/machine-id")
DT_SERIAL: Final = Path("/proc/device-tree/serial-number")
CPUINFO: Final = Path("/proc/cpuinfo")

Source = Literal["machine-id", "serial", "hostname", "file"]
State = Literal["enrolling", "pending", "refused", "unreachable", "enrolled"]

log = logging.getLogger("edge_agent.enroll")


class EnrollStatus(msgspec.Struct, frozen=True):
    """The latest attempt, as STATE/enroll.json keeps it."""

    state: State
    device: str
    detail: str  # one sentence
    reason: str = ""
    ts: float = 0.0


def read_device_id(source: Source, file: Path | None, prefix: str = "") -> str:
    """This board's id from `source`; ConfigError naming what could not be read."""
    try:
        if source == "machine-id":
            value = MACHINE_ID.read_text().strip()
        elif source == "hostname":
            value = socket.gethostname().strip()
        elif source == "file":
            if file is None:
                raise ConfigError("enroll.device_id_source = \"file\" needs enroll.device_id_file")
            value = file.read_text().strip()
        else:
            value = _board_serial()
    except OSError as exc:
        raise ConfigError(f"cannot read the device id ({source}): {exc}; set enroll.device_id_source, or "
                          "device_id") from None
    if not value:
        raise ConfigError(f"the device id from {source} is empty: set enroll.device_id_source, or device_id")
    return prefix + value


def _board_serial() -> str:
    if DT_SERIAL.exists():
        return DT_SERIAL.read_bytes().rstrip(b"\0").decode(errors="replace").strip()
    for line in CPUINFO.read_text().splitlines():
        name, _, value = line.partition(":")
        if name.strip() == "Serial":
            return value.strip()
    raise OSError(f"neither {DT_SERIAL} nor a Serial line in {CPUINFO}")


def read_status(state_dir: Path) -> EnrollStatus | None:
    try:
        return msgspec.json.decode((state_dir / ENROLL_STATE).read_bytes(), type=EnrollStatus)
    except (OSError, msgspec.DecodeError, msgspec.ValidationError):
        return None


class Enrollment:
    """`needed()`, then `await run()`: returns once the device has its own identity."""

    def __init__(self, device: str, url: str, token: Path, files: IdentityFiles, state_dir: Path) -> None:
        self.device, self.url, self.token_path, self.files = device, url, token, files
        self.state_dir = state_dir
        self.key = state_dir / ENROLL_KEY
        self.backoff = Backoff(initial=FIRST_RETRY, maximum=MAX_RETRY)
        # The key helper process; `edge-agent simulate` (thousands of agents, one process whose memory
        # is no device's) makes keys in a thread instead: make_request_in_process.
        self.make_request: Callable[[Path, str], Awaitable[KeyRequest]] = make_request
        self.status: EnrollStatus | None = None
        self._said: tuple[str, str] | None = None  # (state, reason) last logged at WARNING

    def needed(self) -> bool:
        """No usable identity of its own yet (a renewal in progress is one too)."""
        return self.files.current() is None and self.files.pending() is None

    async def run(self) -> None:
        while True:
            wait = await self.attempt()
            if wait is None:
                return
            await asyncio.sleep(wait)

    async def attempt(self) -> float | None:
        """One request; None once enrolled, else the seconds to wait before the next."""
        try:
            token = self.token_path.read_text().strip()
        except OSError as exc:
            return self._note("refused", "no_credential", f"cannot read the bootstrap credential {self.token_path} "
                                                          f"({exc.strerror}): put the image's enroll.token there",
                              REFUSED_RETRY)
        try:
            request = await self.make_request(self.key, self.device)
        except KeyGenerationFailed as exc:
            return self._note("refused", "keygen", f"cannot make this device's key: {exc}", REFUSED_RETRY)
        body = msgspec.json.encode(EnrollRequest(device=self.device, csr=request.csr))
        self._set(EnrollStatus("enrolling", self.device, f"asking {self.url}", ts=time.time()))
        try:
            status, raw = await asyncio.to_thread(_post, self.url, token, body, self.files.bundle.ca)
            reply = msgspec.json.decode(raw, type=EnrollReply)
        except (OSError, ssl.SSLError, msgspec.DecodeError, msgspec.ValidationError, ValueError) as exc:
            wait = self.backoff.lost(time.monotonic())
            return self._note("unreachable", "unreachable", f"cannot enroll at {self.url} ({exc})", wait)
        if reply.outcome == "issued":
            return self._store(reply.cert)
        if reply.outcome == "pending":
            return self._note("pending", reply.reason, f"enrollment held by the hub: {reply.detail}",
                              max(MIN_RETRY, reply.retry_after))
        if reply.reason == "rate_limited" or status >= 500:  # the hub's trouble, not a refusal: back off
            wait = max(MIN_RETRY, reply.retry_after) + self.backoff.lost(time.monotonic())
            return self._note("unreachable", reply.reason, f"the hub is busy ({reply.detail})", wait)
        return self._note("refused", reply.reason, f"enrollment refused by the hub ({reply.reason}): {reply.detail}",
                          self.backoff.rng.uniform(REFUSED_RETRY / 2, REFUSED_RETRY))

    def _store(self, cert: str) -> float | None:
        try:
            credential = self.files.store_enrolled(cert.encode(), self.key)
        except IdentityError as exc:
            self.key.unlink(missing_ok=True)  # the next attempt starts from a new key
            return self._note("refused", "bad_certificate", f"the hub's certificate is not usable: {exc}",
                              self.backoff.lost(time.monotonic()))
        self.key.unlink(missing_ok=True)
        self._set(EnrollStatus("enrolled", self.device, f"enrolled: {credential.describe()}", ts=time.time()))
        log.info("%s enrolled: %s; the bootstrap credential is not used again", self.device, credential.describe())
        return None

    def _note(self, state: State, reason: str, detail: str, wait: float) -> float:
        sentence = f"{detail}; samples stay in the outbox; asking again in {wait:.0f} s"
        self._set(EnrollStatus(state, self.device, sentence, reason, time.time()))
        level = logging.DEBUG if self._said == (state, reason) else logging.WARNING
        self._said = (state, reason)
        log.log(level, "not enrolled yet: %s", sentence)
        return wait

    def _set(self, status: EnrollStatus) -> None:
        self.status = status
        try:
            write_atomic(self.state_dir / ENROLL_STATE, msgspec.json.encode(status), 0o644)
        except OSError as exc:  # status is for people; enrollment goes on without it
            log.debug("cannot write %s: %s", ENROLL_STATE, exc)


async def make_request_in_process(key: Path, cn: str) -> KeyRequest:
    """What the key helper does, in a thread of this process (it imports `cryptography`)."""
    try:
        return await asyncio.to_thread(request_for, key, cn)
    except (OSError, ValueError) as exc:
        raise KeyGenerationFailed(str(exc)) from None


def _post(url: str, token: str, body: bytes, ca: Path) -> tuple[int, bytes]:
    """POST `body` to `url` over TLS verified against the fleet CA; (status, body). Blocking: in a thread."""
    import http.client
    import urllib.parse

    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "https" or not parts.hostname:
        raise ValueError(f"{url} is not an https:// URL")
    context = ssl.create_default_context(cafile=str(ca))
    connection = http.client.HTTPSConnection(parts.hostname, parts.port or 443, context=context,
                                             timeout=REQUEST_TIMEOUT)
    try:
        connection.request("POST", parts.path or "/", body, {
            "Authorization": f"Bearer {token}", "Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, response.read(MAX_REPLY_BYTES)
    except http.client.HTTPException as exc:  # not an HTTP answer (a wrong port, a proxy): as unreachable
        raise OSError(f"no HTTP answer from {parts.hostname}:{parts.port or 443} ({exc!r})") from None
    finally:
        connection.close()
