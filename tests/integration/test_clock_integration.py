"""Boards whose clock was not set: a real hub and Mosquitto with a normal clock, and agents
whose wall clock is wrong until the test sets it right.

In 1970 (real `edge-agent run` processes under libfaketime) the agent cannot even connect
(every certificate looks not yet valid), so it buffers. With fake-hwclock's clock (hours
behind but past the floor, unsynchronised) it connects and sends wrong stamps; that agent
runs in this process with its clocks given (libfaketime cannot make a synchronised host
kernel say "unsynchronised"). Either way the test sets the clock right, as NTP's step would,
and checks what the hub ends up with, reading by reading, against its own right clock.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sqlite3
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pytest

from edge_agent.agent import Agent
from edge_agent.buffer.outbox import Outbox
from edge_agent.config import load_settings
from edge_agent.identity.clock import FLOOR_TS, Probes, boot_time
from edge_agent.sense.sensors import SIM_MAX_CATCHUP_S
from tests.support.harness import AGENT, HUB, HubDir, Proc, run_cli

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("faketime") is None, reason="libfaketime (faketime) is not installed"),
]

T = TypeVar("T")
DEVICE = "clk-1"
RATE_HZ = 2.0
# The sim sensor stamps a sample at its tick (floor(now * rate) / rate): up to a tick early;
# a commit and a loaded machine add a little.
LATE_S = 1.0 / RATE_HZ + 0.5
# The sim sensor takes a step forward for a stall and produces the samples it thinks it missed,
# up to this far back on the new clock (synthetic samples; a real sensor reads only the present).
REPLAY_S = SIM_MAX_CATCHUP_S + 0.1
WAIT_S = 60.0  # bound on every wait for the fleet; a loaded 2-core machine is slow, not stuck
HWCLOCK_BEHIND_S = 3 * 3600.0  # the board was off for three hours
OVERRIDES = ("report.default_deadband=0", f"sim.rate_hz={RATE_HZ}", "sim.signals=2", "uplink.ack_timeout=2")


def libfaketime() -> str:
    """The preload library behind the `faketime` command (its path differs between distributions)."""
    for candidate in (Path("/usr/lib/x86_64-linux-gnu/faketime"), Path("/usr/lib/aarch64-linux-gnu/faketime"),
                      Path("/usr/lib/faketime"), Path("/usr/local/lib/faketime")):
        library = candidate / "libfaketime.so.1"
        if library.exists():
            return str(library)
    pytest.skip("libfaketime.so.1 not found beside the faketime command")


class FakeClock:
    """The agent's wall clock, shifted by the offset written in a file libfaketime re-reads on
    every call; boot time and the monotonic clock stay real, as on a board without an RTC."""

    def __init__(self, path: Path) -> None:
        self.path = path
        # Whole days back: January 1970, whatever today is.
        self.shift_s = (int(time.time()) // 86400 - 1) * 86400.0
        self.path.write_text(f"-{int(self.shift_s // 86400)}d\n")

    def env(self) -> dict[str, str]:
        return {"LD_PRELOAD": libfaketime(), "FAKETIME_TIMESTAMP_FILE": str(self.path), "FAKETIME_NO_CACHE": "1",
                "FAKETIME_DONT_FAKE_MONOTONIC": "1"}

    def set_right(self) -> None:
        """NTP answers: one step forward to the right time."""
        tmp = self.path.with_suffix(".new")
        tmp.write_text("+0\n")
        tmp.replace(self.path)


async def start(bundle: Path, env: dict[str, str] | None = None, name: str = "agent") -> Proc:
    sets = [a for o in OVERRIDES for a in ("--set", o)]
    argv = [AGENT, "run", "--config", str(bundle / "agent.toml"), "--log-level", "debug", *sets]
    return await Proc(name, argv, env=env).start()


async def poll(probe: Callable[[], Awaitable[T | None]], what: str, timeout: float = WAIT_S) -> T:
    deadline = time.monotonic() + timeout
    while True:
        found = await probe()
        if found is not None:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        await asyncio.sleep(0.5)


async def hub_json(hub_dir: HubDir, command: str, *args: str) -> list[dict[str, object]]:
    code, out, err = await run_cli(HUB, command, "--dir", str(hub_dir.dir), "--device", DEVICE, "--json", *args)
    assert code == 0, err
    return [json.loads(line) for line in out.splitlines()]


def outbox_meta(bundle: Path) -> dict[str, int]:
    db = sqlite3.connect(f"file:{bundle / 'state' / 'outbox.db'}?mode=ro", uri=True)
    try:
        return dict(db.execute("SELECT key, value FROM meta").fetchall())
    finally:
        db.close()


async def sampled(agent: Proc, commits: int) -> None:
    """Wait for `commits` more commits of readings in the agent's log."""
    mark = agent.mark()
    for _ in range(commits):
        await agent.wait_for(r"outbox: committing [1-9]\d* readings", timeout=WAIT_S, after=mark)
        mark = agent.mark()


async def everything_at_the_hub(hub_dir: HubDir, through: int) -> dict[int, dict[str, object]]:
    """Readings and events of the device by seq, once the hub holds every seq 1..through."""
    async def probe() -> dict[int, dict[str, object]] | None:
        rows = {int(str(r["seq"])): r for r in await hub_json(hub_dir, "telemetry")}
        rows.update({int(str(e["seq"])): e for e in await hub_json(hub_dir, "events")})
        return rows if set(range(1, through + 1)) <= set(rows) else None
    return await poll(probe, f"the hub holds every record of {DEVICE} through seq {through}")


def taken_within(readings: dict[int, float], windows: dict[str, tuple[list[int], float, float]]) -> None:
    """Each window (its readings' seqs, and since..until by the test's clock) holds readings, each
    stamped within LATE_S of that span."""
    for what, (seqs, since, until) in windows.items():
        assert seqs, f"no reading from {what}"
        wrong = {s: readings[s] for s in seqs if not since - LATE_S <= readings[s] <= until + LATE_S}
        assert not wrong, f"{what}: readings stamped outside {since:.1f}..{until:.1f}: {sorted(wrong.items())[:5]}"


async def test_readings_taken_in_1970_reach_the_hub_with_the_time_they_were_taken(
        hub_dir: HubDir, hub: Proc, bundles: Path, tmp_path: Path) -> None:
    """Started in 1970, restarted in the same boot still in 1970, then NTP steps the clock: every
    reading reaches the hub once, stamped within a tick of when it was really taken."""
    await hub_dir.provision(bundles, DEVICE)
    bundle = bundles / DEVICE
    clock = FakeClock(tmp_path / "faketime")

    started = time.time()
    agent = await start(bundle, clock.env())
    try:
        await agent.wait_for(r"system clock reads 1970", timeout=WAIT_S)
        await sampled(agent, 3)
    finally:
        assert await agent.stop() == 0
    stopped = time.time()
    first_run = outbox_meta(bundle)["last_seq"]
    assert first_run > 0

    restarted = time.time()
    agent = await start(bundle, clock.env(), name="agent-2")
    try:
        await sampled(agent, 3)
        mark = agent.mark()
        before_step = outbox_meta(bundle)["last_seq"]
        stepped = time.time()
        clock.set_right()
        await agent.wait_for(rf"{DEVICE} online", timeout=WAIT_S, after=mark)
        await sampled(agent, 2)
        taken = outbox_meta(bundle)["last_seq"]
        at_hub = await everything_at_the_hub(hub_dir, taken)
    finally:
        await agent.stop()
    ended = time.time()

    readings = {seq: float(str(r["ts"])) for seq, r in at_hub.items() if "metric" in r}
    windows = {  # when each reading was really taken, by the test's right clock
        "first run (1970)": ([s for s in readings if s <= first_run], started, stopped),
        "restart (1970)": ([s for s in readings if first_run < s <= before_step], restarted, stepped),
        "after the step": ([s for s in readings if before_step < s <= taken], stepped - REPLAY_S, ended),
    }
    taken_within(readings, windows)

    [event] = [r for r in at_hub.values() if r.get("kind") == "clock_corrected"]
    body = event["body"]
    assert isinstance(body, dict)
    assert body["first"] == 1
    assert before_step <= int(str(body["last"])) < int(str(event["seq"]))
    assert body["shift_s"] == pytest.approx(clock.shift_s, abs=1.0)
    assert body["clock_good"] is True
    assert int(str(body["sent_through"])) >= first_run  # the first run's records may have left: the hub moved them
    assert not any(r.get("clock_unknown") for r in at_hub.values())


async def test_readings_of_a_boot_that_never_got_its_clock_set_are_flagged_at_the_hub(
        hub_dir: HubDir, hub: Proc, bundles: Path, tmp_path: Path) -> None:
    """The board is switched off while still in 1970; after the next boot its readings cannot
    be placed in time any more: the hub keeps them flagged, with their 1970 stamps."""
    await hub_dir.provision(bundles, DEVICE)
    bundle = bundles / DEVICE
    clock = FakeClock(tmp_path / "faketime")
    agent = await start(bundle, clock.env())
    try:
        await sampled(agent, 3)
    finally:
        assert await agent.stop() == 0
    meta = outbox_meta(bundle)
    old_boot, last_1970 = meta["clock_boot"], meta["last_seq"]
    # A reboot: the kernel's boot id changes (and boot time starts again), the outbox stays.
    db = sqlite3.connect(bundle / "state" / "outbox.db")
    try:
        with db:
            db.execute("UPDATE meta SET value = ? WHERE key = 'clock_boot'", (old_boot ^ 1,))
    finally:
        db.close()

    agent = await start(bundle, name="agent-2")  # this boot, NTP answered in time
    try:
        await agent.wait_for(r"stamped in an earlier boot before its clock was set", timeout=WAIT_S)

        async def flagged() -> dict[str, object] | None:
            events = await hub_json(hub_dir, "events", "--kind", "clock_unknown")
            return events[0] if events else None
        event = await poll(flagged, "the clock_unknown event at the hub")
        at_hub = await everything_at_the_hub(hub_dir, int(str(event["seq"])) + 2)
    finally:
        await agent.stop()
    body = event["body"]
    assert isinstance(body, dict)
    assert (body["first"], body["last"]) == (1, last_1970)
    readings = {seq: r for seq, r in at_hub.items() if "metric" in r}
    old = {s: r for s, r in readings.items() if s <= last_1970}
    assert old
    assert all(r["clock_unknown"] is True and float(str(r["ts"])) < FLOOR_TS for r in old.values())
    new = [r for s, r in readings.items() if s > last_1970]
    assert new
    assert all(r["clock_unknown"] is False and float(str(r["ts"])) > FLOOR_TS for r in new)
    code, out, _ = await run_cli(HUB, "telemetry", "--dir", str(hub_dir.dir), "--device", DEVICE, "--limit", "1")
    assert code == 0
    assert out.rstrip().endswith("(clock unknown)")


class FakeHwclock:
    """A board restored to its last shutdown time: behind, past the floor, not synchronised."""

    def __init__(self, behind_s: float) -> None:
        self.behind_s = behind_s

    def probes(self) -> Probes:
        return Probes(realtime=lambda: time.time() - self.behind_s, boottime=boot_time,
                      synchronised=lambda: False, boot_id=lambda: 0x5EED)


async def test_readings_sent_with_a_fake_hwclock_time_are_moved_at_the_hub_when_ntp_steps(
        hub_dir: HubDir, hub: Proc, bundles: Path) -> None:
    await hub_dir.provision(bundles, DEVICE)
    board = FakeHwclock(behind_s=HWCLOCK_BEHIND_S)
    settings = load_settings(bundles / DEVICE / "agent.toml", OVERRIDES)
    outbox = await Outbox.open(settings.state_dir, settings.quota_bytes, probes=board.probes())
    agent = Agent(settings, outbox, settings.load_policy())
    started = time.time()
    run = asyncio.create_task(agent.run(), name="agent")
    try:
        async def stored_old() -> int | None:
            rows = await hub_json(hub_dir, "telemetry")
            return len(rows) if len(rows) >= 6 else None
        at_hub_before = await poll(stored_old, "readings with the fake-hwclock time at the hub")
        stepped = time.time()
        board.behind_s = 0.0  # NTP steps the clock
        async def corrected() -> dict[str, object] | None:
            events = await hub_json(hub_dir, "events", "--kind", "clock_corrected")
            return events[0] if events else None
        event = await poll(corrected, "the clock_corrected event at the hub")
        at_hub = await everything_at_the_hub(hub_dir, int(str(event["seq"])) + 2)
    finally:
        await agent.stop()
        run.cancel()
        await asyncio.gather(run, return_exceptions=True)
        await agent.close()
    ended = time.time()
    body = event["body"]
    assert isinstance(body, dict)
    assert body["shift_s"] == pytest.approx(HWCLOCK_BEHIND_S, abs=0.01)
    assert int(str(body["sent_through"])) >= at_hub_before  # those reached the hub with the old stamps
    readings = {seq: float(str(r["ts"])) for seq, r in at_hub.items() if "metric" in r}
    boundary = int(str(event["seq"]))
    windows = {  # when each reading was really taken, by the test's right clock
        "before the step": ([s for s in readings if s < boundary], started, stepped),
        "after the step": ([s for s in readings if s > boundary], stepped - REPLAY_S, ended),
    }
    taken_within(readings, windows)
