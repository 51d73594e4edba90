"""P10: the ingest keeps its rate while retention removes a large old backlog.

    .venv/bin/python bench/p10_retention.py [--readings N] [--old N]

Two P2 drains (bench/p2_drain.py: a backlog of N readings in one device's outbox, drained end to
end through the mTLS broker into the hub, exactly once), in the same run:

1. baseline: the hub as `edge-hub init` makes it (no retention);
2. with retention: before the hub starts, its database is given OLD readings of another device
   stamped ten days ago (written straight into hub.db, with that device's watermark above them,
   as a hub that ran for weeks holds them), and hub.toml `[retention] telemetry_days = 1`. The
   hub's first retention run starts with the hub and removes them in batches while the device
   drains; OLD is chosen so that the prune outlasts the drain (checked and printed).

Prints both drain times, the ratio (with retention / without), and a final JSON line.
Always exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any, Final

ROOT: Final = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.p2_drain import Fleet, make_workdir, run_drain  # noqa: E402  # after the path fix above

OLD_DEVICE: Final = "old-01"
OLD_AGE_S: Final = 10 * 86400.0  # well past the one-day limit
INSERT_CHUNK: Final = 100_000  # rows per executemany while seeding


def seed_old_readings(fleet: Fleet, old: int) -> None:
    """`old` readings of OLD_DEVICE stamped OLD_AGE_S ago, covered by its watermark; retention on."""
    start = time.time() - OLD_AGE_S
    with sqlite3.connect(fleet.hub_dir / "hub.db") as db:
        for base in range(0, old, INSERT_CHUNK):
            seqs = range(base + 1, min(base + INSERT_CHUNK, old) + 1)
            db.executemany("INSERT INTO telemetry(device, seq, ts, metric, value) VALUES (?, ?, ?, 'sig0', ?)",
                           ((OLD_DEVICE, s, start + s / 1000, s / 7) for s in seqs))
        db.execute("INSERT INTO ingest(device, acked_through) VALUES (?, ?)", (OLD_DEVICE, old))
    config = fleet.hub_dir / "hub.toml"
    config.write_text(config.read_text().replace("# telemetry_days = 90", "telemetry_days = 1"))


def removed(fleet_dir: Path) -> int:
    with sqlite3.connect(f"file:{fleet_dir / 'hub' / 'hub.db'}?mode=ro", uri=True) as db:
        row = db.execute("SELECT removed FROM retention WHERE tbl = 'telemetry'").fetchone()
    return int(row[0]) if row else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--readings", type=int, default=1_000_000, help="the drained backlog (readings)")
    parser.add_argument("--old", type=int, default=2_000_000, help="old readings for retention to remove")
    parser.add_argument("--keep", action="store_true", help="keep the work directories")
    args = parser.parse_args(argv)
    timeout = 60.0 + args.readings / 10_000
    print(f"P10 drain of {args.readings:,} readings without and with a retention run removing {args.old:,}; "
          f"{os.cpu_count()} cores, load average at start {os.getloadavg()[0]:.2f}")
    result: dict[str, Any] = {"bench": "p10_retention", "readings": args.readings, "old": args.old}
    works = [make_workdir("p10-base-"), make_workdir("p10-prune-")]
    try:
        base = asyncio.run(run_drain(works[0], args.readings, timeout))
        print(f"without retention: drained in {base['drain_s']} s ({base['readings_per_s']} readings/s), "
              f"exactly once: {base.get('exactly_once')}")
        seeded = time.monotonic()
        prune = asyncio.run(run_drain(works[1], args.readings, timeout,
                                      prepare=lambda fleet: seed_old_readings(fleet, args.old)))
        gone = removed(works[1])
        print(f"with retention:    drained in {prune['drain_s']} s ({prune['readings_per_s']} readings/s), "
              f"exactly once: {prune.get('exactly_once')}; retention had removed {gone:,} of {args.old:,} "
              f"old readings when the hub stopped ({time.monotonic() - seeded:.0f} s after seeding began)")
        result.update({"without_s": base["drain_s"], "with_s": prune["drain_s"], "removed_at_stop": gone,
                       "prune_outlasted_drain": gone < args.old,
                       "exactly_once": bool(base.get("exactly_once") and prune.get("exactly_once"))})
        if base["drain_s"] and prune["drain_s"]:
            result["ratio_with_over_without"] = round(prune["drain_s"] / base["drain_s"], 2)
            print(f"ratio: the drain takes {result['ratio_with_over_without']} x as long while retention runs"
                  + ("" if gone < args.old else " (the prune finished before the hub stopped: raise --old)"))
    finally:
        for work in works:
            if args.keep:
                print(f"kept {work}")
            else:
                shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
