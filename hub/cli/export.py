"""`edge-hub export`: a time range of readings as CSV or JSON lines, for other tools.

Streamed row by row from one read of the database (hub/db/export.py): memory stays flat however
long the range. With --out the rows go to a hidden file beside FILE, renamed onto it only once
complete, so an interrupted export (Ctrl-C, SIGTERM) leaves no half file; it exits 128 + the
signal's number (130 for Ctrl-C).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import math
import os
import signal
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TextIO

from edgefleet.runtime.files import sync_directory
from hub.cli.format import MOMENT_HELP, moment, when
from hub.config import load_hub
from hub.errors import UsageError

if TYPE_CHECKING:
    from hub.db.interface import HubState
    from hub.db.rows import TelemetryRow

FORMATS: Final = ("csv", "jsonl")
CSV_COLUMNS: Final = ("device", "seq", "ts", "time", "metric", "value", "clock_unknown")
OUTPUT_BUFFER: Final = 1 << 20  # bytes written at a time: fewer system calls on millions of rows


def add_parser(sub: Any, dir_arg: Callable[[argparse.ArgumentParser], None]) -> None:
    exp = sub.add_parser(
        "export", help="write a time range of readings as CSV or JSON lines",
        description="Write the readings taken in [--since, --until) (the start included, the end not), "
                    "ordered by time, then device and sequence number, to stdout or --out FILE. CSV has a header "
                    f"row: {','.join(CSV_COLUMNS)} (ts in seconds since the epoch, time the same in ISO 8601 "
                    "UTC, clock_unknown 1 for a reading stamped by a device clock that was never set). JSON "
                    "lines carry the fields of `edge-hub telemetry --json`. Memory stays flat however many rows; "
                    "an interrupted export with --out leaves no file behind and exits 130 (Ctrl-C).")
    dir_arg(exp)
    exp.add_argument("--since", metavar="T", type=moment, default=-math.inf,
                     help=f"readings taken at or after T (default: the oldest): {MOMENT_HELP}")
    exp.add_argument("--until", metavar="T", type=moment, default=math.inf,
                     help="readings taken before T (default: the newest; same forms as --since)")
    exp.add_argument("--device", metavar="ID", help="only this device")
    exp.add_argument("--metric", metavar="NAME", help="only this metric")
    exp.add_argument("--format", choices=FORMATS, required=True, help="csv (with a header row) or jsonl")
    exp.add_argument("--out", type=Path, metavar="FILE", help="write FILE (replaced only once complete) "
                                                              "instead of stdout")


async def run(args: argparse.Namespace) -> int:
    """The export, or 128 + the signal's number when SIGINT or SIGTERM cut it short."""
    if args.since >= args.until:
        raise UsageError("--since must be before --until: the range is empty")
    loop, task = asyncio.get_running_loop(), asyncio.current_task()
    assert task is not None  # asyncio.run's main task
    received: list[signal.Signals] = []

    def interrupt(sig: signal.Signals) -> None:
        received.append(sig)
        task.cancel()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, interrupt, sig)
    try:
        count = await _export(args)
    except asyncio.CancelledError:
        if not received:
            raise
        task.uncancel()
        what = f"; {args.out} was not written" if args.out else ""
        print(f"edge-hub: export interrupted by {received[0].name}{what}", file=sys.stderr)
        return 128 + received[0].value
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    print(f"{count} reading(s) exported" + (f" to {args.out}" if args.out else ""), file=sys.stderr)
    return 0


async def _export(args: argparse.Namespace) -> int:
    from hub.db.engines import open_store

    paths, config = load_hub(args.dir)
    store = await open_store(config.database.url, paths.db)
    try:
        if args.device is not None and args.device != config.identity and not await store.known_device(args.device):
            raise UsageError(f"no device {args.device!r} is registered with this hub or has stored records: "
                             f"check the id with edge-hub devices --dir {args.dir}")
        with _destination(args.out) as out:
            return await write_rows(store, args, out)
    finally:
        await store.close()


async def write_rows(store: HubState, args: argparse.Namespace, out: TextIO) -> int:
    """Write the range to `out` in args.format; how many readings."""
    import msgspec

    write = _csv_writer(out) if args.format == "csv" else _jsonl_writer(out, msgspec.json.Encoder())
    count = 0
    async with contextlib.aclosing(store.read_telemetry(args.since, args.until, args.device, args.metric)) as rows:
        async for row in rows:
            write(row)
            count += 1
    return count


def _csv_writer(out: TextIO) -> Callable[[TelemetryRow], None]:
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)

    def write(r: TelemetryRow) -> None:  # repr: the shortest text that reads back as the same float
        writer.writerow((r.device, r.seq, repr(r.ts), when(r.ts), r.metric, repr(r.value), int(r.clock_unknown)))
    return write


def _jsonl_writer(out: TextIO, encoder: Any) -> Callable[[TelemetryRow], None]:
    def write(r: TelemetryRow) -> None:
        out.write(encoder.encode(r).decode())
        out.write("\n")
    return write


@contextlib.contextmanager
def _destination(path: Path | None) -> Iterator[TextIO]:
    """stdout, or a hidden file beside `path` renamed onto it (durably) only when the block completes."""
    if path is None:
        yield sys.stdout
        return
    path = path.resolve()
    if path.is_dir():
        raise UsageError(f"--out {path} is a directory: name the file to write")
    try:
        fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    except FileNotFoundError:
        raise UsageError(f"--out {path}: the folder {path.parent} does not exist") from None
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # as a shell redirect would make it, not mkstemp's 0600
        with open(fd, "w", encoding="utf-8", newline="", buffering=OUTPUT_BUFFER) as out:
            yield out
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise
    sync_directory(path.parent)
