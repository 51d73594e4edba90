"""Store and forward under faults: no loss, no duplicates (docs/store-and-forward.md).

Every test drives real processes (agent, hub, managed Mosquitto) at 2,000 readings/s,
breaks something on purpose — the network, the agent, the broker, the hub — and ends with
the exactly-once check read from the real databases: the hub holds every sequence number
1..N of the device exactly once, except exactly the readings the agent counted as shed.

A clean stop commits the last readings buffered in memory after the final drain, so every
test ends with a short quiet run of the same device that sends them (`finish`/`settle`):
N is the last seq after that run, and the outbox must then be empty.
"""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from edge_agent.buffer.outbox import SLOW_COMMIT
from edgefleet.mqtt.session import MqttSession
from edgefleet.wire.protocol import ACK, TELEMETRY, Ack, Batch, EventRecord, down_topic, pack, unpack, up_topic
from tests.support.exactly_once import (
    QUIET,
    OutboxState,
    assert_exactly_once,
    hub_seqs,
    hub_watermark,
    outbox_state,
    wait_drained,
)
from tests.support.faultproxy import FaultProxy
from tests.support.harness import AGENT, START_TIMEOUT, HubDir, Proc, connect, device_identity
from tests.support.harness import start_hub as conftest_start_hub

pytestmark = pytest.mark.integration

# 4 sim signals x 500 Hz = 2,000 readings/s, every one reported; a short ack timeout and
# keepalive so that faults are noticed in seconds, not the production minutes.
STREAM = (
    "sim.rate_hz=500",
    "report.default_deadband=0",
    "uplink.ack_timeout=3",
    "uplink.status_interval=1",
    "broker.keepalive=2",
    "broker.connect_timeout=3",
)
BACKLOG = 5_000  # readings a partition must pile up in the outbox before it heals
DRAIN_TIMEOUT = 60.0
RECONNECT_TIMEOUT = 30.0  # a reconnect after a backoff that several failures have grown


# --- helpers ----------------------------------------------------------------------------


async def start_hub(hub_dir: HubDir, *, persistence: bool = False) -> Proc:
    """`edge-hub run` on hub_dir (verbose: the broker's own log lines are shown too)."""
    if persistence:
        config = hub_dir.dir / "hub.toml"
        text = config.read_text()
        assert "persistence = false" in text
        config.write_text(text.replace("persistence = false", "persistence = true", 1))
    return await conftest_start_hub(hub_dir)


def broker_pid(hub_dir: HubDir) -> int:
    return int((hub_dir.dir / "run" / "mosquitto.pid").read_text())


async def run_agent(bundle: Path, *extra: str, name: str = "agent") -> Proc:
    return await Proc(name, agent_argv(bundle, *STREAM, *extra)).start()


def agent_argv(bundle: Path, *overrides: str, level: str = "info") -> list[str]:
    """Like conftest.start_agent, but at log level info: at debug the agent logs every SQL
    call of its outbox with its parameters (aiosqlite), one line per commit that holds every
    reading — past 64 KiB after a backlog, which kills Proc's line reader; the agent then
    blocks writing to the full pipe and cannot even act on SIGTERM."""
    sets = [a for o in overrides for a in ("--set", o)]
    return [AGENT, "run", "--config", str(bundle / "agent.toml"), "--log-level", level, *sets]


async def wait_until(predicate: Callable[[], bool], what: str, timeout: float = 15.0, every: float = 0.1) -> None:
    """Poll `predicate()` (no process logs these database states) until true, bounded."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        await asyncio.sleep(every)


async def wait_backlog(bundle: Path, rows: int, timeout: float = 15.0) -> OutboxState:
    """Wait until the outbox holds at least `rows` unacknowledged records."""

    def held() -> int:
        try:
            return outbox_state(bundle).rows
        except sqlite3.OperationalError:  # the file exists, its tables are not committed yet
            return -1

    await wait_until(lambda: held() >= rows, f"{bundle.name} outbox holds {rows} rows", timeout)
    return outbox_state(bundle)


async def wait_streaming(hub_dir: HubDir, bundle: Path, above: int = 0, timeout: float = 15.0) -> None:
    """Wait until the hub has acknowledged something of the device beyond `above`."""
    await wait_until(lambda: hub_watermark(hub_dir.dir, bundle.name) > above,
                     f"hub watermark of {bundle.name} beyond {above}", timeout)


async def finish(hub_dir: HubDir, bundle: Path, agent: Proc) -> OutboxState:
    """Drain, stop the agent cleanly, settle what the stop committed, check exactly once.

    A clean stop commits the readings still buffered in memory (up to 0.1 s of them); they
    wait in the outbox for the next run. So a quiet run of the same device (one sample per
    signal, then none) sends them, drains and stops: then the outbox is empty and the hub
    must hold 1..last_seq exactly once, less exactly what the agent counted as shed.
    """
    await wait_drained(hub_dir.dir, bundle, timeout=DRAIN_TIMEOUT)
    await stop_cleanly(agent)
    return await settle(hub_dir, bundle)


async def settle(hub_dir: HubDir, bundle: Path, argv: list[str] | None = None,
                 online_timeout: float = START_TIMEOUT) -> OutboxState:
    """The quiet run of `finish`, then the exactly-once check (the device's agent is stopped).
    `argv` replaces the quiet agent's command line (it must keep sampling slowly)."""
    stopped = outbox_state(bundle)
    argv = argv or agent_argv(bundle, *STREAM, *QUIET)
    quiet = await Proc(f"{bundle.name}-quiet", argv).start()
    try:
        await quiet.wait_for(rf"{bundle.name} online", timeout=online_timeout)  # signal handlers are set by now

        def drained() -> bool:  # its own first samples included, so nothing is left from before
            state = outbox_state(bundle)
            return (state.last_seq > stopped.last_seq and state.acked >= state.last_seq
                    and hub_watermark(hub_dir.dir, bundle.name) >= state.last_seq)

        await wait_until(drained, f"{bundle.name} drained after a quiet restart", DRAIN_TIMEOUT)
        await stop_cleanly(quiet)
    finally:
        await quiet.stop()
    state = outbox_state(bundle)
    assert state.last_seq > stopped.last_seq
    assert state.rows == 0
    assert state.acked == state.last_seq
    assert_exactly_once(hub_dir.dir, bundle.name, state.last_seq, state.dropped)
    return state


async def stop_cleanly(proc: Proc) -> None:
    """SIGTERM; the process must exit 0 by itself (Proc.stop falls back to SIGKILL after 10 s)."""
    started = time.monotonic()
    code = await proc.stop()
    tail = "\n".join(proc.lines[-40:])
    assert code == 0, f"{proc.name} exited {code} {time.monotonic() - started:.1f} s after SIGTERM:\n{tail}"


async def wait_alive(proc: Proc, pattern: str, *, after: int, timeout: float) -> str:
    """proc.wait_for, but fail at once if the process exits meanwhile (a crashed hub)."""
    assert proc.proc is not None
    waiter = asyncio.create_task(proc.wait_for(pattern, timeout=timeout, after=after))
    exited = asyncio.create_task(proc.proc.wait())
    await asyncio.wait({waiter, exited}, return_when=asyncio.FIRST_COMPLETED)
    exited.cancel()
    if waiter.done():
        return waiter.result()
    waiter.cancel()
    await asyncio.gather(waiter, exited, return_exceptions=True)
    await proc.stop()  # collects its last lines
    tail = "\n".join(proc.lines[-40:])
    raise AssertionError(f"{proc.name} exited ({proc.proc.returncode}) waiting for {pattern!r}:\n{tail}")


async def kill_9(proc: Proc) -> None:
    proc.signal(signal.SIGKILL)
    assert proc.proc is not None
    async with asyncio.timeout(10):
        await proc.proc.wait()


# --- 1. partition -----------------------------------------------------------------------


async def test_partition_builds_a_backlog_then_drains_exactly_once(hub_dir: HubDir, hub: Proc, bundles: Path) -> None:
    """The cable is pulled mid-stream (keepalive notices, reconnects are held) until the outbox
    holds thousands of readings; on heal the agent reconnects and drains them all, once."""
    await hub_dir.provision(bundles, "dev-p")
    bundle = bundles / "dev-p"
    async with FaultProxy("127.0.0.1", hub_dir.port) as proxy:
        agent = await run_agent(bundle, f"broker.port={proxy.port}")
        try:
            await hub.wait_for(r"device dev-p is online")
            await wait_streaming(hub_dir, bundle)
            proxy.partition()
            before = outbox_state(bundle)
            state = await wait_backlog(bundle, BACKLOG)
            assert state.rows >= BACKLOG
            # The agent kept sampling, and nothing it committed since the cut reached the hub.
            assert state.last_seq > before.last_seq
            assert hub_watermark(hub_dir.dir, "dev-p") <= before.last_seq
            mark = agent.mark()
            proxy.heal()
            await agent.wait_for(r"dev-p online", after=mark, timeout=RECONNECT_TIMEOUT)
            await finish(hub_dir, bundle, agent)
        finally:
            await agent.stop()


# --- 2. kill -9 of the agent -------------------------------------------------------------


async def test_agent_kill_9_mid_stream_and_mid_drain(hub_dir: HubDir, hub: Proc, bundles: Path) -> None:
    """kill -9 of the agent twice: while streaming (batches in flight, acks on their way,
    readings still in memory), and while a backlog drains — built behind a partition, then
    sent on heal to a hub that is paused, so the kill lands with a window of batches
    published and none acknowledged; the hub commits them after the agent died. The agent
    restarted on the same outbox resends them (the hub must not store them twice), goes on
    numbering after the last committed seq, and drains."""
    await hub_dir.provision(bundles, "dev-k")
    bundle = bundles / "dev-k"
    async with FaultProxy("127.0.0.1", hub_dir.port) as proxy:
        port = f"broker.port={proxy.port}"
        agent = await run_agent(bundle, port)
        try:
            await agent.wait_for(r"dev-k online")
            await wait_streaming(hub_dir, bundle, above=2_000)
            await kill_9(agent)
        finally:
            await agent.stop()
        killed = outbox_state(bundle)
        assert killed.last_seq > 2_000

        proxy.partition()
        agent = await run_agent(bundle, port)
        try:
            await wait_backlog(bundle, BACKLOG + killed.rows)
            mark = agent.mark()
            hub.signal(signal.SIGSTOP)
            frozen = hub_watermark(hub_dir.dir, "dev-k")
            proxy.heal()
            await agent.wait_for(r"dev-k online", after=mark, timeout=RECONNECT_TIMEOUT)
            await agent.wait_for(r"no acknowledgment from the hub", after=mark, timeout=15)
            draining = outbox_state(bundle)
            await kill_9(agent)
        finally:
            hub.signal(signal.SIGCONT)
            await agent.stop()
        assert draining.rows >= BACKLOG  # the backlog was all there, none of it acknowledged
        # The hub commits the window the dead agent sent; the restarted agent resends it.
        assert await wait_hub_idle(hub_dir, "dev-k", moved_from=frozen) > draining.acked

        agent = await run_agent(bundle, port)
        try:
            state = await finish(hub_dir, bundle, agent)
        finally:
            await agent.stop()
        assert state.last_seq > draining.last_seq


async def test_agent_sigterm_during_an_outbox_commit(hub_dir: HubDir, hub: Proc, bundles: Path) -> None:
    """SIGTERM (systemctl stop) while the outbox is inside a commit must still end the agent
    cleanly, having committed what it buffered. On an SD card a synchronous=FULL commit can
    take long; here a write lock on outbox.db (taken by the test) holds the flusher in BEGIN
    IMMEDIATE, within the agent's 5 s busy timeout, and the stop lands there every time.
    (Before edgefleet.runtime.sqlite.to_completion, a few percent of the clean stops at 2,000
    readings/s in the tests above hung this way: the cancelled BEGIN or COMMIT still ran.)"""
    await hub_dir.provision(bundles, "dev-t")
    bundle = bundles / "dev-t"
    agent = await Proc("agent", agent_argv(bundle, *STREAM, "sim.rate_hz=20")).start()
    try:
        await agent.wait_for(r"dev-t online")
        await wait_streaming(hub_dir, bundle)
        lock = sqlite3.connect(bundle / "state" / "outbox.db", timeout=5, isolation_level=None)
        try:
            mark, hub_mark = agent.mark(), hub.mark()
            lock.execute("BEGIN IMMEDIATE")
            # A commit is held in BEGIN IMMEDIATE: the one under way as the lock was taken, or the
            # next (within 0.1 s). Its "committing" debug line may predate `mark`, so what is
            # awaited is the outbox's warning about a commit unfinished after SLOW_COMMIT (1 s).
            await agent.wait_for(r"outbox: a commit of \d+ records has taken over 1 s", after=mark,
                                 timeout=SLOW_COMMIT + 2)
            agent.signal(signal.SIGTERM)
            # The agent leaves the broker (its Will: the hub logs it), then cancels its tasks and
            # queues its final commit within milliseconds; nothing logs that moment, so allow 1 s
            # (the held commit's 5 s busy timeout runs from about `mark`).
            await hub.wait_for(r"device dev-t is offline", after=hub_mark, timeout=2)
            await asyncio.sleep(1.0)
        finally:
            lock.execute("ROLLBACK")
            lock.close()
        assert agent.proc is not None
        try:
            async with asyncio.timeout(8):  # the agent's own bound on its final commit is 5 s
                code = await agent.proc.wait()
        except TimeoutError:
            code = None
        errors = [line for line in agent.lines if "Error" in line and "aiosqlite" not in line]
        assert code == 0, f"agent {'still running' if code is None else f'exited {code}'} after SIGTERM: {errors}"
    finally:
        await agent.stop()
    await settle(hub_dir, bundle)


async def wait_hub_idle(hub_dir: HubDir, device: str, moved_from: int, quiet: float = 0.5,
                        timeout: float = 15.0) -> int:
    """Wait until the hub's watermark for `device` moved past `moved_from`, then stood
    still for `quiet` s (its sender is paused: the hub has committed all it received)."""
    await wait_until(lambda: hub_watermark(hub_dir.dir, device) > moved_from,
                     f"hub watermark of {device} beyond {moved_from}", timeout)
    last, since = hub_watermark(hub_dir.dir, device), time.monotonic()
    deadline = time.monotonic() + timeout
    while time.monotonic() - since < quiet:
        assert time.monotonic() < deadline, f"hub watermark of {device} never settled"
        await asyncio.sleep(0.05)
        now = hub_watermark(hub_dir.dir, device)
        if now != last:
            last, since = now, time.monotonic()
    return last


# --- 3. kill -9 of the broker --------------------------------------------------------------


@pytest.mark.parametrize("persistence", [False, True], ids=["no-persistence", "persistence"])
async def test_broker_kill_9_mid_drain(hub_dir: HubDir, bundles: Path, persistence: bool) -> None:
    """The broker dies while a backlog is on its way. The hub is paused (SIGSTOP) so the
    agent's outbox piles up and the broker queues batches for the hub; with persistence the
    broker snapshots that queue (SIGUSR1). The agent is paused, the hub resumes and commits
    what was queued, its acks head for the paused agent — and the broker is killed. The
    acks are lost, the agent resends what the hub already has; with persistence the restored
    snapshot holds the hub's session with batches it has since committed. Exactly once.

    (Here the broker dies while the hub is idle; test_broker_kill_9_while_the_hub_commits
    kills it while the hub is inside a commit.)"""
    await hub_dir.provision(bundles, "dev-b")
    bundle = bundles / "dev-b"
    hub = await start_hub(hub_dir, persistence=persistence)
    agent = None
    try:
        agent = await run_agent(bundle)
        await hub.wait_for(r"device dev-b is online")
        await wait_streaming(hub_dir, bundle)
        mark = agent.mark()
        hub.signal(signal.SIGSTOP)
        frozen = hub_watermark(hub_dir.dir, "dev-b")
        # The agent sends its window, the broker queues it for the paused hub, no ack comes.
        await agent.wait_for(r"no acknowledgment from the hub", after=mark, timeout=15)
        pid = broker_pid(hub_dir)
        if persistence:
            snapshot = hub_dir.dir / "broker" / "data" / "mosquitto.db"
            assert not snapshot.exists()
            psutil.Process(pid).send_signal(signal.SIGUSR1)  # snapshot now, the hub's queue included
            await wait_until(snapshot.exists, "the broker's snapshot", 5)
        agent.signal(signal.SIGSTOP)
        hub.signal(signal.SIGCONT)
        committed = await wait_hub_idle(hub_dir, "dev-b", moved_from=frozen)
        draining = outbox_state(bundle)
        assert draining.last_seq - draining.acked >= BACKLOG // 2  # a backlog, unacknowledged
        assert committed > draining.acked  # and acks for part of it on their way to the agent
        hub_mark = hub.mark()
        psutil.Process(pid).kill()
        await hub.wait_for(r"mosquitto exited", after=hub_mark)
        await hub.wait_for(r"hub ready", after=hub_mark, timeout=RECONNECT_TIMEOUT)
        assert broker_pid(hub_dir) != pid
        agent.signal(signal.SIGCONT)
        await agent.wait_for(r"dev-b online", after=mark, timeout=RECONNECT_TIMEOUT)
        await finish(hub_dir, bundle, agent)
    finally:
        if agent is not None:
            await agent.stop()
        await hub.stop()


async def test_broker_kill_9_while_the_hub_commits(hub_dir: HubDir, bundles: Path) -> None:
    """kill -9 of the broker at the worst moment: the hub is inside an ingest commit. To hit
    that moment every time, the test holds hub.db's write lock (as an operator's CLI write
    may, for up to the hub's busy timeout), so the hub waits in BEGIN IMMEDIATE; the broker
    dies; the lock is released. The hub must reconnect, and everything arrive exactly once.
    (Before edgefleet.runtime.sqlite.to_completion the cancelled BEGIN left the hub's connection in a
    transaction and the next ingest cycle killed the whole edge-hub.)"""
    await hub_dir.provision(bundles, "dev-c")
    bundle = bundles / "dev-c"
    hub = await start_hub(hub_dir)
    agent = None
    try:
        agent = await run_agent(bundle)
        await hub.wait_for(r"device dev-c is online")
        await wait_streaming(hub_dir, bundle)
        lock = sqlite3.connect(hub_dir.dir / "hub.db", timeout=10, isolation_level=None)
        try:
            mark, hub_mark = agent.mark(), hub.mark()
            lock.execute("BEGIN IMMEDIATE")
            # The hub cannot commit now (it waits up to its 10 s busy timeout in BEGIN
            # IMMEDIATE), so no ack comes: once the agent says so, the hub is waiting there.
            await agent.wait_for(r"no acknowledgment from the hub", after=mark, timeout=8)
            psutil.Process(broker_pid(hub_dir)).kill()
            await hub.wait_for(r"hub hub\.\w+: connection lost", after=hub_mark)
        finally:
            lock.execute("ROLLBACK")
            lock.close()
        await wait_alive(hub, r"hub ready", after=hub_mark, timeout=RECONNECT_TIMEOUT)
        await wait_alive(hub, r"device dev-c is online", after=hub_mark, timeout=RECONNECT_TIMEOUT)
        await finish(hub_dir, bundle, agent)
    finally:
        if agent is not None:
            await agent.stop()
        await hub.stop()


# --- 4. kill -9 / restart of the hub ---------------------------------------------------------


async def test_hub_kill_9_between_receive_and_commit(hub_dir: HubDir, bundles: Path) -> None:
    """SIGSTOP: batches reach the hub's socket and sit there unacknowledged; then SIGKILL.
    A new hub stops the orphaned broker (losing its queue) and the agent resends."""
    await hub_dir.provision(bundles, "dev-h")
    bundle = bundles / "dev-h"
    hub = await start_hub(hub_dir)
    agent = None
    try:
        agent = await run_agent(bundle)
        await hub.wait_for(r"device dev-h is online")
        await wait_streaming(hub_dir, bundle)
        mark = agent.mark()
        hub.signal(signal.SIGSTOP)
        frozen = hub_watermark(hub_dir.dir, "dev-h")
        await agent.wait_for(r"no acknowledgment from the hub", after=mark, timeout=15)
        assert hub_watermark(hub_dir.dir, "dev-h") == frozen
        orphan = broker_pid(hub_dir)
        await kill_9(hub)
        assert psutil.pid_exists(orphan)  # the broker outlives its hub
        await hub.stop()
        hub = await start_hub(hub_dir)
        await hub.wait_for(rf"stopping the managed mosquitto \(pid {orphan}\)")
        assert broker_pid(hub_dir) != orphan
        await agent.wait_for(r"dev-h online", after=mark, timeout=RECONNECT_TIMEOUT)
        await finish(hub_dir, bundle, agent)
    finally:
        if agent is not None:
            await agent.stop()
        await hub.stop()


async def test_hub_restart_while_streaming(hub_dir: HubDir, bundles: Path) -> None:
    """A plain restart (SIGTERM: the hub stops its broker too) while the agent streams."""
    await hub_dir.provision(bundles, "dev-r")
    bundle = bundles / "dev-r"
    hub = await start_hub(hub_dir)
    agent = None
    try:
        agent = await run_agent(bundle)
        await hub.wait_for(r"device dev-r is online")
        await wait_streaming(hub_dir, bundle)
        mark = agent.mark()
        assert await hub.stop() == 0
        hub = await start_hub(hub_dir)
        await agent.wait_for(r"dev-r online", after=mark, timeout=RECONNECT_TIMEOUT)
        await finish(hub_dir, bundle, agent)
    finally:
        if agent is not None:
            await agent.stop()
        await hub.stop()


# --- 5. the same batch twice ----------------------------------------------------------------


async def next_ack(session: MqttSession, timeout: float = 10.0) -> int:
    async with asyncio.timeout(timeout):
        message = await session.next_message()
    assert message.topic == down_topic(session.client_id, ACK)
    return unpack(message.payload, Ack).through


async def test_duplicate_batch_is_stored_once_and_acknowledged(hub_dir: HubDir, hub: Proc, bundles: Path) -> None:
    """A redelivered batch (the same bytes twice, as from the broker or a resend) and an
    overlapping one, from a client with the device's certificate: stored once, acked each time."""
    await hub_dir.provision(bundles, "dev-d")
    session = await connect(device_identity(bundles / "dev-d"), hub_dir.port, "dev-d")
    try:
        await session.subscribe([(down_topic("dev-d", ACK), 1)])
        now = time.time()
        first = Batch(base=0, last=4, settled=True, names=["sig0", "sig1"], seq=[1, 2, 4],
                      ts=[now, now, now + 0.1], metric=[0, 1, 0], value=[1.0, 2.0, 3.0],
                      events=[EventRecord(3, now, "decision", '{"rule":"r1"}')])
        topic = up_topic("dev-d", TELEMETRY)
        for _ in range(2):  # a redelivery: the very same bytes again
            await session.publish(topic, pack(first), qos=1)
            assert await next_ack(session) == 4
        # A resend that overlaps: (2, 6] carries 3 and 4 again, and 5, 6 for the first time.
        overlap = Batch(base=2, last=6, names=["sig0"], seq=[4, 5, 6], ts=[now] * 3, metric=[0, 0, 0],
                        value=[3.0, 4.0, 5.0], events=[EventRecord(3, now, "decision", '{"rule":"r1"}')])
        await session.publish(topic, pack(overlap), qos=1)
        assert await next_ack(session) == 6
    finally:
        await session.close()
    assert hub_seqs(hub_dir.dir, "dev-d") == [1, 2, 3, 4, 5, 6]
    assert hub_watermark(hub_dir.dir, "dev-d") == 6
    assert_exactly_once(hub_dir.dir, "dev-d", 6, 0)


# --- 6. reconnect storm -----------------------------------------------------------------------


async def test_reconnect_storm(hub_dir: HubDir, hub: Proc, bundles: Path) -> None:
    """Three agents behind one proxy; every connection is reset ten times in ten seconds.
    Nothing is lost or doubled, and nobody hammers: backoff grows while connections do not
    last (it must not reset on CONNACK), so the agents reconnect far less than every 100 ms."""
    devices = ["dev-s1", "dev-s2", "dev-s3"]
    resets, spacing = 10, 1.0
    await hub_dir.provision(bundles, *devices)
    async with FaultProxy("127.0.0.1", hub_dir.port) as proxy:
        agents: list[Proc] = []
        try:
            for d in devices:
                # Three agents on two cores: 800 readings/s each.
                agents.append(await run_agent(bundles / d, f"broker.port={proxy.port}", "sim.rate_hz=200", name=d))
            for d in devices:
                await hub.wait_for(rf"device {d} is online")
            before = proxy.stats()
            started = time.monotonic()
            marks: list[int] = []
            for i in range(resets):
                if i == resets - 1:
                    marks = [a.mark() for a in agents]
                proxy.reset()
                await asyncio.sleep(spacing)
            storm, storm_s = proxy.stats(), time.monotonic() - started
            # Everyone comes back after the last reset, and drains.
            for agent, d, mark in zip(agents, devices, marks, strict=True):
                await agent.wait_for(rf"{d} online", after=mark, timeout=RECONNECT_TIMEOUT)
            for d in devices:
                await wait_drained(hub_dir.dir, bundles / d, timeout=DRAIN_TIMEOUT)
            for agent in agents:
                await stop_cleanly(agent)
        finally:
            for agent in agents:
                await agent.stop()
    cut = storm.resets - before.resets
    connections = storm.accepted - before.accepted
    per_agent_per_s = connections / len(devices) / storm_s
    print(f"storm: {resets} resets cut {cut} connections; {connections} new connections from "
          f"{len(devices)} agents in {storm_s:.1f} s = {per_agent_per_s:.2f}/s per agent")
    assert cut >= 2 * len(devices), "the resets did not cut the agents' connections"
    assert connections >= 2 * len(devices), "the agents did not reconnect during the storm"
    assert per_agent_per_s < 1.0, "agents reconnect too eagerly (one per 100 ms would be 10/s)"
    await asyncio.gather(*(settle(hub_dir, bundles / d) for d in devices))
