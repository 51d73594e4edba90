"""The hub's enrollment endpoint: `POST /enroll` over HTTPS with the broker's server certificate.

One small endpoint, hand-written on asyncio streams like the metrics endpoint
(edgefleet.runtime.exposition), because the bounds are the point: a connection is accepted,
counted against MAX_CONNECTIONS, and only then waits for one of MAX_HANDSHAKES TLS handshakes;
the request head and body are read with size limits and a deadline; the token buckets (all
credentials, and each credential) are checked before any database or CA work. A request over
a bound is answered 429 or 503 with Retry-After, counted, and logged once per LOG_WINDOW.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Final

import msgspec

from edgefleet.wire.enrollment import ENROLL_PATH, MAX_REQUEST_BYTES, EnrollReply, EnrollRequest, parse_token
from hub.config import HubConfig, HubPaths
from hub.db.interface import HubState
from hub.pki.enroll import EnrollmentDesk, Refused

MAX_CONNECTIONS: Final = 512  # open connections; past this a new one is closed at once (file descriptors)
MAX_HANDSHAKES: Final = 32  # TLS handshakes at once: each costs an ECDSA signature; the hub serves devices meanwhile
HANDSHAKE_TIMEOUT: Final = 10.0  # a Pi Zero on a slow link finishes in a second or two
REQUEST_TIMEOUT: Final = 15.0  # the whole request after the handshake (slow loris)
MAX_HEAD_BYTES: Final = 8 * 1024  # request line and headers
MAX_BUCKETS: Final = 10_000  # per-credential buckets kept; forged ids each get one, so they are bounded too
LOG_WINDOW: Final = 60.0  # rate-limited and busy requests are logged once per minute, with the count
FLUSH_INTERVAL: Final = 5.0  # counts to the database (the metrics endpoint) at most this often
BUSY_RETRY: Final = 5.0  # Retry-After when the hub is over its connection or handshake bound

log = logging.getLogger("hub.enroll")


@dataclass
class TokenBucket:
    """`rate` tokens a second, up to `burst`."""

    rate: float
    burst: int
    at: float = field(default_factory=time.monotonic)
    tokens: float = field(init=False)

    def __post_init__(self) -> None:
        self.tokens = float(self.burst)  # a new bucket is full

    def take(self, now: float) -> float:
        """0 when a token was taken, else the seconds until one is there."""
        self.tokens = min(float(self.burst), self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


@dataclass
class Limits:
    """The global and per-credential buckets, and the once-per-window log of what they turned away."""

    config: HubConfig
    overall: TokenBucket = field(init=False)
    buckets: dict[str, TokenBucket] = field(default_factory=dict)
    turned_away: int = 0
    logged_at: float = -LOG_WINDOW

    def __post_init__(self) -> None:
        self.overall = TokenBucket(self.config.enroll.rate, self.config.enroll.burst)

    def wait(self, credential: str, now: float) -> float:
        wait = self.overall.take(now)
        if wait:
            return wait
        bucket = self.buckets.get(credential)
        if bucket is None:
            if len(self.buckets) >= MAX_BUCKETS:
                self.buckets.clear()
            e = self.config.enroll
            bucket = self.buckets[credential] = TokenBucket(e.credential_rate, e.credential_burst)
        return bucket.take(now)

    def note(self, what: str, now: float) -> None:
        self.turned_away += 1
        if now - self.logged_at >= LOG_WINDOW:
            log.warning("enrollment: %d request(s) turned away in the last %.0f s (latest: %s); devices retry later",
                        self.turned_away, min(now - self.logged_at, LOG_WINDOW), what)
            self.logged_at, self.turned_away = now, 0


class EnrollmentServer:
    """`async with EnrollmentServer.serving(...)`; the bound port is `port`."""

    def __init__(self, paths: HubPaths, config: HubConfig, store: HubState) -> None:
        self.desk = EnrollmentDesk(paths, config, store)
        self.limits = Limits(config)
        self._paths, self._config = paths, config
        self._connections = 0
        self._handshakes = asyncio.Semaphore(MAX_HANDSHAKES)
        self.port = 0

    def _tls(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        # Read for each new context: the hub renews the server certificate in place.
        context.load_cert_chain(self._paths.server_cert, self._paths.server_key)
        return context

    @classmethod
    @contextlib.asynccontextmanager
    async def serving(cls, paths: HubPaths, config: HubConfig, store: HubState) -> AsyncIterator[EnrollmentServer]:
        self = cls(paths, config, store)
        host = config.enroll.bind or config.broker.bind
        server = await asyncio.start_server(self._connection, host, config.enroll.port, limit=MAX_HEAD_BYTES,
                                            backlog=MAX_CONNECTIONS)
        self.port = int(server.sockets[0].getsockname()[1])
        log.info("enrollment at https://%s:%d%s", host, self.port, ENROLL_PATH)
        flusher = asyncio.create_task(self._flush(), name="enroll-counts")
        try:
            yield self
        finally:
            flusher.cancel()
            server.close()
            await asyncio.gather(flusher, return_exceptions=True)
            with contextlib.suppress(sqlite3.Error, ValueError):  # the last counts; the store may be closing
                await self.desk.flush_counts()

    async def _flush(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_INTERVAL)
            try:
                await self.desk.flush_counts()
            except sqlite3.OperationalError as exc:  # a locked database: the counts wait for the next flush
                log.debug("enrollment counts not flushed yet: %s", exc)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = _peer(writer)
        self._connections += 1
        try:
            if self._connections > MAX_CONNECTIONS:
                self._count("busy", peer)
                return
            try:
                async with asyncio.timeout(HANDSHAKE_TIMEOUT):
                    async with self._handshakes:
                        await writer.start_tls(self._tls())
            except (TimeoutError, ssl.SSLError, ConnectionError, OSError) as exc:
                self.desk.counts["tls_failed"] += 1
                log.debug("enrollment: TLS with %s failed: %r", peer, exc)
                return
            await self._request(reader, writer, peer)
        finally:
            self._connections -= 1
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    def _count(self, what: str, peer: str) -> None:
        self.desk.counts[what] += 1
        self.limits.note(f"{what} from {peer}", time.monotonic())

    async def _request(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str) -> None:
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
                method, path, headers = _parse_head(head)
                length = int(headers.get("content-length", "-1"))
                if method != "POST" or path != ENROLL_PATH:
                    await _send(writer, 404, _refusal("not_found", f"POST {ENROLL_PATH} is the only request here"))
                    return
                if not 0 <= length <= MAX_REQUEST_BYTES:
                    await self._refuse_early(writer, 413, peer, "oversized",
                                             f"the request must have a Content-Length of at most {MAX_REQUEST_BYTES}")
                    return
                body = await reader.readexactly(length)
        except (asyncio.LimitOverrunError, ValueError):
            await self._refuse_early(writer, 400, peer, "bad_request", "the request head is malformed or too long")
            return
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError) as exc:
            self.desk.counts["incomplete"] += 1
            log.debug("enrollment: %s sent no complete request: %r", peer, exc)
            return
        token = headers.get("authorization", "").removeprefix("Bearer ").strip()
        parsed = parse_token(token)
        wait = self.limits.wait(parsed[0] if parsed else "?", time.monotonic())
        if wait:
            self._count("rate_limited", peer)
            await _send(writer, 429, EnrollReply(outcome="refused", reason="rate_limited", retry_after=round(wait, 1),
                                                 detail="too many enrollment requests: ask again later"))
            return
        try:
            request = msgspec.json.decode(body, type=EnrollRequest)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            await self._refuse_early(writer, 400, peer, "bad_request", f"the request body is not an enrollment "
                                     f"request ({exc})"[:300])
            return
        try:
            reply = await self.desk.answer(token, request, peer)
        except sqlite3.OperationalError as exc:  # the database held past its busy timeout: ask again
            self._count("busy", f"{peer} (hub database: {exc})")
            await _send(writer, 503, EnrollReply(outcome="refused", reason="busy", retry_after=BUSY_RETRY,
                                                 detail="the hub is busy: ask again later"))
            return
        except Exception:  # a bug must neither stop the endpoint nor leave the device without an answer
            log.exception("enrollment: the request of %r from %s failed", request.device[:64], peer)
            self.desk.counts["failed"] += 1
            await _send(writer, 500, _refusal("internal_error", "the hub failed on this request: see its log"))
            return
        status = {"issued": 200, "pending": 202}.get(reply.outcome, 403)
        await _send(writer, status, reply)

    async def _refuse_early(self, writer: asyncio.StreamWriter, status: int, peer: str, reason: str,
                            detail: str) -> None:
        """A request refused before it names a device: counted and audited like the others."""
        await self.desk.refuse("?", "", Refused(reason, detail), peer)
        await _send(writer, status, _refusal(reason, detail))


def _refusal(reason: str, detail: str) -> EnrollReply:
    return EnrollReply(outcome="refused", reason=reason, detail=detail)


def _peer(writer: asyncio.StreamWriter) -> str:
    name = writer.get_extra_info("peername")
    return f"{name[0]}:{name[1]}" if isinstance(name, tuple) and len(name) >= 2 else "?"


def _parse_head(head: bytes) -> tuple[str, str, dict[str, str]]:
    """Method, path and headers (lower-case names) of an HTTP/1.1 request head; ValueError if malformed."""
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise ValueError("not an HTTP/1.1 request line")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep:
            raise ValueError(f"not a header: {line[:40]!r}")
        headers[name.strip().lower()] = value.strip()
    return parts[0], parts[1].partition("?")[0], headers


_REASONS: Final = {200: "OK", 202: "Accepted", 400: "Bad Request", 403: "Forbidden", 404: "Not Found",
                   413: "Content Too Large", 429: "Too Many Requests", 500: "Internal Server Error",
                   503: "Service Unavailable"}


async def _send(writer: asyncio.StreamWriter, status: int, reply: EnrollReply) -> None:
    body = msgspec.json.encode(reply)
    retry = f"Retry-After: {max(1, round(reply.retry_after))}\r\n" if reply.retry_after else ""
    writer.write((f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {len(body)}\r\n{retry}Connection: close\r\n\r\n").encode() + body)
    with contextlib.suppress(ConnectionError):
        await writer.drain()
