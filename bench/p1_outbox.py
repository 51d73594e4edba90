"""P1: readings made durable in the outbox per second, against raw sqlite3 in the same run.

    .venv/bin/python bench/p1_outbox.py [--readings N] [--reps R] [--synchronous full|normal] [--raw-batch N]

Outbox side, as the agent runs it: `Outbox.open(dir, quota)`, its `flusher()` as a task, and a
producer that hands `add()` lists of CHUNK readings (a sampler's batches), yielding to the
loop between them. The clock stops when the last `flush()` has committed: every reading is
then in the database file, not in memory.

Raw side: stdlib `sqlite3`, an equivalent `records` table (same columns and primary key),
`executemany` of the same rows, already as tuples, in transactions of COMMIT_ROWS rows (the
outbox's commit threshold; `--raw-batch` changes it), each `BEGIN IMMEDIATE ... COMMIT`. The
outbox decides its own transaction sizes (a commit takes everything buffered when it starts);
each repetition prints how many commits it made.

Both use `journal_mode=WAL` and the same `synchronous` (FULL by default: the agent's default,
a commit survives power loss), on the same filesystem. Repetitions alternate the two sides;
the figures are medians. Prints one line per figure, PASS/MISS against the target (docs/performance.md), and
a final JSON line. Always exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Final

ROOT: Final = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from edge_agent.buffer.outbox import COMMIT_ROWS, DB_NAME, Outbox  # noqa: E402 - after the path fix above
from edge_agent.sense.sensors import Reading  # noqa: E402

TARGET_PER_S: Final = 200_000  # P1 (docs/performance.md)
TARGET_RATIO: Final = 0.35  # P1 (docs/performance.md): outbox / raw sqlite3 in the same run
CHUNK: Final = 1_000  # readings per add() call: a busy sampler's batch
METRICS: Final = 4  # like the sim profile: sig0..sig3
NO_QUOTA: Final = 10**12  # P1 measures writing, not shedding (used_bytes still runs every commit)

RAW_SCHEMA: Final = """
CREATE TABLE records (
    seq INTEGER PRIMARY KEY, ts REAL NOT NULL, metric INTEGER, value REAL, kind TEXT, body TEXT
)
"""


def make_readings(n: int) -> list[Reading]:
    """Four interleaved slowly varying signals at 10 Hz; built before any clock starts."""
    t0 = time.time() - n / (METRICS * 10.0)
    return [Reading(f"sig{i % METRICS}", t0 + (i // METRICS) / 10.0, 20.0 + (i % 997) / 100.0)
            for i in range(n)]


async def outbox_run(state_dir: Path, readings: list[Reading], synchronous: str) -> tuple[float, int]:
    """Seconds to make every reading durable through Outbox.add and the flusher's commits; commits made."""
    outbox = await Outbox.open(state_dir, NO_QUOTA, synchronous)
    commits = 0
    commit = outbox._commit  # counted only, to state the transaction sizes it chose

    async def counted(report_slow: bool = True) -> None:
        nonlocal commits
        commits += 1
        await commit(report_slow)

    outbox._commit = counted  # type: ignore[method-assign]
    flusher = asyncio.create_task(outbox.flusher(), name="outbox")
    try:
        started = time.perf_counter()
        for i in range(0, len(readings), CHUNK):
            outbox.add(readings[i:i + CHUNK])
            await asyncio.sleep(0)  # the agent's loop runs other tasks between sampler batches
        await outbox.flush()
        elapsed = time.perf_counter() - started
        if outbox.last_seq != len(readings) or outbox.dropped:
            raise RuntimeError(f"outbox holds {outbox.last_seq} (dropped {outbox.dropped}), "
                               f"expected {len(readings)}")
    finally:
        flusher.cancel()
        await asyncio.gather(flusher, return_exceptions=True)
        await outbox.close()
    return elapsed, commits


def raw_run(directory: Path, rows: list[tuple[int, float, int, float]], synchronous: str, batch: int) -> float:
    """Seconds for executemany of the same rows in `batch`-row transactions."""
    directory.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(directory / "raw.db", isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode = WAL")
        db.execute(f"PRAGMA synchronous = {synchronous.upper()}")
        db.execute(RAW_SCHEMA)
        started = time.perf_counter()
        for i in range(0, len(rows), batch):
            db.execute("BEGIN IMMEDIATE")
            db.executemany("INSERT INTO records(seq, ts, metric, value) VALUES (?, ?, ?, ?)", rows[i:i + batch])
            db.execute("COMMIT")
        elapsed = time.perf_counter() - started
        count = db.execute("SELECT count(*) FROM records").fetchone()[0]
    finally:
        db.close()
    if count != len(rows):
        raise RuntimeError(f"raw table holds {count} rows, expected {len(rows)}")
    return elapsed


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--readings", type=int, default=1_000_000, help="readings per repetition")
    parser.add_argument("--reps", type=int, default=5, help="repetitions of each side (median reported)")
    parser.add_argument("--synchronous", choices=["full", "normal"], default="full",
                        help="PRAGMA synchronous for both sides (the agent's default is full)")
    parser.add_argument("--raw-batch", type=int, default=COMMIT_ROWS,
                        help=f"rows per raw transaction (default {COMMIT_ROWS:,}, the outbox's COMMIT_ROWS)")
    parser.add_argument("--dir", type=Path, default=None, help="where the databases go (default: a temp dir)")
    args = parser.parse_args(argv)
    if args.readings < 1 or args.reps < 1 or args.raw_batch < 1:
        parser.error("--readings, --reps and --raw-batch must be at least 1")

    base = Path(tempfile.mkdtemp(prefix="p1-outbox-", dir=args.dir))
    readings = make_readings(args.readings)
    names = {f"sig{i}": i + 1 for i in range(METRICS)}
    rows = [(i + 1, r.ts, names[r.metric], r.value) for i, r in enumerate(readings)]
    print(f"P1 outbox write rate: {args.readings:,} readings x {args.reps} repetitions, "
          f"journal_mode=WAL, synchronous={args.synchronous.upper()} on both sides, "
          f"raw transactions of {args.raw_batch:,} rows; databases in {base}")
    print(f"machine: {os.cpu_count()} cores, load average at start {os.getloadavg()[0]:.2f}")
    outbox_rates: list[float] = []
    raw_rates: list[float] = []
    outbox_commits: list[int] = []
    try:
        for rep in range(args.reps):
            sides = ["outbox", "raw"] if rep % 2 == 0 else ["raw", "outbox"]  # neither always goes first
            for side in sides:
                where = base / f"{side}-{rep}"
                if side == "outbox":
                    elapsed, commits = asyncio.run(outbox_run(where, readings, args.synchronous))
                    size = (where / DB_NAME).stat().st_size
                    outbox_rates.append(args.readings / elapsed)
                    outbox_commits.append(commits)
                    detail = f", {commits} commits, {args.readings / max(commits, 1):,.0f} rows each on average"
                else:
                    elapsed = raw_run(where, rows, args.synchronous, args.raw_batch)
                    size = (where / "raw.db").stat().st_size
                    raw_rates.append(args.readings / elapsed)
                    detail = ""
                print(f"  rep {rep + 1} {side:6}: {args.readings / elapsed:>12,.0f} readings/s "
                      f"({elapsed:.3f} s, file {size / 1e6:.1f} MB{detail})")
                shutil.rmtree(where, ignore_errors=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)

    outbox = statistics.median(outbox_rates)
    raw = statistics.median(raw_rates)
    ratio = outbox / raw
    pair_ratio = statistics.median(o / r for o, r in zip(outbox_rates, raw_rates, strict=True))
    ok_rate, ok_ratio = outbox >= TARGET_PER_S, ratio >= TARGET_RATIO
    print(f"outbox (Outbox.add + commits, durable): median {outbox:,.0f} readings/s "
          f"(min {min(outbox_rates):,.0f}, max {max(outbox_rates):,.0f})")
    print(f"raw sqlite3 executemany, batched:       median {raw:,.0f} readings/s "
          f"(min {min(raw_rates):,.0f}, max {max(raw_rates):,.0f})")
    print(f"ratio outbox / raw: {ratio:.2f} (median of per-repetition ratios {pair_ratio:.2f})")
    print(f"target >= {TARGET_PER_S:,}/s: {verdict(ok_rate)}; target >= {TARGET_RATIO} x raw: {verdict(ok_ratio)}")
    print(f"load average at end {os.getloadavg()[0]:.2f}")
    result: dict[str, Any] = {
        "bench": "p1_outbox", "readings": args.readings, "reps": args.reps,
        "synchronous": args.synchronous, "raw_batch_rows": args.raw_batch, "add_chunk": CHUNK,
        "outbox_commits_median": statistics.median(outbox_commits),
        "outbox_per_s": round(outbox), "raw_per_s": round(raw), "ratio": round(ratio, 3),
        "outbox_per_s_all": [round(r) for r in outbox_rates], "raw_per_s_all": [round(r) for r in raw_rates],
        "target_per_s": TARGET_PER_S, "target_ratio": TARGET_RATIO, "pass": ok_rate and ok_ratio,
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
