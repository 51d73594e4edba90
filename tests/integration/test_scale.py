"""Scale: 200 complete agents on one real hub, run by `edge-agent simulate` in one process.

Each agent is the daemon's own `Agent`, with its own bundle, outbox, certificate and mutual-TLS
connection to the hub's managed Mosquitto. They all connect and stream; the broker is killed
with -9 (the hub's supervisor restarts it) and every agent must reconnect on its own; the hub
must end up holding every reading exactly once (what is still in an outbox is counted as
waiting, not lost). What the test reads, it reads where an operator would: the simulate
command's summary lines, the hub's log and its database, the outboxes on disk.
"""

from __future__ import annotations

import asyncio
import os
import re
import resource
import signal
import sqlite3
import time
from collections.abc import Callable, Collection
from pathlib import Path

import pytest

from tests.support.exactly_once import account, hub_watermark, outbox_state
from tests.support.harness import AGENT, HubDir, Proc

pytestmark = pytest.mark.integration

DEVICES = 200
SIM_SETS = (
    "report.default_deadband=0",  # every reading goes up: the exactly-once check covers all of them
    "outbox.synchronous=normal",  # 200 outboxes on one CI disk; no agent crashes here, only the broker
    "uplink.ack_timeout=5",  # batches lost with the broker are resent within seconds
)
CONNECT_TIMEOUT = 60.0  # 200 outboxes opened and 200 TLS handshakes on a loaded 2-core machine
STREAM_TIMEOUT = 30.0  # each device's first batch committed and acknowledged
RECONNECT_TIMEOUT = 60.0  # the broker's restart, then 200 agents' capped, jittered backoff
STOP_TIMEOUT = 30.0  # 200 agents leave, commit what they buffered and close their outboxes
POLL = 0.5
CLI_TIMEOUT = 30.0  # the command refuses before it opens anything


def broker_pid(hub_dir: HubDir) -> int:
    return int((hub_dir.dir / "run" / "mosquitto.pid").read_text())


def online_since(hub_dir: HubDir, since: float) -> set[str]:
    """Devices the hub has online on a connection that came up after `since` (hub clock)."""
    db = sqlite3.connect(f"file:{hub_dir.dir / 'hub.db'}?mode=ro", uri=True, timeout=10)
    try:
        rows = db.execute("SELECT device FROM devices WHERE online = 1 AND connected_at > ?", (since,)).fetchall()
    finally:
        db.close()
    return {r[0] for r in rows}


async def until_none_missing(what: str, missing: Callable[[], Collection[str]], timeout: float) -> None:
    """Poll `missing()` (devices not there yet; no process announces these database states) until empty."""
    deadline = time.monotonic() + timeout
    while left := missing():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}; {len(left)} missing, e.g. {sorted(left)[:5]}")
        await asyncio.sleep(POLL)


@pytest.mark.timeout(240)
async def test_two_hundred_agents_stream_through_a_broker_kill_9_and_every_reading_arrives_once(
        hub_dir: HubDir, hub: Proc, bundles: Path) -> None:
    devices = [f"sim-{i:03d}" for i in range(DEVICES)]
    await hub_dir.provision(bundles, *devices)
    sets = [a for s in SIM_SETS for a in ("--set", s)]
    began = time.time()
    sim = await Proc("simulate", [AGENT, "simulate", "--bundles", str(bundles), "--count", str(DEVICES),
                                  "--every", "1", *sets]).start()
    try:
        await sim.wait_for(rf"connected {DEVICES}/{DEVICES};", timeout=CONNECT_TIMEOUT)
        await until_none_missing("every device online at the hub",
                                 lambda: set(devices) - online_since(hub_dir, began), CONNECT_TIMEOUT)
        await until_none_missing("every device's readings acknowledged by the hub",
                                 lambda: [d for d in devices if hub_watermark(hub_dir.dir, d) == 0], STREAM_TIMEOUT)

        at_kill = {d: hub_watermark(hub_dir.dir, d) for d in devices}
        pid, mark = broker_pid(hub_dir), hub.mark()
        killed_at = time.time()
        os.kill(pid, signal.SIGKILL)
        await hub.wait_for(r"mosquitto exited", after=mark)
        await hub.wait_for(r"hub ready", after=mark, timeout=RECONNECT_TIMEOUT)
        assert broker_pid(hub_dir) != pid, "the supervisor did not start a new broker"
        # A broker that dies sends no Last Will: a connection made after the kill is the proof.
        await until_none_missing("every device back on a new connection",
                                 lambda: set(devices) - online_since(hub_dir, killed_at), RECONNECT_TIMEOUT)
        await until_none_missing("every device streaming again past where it was at the kill",
                                 lambda: [d for d in devices if hub_watermark(hub_dir.dir, d) <= at_kill[d]],
                                 RECONNECT_TIMEOUT)
        # What the outboxes held by now (the outage's backlog with it) must all reach the hub.
        committed = {d: outbox_state(bundles / d).last_seq for d in devices}
        await until_none_missing("every device's backlog from the outage drained to the hub",
                                 lambda: [d for d in devices if hub_watermark(hub_dir.dir, d) < committed[d]],
                                 RECONNECT_TIMEOUT)
    finally:
        code = await sim.stop(timeout=STOP_TIMEOUT)
    assert code == 0, "\n".join(sim.lines[-20:])
    final = next((line for line in reversed(sim.lines) if line.startswith("simulate: stopped after")), "")
    assert re.search(r"agents that crashed: 0$", final), final

    books = {d: account(hub_dir.dir, bundles / d) for d in devices}
    lost = {d: b for d, b in books.items() if b.lost or b.duplicated or b.shed}
    assert not lost, f"{len(lost)} devices lost, duplicated or shed readings, e.g. {list(lost.items())[:3]}"
    behind = {d: b.at_hub for d, b in books.items() if b.at_hub < committed[d]}
    assert not behind, f"hub holds fewer records than drained: {list(behind.items())[:3]}"
    taken = sum(b.taken for b in books.values())
    at_hub = sum(b.at_hub for b in books.values())
    print(f"{DEVICES} agents in one process: {taken} records taken, {at_hub} at the hub exactly once, "
          f"{taken - at_hub} waiting in outboxes; broker killed and restarted")


# --- what an operator gets wrong ------------------------------------------------------------------


async def simulate_cli(*argv: str, nofile: int | None = None) -> tuple[int, str]:
    """`edge-agent simulate ...` for a few seconds at most; (exit code, stderr). `nofile` lowers its
    limit of open files (soft and hard) before it starts."""
    def limit() -> None:
        if nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    proc = await asyncio.create_subprocess_exec(
        AGENT, "simulate", *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, preexec_fn=limit)
    async with asyncio.timeout(CLI_TIMEOUT):
        _, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, err.decode()


def refused(code: int, err: str, *says: str) -> None:
    """Exit 2 (usage or configuration), and the message says each of `says`."""
    assert code == 2, err
    missing = [s for s in says if s not in err]
    assert not missing, f"the message lacks {missing}: {err}"


async def test_simulate_refuses_what_it_cannot_run_and_says_what_to_do(hub_dir: HubDir, bundles: Path) -> None:
    await hub_dir.provision(bundles, "op-1", "op-2")

    code, err = await simulate_cli("--bundles", str(bundles.parent / "nowhere"), "--duration", "1")
    refused(code, err, "no such directory", "edge-hub provision")
    code, err = await simulate_cli("--bundles", str(bundles), "--count", "3", "--duration", "1")
    refused(code, err, "holds only 2 bundles", "lower --count")
    code, err = await simulate_cli("--bundles", str(bundles), "--duration", "1", nofile=64)
    refused(code, err, "the hard limit is 64", "ulimit -Hn", "lower --count")

    # An outbox another process has open (here: this one, as `edge-agent run` would).
    state = bundles / "op-2" / "state"
    state.mkdir(mode=0o700)
    held = sqlite3.connect(state / "outbox.db")
    try:
        held.execute("PRAGMA journal_mode = WAL")
        held.execute("SELECT count(*) FROM sqlite_master").fetchall()
        code, err = await simulate_cli("--bundles", str(bundles), "--duration", "1")
    finally:
        held.close()
    refused(code, err, "bundle op-2", "open in another process", "stop it first")
