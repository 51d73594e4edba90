"""Prometheus text exposition: the small HTTP server both sides use, a latency histogram and
the text rendering; the agent's figures are in edge_agent.metrics, the hub's in hub.metrics."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ipaddress
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, TypeVar

from edgefleet.errors import ConfigError, EdgefleetError

if TYPE_CHECKING:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
    from prometheus_client.metrics_core import Metric


# The text format generate_latest() writes (not OpenMetrics); Prometheus asks for it by default.
CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"
METRICS_PATH: Final = "/metrics"
REQUEST_TIMEOUT_S: Final = 10.0  # a client that has not sent its request by then is dropped (slow loris)
MAX_REQUEST_BYTES: Final = 16 * 1024  # request line and headers; a scrape sends a few hundred bytes
# Decision latency buckets, in seconds: P4 measures single milliseconds on a Pi 4, and an action
# waiting on a slow disk's audit commit takes hundreds.
LATENCY_BUCKETS_S: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

log = logging.getLogger(__name__)

Render = Callable[[], Awaitable[bytes]]
Family = TypeVar("Family", "CounterMetricFamily", "GaugeMetricFamily")


class MetricsUnavailable(EdgefleetError):
    """The figures cannot be read now (the database is busy or gone); the scrape gets a 503."""


# --- the HTTP side ---------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def exposition_server(host: str, port: int, render: Render) -> AsyncIterator[int]:
    """Serve `render()` at GET /metrics on host:port while inside; yields the bound port (port 0: any free).

    Runs on the caller's event loop; `render` must not block it (the hub reads its database in a
    worker thread). Raises OSError when it cannot listen.
    """
    failing = Failing()
    server = await asyncio.start_server(lambda r, w: _answer(r, w, render, failing), host, port,
                                        limit=MAX_REQUEST_BYTES)
    try:
        bound = int(server.sockets[0].getsockname()[1])
        log.info("metrics at http://%s:%d%s", _url_host(host), bound, METRICS_PATH)
        yield bound
    finally:
        server.close()
        await server.wait_closed()


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


@dataclass
class Failing:
    """Logging policy for scrapes that fail: the first WARNING, repeats DEBUG until one succeeds."""

    since: float | None = None

    def failed(self, detail: str) -> None:
        if self.since is None:
            self.since = time.monotonic()
            log.warning("metrics: cannot answer a scrape: %s", detail)
        else:
            log.debug("metrics: still cannot answer (%.0f s): %s", time.monotonic() - self.since, detail)

    def succeeded(self) -> None:
        if self.since is not None:
            log.info("metrics: scrapes answered again")
            self.since = None


async def _answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, render: Render,
                  failing: Failing) -> None:
    try:
        async with asyncio.timeout(REQUEST_TIMEOUT_S):
            head = await reader.readuntil(b"\r\n\r\n")
        method, _, rest = head.split(b"\r\n", 1)[0].decode("latin-1").partition(" ")
        path = rest.partition(" ")[0].partition("?")[0]
        if path != METRICS_PATH:
            status, body, kind = "404 Not Found", f"not here: try {METRICS_PATH}\n".encode(), "text/plain"
        elif method not in ("GET", "HEAD"):
            status, body, kind = "405 Method Not Allowed", b"GET only\n", "text/plain"
        else:
            status, body, kind = await _scrape(render, failing)
        header = (f"HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {len(body)}\r\n"
                  "Connection: close\r\n\r\n").encode()
        writer.write(header if method == "HEAD" else header + body)
        await writer.drain()
    except (TimeoutError, ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
        log.debug("metrics: a client went away or sent no request: %r", exc)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def _scrape(render: Render, failing: Failing) -> tuple[str, bytes, str]:
    try:
        body = await render()
    except MetricsUnavailable as exc:
        failing.failed(str(exc))
        return "503 Service Unavailable", f"{exc}\n".encode(), "text/plain"
    except Exception:  # one broken scrape must not take the daemon down; ERROR + traceback
        log.exception("metrics: a scrape failed")
        return "500 Internal Server Error", b"the figures could not be rendered: see the log\n", "text/plain"
    failing.succeeded()
    return "200 OK", body, CONTENT_TYPE


def loopback(host: str) -> str:
    """`host` when it is a loopback IP address; ConfigError otherwise (the agent's endpoint is local only)."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(f"metrics.listen = {host!r} is not an IP address: use 127.0.0.1 or ::1") from None
    if not address.is_loopback:
        raise ConfigError(f"metrics.listen = {host!r} is not a loopback address: the agent's metrics are "
                          "for the device itself; use 127.0.0.1 or ::1 (or metrics.port = 0 to turn them off)")
    return host


def render_text(families: Iterable[Metric]) -> bytes:
    """Metric families in the text format (imports prometheus_client on first use)."""
    from prometheus_client.exposition import generate_latest
    from prometheus_client.registry import Collector

    class Once(Collector):
        def __init__(self, families: Iterable[Metric]) -> None:
            self._families = list(families)

        def collect(self) -> Iterable[Metric]:
            return self._families

    return generate_latest(Once(families))


# --- the agent's figures ---------------------------------------------------------------------


@dataclass
class LatencyTally:
    """A cumulative histogram fed from the rule engine's `latencies_ms` deque.

    The deque keeps the latest LATENCY_SAMPLES decisions and drops the oldest, so its length
    says nothing once it is full. Each scrape counts what was appended since the previous one:
    the samples after the last one it saw, found by identity (every sample is a float object of
    its own, and holding it keeps its identity from being reused). A new engine (a new policy)
    has a new deque, all of it new. More than LATENCY_SAMPLES decisions between two scrapes
    would count only the newest LATENCY_SAMPLES.
    """

    buckets: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS_S) + 1))  # the last: +Inf
    count: int = 0
    sum_s: float = 0.0
    _source: object = None
    _last: float | None = None

    def update(self, samples_ms: collections.deque[float] | None) -> None:
        if samples_ms is None:
            return
        fresh: list[float] = []
        seen = samples_ms is self._source
        for sample in reversed(samples_ms):
            if seen and sample is self._last:
                break
            fresh.append(sample)
        if fresh:
            self._last = fresh[0]
        self._source = samples_ms
        for ms in fresh:
            self.observe(ms / 1000)

    def observe(self, seconds: float) -> None:
        self.count += 1
        self.sum_s += seconds
        for i, bound in enumerate(LATENCY_BUCKETS_S):
            if seconds <= bound:
                self.buckets[i] += 1
                break
        else:
            self.buckets[-1] += 1

    def include(self, other: LatencyTally) -> None:
        """Add another tally's observations to this one."""
        self.buckets = [a + b for a, b in zip(self.buckets, other.buckets, strict=True)]
        self.count += other.count
        self.sum_s += other.sum_s

    def cumulative(self) -> list[tuple[str, float]]:
        """(le, count) pairs as a histogram family takes them."""
        out: list[tuple[str, float]] = []
        total = 0
        for bound, n in zip((*(repr(b) for b in LATENCY_BUCKETS_S), "+Inf"), self.buckets, strict=True):
            total += n
            out.append((bound, float(total)))
        return out


def labelled(family: Family, values: Mapping[str, float]) -> Family:
    """`family` with one sample per (label value, value), in label order."""
    for label, value in sorted(values.items()):
        family.add_metric([label], value)
    return family
