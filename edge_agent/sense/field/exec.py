"""`kind = "exec"`: a long-lived program that prints one reading set per line on its stdout.

The escape hatch for BLE, CAN, odd serial protocols: anything in any language that can print
either a JSON object of metric -> number (`{"temp": 21.5, "ts": 1700000000.5}`) or InfluxDB line
protocol (`weather,site=a temp=21.5,rssi=-70i 1700000000000000000`). The program runs from an
argv list (never a shell) in its own process group, is restarted with capped, jittered backoff
when it exits, and the whole group is killed when the agent stops. Its stderr goes to our log,
rate-limited. A line that does not parse is a rejected value (counted, and logged once per reason
by the sensor's health); a line longer than MAX_LINE_BYTES is discarded up to its newline, never
buffered whole. Each exit is a failed poll: the health says so once, not at every restart.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import signal
import time
from collections.abc import Callable, Sequence
from typing import Final, Literal, NamedTuple

import msgspec

from edge_agent.sense.field.base import FieldContext, FieldSensor, SensorHealth, first_batch
from edge_agent.sense.sensors import Reading, SensorError, Sink
from edgefleet.mqtt.reconnect import Backoff
from edgefleet.policy.field import POINT_NAME as POINT
from edgefleet.policy.field import ExecSensorSpec
from edgefleet.runtime.processes import signal_group, stop_group

log = logging.getLogger("edge_agent.sense.exec")

# One reading set per line: 64 KiB holds thousands of metrics; a longer line is a broken program.
MAX_LINE_BYTES: Final = 64 * 1024
READ_CHUNK_BYTES: Final = 64 * 1024  # what one read takes from the pipe
# A program that keeps exiting is started again after 1 s, 2 s, 4 s ... at most a minute apart,
# and forgiven once it has run this long.
RESTART_INITIAL_S: Final = 1.0
RESTART_MAX_S: Final = 60.0
STABLE_AFTER_S: Final = 30.0
# stderr to our log: this many lines per window, then a count of what was left out.
STDERR_LINES_PER_WINDOW: Final = 20
STDERR_WINDOW_S: Final = 60.0
# After the program exits, a grandchild that left our process group may still hold its pipes.
DRAIN_AFTER_EXIT_S: Final = 5.0
Format = Literal["auto", "json", "influx"]
Precision = Literal["ns", "us", "ms", "s"]
PRECISION_SECONDS: Final[dict[Precision, float]] = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0}


class BadLine(ValueError):
    """A line that is not a reading set; the message says why."""


class Point(NamedTuple):
    point: str
    value: float
    ts: float | None  # seconds since the epoch, None: when it was read


# --- parsing -------------------------------------------------------------------------------


def parse_line(line: bytes, fmt: Format = "auto", precision: Precision = "ns") -> list[Point]:
    """One stdout line as points; BadLine says why it is not one."""
    text = line.strip()
    if not text:
        raise BadLine("empty line")
    if fmt == "json" or (fmt == "auto" and text[:1] in (b"{", b"[")):
        return parse_json(text)
    try:
        decoded = text.decode("utf-8")
    except UnicodeDecodeError:
        raise BadLine("not UTF-8") from None
    return parse_influx(decoded, precision)


def parse_json(text: bytes) -> list[Point]:
    try:
        data = msgspec.json.decode(text)
    except msgspec.DecodeError as exc:
        raise BadLine(f"not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise BadLine("JSON but not an object of metric -> number")
    ts: float | None = None
    if "ts" in data:
        ts = _timestamp(data.pop("ts"), 1.0)
    points: list[Point] = []
    for key, value in data.items():
        points.append(Point(_point(key), _finite(value, key), ts))
    if not points:
        raise BadLine("no metric in the object")
    return points


def _timestamp(value: object, unit: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise BadLine(f"timestamp {value!r} is not a positive number")
    return float(value) * unit


def _finite(value: object, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadLine(f"{key!r} is {type(value).__name__} {value!r:.40}, not a number")
    if not math.isfinite(value):
        raise BadLine(f"{key!r} is {value}, not a finite number")
    return float(value)


def _point(name: str) -> str:
    if not POINT.fullmatch(name):
        raise BadLine(f"{name[:60]!r} is not a point name (1 to 32 of A-Z a-z 0-9 _)")
    return name


def parse_influx(line: str, precision: Precision = "ns") -> list[Point]:
    """`measurement[,tag=v...] field=value[,field=value...] [timestamp]`: one point per field,
    named `<measurement>_<field>` (tags identify the series in InfluxDB; here the sensor does)."""
    parts = _split(line, " ")
    if len(parts) not in (2, 3):
        raise BadLine(f"line protocol has {len(parts)} space-separated parts, not 2 or 3")
    measurement = _unescape(_split(parts[0], ",")[0])
    ts = None
    if len(parts) == 3:
        try:
            ts = _timestamp(int(parts[2]), PRECISION_SECONDS[precision])
        except ValueError:
            raise BadLine(f"timestamp {parts[2][:30]!r} is not an integer") from None
    points: list[Point] = []
    for field in _split(parts[1], ","):
        key, sep, raw = field.partition("=")
        if not sep or not key:
            raise BadLine(f"field {field[:40]!r} is not key=value")
        name = _unescape(key)
        points.append(Point(_point(f"{measurement}_{name}"), _influx_value(name, raw), ts))
    return points


_TRUE: Final = frozenset({"t", "T", "true", "True", "TRUE"})
_FALSE: Final = frozenset({"f", "F", "false", "False", "FALSE"})


def _influx_value(name: str, raw: str) -> float:
    if raw.startswith('"'):
        raise BadLine(f"field {name!r} is a string; only numbers and booleans are readings")
    if raw in _TRUE or raw in _FALSE:
        return 1.0 if raw in _TRUE else 0.0
    try:
        value = int(raw[:-1]) if raw[-1:] in ("i", "u") else float(raw)
    except ValueError:
        raise BadLine(f"field {name!r} = {raw[:30]!r} is not a number") from None
    return _finite(value, name)


def _split(text: str, sep: str) -> list[str]:
    """Split on `sep` outside double quotes and not escaped by a backslash."""
    parts: list[str] = []
    current: list[str] = []
    quoted = escaped = False
    for char in text:
        if escaped:
            current.append(char)
            escaped = False
        elif char == "\\":
            current.append(char)
            escaped = True
        elif char == '"':
            current.append(char)
            quoted = not quoted
        elif char == sep and not quoted:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    if quoted:
        raise BadLine("a double quote is not closed")
    parts.append("".join(current))
    return [p for p in parts if p] if sep == " " else parts


def _unescape(text: str) -> str:
    return re.sub(r"\\([ ,=\\])", r"\1", text)


# --- bounded lines -------------------------------------------------------------------------


class LineSplitter:
    """Bytes in, whole lines out; a line over `limit` is dropped up to its newline and counted."""

    def __init__(self, limit: int = MAX_LINE_BYTES) -> None:
        self._limit = limit
        self._buffer = bytearray()
        self._discarding = False
        self.oversized = 0

    def feed(self, chunk: bytes) -> list[bytes]:
        lines: list[bytes] = []
        start = 0
        while (end := chunk.find(b"\n", start)) >= 0:
            if self._discarding:
                self._discarding = False
            elif len(self._buffer) + end - start > self._limit:
                self.oversized += 1
            else:
                lines.append(bytes(self._buffer) + chunk[start:end])
            self._buffer.clear()
            start = end + 1
        if not self._discarding:
            self._buffer += chunk[start:]
            if len(self._buffer) > self._limit:
                self.oversized += 1
                self._discarding = True
                self._buffer.clear()
        return lines

    def rest(self) -> bytes:
        """What is left without a newline at end of file (a last line the program did not end)."""
        rest, discarding = bytes(self._buffer), self._discarding
        self._buffer.clear()
        return b"" if discarding else rest


# --- the program -----------------------------------------------------------------------------


class ExecProgram:
    """Runs `argv` for as long as `run()` runs, hands each parsed line to `emit` as readings."""

    kind = "exec"

    def __init__(self, name: str, argv: Sequence[str], *, fmt: Format = "auto", precision: Precision = "ns",
                 clock: Callable[[], float] = time.time, backoff: Backoff | None = None) -> None:
        if not argv:
            raise ValueError("argv must not be empty")
        self.name = name
        self.argv = list(argv)
        self._fmt, self._precision, self._clock = fmt, precision, clock
        self.backoff = backoff or Backoff(initial=RESTART_INITIAL_S, maximum=RESTART_MAX_S,
                                          stable_after=STABLE_AFTER_S)
        self.pid: int | None = None
        self.starts = 0
        self.lines = 0
        self.oversized = 0
        self.stderr_dropped = 0
        self.last_error = ""
        self._started_at = 0.0

    async def run(self, health: SensorHealth, emit: Sink) -> None:
        """Start, read, restart with backoff; until cancelled (then the group is killed)."""
        while True:
            self.backoff.connecting()
            why = await self._run_once(health, emit)
            self.last_error = why
            delay = self.backoff.lost(time.monotonic())
            health.failed(f"{self.argv[0]} {why}; started again in {delay:.1f} s")
            await asyncio.sleep(delay)

    async def probe(self) -> list[Reading]:
        """Start the program and wait for its first reading set (the caller bounds the wait)."""
        health = _ProbeHealth(self.name, self.kind)
        batch, why = await first_batch(lambda emit: self._run_once(health, emit))
        if batch is not None:
            return batch
        skipped = f"; its lines did not parse: {'; '.join(health.reasons[:3])}" if health.reasons else ""
        raise SensorError(f"{self.argv[0]} {why} before printing a reading{skipped}")

    async def _run_once(self, health: SensorHealth, emit: Sink) -> str:
        try:
            process = await asyncio.create_subprocess_exec(
                *self.argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE, start_new_session=True,
            )
        except OSError as exc:
            return f"could not be started: {exc.strerror or exc}"
        assert process.stdout is not None  # PIPE
        assert process.stderr is not None  # PIPE
        self.pid = process.pid
        self.starts += 1
        self.backoff.connected(time.monotonic())
        self._started_at = time.monotonic()
        log.log(logging.INFO if self.backoff.failures == 0 else logging.DEBUG,
                "%s: started %s (pid %d)", self.name, self.argv[0], process.pid)
        readers = [
            asyncio.create_task(self._read_stdout(process.stdout, health, emit), name=f"{self.name}-stdout"),
            asyncio.create_task(self._read_stderr(process.stderr), name=f"{self.name}-stderr"),
        ]
        try:
            code = await process.wait()
            signal_group(process.pid, signal.SIGKILL)  # whatever it left running in its group
            _, pending = await asyncio.wait(readers, timeout=DRAIN_AFTER_EXIT_S)
            for task in readers:
                if task in pending:
                    task.cancel()
                elif (error := task.exception()) is not None:
                    raise error  # a sink that raised is a bug: let the supervisor log and restart us
        finally:
            for task in readers:
                task.cancel()
            await asyncio.wait(readers)
            if process.returncode is None:  # cancelled: the agent is stopping
                await stop_group(process)
        return f"exited with code {code}" if code >= 0 else f"was killed by {signal.Signals(-code).name}"

    async def _read_stdout(self, stream: asyncio.StreamReader, health: SensorHealth, emit: Sink) -> None:
        splitter = LineSplitter()
        while chunk := await stream.read(READ_CHUNK_BYTES):
            for line in splitter.feed(chunk):
                self._line(line, health, emit)
            if splitter.oversized:
                self.oversized += splitter.oversized
                for _ in range(splitter.oversized):
                    health.reject(f"a line longer than {MAX_LINE_BYTES} bytes was discarded")
                splitter.oversized = 0
        if rest := splitter.rest():
            self._line(rest, health, emit)

    def _line(self, line: bytes, health: SensorHealth, emit: Sink) -> None:
        self.lines += 1
        try:
            points = parse_line(line, self._fmt, self._precision)
        except BadLine as exc:
            health.reject(f"a line that is not a reading set: {exc}")
            log.debug("%s: the line was %r", self.name, line[:200])
            return
        now = self._clock()
        emit([Reading(f"{self.name}.{p.point}", now if p.ts is None else p.ts, p.value) for p in points])
        if health.state == "failing" and time.monotonic() - self._started_at < self.backoff.stable_after:
            health.reads += 1  # a program in a restart loop is not back until it stays up: no event per restart
        else:
            health.ok()

    async def _read_stderr(self, stream: asyncio.StreamReader) -> None:
        splitter = LineSplitter()
        window_start, shown = time.monotonic(), 0
        while chunk := await stream.read(READ_CHUNK_BYTES):
            for line in splitter.feed(chunk):
                now = time.monotonic()
                if now - window_start >= STDERR_WINDOW_S:
                    if shown > STDERR_LINES_PER_WINDOW:
                        log.info("%s: %d stderr lines were not logged", self.name,
                                 shown - STDERR_LINES_PER_WINDOW)
                    window_start, shown = now, 0
                shown += 1
                if shown <= STDERR_LINES_PER_WINDOW:
                    log.info("%s stderr: %s", self.name, line.decode("utf-8", "replace")[:500])
                else:
                    self.stderr_dropped += 1


class _ProbeHealth(SensorHealth):
    """A probe's health: the reasons lines were skipped are kept for its answer, not logged."""

    def __init__(self, name: str, kind: str) -> None:
        super().__init__(name, kind, lambda kind, body: None)
        self.reasons: list[str] = []

    def reject(self, reason: str) -> None:
        self.reasons.append(reason)

    def ok(self) -> None:
        pass


def build(specs: Sequence[ExecSensorSpec], context: FieldContext) -> list[FieldSensor]:
    return [ExecProgram(spec.name, spec.argv, fmt=spec.format, precision=spec.precision, clock=context.clock)
            for spec in specs]
