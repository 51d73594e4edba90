"""P3: agent resident memory at steady state (sim profile at 10 Hz), with and without a backlog.

    .venv/bin/python bench/p3_memory.py [--seconds S] [--interval S] [--readings N]

One hub (`edge-hub run`, managed Mosquitto) and two provisioned sim devices, run side by side
for the same `--seconds`, sampled every `--interval`:

- steady:  `edge-agent run --set sim.rate_hz=10`, connected to the hub and syncing;
- backlog: the same, but its outbox holds a pre-built backlog of `--readings` readings
  (written with the Outbox API) and its broker port points where nothing listens (the hub
  is down for it), so the backlog stays on disk while it keeps sampling and reconnecting;
- floor:   `python -c 'import asyncio, ssl; ...; asyncio.run(asyncio.sleep(...))'`, the
  interpreter with the two modules every agent needs: the baseline of the same run.

Per process: RSS (psutil) and PSS (/proc/PID/smaps_rollup), in MB of 2**20 bytes; the first
sample, the steady value (median of the second half), the maximum, and the growth slope
(least squares over the second half, MB/min). Prints PASS/MISS against the target (docs/performance.md) and
a final JSON line. Always exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
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
from bench.p2_drain import build_backlog, make_fleet, make_workdir  # noqa: E402
from edge_agent.config import load_settings  # noqa: E402
from tests.support.exactly_once import outbox_state  # noqa: E402
from tests.support.net import free_port  # noqa: E402

TARGET_MB: Final = 40.0  # P3 (docs/performance.md): RSS
# "No growth", made measurable: a slope this small is under 150 MB a day, and in a short run
# it is below what one allocator arena step shows; a real leak at 10 Hz shows well above it.
GROWTH_LIMIT_MB_PER_MIN: Final = 0.1
MB: Final = 1024 * 1024
RATE: Final = "sim.rate_hz=10"
FLOOR_CODE: Final = (
    "import asyncio, ssl; ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT); asyncio.run(asyncio.sleep(86400))"
)


def pss_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def rss_mb(pid: int) -> float | None:
    try:
        return float(psutil.Process(pid).memory_info().rss / MB)
    except psutil.Error:
        return None


def slope_per_min(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, MB), in MB per minute."""
    if len(points) < 2:
        return 0.0
    mean_t = statistics.fmean(t for t, _ in points)
    mean_v = statistics.fmean(v for _, v in points)
    var = sum((t - mean_t) ** 2 for t, _ in points)
    if var == 0:
        return 0.0
    return 60.0 * sum((t - mean_t) * (v - mean_v) for t, v in points) / var


def summary(series: list[tuple[float, float]]) -> dict[str, float]:
    half = series[len(series) // 2:]
    values = [v for _, v in series]
    return {
        "start": round(values[0], 1), "steady": round(statistics.median(v for _, v in half), 1),
        "max": round(max(values), 1), "end": round(values[-1], 1),
        "slope_mb_per_min": round(slope_per_min(half), 3),
    }


async def run(seconds: float, interval: float, readings: int, keep: bool) -> dict[str, Any]:
    work = make_workdir("p3-memory-")
    steady_dev, backlog_dev = "mem-steady", "mem-backlog"
    procs: list[Child] = []
    try:
        fleet = await make_fleet(work, [steady_dev, backlog_dev])
        dead_port = free_port()  # nothing listens here: the backlog device's hub is down
        backlog_sets = (RATE, f"broker.port={dead_port}")
        settings = load_settings(fleet.config(backlog_dev), backlog_sets)
        backlog = await build_backlog(settings, readings)
        print(f"backlog device: {readings:,} readings on disk ({backlog['file_mb']} MB), broker port {dead_port} "
              f"(nothing listens)")
        hub = await Child("hub", fleet.hub_argv()).start()
        procs.append(hub)
        await hub.wait_for(r"hub ready")
        floor = await Child("floor", [sys.executable, "-c", FLOOR_CODE]).start()
        steady = await Child("steady", fleet.agent_argv(steady_dev, RATE)).start()
        held = await Child("backlog", fleet.agent_argv(backlog_dev, *backlog_sets)).start()
        procs += [floor, steady, held]
        await steady.wait_for(r": connected")
        load_before = os.getloadavg()[0]
        watched = {"steady": steady, "backlog": held, "floor": floor}
        rss: dict[str, list[tuple[float, float]]] = {k: [] for k in watched}
        pss: dict[str, list[tuple[float, float]]] = {k: [] for k in watched}
        started = time.monotonic()
        next_at = started
        while True:
            now = time.monotonic() - started
            for name, proc in watched.items():
                if proc.proc is not None and proc.proc.returncode is not None:
                    raise RuntimeError(f"{name} exited with {proc.proc.returncode}:\n{proc.tail()}")
                r, p = rss_mb(proc.pid), pss_mb(proc.pid)
                if r is not None:
                    rss[name].append((now, r))
                if p is not None:
                    pss[name].append((now, p))
            line = "  ".join(f"{k} {rss[k][-1][1]:5.1f}/{pss[k][-1][1]:5.1f}" for k in watched if rss[k] and pss[k])
            print(f"  t={now:5.0f} s  RSS/PSS MB: {line}", flush=True)
            if now >= seconds:
                break
            next_at += interval
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        steady_state = outbox_state(fleet.bundles / steady_dev)
        backlog_state = outbox_state(fleet.bundles / backlog_dev)
        return {
            "seconds": round(time.monotonic() - started), "interval_s": interval, "backlog_readings": readings,
            "load_average_before": round(load_before, 2), "load_average_end": round(os.getloadavg()[0], 2),
            "rss": {k: summary(v) for k, v in rss.items()}, "pss": {k: summary(v) for k, v in pss.items()},
            "steady_outbox": {"last_seq": steady_state.last_seq, "acked": steady_state.acked},
            "backlog_outbox": {"rows": backlog_state.rows, "acked": backlog_state.acked},
            "backlog_connected": held.count(r": connected"),
            "agent_warnings": {"steady": steady.count(r"level=(warning|error) "),
                               "backlog": held.count(r"level=(warning|error) ")},
        }
    finally:
        for proc in reversed(procs):
            with contextlib.suppress(Exception):
                await proc.stop()
        if keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=90.0, help="how long to sample (default 90)")
    parser.add_argument("--interval", type=float, default=3.0, help="seconds between samples (default 3)")
    parser.add_argument("--readings", type=int, default=1_000_000, help="backlog on disk for the second agent")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    if args.seconds <= 0 or args.interval <= 0 or args.readings < 1:
        parser.error("--seconds, --interval and --readings must be positive")
    print(f"P3 agent memory: sim profile at 10 Hz, {args.seconds:.0f} s sampled every {args.interval:g} s; "
          f"MB = 2**20 bytes")
    print(f"machine: {os.cpu_count()} cores, load average at start {os.getloadavg()[0]:.2f}")
    figures = asyncio.run(run(args.seconds, args.interval, args.readings, args.keep))
    floor = figures["rss"]["floor"]["steady"]
    ok = True
    for name in ("steady", "backlog"):
        r, p = figures["rss"][name], figures["pss"][name]
        growth_ok = r["slope_mb_per_min"] <= GROWTH_LIMIT_MB_PER_MIN
        size_ok = r["max"] <= TARGET_MB
        ok = ok and growth_ok and size_ok
        figures[f"{name}_ratio_to_floor"] = round(r["steady"] / floor, 2)
        print(f"agent {name:7}: RSS start {r['start']} / steady {r['steady']} / max {r['max']} MB, "
              f"slope {r['slope_mb_per_min']:+.3f} MB/min; PSS start {p['start']} / steady {p['steady']} / "
              f"max {p['max']} MB, slope {p['slope_mb_per_min']:+.3f} MB/min")
        print(f"  ratio to the interpreter floor: {r['steady'] / floor:.2f} x ({r['steady'] - floor:+.1f} MB); "
              f"max <= {TARGET_MB:.0f} MB: {'PASS' if size_ok else 'MISS'}; growth <= "
              f"{GROWTH_LIMIT_MB_PER_MIN} MB/min: {'PASS' if growth_ok else 'MISS'}")
    synced, held = figures["steady_outbox"], figures["backlog_outbox"]
    print(f"floor (python + asyncio + ssl): RSS steady {floor} MB, PSS steady {figures['pss']['floor']['steady']} MB")
    print(f"steady agent synced to seq {synced['acked']:,} of {synced['last_seq']:,}; backlog agent still holds "
          f"{held['rows']:,} rows on disk (connected {figures['backlog_connected']} times)")
    figures["pass"] = ok
    print(f"P3 target (<= {TARGET_MB:.0f} MB RSS, no growth, with and without the backlog): {'PASS' if ok else 'MISS'}")
    print(json.dumps({"bench": "p3_memory", "target_mb": TARGET_MB,
                      "growth_limit_mb_per_min": GROWTH_LIMIT_MB_PER_MIN, **figures}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
