"""P2: a 1,000,000-reading backlog drained end to end, against a per-device Mosquitto bridge.

    .venv/bin/python bench/p2_drain.py [--readings N] [--skip-baseline] [--baseline-messages N]
                                       [--agent-set KEY=VALUE ...]

1. `edge-hub init` and `edge-hub provision --profile sim` make a hub and one device bundle.
2. The backlog: N sim-profile readings (SimSensor, 4 signals at 10 Hz, timestamps in the
   past) written straight into the bundle's outbox with the Outbox API, with the quota and
   `synchronous` the agent itself will use (read from the bundle by load_settings).
3. `edge-hub run` (managed Mosquitto, mutual TLS) is started and ready; then the clock starts
   and `edge-agent run` is started for the device with its bundle as provisioned (so its sim
   sensor keeps sampling while it drains, as a real device would).
4. The clock stops at the first poll (every POLL_S) at which the hub's ingest watermark is
   >= L, the backlog's last sequence number, and the outbox holds no record with seq <= L
   (acknowledged end to end and deleted). Agent start-up (interpreter, integrity check of
   the outbox, TLS) is inside the time.
5. Exactly-once: the agent is paused (SIGSTOP) at a moment when everything it committed is
   acknowledged, and tests/support/exactly_once.assert_exactly_once checks the hub holds every seq
   1..last_seq once (none shed).
6. Baseline, same run: bench/bridge_baseline.run_bridge_baseline with the same number of
   messages, PAYLOAD bytes each (one reading per MQTT message, QoS 1): a backlog on an edge
   Mosquitto bridged over mutual TLS to a central one, drained into a subscriber.

Prints the figures, the ratio, PASS/MISS against the target (docs/performance.md), and a final JSON line.
Always exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import psutil

ROOT: Final = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.bridge_baseline import Child, run_bridge_baseline  # noqa: E402  # one process wrapper for both
from edge_agent.buffer.outbox import COMMIT_ROWS, DB_NAME, Outbox  # noqa: E402
from edge_agent.config import AgentSettings, load_settings  # noqa: E402 - after the path fix above
from edge_agent.sense.sensors import SimSensor, device_seed  # noqa: E402
from edgefleet.policy.profiles import SimSpec  # noqa: E402
from tests.support.exactly_once import assert_exactly_once, hub_watermark, outbox_state  # noqa: E402
from tests.support.net import free_port  # noqa: E402

BIN: Final = Path(sys.executable).parent  # the venv's bin: edge-hub and edge-agent live beside python
HUB: Final = str(BIN / "edge-hub")
AGENT: Final = str(BIN / "edge-agent")
TARGET_S: Final = 20.0  # P2 (docs/performance.md)
SPEC_READINGS: Final = 1_000_000  # the backlog the target is stated for
PAYLOAD: Final = 100  # bytes per baseline message: ~ one reading as JSON with its metadata
BACKLOG_RATE_HZ: Final = 10.0  # the backlog's sampling rate (ts spacing); any rate drains the same
START_TIMEOUT: Final = 30.0  # hub + broker start on a loaded 2-core machine
POLL_S: Final = 0.05  # drain-detection resolution; each poll is one indexed lookup per database
RSS_EVERY_S: Final = 0.5
SETTLE_TIMEOUT: Final = 30.0  # for the exactly-once pause: live readings must be acknowledged too
MB: Final = 1024 * 1024
DEVICE: Final = "bench-01"


async def run_cli(*argv: str, within: float = 120.0) -> str:
    proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    async with asyncio.timeout(within):
        out, err = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {proc.returncode}:\n{err.decode(errors='replace')}")
    return out.decode()


@dataclass
class Fleet:
    """A hub directory and its device bundles."""

    hub_dir: Path
    bundles: Path
    port: int
    devices: list[str] = field(default_factory=list)

    def config(self, device: str) -> Path:
        return self.bundles / device / "agent.toml"

    def hub_argv(self) -> list[str]:
        return [HUB, "run", "--dir", str(self.hub_dir)]

    def agent_argv(self, device: str, *overrides: str) -> list[str]:
        return [AGENT, "run", "--config", str(self.config(device)), *(a for o in overrides for a in ("--set", o))]


def make_workdir(prefix: str, parent: Path | None = None) -> Path:
    """A temp dir the broker's account ('mosquitto', when we are root) can traverse; inside
    `parent` (made if need be: a bench's --keep DIR) when given."""
    if parent is not None:
        parent.mkdir(parents=True, exist_ok=True)
        parent = parent.resolve()
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    path.chmod(0o711)
    return path


async def make_fleet(work: Path, devices: list[str], region: str = "bench") -> Fleet:
    fleet = Fleet(work / "hub", work / "bundles", free_port(), devices)
    await run_cli(HUB, "init", "--dir", str(fleet.hub_dir), "--region", region,
                  "--port", str(fleet.port), "--host", "127.0.0.1")
    fleet.bundles.mkdir(mode=0o700)
    await run_cli(HUB, "provision", "--dir", str(fleet.hub_dir), "--out", str(fleet.bundles),
                  "--profile", "sim", *devices)
    return fleet


async def build_backlog(settings: AgentSettings, readings: int) -> dict[str, Any]:
    """Write `readings` sim readings into the device's outbox, as its agent would have buffered them."""
    spec = SimSpec(signals=settings.profile.sim.signals, rate_hz=BACKLOG_RATE_HZ)
    span = 600.0  # simulated seconds per read: 24,000 readings per add() at 4 signals x 10 Hz
    sensor = SimSensor(spec, device_seed(settings.config.device_id), interval=span)
    now = time.time() - readings / (spec.signals * spec.rate_hz)  # the backlog ends about now
    outbox = await Outbox.open(settings.state_dir, settings.quota_bytes, settings.config.outbox.synchronous)
    started = time.perf_counter()
    try:
        added = 0
        while added < readings:
            batch = sensor.read(now)[: readings - added]
            now += span
            outbox.add(batch)
            added += len(batch)
            if outbox.backlog - outbox.rows >= COMMIT_ROWS:
                await outbox.flush()
        await outbox.flush()
        elapsed = time.perf_counter() - started
        state = {"last_seq": outbox.last_seq, "rows": outbox.rows, "dropped": outbox.dropped,
                 "bytes": await outbox.used_bytes()}
    finally:
        await outbox.close()
    if state["dropped"] or state["rows"] != readings:
        raise RuntimeError(f"backlog not intact: {state} (quota {settings.quota_bytes / 1e6:.0f} MB)")
    state["build_s"] = round(elapsed, 3)
    state["file_mb"] = round((settings.state_dir / DB_NAME).stat().st_size / 1e6, 1)
    return state


class Watch:
    """Read-only views of the two databases, cheap enough to poll every POLL_S."""

    def __init__(self, hub_dir: Path, bundle: Path) -> None:
        self._hub_db = hub_dir / "hub.db"
        self._outbox_db = bundle / "state" / DB_NAME
        self._hub: sqlite3.Connection | None = None
        self._outbox: sqlite3.Connection | None = None

    @staticmethod
    def _open(path: Path) -> sqlite3.Connection:
        return sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10, isolation_level=None)

    def watermark(self, device: str) -> int:
        if self._hub is None:
            if not self._hub_db.exists():
                return 0
            self._hub = self._open(self._hub_db)
        try:
            row = self._hub.execute("SELECT acked_through FROM ingest WHERE device = ?", (device,)).fetchone()
        except sqlite3.OperationalError:  # the table appears with the hub's first ingest commit
            return 0
        return int(row[0]) if row else 0

    def remaining_through(self, last: int) -> int:
        """Records with seq <= last still in the outbox (not yet acknowledged and deleted)."""
        if self._outbox is None:
            self._outbox = self._open(self._outbox_db)
        return int(self._outbox.execute("SELECT count(*) FROM records WHERE seq <= ?", (last,)).fetchone()[0])

    def close(self) -> None:
        for db in (self._hub, self._outbox):
            if db is not None:
                db.close()


def tree_cpu(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) of a process and each of its children, by name."""
    out: dict[str, float] = {}
    with contextlib.suppress(psutil.Error):
        root = psutil.Process(pid)
        for p in [root, *root.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                t = p.cpu_times()
                name = "mosquitto" if "mosquitto" in p.name() else p.name()
                out[name] = round(out.get(name, 0.0) + t.user + t.system, 2)
    return out


async def sample_rss(pid: int, peak: list[float]) -> None:
    proc = psutil.Process(pid)
    while True:
        with contextlib.suppress(psutil.Error):
            peak[0] = max(peak[0], proc.memory_info().rss / MB)
        await asyncio.sleep(RSS_EVERY_S)


async def settle_and_check(fleet: Fleet, device: str, agent: Child) -> dict[str, Any]:
    """Pause the agent when all it committed is acknowledged; check exactly-once from the files."""
    bundle = fleet.bundles / device
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while True:
        agent.signal(signal.SIGSTOP)  # nothing commits while stopped: the files hold still
        try:
            state = outbox_state(bundle)
            mark = hub_watermark(fleet.hub_dir, device)
            if state.acked >= state.last_seq and mark >= state.last_seq:
                try:
                    assert_exactly_once(fleet.hub_dir, device, state.last_seq, state.dropped)
                except AssertionError as exc:
                    return {"exactly_once": False, "exactly_once_detail": str(exc), "last_seq": state.last_seq}
                return {"exactly_once": True, "last_seq": state.last_seq, "dropped": state.dropped,
                        "outbox_rows_left": state.rows}
        finally:
            agent.signal(signal.SIGCONT)
        if time.monotonic() > deadline:
            return {"exactly_once": None, "exactly_once_detail": f"never settled: outbox {state}, hub {mark}"}
        await asyncio.sleep(0.2)


async def run_drain(work: Path, readings: int, limit_s: float, overrides: tuple[str, ...] = (),
                    prepare: Callable[[Fleet], None] | None = None) -> dict[str, Any]:
    """The drain; `prepare(fleet)` may change the hub's directory before the hub starts (bench/p10_retention.py)."""
    fleet = await make_fleet(work, [DEVICE])
    if prepare is not None:
        prepare(fleet)
    settings = load_settings(fleet.config(DEVICE), overrides)
    backlog = await build_backlog(settings, readings)
    last = backlog["last_seq"]
    print(f"backlog: {readings:,} readings in {settings.state_dir / DB_NAME} ({backlog['file_mb']} MB, "
          f"quota {settings.quota_bytes / 1e6:.0f} MB, synchronous={settings.config.outbox.synchronous}), "
          f"written in {backlog['build_s']} s; last seq {last:,}")
    figures: dict[str, Any] = {"readings": readings, "agent_overrides": list(overrides), "backlog": backlog}
    hub = await Child("hub", fleet.hub_argv()).start(merge=True)
    agent: Child | None = None
    watch = Watch(fleet.hub_dir, fleet.bundles / DEVICE)
    peak = [0.0]
    sampler: asyncio.Task[None] | None = None
    try:
        await hub.wait_for(r"hub ready", within=START_TIMEOUT)
        load_before = os.getloadavg()[0]
        started = time.monotonic()
        agent = await Child("agent", fleet.agent_argv(DEVICE, *overrides)).start(merge=True)
        sampler = asyncio.create_task(sample_rss(agent.pid, peak))
        at_watermark: float | None = None
        drained: float | None = None
        mark = 0
        while time.monotonic() - started < limit_s:
            mark = watch.watermark(DEVICE)
            if mark >= last:
                at_watermark = at_watermark or time.monotonic()
                if watch.remaining_through(last) == 0:
                    drained = time.monotonic()
                    break
            if agent.proc is not None and agent.proc.returncode is not None:
                raise RuntimeError(f"the agent exited with {agent.proc.returncode}:\n{agent.tail()}")
            await asyncio.sleep(POLL_S)
        cpu = {f"agent_{k}": v for k, v in tree_cpu(agent.pid).items()}
        cpu.update({f"hub_{k}": v for k, v in tree_cpu(hub.pid).items()})
        connected = agent.first(r": connected")
        figures.update({
            "drain_s": round(drained - started, 3) if drained else None,
            "hub_watermark_reached_s": round(at_watermark - started, 3) if at_watermark else None,
            "agent_connected_s": round(connected - started, 3) if connected else None,
            "readings_per_s": round(readings / (drained - started)) if drained else None,
            "watermark_at_end": mark,
            "agent_peak_rss_mb": round(peak[0], 1),
            "cpu_s_during_drain": cpu,
            "load_average_before": round(load_before, 2),
            "agent_warnings": agent.count(r"level=(warning|error) "),
        })
        if drained:
            figures.update(await settle_and_check(fleet, DEVICE, agent))
        else:
            figures["exactly_once"] = None
            figures["exactly_once_detail"] = f"not drained within {limit_s:.0f} s (watermark {mark:,} of {last:,})"
        return figures
    finally:
        if sampler is not None:
            sampler.cancel()
        watch.close()
        if agent is not None:
            await agent.stop(within=15.0)
        await hub.stop(within=15.0)


async def run_baseline(work: Path, messages: int) -> dict[str, Any]:

    return await run_bridge_baseline(messages, PAYLOAD, work / "bridge")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--readings", type=int, default=SPEC_READINGS, help="backlog size (readings)")
    parser.add_argument("--skip-baseline", action="store_true", help="do not run the Mosquitto bridge baseline")
    parser.add_argument("--baseline-messages", type=int, default=None,
                        help="baseline backlog in messages (default: the same as --readings)")
    parser.add_argument("--timeout", type=float, default=None, help="give up on the drain after this many seconds")
    parser.add_argument("--agent-set", action="append", default=[], metavar="KEY=VALUE",
                        help="pass --set KEY=VALUE to edge-agent run (experiments; default: the bundle as provisioned)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    if args.readings < 1:
        parser.error("--readings must be at least 1")
    timeout = args.timeout or 60.0 + args.readings / 10_000
    work = make_workdir("p2-drain-")
    print(f"P2 backlog drain: {args.readings:,} readings, outbox -> mTLS Mosquitto -> hub commit -> ack; "
          f"work dir {work}")
    print(f"machine: {os.cpu_count()} cores, load average at start {os.getloadavg()[0]:.2f}")
    result: dict[str, Any] = {"bench": "p2_drain", "target_s": TARGET_S}
    try:
        ours = asyncio.run(run_drain(work, args.readings, timeout, tuple(args.agent_set)))
        result.update(ours)
        drain = ours.get("drain_s")
        if drain:
            print(f"edgefleet drain: {drain:.2f} s for {args.readings:,} readings = {ours['readings_per_s']:,} "
                  f"readings/s (agent connected after {ours['agent_connected_s']} s, hub watermark at last seq "
                  f"after {ours['hub_watermark_reached_s']} s)")
        else:
            print(f"edgefleet drain: NOT finished within {timeout:.0f} s (watermark {ours['watermark_at_end']:,})")
        print(f"agent peak RSS while draining: {ours['agent_peak_rss_mb']} MB; CPU seconds from start to drained: "
              f"{ours['cpu_s_during_drain']}")
        print(f"exactly-once (tests/support/exactly_once.assert_exactly_once): {ours.get('exactly_once')}"
              + (f" — {ours['exactly_once_detail']}" if ours.get("exactly_once_detail") else
                 f" (1..{ours.get('last_seq'):,}, dropped {ours.get('dropped')})"))
        ok = bool(drain) and drain <= TARGET_S and ours.get("exactly_once") is True
        scaled = "" if args.readings == SPEC_READINGS else f" (the target is for {SPEC_READINGS:,} readings)"
        print(f"target <= {TARGET_S:.0f} s with exactly-once: {'PASS' if ok else 'MISS'}{scaled}")
        result["pass"] = ok
        if not args.skip_baseline:
            messages = args.baseline_messages or args.readings
            print(f"baseline: per-device Mosquitto bridged over mTLS, {messages:,} QoS 1 messages of "
                  f"{PAYLOAD} bytes (one reading each), max_queued_messages 0 ...")
            try:
                base = asyncio.run(run_baseline(work, messages))
            except Exception as exc:  # the baseline's failure must not hide our own figures
                base = {"error": f"{type(exc).__name__}: {exc}"}
                print(f"baseline failed: {base['error']}")
            result["baseline"] = base
            if base.get("missing"):
                print(f"the bridge lost {base['missing']:,} of {messages:,} messages: its time is not comparable")
            bdrain = base.get("drain_s") if not base.get("missing") else None
            print(f"bridge drain: {bdrain} s = {base.get('drain_msgs_per_s')} messages/s; missing "
                  f"{base.get('missing')}, duplicates {base.get('duplicates')}; backlog built in "
                  f"{base.get('backlog_build_s')} s; edge broker RSS with backlog {base.get('edge_rss_backlog_mb')} MB")
            if drain and bdrain:
                per_reading = (bdrain / messages) / (drain / args.readings)
                result["ratio_bridge_over_edgefleet"] = round(per_reading, 2)
                print(f"ratio: the bridge takes {per_reading:.2f} x as long per reading as edgefleet "
                      f"({'faster' if per_reading > 1 else 'NOT faster'} than the bridge: "
                      f"{'PASS' if per_reading > 1 else 'MISS'})")
                result["pass_vs_bridge"] = per_reading > 1
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(f"load average at end {os.getloadavg()[0]:.2f}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
