"""One identity, one process: a second agent on a state directory, a second hub on a directory,
and an agent configured as a device its certificate is not — real processes, a real Mosquitto.

"Nothing happened to the running one" is proved by a bounded quiet wait (QUIET) on its log after
the intruder has come and gone: the broker closes a session taken over by the same client id at
once, and the running one logs the loss and its retry at once.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import re
import shutil
import signal
import sqlite3
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from edgefleet.errors import AlreadyRunning
from edgefleet.runtime.runlock import RunLock
from hub.db.identities import REGION_STRIDE
from tests.support.exactly_once import QUIET as SETTLING
from tests.support.exactly_once import OutboxState, outbox_state
from tests.support.harness import AGENT, HUB, HubDir, Proc, run_cli, start_agent

pytestmark = pytest.mark.integration

QUIET = 3.0  # how long the running process is watched for a lost session, after the intruder left
REFUSAL = 20.0  # bound on a refused start (the interpreter's imports on a loaded machine)


async def quiet(proc: Proc, pattern: str, after: int) -> None:
    """Assert that no line matching `pattern` appears (from line `after` on) within QUIET."""
    try:
        line = await proc.wait_for(pattern, timeout=QUIET, after=after)
    except AssertionError:
        return
    pytest.fail(f"{proc.name}: {line}")


def finding(out: str, name: str) -> str:
    return next(line for line in out.splitlines() if line[6:].startswith(f"{name}: "))


# --- the lock itself --------------------------------------------------------------------------


def test_the_lock_names_its_holder_and_is_free_again_once_released(tmp_path: Path) -> None:
    path = tmp_path / "state" / "agent.lock"
    assert RunLock.holder(path) is None
    held = RunLock.acquire(path, "edge-agent", tmp_path / "state")
    assert RunLock.holder(path) == os.getpid()
    with pytest.raises(AlreadyRunning) as refused:  # flock: a second open file conflicts, also in one process
        RunLock.acquire(path, "edge-agent", tmp_path / "state")
    assert str(refused.value) == f"another edge-agent (pid {os.getpid()}) is running on {tmp_path / 'state'}; " \
                                 "stop it first"
    held.release()
    assert RunLock.holder(path) is None
    RunLock.acquire(path, "edge-agent", tmp_path / "state").release()


# --- item 8: two agents on one state directory ----------------------------------------------


async def test_a_second_agent_on_one_state_dir_refuses_and_check_leaves_the_session_alone(
        hub_dir: HubDir, hub: Proc, bundles: Path) -> None:
    await hub_dir.provision(bundles, "dev-twice")
    config = bundles / "dev-twice" / "agent.toml"
    state = bundles / "dev-twice" / "state"
    first = await start_agent(config, "sim.rate_hz=20", name="first")
    try:
        await first.wait_for(r"dev-twice online")
        mark = first.mark()
        code, out, err = await run_cli(AGENT, "run", "--config", str(config), timeout=REFUSAL)
        assert code == 2, out + err
        assert err.splitlines() == [f"edge-agent: another edge-agent (pid {first.pid}) is running on {state}; "
                                    "stop it first"]
        # `check` says the agent runs and does not connect as the device beside it.
        code, out, err = await run_cli(AGENT, "check", "--config", str(config), timeout=REFUSAL)
        assert code == 0, out + err
        broker = finding(out, "broker")
        assert broker.startswith("ok    broker: not tried: edge-agent (pid "), out
        assert f"(pid {first.pid}) is running on {state}" in broker
        assert "network" in out  # the TCP probe is still made
        await quiet(first, r"retrying in|connected|Traceback|UNIQUE", mark)
        assert first.proc is not None
        assert first.proc.returncode is None
    finally:
        assert await first.stop() == 0
    # Stopped: `check` probes the broker again.
    code, out, err = await run_cli(AGENT, "check", "--config", str(config), timeout=REFUSAL)
    assert code == 0, out + err
    assert finding(out, "broker").startswith("ok    broker: connected to"), out


async def test_after_kill_9_the_next_agent_starts(hub_dir: HubDir, hub: Proc, bundles: Path) -> None:
    """The kernel drops the lock with the process: no stale lock file ever blocks a start."""
    await hub_dir.provision(bundles, "dev-k9")
    config = bundles / "dev-k9" / "agent.toml"
    first = await start_agent(config, name="first")
    await first.wait_for(r"dev-k9 online")
    first.signal(signal.SIGKILL)
    assert await first.stop() == -signal.SIGKILL
    assert (bundles / "dev-k9" / "state" / "agent.lock").read_text().strip() == str(first.pid)
    second = await start_agent(config, name="second")
    try:
        await second.wait_for(r"dev-k9 online")
    finally:
        assert await second.stop() == 0


# --- item 9: two hubs on one directory -------------------------------------------------------


async def test_a_second_hub_on_one_directory_refuses_and_leaves_the_broker_alone(
        hub_dir: HubDir, hub: Proc, bundles: Path) -> None:
    await hub_dir.provision(bundles, "dev-h")
    broker_pid = int((hub_dir.dir / "run" / "mosquitto.pid").read_text())
    agent = await start_agent(bundles / "dev-h" / "agent.toml", name="agent")
    try:
        await agent.wait_for(r"dev-h online")
        hub_mark, agent_mark = hub.mark(), agent.mark()
        code, out, err = await run_cli(HUB, "run", "--dir", str(hub_dir.dir), timeout=REFUSAL)
        assert code == 2, out + err
        assert err.splitlines()[-1] == (f"edge-hub: another edge-hub run (pid {hub.pid}) is running on "
                                        f"{hub_dir.dir}; stop it first")
        assert "mosquitto" not in err
        await quiet(hub, r"stopping the managed mosquitto|mosquitto exited|hub ready|retrying in", hub_mark)
        await quiet(agent, r"retrying in|connected", agent_mark)
        assert psutil.pid_exists(broker_pid)
        assert int((hub_dir.dir / "run" / "mosquitto.pid").read_text()) == broker_pid
    finally:
        assert await agent.stop() == 0


async def test_a_hub_killed_with_9_leaves_no_lock_behind(hub_dir: HubDir) -> None:
    first = await Proc("hub", [HUB, "-v", "run", "--dir", str(hub_dir.dir)]).start()
    try:
        await first.wait_for(r"hub ready")
    finally:
        first.signal(signal.SIGKILL)
        await first.stop()
    second = await Proc("hub2", [HUB, "-v", "run", "--dir", str(hub_dir.dir)]).start()
    try:
        await second.wait_for(r"hub ready")  # after stopping the broker the first one left running
        assert any("left by a previous hub run" in line for line in second.lines)
    finally:
        assert await second.stop() == 0


# --- item 11: a device_id that is not the certificate's, a key others can read ---------------


async def test_run_refuses_a_device_id_that_is_not_its_certificates_with_checks_sentences(
        hub_dir: HubDir, hub: Proc, bundles: Path) -> None:
    await hub_dir.provision(bundles, "dev-real", "dev-other")
    real = await start_agent(bundles / "dev-real" / "agent.toml", name="real")
    try:
        await real.wait_for(r"dev-real online")
        mark = real.mark()
        # dev-other's bundle, told it is dev-real: it would be refused every publish and,
        # the broker forcing the client id to the CN, keep kicking dev-other... or with
        # dev-real's own bundle copied in, dev-real itself.
        config = bundles / "dev-other" / "agent.toml"
        key = bundles / "dev-other" / "device.key"
        key.chmod(0o640)
        wrong = ("--set", "device_id=dev-real")
        code, out, err = await run_cli(AGENT, "check", "--config", str(config), *wrong, timeout=REFUSAL)
        assert code == 1, out + err
        sentences = [finding(out, name)[len(f"FAIL  {name}: "):] for name in ("identity", "key permissions")]
        code, out, err = await run_cli(AGENT, "run", "--config", str(config), *wrong, timeout=REFUSAL)
        assert code == 2, out + err
        lines = err.splitlines()
        assert lines[:2] == [f"edge-agent: {s}" for s in sentences], err
        assert "'dev-other' but device_id is 'dev-real'" in lines[0]
        assert f"chmod 600 {key}" in lines[1]
        assert len(lines) == 2, err
        # simulate refuses it too, naming the bundle.
        code, out, err = await run_cli(AGENT, "simulate", "--bundles", str(bundles), "--duration", "5", *wrong,
                                       timeout=REFUSAL)
        assert code == 2, out + err
        assert "bundle dev-other: the certificate is for 'dev-other' but device_id is 'dev-real'" in err
        # Only the key mode left: still refused, with that one sentence.
        code, out, err = await run_cli(AGENT, "run", "--config", str(config), timeout=REFUSAL)
        assert code == 2, out + err
        assert err.splitlines() == [f"edge-agent: {sentences[1]}"]
        await quiet(real, r"retrying in|connected", mark)
    finally:
        assert await real.stop() == 0
    key.chmod(0o600)
    other = await start_agent(config, name="other")
    try:
        await other.wait_for(r"dev-other online")
    finally:
        assert await other.stop() == 0


async def test_simulate_refuses_a_bundle_whose_agent_runs(hub_dir: HubDir, hub: Proc, bundles: Path) -> None:
    await hub_dir.provision(bundles, "sim-a", "sim-b")
    running = await start_agent(bundles / "sim-b" / "agent.toml", name="sim-b")
    try:
        await running.wait_for(r"sim-b online")
        code, out, err = await run_cli(AGENT, "simulate", "--bundles", str(bundles), "--duration", "5",
                                       timeout=REFUSAL)
        assert code == 2, out + err
        assert (f"bundle sim-b: another edge-agent (pid {running.pid}) is running on "
                f"{bundles / 'sim-b' / 'state'}; stop it first") in err
    finally:
        assert await running.stop() == 0


# --- item 10: one certificate on two boards (a cloned SD card) --------------------------------

RATE_HZ = 10  # sim ticks a second: every tick is at k / RATE_HZ on both boards
TOGETHER = 8  # seconds of b's readings acknowledged while both boards stream


async def drained(bundle: Path, beyond: int = 0, timeout: float = 90.0) -> OutboxState:
    """Until the running agent's outbox holds nothing the hub has not acknowledged (its own acks:
    a renumbered clone's watermark is not the device's), and has numbered past `beyond`."""
    def done() -> bool:
        state = outbox_state(bundle)
        return state.last_seq > beyond and state.acked >= state.last_seq and state.rows == 0

    await until(done, f"{bundle} drained", timeout)
    return outbox_state(bundle)


async def until(predicate: Callable[[], bool], what: str, timeout: float) -> None:
    """Poll the files (no process announces it), bounded by `timeout`."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        await asyncio.sleep(0.2)


async def settle(bundle: Path, *sets: str, name: str) -> None:
    """Run the board once more, alone, quietly (one reading at start), until everything it holds is
    acknowledged."""
    before = outbox_state(bundle).last_seq
    agent = await start_agent(bundle / "agent.toml", *sets, *SETTLING[:1], name=name)
    try:
        await agent.wait_for(r"online")
        await drained(bundle, beyond=before)
    finally:
        assert await agent.stop() == 0


def readings(hub_dir: HubDir, device: str) -> dict[str, collections.Counter[float]]:
    """How many readings the hub holds per metric and tick."""
    db = sqlite3.connect(f"file:{hub_dir.dir / 'hub.db'}?mode=ro", uri=True, timeout=10)
    try:
        rows = db.execute("SELECT metric, ts FROM telemetry WHERE device = ?", (device,)).fetchall()
    finally:
        db.close()
    found: dict[str, collections.Counter[float]] = collections.defaultdict(collections.Counter)
    for metric, ts in rows:
        found[metric][ts] += 1
    return found


def ticks(first: float, last: float) -> list[float]:
    return [k / RATE_HZ for k in range(round(first * RATE_HZ), round(last * RATE_HZ) + 1)]


async def test_a_cloned_image_is_reported_and_every_reading_of_both_boards_is_kept(
        hub_dir: HubDir, hub: Proc, bundles: Path, workdir: Path) -> None:
    """Board a runs; its SD card is imaged (outbox and all) onto board b; both run at once with one
    certificate. b streams one more signal (sig1) than a, so each board's readings can be told apart:
    sig1 is b's alone, and sig0 must be at the hub twice for every tick both boards sampled."""
    await hub_dir.provision(bundles, "dev-clone")
    board_a = bundles / "dev-clone"
    common = (f"sim.rate_hz={RATE_HZ}", "report.default_deadband=0")
    as_a, as_b = (*common, "state.machine=board-a", "sim.signals=1"), (*common, "state.machine=board-b",
                                                                         "sim.signals=2")
    first = await start_agent(board_a / "agent.toml", *as_a, name="a")
    try:
        await first.wait_for(r"dev-clone online")
        await drained(board_a)
    finally:
        assert await first.stop() == 0
    cloned_at = time.time()
    board_b = workdir / "board-b" / "dev-clone"
    shutil.copytree(board_a, board_b)  # the image: certificate, key, agent.toml, state/outbox.db
    a = await start_agent(board_a / "agent.toml", *as_a, name="a")
    try:
        await a.wait_for(r"dev-clone online")
        b = await start_agent(board_b / "agent.toml", *as_b, name="b")
        try:
            await b.wait_for(r"was made on another machine \(a cloned image\?\)")
            await b.wait_for(r"the hub refused our sequence numbers above \d+", timeout=60)
            # Both sample all along (what they sampled is checked below) until the hub has
            # acknowledged TOGETHER seconds of b's readings under its new numbers.
            await until(lambda: outbox_state(board_b).acked > REGION_STRIDE + TOGETHER * RATE_HZ * 2,
                        "b's renumbered readings acknowledged", timeout=90)
        finally:
            assert await b.stop() == 0
        b_stopped = time.time()
        await drained(board_a)
    finally:
        assert await a.stop() == 0
    await settle(board_b, *as_b, name="b-settle")
    await settle(board_a, *as_a, name="a-settle")

    found = readings(hub_dir, "dev-clone")
    sig0, sig1 = found["sig0"], found["sig1"]
    assert sum(sig1.values()) == len(sig1), "a reading of b stored twice"
    assert max(sig0.values()) <= 2, "a tick stored more than once per board"
    assert all(sig0[t] == 1 for t in sig0 if t < cloned_at), "a reading taken before the clone stored twice"
    b_ticks = sorted(t for t in sig1 if cloned_at < t <= b_stopped)  # not its settling run's
    assert len(b_ticks) >= TOGETHER * RATE_HZ, f"only {len(b_ticks)} of b's readings at the hub"
    assert b_ticks == ticks(b_ticks[0], b_ticks[-1]), "b's readings have gaps at the hub"
    assert len(sig1) == len(b_ticks) + 1, "b's reading of its settling run is missing"
    print(f"b's readings during the clone's run: {len(b_ticks)}; at the hub: sig0 {sum(sig0.values())}, "
          f"sig1 {sum(sig1.values())}; session takeovers seen by a: "
          f"{sum('retrying in' in line for line in a.lines)}, by b: {sum('retrying in' in line for line in b.lines)}")
    # a sampled through all of b's run: every tick of it is at the hub from both boards.
    assert [sig0[t] for t in b_ticks] == [2] * len(b_ticks), "a reading of one board lost or taken for the other's"

    # The hub says so: an event, the status's list of what needs a person, the metrics.
    code, out, err = await run_cli(HUB, "events", "--dir", str(hub_dir.dir), "--kind", "identity_conflict", "--json")
    assert code == 0, err
    events = [json.loads(line) for line in out.splitlines()]
    assert events, out
    assert all(e["body"]["device"] == "dev-clone" for e in events), out
    code, out, err = await run_cli(HUB, "status", "--dir", str(hub_dir.dir), "--json")
    assert code == 0, err
    clones = json.loads(out)["identity_conflicts"]
    assert [c["device"] for c in clones] == ["dev-clone"], clones
    assert clones[0]["instances"] == 2
    code, out, err = await run_cli(HUB, "status", "--dir", str(hub_dir.dir))
    assert "dev-clone  2 machines use its certificate" in out, out
    metrics = await asyncio.to_thread(
        lambda: urllib.request.urlopen(f"http://127.0.0.1:{hub_dir.metrics_port}/metrics", timeout=10).read().decode())
    assert re.search(r'edgefleet_device_identity_conflicts_total\{[^}]*device="dev-clone"[^}]*\} [1-9]', metrics), \
        metrics
    assert re.search(r'edgefleet_ingest_rejects_total\{[^}]*reason="identity_conflict"[^}]*\} [1-9]', metrics)


async def test_a_wiped_state_dir_on_the_same_board_loses_nothing_and_is_no_clone(
        hub_dir: HubDir, hub: Proc, bundles: Path) -> None:
    """The operator deletes the state directory (outbox, reservation and all): the new outbox
    numbers from 1 again, numbers the hub already holds. Before, the hub took them for
    duplicates and they were lost; now they are renumbered, and no clone is reported."""
    await hub_dir.provision(bundles, "dev-wiped")
    board = bundles / "dev-wiped"
    sets = (f"sim.rate_hz={RATE_HZ}", "report.default_deadband=0", "sim.signals=1", "state.machine=board-a")
    agent = await start_agent(board / "agent.toml", *sets, name="before")
    try:
        await agent.wait_for(r"dev-wiped online")
        await until(lambda: outbox_state(board).acked > 5 * RATE_HZ, "five seconds of readings acknowledged", 60)
        await drained(board)
    finally:
        assert await agent.stop() == 0
    shutil.rmtree(board / "state")
    wiped_at = time.time()
    agent = await start_agent(board / "agent.toml", *sets, name="after")
    try:
        await agent.wait_for(r"the hub refused our sequence numbers above 0 \(this board numbered", timeout=60)
        await until(lambda: outbox_state(board).acked > REGION_STRIDE + 2 * RATE_HZ, "renumbered ones acked", 60)
    finally:
        assert await agent.stop() == 0
    stopped_at = time.time()
    await settle(board, *sets, name="settle")
    sig0 = readings(hub_dir, "dev-wiped")["sig0"]
    assert max(sig0.values()) == 1
    after = sorted(t for t in sig0 if wiped_at < t <= stopped_at)
    assert len(after) >= 2 * RATE_HZ
    assert after == ticks(after[0], after[-1]), "readings after the wipe were lost"
    code, out, err = await run_cli(HUB, "events", "--dir", str(hub_dir.dir), "--kind", "identity_conflict", "--json")
    assert (code, out) == (0, ""), out + err
    code, out, err = await run_cli(HUB, "status", "--dir", str(hub_dir.dir), "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["identity_conflicts"] == []
    assert report["rejects"].get("outbox_reset", 0) >= 1
