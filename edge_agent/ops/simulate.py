"""`edge-agent simulate`: many complete agents in one process, for load tests and benchmarks.

Each one is the real `Agent` that `edge-agent run` runs: its own settings from its bundle
(`DIR/<id>/agent.toml`), its own outbox, certificate and mutual-TLS connection, its own rule
engine and coordinator. Only the process, its event loop and the outboxes' SQLite threads
(edge_agent.buffer.sqlite_pool) are shared.

    async with Fleet(bundles, overrides) as fleet:
        ...   # fleet.agents, fleet.connected(), fleet.tally()
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import resource
import signal
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Final

import psutil

from edge_agent.agent import Agent
from edge_agent.config import AgentSettings, load_settings
from edge_agent.identity.enroll import make_request_in_process
from edge_agent.identity.tls import IdentityFiles
from edgefleet.errors import AlreadyRunning, ConfigError
from edgefleet.policy.document import Policy
from edgefleet.runtime.runlock import AGENT_LOCK, RunLock

NO_BALLAST: Final = "outbox.ballast_mb=0"
OPENING_AT_ONCE: Final = 64  # outboxes opened concurrently at start: each open is a few statements on the pool
CONNECTING_AT_ONCE: Final = 256  # agents started and not yet connected: a start-up, not a reconnect storm
CONNECT_SLOT_S: Final = 10.0  # an agent that has not connected by then (broker down?) frees its slot anyway
STOP_TIMEOUT: Final = 10.0  # an agent's last commit at stop (Agent.close bounds its own flush by 5 s)
# Measured: a TLS socket and the outbox's database, -wal and -shm. Opening adds a read-only probe.
FDS_PER_AGENT: Final = 4
FDS_RESERVE: Final = 256  # the interpreter, the log, opening outboxes, the default executor's connects
GC_THRESHOLDS: Final = (20_000, 20, 10)  # fewer, larger young collections: measured, see settle_collector
LAG_PROBE_INTERVAL: Final = 0.1  # how often the loop's lateness is sampled (one timer for the whole fleet)

log = logging.getLogger("edge_agent.simulate")


class SimulateError(ConfigError):
    """The fleet cannot start as asked (exit 2): which bundle or limit, and what to do."""


@dataclass(frozen=True)
class Tally:
    """The fleet at one moment, summed over its agents."""

    agents: int
    connected: int
    crashed: int  # agents whose run ended on an error: they are not restarted
    queued: int  # records taken and not yet acknowledged by the hub
    acked: int  # records the hub acknowledged since the fleet started


def find_bundles(root: Path, count: int | None) -> list[Path]:
    """The first `count` bundles (folders with an agent.toml) in `root`, by name; all without a count."""
    if not root.is_dir():
        raise SimulateError(f"--bundles {root}: no such directory; make bundles with "
                            "`edge-hub provision --out DIR ...`")
    bundles = sorted(p.parent for p in root.glob("*/agent.toml"))
    if not bundles:
        raise SimulateError(f"--bundles {root}: no bundle in it (a bundle is a folder with agent.toml, as "
                            "`edge-hub provision --out` writes)")
    if count is not None and count > len(bundles):
        raise SimulateError(f"--count {count}, but {root} holds only {len(bundles)} bundles: provision more "
                            f"(edge-hub provision --out {root} ...) or lower --count")
    return bundles[:count] if count is not None else bundles


def load_fleet(bundles: Sequence[Path], overrides: Sequence[str]) -> list[tuple[AgentSettings, Policy | None]]:
    """Every agent's settings and local policy, checked before anything is opened."""
    from edge_agent.ops.status import agent_process  # the outbox lock test; not needed by the daemon

    loaded = []
    for bundle in bundles:
        try:
            # No ballast unless asked for: 2,000 outboxes on one disk would hold 8 GB back.
            settings = load_settings(bundle / "agent.toml", [NO_BALLAST, *overrides])
            policy = settings.load_policy()
        except ConfigError as exc:
            raise SimulateError(f"bundle {bundle.name}: {exc}") from None
        files = IdentityFiles(settings.tls, settings.state_dir)
        enrolling = settings.config.enroll is not None and files.current() is None and files.pending() is None
        refusals = [] if enrolling else files.refusals(settings.config.device_id)
        if refusals:  # what `edge-agent run` refuses to start with
            raise SimulateError(f"bundle {bundle.name}: {' '.join(refusals)}")
        holder = RunLock.holder(settings.state_dir / AGENT_LOCK)
        if holder is not None:
            raise SimulateError(f"bundle {bundle.name}: {AlreadyRunning('edge-agent', settings.state_dir, holder)}")
        running = agent_process(settings.state_dir)
        if running.state == "running":
            # Two agents on one outbox would hand out the same sequence numbers.
            raise SimulateError(f"bundle {bundle.name}: its outbox is open in another process "
                                f"({running.pid or '?'}: {running.detail or 'unknown'}); stop it first")
        loaded.append((settings, policy))
    return loaded


def raise_fd_limit(agents: int) -> int:
    """Make room for `agents` agents' descriptors: the soft limit up to the hard one if need be.
    Returns the soft limit in force; raises SimulateError when even the hard one is too low."""
    needed = agents * FDS_PER_AGENT + FDS_RESERVE
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            raise SimulateError(
                f"{agents} agents need about {needed} open files ({FDS_PER_AGENT} each and {FDS_RESERVE} more) but "
                f"the hard limit is {hard}: raise it (ulimit -Hn {needed} as root, LimitNOFILE= under systemd, "
                "nofile in /etc/security/limits.conf) or lower --count")
        soft = hard
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return int(soft)


class Fleet:
    """Complete agents sharing this process and its event loop; `async with`, or `start()` and `close()`."""

    def __init__(self, bundles: Sequence[Path], overrides: Sequence[str] = ()) -> None:
        self.bundles, self.overrides = list(bundles), list(overrides)
        self.agents: dict[str, Agent] = {}
        self._runs: dict[str, asyncio.Task[None]] = {}
        self._acked_at_start: dict[str, int] = {}
        self._slots: set[asyncio.Task[None]] = set()  # agents started and not yet connected

    async def __aenter__(self) -> Fleet:
        await self.start()
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    async def start(self, loaded: Sequence[tuple[AgentSettings, Policy | None]] | None = None) -> None:
        """Open every outbox (OPENING_AT_ONCE at a time), then start the agents, CONNECTING_AT_ONCE
        of them connecting at a time; return when the last one has started. Opening first and alone
        takes 4 s for 2,000 (beside agents already running, 26 s); all 2,000 starting at once stalled
        the loop for 7 s and most agents waited 15 s for the hub's first ack."""
        if loaded is None:
            loaded = load_fleet(self.bundles, self.overrides)
        gate = asyncio.Semaphore(OPENING_AT_ONCE)

        async def open_one(settings: AgentSettings, policy: Policy | None) -> None:
            async with gate:
                agent = await Agent.open(settings, policy)
            if agent.enrollment is not None:  # an image folder's device: its key made here, not in a helper
                agent.enrollment.make_request = make_request_in_process
            self.agents[agent.device] = agent
            self._acked_at_start[agent.device] = agent.outbox.acked

        try:
            async with asyncio.TaskGroup() as opening:
                for settings, policy in loaded:
                    opening.create_task(open_one(settings, policy))
        except BaseException as exc:
            await self.close()
            if isinstance(exc, BaseExceptionGroup) and (running := exc.subgroup(AlreadyRunning)):
                # Started since load_fleet looked: a configuration problem, as it would have been then.
                raise SimulateError(str(running.exceptions[0])) from None
            raise
        connecting = asyncio.Semaphore(CONNECTING_AT_ONCE)
        for device, agent in self.agents.items():
            await connecting.acquire()
            self._runs[device] = asyncio.create_task(agent.run(), name=f"agent {device}")
            slot = asyncio.create_task(self._connected(agent, connecting), name=f"slot {device}")
            self._slots.add(slot)
            slot.add_done_callback(self._slots.discard)

    @staticmethod
    async def _connected(agent: Agent, connecting: asyncio.Semaphore) -> None:
        """Hold a connecting slot until the agent is connected (or CONNECT_SLOT_S has passed)."""
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CONNECT_SLOT_S):
                    await agent.link.connected.wait()
        finally:
            connecting.release()

    def crashed(self) -> dict[str, BaseException]:
        """Agents whose run ended on an error (a run only ends when cancelled, otherwise)."""
        return {device: problem for device, run in self._runs.items()
                if run.done() and not run.cancelled() and (problem := run.exception()) is not None}

    def connected(self) -> list[str]:
        return [device for device, agent in self.agents.items() if agent.link.connected.is_set()]

    def tally(self) -> Tally:
        agents = self.agents.values()
        return Tally(
            agents=len(self.agents), connected=len(self.connected()), crashed=len(self.crashed()),
            queued=sum(a.outbox.backlog for a in agents),
            acked=sum(a.outbox.acked - self._acked_at_start[a.device] for a in agents))

    async def close(self) -> None:
        """Stop every agent as `edge-agent run` does on SIGTERM: leave cleanly (Last Will), cancel,
        commit what is buffered and close the outbox."""
        for slot in list(self._slots):
            slot.cancel()
        await asyncio.gather(*(self._leave(device) for device in self.agents), return_exceptions=True)
        # Decisions and actions the rule engines spawned outside the runs (none should be left).
        leftovers = [t for t in asyncio.all_tasks() if not t.done() and _of_an_agent(t)]
        for task in leftovers:
            task.cancel()
        await asyncio.gather(*leftovers, return_exceptions=True)
        await asyncio.gather(*(self._close(agent) for agent in self.agents.values()), return_exceptions=True)

    async def _leave(self, device: str) -> None:
        with contextlib.suppress(Exception):
            await self.agents[device].stop()
        run = self._runs.get(device)
        if run is not None:
            run.cancel()
            await asyncio.gather(run, return_exceptions=True)

    @staticmethod
    async def _close(agent: Agent) -> None:
        try:
            async with asyncio.timeout(STOP_TIMEOUT):
                await agent.close()
        except Exception:
            log.exception("%s: its outbox did not close cleanly", agent.device)


def _of_an_agent(task: asyncio.Task[object]) -> bool:
    code = getattr(task.get_coro(), "cr_code", None)
    where = code.co_filename if code is not None else ""
    return ("/edge_agent/" in where or "/edgefleet/" in where) and where != __file__


# --- the command ------------------------------------------------------------------------------


class LoopLag:
    """How late the event loop runs a timer: the price of running this many agents in one loop."""

    def __init__(self) -> None:
        self.worst = 0.0

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + LAG_PROBE_INTERVAL
            await asyncio.sleep(LAG_PROBE_INTERVAL)
            self.worst = max(self.worst, loop.time() - due)

    def take(self) -> float:
        worst, self.worst = self.worst, 0.0
        return worst


def settle_collector() -> None:
    """The agents' objects live as long as the process: keep the cyclic collector from walking them
    again and again. At 2,000 agents each full collection stalled the loop for 0.7 s; frozen, the
    default thresholds still spent 15 % of the loop collecting; frozen and with GC_THRESHOLDS, 1-3 %
    and pauses under 0.1 s. Sessions are made later (on connect) and stay collectable: a
    reconnect's old ones are cycles."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def summary(tally: Tally, elapsed: float, rate: float, lag: float) -> str:
    """One line: what an operator watching a load test wants to see."""
    me = psutil.Process()
    rss = me.memory_info().rss
    per_agent = f" ({rss / tally.agents / 1e6:.2f} MB/agent)" if tally.agents else ""
    crashed = f", {tally.crashed} CRASHED" if tally.crashed else ""
    return (f"simulate: {elapsed:.0f} s: connected {tally.connected}/{tally.agents}{crashed}; records acked "
            f"{tally.acked} ({rate:.0f}/s), queued {tally.queued}; loop lag max {lag * 1e3:.0f} ms; "
            f"rss {rss / 1e6:.0f} MB{per_agent}, {me.num_fds()} fds, {threading.active_count()} threads")


async def simulate(loaded: Sequence[tuple[AgentSettings, Policy | None]], *, duration: float | None,
                   every: float) -> int:
    """Run the fleet until SIGINT/SIGTERM or `duration`; a summary line every `every` seconds."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    for sig in previous:
        # Not loop.add_signal_handler: it learns of a signal through the loop's self-pipe, and 2,000
        # MQTT sessions calling call_soon_threadsafe keep that full (each 1-byte write takes ~768
        # bytes of socket buffer: ~280 pending fill it); a signal's byte was dropped and SIGTERM
        # went unheard. A Python handler runs on the main thread whatever the pipe holds.
        signal.signal(sig, lambda _signum, _frame: loop.call_soon_threadsafe(stop.set))
    began = time.monotonic()
    lag = LoopLag()
    probe = asyncio.create_task(lag.run(), name="loop lag")
    fleet = Fleet([settings.base for settings, _ in loaded])
    reported: set[str] = set()
    try:
        await fleet.start(loaded)
        settle_collector()
        print(f"simulate: {len(fleet.agents)} agents started in {time.monotonic() - began:.1f} s", flush=True)
        last_acked, last_at = 0, time.monotonic()
        while not stop.is_set():
            wait = every if duration is None else min(every, max(0.0, began + duration - time.monotonic()))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await stop.wait()
            for device, problem in fleet.crashed().items():
                if device not in reported:
                    reported.add(device)
                    log.error("agent %s stopped on an error", device, exc_info=problem)
            tally, now = fleet.tally(), time.monotonic()
            rate = (tally.acked - last_acked) / max(now - last_at, 1e-9)
            last_acked, last_at = tally.acked, now
            print(summary(tally, now - began, rate, lag.take()), flush=True)
            if duration is not None and now - began >= duration:
                break
    finally:
        probe.cancel()
        await fleet.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    tally = fleet.tally()
    print(f"simulate: stopped after {time.monotonic() - began:.0f} s; records acked {tally.acked}, left queued in "
          f"the outboxes {tally.queued} (sent on the next start); agents that crashed: {tally.crashed}", flush=True)
    return 1 if tally.crashed else 0


def main(bundles_dir: Path, count: int | None, overrides: Sequence[str], duration: float | None,
         every: float) -> int:
    """`edge-agent simulate`; raises SimulateError (exit 2) for what must be fixed before it can run."""
    bundles = find_bundles(bundles_dir, count)
    limit = raise_fd_limit(len(bundles))
    loaded = load_fleet(bundles, overrides)
    print(f"simulate: {len(loaded)} agents from {bundles_dir} (open files limit {limit})", flush=True)
    try:
        return asyncio.run(simulate(loaded, duration=duration, every=every))
    except KeyboardInterrupt:
        return 0
    finally:
        sys.stdout.flush()
