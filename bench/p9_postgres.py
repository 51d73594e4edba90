"""P9: P2's 1,000,000-reading backlog drain with the hub's state in PostgreSQL, against a raw COPY.

    .venv/bin/python bench/p9_postgres.py [--readings N] [--devices D] [--skip-replicas] [--keep]

1. A private PostgreSQL cluster (tests/support/postgres.py: initdb in a temporary folder, a free
   loopback port, fsync off, synchronous_commit on) and a fresh database for each phase.
2. One device: `edge-hub init --database URL`, provisioning, a backlog of N readings written into
   the device's outbox (bench/p2_drain.build_backlog), `edge-hub run`, then the clock runs from
   `edge-agent run` until the hub's watermark (read from PostgreSQL) reaches the backlog's last seq
   and the outbox holds none of it; then, the agent stopped, every reading it took is at the hub once
   or still in its outbox (tests/support/exactly_once.account).
3. Baseline, same run: the same N rows COPYed (asyncpg copy_records_to_table) into the telemetry table
   of a fresh database with the hub's schema, on the same server.
4. Replicas (unless --skip-replicas): D devices (default 4) with N/D readings each, drained by the
   primary alone, then again (fresh database and bundles) by the primary and replica b (its folder from
   `edge-hub replica create`); the combined rate of the two against the one.

Prints the figures, the ratio, PASS/MISS against the target (docs/performance.md) and a final JSON line.
Always exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Final

ROOT: Final = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import asyncpg  # noqa: E402  # after the path fix above, like every import here

from bench.bridge_baseline import Child  # noqa: E402
from bench.p2_drain import AGENT, HUB, START_TIMEOUT, build_backlog, make_workdir, run_cli  # noqa: E402
from edge_agent.buffer.outbox import DB_NAME  # noqa: E402
from edge_agent.config import load_settings  # noqa: E402
from hub.db.postgres import PostgresStore  # noqa: E402
from tests.support.exactly_once import account  # noqa: E402
from tests.support.net import free_port  # noqa: E402
from tests.support.postgres import PostgresCluster, bin_dir  # noqa: E402

TARGET_S: Final = 4.0  # P9 (docs/performance.md): the drain into PostgreSQL
SPEC_READINGS: Final = 1_000_000
POLL_S: Final = 0.05  # drain-detection resolution: one indexed lookup per poll
COPY_CHUNK: Final = 100_000  # rows per COPY call of the baseline


class Hub:
    """A hub directory on PostgreSQL, its device bundles, and (optionally) replica b's folder."""

    def __init__(self, work: Path, url: str, devices: list[str]) -> None:
        self.dir, self.bundles, self.url, self.devices = work / "hub", work / "bundles", url, devices
        self.replica_dir = work / "machine-b" / "hub"
        self.port = free_port()

    async def make(self, replica: bool) -> None:
        await run_cli(HUB, "init", "--dir", str(self.dir), "--region", "bench", "--port", str(self.port),
                      "--host", "127.0.0.1", "--database", self.url)
        config = self.dir / "hub.toml"
        text = re.sub(r"(?m)^port = 9464$", "port = 0", config.read_text())  # no metrics on PostgreSQL
        if replica:
            text = re.sub(r"(?m)^replicas = \[\]", 'replicas = ["b"]', text)
        config.write_text(text)
        self.bundles.mkdir(mode=0o700)
        await run_cli(HUB, "provision", "--dir", str(self.dir), "--out", str(self.bundles), "--profile", "sim",
                      *self.devices)
        if replica:
            await run_cli(HUB, "replica", "create", "--dir", str(self.dir), "--name", "b", "--out",
                          str(self.replica_dir))


async def drain(hub: Hub, readings_each: int, replica: bool, limit_s: float) -> dict[str, Any]:
    await hub.make(replica)
    lasts: dict[str, int] = {}
    for device in hub.devices:
        settings = load_settings(hub.bundles / device / "agent.toml")
        lasts[device] = (await build_backlog(settings, readings_each))["last_seq"]
    procs = [await Child("hub", [HUB, "run", "--dir", str(hub.dir)]).start(merge=True)]
    agents: list[Child] = []
    conn = await asyncpg.connect(hub.url)
    try:
        await procs[0].wait_for(r"hub ready", within=START_TIMEOUT)
        if replica:
            procs.append(await Child("replica", [HUB, "run", "--dir", str(hub.replica_dir)]).start(merge=True))
            await procs[1].wait_for(r"hub ready", within=START_TIMEOUT)
        started = time.monotonic()
        agents = [await Child(d, [AGENT, "run", "--config", str(hub.bundles / d / "agent.toml")]).start(merge=True)
                  for d in hub.devices]
        drained = None
        while time.monotonic() - started < limit_s:
            marks = dict(await conn.fetch("SELECT device, acked_through FROM ingest WHERE device = ANY($1::text[])",
                                          hub.devices))
            if all(marks.get(d, 0) >= last for d, last in lasts.items()) and all(
                    _remaining(hub.bundles / d / "state" / DB_NAME, last) == 0 for d, last in lasts.items()):
                drained = time.monotonic() - started
                break
            await asyncio.sleep(POLL_S)
        shares = {h: int(n) for h, n in await conn.fetch("SELECT hub, SUM(records) FROM ingest_minutes GROUP BY hub")}
        for agent in agents:
            await agent.stop(within=15.0)
        agents = []
        checked = []
        for device in hub.devices:  # a reading still in its outbox at the stop is waiting, not lost
            where = account(hub.dir, hub.bundles / device)
            checked.append(where.lost == 0 and where.duplicated == 0 and where.shed == 0)
            if not checked[-1]:
                print(f"{device}: {where}")
        return {"drain_s": round(drained, 3) if drained else None, "readings": readings_each * len(hub.devices),
                "readings_per_s": round(readings_each * len(hub.devices) / drained) if drained else None,
                "records_by_hub": shares, "exactly_once": all(checked)}
    finally:
        await conn.close()
        for proc in [*agents, *reversed(procs)]:
            await proc.stop(within=15.0)


def _remaining(outbox: Path, last: int) -> int:
    import sqlite3

    db = sqlite3.connect(f"file:{outbox}?mode=ro", uri=True, timeout=10)
    try:
        return int(db.execute("SELECT count(*) FROM records WHERE seq <= ?", (last,)).fetchone()[0])
    finally:
        db.close()


async def raw_copy(url: str, readings: int) -> dict[str, Any]:
    """The same number of rows, shaped as the hub stores them, COPYed into the hub's telemetry table."""
    store = await PostgresStore.open(url)  # the hub's schema and today's partitions
    await store.close()
    start_ts = time.time() - readings / 40.0  # as P2's backlog: 4 signals at 10 Hz, ending about now
    rows = [("bench-01", i, start_ts + i / 40.0, f"sim{i % 4}", float(i)) for i in range(1, readings + 1)]
    conn = await asyncpg.connect(url)
    try:
        began = time.monotonic()
        async with conn.transaction():
            for at in range(0, readings, COPY_CHUNK):
                await conn.copy_records_to_table("telemetry", records=rows[at:at + COPY_CHUNK],
                                                 columns=["device", "seq", "ts", "metric", "value"])
        took = time.monotonic() - began
    finally:
        await conn.close()
    return {"copy_s": round(took, 3), "rows_per_s": round(readings / took)}


async def run(args: argparse.Namespace, work: Path, cluster: PostgresCluster) -> dict[str, Any]:
    result: dict[str, Any] = {"bench": "p9_postgres", "target_s": TARGET_S, "readings": args.readings}
    limit = 120.0 + args.readings / 5_000
    one = await drain(Hub(work / "one", cluster.fresh_database(), ["bench-01"]), args.readings, False, limit)
    result["drain"] = one
    print(f"edgefleet drain into PostgreSQL: {one['drain_s']} s for {args.readings:,} readings = "
          f"{one['readings_per_s']} readings/s; exactly-once: {one['exactly_once']}")
    base = await raw_copy(cluster.fresh_database(), args.readings)
    result["raw_copy"] = base
    print(f"baseline: raw COPY of {args.readings:,} rows into the hub's telemetry table: {base['copy_s']} s "
          f"= {base['rows_per_s']:,} rows/s")
    if one["drain_s"]:
        result["ratio_drain_over_copy"] = round(one["drain_s"] / base["copy_s"], 2)
        print(f"ratio: the drain takes {result['ratio_drain_over_copy']} x the raw COPY's time")
    ok = bool(one["drain_s"]) and one["drain_s"] <= TARGET_S and one["exactly_once"]
    print(f"target <= {TARGET_S:g} s with exactly-once: {'PASS' if ok else 'MISS'}")
    result["pass"] = ok
    if not args.skip_replicas:
        devices = [f"bench-{i:02}" for i in range(1, args.devices + 1)]
        each = args.readings // args.devices
        alone = await drain(Hub(work / "alone", cluster.fresh_database(), devices), each, False, limit)
        both = await drain(Hub(work / "both", cluster.fresh_database(), devices), each, True, limit)
        result["replicas"] = {"one": alone, "two": both}
        print(f"{args.devices} devices x {each:,} readings: one hub process {alone['readings_per_s']} readings/s "
              f"({alone['drain_s']} s); primary + replica b {both['readings_per_s']} readings/s ({both['drain_s']} s, "
              f"by process {both['records_by_hub']}); exactly-once {alone['exactly_once']} / {both['exactly_once']}")
        if alone["readings_per_s"] and both["readings_per_s"]:
            result["ratio_two_over_one"] = round(both["readings_per_s"] / alone["readings_per_s"], 2)
            print(f"ratio: two replicas ingest {result['ratio_two_over_one']} x one's rate")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--readings", type=int, default=SPEC_READINGS, help="backlog size (readings)")
    parser.add_argument("--devices", type=int, default=4, help="devices sharing the backlog in the replica phase")
    parser.add_argument("--skip-replicas", action="store_true", help="only the one-device drain and the COPY")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    binaries = bin_dir()
    if binaries is None:
        print("P9 needs PostgreSQL's server (bash scripts/setup.sh test installs it)")
        print(json.dumps({"bench": "p9_postgres", "error": "no PostgreSQL"}))
        return 0
    work = make_workdir("p9-postgres-")
    cluster = PostgresCluster(work / "postgres", binaries)
    print(f"P9 drain into PostgreSQL: {args.readings:,} readings; work dir {work}")
    print(f"machine: {os.cpu_count()} cores, load average at start {os.getloadavg()[0]:.2f}")
    result: dict[str, Any] = {"bench": "p9_postgres"}
    try:
        (work / "postgres").mkdir()
        (work / "postgres").chmod(0o755)
        cluster.start()
        result = asyncio.run(run(args, work, cluster))
    finally:
        cluster.stop()
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(f"load average at end {os.getloadavg()[0]:.2f}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
