"""The sd_notify exchange against a real NOTIFY_SOCKET: READY after start-up, WATCHDOG=1 while
the main loop makes progress, none once it is stuck; in-process, then with the real daemons."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import shutil
import signal
import socket
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from edgefleet.runtime import sdnotify
from edgefleet.runtime.sdnotify import READY, STOPPING, WATCHDOG, Watchdog, notify
from tests.integration.test_systemd_units import INSTALL_BIN, exec_start
from tests.support.harness import BIN, HubDir, Proc, connect, device_identity

UCRED = struct.Struct("iII")  # struct ucred: pid, uid, gid
WAIT = 10.0  # bound on every wait for a datagram; generous for a loaded CI machine
INTERVAL = 0.4  # in-process watchdog interval: pings every 0.2 s
BEAT_EVERY = 0.05  # the fake component's loop period, well inside INTERVAL
SLACK = 0.5  # between a send and the listener thread stamping it, on a loaded machine
# The real agent's slowest beat is the rules tick (1 s); its watchdog interval must be well above.
DAEMON_WATCHDOG_USEC = 3_000_000


@dataclass(frozen=True)
class Datagram:
    at: float  # time.monotonic() when received
    pid: int  # the sender, from SCM_CREDENTIALS: systemd trusts this, not the content
    lines: tuple[str, ...]


class NotifyListener:
    """A NOTIFY_SOCKET like systemd's (/run/systemd/notify: anyone may write, the kernel says who)."""

    def __init__(self, abstract: bool = False) -> None:
        self._dir = Path(tempfile.mkdtemp(prefix="sdn-"))  # short: sun_path holds 108 bytes
        self._dir.chmod(0o711)
        if abstract:
            self.env_value = f"@edgefleet-test-{secrets.token_hex(6)}"
            address = "\0" + self.env_value[1:]
        else:
            self.env_value = address = str(self._dir / "notify")
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(address)
        if not abstract:
            os.chmod(address, 0o777)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self._sock.settimeout(0.05)
        self.received: list[Datagram] = []
        self._changed = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._read, name="notify-listener", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._closing:
            try:
                data, ancillary, _, _ = self._sock.recvmsg(4096, socket.CMSG_SPACE(UCRED.size))
            except TimeoutError:
                continue
            except OSError:
                return
            pid = next((UCRED.unpack(d[: UCRED.size])[0] for level, kind, d in ancillary
                        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS), 0)
            with self._changed:
                self.received.append(Datagram(time.monotonic(), pid, tuple(data.decode().splitlines())))
                self._changed.notify_all()

    def close(self) -> None:
        self._closing = True
        self._thread.join(timeout=WAIT)
        self._sock.close()
        shutil.rmtree(self._dir, ignore_errors=True)

    def mark(self) -> int:
        with self._changed:
            return len(self.received)

    def with_line(self, line: str, after: int = 0) -> list[Datagram]:
        with self._changed:
            return [d for d in self.received[after:] if line in d.lines]

    async def wait(self, accept: Callable[[Datagram], bool], after: int = 0, count: int = 1) -> list[Datagram]:
        """The first `count` datagrams from index `after` on that `accept` takes, within WAIT seconds."""
        def matching() -> list[Datagram]:
            return [d for d in self.received[after:] if accept(d)]

        def block() -> list[Datagram]:
            with self._changed:
                if not self._changed.wait_for(lambda: len(matching()) >= count, timeout=WAIT):
                    raise AssertionError(f"{len(matching())} of {count} datagrams within {WAIT} s; "
                                         f"got: {[d.lines for d in self.received]}")
                return matching()[:count]

        return await asyncio.to_thread(block)


def has(line: str) -> Callable[[Datagram], bool]:
    return lambda d: line in d.lines


@pytest.fixture(params=[False, True], ids=["path", "abstract"])
def listener(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[NotifyListener]:
    sock = NotifyListener(abstract=request.param)
    monkeypatch.setenv("NOTIFY_SOCKET", sock.env_value)
    yield sock
    sock.close()


class Component:
    """A fake main-loop component: beats until stopped, like the sampler or the outbox flusher."""

    def __init__(self, watchdog: Watchdog, name: str) -> None:
        self.watchdog, self.name = watchdog, name
        self.last_beat = 0.0
        self.running = asyncio.Event()

    async def run(self) -> None:
        while True:
            await self.running.wait()
            self.watchdog.beat(self.name)
            self.last_beat = time.monotonic()
            await asyncio.sleep(BEAT_EVERY)


# --- notify() -----------------------------------------------------------------------------


def test_notify_without_a_socket_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify(READY) is False


async def test_notify_sends_one_datagram_from_our_pid(listener: NotifyListener) -> None:
    assert notify("READY=1\nSTATUS=starting")
    [datagram] = await listener.wait(has(READY))
    assert datagram.lines == ("READY=1", "STATUS=starting")
    assert datagram.pid == os.getpid()


def test_an_unreachable_socket_is_reported_once_and_never_raises(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(sdnotify, "_failures", 0)
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone"))
    assert notify(WATCHDOG) is False
    assert notify(WATCHDOG) is False
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING and r.name == "edgefleet.runtime.sdnotify"]
    assert len(warnings) == 1
    assert str(tmp_path / "gone") in warnings[0].getMessage()


def test_a_status_line_stays_one_line() -> None:
    assert sdnotify.status_line("connected to hub\nbacklog 12") == "STATUS=connected to hub backlog 12"


def test_children_do_not_inherit_the_socket_or_the_watchdog() -> None:
    env = {"NOTIFY_SOCKET": "/run/systemd/notify", "WATCHDOG_USEC": "1", "WATCHDOG_PID": "1", "PATH": "/bin"}
    assert sdnotify.child_environment(env) == {"PATH": "/bin"}


# --- the watchdog's settings and its health, with controlled time -------------------------


@pytest.mark.parametrize(("environ", "interval"), [
    ({}, None),
    ({"WATCHDOG_USEC": "60000000"}, 60.0),
    ({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": str(os.getpid())}, 60.0),
    ({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": "1"}, None),  # meant for another process
    ({"WATCHDOG_USEC": "soon"}, None),
    ({"WATCHDOG_USEC": "0"}, None),
])
def test_the_watchdog_runs_only_when_systemd_asked_this_process(environ: dict[str, str],
                                                                interval: float | None) -> None:
    watchdog = Watchdog.from_environment(environ=environ)
    assert watchdog.interval == interval
    assert watchdog.enabled is (interval is not None)


def test_a_component_that_stops_beating_is_stalled_after_one_interval() -> None:
    now = [100.0]
    watchdog = Watchdog(10.0, clock=lambda: now[0])
    watchdog.beat("sampler")
    watchdog.beat("outbox")
    now[0] += 10.0
    assert watchdog.stalled() == []  # exactly one interval: still in time
    watchdog.beat("outbox")
    now[0] += 5.0
    assert watchdog.stalled() == [("sampler", 15.0)]
    watchdog.idle("sampler")  # waiting on something outside: no longer watched
    assert watchdog.stalled() == []


def test_busy_work_must_end_within_the_interval() -> None:
    now = [0.0]
    watchdog = Watchdog(10.0, clock=lambda: now[0])
    with watchdog.busy("ingest"):
        now[0] = 11.0
        assert [name for name, _ in watchdog.stalled()] == ["ingest"]
        watchdog.beat("ingest")  # still working, and says so
        assert watchdog.stalled() == []
    now[0] = 1000.0  # idle between cycles for as long as it likes
    assert watchdog.stalled() == []


async def test_without_watchdog_sec_nothing_is_sent(listener: NotifyListener) -> None:
    watchdog = Watchdog(None)
    watchdog.beat("sampler")
    task = asyncio.create_task(watchdog.run())
    done, _ = await asyncio.wait([task], timeout=3 * INTERVAL)
    assert not done  # it waits like the daemon's other tasks, so ending is never mistaken for a stop
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert watchdog.stalled() == []
    assert listener.received == []


# --- the exchange, in-process, against a real socket --------------------------------------


async def test_ready_then_pings_while_healthy_none_once_stuck_and_again_after(
    listener: NotifyListener, caplog: pytest.LogCaptureFixture
) -> None:
    watchdog = Watchdog(INTERVAL, status=lambda: "connected to hub, backlog 12")
    sampler = Component(watchdog, "sampler")
    sampler.running.set()
    async with asyncio.TaskGroup() as tasks:
        beating = tasks.create_task(sampler.run(), name="sampler")
        pinging = tasks.create_task(watchdog.run(), name="watchdog")
        await asyncio.sleep(0)  # every task took its first step: start-up is over
        assert notify(READY)

        [ready] = await listener.wait(has(READY))
        pings = await listener.wait(has(WATCHDOG), after=listener.received.index(ready), count=3)
        assert all("STATUS=connected to hub, backlog 12" in d.lines for d in pings)

        sampler.running.clear()  # the sampler hangs; the event loop itself is fine
        [stalled] = await listener.wait(lambda d: any("stalled" in line for line in d.lines),
                                        after=listener.mark())
        assert "STATUS=stalled, no progress in: sampler" in stalled.lines[0]
        after_stall = listener.mark()
        await listener.wait(lambda d: True, after=after_stall, count=3)  # three more turns of the watchdog
        assert listener.with_line(WATCHDOG, after=after_stall) == []
        last_ping = listener.with_line(WATCHDOG)[-1]
        assert last_ping.at <= sampler.last_beat + INTERVAL + SLACK
        errors = [r for r in caplog.records if r.levelno == logging.ERROR and r.name == "edgefleet.runtime.sdnotify"]
        assert len(errors) == 1  # said once, not at every turn
        assert "sampler made no progress" in errors[0].getMessage()

        sampler.running.set()  # it recovers before systemd acted: pings resume
        await listener.wait(has(WATCHDOG), after=listener.mark())
        assert any("sampler made progress again" in r.getMessage() for r in caplog.records)
        beating.cancel()
        pinging.cancel()


async def test_a_blocked_event_loop_sends_no_pings(listener: NotifyListener) -> None:
    watchdog = Watchdog(INTERVAL)
    task = asyncio.create_task(watchdog.run(), name="watchdog")
    try:
        await listener.wait(has(WATCHDOG), count=2)
        blocked_at = time.monotonic()
        time.sleep(3 * INTERVAL)  # noqa: ASYNC251 - the point: a read stuck in the kernel stops the whole loop
        unblocked_at = time.monotonic()
        await listener.wait(has(WATCHDOG), after=listener.mark())
        during = [d for d in listener.with_line(WATCHDOG) if blocked_at + SLACK / 5 < d.at < unblocked_at]
        assert during == []
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


# --- the real daemons, started as their units start them ----------------------------------
# These pass once the lead has wired edgefleet/runtime/sdnotify.py into the agent and the hub.


def systemd_env(sock: NotifyListener) -> dict[str, str]:
    return {"NOTIFY_SOCKET": sock.env_value, "WATCHDOG_USEC": str(DAEMON_WATCHDOG_USEC)}


def as_systemd_starts(argv: list[str]) -> list[str]:
    """systemd sets WATCHDOG_PID to the main process's pid: the exec'd shell keeps its pid."""
    return ["/bin/sh", "-c", 'WATCHDOG_PID=$$ exec "$@"', "sh", *argv]


@pytest.mark.integration
async def test_edge_agent_unit_ready_watchdog_and_stopping(hub_dir: HubDir, bundles: Path, workdir: Path) -> None:
    """No hub running: READY=1 must not wait for it, only for the outbox and a first connect attempt."""
    await hub_dir.provision(bundles, "dev-n")
    state = workdir / "var-lib-edge-agent"
    argv = exec_start("edge-agent.service", {INSTALL_BIN: f"{BIN}/", "/etc/edge-agent/": f"{bundles / 'dev-n'}/",
                                             "/var/lib/edge-agent": str(state)})
    sock = NotifyListener()
    agent = await Proc("agent", as_systemd_starts(argv), env=systemd_env(sock)).start()
    try:
        [ready] = await sock.wait(has(READY))
        assert ready.pid == agent.pid
        assert (state / "outbox.db").exists()  # the outbox is open before systemd hears "ready"
        pings = await sock.wait(has(WATCHDOG), count=2)
        assert {d.pid for d in pings} == {agent.pid}
        assert any(line.startswith("STATUS=") for d in pings for line in d.lines)
        mark = sock.mark()
        agent.signal(signal.SIGTERM)
        await sock.wait(has(STOPPING), after=mark)
        assert await agent.stop() == 0
        assert {d.pid for d in sock.received} == {agent.pid}
    finally:
        await agent.stop()
        sock.close()


@pytest.mark.integration
async def test_edge_hub_unit_ready_when_devices_can_connect(hub_dir: HubDir, bundles: Path) -> None:
    """READY=1 once the managed broker serves; pings from the hub alone (Mosquitto speaks sd_notify
    too and must not be heard); STOPPING=1 on SIGTERM."""
    await hub_dir.provision(bundles, "dev-h")
    argv = exec_start("edge-hub.service", {INSTALL_BIN: f"{BIN}/", "/var/lib/edge-hub": str(hub_dir.dir)})
    sock = NotifyListener()
    hub = await Proc("hub", as_systemd_starts(argv), env=systemd_env(sock)).start()
    try:
        [ready] = await sock.wait(has(READY))
        assert ready.pid == hub.pid
        session = await connect(device_identity(bundles / "dev-h"), hub_dir.port, "dev-h")
        await session.close()
        await sock.wait(has(WATCHDOG), count=2)
        mark = sock.mark()
        hub.signal(signal.SIGTERM)
        await sock.wait(has(STOPPING), after=mark)
        assert await hub.stop() == 0
        assert {d.pid for d in sock.received} == {hub.pid}
    finally:
        await hub.stop()
        sock.close()
