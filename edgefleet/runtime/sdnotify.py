"""systemd's notification protocol (sd_notify(3)): readiness, status, and a watchdog fed only
while the daemon's main loop makes progress.

The protocol is one datagram of `KEY=value` lines to the AF_UNIX socket named by
$NOTIFY_SOCKET; without it (not under systemd, or Type= is not notify) everything here is a
no-op. Both daemons use it: edge-agent and edge-hub (systemd/*.service).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import socket
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Final

NOTIFY_SOCKET_ENV: Final = "NOTIFY_SOCKET"
WATCHDOG_USEC_ENV: Final = "WATCHDOG_USEC"  # WatchdogSec=, in microseconds
WATCHDOG_PID_ENV: Final = "WATCHDOG_PID"  # when set, the watchdog is meant for this pid only
READY: Final = "READY=1"
STOPPING: Final = "STOPPING=1"
WATCHDOG: Final = "WATCHDOG=1"
# Ping twice per interval, as sd_watchdog_enabled(3) recommends: one late ping is not a restart.
PING_SHARE: Final = 0.5

log = logging.getLogger(__name__)

_failures = 0  # first failure to notify: WARNING; the next ones: DEBUG (every ping would repeat it)


def notify(message: str) -> bool:
    """Send `message` (lines like READY=1) to $NOTIFY_SOCKET. False when unset or not delivered.

    Never blocks: a full socket queue drops this message (the next ping comes half an interval later).
    """
    address = _address(os.environ.get(NOTIFY_SOCKET_ENV, ""))
    if address is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(message.encode(), socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL, address)
    except OSError as exc:
        _failed(f"cannot notify systemd on {os.environ[NOTIFY_SOCKET_ENV]!r}: {exc}")
        return False
    return True


def status_line(text: str) -> str:
    """A STATUS= line for `systemctl status`; a newline would end the line early, so none is kept."""
    return "STATUS=" + " ".join(text.splitlines())


def child_environment(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The environment for a child process, without our notification socket and watchdog.

    Mosquitto (and any sd_notify-aware tool) would otherwise send READY=1 on our socket;
    NotifyAccess=main makes systemd ignore it, but logs a warning each time.
    """
    return {k: v for k, v in environ.items() if k not in (NOTIFY_SOCKET_ENV, WATCHDOG_USEC_ENV, WATCHDOG_PID_ENV)}


def _address(value: str) -> str | None:
    if value.startswith("@"):
        return "\0" + value[1:]  # Linux abstract namespace
    if value.startswith("/"):
        return value
    if value:  # "vsock:..." (systemd 253+, for VMs) is not for devices and hubs
        _failed(f"{NOTIFY_SOCKET_ENV}={value!r} is neither an absolute path nor an abstract socket (@name)")
    return None


def _failed(message: str) -> None:
    global _failures
    _failures += 1
    log.log(logging.WARNING if _failures == 1 else logging.DEBUG, "%s", message)


def _interval_from(environ: Mapping[str, str], pid: int) -> float | None:
    """WatchdogSec= in seconds, or None when systemd did not ask this process for pings."""
    usec = environ.get(WATCHDOG_USEC_ENV, "")
    owner = environ.get(WATCHDOG_PID_ENV, "")
    if not usec or (owner and owner != str(pid)):
        return None  # no watchdog, or one meant for the process that started us
    try:
        value = int(usec)
    except ValueError:
        value = 0
    if value <= 0:
        log.warning("ignoring %s=%r: not a positive number of microseconds", WATCHDOG_USEC_ENV, usec)
        return None
    return value / 1_000_000


class Watchdog:
    """Feeds systemd's watchdog while every watched component keeps making progress.

    A component calls `beat(name)` on each turn of its loop; one that has not beaten within
    the interval stops the pings (an ERROR names it, once), so systemd restarts the daemon.
    `busy(name)` watches one stretch of work that must end in time; outside it, the component
    is not watched (waiting for a message or the network is not a hang). A blocked event loop
    stops the pings by itself: they are sent from a task on that loop. `run()` is the task.
    """

    def __init__(
        self,
        interval: float | None,
        *,
        status: Callable[[], str] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if interval is not None and not (math.isfinite(interval) and interval > 0):
            raise ValueError(f"the watchdog interval must be a finite number of seconds > 0, not {interval}")
        self.interval = interval
        self._status = status  # sent with every ping: what `systemctl status` shows
        self._clock = clock
        self._beats: dict[str, float] = {}
        self._reported: set[str] = set()

    @classmethod
    def from_environment(
        cls, *, status: Callable[[], str] | None = None, environ: Mapping[str, str] = os.environ
    ) -> Watchdog:
        """Enabled when systemd set WATCHDOG_USEC (WatchdogSec=) for this process."""
        return cls(_interval_from(environ, os.getpid()), status=status)

    @property
    def enabled(self) -> bool:
        return self.interval is not None

    def beat(self, name: str) -> None:
        """`name` made progress; it must beat again within the interval, or go idle."""
        self._beats[name] = self._clock()

    def idle(self, name: str) -> None:
        """`name` waits on something outside (a message, the network): not watched until its next beat."""
        self._beats.pop(name, None)

    @contextlib.contextmanager
    def busy(self, name: str) -> Iterator[None]:
        """Watch the work inside: it must end (or beat again) within the interval."""
        self.beat(name)
        try:
            yield
        finally:
            self.idle(name)

    def stalled(self) -> list[tuple[str, float]]:
        """(component, seconds without progress) past the interval, the longest silent first."""
        if self.interval is None:
            return []
        now = self._clock()
        late = [(name, now - last) for name, last in self._beats.items() if now - last > self.interval]
        return sorted(late, key=lambda item: -item[1])

    async def run(self) -> None:
        """Ping every half interval while nothing is stalled, until cancelled.

        Without WatchdogSec= it only waits: a supervisor that stops when any of its tasks ends
        (edge-hub's run_hub) must not stop because of it.
        """
        interval = self.interval
        if interval is None:
            await asyncio.Event().wait()
            return
        while True:
            self.ping()
            await asyncio.sleep(interval * PING_SHARE)

    def ping(self) -> bool:
        """One turn of `run()`: WATCHDOG=1 unless a component stalled, with the STATUS= line."""
        stalled = self.stalled()
        self._report(stalled)
        lines = [] if stalled else [WATCHDOG]
        if stalled:
            late = ", ".join(f"{name} ({seconds:.0f} s)" for name, seconds in stalled)
            lines.append(status_line(f"stalled, no progress in: {late}; systemd restarts it"))
        elif self._status is not None:
            lines.append(status_line(self._status()))
        return notify("\n".join(lines))

    def _report(self, stalled: list[tuple[str, float]]) -> None:
        """ERROR once when a component stalls; WARNING if it recovers before systemd acted."""
        names = {name for name, _ in stalled}
        for name, seconds in stalled:
            if name not in self._reported:
                log.error("watchdog: %s made no progress for %.1f s (more than WatchdogSec=%g s); "
                          "systemd pings stopped, so it will restart this process", name, seconds, self.interval)
        for name in sorted(self._reported - names):
            log.warning("watchdog: %s made progress again; systemd pings resume", name)
        self._reported = names
