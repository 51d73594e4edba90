"""P8: Modbus polling, 50 slaves x 20 registers at 1 Hz on one agent, 5 of them dead.

    .venv/bin/python bench/p8_modbus.py [--seconds S] [--slaves N] [--dead D] [--timeout S] [--keep]

One pymodbus TCP server process (tests/support/modbus_server.py) holds N unit ids of 20 holding
registers; D of them never answer. One hub (`edge-hub run`, managed Mosquitto) and one agent
(`edge-agent run`, sim profile with its sim sensor paused) whose agent.toml declares one modbus
sensor per unit id, all on the one TCP connection, every reading sent (deadband 0).

- Agent: the sample interval of each live slave (the spacing of its readings' timestamps at the
  hub, p50/p99/max over all live slaves), readings per live slave against the window, the
  agent's CPU (psutil, user+system over the window, % of one core) and RSS (max of samples).
- Baseline, same run, same server: a plain pymodbus client loop (one AsyncModbusTcpClient,
  every unit in turn, 20 registers each, the same timeout, then sleep to the next second).
  Ratios: agent interval p99 / baseline interval p99, agent CPU / baseline CPU.

Targets (docs/performance.md): live interval p99 <= 1.1 s, CPU <= 15 % of one core, RSS <= 40 MB.
Prints PASS/MISS and one JSON line last; always exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import shutil
import sqlite3
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Final

import psutil

ROOT: Final = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.bridge_baseline import Child  # noqa: E402
from bench.p2_drain import make_fleet, make_workdir  # noqa: E402
from tests.support.exactly_once import QUIET  # noqa: E402
from tests.support.net import free_port  # noqa: E402

TARGET_P99_S: Final = 1.1
TARGET_CPU_PERCENT: Final = 15.0
TARGET_RSS_MB: Final = 40.0
REGISTERS: Final = 20
INTERVAL_S: Final = 1.0
WARMUP_S: Final = 10.0  # connections made, the dead slaves found dead, before the window opens
MB: Final = 1024 * 1024
DEVICE: Final = "p8-modbus"


def layout(slaves: int, dead: int) -> dict[str, Any]:
    """Units 1..N with 20 registers each; the dead ones spread over the range."""
    step = max(slaves // max(dead, 1), 1)
    dead_units = [u for u in range(step, slaves + 1, step)][:dead]
    return {"units": {str(u): {"holding": [u * 100 + r for r in range(REGISTERS)]} for u in range(1, slaves + 1)},
            "dead": dead_units}


def declare(config: Path, port: int, slaves: int, timeout: float) -> None:
    registers = ", ".join(f'{{ name = "r{r:02d}", table = "holding", address = {r} }}' for r in range(REGISTERS))
    blocks = [f'\n[[sensors]]\nkind = "modbus"\nname = "s{u:02d}"\nurl = "tcp://127.0.0.1:{port}"\nunit = {u}\n'
              f"interval_s = {INTERVAL_S}\ntimeout_s = {timeout}\nregisters = [{registers}]\n"
              for u in range(1, slaves + 1)]
    config.write_text(config.read_text(encoding="utf-8") + "".join(blocks), encoding="utf-8")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def spread(intervals: list[float]) -> dict[str, float]:
    if not intervals:
        return {"n": 0, "p50": 0.0, "p99": 0.0, "max": 0.0}
    return {"n": len(intervals), "p50": round(statistics.median(intervals), 4),
            "p99": round(percentile(intervals, 0.99), 4), "max": round(max(intervals), 4)}


def hub_intervals(hub_db: Path, live: list[int], start: float, end: float) -> tuple[list[float], dict[int, int]]:
    """Spacing of each live slave's r00 readings at the hub inside the window; readings per slave."""
    db = sqlite3.connect(f"file:{hub_db}?mode=ro", uri=True, timeout=10)
    try:
        intervals: list[float] = []
        counts: dict[int, int] = {}
        for unit in live:
            ts = [t for (t,) in db.execute("SELECT ts FROM telemetry WHERE device = ? AND metric = ? AND ts >= ? "
                                           "AND ts <= ? ORDER BY ts", (DEVICE, f"s{unit:02d}.r00", start, end))]
            counts[unit] = len(ts)
            intervals += [b - a for a, b in itertools.pairwise(ts)]
        return intervals, counts
    finally:
        db.close()


class Watch:
    """CPU (user+system seconds) and RSS of one process over a window."""

    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)
        times = self.proc.cpu_times()
        self.cpu0 = times.user + times.system
        self.t0 = time.monotonic()
        self.rss: list[float] = []

    def sample(self) -> None:
        with contextlib.suppress(psutil.Error):
            self.rss.append(self.proc.memory_info().rss / MB)

    def cpu_percent(self) -> float:
        times = self.proc.cpu_times()
        return 100.0 * (times.user + times.system - self.cpu0) / (time.monotonic() - self.t0)


async def window(watch: Watch, seconds: float) -> None:
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        watch.sample()
        await asyncio.sleep(min(2.0, left))
    watch.sample()


async def run(seconds: float, slaves: int, dead: int, answer_s: float, keep: bool) -> dict[str, Any]:
    work = make_workdir("p8-modbus-")
    procs: list[Child] = []
    try:
        plan = layout(slaves, dead)
        live = [u for u in range(1, slaves + 1) if u not in plan["dead"]]
        (work / "layout.json").write_text(json.dumps(plan), encoding="utf-8")
        port = free_port()
        server = await Child("modbus", [sys.executable, "-m", "tests.support.modbus_server",
                                        str(work / "layout.json"), "--tcp", f"127.0.0.1:{port}"]).start(merge=True)
        procs.append(server)
        await server.wait_for("modbus server ready")
        fleet = await make_fleet(work, [DEVICE])
        declare(fleet.config(DEVICE), port, slaves, answer_s)
        hub = await Child("hub", fleet.hub_argv()).start()
        procs.append(hub)
        await hub.wait_for(r"hub ready")
        agent = await Child("agent", fleet.agent_argv(DEVICE, *QUIET, "report.default_deadband=0")).start()
        procs.append(agent)
        await agent.wait_for(r": connected")
        await asyncio.sleep(WARMUP_S)
        print(f"agent: {slaves} modbus sensors ({len(live)} live, dead units {plan['dead']}), window {seconds:.0f} s",
              flush=True)
        watch = Watch(agent.pid)
        start = time.time()
        await window(watch, seconds)
        end = time.time()
        agent_cpu = watch.cpu_percent()
        agent.signal(15)
        await agent.wait(30)
        intervals, counts = hub_intervals(fleet.hub_dir / "hub.db", live, start, end)
        await hub.stop()  # the baseline runs without the hub beside it, as the agent ran with it

        base = await Child("baseline", [sys.executable, __file__, "--baseline-child", str(port), str(slaves),
                                        str(answer_s), str(seconds + WARMUP_S)]).start(stdout=True)
        procs.append(base)
        await asyncio.sleep(WARMUP_S)
        base_watch = Watch(base.pid)
        await window(base_watch, seconds)
        base_cpu = base_watch.cpu_percent()
        assert base.stdout is not None
        out = (await base.stdout.read()).decode()
        await base.wait(30 + answer_s * slaves)
        base_times: dict[str, list[float]] = json.loads(out.strip().splitlines()[-1])
        base_intervals = [b - a for u in live if base_times.get(str(u))
                          for a, b in pairs_after(base_times[str(u)], WARMUP_S)]
        return {
            "slaves": slaves, "dead": plan["dead"], "registers": REGISTERS, "interval_s": INTERVAL_S,
            "timeout_s": answer_s, "window_s": seconds,
            "agent": {"interval": spread(intervals), "cpu_percent": round(agent_cpu, 1),
                      "rss_max_mb": round(max(watch.rss), 1), "rss_median_mb": round(statistics.median(watch.rss), 1),
                      "readings_per_live_slave_min": min(counts.values()),
                      "readings_per_live_slave_expected": int(seconds / INTERVAL_S),
                      "warnings": agent.count(r"level=(warning|error) ")},
            "baseline": {"interval": spread(base_intervals), "cpu_percent": round(base_cpu, 1),
                         "rss_max_mb": round(max(base_watch.rss), 1)},
        }
    finally:
        for proc in reversed(procs):
            with contextlib.suppress(Exception):
                await proc.stop()
        if keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def pairs_after(times: list[float], skip_s: float) -> list[tuple[float, float]]:
    """Consecutive pairs of `times` after the first `skip_s` seconds (the baseline's warm-up)."""
    kept = [t for t in times if t >= times[0] + skip_s]
    return list(itertools.pairwise(kept))


async def baseline_child(port: int, slaves: int, answer_s: float, seconds: float) -> None:
    """The plain loop: every unit in turn with one client, then sleep to the next whole second."""
    import logging

    from pymodbus.client import AsyncModbusTcpClient
    from pymodbus.exceptions import ModbusException

    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)
    client = AsyncModbusTcpClient("127.0.0.1", port=port, timeout=answer_s, retries=0)
    await client.connect()
    times: dict[int, list[float]] = {u: [] for u in range(1, slaves + 1)}
    end = time.monotonic() + seconds
    next_round = time.monotonic()
    while time.monotonic() < end:
        for unit in range(1, slaves + 1):
            try:
                if not client.connected:
                    await client.connect()
                response = await client.read_holding_registers(0, count=REGISTERS, device_id=unit)
                if not response.isError():
                    times[unit].append(time.time())
            except ModbusException:
                pass
        next_round += INTERVAL_S
        await asyncio.sleep(max(0.0, next_round - time.monotonic()))
    client.close()
    print(json.dumps(times), flush=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--baseline-child"]:
        port, slaves, timeout, seconds = argv[1:5]
        asyncio.run(baseline_child(int(port), int(slaves), float(timeout), float(seconds)))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=60.0, help="measured window (default 60)")
    parser.add_argument("--slaves", type=int, default=50)
    parser.add_argument("--dead", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=0.3, help="each sensor's timeout_s (default 0.3)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    print(f"P8 Modbus polling: {args.slaves} slaves x {REGISTERS} registers at {1 / INTERVAL_S:g} Hz, "
          f"{args.dead} dead, timeout {args.timeout:g} s; machine: {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    figures = asyncio.run(run(args.seconds, args.slaves, args.dead, args.timeout, args.keep))
    a, b = figures["agent"], figures["baseline"]
    p99_ok = a["interval"]["p99"] <= TARGET_P99_S
    cpu_ok = a["cpu_percent"] <= TARGET_CPU_PERCENT
    rss_ok = a["rss_max_mb"] <= TARGET_RSS_MB
    figures["ratios"] = {
        "interval_p99": round(a["interval"]["p99"] / b["interval"]["p99"], 2) if b["interval"]["p99"] else None,
        "cpu": round(a["cpu_percent"] / b["cpu_percent"], 2) if b["cpu_percent"] else None,
    }
    print(f"agent:    live slaves' interval p50 {a['interval']['p50']:.3f} s, p99 {a['interval']['p99']:.3f} s, "
          f"max {a['interval']['max']:.3f} s ({a['interval']['n']} intervals); readings per live slave >= "
          f"{a['readings_per_live_slave_min']} of {a['readings_per_live_slave_expected']}")
    print(f"          CPU {a['cpu_percent']:.1f} % of one core; RSS max {a['rss_max_mb']} MB; "
          f"{a['warnings']} warning/error lines")
    print(f"baseline: plain pymodbus loop interval p50 {b['interval']['p50']:.3f} s, p99 {b['interval']['p99']:.3f} s, "
          f"max {b['interval']['max']:.3f} s; CPU {b['cpu_percent']:.1f} %; RSS max {b['rss_max_mb']} MB")
    ratios = figures["ratios"]
    print(f"ratios (agent / baseline): interval p99 {ratios['interval_p99']}, CPU {ratios['cpu']}")
    print(f"targets: p99 <= {TARGET_P99_S} s {'PASS' if p99_ok else 'MISS'}; CPU <= {TARGET_CPU_PERCENT:g} % "
          f"{'PASS' if cpu_ok else 'MISS'}; RSS <= {TARGET_RSS_MB:g} MB {'PASS' if rss_ok else 'MISS'}")
    figures["pass"] = p99_ok and cpu_ok and rss_ok
    print(json.dumps({"bench": "p8_modbus", **figures}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
